"""`prefixcache bench`: workload scaling (no stack), then real runs against a small `prefixcache serve` stack."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deploy import cli
from deploy.bench_report import summarize
from deploy.bench_workloads import WorkloadSpec, build_requests, default_workloads_dir
from stack_process import free_port, prefixcache_cmd, process_env, start_session, stop_session, wait_for_stack

BLOCK_SIZE = 16
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---- workloads, scaled (pure) ------------------------------------------------------------------------
def test_sgl_shared_prefix_is_scaled_and_sized_by_request_count():
    reqs, params = build_requests(WorkloadSpec("sgl-shared-prefix", num_requests=12, scale=1 / 32,
                                               params={"prompts_per_group": 4}))
    assert (params["num_groups"], params["system_prompt_len"], params["question_len"], params["output_len"]) == \
        (3, 64, 4, 8)
    assert len(reqs) == 12 and all(len(r.token_ids) == 68 and r.max_tokens == 8 for r in reqs)
    assert all(r.arrival_s is None and r.follows is None for r in reqs)  # closed loop
    assert all(0 <= t < 256 for r in reqs for t in r.token_ids)  # the demo model's byte range
    by_group: dict[str, set] = {}
    for r in reqs:
        by_group.setdefault(r.group, set()).add(tuple(r.token_ids[:64]))
    assert sorted(len(v) for v in by_group.values()) == [1, 1, 1]  # one system prompt per group
    assert len({next(iter(v)) for v in by_group.values()}) == 3


def test_prefix_repetition_gives_exactly_the_requested_count():
    for n, num_prefixes in ((3, 3), (12, 9), (40, 10)):
        reqs, params = build_requests(WorkloadSpec("prefix-repetition", num_requests=n, scale=0.125))
        assert (len(reqs), len({r.group for r in reqs})) == (n, num_prefixes)
        assert params["prefix_len"] == params["suffix_len"] == 32 and all(len(r.token_ids) == 64 for r in reqs)


def test_multi_turn_sends_only_the_new_message_after_the_first_turn():
    reqs, params = build_requests(WorkloadSpec("multi-turn", num_requests=6, scale=1 / 16, time_scale=0.01,
                                               params={"num_turns": 3}))
    assert params["num_sessions"] == 2 and len(reqs) == 6
    user_len, system_len = params["user_len"], params["system_prompt_len"]
    for r in reqs:
        turn = int(r.request_id.rsplit("-", 1)[1])
        if turn == 0:
            assert r.follows is None and len(r.token_ids) == system_len + user_len
        else:
            assert r.follows == r.request_id.rsplit("-", 1)[0] + f"-{turn - 1}" and len(r.token_ids) == user_len
        assert r.session_id and r.arrival_s is not None


def test_mooncake_blocks_become_prefixcache_blocks_at_scale_1_32():
    if not (default_workloads_dir() / "mooncake" / "conversation_trace.jsonl").is_file():
        pytest.skip("../shared/workloads is not beside the repository")
    reqs, params = build_requests(WorkloadSpec("mooncake-conversation", num_requests=50, scale=1 / 32))
    assert params["tokens_per_hash_id"] == BLOCK_SIZE and len(reqs) == 50
    from benchmarks.workloads import load_mooncake

    records = load_mooncake(params["trace"], limit=50)
    # Equal leading hash ids <=> equal leading 16-token blocks.
    for a, b in [(0, i) for i in range(1, 50)]:
        ra, rb = records[a], records[b]
        shared = next((k for k, (x, y) in enumerate(zip(ra.hash_ids, rb.hash_ids)) if x != y),
                      min(len(ra.hash_ids), len(rb.hash_ids)))
        ta, tb = reqs[a].token_ids, reqs[b].token_ids
        n_full = min(shared, len(ta) // BLOCK_SIZE, len(tb) // BLOCK_SIZE)
        assert ta[: n_full * BLOCK_SIZE] == tb[: n_full * BLOCK_SIZE]
        if shared < min(len(ta), len(tb)) // BLOCK_SIZE:
            s = shared * BLOCK_SIZE
            assert ta[s: s + BLOCK_SIZE] != tb[s: s + BLOCK_SIZE]
    # Timestamps are honoured relative to the first request.
    assert reqs[0].arrival_s == 0.0
    assert [r.arrival_s for r in reqs] == [(rec.timestamp_ms - records[0].timestamp_ms) / 1000 for rec in records]


def test_summary_counts_tokens_and_percentiles():
    rows = [dict(request_id=str(i), group="0", tenant="", start_s=float(i), ttft_s=0.1 * (i + 1), latency_s=1.0,
                 prompt_tokens=100, completion_tokens=10, cached_tokens=50 * (i % 2), predicted_cached_tokens=50,
                 transferred_tokens=0, worker=f"worker-{i % 2}", finish_reason="length", itl_s=0.01, queue_s=0.0,
                 error=None) for i in range(4)]
    rows.append(dict(rows[0], request_id="x", error="UNAVAILABLE: gone"))
    s = summarize(rows, wall_s=2.0)
    assert (s["num_ok"], s["num_errors"], s["errors"]) == (4, 1, {"UNAVAILABLE": 1})
    assert (s["prompt_tokens"], s["cached_tokens"], s["hit_rate"], s["prediction_accuracy"]) == (400, 100, 0.25, 0.5)
    assert s["ttft_s"]["p50"] == pytest.approx(0.2) and s["ttft_s"]["p99"] == pytest.approx(0.4)
    assert s["per_worker"]["worker-1"]["hit_rate"] == 0.5 and s["per_worker"]["worker-0"]["hit_rate"] == 0.0
    assert s["requests_per_s"] == 2.0


def test_bad_arguments_are_clear_errors(tmp_path, capsys):
    assert cli.main(["bench", "--workload", "sgl-shared-prefix"]) == 2
    assert "--target and --workload are required" in capsys.readouterr().err
    assert cli.main(["bench", "--target", "127.0.0.1:1", "--workload", "sgl-shared-prefix",
                     "--param", "no_such=1", "--out", str(tmp_path)]) == 2
    assert "has no parameter 'no_such'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["bench", "--target", "nohostport", "--workload", "sgl-shared-prefix"])


# ---- against a running stack -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench_stack")
    port, metrics_port, cs_port = free_port(), free_port(), free_port()
    log = tmp / "serve.log"
    proc = start_session(prefixcache_cmd("serve", "--workers", "2", "--model", "demo", "--port", str(port),
                                         "--metrics-port", str(metrics_port), "--cache-service-port", str(cs_port),
                                         "--num-blocks", "256"), log, env=process_env(local_ray=True))
    try:
        wait_for_stack(proc, port, metrics_port, log)
        yield f"127.0.0.1:{port}"
    finally:
        stop_session(proc)


def _bench(out: Path, *args: str) -> dict:
    assert cli.main(["bench", "--no-progress", "--out", str(out), *args]) == 0
    label = args[args.index("--policy-label") + 1]
    assert (out / f"{label}_timeline.png").read_bytes()[:8] == _PNG_MAGIC
    return json.loads((out / f"{label}.json").read_text())


@pytest.mark.timeout(180)
def test_bench_shared_prefix_against_a_stack_hits_and_plots(stack, tmp_path):
    result = _bench(tmp_path, "--target", stack, "--workload", "sgl-shared-prefix", "--requests", "12",
                    "--scale", str(1 / 32), "--param", "prompts_per_group=4", "--concurrency", "4",
                    "--policy-label", "cache_aware")
    s, rows = result["summary"], result["requests"]
    assert (s["num_requests"], s["num_ok"]) == (12, 12), s["errors"]
    assert all(r["prompt_tokens"] == 68 and r["completion_tokens"] == 8 and r["finish_reason"] == "length"
               and r["worker"] in ("worker-0", "worker-1") and r["ttft_s"] > 0 for r in rows)
    # 3 groups x 4 questions sharing a 64-token (4-block) system prompt: at most the first request of a group
    # on each worker misses it, so at least 12 - 3*2 requests hit all 4 blocks.
    assert sum(r["cached_tokens"] >= 64 for r in rows) >= 6
    assert s["hit_rate"] == sum(r["cached_tokens"] for r in rows) / (12 * 68)
    assert result["meta"]["params"]["system_prompt_len"] == 64

    # A second run under another label, then the side-by-side comparison plot.
    _bench(tmp_path, "--target", stack, "--workload", "sgl-shared-prefix", "--requests", "4", "--scale",
           str(1 / 32), "--param", "prompts_per_group=4", "--policy-label", "again")
    assert cli.main(["bench", "--compare", str(tmp_path / "cache_aware.json"), str(tmp_path / "again.json"),
                     "--out", str(tmp_path)]) == 0
    png = tmp_path / "compare_sgl-shared-prefix.png"
    assert png.read_bytes()[:8] == _PNG_MAGIC and png.stat().st_size < 200_000


@pytest.mark.timeout(180)
def test_bench_multi_turn_feeds_real_answers_back(stack, tmp_path):
    result = _bench(tmp_path, "--target", stack, "--workload", "multi-turn", "--requests", "6", "--scale",
                    str(1 / 16), "--time-scale", "0.01", "--param", "num_turns=3", "--policy-label", "chat")
    params = result["meta"]["params"]
    rows = {r["request_id"].split("-", 1)[1]: r for r in result["requests"]}
    assert result["summary"]["num_ok"] == 6
    for s in range(2):
        for k in (1, 2):
            prev, cur = rows[f"chat-{s}-{k - 1}"], rows[f"chat-{s}-{k}"]
            # Turn k = turn k-1 prompt + the answer actually generated + the new user message.
            assert cur["prompt_tokens"] == prev["prompt_tokens"] + prev["completion_tokens"] + params["user_len"]
            assert prev["completion_tokens"] == params["answer_len"]
            # The previous prompt's full blocks are reused (the session's history is cached).
            assert cur["cached_tokens"] >= prev["prompt_tokens"] // BLOCK_SIZE * BLOCK_SIZE, (prev, cur)
