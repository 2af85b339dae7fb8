"""A client that goes away stops its request: server-sent events, and the disconnect watch for every request.

The dispatcher aborts a request on its worker when its delta stream is closed or cancelled. Two ways a
request could outlive its client, both closed here:

- a unary call waits (prefill, then every token) with nothing to send: nobody would notice the client
  leave until the end. ``DisconnectGuard`` watches the connection (ASGI ``http.disconnect``) and cancels the
  request's task when it goes, which cancels the dispatcher's await and so aborts on the worker;
- a stream notices when a send fails, but a generator left suspended at its ``yield`` is only closed when
  it is garbage collected. ``EventStream`` closes its generator itself (``aclose``) whatever happens, and
  uses the same guard, so a client that leaves during a long prefill is noticed at once.

Starlette's StreamingResponse does neither (it never closes the iterator), hence this small response class.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
               (b"x-accel-buffering", b"no")]  # proxies (nginx) must not buffer a stream


class DisconnectGuard:
    """``async with DisconnectGuard(receive): ...`` runs the body, cancelled if the client disconnects;
    afterwards ``fired`` says whether it was (the CancelledError is then swallowed: the client is gone)."""

    __slots__ = ("_receive", "_task", "_watch", "fired")

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self._task: asyncio.Task | None = None
        self._watch: asyncio.Task | None = None
        self.fired = False

    async def __aenter__(self) -> DisconnectGuard:
        self._task = asyncio.current_task()
        self._watch = asyncio.get_running_loop().create_task(self._wait())
        return self

    async def _wait(self) -> None:
        # The body is read already: the next message is http.disconnect (the client left, or, once the
        # response is complete, the server's own end of the exchange; the guard is gone by then).
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                self.fired = True
                assert self._task is not None
                self._task.cancel()
                return

    async def __aexit__(self, exc_type, exc, tb) -> bool:
        watch, self._watch = self._watch, None
        if watch is not None and not watch.done():
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch
        if self.fired and exc_type is asyncio.CancelledError:
            assert self._task is not None
            self._task.uncancel()  # our cancel, not the server's: this task carries on (and ends quietly)
            return True
        return False


class EventStream(Response):
    """``text/event-stream`` from an async iterator of ready SSE events (bytes); closes it in every case."""

    def __init__(self, events: AsyncIterator[bytes], headers: dict[str, str] | None = None) -> None:
        self.events = events
        self.status_code = 200
        self.background = None
        self.raw_headers = SSE_HEADERS + [(k.lower().encode("latin-1"), v.encode("latin-1"))
                                          for k, v in (headers or {}).items()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with DisconnectGuard(receive):
                await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
                async for event in self.events:
                    await send({"type": "http.response.body", "body": event, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            pass  # the connection broke under send (ASGI 2.4 servers raise instead of reporting a disconnect)
        finally:
            aclose = getattr(self.events, "aclose", None)
            if aclose is not None:
                await aclose()  # -> GeneratorExit at its yield -> it closes the dispatcher's stream -> abort
