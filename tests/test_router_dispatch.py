"""Dispatcher: streaming, failover and its limits, against in-process fake workers (no Ray).

Every stack here has worker-0 holding the prompt's first 3 blocks, so cache_aware sends the first attempt
there; worker-0 emits tokens 100.., worker-1 200.., worker-2 300.. (tests/fake_workers.py).
"""

from __future__ import annotations

import asyncio
import re

import pytest

from cache_service.records import Delta, InvalidRequestError, Usage
from router.dispatch import OverloadedError, RequestFailedError, StreamBrokenError
from router.routing import NoWorkerError
from tests.fake_workers import Plan, Stack, async_test, drain, make_stack, prompt, request, tokens

IDS = prompt(64)  # 4 full blocks; a hit can cover at most 3 (the last token is always computed)
FINAL = ([], False)


async def held_stack(num_workers: int = 2, **kw) -> Stack:
    s = make_stack(num_workers, **kw)
    hashes = s.routing.encoder.block_hashes(IDS)
    s.workers["worker-0"].store(hashes[:3])
    await s.registry.poll_all()  # first answers: every worker in rotation, the mirror in sync
    assert [w.worker_id for w in s.registry.live_workers()] == list(s.workers)
    return s


async def stream_hung_after_a_token(s: Stack, request_id: str = "req-1", num_tokens: int = 1):
    """A streaming request whose worker-0 attempt sent its first token and then hangs (its gate is the plan's)."""
    gate = asyncio.Event()
    s.workers["worker-0"].plans = [Plan(tokens=num_tokens, gate=gate)]
    stream = s.stream(request(IDS, request_id=request_id), restartable=False)
    assert (await stream.__anext__()).token_ids == [100]
    return stream, gate


async def assert_aborted_once(s: Stack, worker_id: str) -> None:
    """The worker's one attempt was aborted by the router, and the abort reached the worker."""
    fake = s.workers[worker_id]
    (call,) = fake.calls
    assert s.abort_calls(worker_id) == [call.request_id]
    await fake.abort_seen.wait()
    assert fake.aborted == [call.request_id]


def shape(deltas: list[Delta]) -> list[tuple[list[int], bool]]:
    return [(d.token_ids, d.restart) for d in deltas]


@async_test
async def test_a_request_streams_its_deltas_and_ends_with_usage_and_the_predicted_hit():
    s = await held_stack()
    s.workers["worker-0"].cached_tokens = 48
    deltas, err = await drain(s.stream(request(IDS), restartable=False))
    assert err is None
    assert shape(deltas) == [([100], False), ([101], False), ([102], False), FINAL]
    assert [d.text for d in deltas] == ["<100>", "<101>", "<102>", ""]
    assert [d.worker_id for d in deltas] == ["worker-0"] * 4
    assert deltas[-1].finish_reason == "length"
    assert deltas[-1].usage == Usage(prompt_tokens=64, completion_tokens=3, cached_tokens=48,
                                     predicted_cached_tokens=48)
    (call,) = s.workers["worker-0"].calls
    assert re.fullmatch(r"req-1#[0-9a-f]{8}", call.request_id)
    assert call.prompt_ids == IDS and call.params.max_tokens == 3 and call.peer is None and call.peer_known
    assert s.workers["worker-1"].calls == []
    # The router's own accounting: one block to prefill was routed there, pending in the mirror.
    w0 = s.state("worker-0")
    assert w0.num_routed_blocks == 1 and w0.num_in_flight == 0 and s.dispatcher.num_in_flight == 0
    assert s.registry.mirror.lookup(s.routing.encoder.block_hashes(IDS)) == {"worker-0": 4}
    assert s.abort_calls("worker-0") == []
    assert s.requests("worker-0", "ok") == 1
    assert s.sample("prefixcache_prefix_cache_queries_tokens_total", worker="worker-0", tenant="default") == 64
    assert s.sample("prefixcache_prefix_cache_hits_tokens_total", worker="worker-0", tenant="default") == 48
    assert s.sample("prefixcache_router_predicted_cached_tokens_total", worker="worker-0") == 48
    assert s.sample("prefixcache_ttft_seconds_count", worker="worker-0", tenant="default") == 1
    assert s.sample("prefixcache_inter_token_latency_seconds_count", worker="worker-0") == 2
    assert s.sample("prefixcache_router_decision_seconds_count") == 1


