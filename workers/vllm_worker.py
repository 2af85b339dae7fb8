"""The vLLM Ray worker actor: vLLM's async engine behind the same actor surface as ``WorkerActor``.

    router (router/ray_client.py) --generate / poll / pin / unpin / abort--> VllmWorkerActor
        generate:  GenerateCall -> vLLM AsyncLLM.generate(prompt ids, cache_salt, SamplingParams) -> Delta stream
        poll:      WorkerPoll(load, counters, block events since seq | snapshot), as a native worker's
    vLLM scheduler --KV events (ZMQ)--> KVEventSubscriber --canonical BlockEvents--> EventFeed (router's mirror),
                                                                                     CacheClient (Redis index),
                                                                                     WorkerCounters (metrics)

So everything above the engine (routing and its predictions, streaming, tenants, failover, metrics, ``stats``,
``bench``, HTTP) works unchanged. What vLLM cannot do here, and what the worker says instead:

- pins that hold blocks (``pin``): vLLM has no API to hold a prefix's blocks; ``pin`` raises
  ``UnsupportedFeatureError`` and the router answers Pin with FAILED_PRECONDITION. ``unpin`` holds nothing to
  release and returns 0.
- block export/import (BlockTransfer): vLLM's KV cache lives in its engine process, reachable only through a
  KV connector; these workers serve no BlockTransfer (``transfer_address`` ""), ignore the router's peer
  hints, and recompute what a peer holds. The README says what a connector would take.

Usage: ``cached_tokens`` is vLLM's own count for the request (``RequestOutput.num_cached_tokens``).
Tenants: the router's salt becomes vLLM's per-request ``cache_salt`` (vLLM mixes it into the first block's
hash, so tenants never share a block inside vLLM either) and roots the canonical hashes
(workers/vllm_roots.py). The engine is built off the actor's event loop (tens of seconds on a CPU), so polls
and starts of other workers are not held up.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Hashable, Sequence

from cache_service.block_hash import BlockHash, hash_prompt_blocks
from cache_service.records import (
    BlockEvent, Delta, EngineFailure, FailureKind, GenerateCall, HeldBlock, UnsupportedFeatureError, Usage,
    WorkerCounters, WorkerInfo, WorkerLoad, WorkerPoll,
)
from common.logs import get_logger, request_context
from workers import ray_env
from workers.event_feed import EventFeed
from workers.ray_worker import WorkerConfig
from workers.vllm_config import VllmOptions, engine_args, sampling_params, worker_env
from workers.vllm_events import VllmEventTranslator
from workers.vllm_kv_subscriber import KVEventSubscriber
from workers.vllm_roots import RootSalts

log = get_logger("worker")

__all__ = ["PINS_UNSUPPORTED", "TIERS_UNSUPPORTED", "VllmWorkerActor"]

PINS_UNSUPPORTED = ("pins that hold blocks are not supported on vLLM workers (--engine vllm): vLLM has no API "
                    "to keep a prefix's blocks from eviction; its prefix cache keeps a shared system prompt "
                    "while requests use it")


TIERS_UNSUPPORTED = ("--host-cache-gb and --disk-cache are tiers of the native engine's block pool; vLLM workers "
                     "(--engine vllm) have none (vLLM offloads through a KV connector, which these workers do "
                     "not configure)")


@dataclass(slots=True)
class _Tracked:
    """A request in flight, for the load a poll reports."""

    num_uncached_blocks: int  # prompt blocks to prefill (net of what the index says vLLM holds)
    num_tokens: int
    started: bool = False  # its first token came back: it is decoding


@dataclass(slots=True)
class _Totals:
    prefix_query_tokens: int = 0
    prefix_hit_tokens: int = 0
    counters: WorkerCounters = field(default_factory=WorkerCounters)


def _vllm_root_hasher(hash_algo: str) -> Any:
    """vLLM's own hash of a chain's first block under a salt (vllm.v1.core.kv_cache_utils.hash_block_tokens with
    NONE_HASH as parent and the salt as its one extra key), or None when it cannot be reproduced outside the
    engine process (a non-cryptographic algorithm draws a random seed there). Only used to tell two candidate
    salts apart when an event carries no extra keys (workers/vllm_roots.py)."""
    try:
        from vllm.utils.hashing import get_hash_fn_by_name
        from vllm.v1.core import kv_cache_utils as kcu

        fn = get_hash_fn_by_name(hash_algo)
        if fn in kcu._NON_CRYPTO_HASH_FUNCTIONS and os.environ.get("PYTHONHASHSEED") is None:
            return None
        none_hash = fn(kcu.resolve_none_hash_seed(fn))
    except Exception:  # noqa: BLE001 - another vLLM: resolve without it
        return None

    def root_hash(tokens: Sequence[int], salt: str) -> Hashable:
        extra = (("cache_salt", salt),) if salt else None
        return kcu.maybe_convert_block_hash(fn((none_hash, tuple(int(t) for t in tokens), extra)))

    return root_hash


def _start_reaper() -> Any:
    """workers/vllm_reaper.py watching this process, in a session of its own (a kill of our process group must
    not take the watchdog with it)."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen([sys.executable, "-m", "workers.vllm_reaper", str(os.getpid())], env=env,
                            start_new_session=True, stdin=subprocess.DEVNULL)


