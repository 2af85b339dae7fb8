"""`prefixcache bench`: drive a running stack with a standard workload; write JSON results and PNG plots.

    prefixcache bench --target 127.0.0.1:50051 --workload sgl-shared-prefix --requests 256 --scale 0.125 \\
        --concurrency 8 --policy-label cache_aware --out results/bench
    prefixcache bench --compare results/bench/cache_aware.json results/bench/round_robin.json --out results/bench
    prefixcache bench --endpoint http --target 127.0.0.1:8000 ...   # the same through the OpenAI-compatible API

A run writes ``<out>/<label>.json`` ({"meta", "summary", "requests"}) and ``<out>/<label>_timeline.png`` (hit
rate and TTFT over time); ``--compare`` writes ``<out>/compare_<workload>.png`` from several results files (one
per policy) and prints their totals side by side. The label defaults to the workload name.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import json
import sys
import uuid
from pathlib import Path

from common.logs import get_logger
from loadgen.driver import RequestResult, grpc_calls, run_requests
from loadgen.http_driver import http_calls
from loadgen.report import plot_compare, plot_timeline, summarize
from loadgen.spec import WORKLOAD_NAMES, WorkloadSpec, build_requests

log = get_logger("bench")


def _target(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"--target must be HOST:PORT, got {value!r}")
    return value


def _positive_int(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return n


def _positive_float(value: str) -> float:
    x = float(value)
    if not x > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return x


def _param(value: str) -> tuple[str, object]:
    key, sep, raw = value.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--param takes KEY=VALUE, got {value!r}")
    parsed: object = raw
    for conv in (int, float):
        try:
            parsed = conv(raw)
            break
        except ValueError:
            pass
    if raw.lower() in ("true", "false"):
        parsed = raw.lower() == "true"
    return key, parsed


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", type=_target, help="the router's gRPC address HOST:PORT (required unless --compare); "
                                                    "with --endpoint http its HTTP front door's")
    p.add_argument("--endpoint", choices=("grpc", "http"), default="grpc",
                   help="drive the gRPC Generation service or the OpenAI-compatible HTTP API (/v1/completions)")
    p.add_argument("--workload", choices=WORKLOAD_NAMES, help="which standard workload to send")
    p.add_argument("--requests", type=_positive_int, default=None,
                   help="number of requests (groups/sessions are sized to match; Mooncake: the first N records)")
    p.add_argument("--concurrency", type=_positive_int, default=8, help="most calls in flight at once (default 8)")
    p.add_argument("--scale", type=_positive_float, default=1.0,
                   help="multiply every token length (prompts, answers, Mooncake's 512-token block); e.g. 0.125")
    p.add_argument("--time-scale", type=_positive_float, default=1.0,
                   help="multiply arrival offsets of timed workloads (Mooncake, multi-turn): 0.1 = 10x faster")
    p.add_argument("--policy-label", default=None, help="name of this run in results and plots (e.g. the policy)")
    p.add_argument("--out", default="results/bench", help="directory for the JSON results and PNG plots")
    p.add_argument("--vocab-size", type=_positive_int, default=256,
                   help="token ids are drawn below this (256: the demo model's bytes; use the model's vocab size)")
    p.add_argument("--first-token-id", type=int, default=0, help="lowest token id to draw (skip reserved ids)")
    p.add_argument("--seed", type=int, default=0, help="workload seed (same seed, same requests)")
    p.add_argument("--tenants", type=_positive_int, default=1,
                   help="spread requests over K tenants (cache_salt tenant-i, by group/session); default 1")
    p.add_argument("--max-prompt-tokens", type=_positive_int, default=None,
                   help="cut longer prompts to this many tokens (their shared prefix stays intact)")
    p.add_argument("--max-tokens", type=_positive_int, default=None, help="cap every request's output length")
    p.add_argument("--param", type=_param, action="append", default=[], metavar="KEY=VALUE",
                   help="override a workload generator argument (e.g. prompts_per_group=8); repeatable")
    p.add_argument("--trace", default=None, help="Mooncake trace file (default: ../shared/workloads/mooncake/...)")
    p.add_argument("--timeout", type=_positive_float, default=600.0, help="per-request deadline in seconds")
    p.add_argument("--metrics-url", default=None,
                   help="the stack's /metrics (e.g. http://127.0.0.1:9400/metrics): record its counters' change "
                        "over the run (evictions, transfers, ...) in the results")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--compare", nargs="+", metavar="RESULTS_JSON", default=None,
                   help="plot several results files side by side instead of running")


# Counters whose change over a run goes into the results (summed over labels).
_STACK_COUNTERS = ("prefixcache_blocks_stored_total", "prefixcache_blocks_evicted_total",
                   "prefixcache_transfers_total", "prefixcache_transfer_bytes_total", "prefixcache_requests_total")


def _scrape_counters(url: str) -> dict[str, float] | None:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = urllib.request.urlopen(url, timeout=10).read().decode()
    except OSError as exc:
        log.warning("metrics scrape failed", extra={"url": url, "error": str(exc)})
        return None
    totals = {k: 0.0 for k in _STACK_COUNTERS if k != "prefixcache_transfers_total"}  # that one: per outcome
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in _STACK_COUNTERS:
                key = sample.name
                if key == "prefixcache_transfers_total":
                    key = f"{key}{{outcome={sample.labels.get('outcome', '')}}}"
                totals[key] = totals.get(key, 0.0) + sample.value
    return totals


def _run_compare(args: argparse.Namespace) -> int:
    results = []
    for name in args.compare:
        path = Path(name)
        if not path.is_file():
            print(f"error: results file {path} not found", file=sys.stderr)
            return 2
        results.append(json.loads(path.read_text()))
    workload = results[0]["meta"].get("workload", "bench")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    png = plot_compare(results, out / f"compare_{workload}.png")
    _print_header()
    for r in results:
        _print_row(r["meta"].get("policy_label") or "?", r["summary"])
    print(f"plot: {png}")
    return 0


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _print_header() -> None:
    print(f"{'label':<16} {'ok':>5} {'hit rate':>9} {'of which':>9} {'realised/':>10} {'TTFT p50':>9} "
          f"{'TTFT p99':>9} {'req/s':>7}")
    print(f"{'':<16} {'':>5} {'':>9} {'transfer':>9} {'predicted':>10} {'(s)':>9} {'(s)':>9} {'':>7}")


def _print_row(label: str, s: dict) -> None:
    transferred = s["transferred_tokens"] / s["cached_tokens"] if s["cached_tokens"] else None
    print(f"{label:<16} {s['num_ok']:>5} {_fmt(s['hit_rate'], '.3f'):>9} {_fmt(transferred, '.3f'):>9} "
          f"{_fmt(s['prediction_accuracy'], '.3f'):>10} {_fmt(s['ttft_s']['p50'], '.3f'):>9} "
          f"{_fmt(s['ttft_s']['p99'], '.3f'):>9} {_fmt(s['requests_per_s'], '.2f'):>7}")


def run(args: argparse.Namespace) -> int:
    if args.compare:
        return _run_compare(args)
    if not args.target or not args.workload:
        print("error: --target and --workload are required (or --compare FILES)", file=sys.stderr)
        return 2
    spec = WorkloadSpec(
        name=args.workload, num_requests=args.requests, scale=args.scale, time_scale=args.time_scale,
        vocab_size=args.vocab_size, first_token_id=args.first_token_id, seed=args.seed, num_tenants=args.tenants,
        max_prompt_tokens=args.max_prompt_tokens, max_tokens=args.max_tokens, trace_path=args.trace,
        params=dict(args.param))
    try:
        requests, params = build_requests(spec)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not requests:
        print("error: the workload has no requests", file=sys.stderr)
        return 2
    # Unique per run, so that two runs against one stack never reuse a request id.
    nonce = uuid.uuid4().hex[:6]
    for r in requests:
        r.request_id = f"{nonce}-{r.request_id}"
        if r.follows is not None:
            r.follows = f"{nonce}-{r.follows}"
    label = args.policy_label or args.workload
    log.info("bench start", extra={"workload": args.workload, "num_requests": len(requests), "target": args.target,
                                   "concurrency": args.concurrency, "label": label})

    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=len(requests), desc=label, unit="req", dynamic_ncols=True)

    def on_done(res: RequestResult) -> None:
        if bar is not None:
            bar.update(1)
            if res.error is not None:
                bar.set_postfix_str(f"last error: {res.error[:60]}")

    started_at = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    before = _scrape_counters(args.metrics_url) if args.metrics_url else None
    try:
        results, wall_s = asyncio.run(run_requests(args.target, requests, args.concurrency, args.timeout,
                                                   on_done=on_done,
                                                   calls=http_calls if args.endpoint == "http" else grpc_calls))
    finally:
        if bar is not None:
            bar.close()
    rows = [r.to_json() for r in results]
    summary = summarize(rows, wall_s)
    after = _scrape_counters(args.metrics_url) if before is not None else None
    if before is not None and after is not None:
        summary["stack_counters"] = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    meta = {"workload": args.workload, "policy_label": label, "target": args.target, "endpoint": args.endpoint,
            "concurrency": args.concurrency,
            "scale": args.scale, "time_scale": args.time_scale, "num_tenants": args.tenants, "params": params,
            "started_at": started_at}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / f"{label}.json"
    json_path.write_text(json.dumps({"meta": meta, "summary": summary, "requests": rows}, indent=1))
    png = plot_timeline({"meta": meta, "requests": rows}, out / f"{label}_timeline.png")
    _print_header()
    _print_row(label, summary)
    for worker, row in summary["per_worker"].items():
        print(f"  {worker:<14} {row['num_requests']:>5} {_fmt(row['hit_rate'], '.3f'):>9}")
    if summary["num_errors"]:
        print(f"errors: {summary['errors']}")
    if "stack_counters" in summary:
        print("stack counters over the run: " + ", ".join(
            f"{k.removeprefix('prefixcache_')}={v:g}" for k, v in summary["stack_counters"].items() if v))
    print(f"results: {json_path}\nplot: {png}")
    return 0 if summary["num_ok"] else 1
