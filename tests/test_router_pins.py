"""PinManager without a cache service (link=None): choosing holders, warming them, releasing a pin, and
every bad Pin/Unpin; against in-process fake workers (no Ray, no Redis)."""

from __future__ import annotations

import pytest

from cache_service.records import InvalidRequestError, WorkerLoad
from router.pins import MAX_TTL_S, PinManager, PinNotFoundError, PinResult
from router.worker_client import WorkerCallError
from tests.fake_workers import BS, Stack, async_test, make_stack, prompt

PREFIX = prompt(3 * BS + 5)  # 3 full blocks and a tail that is never shared
FULL = PREFIX[: 3 * BS]


async def pin_stack(active_blocks: tuple[int, ...] = (10, 5, 20)) -> tuple[Stack, PinManager, list]:
    """worker-1 holds the prefix's first 2 blocks, worker-2 its first 1; loads differ."""
    s = make_stack(len(active_blocks))
    hashes = s.routing.encoder.block_hashes(FULL)
    s.workers["worker-1"].store(hashes[:2])
    s.workers["worker-2"].store(hashes[:1])
    for fake, n in zip(s.workers.values(), active_blocks):
        fake.load = WorkerLoad(num_active_blocks=n, capacity_blocks=100, num_free_blocks=100 - n)
    await s.registry.poll_all()
    return s, PinManager(s.routing.encoder, s.registry, None), hashes


def pin_calls(s: Stack) -> dict[str, list]:
    return {wid: [(pid, len(ids), salt) for pid, ids, salt in f.pin_calls] for wid, f in s.workers.items()}


@async_test
async def test_pin_warms_the_workers_holding_most_of_it_and_is_named_by_its_last_full_block():
    s, pins, hashes = await pin_stack()
    result = await pins.pin("", PREFIX, replicas=2, ttl_seconds=0, cache_salt="")
    pin_id = hashes[-1].hex()
    assert result == PinResult(pin_id, ["worker-1", "worker-2"], pinned_tokens=3 * BS, num_blocks=3)
    assert pin_calls(s) == {"worker-0": [], "worker-1": [(pin_id, 48, "")], "worker-2": [(pin_id, 48, "")]}
    assert s.workers["worker-1"].pin_calls[0][1] == FULL  # only the full blocks are sent
    # The same prefix is the same pin: pinning again is idempotent on the workers.
    again = await pins.pin("", PREFIX, replicas=2, ttl_seconds=60, cache_salt="")
    assert again == result and s.workers["worker-1"].pins == {pin_id}


@async_test
async def test_without_matches_the_least_loaded_workers_hold_it_and_ties_go_by_worker_id():
    s, pins, _ = await pin_stack(active_blocks=(7, 3, 7))
    other = prompt(2 * BS, base=100)  # held nowhere
    result = await pins.pin("", other, replicas=2, ttl_seconds=0, cache_salt="")
    assert result.workers == ["worker-1", "worker-0"]
    s, pins, _ = await pin_stack(active_blocks=(0, 0, 0))
    assert (await pins.pin("", other, replicas=0, ttl_seconds=0, cache_salt="")).workers == ["worker-0"]  # 0 -> 1


@async_test
async def test_pending_routes_do_not_count_as_holding_a_pin():
    s, pins, hashes = await pin_stack(active_blocks=(0, 0, 0))
    s.registry.mirror.note_routed("worker-0", hashes, s.clock())  # routed, not confirmed by the worker
    assert (await pins.pin("", PREFIX, replicas=1, ttl_seconds=0, cache_salt="")).workers == ["worker-1"]


@async_test
async def test_the_salt_changes_the_pin():
    s, pins, hashes = await pin_stack()
    salted = await pins.pin("", PREFIX, replicas=1, ttl_seconds=0, cache_salt="tenant-a")
    assert salted.pin_id == s.routing.encoder.block_hashes(FULL, "tenant-a")[-1].hex() != hashes[-1].hex()
    assert salted.workers == ["worker-1"]  # the salted chain is held nowhere: the least loaded
    assert s.workers["worker-1"].pin_calls == [(salted.pin_id, FULL, "tenant-a")]


