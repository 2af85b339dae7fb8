"""Tokenizers: a thin wrapper over ``tokenizers.Tokenizer`` (tokenizer.json), and the demo's byte tokenizer.

Both expose the same small surface the engine and the router need: ``encode`` / ``decode`` plus the special ids.
Decoding never raises on a partial UTF-8 sequence (a stream cut in the middle of a character): the broken
bytes come out as U+FFFD, so incremental detokenization can simply re-decode a growing suffix.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from workers.model.config import ModelLoadError


class Tokenizer:
    """Common interface. ``vocab_size`` counts every id the tokenizer can produce (added tokens included)."""

    vocab_size: int
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        raise NotImplementedError

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        raise NotImplementedError


class HFTokenizer(Tokenizer):
    """tokenizer.json via the ``tokenizers`` package (BOS handling comes from its post-processor)."""

    def __init__(self, path: Path, eos_token_ids: tuple[int, ...], bos_token_id: int | None) -> None:
        from tokenizers import Tokenizer as _RawTokenizer  # local: keep `import workers.model` light

        try:
            self._tok = _RawTokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception on malformed files
            raise ModelLoadError(f"tokenizer.json cannot be parsed ({path}): {exc}") from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eos_token_ids = eos_token_ids
        self.bos_token_id = bos_token_id

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be str, got {type(text).__name__}")
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(t) for t in token_ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)


class ByteTokenizer(Tokenizer):
    """The demo tokenizer: one id per UTF-8 byte (0..255), then BOS, EOS and PAD specials."""

    BOS, EOS, PAD = 256, 257, 258
    NUM_SPECIALS = 3

    def __init__(self) -> None:
        self.vocab_size = 256 + self.NUM_SPECIALS
        self.eos_token_ids = (self.EOS,)
        self.bos_token_id = self.BOS

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be str, got {type(text).__name__}")
        ids = list(text.encode("utf-8"))
        return [self.BOS, *ids] if add_special_tokens else ids

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        out = bytearray()
        parts: list[str] = []
        names = {self.BOS: "<s>", self.EOS: "</s>", self.PAD: "<pad>"}
        for t in token_ids:
            t = int(t)
            if 0 <= t < 256:
                out.append(t)
            elif t in names:
                if not skip_special_tokens:
                    parts.append(out.decode("utf-8", errors="replace"))
                    out.clear()
                    parts.append(names[t])
            else:
                raise ValueError(f"token id {t} is outside the byte tokenizer's vocabulary (0..{self.vocab_size - 1})")
        parts.append(out.decode("utf-8", errors="replace"))
        return "".join(parts)


def _special_ids_from_tokenizer_config(folder: Path, tok: HFTokenizer) -> tuple[int | None, int | None]:
    """bos/eos ids named in tokenizer_config.json (used only when config.json names none)."""
    path = folder / "tokenizer_config.json"
    if not path.is_file():
        return None, None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None, None

    def lookup(key: str) -> int | None:
        value = raw.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        return tok.token_to_id(value) if isinstance(value, str) else None

    return lookup("bos_token"), lookup("eos_token")


def load_hf_tokenizer(folder: Path, eos_token_ids: tuple[int, ...], bos_token_id: int | None) -> HFTokenizer:
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise ModelLoadError(f"tokenizer.json not found in {folder} (only the fast-tokenizer format is supported)")
    tok = HFTokenizer(path, eos_token_ids, bos_token_id)
    if not eos_token_ids or bos_token_id is None:
        bos, eos = _special_ids_from_tokenizer_config(folder, tok)
        if bos_token_id is None:
            tok.bos_token_id = bos
        if not eos_token_ids and eos is not None:
            tok.eos_token_ids = (eos,)
    return tok
