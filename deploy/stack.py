"""The whole serving stack in one process: Valkey, Ray, the cache service, the workers, the router.

    stack = Stack(StackConfig(num_workers=2, port=0, metrics_port=0))
    stack.start()            # returns once the router serves and every worker answered
    ... gRPC clients talk to stack.router_address ...
    stack.stop()             # router, workers (ray.kill), Ray (only if we started it), cache service, Valkey

This module is the assembly; each part is a module of its own:

    deploy/local_ray.py       join a Ray cluster, or start a local Ray (retried once after a timed-out start)
    deploy/embedded_cache.py  the cache service: embedded Valkey (unless --redis-url) + the CacheService thread
    deploy/placement.py       where workers go (pure rules)
    deploy/worker_actors.py   the worker actors: options, creation, waiting for their start, kill
    deploy/membership.py      the router's workers: its endpoints at start, joins and retirements later
    deploy/elastic.py         the Ray node watcher that drives those joins and retirements (when elastic)

Start order follows dependencies (Redis <- cache service <- workers <- router); stop is the reverse,
and every step of ``stop`` runs even if an earlier one failed, so nothing is left behind. A Ray
cluster we joined (``ray_address``, or one the caller already initialised, as the tests do) is left
running: we only kill our own actors, and never run ``ray stop``.

Placement (``deploy/placement.py``): with GPUs, one worker per GPU (``num_gpus=1``, Ray packs them onto
the GPU machines); on CPU, workers go round-robin over the alive Ray nodes (head first) with a hard node
affinity, so two workers on a two-machine cluster land one per machine. When elastic (default on a
cluster we join: ``--ray-address``), a ``RayNodeWatcher`` thread (``deploy/elastic.py``) then starts
workers on machines that join and forgets the workers of machines that die.

Credentials (DESIGN 6b): every part gets the cluster credential under its own identity (``cache-service``,
``worker-<i>``, ``router``): a shared secret made for this start unless ``cluster_secret_file`` or the TLS
files say otherwise (``common/cluster_flags.py``), so a stack with no flags needs no setup and still lets
no outsider reach its control and data planes. ``stack.credential`` is it (tests make operators with it).

Importing this module stays cheap (no Ray, router or torch): they are imported when the stack starts.
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Mapping, Sequence

from common.logs import get_logger
from deploy.embedded_cache import EmbeddedCacheService
from deploy.elastic import RayNodeWatcher
from deploy.local_ray import join_or_start_ray
from deploy.membership import StackMembership, router_endpoints
from deploy.placement import elastic_enabled, plan_workers
from deploy.worker_actors import WorkerActors

if TYPE_CHECKING:
    import ray

    from cache_service.records import WorkerInfo
    from common.cluster_auth import ClusterCredential
    from deploy.placement import WorkerPlacement
    from router.auth import TokenAuth
    from router.policies import CostWeights
    from router.server import RouterServer, RouterThread

__all__ = ["DEFAULT_POLICY_WEIGHTS", "Stack", "StackConfig", "default_policy_weights"]

log = get_logger("serve")  # every part of the stack logs as the `prefixcache serve` component


# The stack's departures from the CostWeights defaults (read-only: every config builds its own CostWeights).
# queue_weight 0.2 (the policy's own default is 1.0): with 1.0 a burst of requests sharing a prefix splits
# over workers as soon as the holder's queue is one prefill deeper than a peer's, duplicating the prefix;
# 0.2 keeps groups together (benchmarks/bench_serving.py: 100% of the ideal hit rate and ~3x round_robin's
# throughput vs ~60% and ~1.2x with 1.0).
DEFAULT_POLICY_WEIGHTS: Mapping[str, float] = MappingProxyType({"queue_weight": 0.2})


def default_policy_weights() -> CostWeights:
    """The stack's cost weights: ``CostWeights`` with ``DEFAULT_POLICY_WEIGHTS``."""
    from router.policies import CostWeights

    return CostWeights(**DEFAULT_POLICY_WEIGHTS)


