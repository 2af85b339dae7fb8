"""The sampler that turns logits into next tokens (its parameters: ``cache_service.records.SamplingParams``).

Reproducibility contract: a request with a ``seed`` draws every token from its *own* ``torch.Generator``
(one draw per generated token), so its output depends only on its own logits and seed, never on which other
requests happen to share the batch. Filtering (temperature, top-k, top-p) is row-wise, so doing it for the
whole batch at once changes nothing per row.
"""

from __future__ import annotations

from typing import Sequence

import torch

from cache_service.records import SamplingParams


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
