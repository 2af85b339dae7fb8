"""Where workers go (pure): the start-up plan, and the workers a Ray node that joins later gets.

Here a *node* is always a Ray node (one machine, or one pod), never a worker: a worker is the actor placed
on it (the cache service's "node" is a worker's cache node).

    plan_workers(ray.nodes(), num_workers)                 -> [WorkerPlacement]   at start
    nodes = node_views(ray.nodes(), available_per_node)   (every ~2 s, by deploy/elastic.py's watcher)
    lost_workers(nodes, {worker_id: node_id})              -> workers whose node is gone
    plan_joins(nodes, known_node_ids, worker_nodes, ...)   -> [WorkerPlacement] for nodes that joined

The rule is the same at start and later: with GPUs, one worker per GPU (``num_gpus=1``); on CPU, one
worker of ``cpus_per_worker`` CPUs per node (``--workers N`` spread round-robin, head first, at start).
A node *joins* when it is alive and was not known when the stack started (nor placed on since): a GPU
node gets one worker per GPU that is free and not held by one of our workers; a CPU-only node gets one
worker, only in a CPU fleet (the start-up workers ran on CPU: a CPU worker among GPU workers would be
far slower than its peers yet routed to like them), and only when it has the free CPUs and no worker of
ours yet. Names continue ``worker-<next index>``: a name is never given twice, so a worker lost with its
node keeps its name in the metrics and a worker on a node that comes back (as a new node id) gets a
fresh one.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Mapping


@dataclass(slots=True)
class WorkerPlacement:
    worker_id: str
    node_id: str | None  # hard affinity; None: let Ray place it (start-up GPU workers)
    num_gpus: float


@dataclass(slots=True)
class NodeView:
    """One Ray node as placement sees it (from ``ray.nodes()`` and the per-node available resources)."""

    node_id: str
    alive: bool
    is_head: bool = False
    total: dict[str, float] = field(default_factory=dict)
    free: dict[str, float] = field(default_factory=dict)

    @property
    def num_gpus(self) -> int:
        return int(self.total.get("GPU", 0))


def is_head(node: Mapping) -> bool:
    return any(k.startswith("node:__internal_head__") for k in node.get("Resources", {}))


def node_views(nodes: Iterable[Mapping], available: Mapping[str, Mapping[str, float]] | None) -> list[NodeView]:
    """``ray.nodes()`` + ``available_resources_per_node()`` -> views. A node missing from ``available``
    (the map lags a join by a moment, or could not be read) counts as entirely free: our own workers on
    it are still subtracted by ``plan_joins``."""
    views = []
    for n in nodes:
        total = {k: float(v) for k, v in n.get("Resources", {}).items()}
        node_id = n["NodeID"]
        free = dict(available[node_id]) if available is not None and node_id in available else dict(total)
        views.append(NodeView(node_id, bool(n.get("Alive")), is_head(n), total, free))
    return views


def plan_workers(nodes: list[dict], num_workers: int | None, node_ids: list[str] | None = None,
                 cpus_per_worker: float = 1.0) -> list[WorkerPlacement]:
    """Which worker goes where at start. ``nodes`` is ``ray.nodes()`` (alive ones are used)."""
    alive = [n for n in nodes if n.get("Alive")]
    if not alive:
        raise RuntimeError("the Ray cluster has no alive node")
    num_gpus = int(sum(n.get("Resources", {}).get("GPU", 0) for n in alive))
    if num_gpus > 0 and node_ids is None:
        n = num_workers or num_gpus
        if n > num_gpus:
            raise ValueError(f"--workers {n} asks for more GPU workers than the cluster's {num_gpus} GPUs")
        return [WorkerPlacement(f"worker-{i}", None, 1.0) for i in range(n)]
    n = num_workers or 2
    if n < 1:
        raise ValueError(f"the number of workers must be >= 1, got {n}")
    if node_ids is not None:
        return [WorkerPlacement(f"worker-{i}", node_ids[i % len(node_ids)], 0.0) for i in range(n)]
    # Round-robin over the nodes (head first), skipping nodes whose CPUs are taken: one per node first.
    head_first = sorted(alive, key=lambda x: (not is_head(x), x["NodeID"]))
    room = {x["NodeID"]: int(x.get("Resources", {}).get("CPU", 0) // cpus_per_worker) if cpus_per_worker else n
            for x in head_first}
    if sum(room.values()) < n:
        raise ValueError(f"{n} CPU workers of {cpus_per_worker:g} CPU each do not fit the cluster's CPUs "
                         f"({', '.join(f'{k[:8]}: {v}' for k, v in room.items())} workers per node)")
    plan: list[WorkerPlacement] = []
    while len(plan) < n:
        for x in head_first:
            if room[x["NodeID"]] > 0 and len(plan) < n:
                room[x["NodeID"]] -= 1
                plan.append(WorkerPlacement(f"worker-{len(plan)}", x["NodeID"], 0.0))
    return plan


def lost_workers(nodes: Iterable[NodeView], worker_nodes: Mapping[str, str]) -> list[str]:
    """Workers whose node is dead or no longer listed (sorted). A worker without a known node is kept."""
    alive = {n.node_id for n in nodes if n.alive}
    return sorted(w for w, node_id in worker_nodes.items() if node_id and node_id not in alive)


def plan_joins(
    nodes: Iterable[NodeView],
    known_node_ids: Iterable[str],
    worker_nodes: Mapping[str, str],
    *,
    cpu_fleet: bool,
    cpus_per_worker: float,
    next_index: int,
) -> list[WorkerPlacement]:
    """Workers for the nodes that joined: alive nodes not in ``known_node_ids`` (head first, then by id).

    ``worker_nodes`` maps each of our workers to its node (a start-up GPU worker Ray packed onto a
    node that joined meanwhile counts against that node). Names start at ``worker-<next_index>``.
    A joined node that gets nothing now (no free CPU yet) is simply asked again on the next call.
    """
    known = set(known_node_ids)
    ours = Counter(worker_nodes.values())
    joined = sorted((n for n in nodes if n.alive and n.node_id not in known), key=lambda n: (not n.is_head, n.node_id))
    plan: list[WorkerPlacement] = []
    for node in joined:
        if node.num_gpus > 0:
            num = min(int(node.free.get("GPU", 0)), node.num_gpus - ours[node.node_id])
            gpus = 1.0
        elif cpu_fleet and ours[node.node_id] == 0 and node.free.get("CPU", 0.0) >= cpus_per_worker:
            num, gpus = 1, 0.0
        else:
            num = 0
        for _ in range(max(0, num)):
            plan.append(WorkerPlacement(f"worker-{next_index + len(plan)}", node.node_id, gpus))
    return plan


def elastic_enabled(ray_address: str | None, elastic: bool | None) -> bool:
    """``--elastic``/``--no-elastic`` when given; else on for a cluster we join (nodes come and go), off
    for a local Ray (nothing can join it)."""
    return bool(ray_address) if elastic is None else elastic