@pytest.mark.parametrize("kwargs, message", [
    (dict(token_ids=prompt(BS - 1)),
     "the prefix has 15 tokens; pinning needs at least one full block of 16 tokens (only full blocks are shared)"),
    (dict(token_ids=[]), "no prefix to pin: set text or token_ids"),
    (dict(text="hello", token_ids=PREFIX),
     "both text and token_ids are set; give the prefix to pin as exactly one of them"),
    (dict(replicas=4), "replicas is 4 but the stack has only 3 workers"),
    (dict(ttl_seconds=MAX_TTL_S + 1), f"ttl_seconds must be in 0..{MAX_TTL_S} (0: until Unpin), got {MAX_TTL_S + 1}"),
    (dict(ttl_seconds=-1), f"ttl_seconds must be in 0..{MAX_TTL_S} (0: until Unpin), got -1"),
])
@async_test
async def test_bad_pins_are_invalid_with_a_message_and_touch_no_worker(kwargs, message):
    s, pins, _ = await pin_stack()
    args = dict(text="", token_ids=PREFIX, replicas=1, ttl_seconds=0, cache_salt="") | kwargs
    with pytest.raises(InvalidRequestError) as err:
        await pins.pin(**args)
    assert str(err.value) == message
    assert pin_calls(s) == {"worker-0": [], "worker-1": [], "worker-2": []}


@async_test
async def test_warming_fails_only_when_every_holder_fails():
    s, pins, _ = await pin_stack()
    s.workers["worker-2"].pin_error = RuntimeError("out of blocks")
    result = await pins.pin("", PREFIX, replicas=2, ttl_seconds=0, cache_salt="")
    assert result.workers == ["worker-1", "worker-2"]
    s.workers["worker-1"].pin_error = WorkerCallError("the worker process died", dead=True)
    with pytest.raises(WorkerCallError, match="^the worker process died$"):
        await pins.pin("", PREFIX, replicas=2, ttl_seconds=0, cache_salt="")


@async_test
async def test_unpin_releases_the_pin_wherever_workers_report_it():
    s, pins, hashes = await pin_stack()
    pin_id = hashes[-1].hex()
    await pins.pin("", PREFIX, replicas=2, ttl_seconds=0, cache_salt="")
    s.workers["worker-0"].pins.add(pin_id)  # e.g. an earlier assignment the router no longer remembers
    await s.registry.poll_all()
    assert [sorted(w.pins) for w in s.registry.snapshot()] == [[pin_id], [pin_id], [pin_id]]
    result = await pins.unpin("", PREFIX, cache_salt="")
    assert result == PinResult(pin_id, ["worker-0", "worker-1", "worker-2"], pinned_tokens=48, num_blocks=3)
    assert {wid: f.unpin_calls for wid, f in s.workers.items()} == {wid: [pin_id] for wid in s.workers}
    assert [w.pins for w in s.registry.snapshot()] == [frozenset()] * 3  # not reported until a poll says so
    with pytest.raises(PinNotFoundError) as err:
        await pins.unpin("", PREFIX, cache_salt="")
    assert str(err.value) == f"no pin for this prefix (pin id {pin_id})"


@async_test
async def test_unpin_right_after_pin_finds_it_before_any_poll():
    s, pins, hashes = await pin_stack()
    pinned = await pins.pin("", PREFIX, replicas=2, ttl_seconds=0, cache_salt="")
    result = await pins.unpin("", PREFIX, cache_salt="")  # no poll in between
    assert result.workers == pinned.workers == ["worker-1", "worker-2"]
    assert [f.unpin_calls for f in s.workers.values()] == [[], [pinned.pin_id], [pinned.pin_id]]


@async_test
async def test_unpin_of_an_unknown_prefix_is_not_found_and_calls_no_worker():
    s, pins, _ = await pin_stack()
    other = prompt(BS, base=50)
    with pytest.raises(PinNotFoundError) as err:
        await pins.unpin("", other, cache_salt="")
    assert str(err.value) == f"no pin for this prefix (pin id {s.routing.encoder.block_hashes(other)[-1].hex()})"
    assert [f.unpin_calls for f in s.workers.values()] == [[], [], []]
    with pytest.raises(InvalidRequestError, match="^the prefix has 3 tokens"):
        await pins.unpin("", prompt(3), cache_salt="")


@async_test
async def test_a_holder_out_of_rotation_is_reported_but_not_called():
    s, pins, hashes = await pin_stack()
    pinned = await pins.pin("", PREFIX, replicas=2, ttl_seconds=0, cache_salt="")
    await s.registry.poll_all()
    s.registry.take_out("worker-2", "no answer for 3.0s")
    result = await pins.unpin("", PREFIX, cache_salt="")
    assert result.workers == ["worker-1", "worker-2"]
    assert [f.unpin_calls for f in s.workers.values()] == [[], [pinned.pin_id], []]