@async_test
async def test_a_worker_that_dies_before_the_first_token_is_replaced_invisibly():
    s = await held_stack()
    w0 = s.workers["worker-0"]
    w0.plans = [Plan(tokens=0, end="die")]
    deltas, err = await drain(s.stream(request(IDS), restartable=False))
    assert err is None
    assert shape(deltas) == [([200], False), ([201], False), ([202], False), FINAL]
    assert {d.worker_id for d in deltas} == {"worker-1"}
    assert deltas[-1].usage.predicted_cached_tokens == 0  # worker-1 holds nothing
    (first,), (second,) = w0.calls, s.workers["worker-1"].calls
    assert first.request_id != second.request_id and second.request_id.startswith("req-1#")
    state = s.state("worker-0")
    assert state.dead and not state.live and state.down.is_set()
    assert state.last_error == "call failed: worker-0 died"
    assert "worker-0" not in s.registry.mirror.by_worker
    assert s.abort_calls("worker-0") == [first.request_id]
    await w0.abort_seen.wait()
    assert w0.aborted == [first.request_id]
    assert s.requests("worker-0", "error") == 1 and s.requests("worker-1", "ok") == 1
    assert s.sample("prefixcache_router_decision_seconds_count") == 1  # observed for the first decision only


@async_test
async def test_a_stream_that_already_sent_tokens_breaks_naming_the_worker():
    s = await held_stack()
    s.workers["worker-0"].plans = [Plan(tokens=2, end="die")]
    deltas, err = await drain(s.stream(request(IDS), restartable=False))
    assert tokens(deltas) == [100, 101]
    assert isinstance(err, StreamBrokenError)
    assert str(err) == ("worker worker-0 was lost after streaming 2 tokens (worker-0 died); "
                        "the stream cannot be resumed: retry the request")
    assert s.workers["worker-1"].calls == []
    assert s.state("worker-0").dead
    assert s.requests("worker-0", "error") == 1


@async_test
async def test_a_unary_request_restarts_on_another_worker_after_tokens():
    s = await held_stack()
    s.workers["worker-0"].plans = [Plan(tokens=2, end="restarting")]
    deltas, err = await drain(s.stream(request(IDS), restartable=True))
    assert err is None
    assert shape(deltas) == [([100], False), ([101], False), ([], True),
                             ([200], False), ([201], False), ([202], False), FINAL]
    assert [d.worker_id for d in deltas] == ["worker-0"] * 2 + [""] + ["worker-1"] * 4
    state = s.state("worker-0")
    assert not state.live and not state.dead  # restarting: out now, polled again
    assert state.last_error == "call failed: worker-0 is restarting"


@async_test
async def test_a_worker_leaving_rotation_fails_the_attempt_waiting_on_it():
    s = await held_stack()
    w0 = s.workers["worker-0"]
    w0.plans = [Plan(tokens=0, gate=asyncio.Event())]  # hangs before its first token
    task = asyncio.ensure_future(drain(s.stream(request(IDS), restartable=False)))
    await w0.started.wait()
    s.registry.take_out("worker-0", "no answer for 3.0s")  # what the registry does to a silent worker
    deltas, err = await task
    assert err is None
    assert tokens(deltas) == [200, 201, 202] and deltas[-1].worker_id == "worker-1"
    await assert_aborted_once(s, "worker-0")
    assert s.state("worker-0").num_in_flight == 0 and not s.state("worker-0").dead
    assert s.requests("worker-0", "error") == 1 and s.requests("worker-1", "ok") == 1


@async_test
async def test_a_worker_leaving_rotation_after_tokens_breaks_the_stream():
    s = await held_stack()
    stream, _ = await stream_hung_after_a_token(s)
    s.registry.take_out("worker-0", "engine loop stalled for 31.0s")
    deltas, err = await drain(stream)
    assert deltas == []
    assert isinstance(err, StreamBrokenError)
    assert str(err) == ("worker worker-0 was lost after streaming 1 tokens (worker-0 left rotation "
                        "(engine loop stalled for 31.0s)); the stream cannot be resumed: retry the request")
    await assert_aborted_once(s, "worker-0")


@async_test
async def test_an_invalid_request_fails_once_and_is_not_retried():
    s = await held_stack()
    s.workers["worker-0"].plans = [Plan(tokens=0, end="invalid")]
    deltas, err = await drain(s.stream(request(IDS)))
    assert deltas == []
    assert isinstance(err, InvalidRequestError) and str(err) == "worker-0: invalid failure"
    assert len(s.workers["worker-0"].calls) == 1 and s.workers["worker-1"].calls == []
    assert s.state("worker-0").live  # the request's fault, not the worker's
    assert s.abort_calls("worker-0") == []  # the worker ended it itself
    assert s.requests("worker-0", "error") == 1


