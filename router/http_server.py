"""uvicorn on the router's own asyncio loop: the HTTP front door shares the dispatcher, registry and metrics
with the gRPC server without a thread or a lock between them.

    server = HttpServer(app, host, port)
    port = server.bind()        # at once, like the gRPC port: a port in use fails the start, named
    await server.start()        # serving (a task of the router's loop)
    await server.stop(grace_s)  # no new connections; requests in flight get grace_s, then are cancelled

The socket is bound here rather than by uvicorn, because uvicorn reports a bind failure by exiting the
process (``sys.exit``), and so that port 0 gives the bound port back. uvicorn's signal handling is off: the
process that hosts the router (``prefixcache serve``) owns SIGINT/SIGTERM and stops the router itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from typing import Any

import uvicorn

from common.logs import get_logger

log = get_logger("router.http")


class _Server(uvicorn.Server):
    def capture_signals(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()  # the hosting process's handlers stay in place


class HttpServer:
    def __init__(self, app: Any, host: str, port: int, *, limit_concurrency: int | None = None,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.host = host
        self.port = port
        self.config = uvicorn.Config(
            app, host=host, port=port, http="h11", ws="none", lifespan="off",
            log_config=None, access_log=False,  # the process's logging stays as configured (common.logs)
            server_header=False, proxy_headers=False,
            # A backstop above the dispatcher's in-flight cap (that one answers 429 in OpenAI's shape):
            # connections beyond this get uvicorn's plain 503, so that no client can hold unbounded sockets.
            limit_concurrency=limit_concurrency,
            # HTTPS with the router's certificate when it has one (router/server.py): the same TLS as gRPC.
            ssl_context_factory=(lambda _config, _default: ssl_context) if ssl_context is not None else None,
        )
        self.server = _Server(self.config)
        self._sock: socket.socket | None = None
        self._task: asyncio.Task | None = None

    def bind(self) -> int:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        # IPPROTO_TCP named: asyncio turns Nagle off (TCP_NODELAY) only on sockets whose proto says TCP, and
        # with Nagle on, a response written as head + body waits out the client's delayed ACK (40 ms).
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart need not wait out TIME_WAIT
        try:
            sock.bind((self.host, self.port))
        except OSError as exc:
            sock.close()
            raise OSError(exc.errno, f"cannot bind the HTTP front door to {self.host}:{self.port} "
                                     f"({exc.strerror}; --http-port 0 turns it off)") from None
        sock.set_inheritable(False)
        self._sock = sock
        self.port = sock.getsockname()[1]
        return self.port

    async def start(self) -> None:
        if self._sock is None:
            self.bind()
        self._task = asyncio.get_running_loop().create_task(self.server.serve(sockets=[self._sock]),
                                                            name="router-http")
        while not self.server.started:  # uvicorn's startup: a few loop turns, no I/O
            if self._task.done():
                self._task.result()  # raises what failed it
                raise RuntimeError("the HTTP front door stopped during its start")
            await asyncio.sleep(0.01)
        log.info("http listening", extra={"address": f"{self.host}:{self.port}"})

    async def stop(self, grace_s: float = 2.0) -> None:
        task, self._task = self._task, None
        if task is not None:
            self.config.timeout_graceful_shutdown = grace_s  # then uvicorn cancels what still runs
            self.server.should_exit = True
            try:
                await asyncio.wait_for(task, grace_s + 5)
            except asyncio.TimeoutError:
                log.warning("http front door did not stop in time")
            except Exception as exc:  # noqa: BLE001 - stopping must go on (the router stops the rest)
                log.warning("http front door stopped with an error", extra={"error": repr(exc)})
        if self._sock is not None:
            self._sock.close()
            self._sock = None