# --engine vllm on CPU: vLLM's CPU attention takes block sizes in multiples of 32 only.
VLLM_CPU_BLOCK_SIZE = 32


@dataclass(slots=True)
class StackConfig:
    model: str = "demo"
    engine: str = "native"  # the workers' engine: "native" (workers/ray_worker.py) or "vllm" (workers/vllm_worker.py)
    dtype: str | None = None  # the workers' dtype (None: the checkpoint's), for either engine
    num_workers: int | None = None  # None: one per GPU, or 2 on CPU
    redis_url: str | None = None  # None: embedded Valkey
    ray_address: str | None = None  # None: a local Ray (unless one is already initialised)
    # Every listener of the stack binds to ``host``: the router and its metrics, the cache service, each
    # worker's BlockTransfer and raw stream, and a local Ray's own (loopback stays loopback; on a cluster use
    # 0.0.0.0). ``advertise_host`` is what others dial (None: ``host``, or this machine's IP for a wildcard).
    host: str = "127.0.0.1"
    advertise_host: str | None = None
    port: int = 50051
    metrics_port: int | None = 9400
    http_port: int | None = None  # the OpenAI-compatible HTTP front door (serve: 8000); None: off; 0: any free
    served_model_name: str | None = None  # None: "demo" or the model folder's name
    policy: str = "cache_aware"
    policy_weights: CostWeights = field(default_factory=default_policy_weights)
    block_size: int | None = 16  # None: 16, or VLLM_CPU_BLOCK_SIZE for vLLM workers without GPUs
    num_blocks: int | None = None
    kv_cache_dtype: str = "auto"  # workers' KV cache storage: "auto" (the model's dtype) | "fp8"
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    # Tiers under each worker's device pool (workers/lower_tiers.py); worker w keeps its files in disk_cache/w.
    host_cache_gb: float = 0.0
    disk_cache: str | None = None
    disk_cache_gb: float = 16.0
    cache_service_port: int = 50052
    auth_tokens_file: str | None = None
    auth: TokenAuth | None = None  # tests; None: from auth_tokens_file / the environment
    enable_cache_service: bool = True
    index_source: str = "mirror"
    worker_num_cpus: float = 1.0
    node_ids: list[str] | None = None  # explicit placement (worker i on Ray node node_ids[i % len]); tests
    max_in_flight: int = 256
    poll_interval_s: float = 0.1
    unresponsive_after_s: float = 3.0
    heartbeat_interval_s: float = 1.0
    always_transfer: bool = False  # workers pull from a peer whenever one holds more (tests, benchmarks)
    raw_transfer_stream: bool = True  # blocks move over the raw TCP stream (False: the gRPC stream only)
    elastic: bool | None = None  # workers for joining machines; None: on with ray_address, off for a local Ray
    elastic_interval_s: float = 2.0  # how often the Ray node watcher looks at the cluster
    worker_start_timeout_s: float = 300.0  # actor placement + model load, per batch of workers
    # Ray restarts a worker whose process died while its machine lives (engine crash, OOM kill), on the
    # same Ray node; -1: without limit. Calls in flight then are not retried by Ray (the router does).
    worker_max_restarts: int = -1
    # The cluster credential (common/cluster_flags.py): none of these -> a new shared secret per start.
    cluster_secret_file: str | None = None
    cluster_secret: bytes | None = None  # tests: this secret instead of a new one
    tls_cert: str | None = None  # "{id}" = each member's identity; without tls_ca: the router's endpoint only
    tls_key: str | None = None
    tls_ca: str | None = None  # mutual TLS between all members

    def dial_host(self) -> str:
        """What clients and workers dial to reach this machine's listeners: ``advertise_host``, else
        ``host``, else (a wildcard) this machine's IP as Ray sees it."""
        if self.advertise_host:
            return self.advertise_host
        from workers.ray_env import advertise_host

        return advertise_host(self.host)


