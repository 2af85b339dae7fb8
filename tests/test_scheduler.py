"""Scheduler + KV manager without a model: budgets, chunked prefill, prefix hits, preemption order, failure.

``advance`` plays the engine's part after a forward: ``Scheduler.commit`` (the scheduled tokens become
computed, full blocks are cached), then each sequence whose tokens are all computed gets one new (made-up)
token.
"""

from __future__ import annotations

from workers.block_pool import BlockPool
from workers.kv_manager import KVManager
from cache_service.records import SamplingParams
from workers.scheduler import Scheduler
from workers.sequence import Sequence, SequenceStatus

BS = 4


def make(num_blocks=16, max_num_seqs=8, max_tokens=8):
    pool = BlockPool(num_blocks, BS)
    kv = KVManager(pool, "m")
    return pool, kv, Scheduler(kv, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_tokens)


def seq(rid: str, prompt: list[int]) -> Sequence:
    return Sequence(rid, list(prompt), len(prompt), SamplingParams(max_tokens=100))


def advance(sched: Scheduler, out) -> dict[str, int]:
    plan = {entry.seq.request_id: entry.num_new_tokens for entry in out.scheduled}
    for _, s in sched.commit(out.scheduled):
        s.token_ids.append(900 + s.num_tokens)
    return plan


def finish(sched: Scheduler, s: Sequence) -> None:
    sched.remove(s)
    s.status = SequenceStatus.FINISHED


def test_token_budget_chunked_prefill_and_decodes_first():
    pool, kv, sched = make(max_tokens=8)
    a, b = seq("a", range(20)), seq("b", range(100, 106))
    sched.add(a)
    sched.add(b)
    assert advance(sched, sched.schedule()) == {"a": 8}  # a's first chunk fills the budget
    assert advance(sched, sched.schedule()) == {"a": 8}
    assert advance(sched, sched.schedule()) == {"a": 4, "b": 4}  # a's last chunk, then b starts
    # a decodes (first), b finishes its prefill with the rest of the budget.
    out = sched.schedule()
    assert [(e.seq.request_id, e.num_new_tokens) for e in out.scheduled] == [("a", 1), ("b", 2)]
    assert (out.num_decode_tokens, out.num_prefill_tokens) == (1, 2)
    advance(sched, out)
    assert advance(sched, sched.schedule()) == {"a": 1, "b": 1}
    assert [len(s.block_table) for s in (a, b)] == [6, 2]  # lazily: 22 and 8 computed tokens
    pool.check_integrity()


def test_max_num_seqs_caps_admission():
    _, kv, sched = make(max_num_seqs=2, max_tokens=64)
    seqs = [seq(str(i), [i] * 3) for i in range(3)]
    for s in seqs:
        sched.add(s)
    assert advance(sched, sched.schedule()) == {"0": 3, "1": 3}
    finish(sched, seqs[0])
    assert advance(sched, sched.schedule()) == {"1": 1, "2": 3}


def test_prefix_hit_is_capped_below_the_whole_prompt():
    pool, kv, sched = make(max_tokens=64)
    first = seq("first", range(8))  # exactly two blocks
    sched.add(first)
    advance(sched, sched.schedule())
    finish(sched, first)
    assert pool.num_cached_blocks == 2
    again, longer = seq("again", range(8)), seq("longer", list(range(8)) + [50])
    sched.add(again)
    sched.add(longer)
    # 'again' hits one block (its last token must be computed); 'longer' hits both.
    assert advance(sched, sched.schedule()) == {"again": 4, "longer": 1}
    assert (again.num_cached_tokens, longer.num_cached_tokens) == (4, 8)
    assert again.block_table[0] is longer.block_table[0] and again.block_table[0].ref_count == 2
    assert (sched.stats.num_query_tokens, sched.stats.num_hit_tokens) == (8 + 8 + 9, 12)


def test_preempts_the_most_recent_and_requeues_it_first():
    pool, kv, sched = make(num_blocks=6, max_tokens=64)
    a, b, c = seq("a", range(8)), seq("b", range(20, 27)), seq("c", range(40, 43))
    for s in (a, b):
        sched.add(s)
    assert advance(sched, sched.schedule()) == {"a": 8, "b": 7}  # 2 + 2 blocks
    sched.add(c)
    assert advance(sched, sched.schedule()) == {"a": 1, "b": 1, "c": 3}  # a needs its 3rd block; c takes 1
    assert pool.num_free_blocks == 0
    advance(sched, out := sched.schedule())
    # b's 9th token needs a 3rd block and none is free: c (admitted last) is preempted; a still fits in its
    # blocks; nothing is admitted in a step that preempted.
    assert [s.request_id for s in out.preempted] == ["c"]
    assert [(e.seq.request_id, e.num_new_tokens) for e in out.scheduled] == [("a", 1), ("b", 1)]
    assert list(sched.waiting) == [c] and c.status is SequenceStatus.WAITING and not c.block_table
    assert c.num_computed_tokens == 0 and c.num_preemptions == 1 and sched.stats.num_preemptions == 1
    assert c.num_output_tokens == 1  # its output survives; the recompute prefills prompt + output
    finish(sched, b)
    out = sched.schedule()
    assert [(e.seq.request_id, e.num_new_tokens) for e in out.scheduled] == [("a", 1), ("c", 4)]
    assert c.num_cached_tokens == 0  # the first admission's hit is what is reported
    pool.check_integrity()


