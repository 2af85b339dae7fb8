"""The whole serving stack under the SGLang generated-shared-prefix workload, routing policies side by side.

    python -m benchmarks.bench_serving [--workers 2] [--groups 8] [--prompts-per-group 8] [--system-len 512]
                                       [--question-len 32] [--output-len 16] [--num-blocks 200]
                                       [--concurrency 16] [--json OUT.json]

One stack (local Ray, embedded Valkey, cache service, N demo-model CPU workers) is started once; each
run gets a fresh router with its policy over the same workers, whose caches are emptied first, and
replays the same shuffled requests through the real gRPC API with the project's load driver
(loadgen/driver.py, as `prefixcache bench`: GenerateStream, ``--concurrency`` requests in flight).
Runs, in this order:

    cache_aware, round_robin, random                        routing alone (no peer transfers)
    round_robin+transfer, cache_aware+transfer              the router points workers at peers
    cache_aware q=X                                          other queue weights (--queue-weights)

Per run: token hit rate (cached / prompt tokens, and as a fraction of the workload's ideal, where each
group's system prompt is computed once), requests/s, output tokens/s, TTFT p50/p99 (client side,
first streamed token), the router's predicted / realised cached tokens, and group locality (the mean
share of a group's requests served by its most used worker). Ratios against round_robin are printed;
nothing is asserted.

The KV pool per worker (``--num-blocks``) is sized so that each worker can keep its share of the
groups' system prompts cached but not all of them: the regime in which where a request goes decides
whether its prefix is still cached.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import dataclasses
import os
from dataclasses import asdict, dataclass

from deploy.stack import default_policy_weights
from loadgen.driver import BenchRequest, RequestResult, run_requests
from loadgen.report import summarize
from loadgen.stats import percentile
from loadgen.workloads import WorkloadRequest, sgl_shared_prefix
from router.policies import CostWeights

BS = 16
# (name, policy, transfer hints, policy weights): the serving stack's default weights (deploy/stack.py)
RUNS = [
    ("cache_aware", "cache_aware", False, default_policy_weights()),
    ("round_robin", "round_robin", False, CostWeights()),
    ("random", "random", False, CostWeights()),
    ("round_robin+transfer", "round_robin", True, CostWeights()),
    ("cache_aware+transfer", "cache_aware", True, default_policy_weights()),
]


@dataclass(slots=True)
class RunResult:
    name: str
    num_requests: int
    wall_s: float
    requests_per_s: float
    output_tokens_per_s: float
    hit_rate: float
    fraction_of_ideal: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    num_transferred_tokens: int
    predicted_over_realised: float
    group_locality: float  # mean share of a group's requests on its most used worker (1.0: no group split)
    requests_per_worker: dict


def replay(address: str, requests: list[WorkloadRequest], concurrency: int) -> tuple[list[RequestResult], float]:
    """Every request once through the load driver (closed loop); raises if any request failed."""
    calls = [BenchRequest(r.request_id, r.token_ids(), r.output_len) for r in requests]
    results, wall_s = asyncio.run(run_requests(address, calls, concurrency, timeout_s=600.0))
    failed = [r for r in results if r.error is not None]
    if failed:
        # The figures below assume every request finished: a partial run would compare wrong numbers.
        raise RuntimeError(f"{len(failed)} of {len(results)} requests failed; first: {failed[0].error}")
    return results, wall_s


def ideal_cached_tokens(requests: list[WorkloadRequest], system_len: int) -> int:
    seen: set[int] = set()
    total = 0
    for r in requests:
        if r.group in seen:
            total += min(system_len // BS, (len(r.prompt_token_ids) - 1) // BS) * BS
        seen.add(r.group)
    return total


def run_policy(stack, name: str, policy: str, transfer: bool, weights: CostWeights, requests: list[WorkloadRequest],
               concurrency: int, ideal: int) -> RunResult:
    import ray

    from router.ray_client import RayWorkerClient
    from router.server import RouterConfig, RouterThread, WorkerEndpoint

    ok = ray.get([h.reset_cache.remote() for h in stack.workers.values()], timeout=60)
    assert all(ok), "a worker still holds blocks: cannot reset its cache"
    endpoints = [WorkerEndpoint(RayWorkerClient(w, h), stack.worker_infos[w].node_id,
                                    stack.worker_infos[w].transfer_address)
                 for w, h in stack.workers.items()]
    router = RouterThread(RouterConfig(block_size=BS, port=0, metrics_port=None, policy=policy, policy_weights=weights,
                                       cache_service_address=stack.cache_service_address,
                                       transfer_hints=transfer, max_in_flight=4 * concurrency), endpoints)
    router.start()
    try:
        results, wall = replay(router.address, requests, concurrency)
    finally:
        router.stop()
    # The same summary as `prefixcache bench` (loadgen/report.py), so the two tools' figures agree.
    s = summarize([r.to_json() for r in results], wall)
    cached, predicted = s["cached_tokens"], s["predicted_cached_tokens"]
    by_group: dict[int, list[str]] = {}
    for r, res in zip(requests, results):
        by_group.setdefault(r.group, []).append(res.worker)
    locality = sum(max(ws.count(w) for w in set(ws)) / len(ws) for ws in by_group.values()) / len(by_group)
    return RunResult(
        name=name, num_requests=len(requests), wall_s=wall, requests_per_s=s["requests_per_s"],
        output_tokens_per_s=s["output_tokens_per_s"],
        hit_rate=s["hit_rate"], fraction_of_ideal=cached / ideal if ideal else 0.0,
        ttft_p50_ms=s["ttft_s"]["p50"] * 1e3, ttft_p99_ms=s["ttft_s"]["p99"] * 1e3,
        num_transferred_tokens=s["transferred_tokens"],
        predicted_over_realised=predicted / cached if cached else 0.0, group_locality=locality,
        requests_per_worker={w: row["num_requests"] for w, row in s["per_worker"].items()},
    )


def median_result(rs: list[RunResult]) -> RunResult:
    """Per metric, the median over repeats (hit rates are near-deterministic; timings are not)."""
    if len(rs) == 1:
        return rs[0]
    out = RunResult(**asdict(rs[0]))
    for f in ("wall_s", "requests_per_s", "output_tokens_per_s", "hit_rate", "fraction_of_ideal", "ttft_p50_ms",
              "ttft_p99_ms", "predicted_over_realised", "group_locality"):
        setattr(out, f, percentile([getattr(r, f) for r in rs], 50))
    out.num_transferred_tokens = int(percentile([r.num_transferred_tokens for r in rs], 50))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--prompts-per-group", type=int, default=8)
    parser.add_argument("--system-len", type=int, default=512)
    parser.add_argument("--question-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=16)
    parser.add_argument("--num-blocks", type=int, default=200, help="KV blocks per worker")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=1, help="interleaved repeats; medians are printed")
    parser.add_argument("--queue-weights", type=float, nargs="*", default=[],
                        help="extra cache_aware runs with these queue_weight values")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    from deploy.stack import Stack, StackConfig

    requests = sgl_shared_prefix(args.groups, args.prompts_per_group, args.system_len, args.question_len,
                                 args.output_len, vocab_size=256, seed=0)
    warmup = sgl_shared_prefix(2, 2, args.system_len, args.question_len, args.output_len, vocab_size=256, seed=99)
    ideal = ideal_cached_tokens(requests, args.system_len)
    stack = Stack(StackConfig(num_workers=args.workers, port=0, metrics_port=None, cache_service_port=0,
                              num_blocks=args.num_blocks, block_size=BS, max_num_seqs=args.concurrency))
    stack.start()
    try:
        run_policy(stack, "warmup", "round_robin", False, {}, warmup, args.concurrency, 1)
        runs = RUNS + [(f"cache_aware q={q:g}", "cache_aware", False, dataclasses.replace(default_policy_weights(), queue_weight=q))
                       for q in args.queue_weights]
        reps = [[run_policy(stack, name, p, t, w, requests, args.concurrency, ideal) for name, p, t, w in runs]
                for _ in range(args.repeats)]  # interleaved: machine noise hits every policy alike
    finally:
        stack.stop()
    results = [median_result([rep[i] for rep in reps]) for i in range(len(runs))]
    base = next(r for r in results if r.name == "round_robin")
    print(f"SGLang generated-shared-prefix: {args.groups} groups x {args.prompts_per_group} prompts, system "
          f"{args.system_len} + question {args.question_len} tokens, output {args.output_len}; {args.workers} "
          f"demo-model CPU workers x {args.num_blocks} KV blocks; concurrency {args.concurrency}; "
          f"medians of {args.repeats} interleaved repeats")
    print(f"{'run':<22}{'hit rate':>9}{'of ideal':>9}{'req/s':>8}{'x RR':>6}{'out tok/s':>10}"
          f"{'TTFT p50':>10}{'TTFT p99':>10}{'xfer tok':>9}{'pred/real':>10}{'locality':>9}  per worker")
    for r in results:
        print(f"{r.name:<22}{r.hit_rate:>8.1%}{r.fraction_of_ideal:>8.1%} {r.requests_per_s:>7.2f}"
              f"{r.requests_per_s / base.requests_per_s:>6.2f}{r.output_tokens_per_s:>10.1f}"
              f"{r.ttft_p50_ms:>8.0f}ms{r.ttft_p99_ms:>8.0f}ms{r.num_transferred_tokens:>9}"
              f"{r.predicted_over_realised:>10.2f}{r.group_locality:>9.2f}  {dict(sorted(r.requests_per_worker.items()))}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "ideal_cached_tokens": ideal,
                       "runs": [asdict(r) for r in results]}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
