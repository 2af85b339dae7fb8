"""`prefixcache stats`: cache-hit metrics of a running stack, per worker, per tenant and in total.

Reads the router's Prometheus endpoint (the metrics contract) and prints, e.g.::

    worker     requests  prompt_tokens  cached_tokens  hit_rate  predicted  transfers(ok/fb)  up
    worker-0         16           2048           1536    75.0%        1536             0/0     1
    total            16           2048           1536    75.0%        1536             0/0

and then where the cached tokens came from, per worker, per tenant and in total::

    hits by tier     device      host      disk      peer
    worker-0           1024       256         0       256

``--json`` prints the same numbers as one JSON object (scripts, benchmarks), with the engines' own hits by
tier too (``engine_tier_tokens``: every request of the worker, pins included, whichever router sent it).
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from collections import defaultdict
from dataclasses import asdict, dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from router.metrics import NO_WORKER, TIER_LABELS

DEFAULT_URL = "http://127.0.0.1:9400/metrics"


@dataclass(slots=True)
class Row:
    requests: float = 0.0
    errors: float = 0.0
    prompt_tokens: float = 0.0
    cached_tokens: float = 0.0
    predicted_tokens: float = 0.0
    transfers_ok: float = 0.0
    transfers_fallback: float = 0.0
    up: float | None = None
    # cached tokens by where they came from (TIER_LABELS): the router's per-request count ...
    tier_tokens: dict[str, float] = field(default_factory=lambda: dict.fromkeys(TIER_LABELS, 0.0))
    # ... and, per worker, the engine's own (device, host, disk; a peer's blocks count where it found them)
    engine_tier_tokens: dict[str, float] = field(default_factory=dict)

    @property
    def hit_rate(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


@dataclass(slots=True)
class Stats:
    workers: dict[str, Row]
    tenants: dict[str, Row]
    total: Row


def parse_metrics(text: str) -> Stats:
    workers: dict[str, Row] = defaultdict(Row)
    tenants: dict[str, Row] = defaultdict(Row)
    total = Row()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels, value, name = s.labels, s.value, s.name
            worker, tenant = labels.get("worker", ""), labels.get("tenant", "")
            if name == "prefixcache_requests_total":
                field = "requests" if labels.get("status") == "ok" else "errors"
                for row in (workers[worker], tenants[tenant], total):
                    setattr(row, field, getattr(row, field) + value)
            elif name == "prefixcache_prefix_cache_queries_tokens_total":
                for row in (workers[worker], tenants[tenant], total):
                    row.prompt_tokens += value
            elif name == "prefixcache_prefix_cache_hits_tokens_total":
                for row in (workers[worker], tenants[tenant], total):
                    row.cached_tokens += value
            elif name == "prefixcache_router_predicted_cached_tokens_total":
                workers[worker].predicted_tokens += value
                total.predicted_tokens += value
            elif name == "prefixcache_transfers_total":
                field = "transfers_ok" if labels.get("outcome") == "ok" else "transfers_fallback"
                for row in (workers[worker], total):
                    setattr(row, field, getattr(row, field) + value)
            elif name == "prefixcache_prefix_cache_tier_hits_tokens_total":
                tier = labels.get("tier", "")
                if tier in TIER_LABELS:
                    for row in (workers[worker], tenants[tenant], total):
                        row.tier_tokens[tier] += value
            elif name == "prefixcache_worker_prefix_hits_tokens_total":
                tier = labels.get("tier", "")
                for row in (workers[worker], total):
                    row.engine_tier_tokens[tier] = row.engine_tier_tokens.get(tier, 0.0) + value
            elif name == "prefixcache_worker_up":
                workers[worker].up = value
    workers.pop(NO_WORKER, None)  # requests refused before any worker was chosen
    workers.pop("", None)
    tenants.pop("", None)
    return Stats(dict(workers), dict(tenants), total)


def fetch(url: str, timeout_s: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 - an operator-given URL
        return resp.read().decode("utf-8")


def format_table(stats: Stats) -> str:
    head = f"{'':<12}{'requests':>9}{'errors':>8}{'prompt_tok':>12}{'cached_tok':>12}{'hit_rate':>9}" \
           f"{'predicted':>11}{'xfer ok/fb':>12}{'up':>4}"
    lines = ["per worker", head]

    def line(name: str, r: Row, with_worker_cols: bool) -> str:
        xfer = f"{int(r.transfers_ok)}/{int(r.transfers_fallback)}" if with_worker_cols else ""
        up = "" if r.up is None else str(int(r.up))
        pred = f"{int(r.predicted_tokens)}" if with_worker_cols else ""
        return (f"{name:<12}{int(r.requests):>9}{int(r.errors):>8}{int(r.prompt_tokens):>12}"
                f"{int(r.cached_tokens):>12}{r.hit_rate:>8.1%} {pred:>10}{xfer:>12}{up:>4}")

    for name in sorted(stats.workers):
        lines.append(line(name, stats.workers[name], True))
    lines.append(line("total", stats.total, True))
    if stats.tenants:
        lines += ["", "per tenant", head]
        for name in sorted(stats.tenants):
            lines.append(line(name, stats.tenants[name], False))
    lines += ["", f"{'hits by tier':<16}" + "".join(f"{t:>10}" for t in TIER_LABELS)]

    def tier_line(name: str, r: Row) -> str:
        return f"{name:<16}" + "".join(f"{int(r.tier_tokens[t]):>10}" for t in TIER_LABELS)

    for name in sorted(stats.workers):
        lines.append(tier_line(name, stats.workers[name]))
    lines.append(tier_line("total", stats.total))
    for name in sorted(stats.tenants):
        lines.append(tier_line(f"tenant {name}", stats.tenants[name]))
    return "\n".join(lines)


def to_json(stats: Stats) -> dict:
    def row(r: Row) -> dict:
        return {**asdict(r), "hit_rate": r.hit_rate}

    return {"workers": {k: row(v) for k, v in stats.workers.items()},
            "tenants": {k: row(v) for k, v in stats.tenants.items()}, "total": row(stats.total)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--metrics-url", default=DEFAULT_URL, help=f"the router's /metrics (default {DEFAULT_URL})")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")


def run(args: argparse.Namespace) -> int:
    try:
        text = fetch(args.metrics_url)
    except (urllib.error.URLError, OSError) as exc:
        print(f"prefixcache stats: cannot read {args.metrics_url}: {exc}", file=sys.stderr)
        return 1
    stats = parse_metrics(text)
    print(json.dumps(to_json(stats), indent=2) if args.json else format_table(stats))
    return 0