def test_preempted_victim_already_scheduled_gives_its_budget_back():
    # Only reachable when blocks vanish between steps (a pin): set the state up directly.
    pool, kv, sched = make(num_blocks=4, max_tokens=64)
    a, b = seq("a", range(12)), seq("b", range(20, 23))
    for s, n in ((a, 4), (b, 3)):
        assert kv.allocate(s, n)
        s.num_computed_tokens = n
        s.status = SequenceStatus.RUNNING
        sched.running.append(s)
    b.token_ids.append(99)  # b decodes next (into its own block); a is mid-prefill
    pool.allocate(2)
    out = sched.schedule()
    # b is scheduled first (decodes go first), then a has no room: b, the most recent, is preempted, its
    # token withdrawn, and a prefills into the block b gave back.
    assert [s.request_id for s in out.preempted] == ["b"]
    assert [(e.seq.request_id, e.num_new_tokens) for e in out.scheduled] == [("a", 4)]
    assert (out.num_prefill_tokens, out.num_decode_tokens) == (4, 0)


def test_a_sequence_that_cannot_fit_even_alone_fails_cleanly():
    pool, kv, sched = make(num_blocks=4, max_tokens=64)
    pinned = pool.allocate(3)  # pins hold 3 of 4 blocks
    s = seq("big", range(10))
    sched.add(s)
    # Alone, it prefills what fits (one block), then fails instead of waiting forever.
    assert advance(sched, sched.schedule()) == {"big": 4}
    out = sched.schedule()
    assert out.failed == [s] and s.finish_reason == "error"
    assert "out of KV cache blocks" in s.error and "needs 3 blocks, 1 are available (of 4" in s.error
    assert not sched.has_unfinished() and pool.num_free_blocks == 1
    pool.free(pinned)
    pool.check_integrity()


def test_requests_arriving_together_compute_a_shared_prefix_once():
    pool, kv, sched = make(max_tokens=64)
    shared = list(range(8))
    a, b, c = seq("a", shared + [50, 51]), seq("b", shared + [60]), seq("c", [70, 71, 72])
    for s in (a, b, c):
        sched.add(s)
    # b's first block is being computed by a in this very step: b waits one step (c, unrelated, goes ahead).
    assert advance(sched, sched.schedule()) == {"a": 10, "c": 3}
    assert list(sched.waiting) == [b]
    assert advance(sched, sched.schedule()) == {"a": 1, "c": 1, "b": 1}
    assert (a.num_cached_tokens, b.num_cached_tokens, c.num_cached_tokens) == (0, 8, 0)
    assert b.block_table[:2] == a.block_table[:2]


def test_commit_counts_the_tokens_caches_full_blocks_and_names_who_samples():
    pool, _, sched = make(max_tokens=12)
    a, b = seq("a", range(10)), seq("b", range(100, 103))
    sched.add(a)
    sched.add(b)
    out = sched.schedule()
    assert [(e.seq.request_id, e.num_new_tokens) for e in out.scheduled] == [("a", 10), ("b", 2)]
    # a's whole prompt is computed (row 0 samples); b's chunk stops short of its last token (no sample).
    assert sched.commit(out.scheduled) == [(0, a)]
    assert (a.num_computed_tokens, b.num_computed_tokens) == (10, 2)
    assert (a.num_registered_blocks, b.num_registered_blocks, pool.num_cached_blocks) == (2, 0, 2)
    a.token_ids.append(7)
    out = sched.schedule()
    assert [(e.seq.request_id, e.num_new_tokens) for e in out.scheduled] == [("a", 1), ("b", 1)]
    assert sched.commit(out.scheduled) == [(0, a), (1, b)]
    pool.check_integrity()


def test_a_batch_without_prefix_caching_runs_with_in_batch_sharing_nothing_to_wait_for():
    # Prompts sharing a prefix, caching off: the scheduler's "wait for the block being computed" check has no
    # hashes to compare, and must not index into them (it raised IndexError).
    from workers.engine import Engine, EngineConfig
    from cache_service.records import SamplingParams

    engine = Engine(EngineConfig(model="demo", num_blocks=64, block_size=4, enable_prefix_caching=False))
    shared = list(range(1, 17))
    outs = engine.generate([shared + [20, 21], shared + [30, 31], shared + [40]], SamplingParams(max_tokens=3))
    assert [o.error for o in outs] == [None, None, None]
    assert [o.cached_tokens for o in outs] == [0, 0, 0] and all(len(o.new_token_ids) == 3 for o in outs)
