"""The bounded hand-off of block events from the engine thread to the publisher.

``offer`` runs in the engine's thread after every step and must never wait
on Redis or the network: it appends under a short lock, and when the queue
is full it *drops everything* and flags ``resync_needed`` so that the next
publication is a full snapshot instead (the index converges either way).

Every event gets a sequence number. A snapshot is cut at a sequence number
(``cut()``) taken *before* the snapshot is read; events after the cut are
replayed on top of it. Events between the cut and the read are then applied
twice, which is harmless: stored/removed/cleared are assignments, so
replaying part of a history onto a state that already includes it gives the
same state.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from typing import Sequence

from cache_service.records import BlockEvent


class EventQueue:
    def __init__(self, capacity: int = 65_536) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be positive, got {capacity}")
        self.capacity = capacity
        self._lock = threading.Lock()
        self._items: deque[tuple[int, BlockEvent]] = deque()
        self._next_seq = 1
        self.resync_needed = True  # nothing published yet: start with a snapshot
        self.num_dropped = 0
        self.num_overflows = 0

    def __len__(self) -> int:
        return len(self._items)

    def offer(self, events: Sequence[BlockEvent]) -> bool:
        """Queue ``events``; False when they did not fit (a resync is then pending)."""
        if not events:
            return True
        with self._lock:
            if len(self._items) + len(events) > self.capacity:
                self.num_dropped += len(self._items) + len(events)
                self.num_overflows += 1
                self._items.clear()
                self._next_seq += len(events)
                self.resync_needed = True
                return False
            seq = self._next_seq
            self._items.extend(zip(range(seq, seq + len(events)), events))
            self._next_seq = seq + len(events)
            return True

    def cut(self) -> int:
        """The last sequence number handed out: a snapshot read after this includes every event up to it."""
        with self._lock:
            self.resync_needed = False
            return self._next_seq - 1

    def peek(self, max_events: int) -> list[tuple[int, BlockEvent]]:
        """Up to ``max_events`` oldest events (left in place until ``ack``)."""
        with self._lock:
            return list(itertools.islice(self._items, max_events))

    def ack(self, upto: int) -> None:
        """Forget every event with a sequence number <= ``upto`` (published, or covered by a snapshot)."""
        with self._lock:
            while self._items and self._items[0][0] <= upto:
                self._items.popleft()

    def request_resync(self) -> None:
        with self._lock:
            self.resync_needed = True
