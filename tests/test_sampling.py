"""Sampling: parameter validation, top-k / top-p filtering, seeded reproducibility through the engine, and
numerical safety (no accepted parameters and no logits can make the sampler raise or draw out of range)."""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from cache_service.records import (MAX_STOP_CHARS, MAX_STOP_STRINGS, MAX_TEMPERATURE, MAX_TOP_K, MIN_TEMPERATURE,
                                   MIN_TOP_P, InvalidRequestError, SamplingParams)
from workers.engine import Engine, EngineConfig
from workers.model import load_model
from workers.sampling import SampleFailure, _filter_logits, make_generator, sample


@pytest.fixture(scope="module")
def demo():
    return load_model("demo")


def engine_for(lm, **kw) -> Engine:
    cfg = dict(block_size=8, num_blocks=128, max_num_batched_tokens=64)
    cfg.update(kw)
    return Engine(EngineConfig(**cfg), loaded=lm)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(max_tokens=0), "max_tokens must be a positive integer, got 0"),
        (dict(max_tokens=-3), "max_tokens must be a positive integer, got -3"),
        (dict(temperature=-0.1), "temperature must be >= 0, got -0.1"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\], got 0.0"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\], got 1.5"),
        (dict(top_k=-1), "top_k must be an integer >= 0"),
        (dict(seed=-1), "seed must be an integer"),
        (dict(stop=["ok", ""]), "stop must be a list of non-empty strings"),
        # Positive but not computable (or not meaningful): refused, not clamped.
        (dict(temperature=1e-38), r"temperature must be 0 \(greedy\) or in \[0.001, 100\], got 1e-38"),
        (dict(temperature=1.401298464324817e-45),
         r"temperature must be 0 \(greedy\) or in \[0.001, 100\], got 1.401298464324817e-45"),
        (dict(temperature=0.000999), r"temperature must be 0 \(greedy\) or in \[0.001, 100\], got 0.000999"),
        (dict(temperature=100.5), r"temperature must be 0 \(greedy\) or in \[0.001, 100\], got 100.5"),
        (dict(temperature=float("nan")), "temperature must be >= 0, got nan"),
        (dict(temperature=float("inf")), "temperature must be >= 0, got inf"),
        (dict(top_p=float("nan")), r"top_p must be in \(0, 1\], got nan"),
        (dict(top_p=1e-46), r"top_p must be at least 1e-06 \(anything smaller keeps only the most likely token "
                            r"already\), got 1e-46"),
        (dict(top_p=9e-7), "top_p must be at least 1e-06"),
        (dict(top_k=MAX_TOP_K + 1), f"top_k must be at most {MAX_TOP_K} \\(a top_k at or above the vocabulary"),
        (dict(seed=2**64), r"seed must be an integer in \[0, 2\^64\), got 18446744073709551616"),
        (dict(stop=["s"] * 17), "stop has 17 strings; at most 16 are allowed"),
        (dict(stop=["ok", "x" * 257]), "stop\\[1\\] is 257 characters long; at most 256 are allowed"),
    ],
)
def test_validation_names_the_field(kwargs, message):
    with pytest.raises(InvalidRequestError, match=message):
        SamplingParams(**kwargs).validate()


def test_the_bounds_themselves_are_accepted_also_as_float32_rounds_them():
    f32 = lambda x: struct.unpack("<f", struct.pack("<f", x))[0]  # noqa: E731 - what a gRPC float field carries
    assert f32(MIN_TOP_P) < MIN_TOP_P  # 1e-6 arrives as 9.99999997e-07
    for kw in (dict(temperature=MIN_TEMPERATURE), dict(temperature=f32(MIN_TEMPERATURE)),
               dict(temperature=MAX_TEMPERATURE), dict(top_p=MIN_TOP_P), dict(top_p=f32(MIN_TOP_P)),
               dict(top_k=MAX_TOP_K), dict(seed=2**64 - 1),
               dict(stop=["x" * MAX_STOP_CHARS] * MAX_STOP_STRINGS)):
        SamplingParams(**kw).validate()


def test_stop_accepts_a_single_string():
    assert SamplingParams(stop="END").stop == ("END",)


