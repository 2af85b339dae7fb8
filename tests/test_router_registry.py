"""WorkerRegistry: rotation, the block feed into the mirror, failures, stalls and load accounting, against
in-process fake workers and an injected clock (no Ray, no waiting for timeouts but one of a few ms)."""

from __future__ import annotations

import asyncio

import pytest

from cache_service.records import WorkerLoad
from router.worker_client import InProcessWorkerClient, WorkerCallError
from tests.fake_workers import FakeWorker, Stack, async_test, encoder, make_stack, prompt

UNRESPONSIVE_S = 3.0


def stack(num_workers: int = 1, **registry_kw) -> Stack:
    registry_kw.setdefault("unresponsive_after_s", UNRESPONSIVE_S)
    return make_stack(num_workers, registry_kw=registry_kw)


def hashes(n: int, base: int = 0) -> list:
    return encoder().block_hashes(prompt(n * 16, base))


@async_test
async def test_the_first_answered_poll_puts_a_worker_in_rotation_with_a_full_snapshot():
    s = stack(2)
    fake, hs = s.workers["worker-0"], hashes(3)
    fake.store(hs)
    fake.load = WorkerLoad(num_running=2, num_waiting=1, capacity_blocks=100, num_free_blocks=90)
    fake.transfer_address = "10.0.0.1:7000"
    w = s.state("worker-0")
    assert not w.live and w.down.is_set() and s.registry.live_workers() == []
    await s.registry.poll_all()
    assert fake.polls == [("", 0)]
    assert w.live and not w.down.is_set() and w.last_error == ""
    assert (w.feed_epoch, w.feed_seq) == ("worker-0-epoch-1", 3)
    assert w.load == WorkerLoad("worker-0", num_running=2, num_waiting=1, capacity_blocks=100, num_free_blocks=90)
    assert w.transfer_address == "10.0.0.1:7000"
    assert s.registry.mirror.by_worker == {"worker-0": set(hs), "worker-1": set()}
    assert s.registry.mirror.lookup(hs) == {"worker-0": 3}
    assert [x.worker_id for x in s.registry.live_workers()] == ["worker-0", "worker-1"]


@async_test
async def test_incremental_events_and_snapshots_feed_the_mirror():
    s = stack()
    fake, hs = s.workers["worker-0"], hashes(4)
    await s.registry.poll_all()
    fake.store(hs[:3])
    await s.registry.poll_all()
    assert fake.polls[-1] == ("worker-0-epoch-1", 0)  # from where it was: events 1..3 come back
    assert s.registry.mirror.lookup(hs) == {"worker-0": 3}
    fake.evict(hs[1:2])
    await s.registry.poll_all()
    assert fake.polls[-1] == ("worker-0-epoch-1", 3)
    assert s.registry.mirror.lookup(hs) == {"worker-0": 1}
    assert s.registry.mirror.by_worker["worker-0"] == {hs[0], hs[2]}
    # The feed buffer overflowed: the router is behind it, and gets the whole cached set instead.
    fake.store(hs[3:])
    fake.drop_feed()
    fake.evict(hs[2:3])
    await s.registry.poll_all()
    assert fake.polls[-1] == ("worker-0-epoch-1", 4)
    assert s.registry.mirror.by_worker["worker-0"] == {hs[0], hs[3]}
    assert s.state("worker-0").feed_seq == 6
    s.registry.mirror.check_integrity()


@async_test
async def test_a_new_feed_epoch_resyncs_from_a_snapshot():
    s = stack()
    fake, old, new = s.workers["worker-0"], hashes(2), hashes(2, base=7)
    fake.store(old)
    await s.registry.poll_all()
    fake.restart()  # between two polls: the router never saw it fail
    fake.store(new[:1])
    await s.registry.poll_all()
    assert fake.polls[-1] == ("worker-0-epoch-1", 2)
    w = s.state("worker-0")
    assert w.live and (w.feed_epoch, w.feed_seq) == ("worker-0-epoch-2", 1)
    assert s.registry.mirror.by_worker["worker-0"] == {new[0]}
    fake.store(new[1:])
    await s.registry.poll_all()
    assert fake.polls[-1] == ("worker-0-epoch-2", 1)
    assert s.registry.mirror.lookup(new) == {"worker-0": 2} and s.registry.mirror.lookup(old) == {}


