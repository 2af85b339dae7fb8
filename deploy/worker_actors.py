"""The stack's worker actors on Ray: create a planned batch, wait until each started, kill one, stop them all.

    actors = WorkerActors(template, cpus_per_worker=1.0, max_restarts=-1, start_timeout_s=300.0)
    infos, errors = actors.launch(plan, cancel)  # {worker_id: WorkerInfo} started, {worker_id: why} not
    actors.forget("worker-3")                    # our slot freed, its actor killed
    actors.stop_all()                            # shutdown() on each, then ray.kill

Each placement (``deploy/placement.py``) becomes one worker actor of the stack's engine (``engine``:
``WorkerActor``, or ``VllmWorkerActor`` for ``--engine vllm``) from the ``template`` config (the
worker id and torch threads filled in per placement): with a GPU (``num_gpus=1``, no CPU reserved) or
``cpus_per_worker`` CPUs, pinned to its Ray node by a hard affinity when the plan names one. The node
watcher's thread launches and forgets while the stack serves, so ``handles`` and ``infos`` change under
one lock.

One fleet shares one index, so every worker must hash as the router does: a started worker whose model id or
block size differs from ``fleet`` (the router's) is refused with a message naming both, killed and forgotten.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from typing import TYPE_CHECKING, Any, Mapping

from common.logs import get_logger

if TYPE_CHECKING:
    import ray

    from cache_service.records import WorkerInfo
    from deploy.placement import WorkerPlacement
    from workers.ray_worker import WorkerConfig

__all__ = ["ENGINES", "WorkerActors", "fleet_mismatch"]

ENGINES = ("native", "vllm")

log = get_logger("serve")


def fleet_mismatch(info: WorkerInfo, fleet: tuple[str, int]) -> str | None:
    """Why ``info``'s worker cannot join a fleet of ``(model_id, block_size)`` (None: it can)."""
    model_id, block_size = fleet
    if (info.model_id, info.block_size) == (model_id, block_size):
        return None
    return (f"refused: it serves model {info.model_id!r} with block size {info.block_size}, but the fleet (and "
            f"its router) serves {model_id!r} with block size {block_size}; a mixed fleet cannot share one index")


