"""One request cannot hurt another (DESIGN 6b): its failure is its own.

    refused at the edge    SamplingParams.validate: what cannot be computed never reaches a worker
    computed safely        workers/sampling.py: every accepted setting, any logits
    failing alone          workers/engine.py _advance: a request's own step part fails that request only,
                           with FailureKind.REQUEST (request_stream.py), which router/dispatch.py never
                           retries (tests/test_router_dispatch.py)

Found by tests/test_fuzz_rpcs.py: a temperature of 1e-38 passed validation, the sampler's softmax became NaN,
the step raised, and the engine loop failed every request in flight on the worker (then on the next worker,
which the router retried it on).
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from cache_service.records import (MAX_STOP_CHARS, MAX_STOP_STRINGS, MAX_TEMPERATURE, MAX_TOP_K, MIN_TEMPERATURE,
                                   MIN_TOP_P, EngineFailure, FailureKind, GenerateCall, InvalidRequestError,
                                   SamplingParams)
from router.dispatch import RequestFailedError
from router.servicer import _status_of
from router.tokenize import PromptEncoder
from router.validation import GenerateArgs, validate_generate
from workers.engine import Engine, EngineConfig
from workers.model import load_model
from workers.output_builder import OutputBuilder
from workers.ray_worker import WorkerActor, WorkerConfig
from workers.request_stream import RequestStream
from workers.sequence import RequestOutput, Sequence

BS = 8
MAX_TOKENS = 10
VICTIM = 3  # its place in the batch: neighbours on both sides

# The batch around the victim: greedy and seeded requests (unseeded sampled ones would depend on the shared
# generator's order, so "the same as alone" would not be defined for them).
OTHERS = [
    SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True),
    SamplingParams(max_tokens=MAX_TOKENS, temperature=0.7, top_p=0.9, seed=1, ignore_eos=True),
    SamplingParams(max_tokens=MAX_TOKENS, temperature=1.3, top_k=20, seed=2, ignore_eos=True),
    SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True),
    SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, seed=3, ignore_eos=True),
    SamplingParams(max_tokens=MAX_TOKENS, temperature=0.9, top_k=5, top_p=0.5, seed=4, ignore_eos=True),
    SamplingParams(max_tokens=MAX_TOKENS, stop=("zz",), ignore_eos=True),
]
# The most extreme settings validation accepts (each is accepted: the test checks it).
PATHOLOGICAL = {
    "min temperature, min top_p, max seed": dict(temperature=MIN_TEMPERATURE, top_p=MIN_TOP_P, seed=2**64 - 1),
    "max temperature, top_k 1": dict(temperature=MAX_TEMPERATURE, top_k=1),
    "min temperature, max top_k": dict(temperature=MIN_TEMPERATURE, top_k=MAX_TOP_K, seed=0),
    "max temperature, max top_k, unseeded": dict(temperature=MAX_TEMPERATURE, top_k=MAX_TOP_K),
    "max stop strings, max temperature, min top_p": dict(
        temperature=MAX_TEMPERATURE, top_p=MIN_TOP_P, seed=2**64 - 1,
        stop=tuple(chr(0x41 + i) * MAX_STOP_CHARS for i in range(MAX_STOP_STRINGS))),
}
EXACTLY_GREEDY = {"min temperature, min top_p, max seed", "max temperature, top_k 1",
                  "max stop strings, max temperature, min top_p"}  # top_p below 1 / vocab, or top_k 1


@pytest.fixture(scope="module")
def demo():
    return load_model("demo")


def engine_for(lm) -> Engine:
    # A small token budget: prompts prefill in chunks over several steps, so the batch mixes prefill and decode.
    return Engine(EngineConfig(block_size=BS, num_blocks=256, max_num_batched_tokens=48), loaded=lm)


def prompts_for(lm) -> list[list[int]]:
    return [lm.tokenizer.encode(f"request {i} asks about prefix caching on worker {i % 3}") for i in range(8)]


def batch_params(victim: SamplingParams) -> list[SamplingParams]:
    params = list(OTHERS)
    params.insert(VICTIM, victim)
    return params


def alone(lm, prompt: list[int], params: SamplingParams) -> RequestOutput:
    (out,) = engine_for(lm).generate([prompt], params)
    return out


def run(engine: Engine, requests: list[tuple[str, list[int], SamplingParams]]) -> dict[str, RequestOutput]:
    """Add every request, then step until all are done; each request's outputs accumulated (like generate)."""
    for rid, prompt, params in requests:
        engine.add_request(rid, prompt, params)
    total: dict[str, RequestOutput] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            t = total.setdefault(out.request_id, RequestOutput(out.request_id, [], "", False, None, 0, 0, 0))
            t.new_token_ids += out.new_token_ids
            t.new_text += out.new_text
            t.finished, t.finish_reason, t.error, t.error_kind = out.finished, out.finish_reason, out.error, \
                out.error_kind
    return total


