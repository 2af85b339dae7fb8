"""simulator: event order and accounting on hand-made traces with known answers."""

import json
from pathlib import Path

import pytest

from deploy.cli import main as cli_main
from loadgen.workloads import load_mooncake, mooncake_requests, multi_turn, sgl_shared_prefix
from simulator import SimConfig, SimRequest, Simulator, TimeModel, from_workload, replicate, simulate
from simulator.cluster import unbounded_capacity_blocks

MOONCAKE_DIR = Path(__file__).resolve().parents[2] / "shared" / "workloads" / "mooncake"

# prefill 1 ms/token, decode 0.1 s/step, no KV-read term, transfer 0.1 s per 4-token block + 10 ms
SIMPLE = TimeModel(prefill_tps=1000, prefill_overhead_ms=0, decode_tps=10, kv_bytes_per_token=1000,
                   hbm_gbs=1e9, transfer_gbps=3.2e-4, transfer_latency_ms=10)


def reqs(*specs):
    """(arrival_s, ids, prompt_tokens, output_len) ... -> SimRequests in arrival order."""
    out = [SimRequest(i, t, n, o, block_ids=ids) for i, (t, ids, n, o) in enumerate(specs)]
    assert [r.arrival_s for r in out] == sorted(r.arrival_s for r in out)
    return out


def sim(requests, *, nodes=1, capacity=400, policy="cache_aware", transfer=False, tm=SIMPLE, pending=False,
        **weights):
    cfg = SimConfig(num_nodes=nodes, capacity_tokens=capacity, block_size=4, policy=policy, transfer=transfer,
                    time_model=tm, weights=weights, pending=pending)
    blocks = unbounded_capacity_blocks(requests, 4) if capacity is None else capacity // 4
    s = Simulator(cfg, blocks)
    return s, s.run(requests).summary()


def test_hits_ttft_and_fifo_prefill_on_one_node():
    r = reqs((0.0, (1, 2, 3), 12, 1), (0.0, (1, 2, 5), 10, 3), (1.0, (1, 2, 5), 10, 1))
    s, out = sim(r)
    assert [(q.num_local_hit_blocks, q.num_computed_tokens) for q in r] == [(0, 12), (2, 2), (3, 1)]
    # r1 waits for r0's prefill (FIFO), then computes 2 tokens; r2 has every block and computes 1 token
    assert [q.ttft_s for q in r] == pytest.approx([0.012, 0.014, 0.001])
    assert [q.finish_s for q in r] == pytest.approx([0.012, 0.214, 1.001])
    assert out["block_hit_rate"] == round(5 / 9, 6)
    assert out["token_hit_rate"] == round(18 / 32, 6)
    # r1 was routed before r0's blocks were cached: predicted 0, realised 2
    assert out["prediction_exact_rate"] == round(2 / 3, 6)
    assert (out["requests"], out["rejected"], out["transferred_blocks"], out["load_imbalance"]) == (3, 0, 0, 1.0)
    s.nodes[0].pool.check_integrity()
    assert s.nodes[0].pool.num_used_blocks == 0


def test_decode_is_batched_and_slows_with_the_batch_context():
    # each KV token adds 10 ms to a step: a 15-token sequence steps in 0.25 s
    tm = TimeModel(prefill_tps=1000, prefill_overhead_ms=0, decode_tps=10, kv_bytes_per_token=1, hbm_gbs=1e-7)
    r = reqs((0.0, (1,), 4, 11), (1.0, (2,), 4, 6))
    sim(r, tm=tm)
    # r0 decodes alone at 0.25 s/token until r1 joins at 1.004 (4 tokens done); then both at 0.35 s/step:
    # r1 needs 5 steps -> 2.754; r0's last token alone again at 0.25 s -> 3.004
    assert r[1].first_token_s == pytest.approx(1.004)
    assert r[1].finish_s == pytest.approx(2.754)
    assert r[0].finish_s == pytest.approx(3.004)


