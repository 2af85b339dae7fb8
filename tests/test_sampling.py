"""Sampling: parameter validation, top-k / top-p filtering, and seeded reproducibility through the engine."""

from __future__ import annotations

import pytest
import torch

from workers.engine import Engine, EngineConfig
from workers.model import load_model
from cache_service.records import InvalidRequestError, SamplingParams
from workers.sampling import _filter_logits, make_generator, sample


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
    ],
)
def test_validation_names_the_field(kwargs, message):
    with pytest.raises(InvalidRequestError, match=message):
        SamplingParams(**kwargs).validate()


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
