"""Cluster simulation tables on the Mooncake traces: every policy, transfer on/off, next to `global`.

    python benchmarks/bench_simulate.py                      # all tables (the 1000-node tiled runs take minutes)
    python benchmarks/bench_simulate.py --skip-tiled-1000    # the rest, a few minutes on 2 cores
    python benchmarks/bench_simulate.py --only policies      # just the 10-node table
    python benchmarks/bench_simulate.py --only tiers         # 3M device per node alone and over a 30M host tier

Writes benchmarks/results/sim_tables.md (markdown) and sim_results.json (run
summaries, no per-request data). Traces are read from ../shared/workloads/mooncake
relative to the repository (or --traces DIR).

Tables:
  unbounded   1 node, no eviction: the trace's published hit rates (36.64% for conversation)
  policies    10 nodes x 3M tokens: every policy, transfer off/on, and global (one shared 30M pool)
  scaling     10 / 100 / 1000 nodes, 3M tokens each, load per node held constant two ways:
                time-scaled  the same trace with arrivals compressed N/10-fold
                tiled        N/10 copies of the trace with disjoint ids (independent tenants)
  workloads   the standard synthetic workloads on 4 nodes, with and without the router's pending view
  tiers       the conversation trace at 10 nodes: 3M (and 500k) device tokens per node alone, and over a 30M-token
              host tier per node, each next to `global` with the same total capacity (shared tiers)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Iterable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from loadgen.workloads import default_workloads_dir, load_mooncake, make_workload, mooncake_requests  # noqa: E402
from router.policies import POLICY_NAMES  # noqa: E402
from simulator import SimConfig, from_workload, replicate, simulate  # noqa: E402
from simulator.results import format_percent as pct  # noqa: E402
from simulator.sim_request import SimRequest  # noqa: E402

TRACES = ("conversation_trace.jsonl", "synthetic_trace.jsonl")
CAPACITY = 3_000_000


def default_trace_dir() -> Path:
    return default_workloads_dir() / "mooncake"


def requests_for(trace: Path, time_scale: float = 1.0) -> list[SimRequest]:
    return from_workload(mooncake_requests(load_mooncake(trace), time_scale=time_scale), 512)


def run_one(
    trace: Path, reqs: Iterable[SimRequest], *, nodes: int, capacity: int | None, policy: str, transfer: bool,
    block_size: int = 512, pending: bool = False, host_capacity: int = 0, **extra
) -> dict[str, Any]:
    cfg = SimConfig(num_nodes=nodes, capacity_tokens=capacity, policy=policy, transfer=transfer,
                    block_size=block_size, pending=pending, host_capacity_tokens=host_capacity)
    t0 = time.perf_counter()
    s = simulate(cfg, reqs).summary()
    s.pop("config")
    s.update(trace=trace.name, nodes=nodes, capacity_tokens="inf" if capacity is None else capacity,
             host_capacity_tokens=host_capacity, policy=policy, transfer=transfer, pending=pending,
             wall_s=round(time.perf_counter() - t0, 2), **extra)
    tag = f"{trace.name} {nodes}n {policy} transfer={'on' if transfer else 'off'} {extra or ''}"
    print(f"  {tag}: hit {s['block_hit_rate']} imb {s['load_imbalance']} cpu {s['cpu_s']} s", flush=True)
    return s


def table_unbounded(trace_dir: Path) -> tuple[list[str], list[dict]]:
    rows, lines = [], ["| trace | requests | block hit (sim) | block hit (ids seen before) | token hit |",
                       "| --- | ---: | ---: | ---: | ---: |"]
    for name in TRACES:
        trace = trace_dir / name
        reqs = requests_for(trace)
        seen: set[int] = set()
        refs = hits = 0
        for r in reqs:
            assert r.block_ids is not None
            for h in r.block_ids:
                refs += 1
                hits += h in seen
                seen.add(h)
        s = run_one(trace, reqs, nodes=1, capacity=None, policy="cache_aware", transfer=False)
        s["reference_hit_rate"] = hits / refs
        rows.append(s)
        lines.append(f"| {name} | {s['requests']:,} | {pct(s['block_hit_rate'])} | {pct(hits / refs)}"
                     f" ({len(seen):,} unique / {refs:,} refs) | {pct(s['token_hit_rate'])} |")
    return lines, rows


def table_policies(trace_dir: Path) -> tuple[list[str], list[dict]]:
    rows: list[dict] = []
    lines = []
    for name in TRACES:
        trace = trace_dir / name
        reqs = requests_for(trace)
        g = run_one(trace, reqs, nodes=10, capacity=CAPACITY, policy="global", transfer=False)
        rows.append(g)
        lines += [f"\n**{name}**, 10 nodes x 3M tokens (global: one 30M-token pool)\n",
                  "| policy | transfer | block hit | vs global | local hit | token hit | load imbalance"
                  " | TTFT p50 | TTFT p99 | transferred blocks | sim cpu |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        lines.append(_policy_row(g, g))
        for policy in POLICY_NAMES:
            for transfer in (False, True):
                s = run_one(trace, reqs, nodes=10, capacity=CAPACITY, policy=policy, transfer=transfer)
                rows.append(s)
                lines.append(_policy_row(s, g))
    return lines, rows


def _policy_row(s: dict, g: dict) -> str:
    ratio = s["block_hit_rate"] / g["block_hit_rate"] if g["block_hit_rate"] else None
    return (f"| {s['policy']} | {'on' if s['transfer'] else 'off'} | {pct(s['block_hit_rate'])} | "
            f"{'-' if ratio is None else f'{100 * ratio:.1f}%'} | {pct(s['local_block_hit_rate'])} | "
            f"{pct(s['token_hit_rate'])} | {s['load_imbalance']} | {s['ttft_p50_s']:.3f} s | {s['ttft_p99_s']:.2f} s | "
            f"{s['transferred_blocks']:,} | {s['cpu_s']:.1f} s |")


def table_scaling(trace_dir: Path, *, tiled_1000: bool) -> tuple[list[str], list[dict]]:
    rows: list[dict] = []
    lines = ["| trace | mode | nodes | requests | policy | transfer | block hit | vs global | load imbalance"
             " | TTFT p50 | TTFT p99 | sim cpu | sim wall |",
             "| --- | --- | ---: | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    setups = [("global", False), ("cache_aware", False), ("cache_aware", True), ("round_robin", True)]
    for name in TRACES:
        trace = trace_dir / name
        base = requests_for(trace)
        for nodes in (10, 100, 1000):
            k = nodes // 10
            modes = [("time-scaled", lambda k=k: requests_for(trace, 1.0 / k))]
            if k > 1 and (nodes < 1000 or tiled_1000):
                modes.append(("tiled", lambda k=k: replicate(base, k)))
            for mode, make in modes:
                g = None
                for policy, transfer in setups:
                    if mode == "tiled" and policy == "round_robin":
                        continue
                    s = run_one(trace, make(), nodes=nodes, capacity=CAPACITY, policy=policy, transfer=transfer,
                                mode=mode, load_factor=k)
                    g = g or s
                    rows.append(s)
                    ratio = s["block_hit_rate"] / g["block_hit_rate"]
                    lines.append(
                        f"| {name} | {mode if k > 1 else '-'} | {nodes} | {s['requests']:,} | {policy} | "
                        f"{'on' if transfer else 'off'} | {pct(s['block_hit_rate'])} | {100 * ratio:.1f}% | "
                        f"{s['load_imbalance']} | {s['ttft_p50_s']:.3f} s | {s['ttft_p99_s']:.2f} s | "
                        f"{s['cpu_s']:.1f} s | {s['elapsed_s']:.1f} s |")
                if k == 1:
                    break
    return lines, rows


WORKLOAD_SETUPS = (  # (policy, transfer, pending)
    ("global", False, False), ("round_robin", False, False), ("session", False, False),
    ("cache_aware", False, False), ("cache_aware", False, True),
    ("cache_aware", True, False), ("cache_aware", True, True),
)


def _vs(s: dict, g: dict) -> str:
    return f"{100 * s['block_hit_rate'] / g['block_hit_rate']:.1f}%" if g["block_hit_rate"] else "-"


def table_workloads(nodes: int = 4, capacity: int = 200_000, block_size: int = 16) -> tuple[list[str], list[dict]]:
    """The standard synthetic workloads (default parameters, seed 0) on a small cluster."""
    rows: list[dict] = []
    lines = [f"{nodes} nodes x {capacity:,} tokens, block size {block_size}; pending = the router also counts"
             " blocks of requests it routed whose prefill has not finished\n",
             "| workload | requests | policy | transfer | pending | block hit | vs global | load imbalance"
             " | TTFT p50 | TTFT p99 |",
             "| --- | ---: | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for name in ("sgl-shared-prefix", "prefix-repetition", "llmd-shared-prefix", "multi-turn"):
        reqs = from_workload(make_workload(name), block_size)
        g = None
        for policy, transfer, pending in WORKLOAD_SETUPS:
            s = run_one(Path(name), reqs, nodes=nodes, capacity=capacity, policy=policy, transfer=transfer,
                        block_size=block_size, pending=pending)
            g = g or s
            rows.append(s)
            lines.append(
                f"| {name} | {s['requests']:,} | {policy} | {'on' if transfer else 'off'} | {'on' if pending else 'off'} | "
                f"{pct(s['block_hit_rate'])} | {_vs(s, g)} | "
                f"{s['load_imbalance']} | {s['ttft_p50_s']:.2f} s | {s['ttft_p99_s']:.2f} s |")
    return lines, rows


TIER_HOST_CAPACITY = 30_000_000


def table_tiers(trace_dir: Path) -> tuple[list[str], list[dict]]:
    """Conversation trace, 10 nodes: 3M device tokens per node, without and with a 30M-token host tier; then the
    same with 500k device tokens per node, where the pool alone is too small for the trace's reuse."""
    trace = trace_dir / "conversation_trace.jsonl"
    reqs = requests_for(trace)
    rows: list[dict] = []
    lines = ["conversation_trace.jsonl, 10 nodes; each `global` row is one pool with the same total capacity as the"
             " rows under it (nodes x device, and nodes x host under it); `all on device` = the same total"
             " capacity as HBM (every hit free)\n",
             "| device / node | host / node | policy | transfer | block hit | vs global | device hits | host hits"
             " | peer hits | token hit | load imbalance | TTFT p50 | TTFT p99 | TTFT mean | sim cpu |",
             "| ---: | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    setups = []
    for device in (CAPACITY, 500_000):
        for host in (0, TIER_HOST_CAPACITY):
            setups += [(device, host, "global", False), (device, host, "cache_aware", False),
                       (device, host, "cache_aware", True)]
        setups.append((device + TIER_HOST_CAPACITY, 0, "all on device", False))
    g = None
    for device, host, policy, transfer in setups:
        s = run_one(trace, reqs, nodes=10, capacity=device, policy="global" if policy == "all on device" else policy,
                    transfer=transfer, host_capacity=host)
        rows.append(s)
        if policy == "global":
            g = s
        assert g is not None
        lines.append(
            f"| {device / 1e6:g}M | {f'{host / 1e6:g}M' if host else '-'} | {policy} | {'on' if transfer else 'off'} | "
            f"{pct(s['block_hit_rate'])} | {_vs(s, g)} | {s['device_hit_blocks']:,} | {s['host_hit_blocks']:,} | "
            f"{s['transferred_blocks']:,} | {pct(s['token_hit_rate'])} | {s['load_imbalance']} | "
            f"{s['ttft_p50_s']:.3f} s | {s['ttft_p99_s']:.2f} s | {s['ttft_mean_s']:.3f} s | {s['cpu_s']:.1f} s |")
    return lines, rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--traces", type=Path, default=default_trace_dir())
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--only", choices=("unbounded", "policies", "scaling", "workloads", "tiers"))
    p.add_argument("--skip-tiled-1000", action="store_true", help="skip the 1000-node tiled runs (1.2M requests)")
    args = p.parse_args(argv)
    for name in TRACES:
        if not (args.traces / name).exists():
            print(f"missing trace {args.traces / name}", file=sys.stderr)
            return 2
    args.out.mkdir(parents=True, exist_ok=True)
    sections = []
    results: dict[str, Any] = {}
    if args.only in (None, "unbounded"):
        print("unbounded (1 node, no eviction)")
        lines, rows = table_unbounded(args.traces)
        sections.append("### Unbounded cache, 1 node\n\n" + "\n".join(lines))
        results["unbounded"] = rows
    if args.only in (None, "policies"):
        print("policies (10 nodes x 3M tokens)")
        lines, rows = table_policies(args.traces)
        sections.append("### Policies at 10 nodes x 3M tokens\n" + "\n".join(lines))
        results["policies"] = rows
    if args.only in (None, "scaling"):
        print("scaling (10 / 100 / 1000 nodes)")
        lines, rows = table_scaling(args.traces, tiled_1000=not args.skip_tiled_1000)
        sections.append("### Scaling: 3M tokens per node, load per node held constant\n\n" + "\n".join(lines))
        results["scaling"] = rows
    if args.only in (None, "workloads"):
        print("synthetic workloads")
        lines, rows = table_workloads()
        sections.append("### Standard synthetic workloads\n\n" + "\n".join(lines))
        results["workloads"] = rows
    if args.only in (None, "tiers"):
        print("tiers (10 nodes: 3M device per node, alone and over a 30M host tier)")
        lines, rows = table_tiers(args.traces)
        sections.append("### Tiers: a host tier under each node's pool\n\n" + "\n".join(lines))
        results["tiers"] = rows
    suffix = "" if args.only is None else f"_{args.only}"
    md = args.out / f"sim_tables{suffix}.md"
    md.write_text("\n\n".join(sections) + "\n", encoding="utf-8")
    with open(args.out / f"sim_results{suffix}.json", "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {md} and {args.out / f'sim_results{suffix}.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
