"""Integrity beyond the sender's word: imported runs recomputed and compared (workers/block_verifier.py), the
fetcher dropping a run that does not match and quarantining its sender (cache_service/prefix_fetcher.py,
peer_trust.py). Real engines, real Valkey, real BlockTransfer streams on loopback; the bad peer is the
data plane's own fault hook (``TransferFaults.alter_export``: wrong values under a valid checksum)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from cache_fixtures import (  # noqa: F401  (pytest fixtures)
    PARAMS,
    cache_service,
    cold_output,
    demo_model,
    make_node,
    node_config,
    prompt_of,
)
from prometheus_client import CollectorRegistry, generate_latest
from valkey_fixtures import valkey_module  # noqa: F401  (pytest fixtures)

from cache_service.local_node import LocalCacheNode
from cache_service.peer_trust import TrustConfig
from cache_service.prefix_fetcher import FetchOutcome
from cache_service.records import PeerHint, WorkerCounters, WorkerLoad
from cache_service.transfer_source import wrong_values
from router.metrics import _WorkerCollector
from workers.block_verifier import FP8_REL_TOLERANCE, REL_TOLERANCE
from workers.engine import Engine, EngineConfig

KEY = b"test-key"  # under this key, peer "A"'s first sampled fetch after the first two is number 22
QUARANTINE_S = 600.0


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def trusting(node, clock: Clock) -> Clock:
    node.node.trust.clock = clock
    return clock


def held(node, prompt, salt=""):
    return node.call(lambda e: e.num_cached_prefix_blocks(e.block_hashes(prompt, salt)))


def generate(node, prompt):
    (out,), (fetch,) = node.generate([prompt], PARAMS)
    return out, fetch


# ---- the engine side: verify_block -------------------------------------------------------------------------
def exported_run(loaded, prompt, num_blocks):
    a = Engine(EngineConfig(model="demo", num_blocks=64), loaded=loaded)
    a.generate([prompt], PARAMS)
    return a.export_blocks(a.block_hashes(prompt)[:num_blocks])


def cache_state(engine):
    return sorted(engine.cached_hashes()), engine.kv.num_free_blocks


def test_verify_block_passes_honest_blocks_and_catches_wrong_values_anywhere_in_the_run(demo_model):
    prompt = prompt_of(16 * 4 + 1, seed=50)
    blocks = exported_run(demo_model, prompt, 4)
    b = Engine(EngineConfig(model="demo", num_blocks=16), loaded=demo_model)
    assert b.import_blocks(blocks, cache_salt="") == 4
    for k in range(4):
        check = b.verify_block(prompt, "", k)
        assert check is not None and check.ok and check.block_index == k
        assert check.max_abs_diff <= check.tolerance / 100, check
    assert check.tolerance == pytest.approx(REL_TOLERANCE[demo_model.dtype] * check.scale)
    # Wrong values in block 0 only: block 3's K/V (layers 1 and up) read it through attention.
    for bad_block in (0, 2, 3):
        alter = wrong_values([bad_block])
        c = Engine(EngineConfig(model="demo", num_blocks=16), loaded=demo_model)
        assert c.import_blocks([alter(i, blk) for i, blk in enumerate(blocks)], cache_salt="") == 4
        before = cache_state(c)
        check = c.verify_block(prompt, "", 3)
        assert check is not None and not check.ok and check.block_index == 3
        assert check.rel_diff > 100 * REL_TOLERANCE[demo_model.dtype], check
        assert cache_state(c) == before  # verification never changes the cache
        c.check_integrity()
    # Nothing to verify (block 4 is not cached), or no free block for the scratch copy: None, nothing changed.
    assert b.verify_block(prompt + [0] * 15, "", 4) is None
    full = Engine(EngineConfig(model="demo", num_blocks=4), loaded=demo_model)
    assert full.import_blocks(blocks, cache_salt="") == 4
    before = cache_state(full)
    assert full.verify_block(prompt, "", 3) is None
    assert cache_state(full) == before
    full.check_integrity()


def test_verify_block_on_a_tiny_llama_checkpoint(tmp_path):
    from model_fixtures import build_tiny_checkpoint

    from workers.model import load_model

    loaded = load_model(build_tiny_checkpoint(tmp_path, "llama"))
    prompt = [(i * 7) % 300 + 3 for i in range(16 * 3 + 1)]
    blocks = exported_run(loaded, prompt, 3)
    b = Engine(EngineConfig(model="demo", num_blocks=16), loaded=loaded)
    assert b.import_blocks(blocks, cache_salt="") == 3
    check = b.verify_block(prompt, "", 2)
    assert check is not None and check.ok and check.max_abs_diff <= check.tolerance / 100, check
    c = Engine(EngineConfig(model="demo", num_blocks=16), loaded=loaded)
    alter = wrong_values([0])
    c.import_blocks([alter(i, blk) for i, blk in enumerate(blocks)], cache_salt="")
    check = c.verify_block(prompt, "", 2)
    assert check is not None and not check.ok, check


# ---- the fetcher: honest peers ------------------------------------------------------------------------------
def test_an_honest_peers_runs_verify_first_two_then_sampled(make_node, demo_model):
    a, b = make_node("A"), make_node("B", trust=TrustConfig(sample_key=KEY))
    prompts = [prompt_of(16 * 4 + 1, seed=60 + i) for i in range(3)]
    a.generate(prompts, PARAMS)
    assert a.flush()
    checks = []
    for prompt in prompts:
        out, fetch = generate(b, prompt)
        assert (fetch.outcome, fetch.num_blocks, out.cached_tokens) == (FetchOutcome.TRANSFERRED, 4, 64), fetch
        assert out.new_token_ids == cold_output(demo_model, prompt)
        checks.append(fetch.verification)
    # Fetches 0 and 1 from A are verified (block 3, the last of each run); fetch 2 is not drawn.
    assert [c.block_index if c else None for c in checks] == [3, 3, None]
    assert all(c.ok and c.max_abs_diff <= c.tolerance / 100 for c in checks[:2]), checks
    rec = b.node.trust.peer("A")
    assert rec is not None and (rec.num_fetches, rec.num_verifications, rec.num_failures) == (3, 2, 0)
    b.engine.check_integrity()


@pytest.fixture(scope="module")
def bf16_model():
    from workers.model import load_model

    return load_model("demo", "bfloat16")


def test_an_honest_bfloat16_peer_verifies(bf16_model, cache_service, valkey_module):
    from cache_service.embedded_redis import connect_sync

    connect_sync(valkey_module.url).flushall()
    nodes = [LocalCacheNode(Engine(EngineConfig(model="demo", num_blocks=64), loaded=bf16_model), name,
                            cache_address=cache_service.address, config=node_config(trust=TrustConfig(sample_key=KEY)))
             for name in ("A", "B")]
    try:
        a, b = (n.start() for n in nodes)
        prompt = prompt_of(16 * 6 + 3, seed=70)
        cold = Engine(EngineConfig(model="demo", num_blocks=64), loaded=bf16_model).generate([prompt], PARAMS)[0]
        a.generate([prompt], PARAMS)
        assert a.flush()
        out, fetch = generate(b, prompt)
        check = fetch.verification
        assert (fetch.outcome, out.cached_tokens, check.block_index) == (FetchOutcome.TRANSFERRED, 96, 5), fetch
        assert check.ok and check.max_abs_diff <= check.tolerance / 10, check
        assert check.tolerance == pytest.approx(REL_TOLERANCE[bf16_model.dtype] * check.scale)
        assert out.new_token_ids == cold.new_token_ids
    finally:
        for n in nodes:
            n.stop()


def test_fp8_kv_blocks_are_compared_dequantized(make_node, demo_model):
    """fp8 storage: an honest run verifies within one e4m3 rounding step, wrong values (scales untouched) fail."""
    a = make_node("A", kv_cache_dtype="fp8")
    b = make_node("B", kv_cache_dtype="fp8", trust=TrustConfig(sample_key=KEY))
    p1, p2 = prompt_of(16 * 4 + 1, seed=75), prompt_of(16 * 4 + 1, seed=76)
    a.generate([p1, p2], PARAMS)
    assert a.flush()
    out, fetch = generate(b, p1)
    check = fetch.verification
    assert (fetch.outcome, out.cached_tokens, check.block_index) == (FetchOutcome.TRANSFERRED, 64, 3), fetch
    assert check.ok and check.tolerance == pytest.approx(FP8_REL_TOLERANCE * check.scale), check
    assert out.new_token_ids == cold_output(demo_model, p1, kv_cache_dtype="fp8")
    a.faults.alter_export = wrong_values([3])
    out, fetch = generate(b, p2)
    assert (fetch.outcome, fetch.verification.ok) == (FetchOutcome.DROPPED, False), fetch
    assert (out.cached_tokens, out.new_token_ids) == (0, cold_output(demo_model, p2, kv_cache_dtype="fp8"))


# ---- the fetcher: a peer that sends wrong values --------------------------------------------------------
@pytest.mark.parametrize("raw_stream", [True, False], ids=["raw_stream", "grpc_stream"])
def test_wrong_values_with_valid_checksums_are_dropped_and_the_peer_quarantined(make_node, demo_model, raw_stream):
    a = make_node("A", raw_stream=raw_stream)
    b = make_node("B", raw_stream=raw_stream, trust=TrustConfig(sample_key=KEY, quarantine_s=QUARANTINE_S))
    clock = trusting(b, Clock(1000.0))
    p1, p2, p3 = (prompt_of(16 * 4 + 1, seed=80 + i) for i in range(3))
    a.generate([p1, p2, p3], PARAMS)
    assert a.flush()
    a.faults.alter_export = wrong_values()  # every block of every run: A's bug
    out, fetch = generate(b, p1)
    check = fetch.verification
    assert (fetch.outcome, fetch.num_blocks, fetch.num_tokens) == (FetchOutcome.DROPPED, 0, 0), fetch
    assert check is not None and not check.ok and check.block_index == 3
    assert check.max_abs_diff > 100 * check.tolerance, check
    assert fetch.quarantined_until == 1000.0 + QUARANTINE_S and "quarantined" in fetch.error
    # The imported blocks were gone before the request was added: it recomputed, exactly as cold.
    assert (out.cached_tokens, out.new_token_ids) == (0, cold_output(demo_model, p1))
    b.engine.check_integrity()
    # Quarantined: the next request does not even ask A.
    asked = a.node.servicer.stats.num_requests
    out, fetch = generate(b, p2)
    assert (fetch.outcome, fetch.quarantined_peers, fetch.verification) == (FetchOutcome.NO_PEER, ("A",), None)
    assert (out.cached_tokens, out.new_token_ids) == (0, cold_output(demo_model, p2))
    assert a.node.servicer.stats.num_requests == asked
    assert b.node.trust.quarantined() == ["A"]
    # Released after the quarantine: verified again first; A is still wrong, so twice as long now.
    clock.now = 1000.0 + QUARANTINE_S
    assert held(b, p3) == 0
    out, fetch = generate(b, p3)
    assert (fetch.outcome, fetch.verification.ok) == (FetchOutcome.DROPPED, False), fetch
    assert fetch.quarantined_until == clock.now + 2 * QUARANTINE_S
    assert out.new_token_ids == cold_output(demo_model, p3)
    # A's bug is fixed; once released, its first fetch is verified and kept.
    a.faults.alter_export = None
    clock.now += 2 * QUARANTINE_S
    p4 = prompt_of(16 * 4 + 1, seed=84)
    a.generate([p4], PARAMS)
    assert a.flush()
    out, fetch = generate(b, p4)
    assert (fetch.outcome, fetch.verification.ok, out.cached_tokens) == (FetchOutcome.TRANSFERRED, True, 64), fetch
    assert out.new_token_ids == cold_output(demo_model, p4)
    assert b.node.trust.peer("A").num_failures == 2
    b.engine.check_integrity()


def test_a_router_hint_naming_a_quarantined_peer_falls_back_to_the_index(make_node, demo_model):
    a, c = make_node("A"), make_node("C")
    b = make_node("B", trust=TrustConfig(sample_key=KEY))
    p1, p2 = prompt_of(16 * 3 + 1, seed=91), prompt_of(16 * 3 + 1, seed=92)
    a.generate([p1, p2], PARAMS)
    c.generate([p2], PARAMS)
    assert a.flush() and c.flush()
    a.faults.alter_export = wrong_values()
    hint = PeerHint("A", a.transfer_address, 3)
    fetch = b.fetch_prefix(p1, peer=hint, peer_known=True)
    assert (fetch.outcome, fetch.peer, fetch.verification.ok) == (FetchOutcome.DROPPED, "A", False), fetch
    # The router still names A (its view lags): B asks the index instead and pulls from C.
    fetch = b.fetch_prefix(p2, peer=hint, peer_known=True)
    assert (fetch.outcome, fetch.peer, fetch.quarantined_peers) == (FetchOutcome.TRANSFERRED, "C", ("A",)), fetch
    assert fetch.verification.ok  # C's first fetch
    out = b.call(lambda e: e.generate([p2], PARAMS))[0]
    assert (out.cached_tokens, out.new_token_ids) == (48, cold_output(demo_model, p2))


def test_wrong_values_in_block_0_of_a_4_block_run_are_caught(make_node, demo_model):
    a, b = make_node("A"), make_node("B", trust=TrustConfig(sample_key=KEY))
    prompt = prompt_of(16 * 4 + 1, seed=90)
    a.generate([prompt], PARAMS)
    assert a.flush()
    a.faults.alter_export = wrong_values([0])
    out, fetch = generate(b, prompt)
    assert (fetch.outcome, fetch.verification.block_index, fetch.verification.ok) == (FetchOutcome.DROPPED, 3, False)
    assert fetch.verification.max_abs_diff > 100 * fetch.verification.tolerance, fetch.verification
    assert (out.cached_tokens, out.new_token_ids) == (0, cold_output(demo_model, prompt))


def test_a_wrong_local_prefix_drops_the_chain_without_blaming_the_peer(make_node, demo_model):
    """B's first two blocks came, unverified, from C (a bad peer); A, honest, sends the rest. The mismatch
    is on B's side: the local prefix fails its own check, everything is dropped, A stays trusted."""
    a, c = make_node("A"), make_node("C")
    b = make_node("B", trust=TrustConfig(sample_key=KEY, verify_first=0, sample_every=0))
    prompt = prompt_of(16 * 4 + 1, seed=95)
    short = prompt[: 16 * 2 + 1]
    c.generate([short], PARAMS)
    assert c.flush()
    c.faults.alter_export = wrong_values()
    out, fetch = generate(b, short)  # trusted blindly: the wrong values are served
    assert (fetch.outcome, fetch.peer, fetch.verification) == (FetchOutcome.TRANSFERRED, "C", None)
    assert out.cached_tokens == 32
    assert out.new_token_ids != cold_output(demo_model, short)  # what unverified wrong values do
    a.generate([prompt], PARAMS)
    assert a.flush()
    b.node.trust.config.verify_first = 2  # from now on B checks
    out, fetch = generate(b, prompt)
    assert (fetch.outcome, fetch.peer, fetch.num_local_blocks) == (FetchOutcome.DROPPED, "A", 2), fetch
    assert "own prefix" in fetch.error and fetch.quarantined_until is None
    assert b.node.trust.may_fetch("A") and b.node.trust.peer("A") is None
    assert (out.cached_tokens, out.new_token_ids) == (0, cold_output(demo_model, prompt))
    b.engine.check_integrity()