@async_test
async def test_a_dead_worker_is_out_for_good_and_never_polled_again():
    s = stack(2)
    fake = s.workers["worker-0"]
    fake.store(hashes(2))
    await s.registry.poll_all()
    fake.poll_errors = [WorkerCallError("the worker process died (ActorDiedError)", dead=True)]
    await s.registry.poll_all()
    w = s.state("worker-0")
    assert w.dead and not w.live and w.down.is_set()
    assert w.last_error == "poll: the worker process died (ActorDiedError)"
    assert "worker-0" not in s.registry.mirror.by_worker
    await s.registry.poll_all()
    assert len(fake.polls) == 2
    assert [x.worker_id for x in s.registry.live_workers()] == ["worker-1"]
    assert [x.worker_id for x in s.registry.snapshot()] == ["worker-0", "worker-1"]  # keeps its entry


@async_test
async def test_a_restarting_worker_leaves_at_once_and_returns_resynced_on_its_next_answer():
    s = stack()
    fake, hs = s.workers["worker-0"], hashes(2)
    fake.store(hs)
    await s.registry.poll_all()
    fake.poll_errors = [WorkerCallError("the worker is unavailable, restarting", restarting=True)]
    await s.registry.poll_all()
    w = s.state("worker-0")
    assert not w.live and not w.dead and w.down.is_set() and w.feed_epoch == ""
    assert s.registry.mirror.lookup(hs) == {}
    fake.restart()
    fake.store(hs[:1])
    await s.registry.poll_all()
    assert fake.polls[-1] == ("", 2)  # it asks from nowhere: a snapshot comes back
    assert w.live and not w.down.is_set() and w.last_error == ""
    assert (w.feed_epoch, w.feed_seq) == ("worker-0-epoch-2", 1)
    assert s.registry.mirror.lookup(hs) == {"worker-0": 1}


@async_test
async def test_a_failing_worker_stays_in_rotation_until_unresponsive_after_s():
    s = stack()
    fake, hs = s.workers["worker-0"], hashes(1)
    fake.store(hs)
    await s.registry.poll_all()  # answered at t=0
    w = s.state("worker-0")
    for now in (1.0, 2.0, UNRESPONSIVE_S):
        s.clock.now = now
        fake.poll_errors = [ConnectionError("node restarting")]
        await s.registry.poll_all()
        assert w.live and w.last_error == "poll failed: the worker failed: ConnectionError: node restarting"
    s.clock.now = UNRESPONSIVE_S + 0.5
    fake.poll_errors = [ConnectionError("node restarting")]
    await s.registry.poll_all()
    assert not w.live and not w.dead and w.down.is_set()
    assert w.last_error == ("no answer for 3.0s "
                            "(poll failed: the worker failed: ConnectionError: node restarting)")
    assert s.registry.mirror.lookup(hs) == {}
    await s.registry.poll_all()  # it answers again: back, with what it holds
    assert fake.polls[-1] == ("", 1)
    assert w.live and w.last_ok == UNRESPONSIVE_S + 0.5
    assert s.registry.mirror.lookup(hs) == {"worker-0": 1}


@async_test
async def test_a_slow_poll_counts_as_no_answer():
    s = stack(poll_timeout_s=0.01)
    fake = s.workers["worker-0"]
    await s.registry.poll_all()
    fake.poll_gate = asyncio.Event()  # never set: it hangs; the registry's timeout ends each poll
    s.clock.now = 1.0
    await s.registry.poll_all()
    w = s.state("worker-0")
    assert w.live and w.last_error == "poll failed: no answer within 0.01s"
    s.clock.now = 10.0
    await s.registry.poll_all()
    assert not w.live and w.last_error == "no answer for 3.0s (poll failed: no answer within 0.01s)"


