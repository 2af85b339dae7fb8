"""The Ray node watcher: keeps the stack's workers in step with the Ray cluster's machines while it serves.

Every ``interval_s`` (2 s) one round, in its own daemon thread (Ray's blocking calls never run on the
router's event loop)::

    nodes  = ray.nodes() + available resources per Ray node     (one GCS round trip each)
    lost   = lost_workers(nodes, our workers)    -> membership.retire(): out of rotation for good, slot freed
    joins  = plan_joins(nodes, known nodes, ...) -> membership.launch_workers() -> membership.add_to_rotation()

A Ray node is *known* once it was alive at start or got workers from a join, so a machine is placed on
once: the watcher never restarts a lost worker (its machine is gone; a machine that comes back has a new
Ray node id and is a new node). A joined node that had no room stays unknown and is asked again next
round. The rules themselves are pure, in ``deploy/placement.py``; what the watcher changes is a
``Membership`` (``deploy/membership.py`` over the stack's actors and router), so this module never
imports the stack.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, Mapping, Protocol

from common.logs import get_logger
from deploy.placement import WorkerPlacement, lost_workers, node_views, plan_joins

if TYPE_CHECKING:
    from cache_service.records import WorkerInfo

__all__ = ["Membership", "RayNodeWatcher"]

log = get_logger("serve")


class Membership(Protocol):
    """The stack's workers as the watcher changes them (``deploy/membership.py``: ``StackMembership``)."""

    def worker_nodes(self) -> dict[str, str]:
        """{worker_id: Ray node id} of the started workers held now."""
        ...

    def launch_workers(self, plan: list[WorkerPlacement],
                       cancel: threading.Event) -> tuple[dict[str, WorkerInfo], dict[str, str]]:
        """Start the planned workers: ({worker_id: WorkerInfo} started, {worker_id: why} not, forgotten)."""
        ...

    def add_to_rotation(self, infos: Mapping[str, WorkerInfo]) -> None:
        """Hand started workers to the router (raises when the router is not running)."""
        ...

    def forget_worker(self, worker_id: str) -> None:
        """Drop a worker that never entered the rotation; its actor is killed."""
        ...

    def retire(self, worker_id: str, reason: str) -> None:
        """Take a worker whose Ray node is gone out of rotation for good and free its slot."""
        ...


class RayNodeWatcher:
    def __init__(self, membership: Membership, *, known_node_ids: set[str], next_index: int, cpu_fleet: bool,
                 cpus_per_worker: float, interval_s: float = 2.0) -> None:
        self.membership = membership
        self.known_node_ids = set(known_node_ids)
        self.next_index = next_index  # worker-<next_index> is the next name: names are never reused
        self.cpu_fleet = cpu_fleet  # the start-up workers ran on CPU: CPU-only machines that join get one too
        self.cpus_per_worker = cpus_per_worker
        self.interval_s = interval_s
        self.num_rounds = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="node-watcher", daemon=True)
        self._thread.start()
        log.info("node watcher started", extra={"known_nodes": len(self.known_node_ids),
                                                "next_worker": f"worker-{self.next_index}",
                                                "cpu_fleet": self.cpu_fleet})

    def stop(self, timeout_s: float = 15.0) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout_s)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.reconcile()
            except Exception as exc:  # noqa: BLE001 - a GCS hiccup must not end the watcher
                log.warning("node watcher round failed", extra={"error": repr(exc)})
            self.num_rounds += 1

    def reconcile(self) -> None:
        """One round: retire the workers of lost Ray nodes, then start workers on the Ray nodes that joined."""
        import ray

        members = self.membership
        nodes = node_views(ray.nodes(), _available_per_node())
        worker_nodes = members.worker_nodes()
        for worker_id in lost_workers(nodes, worker_nodes):
            members.retire(worker_id, f"its Ray node {worker_nodes[worker_id][:12]} is gone")
            worker_nodes.pop(worker_id)
        if self._stop.is_set():
            return
        plan = plan_joins(nodes, self.known_node_ids, worker_nodes, cpu_fleet=self.cpu_fleet,
                          cpus_per_worker=self.cpus_per_worker, next_index=self.next_index)
        if not plan:
            return
        self.next_index += len(plan)
        self.known_node_ids.update(p.node_id for p in plan if p.node_id is not None)
        log.info("nodes joined: starting workers", extra={
            "workers": {p.worker_id: p.node_id for p in plan}})
        infos, errors = members.launch_workers(plan, self._stop)
        if infos and not self._stop.is_set():
            try:
                members.add_to_rotation(infos)
            except Exception as exc:  # noqa: BLE001 - router stopping: a worker outside rotation is waste
                for worker_id in infos:
                    members.forget_worker(worker_id)
                errors.update({w: f"not added to the router: {exc!r}" for w in infos})
            else:
                log.info("workers joined the rotation", extra={
                    "workers": {w: i.node_id for w, i in infos.items()}})
        if errors:
            log.warning("workers for joined nodes failed", extra={"errors": errors})


def _available_per_node() -> dict[str, Any] | None:
    """Free resources per alive Ray node, or None when this Ray cannot tell (then totals minus our workers)."""
    try:
        from ray._private.state import available_resources_per_node

        return available_resources_per_node()
    except Exception:  # noqa: BLE001 - a developer API: degrade, never fail the round
        return None
