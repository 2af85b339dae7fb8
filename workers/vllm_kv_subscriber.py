"""The vLLM worker's subscription to its engine's KV events (vLLM's ZMQ publisher), in a thread of its own.

    vLLM scheduler --KVEventBatch (msgpack) over ZMQ PUB, ipc://...--> this thread (SUB)
        -> VllmEventTranslator (canonical hashes) -> on_events (the worker's EventFeed, its CacheClient,
           counters) -> StoreWatch.notify (finishing requests waiting for their blocks)

vLLM numbers its batches 0, 1, 2, ... A gap means batches were lost (the PUB socket drops past its high-water
mark); they may have removed blocks, so the index could claim blocks vLLM no longer holds. We then forget
everything (``AllBlocksCleared`` to every consumer) and rebuild from the following events: the index misses
blocks for a while, never claims one. The first batch we see need not be 0 (a stored block we missed is one
the index does not know, which is allowed).

Everything the translator touches is under ``lock``; the actor's snapshot (a poll with an unknown feed
epoch) takes it too, so a snapshot and the feed's sequence number always agree.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

from cache_service.records import AllBlocksCleared, BlockEvent
from common.logs import get_logger
from workers.vllm_events import (
    VllmAllBlocksCleared, VllmBlockRemoved, VllmBlockStored, VllmEvent, VllmEventTranslator,
)
from workers.vllm_store_watch import StoreWatch

log = get_logger("worker")

__all__ = ["KVEventSubscriber", "convert_vllm_event"]


def convert_vllm_event(ev: Any) -> VllmEvent | None:
    """One of vLLM's ``vllm.distributed.kv_events`` structs -> our record (None: a kind we do not know)."""
    name = type(ev).__name__
    if name == "BlockStored":
        return VllmBlockStored(list(ev.block_hashes), ev.parent_block_hash, list(ev.token_ids), ev.block_size,
                               ev.extra_keys, ev.medium, ev.lora_name)
    if name == "BlockRemoved":
        return VllmBlockRemoved(list(ev.block_hashes), ev.medium)
    if name == "AllBlocksCleared":
        return VllmAllBlocksCleared()
    return None


class KVEventSubscriber:
    def __init__(self, endpoint: str, translator: VllmEventTranslator,
                 on_events: Callable[[list[BlockEvent]], None], topic: str = "") -> None:
        self.endpoint = endpoint
        self.translator = translator
        self.on_events = on_events
        self.topic = topic
        self.lock = threading.Lock()
        self.watch = StoreWatch(self.lock, translator.was_stored)
        self.last_seq: int | None = None
        self.num_batches = 0
        self.num_gaps = 0
        self.error: str | None = None  # why the thread stopped, if it failed
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vllm-kv-events", daemon=True)

    def start(self, timeout_s: float = 10.0) -> None:
        """Returns once the socket is connected (before the engine that publishes on it starts)."""
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise RuntimeError(f"the KV event subscriber did not start: {self.error}")

    def stop(self, timeout_s: float = 2.0) -> None:
        self._stop.set()
        self._thread.join(timeout_s)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        import msgspec
        import zmq
        from vllm.distributed.kv_events import KVEventBatch

        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.SUB)
        try:
            sock.setsockopt(zmq.RCVHWM, 0)  # never drop on our side: the worker drains as fast as vLLM steps
            sock.connect(self.endpoint)
            sock.setsockopt_string(zmq.SUBSCRIBE, self.topic)
            decoder = msgspec.msgpack.Decoder(type=KVEventBatch)
            self._ready.set()
            while not self._stop.is_set():
                if not sock.poll(200):  # wake up now and then to see a stop
                    continue
                _topic, seq_bytes, payload = sock.recv_multipart()
                batch = decoder.decode(payload)
                self._apply(int.from_bytes(seq_bytes, "big", signed=True), batch.events)
        except Exception as exc:  # noqa: BLE001 - the worker reports a dead subscriber in its polls
            self.error = f"{type(exc).__name__}: {exc}"
            log.error("vLLM KV event subscriber failed", extra={"error": self.error})
            self._ready.set()
        finally:
            sock.close(linger=0)

    def _apply(self, seq: int, raw_events: list[Any]) -> None:
        events = [e for e in map(convert_vllm_event, raw_events) if e is not None]
        with self.lock:
            out: list[BlockEvent] = []
            if self.last_seq is not None and seq != self.last_seq + 1:
                self.num_gaps += 1
                log.warning("vLLM KV events lost: the index forgets this worker's blocks and rebuilds",
                            extra={"expected_seq": self.last_seq + 1, "seq": seq})
                self.translator.translate([VllmAllBlocksCleared()])
                out.append(AllBlocksCleared())
            self.last_seq = seq
            self.num_batches += 1
            out.extend(self.translator.translate(events))
            if out:
                self.on_events(out)
            self.watch.notify()
