"""The block-event feed a worker keeps for routers: sequence-numbered, bounded, snapshot on overflow.

The engine loop pushes every block event it drains (``cache_service.records`` block events); each router polls with the
feed epoch and the last sequence number it applied and gets what came after. A router that fell
behind the buffer, or that knows another epoch (the worker restarted), gets ``None`` and asks for a
full snapshot instead. Several routers can read one feed: it keeps no per-reader state.
"""

from __future__ import annotations

import threading
import uuid
from collections import deque
from typing import Sequence

from cache_service.records import BlockEvent


class EventFeed:
    """A bounded, sequence-numbered buffer of block events.

    Event ``k`` (1-based) has seq ``k``; a reader at ``seq`` gets events ``seq+1 ..``. When the reader
    fell behind the buffer (or knows another epoch: this worker restarted) it must take a snapshot.
    """

    def __init__(self, capacity: int) -> None:
        self.epoch = uuid.uuid4().hex
        self.seq = 0
        self._buf: deque[BlockEvent] = deque(maxlen=capacity)
        self._lock = threading.Lock()

    def push(self, events: Sequence[BlockEvent]) -> None:
        with self._lock:
            self._buf.extend(events)
            self.seq += len(events)

    def read(self, epoch: str, seq: int) -> tuple[int, list[BlockEvent]] | None:
        """(current seq, events after ``seq``), or None when a snapshot is needed."""
        with self._lock:
            oldest = self.seq - len(self._buf)  # seq of the event just before the buffer's first
            if epoch != self.epoch or not oldest <= seq <= self.seq:
                return None
            n = self.seq - seq
            return self.seq, (list(self._buf)[len(self._buf) - n:] if n else [])