def test_transfer_from_a_busy_holder_to_an_idle_node():
    r = reqs((0.0, (1, 2, 3, 4), 16, 101), (1.0, (1, 2, 3, 4, 5), 20, 1))
    s, out = sim(r, nodes=2, transfer=True, decode_load_weight=1.0, transfer_cost_ratio=0.2)
    x, y = r[0].node, r[1].node
    assert x != y and r[1].transfer_from == x
    # at x: (5 - 4) + 1.0 * 30 active blocks = 31; at y: (5 - 4) + 0.2 * 4 = 1.8
    assert (r[1].num_local_hit_blocks, r[1].num_transferred_blocks, r[1].num_computed_tokens) == (0, 4, 4)
    assert r[1].ttft_s == pytest.approx(0.01 + 4 * 0.1 + 0.004)
    assert (out["transferred_blocks"], out["transfers"], out["block_hit_rate"]) == (4, 1, round(4 / 9, 6))
    assert out["local_block_hit_rate"] == 0.0
    h = r[1].hashes() if r[1].block_hashes is not None else [i.to_bytes(16, "little") for i in (1, 2, 3, 4, 5)]
    assert s.index.holders[h[0]] == {x, y} and s.index.holders[h[4]] == {y}


def test_no_transfer_when_off():
    r = reqs((0.0, (1, 2, 3, 4), 16, 101), (1.0, (1, 2, 3, 4, 5), 20, 1))
    _, out = sim(r, nodes=2, transfer=False, decode_load_weight=1.0)
    assert r[1].node != r[0].node and r[1].num_hit_blocks == 0 and out["transferred_blocks"] == 0


@pytest.mark.parametrize("pending", [False, True])
def test_pending_view_gives_a_burst_affinity(pending):
    # r1 arrives while r0 is still computing the shared prefix: only the router's own
    # record of where it sent r0 (pending) can tell it where those blocks will be
    r = reqs((0.0, (1, 2, 3, 4), 16, 1), (0.0, (1, 2, 3, 4, 5), 20, 1))
    s, out = sim(r, nodes=2, pending=pending, queue_weight=0.5)
    if pending:
        # at r0's node: (5 - 4) + 0.5 * 4 queued + 0.1 * 4 active = 3.4 < 5 elsewhere
        assert r[1].node == r[0].node and r[1].predicted_cached_blocks == 4 and r[1].num_local_hit_blocks == 4
        assert r[1].ttft_s == pytest.approx(0.016 + 0.004)
    else:
        assert r[1].node != r[0].node and r[1].num_local_hit_blocks == 0
    assert s.index.pending == {}
    assert s.index.num_entries == sum(len(v) for v in s.index.holders.values()) == (5 if pending else 9)


def test_lru_eviction_in_the_pool_and_the_index():
    # 3 blocks: r1 evicts block 2 (freed before block 1, so nearer the LRU head); r2 hits block 1 only
    r = reqs((0.0, (1, 2), 7, 1), (1.0, (3, 4), 7, 1), (2.0, (1, 2), 7, 1))
    s, out = sim(r, capacity=12)
    assert [q.num_local_hit_blocks for q in r] == [0, 0, 1]
    held = {int.from_bytes(h, "little") for h in s.nodes[0].pool.cached}
    assert held == {1, 2, 3}
    assert {int.from_bytes(h, "little") for h in s.index.holders} == {1, 2, 3}
    assert out["block_hit_rate"] == round(1 / 6, 6)


def test_a_request_waits_for_memory_then_runs():
    # r0 holds all 3 blocks (1 prompt + 2 for its output) until 0.404; r1 needs 2
    r = reqs((0.0, (1,), 4, 5), (0.1, (2,), 4, 1))
    sim(r, capacity=12)
    assert r[0].finish_s == pytest.approx(0.404)
    assert r[1].prefill_start_s == pytest.approx(0.404)
    assert r[1].ttft_s == pytest.approx(0.308)


def test_a_request_larger_than_a_node_is_rejected():
    r = reqs((0.0, (1, 2, 3), 12, 1), (0.5, (1,), 4, 1))
    _, out = sim(r, capacity=8)
    assert (out["requests"], out["rejected"], out["blocks"]) == (2, 1, 1)
    assert r[0].rejected and r[1].first_token_s == pytest.approx(0.504)


def test_global_is_one_pool_shared_by_every_node():
    r = reqs((0.0, (1, 2), 8, 101), (1.0, (1, 2, 3), 12, 1))
    s, out = sim(r, nodes=2, policy="global")
    assert r[0].node != r[1].node  # least loaded
    assert r[1].num_local_hit_blocks == 2 and out["transferred_blocks"] == 0
    assert s.nodes[0].pool is s.nodes[1].pool and s.nodes[0].pool.num_blocks == 200


