"""loadgen/workloads.py: the standard workloads and the Mooncake trace reader."""

import json
from pathlib import Path

import numpy as np
import pytest

from loadgen.workloads import (
    WorkloadError,
    expand_mooncake_tokens,
    llmd_shared_prefix,
    load_mooncake,
    make_workload,
    mooncake_requests,
    multi_turn,
    prefix_repetition,
    sgl_shared_prefix,
)
from cache_service.block_hash import hash_prompt_blocks

MOONCAKE_DIR = Path(__file__).resolve().parents[2] / "shared" / "workloads" / "mooncake"


# ---- Mooncake ---------------------------------------------------------------------------


def test_expand_mooncake_tokens_equal_ids_give_equal_tokens():
    a = expand_mooncake_tokens([0, 1, 2], 1300)
    b = expand_mooncake_tokens([0, 1, 7, 8], 1600)
    assert len(a) == 1300 and len(b) == 1600
    assert a[:1024] == b[:1024]
    assert a[1024:1300] != b[1024:1300]
    # per-id tokens do not depend on the position or on the other ids
    assert expand_mooncake_tokens([7], 512) == b[1024:1536]
    assert expand_mooncake_tokens([0, 1, 2], 1300) == a
    # so the canonical block hashes agree exactly on the shared prefix
    ha = hash_prompt_blocks(expand_mooncake_tokens([0, 1, 2], 1536), 512, "m")
    hb = hash_prompt_blocks(b, 512, "m")
    assert len(ha) == len(hb) == 3 and ha[:2] == hb[:2] and ha[2] != hb[2]


def test_expand_mooncake_tokens_respects_the_vocabulary():
    toks = expand_mooncake_tokens(list(range(10)), 5000, vocab_size=260, first_token_id=4)
    assert min(toks) >= 4 and max(toks) < 260
    assert len(set(toks)) == 256  # uses the whole range
    assert expand_mooncake_tokens([3], 16, block_size=16, seed=1) != expand_mooncake_tokens([3], 16, block_size=16)
    with pytest.raises(WorkloadError, match="cannot describe"):
        expand_mooncake_tokens([0, 1], 1500)
    with pytest.raises(WorkloadError, match="first_token_id"):
        expand_mooncake_tokens([0], 10, vocab_size=4, first_token_id=4)


def _write(tmp_path, lines):
    p = tmp_path / "trace.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


def test_load_mooncake_parses_and_limits(tmp_path):
    p = _write(tmp_path, [
        json.dumps({"timestamp": 0, "input_length": 600, "output_length": 5, "hash_ids": [0, 1]}),
        "",
        json.dumps({"timestamp": 1500, "input_length": 100, "output_length": 1, "hash_ids": [0]}),
    ])
    recs = load_mooncake(p)
    assert [(r.timestamp_ms, r.input_length, r.output_length, r.hash_ids) for r in recs] == [
        (0, 600, 5, (0, 1)), (1500, 100, 1, (0,))]
    assert len(load_mooncake(p, limit=1)) == 1
    reqs = mooncake_requests(recs, time_scale=0.5)
    assert [(r.request_id, r.arrival_s, r.num_prompt_tokens, r.block_ids, r.output_len) for r in reqs] == [
        ("mc-0", 0.0, 600, (0, 1), 5), ("mc-1", 0.75, 100, (0,), 1)]
    assert reqs[0].token_ids(vocab_size=100)[:512] == reqs[1].token_ids(vocab_size=100)[:100] + reqs[0].token_ids(
        vocab_size=100)[100:512]


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "not JSON"),
        ('{"timestamp": 0, "input_length": 10, "output_length": 1}', "missing 'hash_ids'"),
        ('{"timestamp": 0, "input_length": 600, "output_length": 1, "hash_ids": [1]}', "expected 2"),
        ('{"timestamp": 0, "input_length": 10, "output_length": 1, "hash_ids": [-1]}', "non-negative"),
        ('{"timestamp": "0", "input_length": 10, "output_length": 1, "hash_ids": [1]}', "integers"),
        ('[1, 2]', "JSON object"),
    ],
)
def test_load_mooncake_names_the_bad_line(tmp_path, line, message):
    good = json.dumps({"timestamp": 0, "input_length": 10, "output_length": 1, "hash_ids": [0]})
    p = _write(tmp_path, [good, line])
    with pytest.raises(WorkloadError, match=message) as info:
        load_mooncake(p)
    assert "trace.jsonl:2" in str(info.value)


def test_load_mooncake_rejects_time_going_backwards(tmp_path):
    p = _write(tmp_path, [
        json.dumps({"timestamp": 5, "input_length": 10, "output_length": 1, "hash_ids": [0]}),
        json.dumps({"timestamp": 4, "input_length": 10, "output_length": 1, "hash_ids": [1]}),
    ])
    with pytest.raises(WorkloadError, match="backwards"):
        load_mooncake(p)


