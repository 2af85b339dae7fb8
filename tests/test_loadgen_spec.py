"""loadgen/spec.py: the standard workloads scaled for a live stack (pure, no stack)."""

from __future__ import annotations

import pytest

from loadgen.spec import WorkloadSpec, build_requests
from loadgen.workloads import default_workloads_dir, load_mooncake

BLOCK_SIZE = 16


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
