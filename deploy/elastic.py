"""The node watcher: keeps the stack's workers in step with the Ray cluster's nodes while it serves.

Every ``interval_s`` (2 s) one round, in its own daemon thread (Ray's blocking calls never run on the
router's event loop)::

    nodes  = ray.nodes() + available resources per node          (one GCS round trip each)
    lost   = lost_workers(nodes, our workers)    -> stack.retire(): out of rotation for good, slot freed
    joins  = plan_joins(nodes, known nodes, ...) -> stack.launch_workers() -> stack.add_to_rotation()

A node is *known* once it was alive at start or got workers from a join, so a node is placed on once:
the watcher never restarts a lost worker (its node is dead; a node that comes back has a new node id
and is a new node). A joined node that had no room stays unknown and is asked again next round. The
rules themselves are pure, in ``deploy/placement.py``.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from common.logs import get_logger
from deploy.placement import lost_workers, node_views, plan_joins

if TYPE_CHECKING:
    from deploy.stack import Stack

log = get_logger("serve")


class NodeWatcher:
    def __init__(self, stack: Stack, *, known_node_ids: set[str], next_index: int, cpu_fleet: bool,
                 interval_s: float = 2.0) -> None:
        self.stack = stack
        self.known_node_ids = set(known_node_ids)
        self.next_index = next_index  # worker-<next_index> is the next name: names are never reused
        self.cpu_fleet = cpu_fleet
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
        """One round: retire the workers of lost nodes, then start workers on joined nodes."""
        import ray

        stack = self.stack
        nodes = node_views(ray.nodes(), _available_per_node())
        worker_nodes = stack.worker_nodes()
        for worker_id in lost_workers(nodes, worker_nodes):
            stack.retire(worker_id, f"its Ray node {worker_nodes[worker_id][:12]} is gone")
            worker_nodes.pop(worker_id)
        if self._stop.is_set():
            return
        plan = plan_joins(nodes, self.known_node_ids, worker_nodes, cpu_fleet=self.cpu_fleet,
                          cpus_per_worker=stack.config.worker_num_cpus, next_index=self.next_index)
        if not plan:
            return
        self.next_index += len(plan)
        self.known_node_ids.update(p.node_id for p in plan if p.node_id is not None)
        log.info("nodes joined: starting workers", extra={
            "workers": {p.worker_id: p.node_id for p in plan}})
        infos, errors = stack.launch_workers(plan, self._stop)
        if infos and not self._stop.is_set():
            try:
                stack.add_to_rotation(infos)
            except Exception as exc:  # noqa: BLE001 - router stopping: a worker outside rotation is waste
                for worker_id in infos:
                    stack.forget_worker(worker_id)
                errors.update({w: f"not added to the router: {exc!r}" for w in infos})
            else:
                log.info("workers joined the rotation", extra={
                    "workers": {w: i.node_id for w, i in infos.items()}})
        if errors:
            log.warning("workers for joined nodes failed", extra={"errors": errors})


def _available_per_node() -> dict[str, Any] | None:
    """Free resources per alive node, or None when this Ray cannot tell (then totals minus our workers)."""
    try:
        from ray._private.state import available_resources_per_node

        return available_resources_per_node()
    except Exception:  # noqa: BLE001 - a developer API: degrade, never fail the round
        return None
