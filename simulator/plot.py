"""A run's PNG: block hit rate over simulated time, and prefill tokens per node."""

from __future__ import annotations

import os
from typing import Any


def plot_result(result: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
    tl = [p for p in result.get("timeline") or [] if p["block_hit_rate"] is not None]
    ax1.plot([p["t_s"] for p in tl], [100 * p["block_hit_rate"] for p in tl], marker=".")
    if result.get("block_hit_rate") is not None:
        ax1.axhline(100 * result["block_hit_rate"], linestyle="--", color="gray", label="whole run")
        ax1.legend()
    ax1.set_xlabel("simulated time (s)")
    ax1.set_ylabel("block hit rate (%)")
    ax1.set_title("hit rate over time")
    nodes = result.get("nodes") or []
    ax2.bar(range(len(nodes)), [n["num_prefill_tokens"] / 1e6 for n in nodes])
    ax2.set_xlabel("node")
    ax2.set_ylabel("prefill tokens computed (M)")
    ax2.set_title(f"per-node load (imbalance {result.get('load_imbalance')})")
    cfg = result.get("config", {})
    trace = os.path.basename(str(cfg.get("trace", "")))
    fig.suptitle(f"{trace}  {cfg.get('num_nodes')} nodes x {cfg.get('capacity_tokens')} tokens"
                 f"  policy {cfg.get('policy')}  transfer {'on' if cfg.get('transfer') else 'off'}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
