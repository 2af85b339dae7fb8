"""`prefixcache bench` (loadgen/cli.py): argument errors, then real runs against a small `prefixcache serve` stack."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deploy import cli
from stack_process import free_port, prefixcache_cmd, process_env, start_session, stop_session, wait_for_stack

BLOCK_SIZE = 16
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


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
