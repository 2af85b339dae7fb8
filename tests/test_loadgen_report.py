"""loadgen/report.py: the summary of a run's results."""

from __future__ import annotations

import pytest

from loadgen.report import summarize


def test_summary_counts_tokens_and_percentiles():
    rows = [dict(request_id=str(i), group="0", tenant="", start_s=float(i), ttft_s=0.1 * (i + 1), latency_s=1.0,
                 prompt_tokens=100, completion_tokens=10, cached_tokens=50 * (i % 2), predicted_cached_tokens=50,
                 transferred_tokens=0, worker=f"worker-{i % 2}", finish_reason="length", itl_s=0.01, queue_s=0.0,
                 error=None) for i in range(4)]
    rows.append(dict(rows[0], request_id="x", error="UNAVAILABLE: gone"))
    s = summarize(rows, wall_s=2.0)
    assert (s["num_ok"], s["num_errors"], s["errors"]) == (4, 1, {"UNAVAILABLE": 1})
    assert (s["prompt_tokens"], s["cached_tokens"], s["hit_rate"], s["prediction_accuracy"]) == (400, 100, 0.25, 0.5)
    # TTFTs 0.1 .. 0.4: percentiles interpolate linearly between ranks (loadgen/stats.py)
    assert s["ttft_s"]["p50"] == pytest.approx(0.25) and s["ttft_s"]["p99"] == pytest.approx(0.397)
    assert s["per_worker"]["worker-1"]["hit_rate"] == 0.5 and s["per_worker"]["worker-0"]["hit_rate"] == 0.0
    assert s["requests_per_s"] == 2.0


def test_summary_of_no_successful_request_has_no_percentiles():
    row = dict(request_id="x", group="0", tenant="", start_s=0.0, ttft_s=None, latency_s=None, prompt_tokens=0,
               completion_tokens=0, cached_tokens=0, predicted_cached_tokens=0, transferred_tokens=0, worker="",
               finish_reason="", itl_s=None, queue_s=0.0, error="UNAVAILABLE: gone")
    s = summarize([row], wall_s=1.0)
    assert s["num_ok"] == 0 and s["hit_rate"] is None
    assert s["ttft_s"] == {"mean": None, "p50": None, "p90": None, "p99": None}
