"""RoutingCore: mirror lookup + policy + target_worker + peer hints, on registry state (no Ray calls)."""

from __future__ import annotations

import asyncio

import pytest

from cache_service.records import BlockStored
from router.index_mirror import IndexMirror
from router.metrics import RouterMetrics
from router.policies import WorkerLoad, make_policy
from router.registry import WorkerRegistry
from router.worker_client import InProcessWorkerClient
from router.routing import NoWorkerError, RoutingCore, UnknownWorkerError
from router.tokenize import PromptEncoder

BS = 16


def make_core(policy: str = "cache_aware", index_source: str = "mirror", service=None, **weights) -> RoutingCore:
    mirror = IndexMirror()
    registry = WorkerRegistry(mirror)
    for i in range(3):
        w = registry.add(InProcessWorkerClient(f"worker-{i}", None), transfer_address=f"10.0.0.{i}:7000")
        w.live, w.feed_epoch = True, "e"
        w.load = WorkerLoad(f"worker-{i}", capacity_blocks=100, num_free_blocks=100)
    return RoutingCore(PromptEncoder("demo", BS), registry, mirror, make_policy(policy, **weights), RouterMetrics(),
                       service_lookup=service, index_source=index_source)


def prompt(n: int, base: int = 0) -> list[int]:
    return [(base + i) % 256 for i in range(n)]


def hold(core: RoutingCore, worker: str, hashes) -> None:
    core.mirror.apply_events(worker, [BlockStored(h) for h in hashes])


def decide(core: RoutingCore, ids, **kw):
    hashes = core.encoder.block_hashes(ids)
    return asyncio.run(core.decide(ids, hashes, request_id=kw.pop("request_id", "r"), **kw))


def test_cache_aware_goes_to_the_holder_and_predicts_its_hit():
    core = make_core()
    ids = prompt(100)  # 6 full blocks
    hashes = core.encoder.block_hashes(ids)
    hold(core, "worker-2", hashes[:5])
    hold(core, "worker-0", hashes[:2])
    d = decide(core, ids)
    assert d.worker_id == "worker-2"
    assert d.num_cached_blocks == 5 and d.predicted_cached_tokens == 5 * BS
    assert d.matches == {"worker-2": 5, "worker-0": 2}
    assert d.peer is None  # nobody holds more than the chosen worker
    assert d.lookup_source == "mirror" and not d.targeted


def test_load_outweighs_a_small_hit():
    core = make_core()
    ids = prompt(100)
    hold(core, "worker-1", core.encoder.block_hashes(ids)[:1])
    core.registry.get("worker-1").load.num_waiting_blocks = 50
    assert decide(core, ids).worker_id != "worker-1"


def test_target_worker_bypasses_the_policy_and_gets_the_best_peer_as_hint():
    core = make_core()
    ids = prompt(100)
    hashes = core.encoder.block_hashes(ids)
    hold(core, "worker-2", hashes)
    hold(core, "worker-1", hashes[:3])
    d = decide(core, ids, target_worker="worker-0")
    assert d.worker_id == "worker-0" and d.targeted
    assert (d.peer.node_id, d.peer.transfer_address, d.peer.num_blocks) == ("worker-2", "10.0.0.2:7000", 6)
    assert d.predicted_cached_tokens == 6 * BS  # 100 tokens: all 6 full blocks can be reused
    with pytest.raises(UnknownWorkerError, match="unknown target_worker 'worker-7'"):
        decide(core, ids, target_worker="worker-7")
    core.registry.take_out("worker-0", "test")
    with pytest.raises(NoWorkerError, match="'worker-0' is not available"):
        decide(core, ids, target_worker="worker-0")


def test_excluded_and_dead_workers_are_never_chosen_nor_hinted():
    core = make_core()
    ids = prompt(64)
    hashes = core.encoder.block_hashes(ids)
    hold(core, "worker-1", hashes)
    d = decide(core, ids, exclude=frozenset({"worker-1"}))
    assert d.worker_id != "worker-1" and d.peer is None and d.matches == {}
    core.registry.take_out("worker-1", "gone", dead=True)
    assert "worker-1" not in core.mirror.by_worker
    core.registry.take_out("worker-0", "gone")
    core.registry.take_out("worker-2", "gone")
    with pytest.raises(NoWorkerError, match="no live worker"):
        decide(core, ids)


def test_round_robin_cycles_and_session_sticks():
    core = make_core("round_robin")
    ids = prompt(40)
    assert [decide(core, ids).worker_id for _ in range(4)] == ["worker-0", "worker-1", "worker-2", "worker-0"]
    core = make_core("session")
    chosen = {decide(core, prompt(40, base=k), session_id="s-1", request_id=f"r{k}").worker_id for k in range(5)}
    assert len(chosen) == 1


def test_service_lookup_is_used_when_asked_and_when_the_mirror_is_not_in_sync():
    calls = []

    async def service(hashes):
        calls.append(len(hashes))
        return {"worker-1": 2, "gone": 3}

    core = make_core(index_source="service", service=service)
    d = decide(core, prompt(64))
    assert calls == [4] and d.lookup_source == "service" and d.matches == {"worker-1": 2}
    core = make_core(service=service)
    assert decide(core, prompt(64)).lookup_source == "mirror"
    core.registry.get("worker-0").feed_epoch = ""  # not synced yet
    assert decide(core, prompt(64)).lookup_source == "service"


def test_a_failing_service_falls_back_to_the_mirror():
    async def service(hashes):
        raise ConnectionError("down")

    core = make_core(index_source="service", service=service)
    assert decide(core, prompt(64)).lookup_source == "mirror"


def test_bpe_tokenize_benchmark_trains_a_real_bpe_and_times_prompts_of_the_asked_length():
    """A smoke run of benchmarks/bench_router.py's BPE section (timings are reported, never asserted)."""
    from benchmarks.bench_router import bench_bpe_tokenize

    out = bench_bpe_tokenize(num_requests=5, prompt_tokens=512, vocab_size=2_000, corpus_bytes=256 << 10)
    assert out["vocab_size"] == 2_000 and out["corpus_bytes"] == 256 << 10
    assert 400 < out["mean_prompt_tokens"] < 650  # windows sized from the measured characters per token
    assert out["tokenize"]["p50_ms"] > 0
