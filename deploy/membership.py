"""Which workers the router rotates over: its endpoints at start, and the changes the Ray node watcher makes
while the stack serves (workers of a machine that joined enter, those of a machine that died leave).

    RouterThread(config, router_endpoints(actors, actors.infos))          # at start
    RayNodeWatcher(StackMembership(actors, router), ...)                  # then, when elastic

``StackMembership`` is ``deploy/elastic.py``'s ``Membership`` over the stack's ``WorkerActors`` and its
``RouterThread``. The router's registry is not thread-safe and lives on the router's event loop, so every
change to it runs there as a coroutine, called from the watcher's thread.
"""

from __future__ import annotations

import contextlib
import threading
from typing import TYPE_CHECKING, Mapping

from common.logs import get_logger

if TYPE_CHECKING:
    from cache_service.records import WorkerInfo
    from deploy.placement import WorkerPlacement
    from deploy.worker_actors import WorkerActors
    from router.server import RouterThread, WorkerEndpoint

__all__ = ["StackMembership", "router_endpoints"]

log = get_logger("serve")


def router_endpoints(actors: WorkerActors, infos: Mapping[str, WorkerInfo]) -> list[WorkerEndpoint]:
    """The router's view of those started workers we still hold: a Ray client, its Ray node, its transfer
    address."""
    from router.ray_client import RayWorkerClient
    from router.server import WorkerEndpoint

    return [WorkerEndpoint(RayWorkerClient(worker_id, handle), info.node_id, info.transfer_address)
            for worker_id, handle, info in actors.held(infos)]


class StackMembership:
    def __init__(self, actors: WorkerActors, router: RouterThread) -> None:
        self.actors = actors
        self.router = router

    def worker_nodes(self) -> dict[str, str]:
        return self.actors.worker_nodes()

    def launch_workers(self, plan: list[WorkerPlacement],
                       cancel: threading.Event) -> tuple[dict[str, WorkerInfo], dict[str, str]]:
        return self.actors.launch(plan, cancel)

    def forget_worker(self, worker_id: str) -> None:
        self.actors.forget(worker_id)

    def add_to_rotation(self, infos: Mapping[str, WorkerInfo]) -> None:
        """Hand started workers to the router; each enters rotation when it answers its first poll."""
        server = self.router.server
        if server is None:
            raise RuntimeError("the router is not running")
        registry = server.registry
        joining = router_endpoints(self.actors, infos)

        async def add() -> None:
            for e in joining:
                registry.add(e.client, e.node_id, e.transfer_address)

        self.router.call(add(), timeout_s=10)

    def retire(self, worker_id: str, reason: str) -> None:
        """A worker whose Ray node is gone: out of rotation for good (never polled again) and our slot freed.
        The registry keeps its name (``prefixcache_worker_up`` 0; ``target_worker`` gets UNAVAILABLE)."""
        server = self.router.server
        if server is not None:
            registry = server.registry

            async def take_out() -> None:
                registry.take_out(worker_id, reason, dead=True)

            with contextlib.suppress(Exception):  # a router going down forgets it anyway
                self.router.call(take_out(), timeout_s=10)
        self.actors.forget(worker_id)
        log.warning("worker retired", extra={"worker": worker_id, "reason": reason})
