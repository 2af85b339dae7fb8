"""The cached decoding engine: one model, one paged KV cache, a prefix cache and a continuous-batching loop.

A request's path (see also the README's walk-through):

    add_request   validate -> Sequence (prompt hashes computed lazily) -> scheduler.waiting
    step          scheduler.schedule()      decodes, prefill chunks, admissions (prefix hits), preemptions
                  _build_batch()            flat ForwardBatch: input ids, positions, slot mapping, block tables
                  model(batch, kv_cache)    writes the new K/V, returns the last token's logits per sequence
                  kv.cache_full_blocks()    every block that became full is hashed and cached (BlockStored)
                  sample()                  for sequences whose tokens are all computed
                  _append_token()           detokenize, stop strings / EOS / max_tokens, RequestOutput
    finish        kv.free()                 blocks go back to the pool; hashed ones stay cached (LRU)

Everything here is single-threaded: the worker actor drives ``step()`` in a loop and calls the other methods
between steps.
"""

from __future__ import annotations

import operator
import time
from dataclasses import dataclass
from typing import Sequence as Seq

import torch

from cache_service.block_hash import BlockHash, hash_prompt_blocks, num_reusable_blocks
from cache_service.block_wire import ExportedBlock
from cache_service.engine_port import EvictionAdvisor, PinId
from cache_service.records import BlockEvent, InvalidRequestError, SamplingParams, WorkerLoad
from workers.block_io import export_blocks, import_blocks
from workers.block_pool import Block, BlockPool
from workers.detokenizer import take_delta, update_text
from workers.kv_manager import KVManager, cdiv
from workers.model import KVCache, LoadedModel, load_model
from workers.model_runner import build_forward_batch
from workers.sampling import make_generator, sample
from workers.scheduler import Scheduler
from workers.sequence import RequestOutput, Sequence, SequenceStatus

__all__ = ["Engine", "EngineConfig"]

DEFAULT_KV_CACHE_BYTES = 256 << 20


@dataclass(slots=True)
class EngineConfig:
    model: str = "demo"
    dtype: str | None = None
    device: str = "cpu"
    block_size: int = 16
    num_blocks: int | None = None  # None -> as many as fit in kv_cache_memory_bytes
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    enable_prefix_caching: bool = True
    kv_cache_memory_bytes: int = DEFAULT_KV_CACHE_BYTES
    seed: int = 0  # the shared generator of unseeded sampled requests


class _Ema:
    """Exponential moving average of a rate; None until measured."""

    __slots__ = ("value", "alpha")

    def __init__(self, alpha: float = 0.2) -> None:
        self.value: float | None = None
        self.alpha = alpha

    def update(self, num_tokens: int, seconds: float) -> None:
        if num_tokens <= 0 or seconds <= 0:
            return
        rate = num_tokens / seconds
        self.value = rate if self.value is None else (1 - self.alpha) * self.value + self.alpha * rate