class Stack:
    def __init__(self, config: StackConfig) -> None:
        self.config = config
        self.cache: EmbeddedCacheService | None = None  # when enable_cache_service
        self.actors: WorkerActors | None = None  # once the cache service's address is known
        self.router: RouterThread | None = None
        self.watcher: RayNodeWatcher | None = None  # when elastic
        self.credential: ClusterCredential | None = None  # the cluster's, once started
        self._owns_ray = False  # a local Ray we started: ours to shut down

    # ---- addresses and parts ------------------------------------------------------------------------
    @property
    def router_address(self) -> str:
        return f"{self.config.dial_host()}:{self.router_server.port}"

    @property
    def metrics_url(self) -> str | None:
        port = self.router_server.metrics_port
        return None if port is None else f"http://{self.config.dial_host()}:{port}/metrics"

    @property
    def router_server(self) -> RouterServer:
        server = self._router().server
        if server is None:
            raise RuntimeError("the router is not running")
        return server

    @property
    def redis_url(self) -> str | None:
        return self.cache.redis_url if self.cache is not None else self.config.redis_url

    @property
    def cache_service_address(self) -> str | None:
        return self.cache.address if self.cache is not None else None

    @property
    def workers(self) -> dict[str, ray.actor.ActorHandle]:
        """worker_id -> actor handle (changes while elastic: the watcher's thread adds and removes)."""
        return self.actors.handles if self.actors is not None else {}

    @property
    def worker_infos(self) -> dict[str, WorkerInfo]:
        return self.actors.infos if self.actors is not None else {}

    def _router(self) -> RouterThread:
        if self.router is None:
            raise RuntimeError("the stack is not running")
        return self.router

    # ---- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> Stack:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        import ray

        from common.cluster_auth import CACHE_SERVICE_IDENTITY, ROUTER_IDENTITY, Member
        from common.cluster_flags import CredentialFlags
        from router.auth import TokenAuth
        from router.server import RouterConfig, RouterThread

        cfg = self.config
        auth = cfg.auth if cfg.auth is not None else TokenAuth.load(cfg.auth_tokens_file)
        flags = CredentialFlags(cfg.cluster_secret_file, cfg.tls_cert, cfg.tls_key, cfg.tls_ca)
        flags.check(front_door=True)
        self.credential = credential = flags.credential(cfg.cluster_secret)
        tls_cert, tls_key = flags.front_door() or (None, None)  # the router's client-facing TLS
        # Ray first: a local Ray forks its GCS and raylet, running Python in the child before exec (Ray's
        # preexec_fn). Forked from a process whose gRPC server threads already run, that child can die or
        # hang, and Ray then waits for a GCS that never comes. So no thread of ours exists yet at this point.
        num_cpus = max(os.cpu_count() or 1, int((cfg.num_workers or 2) * cfg.worker_num_cpus) + 1)
        self._owns_ray = join_or_start_ray(cfg.ray_address, num_cpus, cfg.host)
        if cfg.enable_cache_service:
            self.cache = EmbeddedCacheService(cfg.redis_url, cfg.host, cfg.cache_service_port,
                                              advertise_host=cfg.dial_host(),
                                              member=Member(CACHE_SERVICE_IDENTITY, credential))
            self.cache.start()
            if cfg.ray_address and cfg.host in ("127.0.0.1", "localhost"):
                log.warning("the cache service listens on 127.0.0.1: workers on other machines cannot reach it "
                            "(use --host 0.0.0.0 on a multi-machine cluster)")
        nodes = ray.nodes()
        plan = plan_workers(nodes, cfg.num_workers, cfg.node_ids, cfg.worker_num_cpus)
        self._resolve_block_size(plan)
        self.actors = self._worker_actors()
        _, errors = self.actors.launch(plan, threading.Event())
        if errors:
            raise RuntimeError("; ".join(f"{w}: {e}" for w, e in sorted(errors.items())))
        self.router = RouterThread(RouterConfig(
            model=cfg.model, block_size=cfg.block_size, host=cfg.host, port=cfg.port,
            metrics_port=cfg.metrics_port, policy=cfg.policy, policy_weights=cfg.policy_weights,
            cache_service_address=self.cache_service_address, index_source=cfg.index_source, auth=auth,
            member=Member(ROUTER_IDENTITY, credential), tls_cert_file=tls_cert, tls_key_file=tls_key,
            max_in_flight=cfg.max_in_flight, poll_interval_s=cfg.poll_interval_s,
            unresponsive_after_s=cfg.unresponsive_after_s,
            http_port=cfg.http_port, served_model_name=cfg.served_model_name,
        ), router_endpoints(self.actors, self.actors.infos))
        self.router.start()
        log.info("stack ready", extra={"router": self.router_address, "metrics": self.metrics_url,
                                       "cache_service": self.cache_service_address,
                                       "workers": self.actors.worker_nodes()})
        if elastic_enabled(cfg.ray_address, cfg.elastic):
            self.watcher = RayNodeWatcher(
                StackMembership(self.actors, self.router),
                known_node_ids={n["NodeID"] for n in nodes} | set(self.actors.worker_nodes().values()),
                next_index=len(plan), cpu_fleet=not any(p.num_gpus for p in plan),
                cpus_per_worker=cfg.worker_num_cpus, interval_s=cfg.elastic_interval_s)
            self.watcher.start()

    def _resolve_block_size(self, plan: Sequence[WorkerPlacement]) -> int:
        """``block_size`` None becomes 16, or VLLM_CPU_BLOCK_SIZE for vLLM workers without GPUs; once, since the
        router and every worker must hash with the same size."""
        cfg = self.config
        if cfg.block_size is None:
            cpu_vllm = cfg.engine == "vllm" and not any(p.num_gpus for p in plan)
            cfg.block_size = VLLM_CPU_BLOCK_SIZE if cpu_vllm else 16
        return cfg.block_size

    def _worker_actors(self) -> WorkerActors:
        from workers.model.checkpoint import checkpoint_model_id
        from workers.ray_worker import WorkerConfig

        cfg = self.config
        self._resolve_block_size(())  # started stacks resolved it from their plan already
        template = WorkerConfig(  # worker_id and torch_threads: filled in per placement
            worker_id="", model=cfg.model, dtype=cfg.dtype, block_size=cfg.block_size, num_blocks=cfg.num_blocks,
            kv_cache_dtype=cfg.kv_cache_dtype,
            max_num_seqs=cfg.max_num_seqs, max_num_batched_tokens=cfg.max_num_batched_tokens,
            cache_service_address=self.cache_service_address, heartbeat_interval_s=cfg.heartbeat_interval_s,
            always_transfer=cfg.always_transfer, raw_transfer_stream=cfg.raw_transfer_stream,
            transfer_host=cfg.host,  # each worker binds here (workers/ray_env.py: bind_host, advertise_host)
            host_cache_gb=cfg.host_cache_gb, disk_cache=cfg.disk_cache, disk_cache_gb=cfg.disk_cache_gb,
            cluster_credential=self.credential,
        )
        # Every worker must hash as the router will: its model id and block size (a mixed fleet is refused).
        fleet = (checkpoint_model_id(cfg.model), cfg.block_size)
        return WorkerActors(template, cpus_per_worker=cfg.worker_num_cpus, max_restarts=cfg.worker_max_restarts,
                            start_timeout_s=cfg.worker_start_timeout_s, engine=cfg.engine, fleet=fleet)

    def stop(self) -> None:
        """Tear everything down; safe to call twice and after a failed start."""
        if self.watcher is not None:  # first: it must not start workers on a stack going down
            with contextlib.suppress(Exception):
                self.watcher.stop()
            self.watcher = None
        if self.router is not None:
            with contextlib.suppress(Exception):
                self.router.stop()
            self.router = None
        if self.actors is not None:
            with contextlib.suppress(Exception):
                self.actors.stop_all()
        if self._owns_ray:
            import ray

            with contextlib.suppress(Exception):
                ray.shutdown()
            self._owns_ray = False
        if self.cache is not None:
            self.cache.stop()

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
