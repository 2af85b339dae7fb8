"""Summaries and plots of `prefixcache bench` results (JSON in, numbers and PNGs out).

A results file is ``{"meta": {...}, "summary": {...}, "requests": [RequestResult.to_json(), ...]}``. Plots use
matplotlib's Agg backend (no display) and small figures so a PNG stays well under 200 KB.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import matplotlib

from loadgen.stats import percentile

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

_NUM_BINS = 24


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def summarize(requests: list[dict], wall_s: float) -> dict:
    ok = [r for r in requests if r["error"] is None]
    ttfts = [r["ttft_s"] for r in ok if r["ttft_s"] is not None]
    lats = [r["latency_s"] for r in ok if r["latency_s"] is not None]
    itls = [r["itl_s"] for r in ok if r["itl_s"] is not None]
    prompt = sum(r["prompt_tokens"] for r in ok)
    cached = sum(r["cached_tokens"] for r in ok)
    predicted = sum(r["predicted_cached_tokens"] for r in ok)
    per_worker: dict[str, dict] = defaultdict(lambda: {"num_requests": 0, "prompt_tokens": 0, "cached_tokens": 0})
    per_tenant: dict[str, dict] = defaultdict(lambda: {"num_requests": 0, "prompt_tokens": 0, "cached_tokens": 0})
    for r in ok:
        for key, table in ((r["worker"] or "?", per_worker), (r["tenant"] or "default", per_tenant)):
            row = table[key]
            row["num_requests"] += 1
            row["prompt_tokens"] += r["prompt_tokens"]
            row["cached_tokens"] += r["cached_tokens"]
    for table in (per_worker, per_tenant):
        for row in table.values():
            row["hit_rate"] = _ratio(row["cached_tokens"], row["prompt_tokens"])
    errors: dict[str, int] = defaultdict(int)
    for r in requests:
        if r["error"] is not None:
            errors[r["error"].split(":")[0]] += 1
    return {
        "num_requests": len(requests),
        "num_ok": len(ok),
        "num_errors": len(requests) - len(ok),
        "errors": dict(errors),
        "wall_s": wall_s,
        "requests_per_s": _ratio(len(ok), wall_s),
        "output_tokens_per_s": _ratio(sum(r["completion_tokens"] for r in ok), wall_s),
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "transferred_tokens": sum(r["transferred_tokens"] for r in ok),
        "hit_rate": _ratio(cached, prompt),
        # Realised / predicted cached tokens: 1.0 means the router's index was exact.
        "prediction_accuracy": _ratio(cached, predicted),
        "predicted_cached_tokens": predicted,
        "ttft_s": {"mean": _ratio(sum(ttfts), len(ttfts)), "p50": percentile(ttfts, 50),
                   "p90": percentile(ttfts, 90), "p99": percentile(ttfts, 99)},
        "latency_s": {"mean": _ratio(sum(lats), len(lats)), "p50": percentile(lats, 50),
                      "p99": percentile(lats, 99)},
        "itl_s": {"mean": _ratio(sum(itls), len(itls)), "p50": percentile(itls, 50),
                  "p99": percentile(itls, 99)},
        "per_worker": dict(sorted(per_worker.items())),
        "per_tenant": dict(sorted(per_tenant.items())),
    }


def _bins(requests: list[dict]) -> tuple[list[float], list[float | None], list[float | None], list[float | None]]:
    """Per time bin (by the time a request was issued): bin centre, hit rate, cumulative hit rate, median TTFT."""
    ok = [r for r in requests if r["error"] is None and r["latency_s"] is not None]
    if not ok:
        return [], [], [], []
    end = max(r["start_s"] for r in ok) * (1 + 1e-9) or 1.0
    width = end / _NUM_BINS
    prompt = [0] * _NUM_BINS
    cached = [0] * _NUM_BINS
    ttfts: list[list[float]] = [[] for _ in range(_NUM_BINS)]
    for r in ok:
        i = min(_NUM_BINS - 1, int(r["start_s"] / width))
        prompt[i] += r["prompt_tokens"]
        cached[i] += r["cached_tokens"]
        if r["ttft_s"] is not None:
            ttfts[i].append(r["ttft_s"])
    centres = [(i + 0.5) * width for i in range(_NUM_BINS)]
    rate = [_ratio(cached[i], prompt[i]) for i in range(_NUM_BINS)]
    cum, run_p, run_c = [], 0, 0
    for i in range(_NUM_BINS):
        run_p += prompt[i]
        run_c += cached[i]
        cum.append(_ratio(run_c, run_p))
    med = [percentile(t, 50) for t in ttfts]
    return centres, rate, cum, med


def _points(xs: list[float], ys: list[float | None]) -> tuple[list[float], list[float]]:
    pairs = [(x, y) for x, y in zip(xs, ys) if y is not None]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def plot_timeline(result: dict, path: Path) -> Path:
    """Hit rate and TTFT over time for one run."""
    requests = result["requests"]
    label = result["meta"].get("policy_label") or "run"
    centres, rate, cum, med = _bins(requests)
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7, 5.2), sharex=True)
    ax1.plot(*_points(centres, rate), marker="o", ms=3, label="per interval")
    ax1.plot(*_points(centres, cum), linestyle="--", label="cumulative")
    ax1.set_ylabel("prefix-cache hit rate\n(cached / prompt tokens)")
    ax1.set_ylim(0, 1)
    ax1.legend(loc="upper left", fontsize=8)
    ax1.grid(alpha=0.3)
    ok = [r for r in requests if r["error"] is None and r["ttft_s"] is not None]
    ax2.scatter([r["start_s"] for r in ok], [r["ttft_s"] for r in ok], s=4, alpha=0.35, label="request")
    ax2.plot(*_points(centres, med), color="C3", label="median per interval")
    ax2.set_ylabel("TTFT (s)")
    ax2.set_xlabel("request issued at (s since start)")
    ax2.legend(loc="upper right", fontsize=8)
    ax2.grid(alpha=0.3)
    fig.suptitle(f"{result['meta'].get('workload', '')}: {label}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_compare(results: list[dict], path: Path) -> Path:
    """Several runs (one per policy) side by side: hit rate and median TTFT over time, and their totals."""
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    labels = []
    for i, result in enumerate(results):
        label = result["meta"].get("policy_label") or f"run {i}"
        labels.append(label)
        centres, _rate, cum, med = _bins(result["requests"])
        axes[0].plot(*_points(centres, cum), color=f"C{i}", label=label)
        axes[1].plot(*_points(centres, med), color=f"C{i}", label=label)
    axes[0].set_title("cumulative hit rate", fontsize=10)
    axes[0].set_ylim(0, 1)
    axes[0].set_xlabel("time (s)")
    axes[1].set_title("median TTFT per interval (s)", fontsize=10)
    axes[1].set_xlabel("time (s)")
    for ax in axes[:2]:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    # Totals: hit rate on the left axis, TTFT p50/p99 on the right one.
    xs = range(len(results))
    hit = [r["summary"]["hit_rate"] or 0.0 for r in results]
    p50 = [r["summary"]["ttft_s"]["p50"] or 0.0 for r in results]
    p99 = [r["summary"]["ttft_s"]["p99"] or 0.0 for r in results]
    ax = axes[2]
    ax.bar([x - 0.27 for x in xs], hit, width=0.27, color="C0", label="hit rate")
    ax.set_ylim(0, 1)
    ax.set_ylabel("hit rate")
    ax_r = ax.twinx()
    ax_r.bar(list(xs), p50, width=0.27, color="C1", label="TTFT p50")
    ax_r.bar([x + 0.27 for x in xs], p99, width=0.27, color="C3", label="TTFT p99")
    ax_r.set_ylabel("TTFT (s)")
    ax.set_xticks(list(xs), labels, fontsize=8)
    ax.set_title("totals", fontsize=10)
    handles = ax.get_legend_handles_labels()
    handles_r = ax_r.get_legend_handles_labels()
    # On the twin axis: it is drawn last, so nothing covers the legend.
    ax_r.legend(handles[0] + handles_r[0], handles[1] + handles_r[1], fontsize=7, loc="upper center",
                bbox_to_anchor=(0.5, -0.12), ncol=3, frameon=False)
    workload = results[0]["meta"].get("workload", "") if results else ""
    fig.suptitle(f"{workload}: policies compared", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
