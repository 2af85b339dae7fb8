"""The live workers: their clients, health, load, and the block events that feed the index mirror.

One asyncio task polls every worker concurrently each ``poll_interval_s``::

    poll(feed_epoch, feed_seq) -> WorkerPoll(load, stats, events since feed_seq | full snapshot)

A poll that fails because the worker is dead (``WorkerCallError.dead``) takes it out of rotation at once,
for good. A worker whose process is being restarted (``WorkerCallError.restarting``; the stack creates Ray
workers with ``max_restarts``) leaves rotation at once too but keeps being polled: the new
incarnation (fresh engine, new feed epoch) comes back with its first answer, through the same path
as a hung worker. A worker that has not answered for ``unresponsive_after_s`` (hung, partitioned) is
taken out too and comes back when it answers again (with a full resync of its blocks, since what it
did meanwhile is unknown). Leaving rotation sets the worker's ``down`` event, which wakes every stream
waiting on it, and drops its entries from the mirror. Every call is awaited through the worker's
``WorkerClient`` (router/worker_client.py): no Ray here, so this is unit-tested with in-process workers.

Membership changes while serving (``deploy/elastic.py``): a worker started on a node that joined is
``add``-ed and enters rotation with its first answered poll; a worker whose node is gone is taken out
with ``dead=True`` and keeps its entry (``prefixcache_worker_up`` 0, ``target_worker`` UNAVAILABLE).
Both run on the router's event loop (the registry is not thread-safe).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Callable

from cache_service.records import WorkerCounters, WorkerLoad, WorkerPoll
from common.logs import get_logger
from router.index_mirror import IndexMirror
from router.worker_client import WorkerCallError, WorkerClient

log = get_logger("router")


@dataclass(slots=True)
class WorkerState:
    worker_id: str
    client: WorkerClient
    node_id: str = ""
    transfer_address: str = ""  # host:port of its BlockTransfer endpoint ("" when none)
    live: bool = False  # in rotation
    dead: bool = False  # the actor is gone: never polled again
    load: WorkerLoad = field(default_factory=WorkerLoad)
    counters: WorkerCounters = field(default_factory=WorkerCounters)
    pins: frozenset[str] = frozenset()
    feed_epoch: str = ""
    feed_seq: int = 0
    last_ok: float = 0.0
    last_error: str = ""
    # Blocks of prefill the router sent this worker that its last poll answer may not include yet (the
    # load a worker reports lags the router's own decisions by up to one poll).
    num_routed_blocks: int = 0
    _routed_at_poll: int = 0  # num_routed_blocks when the poll in flight was sent
    num_in_flight: int = 0
    down: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.load.worker_id = self.worker_id

    def effective_load(self) -> WorkerLoad:
        load = self.load
        if not self.num_routed_blocks:
            return load
        return dataclasses.replace(load, num_waiting_blocks=load.num_waiting_blocks + self.num_routed_blocks)


class WorkerRegistry:
    def __init__(
        self,
        mirror: IndexMirror,
        *,
        poll_interval_s: float = 0.1,
        poll_timeout_s: float = 2.0,
        unresponsive_after_s: float = 3.0,
        stall_after_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.mirror = mirror
        self.clock = clock  # monotonic seconds; tests pass their own to expire a worker without sleeping
        self.poll_interval_s = poll_interval_s
        self.poll_timeout_s = poll_timeout_s
        self.unresponsive_after_s = unresponsive_after_s
        # An engine loop that has not gone round for this long is hung (a long step is legitimate: a
        # CPU prefill chunk can take seconds, so this is far above the poll timeouts).
        self.stall_after_s = stall_after_s
        self.workers: dict[str, WorkerState] = {}
        self._task: asyncio.Task | None = None
        self._first_poll = asyncio.Event()

    # ---- membership -------------------------------------------------------------------------------
    def add(self, client: WorkerClient, node_id: str = "", transfer_address: str = "") -> WorkerState:
        worker_id = client.worker_id
        if worker_id in self.workers:
            raise ValueError(f"worker {worker_id!r} is already registered")
        state = WorkerState(worker_id, client, node_id, transfer_address)
        state.down.set()  # not in rotation until its first poll answers
        self.workers[worker_id] = state
        return state

    def get(self, worker_id: str) -> WorkerState | None:
        return self.workers.get(worker_id)

    def live_workers(self) -> list[WorkerState]:
        return [w for w in self.workers.values() if w.live]

    def snapshot(self) -> list[WorkerState]:
        return list(self.workers.values())

    def take_out(self, worker_id: str, reason: str, *, dead: bool = False) -> None:
        """Out of rotation now (a failed call, an expired poll, a dead actor)."""
        w = self.workers.get(worker_id)
        if w is None:
            return
        w.dead = w.dead or dead
        w.last_error = reason
        if w.live:
            log.warning("worker out of rotation", extra={"worker": worker_id, "reason": reason})
        w.live = False
        w.feed_epoch = ""  # a later answer must resync from a full snapshot
        w.down.set()
        self.mirror.drop_worker(worker_id)

    # ---- polling ----------------------------------------------------------------------------------
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="worker-registry")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

    async def wait_ready(self, num_workers: int, timeout_s: float) -> None:
        """Until ``num_workers`` workers answered a poll (raises TimeoutError)."""
        deadline = time.monotonic() + timeout_s
        while len(self.live_workers()) < num_workers:
            if time.monotonic() > deadline:
                live = [w.worker_id for w in self.live_workers()]
                raise TimeoutError(f"only {len(live)} of {num_workers} workers answered: {live}")
            await asyncio.sleep(0.05)

    async def _run(self) -> None:
        while True:
            started = self.clock()
            await self.poll_all()
            self.mirror.expire(self.clock())
            await asyncio.sleep(max(0.0, self.poll_interval_s - (self.clock() - started)))

    async def poll_all(self) -> None:
        targets = [w for w in self.workers.values() if not w.dead]
        if targets:
            await asyncio.gather(*(self._poll(w) for w in targets))

    async def _poll(self, w: WorkerState) -> None:
        epoch, seq = w.feed_epoch, w.feed_seq
        w._routed_at_poll = w.num_routed_blocks
        try:
            poll: WorkerPoll = await asyncio.wait_for(w.client.poll(epoch, seq), self.poll_timeout_s)
        except WorkerCallError as exc:
            if exc.dead:
                self.take_out(w.worker_id, f"poll: {exc}", dead=True)
                return
            if exc.restarting:
                # Out now, and back with a full resync once it answers.
                self.take_out(w.worker_id, f"poll: {exc}")
                return
            self._poll_failed(w, str(exc))
            return
        except asyncio.TimeoutError:
            self._poll_failed(w, f"no answer within {self.poll_timeout_s:g}s")
            return
        except Exception as exc:  # noqa: BLE001 - one worker's odd answer must not end the poll loop
            self._poll_failed(w, f"{type(exc).__name__}: {exc}")
            return
        self._apply(w, poll, epoch)

    def _poll_failed(self, w: WorkerState, why: str) -> None:
        """Unreachable (e.g. its node is restarting) or slow: give it until unresponsive_after_s."""
        w.last_error = f"poll failed: {why}"
        if w.live and self.clock() - w.last_ok > self.unresponsive_after_s:
            self.take_out(w.worker_id, f"no answer for {self.unresponsive_after_s:.1f}s ({w.last_error})")

    def _apply(self, w: WorkerState, poll: WorkerPoll, asked_epoch: str) -> None:
        if w.dead:
            return
        if poll.snapshot is not None:
            self.mirror.replace_worker(w.worker_id, poll.snapshot)
        elif poll.feed_epoch == asked_epoch and w.feed_epoch == asked_epoch:
            self.mirror.apply_events(w.worker_id, poll.events)
        else:
            return  # taken out (and reset) while this poll was in flight: the next one resyncs
        w.feed_epoch, w.feed_seq = poll.feed_epoch, poll.feed_seq
        w.load = dataclasses.replace(poll.load, worker_id=w.worker_id)
        w.counters = poll.counters
        w.pins = frozenset(poll.pins)
        if poll.transfer_address:  # a restarted actor serves BlockTransfer on a new port
            w.transfer_address = poll.transfer_address
        w.last_ok = self.clock()
        if poll.engine_stalled_s > self.stall_after_s:
            self.take_out(w.worker_id, f"engine loop stalled for {poll.engine_stalled_s:.1f}s")
            return
        # What was routed before the poll was sent is in the worker's answer; what came later is not.
        w.num_routed_blocks = max(0, w.num_routed_blocks - w._routed_at_poll)
        if not w.live:
            log.info("worker in rotation", extra={"worker": w.worker_id})
            w.live = True
            w.last_error = ""
            w.down = asyncio.Event()

    def note_routed(self, worker_id: str, num_uncached_blocks: int) -> None:
        w = self.workers.get(worker_id)
        if w is not None:
            w.num_routed_blocks += num_uncached_blocks