class VllmWorkerActor:
    """Wrap with ``ray.remote(VllmWorkerActor)`` (``deploy/worker_actors.py`` picks it for ``--engine vllm``)."""

    def __init__(self, config: WorkerConfig, options: VllmOptions | None = None) -> None:
        from workers.model.checkpoint import checkpoint_model_id
        from workers.model.demo import DEMO_MODEL_ID

        if config.model == DEMO_MODEL_ID:
            raise ValueError("--engine vllm serves a checkpoint folder (--model PATH: config.json, safetensors, "
                             "tokenizer files); the built-in demo model exists only for --engine native")
        if config.host_cache_gb or config.disk_cache:
            raise ValueError(TIERS_UNSUPPORTED)
        self.config = config
        self.options = options or VllmOptions()
        self.model_id = checkpoint_model_id(config.model)  # the hash root the router uses too
        self.block_size = config.block_size
        self.feed = EventFeed(config.feed_capacity)
        self.totals = _Totals()
        self.engine: Any = None  # vllm.v1.engine.async_llm.AsyncLLM, once started
        self.on_cpu = True
        self.num_blocks = config.num_blocks or 0  # vLLM's pool, once started
        self.roots = RootSalts(config.block_size)
        self.translator = VllmEventTranslator(self.model_id, config.block_size, self.roots)
        self.endpoint = f"ipc:///tmp/prefixcache-vllm-{config.worker_id}-{uuid.uuid4().hex[:12]}.ipc"
        self.subscriber = KVEventSubscriber(self.endpoint, self.translator, self._on_events)
        self.client: Any = None  # cache_service.client.CacheClient, with a cache service
        self._requests: dict[str, _Tracked] = {}
        self._started = False
        self._start_lock = asyncio.Lock()
        self._reaper: Any = None  # subprocess.Popen of workers/vllm_reaper.py
        self.node_id = ray_env.ray_node_id()
        self._restarted = ray_env.was_restarted()  # Ray re-ran only this constructor: the first poll starts us

    # ---- lifecycle ------------------------------------------------------------------------------------
    async def start(self) -> WorkerInfo:
        """Start vLLM (off the event loop), its KV event subscription and the cache client; idempotent."""
        async with self._start_lock:
            if not self._started:
                await self._start_engine()
                if self.config.cache_service_address is not None:
                    await self._start_cache_client()
                self._started = True
        return self.info()

    async def _start_engine(self) -> None:
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM

        cfg = self.config
        self.on_cpu = current_platform.is_cpu()
        os.environ.update(worker_env(cfg.torch_threads, self.on_cpu))
        self._reaper = _start_reaper()  # vLLM's processes must not outlive a killed actor
        self.subscriber.start()  # connected before vLLM publishes its first batch
        args = engine_args(model=cfg.model, dtype=cfg.dtype, kv_cache_dtype=cfg.kv_cache_dtype,
                           block_size=cfg.block_size, num_blocks=cfg.num_blocks,
                           max_num_seqs=cfg.max_num_seqs, max_num_batched_tokens=cfg.max_num_batched_tokens,
                           kv_events_endpoint=self.endpoint, on_cpu=self.on_cpu, options=self.options)
        self.engine = await asyncio.to_thread(AsyncLLM.from_engine_args, args)
        cache_config = self.engine.vllm_config.cache_config
        self.num_blocks = int(cache_config.num_gpu_blocks or cfg.num_blocks or 0)
        self.roots.vllm_hash = _vllm_root_hasher(cache_config.prefix_caching_hash_algo)
        # The pool bounds what vLLM can hold; twice that bounds the map even with duplicate copies.
        self.translator.capacity = max(2 * self.num_blocks, 1024)
        log.info("vLLM engine ready", extra={"worker": cfg.worker_id, "model_id": self.model_id,
                                             "num_blocks": self.num_blocks, "block_size": cfg.block_size})

    async def _start_cache_client(self) -> None:
        from cache_service.client import CacheClient, CacheClientConfig
        from cache_service.types import NodeInfo
        from common.cluster_auth import Member

        cfg = self.config
        # No transfer address: these workers serve no BlockTransfer (see the module doc). A member of the
        # cluster like a native worker: the control plane knows it under its own identity only.
        member = Member(cfg.worker_id, cfg.cluster_credential) if cfg.cluster_credential is not None else None
        info = NodeInfo(node_id=cfg.worker_id, model_id=self.model_id, block_size=cfg.block_size,
                        capacity_blocks=self.num_blocks, ray_node_id=self.node_id)
        self.client = CacheClient(cfg.cache_service_address, info, snapshot=self._snapshot_hashes,
                                  load=self._load,
                                  config=CacheClientConfig(ttl_s=cfg.heartbeat_ttl_s,
                                                           heartbeat_interval_s=cfg.heartbeat_interval_s,
                                                           member=member))
        await self.client.start()
        await self.client.wait_registered()

    def info(self) -> WorkerInfo:
        return WorkerInfo(worker_id=self.config.worker_id, node_id=self.node_id, model_id=self.model_id,
                          device="cpu" if self.on_cpu else "cuda", block_size=self.block_size,
                          num_blocks=self.num_blocks, transfer_address="")

    async def shutdown(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            try:
                await client.stop()
            except Exception:  # noqa: BLE001 - stopping anyway
                pass
        engine, self.engine = self.engine, None
        if engine is not None:
            engine.shutdown()
        self.subscriber.stop()
        if self._reaper is not None:
            self._reaper.terminate()

    # ---- block events -----------------------------------------------------------------------------------
    def _on_events(self, events: list[BlockEvent]) -> None:
        # In the subscriber thread, under its lock.
        self.totals.counters.observe_events(events)
        self.feed.push(events)
        if self.client is not None:
            self.client.offer_events(events)

    def _snapshot_hashes(self) -> list[HeldBlock]:
        with self.subscriber.lock:
            return [HeldBlock(h) for h in self.translator.cached_hashes()]  # vLLM's pool is the device tier

    # ---- generation -------------------------------------------------------------------------------------
    async def generate(self, call: GenerateCall) -> AsyncIterator[Delta]:
        """vLLM's deltas as ours; the last carries Usage with vLLM's cached-token count. ``call.peer`` is
        ignored: there is no block transfer into vLLM."""
        from vllm.v1.engine.exceptions import EngineDeadError

        wid = self.config.worker_id
        engine = self.engine
        if engine is None:
            yield Delta(finish_reason="error", failure=EngineFailure(FailureKind.ENGINE, "the vLLM engine is not running"),
                        worker_id=wid)
            return
        prompt: dict[str, Any] = {"prompt_token_ids": list(call.prompt_ids)}
        if call.cache_salt:
            prompt["cache_salt"] = call.cache_salt
        with request_context(call.request_id):
            self._admit(call)
        output_ids: list[int] = []
        cached = 0
        try:
            stream = engine.generate(prompt, sampling_params(call.params), call.request_id)
            async for out in stream:
                completion = out.outputs[0]
                output_ids.extend(completion.token_ids)
                cached = max(cached, out.num_cached_tokens or 0)
                self._progress(call.request_id, len(call.prompt_ids) + len(output_ids))
                delta = Delta(token_ids=list(completion.token_ids), text=completion.text, worker_id=wid)
                if out.finished:
                    # The client may send its next turn as soon as it sees this: let the feed show our blocks
                    # first (bounded), as a native worker's does.
                    await self._wait_for_blocks(call, output_ids)
                    delta.finish_reason = completion.finish_reason or "stop"
                    delta.usage = Usage(prompt_tokens=len(call.prompt_ids), completion_tokens=len(output_ids),
                                        cached_tokens=cached)
                    self.totals.prefix_query_tokens += len(call.prompt_ids)
                    self.totals.prefix_hit_tokens += cached
                yield delta
        except ValueError as exc:  # vLLM's input validation (VLLMValidationError is a ValueError)
            yield Delta(finish_reason="error", failure=EngineFailure(FailureKind.INVALID, str(exc)), worker_id=wid)
        except EngineDeadError as exc:
            yield Delta(finish_reason="error", failure=EngineFailure(FailureKind.ENGINE, f"vLLM engine died: {exc}"),
                        worker_id=wid)
        finally:
            self._requests.pop(call.request_id, None)

    def _admit(self, call: GenerateCall) -> None:
        bs = self.block_size
        with self.subscriber.lock:
            self.roots.admit(call.prompt_ids, call.cache_salt)
            hashes = hash_prompt_blocks(call.prompt_ids, bs, self.model_id, call.cache_salt)
            held = 0
            for h in hashes:
                if not self.translator.holds(h):
                    break
                held += 1
        self._requests[call.request_id] = _Tracked(-(-len(call.prompt_ids) // bs) - held, len(call.prompt_ids))

    def _progress(self, request_id: str, num_tokens: int) -> None:
        tracked = self._requests.get(request_id)
        if tracked is not None:
            tracked.started = True
            tracked.num_tokens = num_tokens

    async def _wait_for_blocks(self, call: GenerateCall, output_ids: list[int]) -> None:
        # vLLM caches the full blocks of the tokens it computed: the prompt and every output token but the last
        # (sampled, never fed back).
        computed = list(call.prompt_ids) + output_ids[:-1]
        hashes = hash_prompt_blocks(computed, self.block_size, self.model_id, call.cache_salt)
        if hashes and not await self.subscriber.watch.wait(hashes, self.options.store_wait_s):
            log.warning("KV events for a finished request did not arrive in time",
                        extra={"request_id": call.request_id, "num_blocks": len(hashes)})

    async def abort(self, request_id: str) -> None:
        if self.engine is not None:
            await self.engine.abort(request_id)

    # ---- the router's poll --------------------------------------------------------------------------------
    async def poll(self, feed_epoch: str, feed_seq: int) -> WorkerPoll:
        if self._restarted and not self._started:
            await self.start()  # a restarted process: a fresh engine, registered again, before it answers
        self._check_alive()
        read = self.feed.read(feed_epoch, feed_seq)
        if read is None:
            with self.subscriber.lock:  # the snapshot and the seq, atomically
                seq, snapshot = self.feed.seq, [HeldBlock(h) for h in self.translator.cached_hashes()]
            events: list[BlockEvent] = []
        else:
            (seq, events), snapshot = read, None
        return WorkerPoll(feed_epoch=self.feed.epoch, feed_seq=seq, events=events, snapshot=snapshot,
                          load=self._load(), counters=self.totals.counters, pins=[], engine_stalled_s=0.0,
                          transfer_address="")

    def _check_alive(self) -> None:
        engine = self.engine
        if engine is None:
            raise RuntimeError("the vLLM engine is not started")
        if getattr(engine, "errored", False):
            raise RuntimeError(f"the vLLM engine died: {getattr(engine, 'dead_error', '')}")
        if not self.subscriber.is_alive():
            raise RuntimeError(f"the KV event subscriber stopped: {self.subscriber.error}")

    def _load(self) -> WorkerLoad:
        """The load as the policies read it, from our own accounting of the requests in flight (vLLM's
        scheduler stats arrive only through its stat loggers, once per logging interval)."""
        bs = self.block_size
        running = [t for t in self._requests.values() if t.started]
        waiting = [t for t in self._requests.values() if not t.started]
        active = sum(-(-t.num_tokens // bs) for t in self._requests.values())
        with self.subscriber.lock:
            num_cached = len(self.translator.cached_hashes())
        return WorkerLoad(
            worker_id=self.config.worker_id, num_running=len(running), num_waiting=len(waiting),
            num_active_blocks=min(active, self.num_blocks) if self.num_blocks else active,
            num_free_blocks=max(0, self.num_blocks - active), capacity_blocks=self.num_blocks,
            num_waiting_blocks=sum(t.num_uncached_blocks for t in waiting), num_cached_blocks=num_cached,
            prefix_query_tokens=self.totals.prefix_query_tokens, prefix_hit_tokens=self.totals.prefix_hit_tokens,
        )

    # ---- pins: not on vLLM ----------------------------------------------------------------------------------
    async def pin(self, pin_id: str, token_ids: Sequence[int], cache_salt: str = "") -> int:
        raise UnsupportedFeatureError(PINS_UNSUPPORTED)

    async def unpin(self, pin_id: str) -> int:
        return 0  # nothing is ever pinned here, so nothing is held

    def pinned(self) -> list[str]:
        return []

    # ---- introspection (tests, benchmarks) -------------------------------------------------------------------
    async def ping(self) -> str:
        return self.config.worker_id

    async def load(self) -> WorkerLoad:
        return self._load()

    async def reset_cache(self) -> bool:
        """vLLM's reset_prefix_cache (it publishes AllBlocksCleared); False while requests hold blocks."""
        return bool(await self.engine.reset_prefix_cache()) if self.engine is not None else False

    async def cached_hashes(self) -> list[BlockHash]:
        with self.subscriber.lock:
            return self.translator.cached_hashes()

    async def event_stats(self) -> dict[str, int]:
        """The KV event path's counters: batches, gaps, blocks dropped (untranslatable), roots unresolved."""
        s = self.subscriber
        return {"num_batches": s.num_batches, "num_gaps": s.num_gaps, "last_seq": s.last_seq or 0,
                "num_dropped_blocks": self.translator.num_dropped_blocks, "num_dropped_roots": self.roots.num_dropped,
                "num_vllm_blocks": self.translator.num_vllm_blocks}

    async def vllm_root_hash_held(self, tokens: Sequence[int], cache_salt: str) -> bool | None:
        """Whether vLLM's hash of a first block under ``cache_salt``, as we recompute it, is one vLLM stored
        (None: no recomputation here). Tests check the tie-breaker of workers/vllm_roots.py with it."""
        fn = self.roots.vllm_hash
        if fn is None:
            return None
        with self.subscriber.lock:
            return self.translator.holds_vllm(fn(tokens, cache_salt))

    async def check_integrity(self) -> None:
        with self.subscriber.lock:
            assert len(self.translator.cached_hashes()) <= self.translator.num_vllm_blocks