@async_test
async def test_a_stalled_engine_leaves_rotation_though_its_worker_answers():
    s = stack(stall_after_s=30.0)
    fake, hs = s.workers["worker-0"], hashes(1)
    fake.store(hs)
    fake.engine_stalled_s = 29.5  # a long step is legitimate
    await s.registry.poll_all()
    w = s.state("worker-0")
    assert w.live
    fake.engine_stalled_s = 31.0
    await s.registry.poll_all()
    assert not w.live and not w.dead and w.last_error == "engine loop stalled for 31.0s"
    assert s.registry.mirror.lookup(hs) == {}
    fake.engine_stalled_s = 0.2
    await s.registry.poll_all()
    assert w.live and s.registry.mirror.lookup(hs) == {"worker-0": 1}


@async_test
async def test_routed_blocks_count_as_waiting_until_a_poll_sent_after_them_answers():
    s = stack()
    fake = s.workers["worker-0"]
    fake.load = WorkerLoad(num_waiting_blocks=4, capacity_blocks=100)
    await s.registry.poll_all()
    w = s.state("worker-0")
    assert w.effective_load() is w.load
    s.registry.note_routed("worker-0", 5)
    assert w.effective_load().num_waiting_blocks == 9
    fake.poll_gate, fake.poll_entered = asyncio.Event(), asyncio.Event()
    poll = asyncio.ensure_future(s.registry.poll_all())
    await fake.poll_entered.wait()
    s.registry.note_routed("worker-0", 3)  # after the poll was sent: not in its answer
    assert w.effective_load().num_waiting_blocks == 12
    fake.poll_gate.set()
    await poll
    assert w.num_routed_blocks == 3 and w.effective_load().num_waiting_blocks == 7
    assert w.load.num_waiting_blocks == 4  # the worker's own number is never changed
    await s.registry.poll_all()
    assert w.num_routed_blocks == 0 and w.effective_load() is w.load
    s.registry.note_routed("nobody", 3)  # a worker that is not registered: ignored


@async_test
async def test_an_answer_to_a_poll_sent_before_a_take_out_is_not_applied():
    s = stack()
    fake, hs = s.workers["worker-0"], hashes(2)
    await s.registry.poll_all()
    fake.store(hs)
    fake.poll_gate, fake.poll_entered = asyncio.Event(), asyncio.Event()
    poll = asyncio.ensure_future(s.registry.poll_all())
    await fake.poll_entered.wait()
    s.registry.take_out("worker-0", "call failed: unreachable")  # e.g. a generate call failed meanwhile
    fake.poll_gate.set()
    await poll
    w = s.state("worker-0")
    assert not w.live and w.feed_epoch == "" and s.registry.mirror.lookup(hs) == {}  # events since: unknown
    fake.poll_gate = None
    await s.registry.poll_all()
    assert fake.polls[-1] == ("", 0) and w.live and s.registry.mirror.lookup(hs) == {"worker-0": 2}
    # A worker found dead while its poll was in flight stays out even though the poll answers.
    fake.poll_gate, fake.poll_entered = asyncio.Event(), asyncio.Event()
    poll = asyncio.ensure_future(s.registry.poll_all())
    await fake.poll_entered.wait()
    s.registry.take_out("worker-0", "node gone", dead=True)
    fake.poll_gate.set()
    await poll
    assert w.dead and not w.live and s.registry.mirror.lookup(hs) == {}


@async_test
async def test_wait_ready_returns_once_enough_workers_answered_and_names_them_when_not():
    s = stack(2, poll_interval_s=60.0)  # the loop polls once, then sleeps through the test
    s.workers["worker-1"].poll_errors = [RuntimeError("not yet")]
    s.registry.start()
    try:
        await s.registry.wait_ready(1, timeout_s=5.0)
        assert [w.worker_id for w in s.registry.live_workers()] == ["worker-0"]
        with pytest.raises(TimeoutError, match=r"^only 1 of 2 workers answered: \['worker-0'\]$"):
            await s.registry.wait_ready(2, timeout_s=0.0)
    finally:
        await s.registry.stop()
    assert [len(f.polls) for f in s.workers.values()] == [1, 1]
    await s.registry.poll_all()
    await s.registry.wait_ready(2, timeout_s=0.0)  # already there: no waiting


def test_a_worker_id_registers_once():
    s = stack()
    with pytest.raises(ValueError, match="worker 'worker-0' is already registered"):
        s.registry.add(InProcessWorkerClient("worker-0", FakeWorker("worker-0")))
