"""The HTTP front door's overhead against the gRPC edge's, side by side, for the same requests.

    python -m benchmarks.bench_http [--concurrency 64] [--requests-per-stream 8] [--max-tokens 4]
                                    [--prompt-tokens 128] [--rounds 3] [--workers 2] [--json OUT.json]

Two setups, in one run:

    stack   the whole stack (local Ray, embedded Valkey, cache service, demo-model CPU workers, the router
            serving gRPC and HTTP on one loop): what a client sees, engine included
    edges   the same router over in-process workers that answer at once (no engine, no Ray): the edges'
            and the router's own cost, which the engine's batching noise (tens of ms) hides in "stack";
            at ``--concurrency`` streams (throughput) and at one stream (the latency a request pays)

A client process (not this one: the router must not share its GIL with the clients) replays the same
requests through each edge, ``--concurrency`` streams at a time, each stream a loop over its requests;
the rounds alternate edges (machine noise hits each alike) and every prompt is cached by a warm-up
first, so the workers do the same work for every edge:

    grpc   Generate / GenerateStream, token ids (grpc.aio, one channel)
    http   POST /v1/completions with the same token ids (one keep-alive connection per stream)
    chat   POST /v1/chat/completions (HTTP only): messages rendered by the template into the same ids

each as unary calls and as streams (``stream=true``: SSE up to ``data: [DONE]``). The HTTP client is the
load driver's minimal asyncio HTTP/1.1 one (loadgen/http_driver.py), so that what is measured is the
server, not an HTTP library.

Per edge and mode: requests/s, client-side latency p50/p99, and this process's CPU time per request (stack:
router + cache service + Ray driver, the workers are other processes; edges: the router alone); then what
HTTP adds over gRPC: latency p50/p99 and CPU per request. Target: HTTP adds at most 1 ms p50 per request.
Nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

from loadgen.http_driver import HttpConnection
from loadgen.stats import percentile as pct

BS = 16
EDGES = ("grpc", "http", "chat")
MODES = ("unary", "stream")
ONE_STREAM_REQUESTS = 256


@dataclass(slots=True)
class Round:
    edge: str
    mode: str
    streams: str  # which request set: "many" (--concurrency streams) or "one" (one stream)
    num_requests: int
    wall_s: float
    latencies_ms: list[float]
    cpu_s: float = 0.0  # router process CPU over the round


@dataclass(slots=True)
class Row:
    setup: str
    edge: str
    mode: str
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    cpu_ms_per_request: float


# ---- the client process -----------------------------------------------------------------------------------
async def run_round(edge: str, mode: str, key: str, grpc_address: str, http_port: int,
                    streams: list[list[dict]]) -> Round:
    import grpc

    from protos.prefixcache.v1 import generation_pb2 as pb
    from protos.prefixcache.v1 import generation_pb2_grpc

    latencies: list[float] = []
    stream = mode == "stream"
    if edge == "grpc":
        channel = grpc.aio.insecure_channel(grpc_address)
        stub = generation_pb2_grpc.GenerationStub(channel)

        async def one_stream(reqs: list[dict]) -> None:
            for r in reqs:
                msg = pb.GenerateRequest(token_ids=r["token_ids"], sampling=pb.SamplingParams(
                    max_tokens=r["max_tokens"], ignore_eos=True))
                t0 = time.perf_counter()
                if stream:
                    async for _ in stub.GenerateStream(msg, timeout=120):
                        pass
                else:
                    await stub.Generate(msg, timeout=120)
                latencies.append((time.perf_counter() - t0) * 1e3)
    else:
        path = "/v1/chat/completions" if edge == "chat" else "/v1/completions"

        async def one_stream(reqs: list[dict]) -> None:
            conn = await HttpConnection.open("127.0.0.1", http_port)
            try:
                for r in reqs:
                    body = {"model": "demo", "max_tokens": r["max_tokens"], "temperature": 0, "ignore_eos": True,
                            "stream": stream}
                    if edge == "chat":
                        body["messages"] = r["messages"]
                    else:
                        body["prompt"] = r["token_ids"]
                    raw = json.dumps(body).encode()
                    t0 = time.perf_counter()
                    out = await conn.post(path, raw)
                    latencies.append((time.perf_counter() - t0) * 1e3)
                    assert (out.endswith(b"data: [DONE]\n\n") if stream else out.startswith(b"{\"id\"")), out[-200:]
            finally:
                conn.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(one_stream(reqs) for reqs in streams))
    wall = time.perf_counter() - t0
    if edge == "grpc":
        await channel.close()
    return Round(edge, mode, key, len(latencies), wall, latencies)


def client_main(args: argparse.Namespace) -> int:
    """Reads the plan (JSON) on stdin; for each round prints "start", then the round's JSON."""
    plan = json.loads(sys.stdin.readline())
    for edge, mode, key in plan["rounds"]:
        print("start", flush=True)
        r = asyncio.run(run_round(edge, mode, key, plan["grpc"], plan["http_port"], plan["streams"][key]))
        print(json.dumps(asdict(r)), flush=True)
    return 0


