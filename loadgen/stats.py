"""The project's one percentile, so that figures from the bench CLI, the simulator and the benchmarks compare.

Definition: linear interpolation between the two closest ranks, numpy's default (``method="linear"``,
Hyndman & Fan type 7): for n sorted values and q in 0..100, position ``h = (n - 1) * q / 100`` and the result
``x[floor(h)] + (h - floor(h)) * (x[floor(h) + 1] - x[floor(h)])``. The median (q = 50) is therefore the
usual one (the mean of the two middle values for an even n, what ``statistics.median`` gives). It is computed
by numpy itself, so the simulator's figures stay bit-for-bit what they were.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def percentile(values: Sequence[float] | np.ndarray, q: float) -> float | None:
    """The q-th percentile (q in 0..100) of ``values`` by linear interpolation (module doc); None if empty."""
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in 0..100, got {q}")
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0:
        return None
    return float(np.percentile(a, q))