@async_test
async def test_an_engine_failure_is_retried_elsewhere_and_the_worker_stays_in_rotation():
    s = await held_stack()
    s.workers["worker-0"].plans = [Plan(tokens=0, end="engine")]
    deltas, err = await drain(s.stream(request(IDS)))
    assert err is None and tokens(deltas) == [200, 201, 202]
    assert s.state("worker-0").live
    assert s.requests("worker-0", "error") == 1 and s.requests("worker-1", "ok") == 1


@async_test
async def test_a_stream_without_a_final_message_fails_the_attempt():
    s = await held_stack()
    s.workers["worker-0"].plans = [Plan(tokens=0, end="silent")]
    deltas, err = await drain(s.stream(request(IDS)))
    assert err is None and deltas[-1].worker_id == "worker-1"
    assert s.abort_calls("worker-0") == [s.workers["worker-0"].calls[0].request_id]


@async_test
async def test_max_attempts_exhausted_names_the_last_failure():
    s = make_stack(3, max_attempts=2)
    hashes = s.routing.encoder.block_hashes(IDS)
    s.workers["worker-0"].store(hashes[:3])
    s.workers["worker-1"].store(hashes[:2])  # second choice, so the order of attempts is known
    await s.registry.poll_all()
    for wid in ("worker-0", "worker-1"):
        s.workers[wid].plans = [Plan(tokens=0, end="crash")]
    deltas, err = await drain(s.stream(request(IDS)))
    assert deltas == []
    assert isinstance(err, NoWorkerError)
    assert str(err) == ("the request failed on 2 workers; last failure: worker-1: "
                        "the worker failed: RuntimeError: worker-1 crashed")
    assert [len(s.workers[w].calls) for w in ("worker-0", "worker-1", "worker-2")] == [1, 1, 0]
    # Unreachable, not dead: out of rotation until they answer a poll again.
    assert [(w.live, w.dead) for w in s.registry.snapshot()] == [(False, False), (False, False), (True, False)]
    await s.registry.poll_all()
    assert len(s.registry.live_workers()) == 3


@async_test
async def test_running_out_of_workers_is_no_worker_with_the_last_failure():
    s = await held_stack(max_attempts=3)
    for w in s.workers.values():
        w.plans = [Plan(tokens=0, end="die")]
    deltas, err = await drain(s.stream(request(IDS)))
    assert isinstance(err, NoWorkerError)
    assert str(err) == ("no live worker can take the request (excluded after failures: worker-0, worker-1); "
                        "last failure: worker-1: worker-1 died")
    assert [len(w.calls) for w in s.workers.values()] == [1, 1]
    assert s.requests("none", "error") == 1


@async_test
async def test_a_failed_target_worker_is_not_retried_elsewhere():
    s = await held_stack()
    s.workers["worker-1"].plans = [Plan(tokens=0, end="die")]
    deltas, err = await drain(s.stream(request(IDS, target_worker="worker-1")))
    assert deltas == []
    assert isinstance(err, NoWorkerError) and str(err) == "target_worker 'worker-1' failed: worker-1 died"
    assert s.workers["worker-0"].calls == []
    # Asking for it again now: it is out of rotation.
    _, err = await drain(s.stream(request(IDS, target_worker="worker-1")))
    assert isinstance(err, NoWorkerError)
    assert str(err) == "target_worker 'worker-1' is not available (call failed: worker-1 died)"


@async_test
async def test_the_in_flight_cap_refuses_with_overloaded():
    s = await held_stack(max_in_flight=1)
    first, gate = await stream_hung_after_a_token(s, request_id="a")
    assert s.dispatcher.num_in_flight == 1
    _, err = await drain(s.stream(request(IDS, request_id="b")))
    assert isinstance(err, OverloadedError)
    assert str(err) == "the router is at its limit of 1 requests in flight; retry later"
    assert s.requests("none", "error") == 1
    gate.set()
    rest, err = await drain(first)
    assert err is None and rest[-1].finish_reason == "length"
    assert s.dispatcher.num_in_flight == 0
    _, err = await drain(s.stream(request(IDS, request_id="c")))  # room again
    assert err is None


