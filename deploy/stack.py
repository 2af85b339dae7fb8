"""The whole serving stack in one process: Valkey, Ray, the cache service, the workers, the router.

    stack = Stack(StackConfig(num_workers=2, port=0, metrics_port=0))
    stack.start()            # returns once the router serves and every worker answered
    ... gRPC clients talk to stack.router_address ...
    stack.stop()             # router, workers (ray.kill), Ray (only if we started it), cache service, Valkey

Start order follows dependencies (Redis <- cache service <- workers <- router); stop is the reverse,
and every step of ``stop`` runs even if an earlier one failed, so nothing is left behind. A Ray
cluster we joined (``ray_address``, or one the caller already initialised, as the tests do) is left
running: we only kill our own actors, and never run ``ray stop``.

Placement (``deploy/placement.py``): with GPUs, one worker per GPU (``num_gpus=1``, Ray packs them onto
the GPU nodes); on CPU, workers go round-robin over the alive nodes (head first) with a hard node
affinity, so two workers on a two-node cluster land one per node. When elastic (default on a cluster we
join: ``--ray-address``), a ``NodeWatcher`` thread (``deploy/elastic.py``) then starts workers on nodes
that join and forgets the workers of nodes that die.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from common.logs import get_logger
from deploy.placement import WorkerPlacement, elastic_enabled, plan_workers

__all__ = ["DEFAULT_POLICY_WEIGHTS", "Stack", "StackConfig", "WorkerPlacement", "plan_workers"]

log = get_logger("stack")


DEFAULT_POLICY_WEIGHTS = {"queue_weight": 0.2}


@dataclass(slots=True)
class StackConfig:
    model: str = "demo"
    num_workers: int | None = None  # None: one per GPU, or 2 on CPU
    redis_url: str | None = None  # None: embedded Valkey
    ray_address: str | None = None  # None: a local Ray (unless one is already initialised)
    host: str = "127.0.0.1"
    port: int = 50051
    metrics_port: int | None = 9400
    http_port: int | None = None  # the OpenAI-compatible HTTP front door (serve: 8000); None: off; 0: any free
    served_model_name: str | None = None  # None: "demo" or the model folder's name
    policy: str = "cache_aware"
    # CostWeights fields. queue_weight 0.2 (the policy's own default is 1.0): with 1.0 a burst of requests
    # sharing a prefix splits over workers as soon as the holder's queue is one prefill deeper than a
    # peer's, duplicating the prefix; 0.2 keeps groups together (benchmarks/bench_serving.py: 100% of
    # the ideal hit rate and ~3x round_robin's throughput vs ~60% and ~1.2x with 1.0).
    policy_weights: dict = field(default_factory=lambda: dict(DEFAULT_POLICY_WEIGHTS))
    block_size: int = 16
    num_blocks: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    cache_service_port: int = 50052
    auth_tokens_file: str | None = None
    auth: Any = None  # a router.auth.TokenAuth (tests); else from auth_tokens_file / the environment
    enable_cache_service: bool = True
    index_source: str = "mirror"
    worker_num_cpus: float = 1.0
    node_ids: list[str] | None = None  # explicit placement (worker i on node_ids[i % len]); tests
    max_in_flight: int = 256
    poll_interval_s: float = 0.1
    unresponsive_after_s: float = 3.0
    heartbeat_interval_s: float = 1.0
    always_transfer: bool = False  # workers pull from a peer whenever one holds more (tests, benchmarks)
    raw_transfer_stream: bool = True  # blocks move over the raw TCP stream (False: the gRPC stream only)
    elastic: bool | None = None  # workers for joining nodes; None: on with ray_address, off for a local Ray
    elastic_interval_s: float = 2.0  # how often the node watcher looks at the cluster
    worker_start_timeout_s: float = 300.0  # actor placement + model load, per batch of workers
    # Ray restarts a worker whose process died while its node lives (engine crash, OOM kill), on the
    # same node; -1: without limit. Calls in flight then are not retried by Ray (the router does).
    worker_max_restarts: int = -1


class Stack:
    def __init__(self, config: StackConfig) -> None:
        self.config = config
        self.redis: Any = None
        self.redis_url: str | None = config.redis_url
        self.cache_service: Any = None
        self.cache_service_address: str | None = None
        self.workers: dict[str, Any] = {}  # worker_id -> actor handle
        self.worker_infos: dict[str, Any] = {}
        self.router: Any = None
        self.watcher: Any = None  # deploy.elastic.NodeWatcher when elastic
        self._owns_ray = False
        # Guards workers / worker_infos: the node watcher thread changes them while the stack serves.
        self._lock = threading.Lock()

    # ---- addresses ----------------------------------------------------------------------------------
    @property
    def router_address(self) -> str:
        return self.router.address

    @property
    def metrics_url(self) -> str | None:
        port = self.router.server.metrics_port
        return None if port is None else f"http://{self.config.host}:{port}/metrics"

    @property
    def router_server(self) -> Any:
        return self.router.server

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

        from router.auth import TokenAuth
        from router.ray_client import RayWorkerClient
        from router.server import RouterConfig, RouterThread, WorkerEndpoint

        cfg = self.config
        auth = cfg.auth if cfg.auth is not None else TokenAuth.load(cfg.auth_tokens_file)
        # Ray first: a local Ray forks its GCS and raylet, running Python in the child before exec (Ray's
        # preexec_fn). Forked from a process whose gRPC server threads already run, that child can die or
        # hang, and Ray then waits for a GCS that never comes. So no thread of ours exists yet at this point.
        if not ray.is_initialized():
            if cfg.ray_address:
                ray.init(address=cfg.ray_address, log_to_driver=False)
            else:
                num_cpus = max(os.cpu_count() or 1, int((cfg.num_workers or 2) * cfg.worker_num_cpus) + 1)
                # "local": a new Ray of our own, never whatever cluster /tmp/ray/ray_current_cluster names.
                self._owns_ray = True
                _init_local_ray(num_cpus)
        if cfg.enable_cache_service:
            self._start_cache_service()
        if cfg.ray_address and cfg.host in ("127.0.0.1", "localhost") and cfg.enable_cache_service:
            log.warning("the cache service listens on 127.0.0.1: workers on other machines cannot reach it "
                        "(use --host 0.0.0.0 on a multi-machine cluster)")
        nodes = ray.nodes()
        plan = self._start_workers(nodes)
        endpoints = [
            WorkerEndpoint(RayWorkerClient(wid, handle), self.worker_infos[wid].node_id,
                           self.worker_infos[wid].transfer_address)
            for wid, handle in self.workers.items()
        ]
        self.router = RouterThread(RouterConfig(
            model=cfg.model, block_size=cfg.block_size, host=cfg.host, port=cfg.port,
            metrics_port=cfg.metrics_port, policy=cfg.policy, policy_weights=dict(cfg.policy_weights),
            cache_service_address=self.cache_service_address, index_source=cfg.index_source, auth=auth,
            max_in_flight=cfg.max_in_flight, poll_interval_s=cfg.poll_interval_s,
            unresponsive_after_s=cfg.unresponsive_after_s,
            http_port=cfg.http_port, served_model_name=cfg.served_model_name,
        ), endpoints)
        self.router.start()
        log.info("stack ready", extra={"router": self.router_address, "metrics": self.metrics_url,
                                       "cache_service": self.cache_service_address,
                                       "workers": {w: i.node_id for w, i in self.worker_infos.items()}})
        if elastic_enabled(cfg.ray_address, cfg.elastic):
            from deploy.elastic import NodeWatcher

            self.watcher = NodeWatcher(
                self, known_node_ids={n["NodeID"] for n in nodes} | {i.node_id for i in self.worker_infos.values()},
                next_index=len(plan), cpu_fleet=not any(p.num_gpus for p in plan),
                interval_s=cfg.elastic_interval_s)
            self.watcher.start()

    def _start_cache_service(self) -> None:
        from cache_service.embedded_redis import EmbeddedRedis
        from cache_service.server import CacheServiceConfig, CacheServiceThread

        cfg = self.config
        if self.redis_url is None:
            self.redis = EmbeddedRedis()
            self.redis_url = self.redis.start()
        self.cache_service = CacheServiceThread(CacheServiceConfig(
            redis_url=self.redis_url, host=cfg.host, port=cfg.cache_service_port))
        self.cache_service.start()
        self.cache_service_address = _reachable(self.cache_service.address)

    def _start_workers(self, nodes: list[dict]) -> list[WorkerPlacement]:
        cfg = self.config
        plan = plan_workers(nodes, cfg.num_workers, cfg.node_ids, cfg.worker_num_cpus)
        infos, errors = self.launch_workers(plan, threading.Event())
        if errors:
            raise RuntimeError("; ".join(f"{w}: {e}" for w, e in sorted(errors.items())))
        return plan

    def launch_workers(self, plan: list[WorkerPlacement],
                       cancel: threading.Event) -> tuple[dict[str, Any], dict[str, str]]:
        """Create the planned actors and wait (in this thread: never an event loop) until each started,
        i.e. registered with the cache service. Returns ({worker_id: WorkerInfo} of those that did,
        {worker_id: why} of those that did not: they are killed and forgotten). ``cancel`` (the stack
        stopping) abandons the wait."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from workers.ray_worker import WorkerActor, WorkerConfig

        cfg = self.config
        actor_cls = ray.remote(WorkerActor)
        pending: dict[Any, tuple[str, Any]] = {}  # start ref -> (worker_id, handle)
        for p in plan:
            options: dict[str, Any] = {"num_cpus": 0 if p.num_gpus else cfg.worker_num_cpus, "num_gpus": p.num_gpus,
                                       "max_restarts": cfg.worker_max_restarts, "max_task_retries": 0,
                                       "max_concurrency": 1000}
            if p.node_id is not None:
                options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(p.node_id, soft=False)
            wc = WorkerConfig(
                worker_id=p.worker_id, model=cfg.model, block_size=cfg.block_size, num_blocks=cfg.num_blocks,
                max_num_seqs=cfg.max_num_seqs, max_num_batched_tokens=cfg.max_num_batched_tokens,
                cache_service_address=self.cache_service_address, heartbeat_interval_s=cfg.heartbeat_interval_s,
                always_transfer=cfg.always_transfer, raw_transfer_stream=cfg.raw_transfer_stream,
                torch_threads=None if p.num_gpus else max(1, int(cfg.worker_num_cpus)),
            )
            handle = actor_cls.options(**options).remote(wc)
            with self._lock:  # recorded at once, so that stop() kills it even while it is starting
                self.workers[p.worker_id] = handle
            pending[handle.start.remote()] = (p.worker_id, handle)
        infos: dict[str, Any] = {}
        errors: dict[str, str] = {}
        deadline = time.monotonic() + cfg.worker_start_timeout_s
        while pending and not cancel.is_set() and time.monotonic() < deadline:
            ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=1.0)
            for ref in ready:
                worker_id, _handle = pending.pop(ref)
                try:
                    infos[worker_id] = ray.get(ref)  # ready: does not block
                except Exception as exc:  # noqa: BLE001 - the node died, placement failed, model load failed
                    errors[worker_id] = f"failed to start: {exc}"
        for worker_id, _handle in pending.values():
            errors[worker_id] = ("start abandoned (the stack is stopping)" if cancel.is_set()
                                 else f"did not start within {cfg.worker_start_timeout_s:g}s")
        for worker_id, why in errors.items():
            log.warning("worker not started", extra={"worker": worker_id, "error": why})
            self.forget_worker(worker_id)
        with self._lock:
            self.worker_infos.update(infos)
        return infos, errors

    def forget_worker(self, worker_id: str) -> None:
        """Drop our slot for a worker (lost node, failed start) and make sure its actor is gone."""
        import ray

        with self._lock:
            handle = self.workers.pop(worker_id, None)
            self.worker_infos.pop(worker_id, None)
        if handle is not None:
            with contextlib.suppress(Exception):
                ray.kill(handle, no_restart=True)

    # ---- membership changes while serving (the node watcher's thread) ----------------------------------
    def worker_nodes(self) -> dict[str, str]:
        """{worker_id: Ray node id} of the workers we hold now."""
        with self._lock:
            return {w: i.node_id for w, i in self.worker_infos.items()}

    def add_to_rotation(self, infos: dict[str, Any]) -> None:
        """Hand started workers to the router; each enters rotation when it answers its first poll."""
        router = self.router
        if router is None or router.server is None:
            raise RuntimeError("the router is not running")
        from router.ray_client import RayWorkerClient

        registry = router.server.registry
        with self._lock:
            joining = [(w, self.workers[w], i) for w, i in infos.items() if w in self.workers]

        async def add() -> None:  # on the router's loop: the registry is not thread-safe
            for worker_id, handle, info in joining:
                registry.add(RayWorkerClient(worker_id, handle), info.node_id, info.transfer_address)

        router.call(add(), timeout_s=10)

    def retire(self, worker_id: str, reason: str) -> None:
        """A worker whose node is gone: out of rotation for good (never polled again) and our slot freed.
        The registry keeps its name (``prefixcache_worker_up`` 0; ``target_worker`` gets UNAVAILABLE)."""
        router = self.router
        if router is not None and router.server is not None:
            registry = router.server.registry

            async def take_out() -> None:
                registry.take_out(worker_id, reason, dead=True)

            with contextlib.suppress(Exception):
                router.call(take_out(), timeout_s=10)
        self.forget_worker(worker_id)
        log.warning("worker retired", extra={"worker": worker_id, "reason": reason})

    def stop(self) -> None:
        """Tear everything down; safe to call twice and after a failed start."""
        import ray

        if self.watcher is not None:  # first: it must not start workers on a stack going down
            with contextlib.suppress(Exception):
                self.watcher.stop()
            self.watcher = None
        if self.router is not None:
            with contextlib.suppress(Exception):
                self.router.stop()
            self.router = None
        with self._lock:
            handles = list(self.workers.values())
        if handles and ray.is_initialized():
            with contextlib.suppress(Exception):
                ray.get([h.shutdown.remote() for h in handles], timeout=10)
            for h in handles:
                with contextlib.suppress(Exception):
                    ray.kill(h, no_restart=True)
        with self._lock:
            self.workers.clear()
        if self._owns_ray:
            with contextlib.suppress(Exception):
                ray.shutdown()
            self._owns_ray = False
        if self.cache_service is not None:
            with contextlib.suppress(Exception):
                self.cache_service.stop()
            self.cache_service = None
        if self.redis is not None:
            with contextlib.suppress(Exception):
                self.redis.stop()
            self.redis = None

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