# ---- the driver ---------------------------------------------------------------------------------------------
def make_streams(concurrency: int, per_stream: int, prompt_tokens: int, max_tokens: int) -> list[list[dict]]:
    """``concurrency`` streams of chat requests; each also carries the token ids its rendered prompt has,
    which the gRPC and completions rounds send. The system prompt is shared; questions are distinct."""
    from router.chat_template import load_chat_template
    from workers.model import load_tokenizer

    template, tokenizer = load_chat_template("demo"), load_tokenizer("demo")
    rng = random.Random(0)
    words = "cache block prefix token router worker hit miss evict pin transfer prompt decode".split()
    system = {"role": "system", "content": " ".join(rng.choice(words) for _ in range(prompt_tokens // 6))}
    streams = []
    for s in range(concurrency):
        reqs = []
        for i in range(per_stream):
            messages = [system, {"role": "user", "content": f"question {s}-{i}: " + " ".join(rng.choice(words)
                                                                                            for _ in range(4))}]
            ids = tokenizer.encode(template.render(messages), add_special_tokens=template.add_special_tokens)
            reqs.append({"messages": messages, "token_ids": ids, "max_tokens": max_tokens})
        streams.append(reqs)
    return streams


def summarize(setup: str, rounds: list[Round]) -> list[Row]:
    rows = []
    for edge in EDGES:
        for mode in MODES:
            rs = [r for r in rounds if r.edge == edge and r.mode == mode]
            if not rs:
                continue
            lat = [x for r in rs for x in r.latencies_ms]
            n = sum(r.num_requests for r in rs)
            rows.append(Row(setup, edge, mode, statistics.median(r.num_requests / r.wall_s for r in rs),
                            pct(lat, 50), pct(lat, 99), sum(r.cpu_s for r in rs) / n * 1e3))
    return rows


def drive(grpc_address: str, http_port: int, rounds: list[tuple[str, str, str]],
          streams: dict[str, list[list[dict]]]) -> list[Round]:
    """Replay ``rounds`` (edge, mode, request set) from a client process; a first http round warms up (and
    caches every prompt) and is dropped. This process's CPU time is taken around each round."""
    warmup = [("http", "unary", key) for key in streams]
    client = subprocess.Popen([sys.executable, "-m", "benchmarks.bench_http", "--client"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert client.stdin is not None and client.stdout is not None
    out: list[Round] = []
    try:
        client.stdin.write(json.dumps({"rounds": warmup + rounds, "grpc": grpc_address, "http_port": http_port,
                                       "streams": streams}) + "\n")
        client.stdin.flush()
        for i in range(len(warmup) + len(rounds)):
            assert client.stdout.readline().strip() == "start", "the client process failed"
            cpu0 = time.process_time()
            r = Round(**json.loads(client.stdout.readline()))
            r.cpu_s = time.process_time() - cpu0
            if i >= len(warmup):
                out.append(r)
        client.wait(timeout=60)
    finally:
        if client.poll() is None:
            client.kill()
    return out


class InstantWorker:
    """A worker that answers at once (the "edges" setup): ``max_tokens`` tokens taken from the prompt, in
    one delta per token, and the usage a cached prompt would report. No engine: what remains is the router."""

    def __init__(self, worker_id: str) -> None:
        self.worker_id = worker_id

    async def generate(self, call):
        from cache_service.records import Delta, Usage

        n = call.params.max_tokens
        for i in range(n):
            t = call.prompt_ids[i % len(call.prompt_ids)] % 128
            last = i == n - 1
            yield Delta(token_ids=[t], text=chr(t), finish_reason="length" if last else None,
                        usage=Usage(len(call.prompt_ids), n, (len(call.prompt_ids) - 1) // BS * BS) if last else None)

    async def poll(self, feed_epoch: str, feed_seq: int):
        from cache_service.records import WorkerLoad, WorkerPoll

        return WorkerPoll(feed_epoch="instant", feed_seq=0, events=[],
                          snapshot=None if feed_epoch == "instant" else [],  # the first poll: an empty snapshot
                          load=WorkerLoad(worker_id=self.worker_id, num_free_blocks=4096, capacity_blocks=4096))

    async def pin(self, pin_id, token_ids, cache_salt=""):
        return 0

    async def unpin(self, pin_id):
        return 0

    async def abort(self, request_id):
        return None


def print_rows(title: str, rows: list[Row]) -> dict:
    print(title)
    print(f"  {'edge':6} {'mode':7} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'CPU ms/req':>11}")
    for r in rows:
        print(f"  {r.edge:6} {r.mode:7} {r.requests_per_s:8.1f} {r.p50_ms:8.2f} {r.p99_ms:8.2f} "
              f"{r.cpu_ms_per_request:11.3f}")
    added = {}
    for mode in MODES:
        g = next(r for r in rows if r.edge == "grpc" and r.mode == mode)
        for edge in ("http", "chat"):
            h = next(r for r in rows if r.edge == edge and r.mode == mode)
            a = added[f"{edge}-{mode}"] = {
                "p50_ms": h.p50_ms - g.p50_ms, "p99_ms": h.p99_ms - g.p99_ms,
                "cpu_ms_per_request": h.cpu_ms_per_request - g.cpu_ms_per_request,
                "requests_per_s_ratio": h.requests_per_s / g.requests_per_s}
            print(f"  {edge} over grpc ({mode}): p50 {a['p50_ms']:+.2f} ms, p99 {a['p99_ms']:+.2f} ms, CPU "
                  f"{a['cpu_ms_per_request']:+.3f} ms/request, requests/s x{a['requests_per_s_ratio']:.2f}")
    return added


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--requests-per-stream", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=128, help="about this many prompt tokens (demo: bytes)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per edge and mode, interleaved")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--setups", default="edges,stack", help="which setups to run (comma-separated)")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)  # the client process
    args = parser.parse_args(argv)
    if args.client:
        return client_main(args)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    many = make_streams(args.concurrency, args.requests_per_stream, args.prompt_tokens, args.max_tokens)
    one = [[r for reqs in many for r in reqs][:ONE_STREAM_REQUESTS]]
    rounds = [(edge, mode, "many") for _ in range(args.rounds) for mode in MODES for edge in EDGES]
    results: dict = {"args": vars(args)}
    n = args.concurrency * args.requests_per_stream
    print(f"{args.concurrency} concurrent streams x {args.requests_per_stream} requests, prompt "
          f"~{len(many[0][0]['token_ids'])} tokens (cached), max_tokens {args.max_tokens}; {args.rounds} interleaved "
          f"rounds of {n} requests per edge and mode")

    setups = set(args.setups.split(","))
    if "edges" in setups:  # first: no Ray in this process yet
        run_edges(args, rounds, many, one, results)
    if "stack" in setups:
        run_stack(args, rounds, many, results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


def run_edges(args: argparse.Namespace, rounds: list, many: list, one: list, results: dict) -> None:
    from router.server import RouterConfig, RouterThread, WorkerEndpoint
    from router.worker_client import InProcessWorkerClient

    workers = [WorkerEndpoint(InProcessWorkerClient(f"worker-{i}", InstantWorker(f"worker-{i}")))
               for i in range(args.workers)]
    router = RouterThread(RouterConfig(block_size=BS, port=0, metrics_port=None, http_port=0,
                                       max_in_flight=4 * args.concurrency), workers)
    router.start()
    try:
        edge_many = drive(router.address, router.server.http_port, rounds, {"many": many})
        edge_one = drive(router.address, router.server.http_port,
                         [(e, m, "one") for _ in range(args.rounds) for m in MODES for e in EDGES], {"one": one})
    finally:
        router.stop()
    rows = summarize("edges", edge_many)
    results["edges"] = {"rows": [asdict(r) for r in rows], "added": print_rows(
        f"edges alone ({args.workers} instant in-process workers), {args.concurrency} concurrent streams:", rows)}
    rows = summarize("edges-1", edge_one)
    results["edges_one_stream"] = {"rows": [asdict(r) for r in rows], "added": print_rows(
        f"edges alone, one stream of {len(one[0])} requests (no queueing: the latency each request pays):", rows)}


def run_stack(args: argparse.Namespace, rounds: list, many: list, results: dict) -> None:
    from deploy.stack import Stack, StackConfig

    stack = Stack(StackConfig(num_workers=args.workers, port=0, metrics_port=None, http_port=0, cache_service_port=0,
                              block_size=BS, max_num_seqs=args.concurrency, max_in_flight=4 * args.concurrency))
    stack.start()
    try:
        stack_rounds = drive(stack.router_address, stack.router_server.http_port, rounds, {"many": many})
    finally:
        stack.stop()
    rows = summarize("stack", stack_rounds)
    results["stack"] = {"rows": [asdict(r) for r in rows], "added": print_rows(
        f"whole stack ({args.workers} demo-model CPU workers on Ray), {args.concurrency} concurrent streams:", rows)}


if __name__ == "__main__":
    sys.exit(main())
