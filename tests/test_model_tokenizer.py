"""Tokenizers: the demo byte tokenizer and the tokenizers-based wrapper round-trip text."""

from __future__ import annotations

import pytest

from model_fixtures import build_tokenizer
from workers.model import ByteTokenizer, HFTokenizer

TEXTS = ["", "hello world", "naïve café – 東京 🚀", "line\nbreak\ttab", "the cache block prefix token"]


@pytest.mark.parametrize("text", TEXTS)
def test_byte_tokenizer_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id == 256
    assert ids[1:] == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.encode(text, add_special_tokens=False) == ids[1:]


def test_byte_tokenizer_specials_and_partial_utf8():
    tok = ByteTokenizer()
    assert tok.vocab_size == 259 and tok.eos_token_ids == (257,)
    assert tok.decode([256, 104, 105, 257]) == "hi"
    assert tok.decode([256, 104, 105, 257], skip_special_tokens=False) == "<s>hi</s>"
    rocket = list("🚀".encode())
    assert tok.decode([104] + rocket[:2]) == "h\ufffd"  # a cut multi-byte character never raises
    assert tok.decode([104] + rocket) == "h🚀"
    with pytest.raises(ValueError, match="outside the byte tokenizer's vocabulary"):
        tok.decode([300])


@pytest.fixture(scope="module")
def hf_tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    build_tokenizer(320).save(str(path))
    return HFTokenizer(path, eos_token_ids=(1,), bos_token_id=0)


@pytest.mark.parametrize("text", TEXTS)
def test_hf_tokenizer_round_trip(hf_tok, text):
    ids = hf_tok.encode(text)
    assert ids[0] == 0  # the post-processor adds BOS
    assert all(0 <= i < hf_tok.vocab_size for i in ids)
    assert hf_tok.decode(ids) == text
    assert hf_tok.encode(text, add_special_tokens=False) == ids[1:]
    assert hf_tok.decode(ids, skip_special_tokens=False) == "<s>" + text


def test_hf_tokenizer_merges_and_specials(hf_tok):
    assert hf_tok.vocab_size == 320
    assert len(hf_tok.encode("the cache block prefix", add_special_tokens=False)) < len("the cache block prefix")
    assert hf_tok.decode([0, *hf_tok.encode("alpha", add_special_tokens=False), 1]) == "alpha"