@pytest.mark.skipif(not MOONCAKE_DIR.exists(), reason="needs ../shared/workloads/mooncake beside the repo")
def test_load_the_real_traces():
    recs = load_mooncake(MOONCAKE_DIR / "conversation_trace.jsonl", limit=100)
    assert len(recs) == 100
    assert recs[0] == (0, 6758, 500, tuple(range(14)))
    assert len(load_mooncake(MOONCAKE_DIR / "synthetic_trace.jsonl")) == 3993


# ---- synthetic workloads -------------------------------------------------------------------


def test_sgl_shared_prefix_groups_share_their_system_prompt():
    reqs = sgl_shared_prefix(num_groups=4, prompts_per_group=3, system_prompt_len=32, question_len=8, output_len=5)
    assert len(reqs) == 12
    assert all(len(r.prompt_token_ids) == 40 and r.output_len == 5 for r in reqs)
    by_group = {}
    for r in reqs:
        by_group.setdefault(r.group, set()).add(tuple(r.prompt_token_ids[:32]))
    assert sorted(by_group) == [0, 1, 2, 3] and all(len(s) == 1 for s in by_group.values())
    assert len({next(iter(s)) for s in by_group.values()}) == 4
    assert [r.group for r in reqs] != sorted(r.group for r in reqs)  # shuffled
    assert all(r.arrival_s == 0.0 for r in reqs)
    again = sgl_shared_prefix(num_groups=4, prompts_per_group=3, system_prompt_len=32, question_len=8, output_len=5)
    assert [(r.request_id, r.prompt_token_ids) for r in again] == [(r.request_id, r.prompt_token_ids) for r in reqs]
    other = sgl_shared_prefix(num_groups=4, prompts_per_group=3, system_prompt_len=32, question_len=8, seed=1)
    assert [r.prompt_token_ids for r in other] != [r.prompt_token_ids for r in reqs]


def test_sgl_shared_prefix_defaults_and_small_vocab():
    reqs = sgl_shared_prefix(vocab_size=260, first_token_id=4, request_rate=10.0)
    assert len(reqs) == 64 * 16 and {len(r.prompt_token_ids) for r in reqs} == {2048 + 128}
    toks = np.array([t for r in reqs[:50] for t in r.prompt_token_ids])
    assert toks.min() >= 4 and toks.max() < 260
    arrivals = [r.arrival_s for r in reqs]
    assert arrivals == sorted(arrivals) and 80 < arrivals[-1] < 125  # 1024 requests at ~10/s


def test_prefix_repetition():
    reqs = prefix_repetition(num_prompts=20, prefix_len=16, suffix_len=8, num_prefixes=4, output_len=3)
    assert len(reqs) == 20 and all(len(r.prompt_token_ids) == 24 for r in reqs)
    prefixes = {}
    for r in reqs:
        prefixes.setdefault(r.group, set()).add(tuple(r.prompt_token_ids[:16]))
    assert {g: len(s) for g, s in prefixes.items()} == {0: 1, 1: 1, 2: 1, 3: 1}
    assert [sum(r.group == g for r in reqs) for g in range(4)] == [5, 5, 5, 5]
    assert len({tuple(r.prompt_token_ids[16:]) for r in reqs}) == 20
    with pytest.raises(WorkloadError):
        prefix_repetition(num_prompts=2, num_prefixes=4)


def test_llmd_shared_prefix_ramps_its_rate():
    reqs = llmd_shared_prefix(system_prompt_len=64, question_len=16, output_len=8)
    assert len(reqs) == 750 and all(len(r.prompt_token_ids) == 80 for r in reqs)
    t = np.array([r.arrival_s for r in reqs])
    assert np.all(np.diff(t) >= 0)
    gaps = np.diff(t)
    assert gaps[:100].mean() > 5 * gaps[-100:].mean()  # 3/s at the start, 60/s at the end
    assert reqs[0].request_id.startswith("llmd-")


def test_multi_turn_prompts_extend_the_previous_turn():
    reqs = multi_turn(num_sessions=3, num_turns=4, system_prompt_len=10, user_len=3, answer_len=5)
    assert len(reqs) == 12
    assert [r.arrival_s for r in reqs] == sorted(r.arrival_s for r in reqs)
    for s in range(3):
        turns = sorted((r for r in reqs if r.session_id == f"session-{s}"), key=lambda r: r.request_id)
        assert [len(t.prompt_token_ids) for t in turns] == [13, 21, 29, 37]
        for prev, cur in zip(turns, turns[1:]):
            assert cur.prompt_token_ids[: len(prev.prompt_token_ids)] == prev.prompt_token_ids
            assert cur.arrival_s == pytest.approx(prev.arrival_s + 10.0)
    firsts = {tuple(r.prompt_token_ids[:10]) for r in reqs}
    assert len(firsts) == 1  # one shared system prompt


def test_make_workload_by_name():
    assert len(make_workload("multi-turn", num_sessions=2, num_turns=2)) == 4
    with pytest.raises(WorkloadError, match="unknown workload"):
        make_workload("sharegpt")