@async_test
async def test_a_cancelled_client_aborts_the_attempt_on_its_worker():
    s = await held_stack()
    s.workers["worker-0"].plans = [Plan(tokens=1, gate=asyncio.Event())]
    got_first = asyncio.Event()

    async def client() -> None:
        async for _ in s.stream(request(IDS), restartable=False):
            got_first.set()

    task = asyncio.ensure_future(client())
    await got_first.wait()
    task.cancel()  # e.g. grpc cancels the handler of a client that went away
    await asyncio.gather(task, return_exceptions=True)
    assert task.cancelled()
    await assert_aborted_once(s, "worker-0")
    assert s.requests("worker-0", "aborted") == 1 and s.requests("worker-0", "error") == 0
    assert s.state("worker-0").live  # the client's doing, not the worker's
    assert s.state("worker-0").num_in_flight == 0 and s.dispatcher.num_in_flight == 0


@async_test
async def test_a_client_closing_its_stream_aborts_the_attempt_at_once():
    s = await held_stack()
    stream, _ = await stream_hung_after_a_token(s, num_tokens=2)
    await stream.aclose()  # e.g. the gRPC stream's consumer went away between two deltas
    # At once, not when the garbage collector gets to the inner generators.
    call = s.workers["worker-0"].calls[0]
    assert s.abort_calls("worker-0") == [call.request_id]
    assert s.state("worker-0").num_in_flight == 0 and s.dispatcher.num_in_flight == 0
    assert s.requests("worker-0", "aborted") == 1
    await assert_aborted_once(s, "worker-0")


# ---- whose failure it is: the request's own failures are never retried ----------------------------------
@pytest.mark.parametrize("num_tokens", [0, 2])
@pytest.mark.parametrize("end", ["invalid", "request"])
@async_test
async def test_a_requests_own_failure_is_not_retried_even_before_its_first_token(end, num_tokens):
    s = await held_stack(3)
    s.workers["worker-0"].plans = [Plan(tokens=num_tokens, end=end)]
    # Unary (restartable): an ENGINE failure here would be replayed invisibly on worker-1.
    deltas, err = await drain(s.stream(request(IDS), restartable=True))
    assert tokens(deltas) == [100, 101][:num_tokens] and not any(d.restart for d in deltas)
    if end == "invalid":
        assert type(err) is InvalidRequestError and str(err) == "worker-0: invalid failure"
    else:
        assert type(err) is RequestFailedError
        assert str(err) == "worker-0 failed the request: worker-0: request failure"
    assert [len(w.calls) for w in s.workers.values()] == [1, 0, 0]  # one attempt, on one worker
    assert [w.worker_id for w in s.registry.live_workers()] == ["worker-0", "worker-1", "worker-2"]
    assert s.abort_calls("worker-0") == []  # the worker ended it itself
    assert s.requests("worker-0", "error") == 1
    assert s.state("worker-0").num_in_flight == 0 and s.dispatcher.num_in_flight == 0


@async_test
async def test_engine_failures_still_fail_over_until_the_attempts_run_out():
    s = await held_stack(3)
    for w in s.workers.values():
        w.plans = [Plan(tokens=0, end="engine")]
    deltas, err = await drain(s.stream(request(IDS)))
    assert deltas == []
    assert type(err) is NoWorkerError
    # worker-0 holds the prefix, so it goes first; the policy's tie-break then picks worker-2, then worker-1.
    assert str(err) == ("the request failed on 3 workers; last failure: worker-1: the worker failed the request: "
                        "worker-1: engine failure")
    assert [len(w.calls) for w in s.workers.values()] == [1, 1, 1]
    assert [s.requests(w, "error") for w in s.workers] == [1, 1, 1]
    assert [w.worker_id for w in s.registry.live_workers()] == ["worker-0", "worker-1", "worker-2"]


@async_test
async def test_a_request_failure_after_an_engine_failure_stops_the_failover_there():
    s = await held_stack(3)
    s.workers["worker-0"].plans = [Plan(tokens=0, end="engine")]
    s.workers["worker-2"].plans = [Plan(tokens=0, end="request")]  # the second choice (see above)
    deltas, err = await drain(s.stream(request(IDS)))
    assert deltas == [] and type(err) is RequestFailedError
    assert str(err) == "worker-2 failed the request: worker-2: request failure"
    assert [len(w.calls) for w in s.workers.values()] == [1, 0, 1]
