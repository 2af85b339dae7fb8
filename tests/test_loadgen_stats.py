"""loadgen/stats.py: the project's one percentile definition."""

import numpy as np
import pytest

from loadgen.stats import percentile


def test_percentile_interpolates_linearly_between_ranks():
    xs = [0.4, 0.1, 0.3, 0.2]  # order does not matter
    assert percentile(xs, 0) == 0.1 and percentile(xs, 100) == 0.4
    assert percentile(xs, 50) == pytest.approx(0.25)  # the usual median: mean of the middle two
    assert percentile(xs, 99) == pytest.approx(0.1 + 0.99 * 3 * 0.1)
    assert percentile([7.0], 99) == 7.0


def test_percentile_is_numpys_default_for_lists_and_arrays():
    rng = np.random.default_rng(0)
    a = rng.exponential(size=101)
    for q in (1, 50, 90, 99):
        assert percentile(a, q) == float(np.percentile(a, q)) == percentile(a.tolist(), q)


def test_percentile_of_nothing_is_none_and_q_is_checked():
    assert percentile([], 50) is None and percentile(np.array([]), 99) is None
    with pytest.raises(ValueError):
        percentile([1.0], 101)