_RAY_START_TIMEOUTS = ("timed out during startup", "Timed out waiting for file")


def _init_local_ray(num_cpus: int, attempts: int = 2) -> None:
    """Start a Ray of our own. If its GCS or raylet does not come up within Ray's own waits (30 s each;
    RAY_gcs_server_port_wait_time_s sets the first), the start is retried once, after killing what the
    failed one left running."""
    import ray

    for attempt in range(1, attempts + 1):
        try:
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
            return
        except Exception as exc:  # noqa: BLE001 - Ray raises a bare Exception for these
            if not any(t in str(exc) for t in _RAY_START_TIMEOUTS) or attempt == attempts:
                raise
            log.warning("local Ray timed out during startup; retrying once", extra={"error": str(exc)})
            ray.shutdown()
            _kill_ray_children()  # a start that failed half way leaves its GCS/raylet running, unowned


def _kill_ray_children() -> None:
    """SIGKILL this process's child processes that run Ray's binaries or scripts (Linux: read from /proc).
    Other children (the embedded Valkey) are left alone."""
    me = os.getpid()
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ")
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile, or not ours to read
        if ppid == me and b"/ray/" in cmdline:
            try:
                os.kill(int(entry), signal.SIGKILL)
            except OSError:
                pass


def _reachable(address: str) -> str:
    """A wildcard bind address is not something a worker on another node can dial: use our IP."""
    host, _, port = address.rpartition(":")
    if host in ("0.0.0.0", "::", "[::]", ""):
        import ray

        host = ray.util.get_node_ip_address()
    return f"{host}:{port}"