def test_a_run_that_must_be_verified_and_cannot_be_is_not_kept(make_node, demo_model):
    """Under pressure (a running request holds half the pool) the import fills every free block and leaves
    none for the recomputation: the run is dropped, nothing is recorded against the peer."""
    a, b = make_node("A"), make_node("B", num_blocks=6, trust=TrustConfig(sample_key=KEY))
    prompt = prompt_of(16 * 4 + 1, seed=97)
    a.generate([prompt], PARAMS)
    assert a.flush()
    other = prompt_of(16 * 2 + 1, seed=98)
    b.call(lambda e: e.add_request("other", other, PARAMS))
    b.step()  # "other" now holds 3 blocks (2 full + its tail)
    fetch = b.fetch_prefix(prompt)
    assert (fetch.outcome, fetch.verification, fetch.num_blocks) == (FetchOutcome.DROPPED, None, 0), fetch
    assert "could not be verified now (no block free for the recomputation)" in fetch.error
    assert held(b, prompt) == 0 and b.node.trust.peer("A") is None
    out = b.call(lambda e: e.generate([prompt], PARAMS))[0]
    assert (out.cached_tokens, out.new_token_ids) == (0, cold_output(demo_model, prompt))
    b.engine.check_integrity()


# ---- reporting ------------------------------------------------------------------------------------------------
def test_worker_counters_and_metrics_report_verifications_and_quarantines():
    c = WorkerCounters()
    c.observe_verification(verified=True, failed=False, quarantined=False, skipped=False)
    c.observe_verification(verified=True, failed=True, quarantined=True, skipped=False)
    c.observe_verification(verified=False, failed=False, quarantined=False, skipped=True)
    assert (c.num_verifications, c.num_verification_failures, c.num_quarantines, c.num_quarantine_skips) == (2, 1, 1, 1)
    registry = CollectorRegistry()
    worker = SimpleNamespace(worker_id="worker-1", live=True, load=WorkerLoad(), counters=c)
    registry.register(_WorkerCollector(lambda: [worker]))
    text = generate_latest(registry).decode()
    for line in ('prefixcache_block_verifications_total{outcome="ok",worker="worker-1"} 1.0',
                 'prefixcache_block_verifications_total{outcome="failed",worker="worker-1"} 1.0',
                 'prefixcache_peer_quarantines_total{worker="worker-1"} 1.0',
                 'prefixcache_quarantine_skips_total{worker="worker-1"} 1.0'):
        assert line in text.splitlines(), text
