"""The whole stack on each engine, side by side: ``--engine native`` against ``--engine vllm``.

    python -m benchmarks.bench_engines [--workers 2] [--groups 8] [--prompts-per-group 8] [--system-len 512]
                                       [--question-len 32] [--output-len 16] [--num-blocks 96] [--concurrency 8]
                                       [--overhead-requests 40] [--engines native vllm] [--json OUT.json]

Run it where vLLM imports (the second venv of .ci/vllm-tests). One random Llama checkpoint (hidden 512,
8 layers, head_dim 64, float32) is written once; then, per engine, one stack (local Ray, embedded Valkey,
cache service, N CPU workers of that engine, block size 32 for both: vLLM's CPU attention needs multiples
of 32) is started and, per policy (cache_aware, round_robin), the workers' caches are emptied and a fresh router replays the same
shuffled SGLang generated-shared-prefix requests through the real gRPC API with the project's load driver.

Per run: requests/s, output tokens/s, TTFT p50/p99 (client side), token hit rate and its fraction of the
ideal (each group's system prompt computed once), predicted / realised cached tokens. Then, per engine, the
router's added latency: short requests (fresh prompts, one at a time) sent to one worker directly over its
Ray actor handle and through the router (gRPC GenerateStream with ``target_worker``), in pairs of alternating
order; the median of the pairs' differences is what the router costs per request. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

BS = 32
ENGINES = ("native", "vllm")
POLICIES = ("cache_aware", "round_robin")


@dataclass(slots=True)
class RunResult:
    engine: str
    policy: str
    num_requests: int
    wall_s: float
    requests_per_s: float
    output_tokens_per_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    hit_rate: float
    fraction_of_ideal: float
    predicted_over_realised: float


@dataclass(slots=True)
class Overhead:
    engine: str
    direct_ttft_p50_ms: float
    router_ttft_p50_ms: float
    direct_total_p50_ms: float
    router_total_p50_ms: float
    added_ttft_p50_ms: float  # median over requests of (router - direct) time to the first token
    added_total_p50_ms: float


def build_model(folder: Path, vocab: int) -> Path:
    # The tests' tiny-checkpoint writer (transformers, a fixed seed) at a benchmark's size; tokenizer_config.json
    # because vLLM loads its tokenizer through transformers.
    from tests.model_fixtures import build_tiny_checkpoint, write_chat_template

    path = build_tiny_checkpoint(folder, "llama", hidden=512, layers=8, heads=8, kv_heads=2, intermediate=1408,
                                 vocab=vocab, max_pos=2048, init_std=0.02, name="random-llama")
    write_chat_template(path, "llama3")
    return path


def ideal_cached_tokens(requests, system_len: int) -> int:
    seen: set[int] = set()
    total = 0
    for r in requests:
        if r.group in seen:
            total += min(system_len // BS, (len(r.prompt_token_ids) - 1) // BS) * BS
        seen.add(r.group)
    return total


def run_policy(stack, engine: str, policy: str, requests, concurrency: int, ideal: int) -> RunResult:
    import ray

    from benchmarks.bench_serving import replay
    from deploy.stack import default_policy_weights
    from loadgen.report import summarize
    from router.policies import CostWeights
    from router.ray_client import RayWorkerClient
    from router.server import RouterConfig, RouterThread, WorkerEndpoint

    ok = ray.get([h.reset_cache.remote() for h in stack.workers.values()], timeout=120)
    assert all(ok), "a worker still holds blocks: cannot reset its cache"
    endpoints = [WorkerEndpoint(RayWorkerClient(w, h), stack.worker_infos[w].node_id,
                                stack.worker_infos[w].transfer_address) for w, h in stack.workers.items()]
    weights = default_policy_weights() if policy == "cache_aware" else CostWeights()
    router = RouterThread(RouterConfig(model=stack.config.model, block_size=BS, port=0, metrics_port=None,
                                       policy=policy, policy_weights=weights,
                                       cache_service_address=stack.cache_service_address,
                                       max_in_flight=4 * concurrency), endpoints)
    router.start()
    try:
        results, wall = replay(router.address, requests, concurrency)
    finally:
        router.stop()
    s = summarize([r.to_json() for r in results], wall)
    cached, predicted = s["cached_tokens"], s["predicted_cached_tokens"]
    return RunResult(engine, policy, len(requests), wall, s["requests_per_s"], s["output_tokens_per_s"],
                     s["ttft_s"]["p50"] * 1e3, s["ttft_s"]["p99"] * 1e3, s["hit_rate"],
                     cached / ideal if ideal else 0.0, predicted / cached if cached else 0.0)


async def _direct(client, prompt: list[int], max_tokens: int) -> tuple[float, float]:
    from cache_service.records import GenerateCall, SamplingParams

    t0 = time.perf_counter()
    first = None
    call = GenerateCall(f"direct-{random.getrandbits(64):x}", prompt, SamplingParams(max_tokens=max_tokens,
                                                                                       ignore_eos=True))
    async for delta in client.generate(call):
        if first is None and delta.token_ids:
            first = time.perf_counter() - t0
    return first or 0.0, time.perf_counter() - t0


def _routed(stub, prompt: list[int], max_tokens: int, worker: str) -> tuple[float, float]:
    from protos.prefixcache.v1 import generation_pb2 as pb

    t0 = time.perf_counter()
    first = None
    request = pb.GenerateRequest(token_ids=prompt, target_worker=worker,
                                 sampling=pb.SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    for part in stub.GenerateStream(request, timeout=120):
        if first is None and part.token_ids:
            first = time.perf_counter() - t0
    return first or 0.0, time.perf_counter() - t0


def router_overhead(stack, engine: str, num_requests: int, vocab: int) -> Overhead:
    import grpc

    from protos.prefixcache.v1 import generation_pb2_grpc
    from router.ray_client import RayWorkerClient

    worker = "worker-0"
    client = RayWorkerClient(worker, stack.workers[worker])
    rng = random.Random(5)
    direct, routed = [], []
    loop = asyncio.new_event_loop()
    with grpc.insecure_channel(stack.router_address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        for i in range(num_requests + 2):  # two warm-ups, then pairs in alternating order, fresh prompts
            a = [rng.randrange(3, vocab) for _ in range(48)]
            b = [rng.randrange(3, vocab) for _ in range(48)]
            if i % 2:
                d = loop.run_until_complete(_direct(client, a, 4))
                r = _routed(stub, b, 4, worker)
            else:
                r = _routed(stub, b, 4, worker)
                d = loop.run_until_complete(_direct(client, a, 4))
            if i >= 2:
                direct.append(d)
                routed.append(r)
    loop.close()
    med = statistics.median
    return Overhead(engine, med(x[0] for x in direct) * 1e3, med(x[0] for x in routed) * 1e3,
                    med(x[1] for x in direct) * 1e3, med(x[1] for x in routed) * 1e3,
                    med(r[0] - d[0] for d, r in zip(direct, routed)) * 1e3,
                    med(r[1] - d[1] for d, r in zip(direct, routed)) * 1e3)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--prompts-per-group", type=int, default=8)
    parser.add_argument("--system-len", type=int, default=512)
    parser.add_argument("--question-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=16)
    # Room for a worker's share of the groups' system prompts (4 x 16 blocks) and its requests, not for all
    # of them (8 x 16): where a request goes decides whether its prefix is still cached.
    parser.add_argument("--num-blocks", type=int, default=96, help="KV blocks per worker (of 32 tokens)")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--overhead-requests", type=int, default=40)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--engines", nargs="*", default=list(ENGINES), choices=ENGINES)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    from deploy.stack import Stack, StackConfig
    from loadgen.workloads import sgl_shared_prefix

    requests = sgl_shared_prefix(args.groups, args.prompts_per_group, args.system_len, args.question_len,
                                 args.output_len, vocab_size=args.vocab - 3, first_token_id=3, seed=0)
    warmup = sgl_shared_prefix(2, 2, args.system_len, args.question_len, args.output_len,
                               vocab_size=args.vocab - 3, first_token_id=3, seed=99)
    ideal = ideal_cached_tokens(requests, args.system_len)
    runs: list[RunResult] = []
    overheads: list[Overhead] = []
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(Path(tmp), args.vocab)
        for engine in args.engines:
            started = time.perf_counter()
            stack = Stack(StackConfig(model=str(model), engine=engine, dtype="float32", num_workers=args.workers,
                                      block_size=BS, num_blocks=args.num_blocks, max_num_seqs=args.concurrency,
                                      port=0, metrics_port=None, cache_service_port=0, worker_start_timeout_s=900))
            stack.start()
            print(f"{engine}: stack started in {time.perf_counter() - started:.0f} s", flush=True)
            try:
                run_policy(stack, engine, "round_robin", warmup, args.concurrency, 1)
                for policy in POLICIES:
                    runs.append(run_policy(stack, engine, policy, requests, args.concurrency, ideal))
                overheads.append(router_overhead(stack, engine, args.overhead_requests, args.vocab))
            finally:
                stack.stop()
    print(f"SGLang generated-shared-prefix: {args.groups} groups x {args.prompts_per_group} prompts, system "
          f"{args.system_len} + question {args.question_len} tokens, output {args.output_len}; random Llama "
          f"(hidden 512, 8 layers, float32); {args.workers} CPU workers x {args.num_blocks} blocks of {BS}; "
          f"concurrency {args.concurrency}")
    print(f"{'engine':<8}{'policy':<13}{'req/s':>7}{'out tok/s':>10}{'TTFT p50':>10}{'TTFT p99':>10}"
          f"{'hit rate':>9}{'of ideal':>9}{'pred/real':>10}")
    for r in runs:
        print(f"{r.engine:<8}{r.policy:<13}{r.requests_per_s:>7.2f}{r.output_tokens_per_s:>10.1f}"
              f"{r.ttft_p50_ms:>8.0f}ms{r.ttft_p99_ms:>8.0f}ms{r.hit_rate:>8.1%}{r.fraction_of_ideal:>8.1%}"
              f"{r.predicted_over_realised:>10.2f}")
    by = {(r.engine, r.policy): r for r in runs}
    for engine in args.engines:
        ca, rr = by[(engine, "cache_aware")], by[(engine, "round_robin")]
        print(f"{engine}: cache_aware / round_robin throughput {ca.requests_per_s / rr.requests_per_s:.2f}x")
    if set(args.engines) == set(ENGINES):
        for policy in POLICIES:
            v, n = by[("vllm", policy)], by[("native", policy)]
            print(f"{policy}: vllm / native throughput {v.requests_per_s / n.requests_per_s:.2f}x, "
                  f"TTFT p50 {v.ttft_p50_ms / n.ttft_p50_ms:.2f}x")
    print(f"router's added latency per request (one at a time, 48-token prompts, 4 tokens out; median of "
          f"{args.overhead_requests}):")
    for o in overheads:
        print(f"  {o.engine}: TTFT direct {o.direct_ttft_p50_ms:.1f} ms, routed {o.router_ttft_p50_ms:.1f} ms, "
              f"added {o.added_ttft_p50_ms:+.1f} ms; whole request direct {o.direct_total_p50_ms:.1f} ms, routed "
              f"{o.router_total_p50_ms:.1f} ms, added {o.added_total_p50_ms:+.1f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "ideal_cached_tokens": ideal, "runs": [asdict(r) for r in runs],
                       "router_overhead": [asdict(o) for o in overheads]}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
