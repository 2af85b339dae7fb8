"""Placement decisions (pure): which joined node gets which worker, which workers a lost node takes along."""

from __future__ import annotations

from deploy.placement import NodeView, elastic_enabled, lost_workers, node_views, plan_joins


def view(node_id: str, *, cpus: float = 2.0, gpus: int = 0, free_cpus: float | None = None,
         free_gpus: float | None = None, alive: bool = True, head: bool = False) -> NodeView:
    total = {"CPU": cpus, f"node:{node_id}": 1.0}
    free = {"CPU": cpus if free_cpus is None else free_cpus}
    if gpus:
        total["GPU"] = float(gpus)
        free["GPU"] = float(gpus if free_gpus is None else free_gpus)
    return NodeView(node_id, alive, head, total, free)


def joins(nodes, known, worker_nodes, *, cpu_fleet=True, cpus_per_worker=1.0, next_index=2):
    plan = plan_joins(nodes, known, worker_nodes, cpu_fleet=cpu_fleet, cpus_per_worker=cpus_per_worker,
                      next_index=next_index)
    return [(p.worker_id, p.node_id, p.num_gpus) for p in plan]


def test_a_joined_cpu_node_with_room_gets_one_worker_with_the_next_name():
    nodes = [view("head", head=True), view("b"), view("c")]
    workers = {"worker-0": "head", "worker-1": "b"}
    assert joins(nodes, {"head", "b"}, workers) == [("worker-2", "c", 0.0)]
    # Known nodes never get more, even with room (--workers N is the start-up count).
    assert joins(nodes, {"head", "b", "c"}, workers) == []
    # Several joins at once: names continue in node order; next_index skips names given before.
    assert joins(nodes + [view("a")], {"head", "b"}, workers, next_index=5) == [
        ("worker-5", "a", 0.0), ("worker-6", "c", 0.0)]


def test_a_joined_cpu_node_without_room_or_already_hosting_a_worker_gets_none():
    workers = {"worker-0": "head"}
    assert joins([view("head"), view("c", free_cpus=0.5)], {"head"}, workers) == []
    assert joins([view("head"), view("c", cpus=4, free_cpus=1.0)], {"head"}, workers, cpus_per_worker=2.0) == []
    assert joins([view("head"), view("c", cpus=4, free_cpus=2.0)], {"head"}, workers, cpus_per_worker=2.0) == [
        ("worker-2", "c", 0.0)]
    # One of ours already runs there (it joined while the stack started): nothing more.
    assert joins([view("head"), view("c")], {"head"}, {**workers, "worker-1": "c"}) == []
    # A dead node is never a candidate.
    assert joins([view("head"), view("c", alive=False)], {"head"}, workers) == []


def test_gpu_nodes_get_one_worker_per_free_gpu_and_gpu_fleets_ignore_cpu_nodes():
    nodes = [view("head", head=True, gpus=0), view("g1", gpus=2), view("g2", gpus=4, free_gpus=3), view("c")]
    got = joins(nodes, {"head"}, {"worker-0": "x", "worker-1": "x"}, cpu_fleet=False)
    assert got == [("worker-2", "g1", 1.0), ("worker-3", "g1", 1.0),
                   ("worker-4", "g2", 1.0), ("worker-5", "g2", 1.0), ("worker-6", "g2", 1.0)]
    # Free GPUs held by our own start-up workers (the map lags) do not count twice.
    assert joins([view("g1", gpus=2)], set(), {"worker-0": "g1"}, cpu_fleet=False, next_index=1) == [
        ("worker-1", "g1", 1.0)]
    # A CPU fleet still puts GPU workers on a GPU node that joins (and a CPU worker on the CPU node).
    assert joins([view("g1", gpus=1), view("c")], set(), {}, cpu_fleet=True, next_index=0) == [
        ("worker-0", "c", 0.0), ("worker-1", "g1", 1.0)]


def test_lost_workers_are_those_on_dead_or_vanished_nodes():
    nodes = [view("a"), view("b", alive=False)]
    assert lost_workers(nodes, {"worker-0": "a", "worker-1": "b", "worker-2": "gone", "worker-3": ""}) == [
        "worker-1", "worker-2"]
    assert lost_workers(nodes, {}) == []


def test_node_views_read_ray_nodes_and_free_resources():
    raw = [
        {"NodeID": "h", "Alive": True, "Resources": {"CPU": 2, "node:__internal_head__": 1.0}},
        {"NodeID": "n", "Alive": True, "Resources": {"CPU": 4, "GPU": 1}},
        {"NodeID": "d", "Alive": False, "Resources": {}},
    ]
    h, n, d = node_views(raw, {"h": {"CPU": 0.0}})
    assert (h.is_head, h.free, h.total["CPU"]) == (True, {"CPU": 0.0}, 2.0)
    assert (n.is_head, n.free, n.num_gpus) == (False, {"CPU": 4.0, "GPU": 1.0}, 1)  # not in the map: all free
    assert not d.alive
    assert [v.free for v in node_views(raw[:1], None)] == [{"CPU": 2.0, "node:__internal_head__": 1.0}]


def test_elastic_defaults_to_on_for_a_joined_cluster_only():
    assert elastic_enabled("10.0.0.1:6379", None) is True
    assert elastic_enabled("auto", None) is True
    assert elastic_enabled(None, None) is False
    assert elastic_enabled("auto", False) is False
    assert elastic_enabled(None, True) is True


def test_serve_flags_reach_the_stack_config():
    import argparse

    from deploy.serve import add_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert config_from_args(parser.parse_args(["--ray-address", "auto"])).elastic is None
    assert config_from_args(parser.parse_args(["--ray-address", "auto", "--no-elastic"])).elastic is False
    assert config_from_args(parser.parse_args(["--elastic"])).elastic is True
