"""A finishing request waits (bounded) until its blocks' store events reached the feed, as on a native worker.

A native engine publishes a step's block events before that step's outputs (workers/engine_loop.py), so once
a client sees its request finish the next poll already shows its blocks, and the next turn of a conversation
is routed to them. vLLM publishes its KV events on a ZMQ socket of their own, which races the outputs. So the
vLLM worker, before it yields a request's last delta, registers the canonical hashes of the request's full
blocks and waits until the subscriber has translated a store of each (``VllmEventTranslator.was_stored``:
held, or stored and already evicted again). The wait is bounded (``timeout_s``): a block the translator
dropped never arrives, and must not hold the client.

    asyncio loop: expect(hashes) -> Wait (pending = not yet stored, checked under the subscriber's lock)
    subscriber thread: after each batch, notify() -> a Wait with nothing pending left is set
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Callable, Iterable

from cache_service.block_hash import BlockHash

__all__ = ["StoreWatch"]


class _Wait:
    def __init__(self, pending: set[BlockHash], loop: asyncio.AbstractEventLoop) -> None:
        self.pending = pending
        self.loop = loop
        self.done = asyncio.Event()


class StoreWatch:
    def __init__(self, lock: threading.Lock, was_stored: Callable[[BlockHash], bool]) -> None:
        self._lock = lock  # the subscriber's: translation and registration exclude each other
        self._was_stored = was_stored
        self._waits: list[_Wait] = []

    async def wait(self, hashes: Iterable[BlockHash], timeout_s: float) -> bool:
        """True when every block was stored (or nothing was pending); False after ``timeout_s``."""
        with self._lock:
            pending = {h for h in hashes if not self._was_stored(h)}
            if not pending:
                return True
            w = _Wait(pending, asyncio.get_running_loop())
            self._waits.append(w)
        try:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(w.done.wait(), timeout_s)
            return w.done.is_set()
        finally:
            with self._lock:
                with contextlib.suppress(ValueError):
                    self._waits.remove(w)

    def notify(self) -> None:
        """Called by the subscriber thread with its lock held, after translating a batch."""
        for w in self._waits:
            if w.pending:
                w.pending = {h for h in w.pending if not self._was_stored(h)}
                if not w.pending:
                    w.loop.call_soon_threadsafe(w.done.set)
