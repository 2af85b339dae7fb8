"""Sampling parameters, their validation, and the sampler that turns logits into next tokens.

Reproducibility contract: a request with a ``seed`` draws every token from its *own* ``torch.Generator``
(one draw per generated token), so its output depends only on its own logits and seed, never on which other
requests happen to share the batch. Filtering (temperature, top-k, top-p) is row-wise, so doing it for the
whole batch at once changes nothing per row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch


class InvalidRequestError(ValueError):
    """A request that can never be served as given; the message names the offending field."""


@dataclass(slots=True)
class SamplingParams:
    max_tokens: int = 16
    # 0 means greedy. Also the proto3 default, so an unset gRPC field and an unset JSONL field agree.
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = disabled
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        elif not isinstance(self.stop, tuple):
            self.stop = tuple(self.stop)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self) -> None:
        """Checks that do not depend on the prompt or the model (raises ``InvalidRequestError``)."""
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            raise InvalidRequestError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not _is_number(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidRequestError(f"temperature must be >= 0, got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise InvalidRequestError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed < 2**64):
            raise InvalidRequestError(f"seed must be an integer in [0, 2^64), got {self.seed!r}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise InvalidRequestError(f"stop must be a list of non-empty strings, got {list(self.stop)!r}")
        if not isinstance(self.ignore_eos, bool):
            raise InvalidRequestError(f"ignore_eos must be a boolean, got {self.ignore_eos!r}")


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def make_generator(seed: int | None) -> torch.Generator | None:
    """The per-request generator for seeded requests (``None``: draw from the engine's shared one)."""
    if seed is None:
        return None
    g = torch.Generator(device="cpu")
    g.manual_seed(seed % 2**63)  # manual_seed takes a signed 64-bit value
    return g


def _filter_logits(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Temperature, then top-k, then top-p, row by row; returns probabilities [n, vocab]."""
    temps = torch.tensor([p.temperature for p in params], dtype=logits.dtype).unsqueeze(1)
    logits = logits / temps
    vocab = logits.shape[1]
    top_ks = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    if any(k < vocab for k in top_ks):
        k_max = max(top_ks)
        top_vals = logits.topk(k_max, dim=1).values  # sorted, descending
        kth = top_vals.gather(1, torch.tensor(top_ks).sub(1).unsqueeze(1))
        logits = logits.masked_fill(logits < kth, float("-inf"))
    top_ps = [p.top_p for p in params]
    if any(p < 1.0 for p in top_ps):
        sorted_logits, order = logits.sort(dim=1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=1)
        # Mass strictly before each token: a token is kept while that is below top_p (so the first always is).
        mass_before = sorted_probs.cumsum(dim=1) - sorted_probs
        drop_sorted = mass_before >= torch.tensor(top_ps, dtype=logits.dtype).unsqueeze(1)
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(dim=1)


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    default_generator: torch.Generator,
) -> list[int]:
    """One next token per row of ``logits`` ([n, vocab] fp32 on any device)."""
    num_rows = logits.shape[0]
    assert num_rows == len(params) == len(generators)
    out = logits.argmax(dim=1).tolist()  # greedy rows are done; sampled rows are overwritten below
    rows = [i for i, p in enumerate(params) if not p.is_greedy]
    if not rows:
        return out
    probs = _filter_logits(logits[rows].float().cpu(), [params[i] for i in rows])
    for j, i in enumerate(rows):
        g = generators[i] or default_generator
        out[i] = int(torch.multinomial(probs[j], 1, generator=g))
    return out