def assert_engine_clean(engine: Engine) -> None:
    engine.check_integrity()
    assert not engine.has_unfinished_requests()
    assert engine.kv.num_used_blocks == 0  # every request, the failed one too, gave its blocks back


class FailingOutputs(OutputBuilder):
    """The engine's output builder, failing one request's ``after``-th token as a detokenizer bug would."""

    def __init__(self, base: OutputBuilder, victim: str, after: int) -> None:
        super().__init__(base.tokenizer, base.eos_token_ids, base.max_model_len)
        self.victim, self.after = victim, after

    def append_token(self, seq: Sequence, token: int) -> None:
        if seq.request_id == self.victim and seq.num_output_tokens == self.after:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected: the detokenizer choked")
        OutputBuilder.append_token(self, seq, token)


# ---- accepted extremes: computed, and nobody else notices ------------------------------------------------
@pytest.mark.parametrize("name", list(PATHOLOGICAL))
def test_the_most_extreme_accepted_setting_finishes_and_changes_nobody_elses_tokens(demo, name):
    victim = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, **PATHOLOGICAL[name])
    victim.validate()
    prompts, params = prompts_for(demo), batch_params(victim)
    engine = engine_for(demo)
    outs = engine.generate(prompts, params)
    assert [(o.finish_reason, o.error, len(o.new_token_ids)) for o in outs] == [("length", None, MAX_TOKENS)] * 8
    assert all(0 <= t < demo.config.vocab_size for o in outs for t in o.new_token_ids)
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        if i != VICTIM:
            assert outs[i].new_token_ids == alone(demo, prompt, p).new_token_ids, i
    if name in EXACTLY_GREEDY:
        greedy = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
        assert outs[VICTIM].new_token_ids == alone(demo, prompts[VICTIM], greedy).new_token_ids
    assert_engine_clean(engine)


# ---- a request's own failure fails that request only ----------------------------------------------------
def test_a_failure_in_one_requests_output_fails_it_alone(demo):
    prompts, params = prompts_for(demo), batch_params(SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))
    engine = engine_for(demo)
    engine.outputs = FailingOutputs(engine.outputs, "r3", after=2)
    outs = run(engine, [(f"r{i}", p, sp) for i, (p, sp) in enumerate(zip(prompts, params))])
    failed = outs.pop("r3")
    assert (failed.finished, failed.finish_reason, failed.error_kind) == (True, "error", FailureKind.REQUEST)
    assert failed.error == ("the engine failed adding its next token: UnicodeDecodeError: 'utf-8' codec can't "
                            "decode byte 0xff in position 0: injected: the detokenizer choked")
    # The two tokens it produced before the failure were reported as usual; nothing after.
    greedy = alone(demo, prompts[VICTIM], params[VICTIM])
    assert failed.new_token_ids == greedy.new_token_ids[:2]
    for i in (0, 1, 2, 4, 5, 6, 7):
        out, ref = outs[f"r{i}"], alone(demo, prompts[i], params[i])
        assert (out.finish_reason, out.error, out.new_token_ids) == ("length", None, ref.new_token_ids), i
    assert_engine_clean(engine)


def test_a_row_the_sampler_cannot_compute_fails_alone(demo):
    prompts = prompts_for(demo)
    params = batch_params(SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, seed=7, ignore_eos=True))
    engine = engine_for(demo)
    requests = [(f"r{i}", p, sp) for i, (p, sp) in enumerate(zip(prompts, params))]
    for rid, prompt, sp in requests:
        engine.add_request(rid, prompt, sp)
    # A value validation did not foresee, after admission: the batched filter raises on it.
    params[VICTIM].top_k = "many"  # type: ignore[assignment]
    outs = run(engine, [])
    failed = outs.pop("r3")
    assert (failed.finish_reason, failed.new_token_ids, failed.error_kind) == ("error", [], FailureKind.REQUEST)
    assert failed.error == ("the engine failed sampling its next token: TypeError: '<' not supported between "
                            "instances of 'int' and 'str'")
    for i in (0, 1, 2, 4, 5, 6, 7):
        out, ref = outs[f"r{i}"], alone(demo, prompts[i], params[i])
        assert (out.finish_reason, out.error, out.new_token_ids) == ("length", None, ref.new_token_ids), i
    assert_engine_clean(engine)


