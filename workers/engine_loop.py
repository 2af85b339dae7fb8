"""The engine loop: the one thread that touches the Engine, and what it publishes after every step.

    commands (submit(fn) -> Future)  --> run all pending --> refresh load --> engine.step()
                                                                  |
        events -> on_events (feed, cache node); load snapshot; outputs -> per-request sinks

The engine is single-threaded by design, so the actor's asyncio code never calls it directly: it
submits ``fn(engine)`` and awaits the future (``call``). Events and the load snapshot are published
*before* a step's outputs are delivered, so once a client sees its request finish, the next poll
already shows its blocks. ``last_beat`` (the start of the latest iteration; at least every 0.5 s when
idle) lets a router tell a hung engine from a busy one.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
import time
import traceback
from typing import Any, Callable

from common.logs import get_logger
from cache_service.records import BlockEvent, EngineFailure, FailureKind, WorkerLoad
from workers.sequence import RequestOutput

log = get_logger("worker")


class EngineLoop:
    """Owns the engine: runs submitted commands between ``step()`` calls, in one thread."""

    def __init__(self, engine: Any, on_events: Callable[[list[BlockEvent]], None]) -> None:
        self.engine = engine
        self._on_events = on_events
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._sinks: dict[str, Callable[[Any], None]] = {}
        self._stop = threading.Event()
        self.load = WorkerLoad()  # refreshed before and after every step
        self.pins: dict[str, int] = {}  # the engine pin table (pin id -> blocks), after every command
        self.last_beat = time.monotonic()  # start of the loop's latest iteration (liveness)
        self.fatal_error: str | None = None
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self._commands.put(None)
        self._thread.join(timeout_s)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, fn: Callable[[Any], Any]) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        if self._stop.is_set():
            fut.set_exception(RuntimeError("the engine loop is stopped"))
        else:
            self._commands.put((fn, fut))
        return fut

    async def call(self, fn: Callable[[Any], Any]) -> Any:
        return await asyncio.wrap_future(self.submit(fn))

    # Called in the loop thread only (from submitted functions).
    def add_sink(self, request_id: str, sink: Callable[[RequestOutput | EngineFailure], None]) -> None:
        self._sinks[request_id] = sink

    def drop_sink(self, request_id: str) -> None:
        self._sinks.pop(request_id, None)

    def _run_command(self, item: Any) -> None:
        if item is None:
            return
        fn, fut = item
        if not fut.set_running_or_notify_cancel():
            return
        try:
            result = fn(self.engine)
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting caller
            self.pins = self.engine.pinned()
            fut.set_exception(exc)
        else:
            # Pins change only through commands: publish them before the caller resumes, so that a poll
            # answered after ``await pin(...)`` already lists the pin.
            self.pins = self.engine.pinned()
            fut.set_result(result)

    def _run(self) -> None:
        engine = self.engine
        while not self._stop.is_set():
            self.last_beat = time.monotonic()
            # Commands first (new requests, aborts, imports), then one step.
            try:
                block = not engine.has_unfinished_requests()
                item = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
                self._run_command(item)
                while True:
                    self._run_command(self._commands.get_nowait())
            except queue.Empty:
                pass
            self._refresh_load()  # new requests show in the load before the (possibly long) step
            if self._stop.is_set():
                break
            outputs = []
            if engine.has_unfinished_requests():
                try:
                    outputs = engine.step()
                except Exception:  # noqa: BLE001 - fail every request, keep serving new ones
                    self._fail_all(traceback.format_exc())
            # Events and load first: once a client sees its request finish, a poll sees its blocks.
            self._after_step()
            for out in outputs:
                sink = self._sinks.get(out.request_id)
                if sink is not None:
                    if out.finished:
                        del self._sinks[out.request_id]
                    sink(out)
        self._fail_all("the worker is shutting down", log_error=False)

    def _after_step(self) -> None:
        events = self.engine.drain_events()
        if events:
            self._on_events(events)
        self._refresh_load()

    def _refresh_load(self) -> None:
        engine = self.engine
        self.load = engine.load()

    def _fail_all(self, reason: str, log_error: bool = True) -> None:
        self.fatal_error = reason.strip().splitlines()[-1] if reason.strip() else "engine failure"
        if log_error:
            log.error("engine step failed; failing its requests", extra={"error": reason})
        for request_id in list(self._sinks):
            sink = self._sinks.pop(request_id)
            try:
                self.engine.abort_request(request_id)
            except Exception:  # noqa: BLE001
                pass
            sink(EngineFailure(FailureKind.ENGINE, self.fatal_error))