def test_token_workloads_hash_full_blocks():
    work = sgl_shared_prefix(num_groups=2, prompts_per_group=3, system_prompt_len=8, question_len=6, output_len=2)
    r = from_workload(work, 4)
    assert all(q.num_blocks == 3 and q.num_prompt_tokens == 14 for q in r)  # 14 tokens: 3 full blocks
    _, out = sim(r, capacity=None)
    # per group: the first computes 3 blocks, the next two hit the 2 system-prompt blocks
    assert (out["blocks"], out["hit_blocks"]) == (18, 8)
    assert out["token_hit_rate"] == round(8 * 4 / (6 * 14), 6)


def test_sessions_stay_on_one_node():
    work = multi_turn(num_sessions=6, num_turns=3, system_prompt_len=16, user_len=4, answer_len=4)
    r = from_workload(work, 4)
    sim(r, nodes=3, policy="session", capacity=None)
    homes = {}
    for q in r:
        homes.setdefault(q.session_id, set()).add(q.node)
    assert all(len(nodes) == 1 for nodes in homes.values())


def test_replicate_tiles_with_disjoint_ids():
    base = reqs((0.0, (0, 1), 8, 1), (1.0, (0, 2), 8, 1), (2.0, (0, 3), 8, 1))
    tiled = list(replicate(base, 2))
    assert len(tiled) == 6 and [q.index for q in tiled] == list(range(6))
    assert [q.arrival_s for q in tiled] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
    assert {q.hashes()[0] for q in tiled} == {(0).to_bytes(16, "little"), (4).to_bytes(16, "little")}
    _, out = sim(tiled, capacity=None)
    assert out["hit_blocks"] == 4  # block 0 of each copy, after its first request


def test_results_are_deterministic():
    def run():
        r = reqs(*[(0.1 * i, (i % 3, 10 + i), 8, 3) for i in range(30)])
        out = sim(r, nodes=3, transfer=True, transfer_cost_ratio=0.2)[1]
        return {k: v for k, v in out.items() if k not in ("elapsed_s", "cpu_s")}

    assert run() == run()


def test_cli_writes_json_and_plot(tmp_path):
    trace = tmp_path / "t.jsonl"
    lines = [{"timestamp": 100 * i, "input_length": 1000, "output_length": 10, "hash_ids": [0, 1 + i]}
             for i in range(20)]
    trace.write_text("\n".join(json.dumps(x) for x in lines))
    out, png = tmp_path / "out.json", tmp_path / "out.png"
    rc = cli_main(["simulate", "--trace", str(trace), "--nodes", "2", "--capacity-tokens", "inf",
                   "--policy", "cache_aware", "--transfer", "on", "--json", str(out), "--plot", str(png)])
    assert rc == 0 and png.stat().st_size > 0
    res = json.loads(out.read_text())
    for key in ("block_hit_rate", "token_hit_rate", "load_imbalance", "ttft_p50_s", "ttft_p99_s",
                "transferred_blocks", "requests", "elapsed_s", "sim_duration_s", "config"):
        assert key in res
    assert res["requests"] == 20 and res["block_hit_rate"] == round(19 / 40, 6)
    assert res["config"]["capacity_tokens"] == "inf" and res["config"]["num_nodes"] == 2


def test_cli_errors_are_clear(tmp_path, capsys):
    assert cli_main(["simulate", "--trace", str(tmp_path / "nope.jsonl")]) == 2
    assert "no such trace file or workload" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["simulate", "--trace", "x", "--capacity-tokens", "lots"])


@pytest.mark.skipif(not MOONCAKE_DIR.exists(), reason="needs ../shared/workloads/mooncake beside the repo")
def test_conversation_trace_unbounded_hit_rate_is_the_published_one():
    records = load_mooncake(MOONCAKE_DIR / "conversation_trace.jsonl")
    r = from_workload(mooncake_requests(records), 512)
    out = simulate(SimConfig(num_nodes=1, capacity_tokens=None), r).summary()
    # 182,790 unique blocks, 288,500 references: 105,710 references to an id seen before = 36.64%
    assert (out["requests"], out["blocks"], out["hit_blocks"]) == (12031, 288_500, 105_710)
    assert out["block_hit_rate"] == round(105_710 / 288_500, 6) == 0.366412