def test_a_refused_request_in_generate_is_invalid_and_the_rest_are_served(demo):
    prompts = prompts_for(demo)[:2]
    bad = SamplingParams(max_tokens=4, temperature=1e-38)
    refused, served = engine_for(demo).generate(prompts, [bad, SamplingParams(max_tokens=4, ignore_eos=True)])
    assert (refused.finish_reason, refused.error_kind) == ("error", FailureKind.INVALID)
    assert refused.error == "temperature must be 0 (greedy) or in [0.001, 100], got 1e-38"
    assert (served.finish_reason, served.error, served.error_kind, len(served.new_token_ids)) == \
        ("length", None, None, 4)


# ---- the worker: the failure's kind reaches the router ---------------------------------------------------
def test_request_stream_carries_the_failure_kind():
    async def go() -> list[EngineFailure | None]:
        got = []
        for kind in (FailureKind.REQUEST, None):
            stream = RequestStream("worker-t")
            stream.sink(RequestOutput("r", [5], "x", False, None, 3, 1, 0))
            stream.sink(RequestOutput("r", [], "", True, "error", 3, 1, 0, "it broke", kind))
            delta = await stream.next_delta()
            assert (delta.token_ids, delta.text, delta.finish_reason, stream.finished) == ([5], "x", "error", True)
            got.append(delta.failure)
        return got

    # No kind (an output from before kinds existed): the worker's failure, as before.
    assert asyncio.run(go()) == [EngineFailure(FailureKind.REQUEST, "it broke"),
                                 EngineFailure(FailureKind.ENGINE, "it broke")]


def test_eight_concurrent_streams_on_a_worker_lose_only_the_failing_one(demo):
    """The fuzz finding's shape: 8 streams in flight on one worker, one of them failing in its own step part."""
    prompts = prompts_for(demo)
    params = batch_params(SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))
    actor = WorkerActor(WorkerConfig("worker-t", num_blocks=256, block_size=BS, enable_transfer_server=False))

    async def go():
        await actor.start()
        await actor.loop.call(lambda e: setattr(e, "outputs", FailingOutputs(e.outputs, "s3", after=1)))

        async def one(i: int):
            return [d async for d in actor.generate(GenerateCall(f"s{i}", prompts[i], params[i]))]

        try:
            streams = await asyncio.gather(*(one(i) for i in range(8)))
            return streams, actor.loop.fatal_error  # before shutdown, which sets it
        finally:
            await actor.shutdown()

    streams, fatal_error = asyncio.run(go())
    failed = streams[VICTIM]
    assert failed[-1].failure == EngineFailure(
        FailureKind.REQUEST, "the engine failed adding its next token: UnicodeDecodeError: 'utf-8' codec can't "
                             "decode byte 0xff in position 0: injected: the detokenizer choked")
    assert failed[-1].finish_reason == "error"
    assert fatal_error is None  # the step itself never failed: no _fail_all
    for i in (0, 1, 2, 4, 5, 6, 7):
        deltas = streams[i]
        assert [d.failure for d in deltas] == [None] * len(deltas)
        assert deltas[-1].finish_reason == "length"
        assert [t for d in deltas for t in d.token_ids] == alone(demo, prompts[i], params[i]).new_token_ids, i


# ---- the router's edge ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("field", "value", "message"), [
    ("temperature", 1.401298464324817e-45,
     "temperature must be 0 (greedy) or in [0.001, 100], got 1.401298464324817e-45"),
    ("temperature", 1e-38, "temperature must be 0 (greedy) or in [0.001, 100], got 1e-38"),
    ("top_p", 1e-7, "top_p must be at least 1e-06 (anything smaller keeps only the most likely token already), "
                    "got 1e-07"),
    ("top_k", 2**32 - 1, f"top_k must be at most {MAX_TOP_K} (a top_k at or above the vocabulary keeps every "
                         "token), got 4294967295"),
    ("stop", ["a"] * 17, "stop has 17 strings; at most 16 are allowed"),
    ("stop", ["b" * 300], "stop[0] is 300 characters long; at most 256 are allowed"),
])
def test_the_router_refuses_what_a_worker_cannot_compute_naming_the_field(field, value, message):
    encoder = PromptEncoder("demo", BS)
    with pytest.raises(InvalidRequestError) as err:
        validate_generate(GenerateArgs(token_ids=[5, 6, 7], **{field: value}), encoder)
    assert str(err.value) == message


def test_a_request_failure_is_internal_with_a_generic_message_and_an_invalid_one_names_the_problem():
    # INTERNAL with a generic message (the worker's words go to the router's log): the request passed our
    # validation, so the fault is the server's, not the client's.
    code, message = _status_of(RequestFailedError("worker-0 failed the request: secret detail"))
    assert code == grpc.StatusCode.INTERNAL and "secret detail" not in message and "not retried" in message
    assert _status_of(InvalidRequestError("temperature must be ...")) == (grpc.StatusCode.INVALID_ARGUMENT,
                                                                           "temperature must be ...")
