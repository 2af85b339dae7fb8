"""A real two-node local Ray cluster (``ray.cluster_utils.Cluster``), started once per test module.

    from tests.ray_fixtures import two_node_cluster  # noqa: F401  (makes the fixture visible)

    def test_x(two_node_cluster):
        head_id, other_id = two_node_cluster.head_node_id, two_node_cluster.worker_node_id

Both nodes have 2 CPUs and a custom resource naming them (``node_head`` / ``node_worker``), so a
test can place an actor on either with ``resources={...: 0.01}`` or with
``NodeAffinitySchedulingStrategy(node_id, soft=False)``. ``remove_worker_node()`` kills the second node
(its actors die), as a lost machine would; ``lose_worker_node()`` also kills its worker processes at once
(which otherwise outlive their raylet by a second or two); the fixture's teardown tolerates both. The driver is
connected for the module's tests and disconnected (``ray.shutdown()``) at the end; ``ray stop`` is
never run.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass
from typing import Any, Iterator

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@dataclass
class TwoNodeCluster:
    cluster: Any  # ray.cluster_utils.Cluster
    head_node_id: str
    worker_node: Any  # ray._private.node.Node (None once removed)
    worker_node_id: str

    @property
    def node_ids(self) -> list[str]:
        return [self.head_node_id, self.worker_node_id]

    def remove_worker_node(self) -> None:
        node, self.worker_node = self.worker_node, None
        if node is not None:
            self.cluster.remove_node(node, allow_graceful=False)

    def lose_worker_node(self) -> list[int]:
        """Remove the second node as a lost machine goes: its Ray processes and, at once after them, every
        worker process its raylet started (``remove_worker_node`` alone leaves those running, and serving,
        until they notice that their raylet is gone, a second or two later). Returns the workers' PIDs."""
        from ray._private.ray_constants import PROCESS_TYPE_RAYLET

        from tests.stack_process import child_pids

        node = self.worker_node
        if node is None:
            return []
        workers = child_pids(node.all_processes[PROCESS_TYPE_RAYLET][0].process.pid)
        self.remove_worker_node()  # first: a raylet that saw its workers die would start them again
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return workers


def start_two_node_cluster(num_cpus: int = 2, object_store_mb: int = 100) -> TwoNodeCluster:
    import ray
    from ray.cluster_utils import Cluster

    store = object_store_mb * 1024 * 1024
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": num_cpus, "resources": {"node_head": 1.0}, "object_store_memory": store,
        "include_dashboard": False,
    })
    worker = cluster.add_node(num_cpus=num_cpus, resources={"node_worker": 1.0}, object_store_memory=store)
    cluster.wait_for_nodes()
    cluster.connect()
    head_id = cluster.head_node.node_id
    deadline = time.monotonic() + 30
    while sum(1 for n in ray.nodes() if n["Alive"]) < 2:
        if time.monotonic() > deadline:
            raise TimeoutError("the second Ray node did not join")
        time.sleep(0.1)
    return TwoNodeCluster(cluster, head_id, worker, worker.node_id)


def stop_two_node_cluster(c: TwoNodeCluster) -> None:
    import ray

    with contextlib.suppress(Exception):
        ray.shutdown()
    with contextlib.suppress(Exception):
        c.cluster.shutdown()


@pytest.fixture(scope="module")
def two_node_cluster() -> Iterator[TwoNodeCluster]:
    c = start_two_node_cluster()
    try:
        yield c
    finally:
        stop_two_node_cluster(c)
