"""What a simulation run reports: hit rates, load balance, TTFTs, transfers; JSON-ready."""

from __future__ import annotations

import math
from array import array
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from loadgen.stats import percentile

from .sim_request import SimRequest, hit_tokens


def format_percent(x: float | None) -> str:
    """A rate as the tables print it: 36.64%, or - for none."""
    return "-" if x is None else f"{100 * x:.2f}%"


@dataclass(slots=True)
class RunRecorder:
    """Per-request samples kept as compact arrays (a replicated trace has millions of requests)."""

    num_requests: int = 0
    num_rejected: int = 0
    num_blocks: int = 0
    num_local_hit_blocks: int = 0
    num_host_hit_blocks: int = 0
    num_disk_hit_blocks: int = 0
    num_transferred_blocks: int = 0
    num_transfers: int = 0
    num_prompt_tokens: int = 0
    num_hit_tokens: int = 0
    num_computed_tokens: int = 0
    num_predicted_blocks: int = 0
    num_prediction_exact: int = 0
    num_prediction_abs_err: int = 0
    first_arrival_s: float = math.inf
    last_finish_s: float = 0.0
    ttft_s: array = field(default_factory=lambda: array("d"))
    e2e_s: array = field(default_factory=lambda: array("d"))
    start_s: array = field(default_factory=lambda: array("d"))  # prefill start (timeline)
    blocks: array = field(default_factory=lambda: array("q"))
    hits: array = field(default_factory=lambda: array("q"))

    def record_prefill(self, req: SimRequest, block_size: int) -> None:
        """A request's prefill is done: count its blocks, hits and TTFT."""
        n = req.num_blocks
        hit = req.num_hit_blocks
        self.num_blocks += n
        self.num_local_hit_blocks += req.num_local_hit_blocks
        self.num_host_hit_blocks += req.num_host_hit_blocks
        self.num_disk_hit_blocks += req.num_disk_hit_blocks
        self.num_transferred_blocks += req.num_transferred_blocks
        self.num_transfers += 1 if req.num_transferred_blocks else 0
        self.num_prompt_tokens += req.num_prompt_tokens
        self.num_hit_tokens += hit_tokens(hit, block_size, req.num_prompt_tokens)
        self.num_computed_tokens += req.num_computed_tokens
        self.num_predicted_blocks += req.predicted_cached_blocks
        err = abs(req.predicted_cached_blocks - hit)
        self.num_prediction_exact += err == 0
        self.num_prediction_abs_err += err
        assert req.first_token_s is not None and req.prefill_start_s is not None
        self.ttft_s.append(req.first_token_s - req.arrival_s)
        self.start_s.append(req.prefill_start_s)
        self.blocks.append(n)
        self.hits.append(hit)

    def timeline(self, num_buckets: int = 60) -> list[dict[str, float]]:
        """Block hit rate per window of simulated time (by prefill start)."""
        if not self.start_s:
            return []
        t = np.frombuffer(self.start_s, dtype=np.float64)
        b = np.frombuffer(self.blocks, dtype=np.int64)
        h = np.frombuffer(self.hits, dtype=np.int64)
        lo, hi = float(t.min()), float(t.max())
        width = max((hi - lo) / num_buckets, 1e-9)
        idx = np.minimum(((t - lo) / width).astype(np.int64), num_buckets - 1)
        nb = np.bincount(idx, weights=b, minlength=num_buckets)
        nh = np.bincount(idx, weights=h, minlength=num_buckets)
        nr = np.bincount(idx, minlength=num_buckets)
        return [
            {"t_s": round(lo + (i + 0.5) * width, 3), "requests": int(nr[i]),
             "block_hit_rate": round(float(nh[i] / nb[i]), 5) if nb[i] else None}
            for i in range(num_buckets)
        ]


@dataclass(slots=True)
class NodeStats:
    worker_id: str
    num_requests: int
    num_prompt_tokens: int
    num_prefill_tokens: int
    num_cached_blocks: int  # in its pool (device) at the end
    num_host_blocks: int = 0  # in its lower tiers at the end
    num_disk_blocks: int = 0


@dataclass(slots=True)
class SimResult:
    config: dict[str, Any]
    recorder: RunRecorder
    nodes: list[NodeStats]
    elapsed_s: float  # wall time of the event loop
    cpu_s: float = 0.0  # its CPU time (the machine may be shared)

    def summary(self) -> dict[str, Any]:
        r = self.recorder
        ttft = np.frombuffer(r.ttft_s, dtype=np.float64)
        e2e = np.frombuffer(r.e2e_s, dtype=np.float64)
        prefill = np.array([n.num_prefill_tokens for n in self.nodes], dtype=np.float64)
        routed = np.array([n.num_prompt_tokens for n in self.nodes], dtype=np.float64)
        reqs = np.array([n.num_requests for n in self.nodes], dtype=np.float64)

        def imbalance(x: np.ndarray) -> float | None:
            return round(float(x.max() / x.mean()), 4) if x.size and x.mean() > 0 else None

        def rate(a: int, b: int) -> float | None:
            return round(a / b, 6) if b else None

        return {
            "requests": r.num_requests,
            "rejected": r.num_rejected,
            "block_hit_rate": rate(r.num_local_hit_blocks + r.num_transferred_blocks, r.num_blocks),
            "local_block_hit_rate": rate(r.num_local_hit_blocks, r.num_blocks),
            "token_hit_rate": rate(r.num_hit_tokens, r.num_prompt_tokens),
            "load_imbalance": imbalance(prefill),
            "routed_token_imbalance": imbalance(routed),
            "request_imbalance": imbalance(reqs),
            "ttft_p50_s": _round(percentile(ttft, 50)),
            "ttft_p99_s": _round(percentile(ttft, 99)),
            "ttft_mean_s": _round(float(ttft.mean()) if ttft.size else None),
            "e2e_p50_s": _round(percentile(e2e, 50)),
            "transferred_blocks": r.num_transferred_blocks,
            "transfers": r.num_transfers,
            # Hits by where they came from: the node's pool, its host and disk tiers, a peer (= transferred).
            "device_hit_blocks": r.num_local_hit_blocks - r.num_host_hit_blocks - r.num_disk_hit_blocks,
            "host_hit_blocks": r.num_host_hit_blocks,
            "disk_hit_blocks": r.num_disk_hit_blocks,
            "blocks": r.num_blocks,
            "hit_blocks": r.num_local_hit_blocks + r.num_transferred_blocks,
            "prompt_tokens": r.num_prompt_tokens,
            "computed_prefill_tokens": r.num_computed_tokens,
            "prediction_exact_rate": rate(r.num_prediction_exact, r.num_requests - r.num_rejected),
            "prediction_mean_abs_err_blocks": round(
                r.num_prediction_abs_err / max(r.num_requests - r.num_rejected, 1), 4
            ),
            "sim_duration_s": _round(r.last_finish_s - r.first_arrival_s if r.num_requests else 0.0),
            "elapsed_s": round(self.elapsed_s, 3),
            "cpu_s": round(self.cpu_s, 3),
            "config": self.config,
        }

    def to_json(self, timeline_buckets: int = 60) -> dict[str, Any]:
        out = self.summary()
        out["nodes"] = [asdict(n) for n in self.nodes] if len(self.nodes) <= 128 else None
        out["timeline"] = self.recorder.timeline(timeline_buckets)
        return out


def _round(x: float | None, nd: int = 4) -> float | None:
    return None if x is None else round(x, nd)