class WorkerActors:
    def __init__(self, template: WorkerConfig, *, cpus_per_worker: float, max_restarts: int,
                 start_timeout_s: float, engine: str = "native", fleet: tuple[str, int] | None = None) -> None:
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
        self.template = template
        self.engine = engine
        self.fleet = fleet  # (model_id, block_size) every worker must report; None: not checked
        self.cpus_per_worker = cpus_per_worker
        self.max_restarts = max_restarts  # Ray restarts a dead worker process on its node; -1: no limit
        self.start_timeout_s = start_timeout_s  # actor placement + model load, per batch
        self.handles: dict[str, ray.actor.ActorHandle] = {}  # worker_id -> handle, from creation on
        self.infos: dict[str, WorkerInfo] = {}  # worker_id -> what its start() answered
        self._lock = threading.Lock()

    def launch(self, plan: list[WorkerPlacement],
               cancel: threading.Event) -> tuple[dict[str, WorkerInfo], dict[str, str]]:
        """Create the planned actors and wait (in this thread: never an event loop) until each started,
        i.e. registered with the cache service. Returns ({worker_id: WorkerInfo} of those that did,
        {worker_id: why} of those that did not: they are killed and forgotten). ``cancel`` (the stack
        stopping) abandons the wait."""
        import ray

        actor_cls = ray.remote(self._actor_class())
        pending: dict[ray.ObjectRef, str] = {}  # start() ref -> worker_id
        for p in plan:
            handle = actor_cls.options(**self._options(p)).remote(self._config(p))
            with self._lock:  # recorded at once, so that stop_all() kills it even while it is starting
                self.handles[p.worker_id] = handle
            pending[handle.start.remote()] = p.worker_id
        infos: dict[str, WorkerInfo] = {}
        errors: dict[str, str] = {}
        deadline = time.monotonic() + self.start_timeout_s
        # Short waits, so that a cancel is seen within a second.
        while pending and not cancel.is_set() and time.monotonic() < deadline:
            ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=1.0)
            for ref in ready:
                worker_id = pending.pop(ref)
                try:
                    info = ray.get(ref)  # ready: does not block
                except Exception as exc:  # noqa: BLE001 - the machine died, placement failed, model load failed
                    errors[worker_id] = f"failed to start: {exc}"
                    continue
                why = fleet_mismatch(info, self.fleet) if self.fleet is not None else None
                if why is None:
                    infos[worker_id] = info
                else:
                    errors[worker_id] = why
        for worker_id in pending.values():
            errors[worker_id] = ("start abandoned (the stack is stopping)" if cancel.is_set()
                                 else f"did not start within {self.start_timeout_s:g}s")
        for worker_id, why in errors.items():
            log.warning("worker not started", extra={"worker": worker_id, "error": why})
            self.forget(worker_id)
        with self._lock:
            self.infos.update(infos)
        return infos, errors

    def _actor_class(self) -> type:
        if self.engine == "vllm":
            from workers.vllm_worker import VllmWorkerActor

            return VllmWorkerActor
        from workers.ray_worker import WorkerActor

        return WorkerActor

    def _options(self, p: WorkerPlacement) -> dict[str, Any]:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        options: dict[str, Any] = {
            # A GPU worker is placed by its GPU alone: a GPU machine's CPUs do not cap its workers.
            "num_cpus": 0 if p.num_gpus else self.cpus_per_worker, "num_gpus": p.num_gpus,
            # Calls in flight when a worker dies are not retried by Ray: the router fails them over.
            "max_restarts": self.max_restarts, "max_task_retries": 0,
            # generate() streams, polls and pins run side by side on the actor's event loop.
            "max_concurrency": 1000,
        }
        if p.node_id is not None:
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(p.node_id, soft=False)
        return options

    def _config(self, p: WorkerPlacement) -> WorkerConfig:
        # A CPU worker computes with as many torch threads as the CPUs it holds; a GPU worker keeps torch's default.
        threads = None if p.num_gpus else max(1, int(self.cpus_per_worker))
        return dataclasses.replace(self.template, worker_id=p.worker_id, torch_threads=threads)

    def forget(self, worker_id: str) -> None:
        """Drop our slot for a worker (lost machine, failed start) and make sure its actor is gone."""
        import ray

        with self._lock:
            handle = self.handles.pop(worker_id, None)
            self.infos.pop(worker_id, None)
        if handle is not None:
            with contextlib.suppress(Exception):
                ray.kill(handle, no_restart=True)

    def worker_nodes(self) -> dict[str, str]:
        """{worker_id: Ray node id} of the started workers we hold now."""
        with self._lock:
            return {w: i.node_id for w, i in self.infos.items()}

    def held(self, infos: Mapping[str, WorkerInfo]) -> list[tuple[str, ray.actor.ActorHandle, WorkerInfo]]:
        """(worker_id, handle, info) of those of ``infos`` we still hold (not forgotten meanwhile), in the
        order the actors were created: ``infos`` is in the order their starts finished, which varies."""
        with self._lock:
            return [(w, h, infos[w]) for w, h in self.handles.items() if w in infos]

    def stop_all(self) -> None:
        """Let every worker stop cleanly (its cache client, transfer server, engine loop), then kill its actor."""
        import ray

        with self._lock:
            handles = list(self.handles.values())
        if handles and ray.is_initialized():
            with contextlib.suppress(Exception):
                ray.get([h.shutdown.remote() for h in handles], timeout=10)
            for h in handles:
                with contextlib.suppress(Exception):
                    ray.kill(h, no_restart=True)
        with self._lock:
            self.handles.clear()
