"""Small statistics shared by the benchmarks."""

from __future__ import annotations


def percentile(xs: list[float], q: float) -> float:
    """The sample at rank round(q% of n-1) of the sorted values (q in 0..100)."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]