def test_top_k_and_top_p_filter_exactly():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    p = _filter_logits(logits, [SamplingParams(temperature=1.0, top_k=2)])
    assert torch.allclose(p, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    # top_p keeps tokens while the mass *before* them is below top_p: 0, 0.5, 0.8 -> first two for 0.7.
    p = _filter_logits(logits, [SamplingParams(temperature=1.0, top_p=0.7)])
    assert torch.allclose(p, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    p = _filter_logits(logits, [SamplingParams(temperature=1.0, top_p=0.5)])
    assert p.tolist() == [[1.0, 0.0, 0.0, 0.0]]
    # Rows are independent: a second row with other settings changes nothing in the first.
    both = _filter_logits(logits.repeat(2, 1), [SamplingParams(temperature=1.0, top_p=0.5),
                                                SamplingParams(temperature=2.0, top_k=3)])
    assert both[0].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert both[1, 3] == 0.0 and both[1, 2] > 0.0


def test_sampler_greedy_rows_and_seeded_draws():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(), SamplingParams(temperature=1.0, seed=7), SamplingParams(temperature=1.0, seed=7)]
    shared = torch.Generator().manual_seed(0)
    gens = [None, make_generator(7), make_generator(7)]
    first = sample(logits, params, gens, shared)
    assert first[0] == int(logits[0].argmax())
    # Fresh generators with the same seed reproduce the same draws exactly.
    again = sample(logits, params, [None, make_generator(7), make_generator(7)], shared)
    assert again == first


def test_same_seed_same_output_alone_and_batched(demo):
    prompt = demo.tokenizer.encode("The quick brown fox")
    params = SamplingParams(max_tokens=24, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    [alone] = engine_for(demo).generate([prompt], params)
    others = [demo.tokenizer.encode(t) for t in ("jumps over", "the lazy dog and keeps running")]
    batch = engine_for(demo, max_num_batched_tokens=8).generate(
        [others[0], prompt, others[1]],
        [SamplingParams(max_tokens=30, temperature=0.7, ignore_eos=True), params,
         SamplingParams(max_tokens=5, temperature=1.3, seed=9, ignore_eos=True)],
    )
    assert batch[1].new_token_ids == alone.new_token_ids
    assert len(alone.new_token_ids) == 24
    other_seed = SamplingParams(max_tokens=24, temperature=1.0, top_p=0.9, seed=4321, ignore_eos=True)
    [different] = engine_for(demo).generate([prompt], other_seed)
    assert different.new_token_ids != alone.new_token_ids


def test_top_k_1_equals_greedy(demo):
    prompts = [demo.tokenizer.encode(t) for t in ("Once upon a time", "abc", "prefix caching")]
    engine = engine_for(demo)
    greedy = engine.generate(prompts, SamplingParams(max_tokens=20, ignore_eos=True))
    top1 = engine.generate(prompts, SamplingParams(max_tokens=20, temperature=1.5, top_k=1, ignore_eos=True))
    assert [o.new_token_ids for o in top1] == [o.new_token_ids for o in greedy]


# ---- numerical safety -------------------------------------------------------------------------------------
F32_MAX = float(np.finfo(np.float32).max)
EXTREME = [0.0, -0.0, 1.0, -1.0, F32_MAX, -F32_MAX, 1e30, -1e30, 1e-45, math.inf, -math.inf, math.nan]

accepted_params = st.builds(
    SamplingParams,
    max_tokens=st.just(1),
    temperature=st.one_of(st.just(0.0), st.sampled_from([MIN_TEMPERATURE, MAX_TEMPERATURE]),
                          st.floats(MIN_TEMPERATURE, MAX_TEMPERATURE)),
    top_p=st.one_of(st.sampled_from([MIN_TOP_P, 1.0]), st.floats(MIN_TOP_P, 1.0)),
    top_k=st.one_of(st.sampled_from([0, 1, MAX_TOP_K]), st.integers(0, 80)),
    seed=st.one_of(st.none(), st.sampled_from([0, 2**64 - 1]), st.integers(0, 2**64 - 1)),
)
logit_rows = st.integers(1, 64).flatmap(lambda vocab: hnp.arrays(
    np.float32, st.tuples(st.integers(1, 6), st.just(vocab)),
    elements=st.one_of(st.sampled_from(EXTREME), st.floats(width=32, allow_nan=True, allow_infinity=True))))


@settings(max_examples=300, deadline=None)
@given(logits=logit_rows, data=st.data())
def test_sample_never_raises_and_draws_in_range_for_every_accepted_setting(logits, data):
    n, vocab = logits.shape
    params = data.draw(st.lists(accepted_params, min_size=n, max_size=n), label="params")
    for p in params:
        p.validate()  # the strategy spans exactly what validation accepts, its bounds included
    t = torch.from_numpy(logits)
    out = sample(t, params, [make_generator(p.seed) for p in params], torch.Generator().manual_seed(0))
    assert not any(isinstance(x, SampleFailure) for x in out), out
    assert all(isinstance(x, int) and 0 <= x < vocab for x in out), out
    for row, token, p in zip(t, out, params):
        never = torch.isnan(row) | (row == -math.inf)
        if not bool(never.all()):
            # A NaN or -inf logit is never picked while its row has any other token.
            assert not bool(never[token]), (row.tolist(), token, p)
        if p.is_greedy and not bool(torch.isnan(row).any()):
            assert token == int(row.argmax())  # greedy is the plain argmax


def test_a_row_that_no_filter_can_compute_fails_alone():
    logits = torch.randn(3, 20, generator=torch.Generator().manual_seed(3))
    # A row whose parameters bypassed validation (top_k is not an integer) breaks the batched filter: the
    # sampler filters row by row, so only that row fails and the others draw exactly what they draw alone.
    bad = SamplingParams(temperature=1.0, top_k="many")  # type: ignore[arg-type]
    params = [SamplingParams(temperature=0.7, seed=5), bad, SamplingParams(temperature=1.3, top_p=0.8, seed=6)]
    out = sample(logits, params, [make_generator(5), None, make_generator(6)], torch.Generator().manual_seed(0))
    assert isinstance(out[1], SampleFailure) and type(out[1].error) is TypeError
    alone = [sample(logits[i:i + 1], [params[i]], [make_generator(params[i].seed)], torch.Generator())[0]
             for i in (0, 2)]
    assert [out[0], out[2]] == alone


def test_rows_without_any_finite_logit_keep_their_greedy_pick():
    logits = torch.tensor([[-math.inf, -math.inf, -math.inf], [math.nan, math.nan, math.nan],
                           [math.nan, -math.inf, 2.0], [math.inf, 1.0, math.inf]])
    params = [SamplingParams(temperature=1.0, seed=1)] * 4
    out = sample(logits, params, [make_generator(1) for _ in params], torch.Generator().manual_seed(0))
    assert out[:3] == [0, 0, 2]
    assert out[3] in (0, 2)  # +inf ties: either one, never the finite 1.0


def test_top_p_below_one_over_vocab_and_a_minimum_temperature_are_exact_greedy_here():
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(4)) * 30
    greedy = logits.argmax(dim=1).tolist()
    for p in (SamplingParams(temperature=MAX_TEMPERATURE, top_p=MIN_TOP_P, seed=2**64 - 1),
              SamplingParams(temperature=MAX_TEMPERATURE, top_k=1),
              SamplingParams(temperature=MIN_TEMPERATURE)):  # logit gaps here are >> 1e-3 * 50
        assert sample(logits, [p] * 4, [make_generator(p.seed)] * 4, torch.Generator().manual_seed(0)) == greedy


def test_a_row_without_top_p_keeps_its_tail_beside_a_top_p_row():
    # One dominant token and a tail whose float32 cumulative sum reaches 1.0 before its end: with a threshold of
    # 1.0 the tail would be dropped whenever another row of the batch uses top-p.
    logits = torch.cat([torch.tensor([[30.0]]), torch.zeros(1, 999)], dim=1)
    both = _filter_logits(logits.repeat(2, 1), [SamplingParams(temperature=1.0),
                                                SamplingParams(temperature=1.0, top_p=0.5)])
    alone = _filter_logits(logits, [SamplingParams(temperature=1.0)])
    assert torch.equal(both[0], alone[0]) and bool((alone[0, 1:] > 0).all())


def test_greedy_takes_the_first_of_tied_maxima_as_torch_argmax_does():
    """The CPU greedy pick (numpy's argmax, faster than torch's) keeps torch's tie rule: the first maximum."""
    logits = torch.randn(4, 32000, generator=torch.Generator().manual_seed(5))
    for r, cols in enumerate(((7, 9), (31999, 0), (100, 101, 20000), (5,))):
        for c in cols:
            logits[r, c] = 50.0
    greedy = SamplingParams(max_tokens=1)
    out = sample(logits, [greedy] * 4, [None] * 4, torch.Generator().manual_seed(0))
    assert out == logits.argmax(dim=1).tolist() == [7, 0, 100, 5]
