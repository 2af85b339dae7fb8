"""The router process: assembles encoder, registry, mirror, policy, dispatcher, pins and metrics behind
the gRPC ``Generation`` service (grpc.aio, with health checking and reflection) and, with ``http_port``,
the OpenAI-compatible HTTP front door (router/http_app.py) on the same loop, over the same dispatcher.

``RouterServer`` runs on the caller's asyncio loop; ``RouterThread`` runs one on a private loop in a
daemon thread (the ``serve`` launcher and the tests). Health is NOT_SERVING until the workers
answered their first poll, and again while no worker is live.

Its two credentials (DESIGN 6b): ``member``, the router's cluster identity, for its calls to the cache
service; ``tls_cert_file``/``tls_key_file`` (PEM) for the client-facing endpoints, gRPC and HTTP, which
then serve TLS without asking clients for a certificate (clients authenticate with bearer tokens, which TLS
keeps off the wire in clear text). Without them both are plaintext, and with bearer tokens the router warns
at start.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from common.cluster_auth import Member, read_pem, server_ssl_context, server_tls_credentials
from common.grpc_edge import EdgeInterceptor
from common.logs import RequestIdInterceptor, get_logger
from protos.prefixcache.v1 import generation_pb2, generation_pb2_grpc
from router.auth import TokenAuth
from router.cache_link import CacheLink
from router.dispatch import Dispatcher
from router.front_door import FrontDoor
from router.index_mirror import IndexMirror
from router.metrics import RouterMetrics
from router.pins import PinManager
from router.policies import CostWeights, make_policy
from router.registry import WorkerRegistry
from router.routing import RoutingCore
from router.servicer import GenerationServicer
from router.tokenize import PromptEncoder
from router.worker_client import WorkerClient

log = get_logger("router")
SERVICE_NAME = generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name


@dataclass(slots=True)
class WorkerEndpoint:
    client: WorkerClient  # router/worker_client.py: a RayWorkerClient in a stack, in-process in unit tests
    node_id: str = ""
    transfer_address: str = ""

    @property
    def worker_id(self) -> str:
        return self.client.worker_id


@dataclass(slots=True)
class RouterConfig:
    model: str = "demo"
    block_size: int = 16
    host: str = "127.0.0.1"
    port: int = 50051  # 0: any free port
    metrics_port: int | None = 9400  # None: no HTTP endpoint; 0: any free port
    policy: str = "cache_aware"
    policy_weights: CostWeights | None = None  # the policy's cost weights; None: CostWeights() defaults
    seed: int = 0
    cache_service_address: str | None = None
    index_source: str = "mirror"  # or "service": look every prompt up in the CacheService
    transfer_hints: bool = True  # False: never point a worker at a peer (no transfers)
    auth: TokenAuth | None = None
    member: Member | None = None  # the router's cluster identity (cache service calls); None: an open service
    tls_cert_file: str | None = None  # PEM certificate chain of the client-facing endpoints; None: plaintext
    tls_key_file: str | None = None
    max_in_flight: int = 256
    max_attempts: int = 3
    poll_interval_s: float = 0.1
    unresponsive_after_s: float = 3.0
    stall_after_s: float = 30.0
    ready_timeout_s: float = 120.0
    http_port: int | None = None  # the OpenAI-compatible HTTP front door; None: off; 0: any free port
    served_model_name: str | None = None  # the model id HTTP clients name; None: "demo" or the folder's name


class RouterServer:
    def __init__(self, config: RouterConfig, workers: list[WorkerEndpoint]) -> None:
        self.config = config
        self.encoder = PromptEncoder(config.model, config.block_size)
        self.metrics = RouterMetrics()
        self.mirror = IndexMirror()
        self.registry = WorkerRegistry(self.mirror, poll_interval_s=config.poll_interval_s,
                                       unresponsive_after_s=config.unresponsive_after_s,
                                       stall_after_s=config.stall_after_s)
        for w in workers:
            self.registry.add(w.client, w.node_id, w.transfer_address)
        self.metrics.attach_registry(self.registry)
        self.link = (CacheLink(config.cache_service_address, self.encoder.model_id, config.member)
                     if config.cache_service_address else None)
        self.policy = make_policy(config.policy, seed=config.seed, weights=config.policy_weights)
        self.routing = RoutingCore(self.encoder, self.registry, self.mirror, self.policy, self.metrics,
                                   service_lookup=self.link.lookup_tiers if self.link else None,
                                   index_source=config.index_source, transfer_hints=config.transfer_hints)
        self.dispatcher = Dispatcher(self.routing, self.registry, self.metrics,
                                     max_in_flight=config.max_in_flight, max_attempts=config.max_attempts)
        self.pins = PinManager(self.encoder, self.registry, self.link)
        self.health = health_aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self._health_task: asyncio.Task | None = None
        self.http: Any = None  # router.http_server.HttpServer, imported only when HTTP is on
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.http_port: int | None = None

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    async def start(self, wait_for_workers: bool = True) -> int:
        cfg = self.config
        # gRPC's own cap answers RESOURCE_EXHAUSTED beyond it; ours (max_in_flight) gives the clearer
        # message, so gRPC's sits above it (Pin calls and health checks need room too).
        server = grpc.aio.server(maximum_concurrent_rpcs=cfg.max_in_flight + 64,
                                 interceptors=[RequestIdInterceptor(), EdgeInterceptor(log)],
                                 # Explicit bounds: a prompt of 1M token ids is ~5 MB; metadata holds a token.
                                 options=[("grpc.max_receive_message_length", 16 << 20),
                                          ("grpc.max_send_message_length", 16 << 20),
                                          ("grpc.max_metadata_size", 8 << 10)])
        generation_pb2_grpc.add_GenerationServicer_to_server(
            GenerationServicer(self.encoder, self.dispatcher, self.pins, cfg.auth), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            server)
        address = f"{cfg.host}:{cfg.port}"
        if (cfg.tls_cert_file is None) != (cfg.tls_key_file is None):
            raise ValueError("the router's TLS needs both a certificate and its key")
        if cfg.tls_cert_file is not None and cfg.tls_key_file is not None:
            port = server.add_secure_port(address, server_tls_credentials(
                read_pem(cfg.tls_cert_file, "certificate"), read_pem(cfg.tls_key_file, "private key")))
        else:
            port = server.add_insecure_port(address)
            if cfg.auth is not None:
                log.warning("bearer tokens cross the network in clear text: the router's endpoint has no TLS "
                            "(give --tls-cert and --tls-key)", extra={"address": address})
        if port == 0:
            raise OSError(f"cannot bind the router to {cfg.host}:{cfg.port}")
        if cfg.http_port is not None:  # bound now too: a port in use fails the start before any wait
            self.http = self._http_front_door()
            self.http_port = self.http.bind()
        await self._set_health(False)
        self.registry.start()
        if wait_for_workers and self.registry.workers:
            await self.registry.wait_ready(len(self.registry.workers), cfg.ready_timeout_s)
        await server.start()
        self._server, self.port = server, port
        if self.http is not None:
            await self.http.start()
        if cfg.metrics_port is not None:
            self.metrics_port = self.metrics.serve_http(cfg.metrics_port, cfg.host)
        self._health_task = asyncio.get_running_loop().create_task(self._health_loop(), name="router-health")
        log.info("router listening", extra={"address": self.address, "metrics_port": self.metrics_port,
                                            "http_port": self.http_port, "policy": cfg.policy,
                                            "model_id": self.encoder.model_id, "tls": cfg.tls_cert_file is not None})
        return port

    def _http_front_door(self) -> Any:
        from router.chat_template import load_chat_template
        from router.http_app import OpenAIApp, default_served_model_name
        from router.http_server import HttpServer

        cfg = self.config
        app = OpenAIApp(FrontDoor(self.encoder, self.dispatcher, cfg.auth), load_chat_template(cfg.model),
                        cfg.served_model_name or default_served_model_name(cfg.model),
                        is_live=lambda: bool(self.registry.live_workers()), metrics_registry=self.metrics.registry)
        # Connections beyond the in-flight cap, with room for idle keep-alive clients, get uvicorn's 503.
        # The same TLS as the gRPC endpoint: bearer tokens cross neither door in clear text when TLS is configured.
        tls = (server_ssl_context(cfg.tls_cert_file, cfg.tls_key_file)
               if cfg.tls_cert_file is not None and cfg.tls_key_file is not None else None)
        return HttpServer(app.build(), cfg.host, cfg.http_port, limit_concurrency=4 * cfg.max_in_flight + 64,
                          ssl_context=tls)

    async def _set_health(self, ok: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def _health_loop(self) -> None:
        healthy: bool | None = None
        while True:
            ok = bool(self.registry.live_workers())
            if ok != healthy:
                healthy = ok
                await self._set_health(ok)
            await asyncio.sleep(0.5)

    async def stop(self, grace_s: float = 2.0) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
            self._health_task = None
        stops = []  # both doors stop taking requests together; those in flight get grace_s
        if self._server is not None:
            await self.health.enter_graceful_shutdown()
            stops.append(self._server.stop(grace_s))
        if self.http is not None:
            stops.append(self.http.stop(grace_s))
        await asyncio.gather(*stops)
        self._server = self.http = None
        await self.registry.stop()
        if self.link is not None:
            await self.link.close()
        self.metrics.stop_http()


class RouterThread:
    """A RouterServer on its own event loop in a daemon thread."""

    def __init__(self, config: RouterConfig, workers: list[WorkerEndpoint]) -> None:
        self.config = config
        self.workers = workers
        self.server: RouterServer | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None

    @property
    def address(self) -> str:
        assert self.server is not None
        return self.server.address

    def start(self, timeout_s: float = 180.0) -> str:
        self._thread = threading.Thread(target=self._run, name="router", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout_s):
            raise TimeoutError("the router did not start in time")
        if self._error is not None:
            raise RuntimeError(f"the router failed to start: {self._error}") from self._error
        return self.address

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self.loop = loop
        asyncio.set_event_loop(loop)
        try:
            self.server = RouterServer(self.config, self.workers)
            loop.run_until_complete(self.server.start())
        except BaseException as exc:  # noqa: BLE001 - reported by start()
            self._error = exc
            self._started.set()
            with contextlib.suppress(Exception):
                if self.server is not None:
                    loop.run_until_complete(self.server.stop(0))
            loop.close()
            return
        self._started.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def call(self, coro: Any, timeout_s: float = 60.0) -> Any:
        """Run a coroutine on the router's loop from another thread (tests, the launcher)."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def stop(self, grace_s: float = 2.0) -> None:
        loop, thread = self.loop, self._thread
        if loop is None or thread is None or self.server is None or not loop.is_running():
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self.server.stop(grace_s), loop).result(grace_s + 10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        self._thread = None


def wait_until(predicate, timeout_s: float, interval_s: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return predicate()