class Engine:
    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None) -> None:
        if config.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {config.block_size}")
        self.config = config
        self.loaded = loaded if loaded is not None else load_model(config.model, config.dtype, config.device)
        lm = self.loaded
        self.model_id: str = lm.model_id
        self.model_config = lm.config
        self.tokenizer = lm.tokenizer
        self.block_size = config.block_size
        num_blocks = config.num_blocks
        if num_blocks is None:
            num_blocks = KVCache.blocks_for_memory(lm.config, config.block_size, lm.dtype, config.kv_cache_memory_bytes)
        if num_blocks < 1:
            raise ValueError(f"the KV cache must hold at least one block (num_blocks={num_blocks})")
        self.kv_cache = KVCache(lm.config, num_blocks, config.block_size, lm.dtype, lm.device)
        self.pool = BlockPool(num_blocks, config.block_size, enable_caching=config.enable_prefix_caching)
        self.kv = KVManager(self.pool, self.model_id)
        self.scheduler = Scheduler(self.kv, config.max_num_seqs, config.max_num_batched_tokens)
        self.eos_token_ids = frozenset(lm.config.eos_token_ids)
        self.max_model_len = lm.config.max_position_embeddings
        self._generator = torch.Generator().manual_seed(config.seed)
        self._seqs: dict[str, Sequence] = {}
        self._pending: list[RequestOutput] = []  # outputs produced while generate()/pin() ran the loop
        self._pins: dict[PinId, list[Block]] = {}  # the one pin table: pin id -> the blocks it holds
        self._prefill_rate = _Ema()
        self._decode_rate = _Ema()
        self._next_internal_id = 0

    # ---- requests ---------------------------------------------------------------------------------
    def validate(self, prompt_token_ids: Seq[int], params: SamplingParams) -> None:
        """Raise ``InvalidRequestError`` (naming the field) for a request that can never be served."""
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError(f"params must be SamplingParams, got {type(params).__name__}")
        n = len(prompt_token_ids)
        if n == 0:
            raise InvalidRequestError("prompt is empty: give at least one token")
        params.validate()
        vocab = self.model_config.vocab_size
        for t in prompt_token_ids:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
                raise InvalidRequestError(
                    f"prompt token id {t!r} is outside the vocabulary (vocab_size {vocab}: ids 0..{vocab - 1})"
                )
        if n + params.max_tokens > self.max_model_len:
            raise InvalidRequestError(
                f"prompt ({n} tokens) + max_tokens ({params.max_tokens}) = {n + params.max_tokens} tokens is "
                f"longer than the model's context ({self.max_model_len} tokens)"
            )
        # The last sampled token never needs KV, so the longest sequence occupies n + max_tokens - 1 slots.
        need = cdiv(n + params.max_tokens - 1, self.block_size)
        if need > self.pool.num_blocks:
            raise InvalidRequestError(
                f"prompt ({n} tokens) + max_tokens ({params.max_tokens}) needs {need} KV blocks of "
                f"{self.block_size} tokens but the KV cache has only {self.pool.num_blocks} blocks"
            )

    def add_request(
        self, request_id: str, prompt_token_ids: Seq[int], params: SamplingParams, cache_salt: str = ""
    ) -> None:
        if request_id in self._seqs:
            raise InvalidRequestError(f"request_id {request_id!r} is already in the engine")
        if not isinstance(cache_salt, str):
            raise InvalidRequestError(f"cache_salt must be a string, got {type(cache_salt).__name__}")
        prompt = _normalize_ids(prompt_token_ids)
        self.validate(prompt, params)
        self._add(request_id, prompt, params, cache_salt)

    def _add(self, request_id: str, prompt: list[int], params: SamplingParams, cache_salt: str,
             internal: bool = False) -> Sequence:
        seq = Sequence(
            request_id=request_id,
            token_ids=list(prompt),
            num_prompt_tokens=len(prompt),
            params=params,
            cache_salt=cache_salt,
            generator=make_generator(params.seed),
            internal=internal,
        )
        self._seqs[request_id] = seq
        self.scheduler.add(seq)
        return seq

    def abort_request(self, request_id: str) -> None:
        """Stop a request now; its final output (finish_reason "abort") comes with the next step()."""
        seq = self._seqs.pop(request_id, None)
        if seq is None or seq.is_finished:
            return
        self.scheduler.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = "abort"
        if not seq.internal:
            self._pending.append(self._output(seq, [], ""))

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._pending)

    # ---- the loop -------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One scheduler iteration: an output for every request that produced tokens or finished."""
        outputs, self._pending = self._pending, []
        outputs.extend(self._step())
        return outputs

    def _step(self) -> list[RequestOutput]:
        sched = self.scheduler.schedule()
        outputs = [self._finish_failed(seq) for seq in sched.failed]
        if not sched.scheduled:
            return [o for o in outputs if o is not None]
        t0 = time.perf_counter()
        batch = build_forward_batch(sched.scheduled, self.block_size)
        logits = self.loaded.model(batch, self.kv_cache)
        to_sample: list[tuple[int, Sequence]] = []
        for row, entry in enumerate(sched.scheduled):
            seq = entry.seq
            seq.num_computed_tokens += entry.num_new_tokens
            self.kv.cache_full_blocks(seq)
            if seq.num_computed_tokens == seq.num_tokens:
                to_sample.append((row, seq))
        if to_sample:
            rows = torch.tensor([r for r, _ in to_sample], device=logits.device)
            seqs = [s for _, s in to_sample]
            next_ids = sample(
                logits.index_select(0, rows) if len(to_sample) != logits.shape[0] else logits,
                [s.params for s in seqs],
                [s.generator for s in seqs],
                self._generator,
            )
            for seq, token in zip(seqs, next_ids):
                outputs.append(self._append_token(seq, token))
        elapsed = time.perf_counter() - t0
        if sched.num_prefill_tokens:
            self._prefill_rate.update(sched.num_tokens, elapsed)
        else:
            self._decode_rate.update(sched.num_decode_tokens, elapsed)
        return [o for o in outputs if o is not None]

    # ---- per-token bookkeeping ------------------------------------------------------------------------
    def _append_token(self, seq: Sequence, token: int) -> RequestOutput | None:
        seq.token_ids.append(token)
        params = seq.params
        if token in self.eos_token_ids and not params.ignore_eos:
            seq.finish_reason = "stop"
        elif seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            seq.finish_reason = "length"
        if seq.internal:
            if seq.finish_reason is None:
                seq.finish_reason = "length"  # an internal warm-up only needs its prefill
            self._finish(seq)
            return None
        update_text(seq, self.tokenizer)
        if seq.finish_reason is not None:
            self._finish(seq)
        return self._emit(seq)

    def _emit(self, seq: Sequence) -> RequestOutput:
        new_ids, new_text = take_delta(seq)
        return self._output(seq, new_ids, new_text)

    def _output(self, seq: Sequence, new_ids: list[int], new_text: str) -> RequestOutput:
        return RequestOutput(
            request_id=seq.request_id,
            new_token_ids=new_ids,
            new_text=new_text,
            finished=seq.is_finished,
            finish_reason=seq.finish_reason,
            prompt_tokens=seq.num_prompt_tokens,
            completion_tokens=seq.num_output_tokens,
            cached_tokens=seq.num_cached_tokens or 0,
            error=seq.error,
        )

    def _finish(self, seq: Sequence) -> None:
        self.scheduler.remove(seq)
        seq.status = SequenceStatus.FINISHED
        self._seqs.pop(seq.request_id, None)

    def _finish_failed(self, seq: Sequence) -> RequestOutput | None:
        self._seqs.pop(seq.request_id, None)
        return None if seq.internal else self._emit(seq)

    # ---- whole-batch convenience ------------------------------------------------------------------------
    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams | list[SamplingParams],
        cache_salt: str = "",
    ) -> list[RequestOutput]:
        """Run ``prompts`` to completion together; full outputs in input order (invalid ones carry ``error``)."""
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        ids = [self._internal_id("gen") for _ in prompts]
        results: dict[str, RequestOutput] = {}
        live: set[str] = set()
        for rid, prompt, p in zip(ids, prompts, params):
            try:
                self.add_request(rid, prompt, p, cache_salt)
                live.add(rid)
            except InvalidRequestError as exc:
                results[rid] = RequestOutput(rid, [], "", True, "error", len(prompt), 0, 0, str(exc))
        acc: dict[str, RequestOutput] = {}
        while live:
            self._check_progress()
            for out in self._step():
                if out.request_id not in live:
                    self._pending.append(out)  # someone else's request: step() will hand it out
                    continue
                total = acc.get(out.request_id)
                if total is None:
                    acc[out.request_id] = total = out
                else:
                    total.new_token_ids = total.new_token_ids + out.new_token_ids
                    total.new_text += out.new_text
                    total.finished, total.finish_reason, total.error = out.finished, out.finish_reason, out.error
                    total.completion_tokens, total.cached_tokens = out.completion_tokens, out.cached_tokens
                if out.finished:
                    live.discard(out.request_id)
                    results[out.request_id] = total
        return [results[rid] for rid in ids]

    def _check_progress(self) -> None:
        # The scheduler always makes progress or fails a request; this guards the loops above against a
        # future bug turning into a silent hang.
        if not self.scheduler.has_unfinished():
            raise RuntimeError("engine loop stalled: requests outstanding but none queued or running")

    def _internal_id(self, kind: str) -> str:
        self._next_internal_id += 1
        return f"__{kind}-{self._next_internal_id}"

    # ---- prefix cache: hashes, hints, pins ------------------------------------------------------------
    def block_hashes(self, token_ids: Seq[int], cache_salt: str = "") -> list[BlockHash]:
        return hash_prompt_blocks(token_ids, self.block_size, self.model_id, cache_salt)

    def num_cached_prefix_blocks(self, block_hashes: Seq[BlockHash]) -> int:
        return self.pool.count_cached_prefix(block_hashes)

    def pin(self, pin_id: PinId, token_ids: Seq[int], cache_salt: str = "") -> int:
        """Cache the full blocks of ``token_ids`` (prefilling them if needed) and hold them until ``unpin``.

        Idempotent per pin id. Two pin ids over the same prefix each hold their own reference, so releasing
        one never releases the other.
        """
        if pin_id in self._pins:
            return len(self._pins[pin_id])
        tokens = [int(t) for t in token_ids]
        num_full = len(tokens) // self.block_size
        full = tokens[: num_full * self.block_size]
        if num_full == 0:
            return 0
        hashes = self.block_hashes(full, cache_salt)
        if len(self.pool.find_cached_prefix(hashes, full)) < num_full:
            self.validate(full, SamplingParams(max_tokens=1))
            rid = self._internal_id("pin")
            self._add(rid, full, SamplingParams(max_tokens=1), cache_salt, internal=True)
            while rid in self._seqs:
                self._check_progress()
                self._pending.extend(self._step())
        blocks = self.pool.find_cached_prefix(hashes, full)
        self.pool.touch(blocks)
        self._pins[pin_id] = blocks
        return len(blocks)

    def unpin(self, pin_id: PinId) -> int:
        blocks = self._pins.pop(pin_id, None)
        if blocks is None:
            return 0
        self.pool.free(blocks)
        return len(blocks)

    def pinned(self) -> dict[PinId, int]:
        return {pin_id: len(blocks) for pin_id, blocks in self._pins.items()}

    # ---- block transfer ---------------------------------------------------------------------------------
    def export_blocks(self, block_hashes: Seq[BlockHash]) -> list[ExportedBlock]:
        """The leading blocks of ``block_hashes`` this engine holds, as bytes (stops at the first miss)."""
        return export_blocks(self.pool, self.kv_cache, self.model_id, block_hashes)

    def import_blocks(
        self, blocks: Seq[ExportedBlock], parent_hash: BlockHash | None = None, *, cache_salt: str | None = None
    ) -> int:
        """Validate and cache another engine's exported blocks; returns how many of them this engine now holds.

        See ``workers.block_io.import_blocks``: a bad block raises ``BlockImportError`` after the good leading
        ones were kept; ``cache_salt`` (when ``parent_hash`` is None) lets block 0's link be checked too.
        """
        return import_blocks(self.pool, self.kv_cache, self.model_id, blocks, parent_hash, cache_salt)

    # ---- introspection ---------------------------------------------------------------------------------
    def drain_events(self) -> list[BlockEvent]:
        return self.pool.drain_events()

    def load(self) -> WorkerLoad:
        s = self.scheduler.stats
        return WorkerLoad(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_active_blocks=self.pool.num_used_blocks,
            num_free_blocks=self.pool.num_free_blocks,
            capacity_blocks=self.pool.num_blocks,
            num_waiting_blocks=-(-self._prefill_backlog() // self.block_size),
            num_cached_blocks=self.pool.num_cached_blocks,
            num_pinned_blocks=sum(len(b) for b in self._pins.values()),
            prefix_query_tokens=s.num_query_tokens,
            prefix_hit_tokens=s.num_hit_tokens,
            num_preemptions=s.num_preemptions,
            prefill_tokens_per_s=self._prefill_rate.value or 0.0,
            decode_tokens_per_s=self._decode_rate.value or 0.0,
        )

    def _prefill_backlog(self) -> int:
        """Tokens still to prefill: waiting sequences net of their cached prefix, plus running prefills.

        Net of the cache, or a worker whose queue holds followers of a prefix it already caches would look
        as busy as if it had to compute them all, and the router would send the next follower elsewhere.
        """
        bs = self.block_size
        total = 0
        for seq in self.scheduler.waiting:
            hashes = self.kv.update_block_hashes(seq)[: num_reusable_blocks(seq.num_tokens, bs)]
            total += seq.num_tokens - self.pool.count_cached_prefix(hashes) * bs
        for seq in self.scheduler.running:
            total += max(0, seq.num_tokens - seq.num_computed_tokens - 1)  # a decode has 1 uncomputed token
        return total

    def cached_hashes(self) -> list[BlockHash]:
        return self.pool.cached_hashes()

    def set_eviction_advisor(self, advisor: EvictionAdvisor | None) -> None:
        self.pool.eviction_advisor = advisor

    def reset_cache(self) -> bool:
        """Forget every cached block (benchmarks between runs); False while requests or pins hold blocks."""
        return self.pool.reset_cache()

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def block_nbytes(self) -> int:
        return self.kv_cache.block_nbytes()

    def check_integrity(self) -> None:
        self.pool.check_integrity()
        for seq in self.scheduler.running:
            assert seq.status is SequenceStatus.RUNNING
            assert len(seq.block_table) * self.block_size >= seq.num_computed_tokens
        for seq in self.scheduler.waiting:
            assert seq.status is SequenceStatus.WAITING and not seq.block_table


def _normalize_ids(xs: Seq[object]) -> list:
    """Plain ints where possible (numpy / torch integer scalars too); anything else is left for validate()."""
    out = []
    for x in xs:
        if isinstance(x, bool) or isinstance(x, int):
            out.append(x)
        else:
            try:
                out.append(operator.index(x))
            except TypeError:
                out.append(x)
    return out
