"""`prefixcache simulate`: replay a trace or a standard workload against simulated nodes.

    prefixcache simulate --trace conversation_trace.jsonl --nodes 10 --capacity-tokens 3M \\
        --policy cache_aware --transfer on --json out.json --plot out.png
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any, Iterable

from loadgen.workloads import WORKLOADS, WorkloadError, load_mooncake, make_workload, mooncake_requests

from .cluster import SIM_POLICY_NAMES, SimConfig, simulate
from .results import format_percent
from .sim_request import SimRequest, from_workload, replicate
from .time_model import TimeModel

_SUFFIXES = {"k": 10**3, "m": 10**6, "g": 10**9}


def parse_tokens(text: str) -> int | None:
    """'inf' -> None (unbounded), '3M' -> 3_000_000, '250k', '1000'."""
    t = text.strip().lower()
    if t in ("inf", "infinite", "unbounded"):
        return None
    mult = 1
    if t and t[-1] in _SUFFIXES:
        mult, t = _SUFFIXES[t[-1]], t[:-1]
    try:
        value = float(t) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a token count: {text!r} (e.g. 3M, 250k, inf)") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"token count must be positive: {text!r}")
    return int(value)


def parse_tier_tokens(text: str) -> int:
    """A lower tier's size: '0' (none), '30M', '250k'; never unbounded (a tier that never evicts would hide
    what the tiers are for)."""
    if text.strip() in ("0", "0.0"):
        return 0
    value = parse_tokens(text)
    if value is None:
        raise argparse.ArgumentTypeError(f"a tier's capacity must be finite: {text!r} (e.g. 30M, or 0 for none)")
    return value


def _on_off(text: str) -> bool:
    t = text.strip().lower()
    if t in ("on", "true", "1", "yes"):
        return True
    if t in ("off", "false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected on or off, got {text!r}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trace", required=True,
                   help=f"a Mooncake JSONL file, or a workload name: {', '.join(WORKLOADS)}")
    p.add_argument("--nodes", type=int, default=10)
    p.add_argument("--capacity-tokens", type=parse_tokens, default=3_000_000,
                   help="KV cache per node in tokens (3M, 250k, inf = no eviction); default 3M. With lower tiers:"
                        " the device (HBM) tier")
    p.add_argument("--host-capacity-tokens", type=parse_tier_tokens, default=0,
                   help="host-memory tier per node under the pool, in tokens (its hits load back at"
                        " --host-load-gbs); default 0: none")
    p.add_argument("--disk-capacity-tokens", type=parse_tier_tokens, default=0,
                   help="disk tier per node under the host tier, in tokens (loads at --disk-load-gbs); default 0")
    p.add_argument("--policy", choices=SIM_POLICY_NAMES, default="cache_aware",
                   help="a router policy, or global (one shared pool of nodes x capacity: the upper bound)")
    p.add_argument("--block-size", type=int, default=512)
    p.add_argument("--transfer", type=_on_off, default=False, help="on|off: pull prefixes from peers")
    p.add_argument("--json", dest="json_out", help="write the results as JSON here")
    p.add_argument("--plot", help="write a PNG: hit rate over time and per-node load")
    p.add_argument("--limit", type=int, help="first N requests of the trace")
    p.add_argument("--time-scale", type=float, default=1.0, help="multiply arrival times (0.5 = twice the rate)")
    p.add_argument("--replicas", type=int, default=1,
                   help="tile a Mooncake trace N times with disjoint ids (N x the load, same per-tenant reuse)")
    p.add_argument("--pending", type=_on_off, default=False,
                   help="on|off: the router also counts blocks of requests it routed whose prefill has not"
                        " finished, as its index mirror does (affinity for bursts that share a new prefix)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab-size", type=int, default=32000, help="synthetic workloads' vocabulary")
    p.add_argument("--candidates", type=int, default=None,
                   help="routing looks at the deepest matches plus this many least-loaded nodes"
                        " (default: every node up to 128 nodes, else 16)")
    tm = TimeModel()
    g = p.add_argument_group("time model (defaults: one H100, Llama-3-8B-class; see time_model.py)")
    g.add_argument("--prefill-tps", type=float, default=tm.prefill_tps)
    g.add_argument("--prefill-overhead-ms", type=float, default=tm.prefill_overhead_ms)
    g.add_argument("--decode-tps", type=float, default=tm.decode_tps, help="one sequence, batch of 1")
    g.add_argument("--kv-bytes-per-token", type=int, default=tm.kv_bytes_per_token)
    g.add_argument("--hbm-gbs", type=float, default=tm.hbm_gbs, help="GB/s for reading KV in decode")
    g.add_argument("--transfer-gbps", type=float, default=tm.transfer_gbps, help="Gbit/s between nodes")
    g.add_argument("--transfer-latency-ms", type=float, default=tm.transfer_latency_ms)
    g.add_argument("--host-load-gbs", type=float, default=tm.host_load_gbs, help="GB/s host tier -> pool")
    g.add_argument("--disk-load-gbs", type=float, default=tm.disk_load_gbs, help="GB/s disk tier -> pool")
    w = p.add_argument_group("policy weights (router/policies.py CostWeights)")
    w.add_argument("--prefill-weight", type=float)
    w.add_argument("--decode-load-weight", type=float)
    w.add_argument("--queue-weight", type=float)
    w.add_argument("--transfer-cost-ratio", type=float,
                   help="default: the time model's (block transfer time / block prefill time)")
    w.add_argument("--host-hit-cost", type=float, help="default: the time model's (host load / prefill of a block)")
    w.add_argument("--disk-hit-cost", type=float, help="default: the time model's (disk load / prefill of a block)")


def load_requests(args: argparse.Namespace) -> Iterable[SimRequest]:
    """The trace (file or named workload) as simulator requests, sorted by arrival."""
    if args.limit is not None and args.limit < 0:
        raise WorkloadError("--limit must be >= 0")
    if args.replicas != 1 and args.trace in WORKLOADS:
        raise WorkloadError("--replicas applies to Mooncake trace files only")
    if args.trace in WORKLOADS:
        reqs = make_workload(args.trace, vocab_size=args.vocab_size, seed=args.seed)
        if args.limit is not None:
            reqs = reqs[: args.limit]
        for r in reqs:
            r.arrival_s *= args.time_scale
        return from_workload(reqs, args.block_size)
    if not os.path.exists(args.trace):
        raise WorkloadError(f"no such trace file or workload: {args.trace!r} (workloads: {', '.join(WORKLOADS)})")
    records = load_mooncake(args.trace, args.limit)
    reqs = from_workload(mooncake_requests(records, time_scale=args.time_scale), args.block_size)
    return reqs if args.replicas == 1 else replicate(reqs, args.replicas)


def config_from_args(args: argparse.Namespace) -> SimConfig:
    weights = {
        name: getattr(args, name)
        for name in ("prefill_weight", "decode_load_weight", "queue_weight", "transfer_cost_ratio", "host_hit_cost",
                     "disk_hit_cost")
        if getattr(args, name, None) is not None
    }
    tm = TimeModel(
        prefill_tps=args.prefill_tps, prefill_overhead_ms=args.prefill_overhead_ms, decode_tps=args.decode_tps,
        kv_bytes_per_token=args.kv_bytes_per_token, hbm_gbs=args.hbm_gbs, transfer_gbps=args.transfer_gbps,
        transfer_latency_ms=args.transfer_latency_ms, host_load_gbs=args.host_load_gbs,
        disk_load_gbs=args.disk_load_gbs,
    )
    return SimConfig(
        num_nodes=args.nodes, capacity_tokens=args.capacity_tokens, block_size=args.block_size,
        policy=args.policy, transfer=args.transfer, time_model=tm, weights=weights, seed=args.seed,
        num_candidates=args.candidates, pending=args.pending, host_capacity_tokens=args.host_capacity_tokens,
        disk_capacity_tokens=args.disk_capacity_tokens,
    )


def format_summary(s: dict[str, Any]) -> str:
    pct = format_percent
    return (
        f"requests {s['requests']}  block hit {pct(s['block_hit_rate'])} (local {pct(s['local_block_hit_rate'])})"
        f"  token hit {pct(s['token_hit_rate'])}  load imbalance {s['load_imbalance']}"
        f"  TTFT p50 {s['ttft_p50_s']} s p99 {s['ttft_p99_s']} s  transferred {s['transferred_blocks']} blocks"
        f"  hits device/host/disk {s['device_hit_blocks']}/{s['host_hit_blocks']}/{s['disk_hit_blocks']}"
        f"  simulated {s['sim_duration_s']} s in {s['elapsed_s']} s (cpu {s['cpu_s']} s)"
    )


def run(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args)
        requests = load_requests(args)
        result = simulate(config, requests)
    except (ValueError, OSError) as exc:  # WorkloadError is a ValueError
        print(f"prefixcache simulate: error: {exc}", file=sys.stderr)
        return 2
    out = result.to_json()
    out["config"]["trace"] = args.trace
    out["config"]["limit"] = args.limit
    out["config"]["time_scale"] = args.time_scale
    out["config"]["replicas"] = args.replicas
    print(format_summary(out))
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1)
    if args.plot:
        from .plot import plot_result

        plot_result(out, args.plot)
    return 0
