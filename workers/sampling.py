"""The sampler that turns logits into next tokens (its parameters: ``cache_service.records.SamplingParams``).

Reproducibility contract: a request with a ``seed`` draws every token from its *own* ``torch.Generator``
(one draw per generated token), so its output depends only on its own logits and seed, never on which other
requests happen to share the batch. Filtering (temperature, top-k, top-p) is row-wise, so doing it for the
whole batch at once changes nothing per row.

Isolation contract: one row can never fail the others. The filter is numerically safe for every parameter
``SamplingParams.validate`` accepts and for any logits (NaN, +-inf, huge values): in float32, the row max is
subtracted before dividing by the temperature, so every value is in [-inf, 0] with the best token at exactly 0
and the softmax is finite with that token > 0; the most likely token survives every mask. A row with no finite
logit at all keeps its greedy pick, and a row whose filtering or draw still raises (parameters that bypassed
validation, a bug) comes back as a ``SampleFailure`` for that row alone: its request fails, the batch goes on.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import numpy as np
import torch

from cache_service.records import MIN_TEMPERATURE, SamplingParams

_NEG_INF = float("-inf")
_F32_MAX = torch.finfo(torch.float32).max


class SampleFailure(NamedTuple):
    """A row the sampler could not draw from: its request fails alone."""

    error: Exception


def make_generator(seed: int | None) -> torch.Generator | None:
    """The per-request generator for seeded requests (``None``: draw from the engine's shared one)."""
    if seed is None:
        return None
    g = torch.Generator(device="cpu")
    g.manual_seed(seed % 2**63)  # manual_seed takes a signed 64-bit value
    return g


def _filter_logits(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Temperature, then top-k, then top-p, row by row; returns float32 probabilities [n, vocab].

    Every row is finite and sums to 1, except a row that had no finite logit (all NaN / -inf), which is NaN
    (the caller keeps its greedy pick).
    """
    # NaN is never a candidate (-inf stays -inf: nan_to_num's default would make it finite); +inf becomes the
    # largest finite value, so that subtracting the row max leaves 0 there (inf - inf would be NaN).
    x = torch.nan_to_num(logits.float(), nan=_NEG_INF, posinf=_F32_MAX, neginf=_NEG_INF)
    row_max = x.amax(dim=1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))  # all -inf: stays -inf
    # The max first, then the temperature: (x - max) is in [-inf, 0], so no temperature > 0 can overflow to
    # +inf (logits / 1e-38 did, and softmax(inf) is NaN); an overflow goes to -inf, which is just "never".
    # The clamp is a no-op for validated parameters and keeps 0 / 0 out for any that bypassed validation.
    temps = torch.tensor([max(p.temperature, MIN_TEMPERATURE) for p in params], dtype=torch.float32).unsqueeze(1)
    x = (x - row_max) / temps
    vocab = x.shape[1]
    top_ks = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    if any(k < vocab for k in top_ks):
        k_max = max(top_ks)
        top_vals = x.topk(k_max, dim=1).values  # sorted, descending
        kth = top_vals.gather(1, torch.tensor(top_ks).sub(1).unsqueeze(1))
        x = x.masked_fill(x < kth, _NEG_INF)  # the max is >= kth: it always survives
    # A row without top-p gets an infinite threshold (not 1.0): its cumulative sum may round to 1.0 before the
    # last tokens, and sharing a batch with a top-p row must not drop its tail.
    top_ps = [p.top_p if p.top_p < 1.0 else math.inf for p in params]
    if any(p < math.inf for p in top_ps):
        sorted_x, order = x.sort(dim=1, descending=True)
        sorted_probs = sorted_x.softmax(dim=1)
        # Mass strictly before each token: a token is kept while that is below top_p.
        mass_before = sorted_probs.cumsum(dim=1) - sorted_probs
        drop_sorted = mass_before >= torch.tensor(top_ps, dtype=torch.float32).unsqueeze(1)
        # The most likely token always stays: a top_p that rounds to 0 in float32 would drop every token.
        drop_sorted[:, 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        x = x.masked_fill(drop, _NEG_INF)
    return x.softmax(dim=1)


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    default_generator: torch.Generator,
) -> list[int | SampleFailure]:
    """One next token per row of ``logits`` ([n, vocab] fp32 on any device), or that row's ``SampleFailure``."""
    num_rows = logits.shape[0]
    assert num_rows == len(params) == len(generators)
    if logits.device.type == "cpu" and logits.dtype == torch.float32:
        # numpy's argmax has torch's semantics (the first maximum; a NaN ranks above everything) and at 16 x
        # 32000 logits takes 0.08 ms where torch's CPU argmax takes 0.6-1.7 ms (measured, 2 threads).
        greedy = torch.from_numpy(np.argmax(logits.detach().numpy(), axis=1))
    else:
        greedy = logits.argmax(dim=1)
    # argmax ranks NaN above everything, and a NaN logit must not be the greedy pick: such rows pick again
    # without their NaNs. Checking the n picked values, not copying all [n, vocab] logits every step, keeps the
    # greedy path as it was. Sampled rows are overwritten below.
    nan_rows = torch.isnan(logits.gather(1, greedy.unsqueeze(1))).squeeze(1)
    if bool(nan_rows.any()):
        greedy = torch.where(nan_rows, torch.nan_to_num(logits, nan=_NEG_INF, posinf=math.inf, neginf=_NEG_INF)
                             .argmax(dim=1), greedy)
    out: list[int | SampleFailure] = greedy.tolist()
    rows = [i for i, p in enumerate(params) if not p.is_greedy]
    if not rows:
        return out
    sub = logits[rows].float().cpu()
    sub_params = [params[i] for i in rows]
    try:
        probs: torch.Tensor | None = _filter_logits(sub, sub_params)
    except Exception:  # noqa: BLE001 - some row's parameters broke the batched filter: go row by row
        probs = None
    for j, i in enumerate(rows):
        try:
            p = probs[j] if probs is not None else _filter_logits(sub[j:j + 1], [sub_params[j]])[0]
            if not bool(torch.isfinite(p).all()):
                continue  # no finite logit in this row: it keeps its greedy pick
            out[i] = int(torch.multinomial(p, 1, generator=generators[i] or default_generator))
        except Exception as exc:  # noqa: BLE001 - this row's failure is its request's alone
            out[i] = SampleFailure(exc)
    return out
