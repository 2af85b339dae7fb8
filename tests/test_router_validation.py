"""Request validation at the router's edge: every rejection names the problem."""

from __future__ import annotations

import pytest

from router.tokenize import PromptEncoder
from router.validation import DEFAULT_MAX_TOKENS, GenerateArgs, validate_generate
from workers.model.tokenizer import ByteTokenizer
from cache_service.records import InvalidRequestError


@pytest.fixture(scope="module")
def encoder() -> PromptEncoder:
    return PromptEncoder("demo", 16)


def test_text_is_tokenized_and_defaults_apply(encoder):
    v = validate_generate(GenerateArgs(text="hi"), encoder)
    assert v.prompt_ids == [ByteTokenizer.BOS, ord("h"), ord("i")]
    assert v.params.max_tokens == DEFAULT_MAX_TOKENS and v.params.top_p == 1.0 and v.params.temperature == 0.0
    assert len(v.request_id) == 32  # generated when absent


def test_token_ids_and_sampling_pass_through(encoder):
    v = validate_generate(GenerateArgs(request_id="r1", token_ids=[5, 6], max_tokens=3, temperature=0.5, top_p=0.9,
                                       top_k=4, seed=7, stop=["x"], ignore_eos=True, cache_salt="s",
                                       session_id="sess", target_worker="worker-1"), encoder)
    assert (v.request_id, v.prompt_ids, v.cache_salt, v.session_id, v.target_worker) == \
        ("r1", [5, 6], "s", "sess", "worker-1")
    p = v.params
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.seed, p.stop, p.ignore_eos) == \
        (3, 0.5, pytest.approx(0.9), 4, 7, ("x",), True)


@pytest.mark.parametrize("args, message", [
    (GenerateArgs(), "no prompt: set text or token_ids"),
    (GenerateArgs(text="a", token_ids=[1]), "both text and token_ids are set"),
    (GenerateArgs(token_ids=[1, 259]), "token id 259 at position 1 is outside the vocabulary of 'demo' (0..258)"),
    (GenerateArgs(token_ids=[1], max_tokens=4096), "prompt (1 tokens) + max_tokens (4096) = 4097 exceeds"),
    (GenerateArgs(token_ids=[1], top_p=2.0), "top_p must be in (0, 1], got 2.0"),
    (GenerateArgs(token_ids=[1], top_p=0.0), "top_p must be in (0, 1], got 0.0"),
    (GenerateArgs(token_ids=[1], max_tokens=0), "max_tokens must be a positive integer, got 0"),
    (GenerateArgs(token_ids=[1], temperature=-0.5), "temperature must be >= 0"),
    (GenerateArgs(token_ids=[1], stop=[""]), "stop must be a list of non-empty strings"),
    (GenerateArgs(token_ids=[1], cache_salt="x" * 300), "cache_salt is 300 characters long"),
])
def test_rejections_name_the_problem(encoder, args, message):
    with pytest.raises(InvalidRequestError) as err:
        validate_generate(args, encoder)
    assert message in str(err.value)


def test_cacheable_tokens_leave_the_last_token_to_prefill(encoder):
    assert encoder.cacheable_tokens(64, 4) == 48  # a fully cached 4-block prompt still prefills its last block
    assert encoder.cacheable_tokens(65, 4) == 64
    assert encoder.cacheable_tokens(65, 2) == 32
    assert encoder.cacheable_tokens(10, 0) == 0
