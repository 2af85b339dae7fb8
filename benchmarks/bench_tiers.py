"""Host and disk tiers under the device pool, side by side in one process (CPU, fp32, one torch thread).

    python -m benchmarks.bench_tiers [--model demo|llama55m] [--quick] [--json results.json]

  1. a working set 4x the device pool: 16 system prompts of 2048 tokens (+ a fresh 32-token question each
     time, 4 output tokens), cycled in 4 rounds one request at a time, on a device pool that holds 4 of them:
     the hit rate against an unbounded cache's and the total time, device pool alone vs device pool + host tier
     (holding the whole working set);                            targets: >= 90% of the ideal hit rate, >= 2x
  2. TTFT of a request (a 2048-token prefix + a 32-token question) whose prefix is on the device, in the host
     tier, on disk (file pages in the page cache, and cold: dropped with posix_fadvise after an fsync), on disk
     after a restart (a new engine over the same folder, its first request), on a peer (two LocalCacheNodes in
     this process, raw block stream over loopback), or nowhere (recomputed). Medians of interleaved reps.

Greedy outputs of part 1 are compared between the two engines (they must be identical: same KV bytes).
``--model llama55m`` builds the random 55M Llama of bench_engine.py (hidden 512, 8 layers) with transformers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from cache_service.block_hash import hash_prompt_blocks, num_reusable_blocks  # noqa: E402
from cache_service.records import PeerHint, SamplingParams, Tier  # noqa: E402
from workers.engine import Engine, EngineConfig  # noqa: E402
from workers.model import load_model  # noqa: E402

BS = 16


@dataclass
class Scale:
    num_prompts: int = 16
    device_prompts: int = 4  # the device pool holds this many requests
    rounds: int = 4
    prefix_len: int = 2048
    question_len: int = 32
    output_len: int = 4
    ttft_reps: int = 5


QUICK = Scale(num_prompts=8, device_prompts=2, rounds=3, prefix_len=512, ttft_reps=3)


@dataclass
class Results:
    model: str = ""
    block_nbytes: int = 0
    scale: dict = field(default_factory=dict)
    working_set: dict = field(default_factory=dict)
    ttft_s: dict = field(default_factory=dict)
    ttft_runs_s: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, ignore_eos=True)


class Tokens:
    def __init__(self, vocab: int, seed: int = 0) -> None:
        self.vocab = vocab
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, n: int) -> list[int]:
        return torch.randint(3, self.vocab, (n,), generator=self.gen).tolist()


def blocks_for(scale: Scale) -> int:
    return -(-(scale.prefix_len + scale.question_len + scale.output_len) // BS)


# ---- 1. the working set 4x the device pool -----------------------------------------------------------------
def ideal_hit_tokens(requests: list[list[int]]) -> int:
    """What an unbounded cache hits on this sequence of requests (each one's full blocks cached after it)."""
    seen: set = set()
    hits = 0
    for p in requests:
        hashes = hash_prompt_blocks(p, BS, "x")
        n = 0
        for h in hashes[: num_reusable_blocks(len(p), BS)]:
            if h not in seen:
                break
            n += 1
        hits += n * BS
        seen.update(hashes)
    return hits


def working_set(lm, scale: Scale, tok: Tokens, res: Results) -> None:
    prefixes = [tok(scale.prefix_len) for _ in range(scale.num_prompts)]
    requests = [prefixes[i] + tok(scale.question_len) for _ in range(scale.rounds) for i in range(scale.num_prompts)]
    num_blocks = scale.device_prompts * blocks_for(scale)
    host_gb = 1.1 * scale.num_prompts * blocks_for(scale) * res.block_nbytes / 2**30
    ideal = ideal_hit_tokens(requests)
    total = sum(len(p) for p in requests)
    out = {"requests": len(requests), "prompt_tokens": total, "ideal_hit_tokens": ideal,
           "device_blocks": num_blocks, "host_cache_gb": round(host_gb, 4)}
    outputs = {}
    for name, kw in (("device_only", {}), ("with_host_tier", {"host_cache_gb": host_gb})):
        engine = Engine(EngineConfig(block_size=BS, num_blocks=num_blocks, max_num_seqs=4, **kw), loaded=lm)
        t0 = time.perf_counter()
        outs, rounds = [], []
        for r in range(scale.rounds):  # timed per round: round 1 computes everything on both engines
            t_round = time.perf_counter()
            for p in requests[r * scale.num_prompts : (r + 1) * scale.num_prompts]:
                outs.append(engine.generate([p], greedy(scale.output_len))[0])
            rounds.append(round(time.perf_counter() - t_round, 3))
        elapsed = time.perf_counter() - t0
        load = engine.load()
        hits = sum(o.cached_tokens for o in outs)
        outputs[name] = [o.new_token_ids for o in outs]
        out[name] = {"seconds": round(elapsed, 3), "round_seconds": rounds, "hit_tokens": hits, "hit_rate": round(hits / total, 4),
                     "of_ideal": round(hits / ideal, 4), "host_hit_tokens": load.prefix_host_hit_tokens,
                     "host_blocks_at_end": load.num_host_blocks}
        print(f"  {name}: {elapsed:.1f} s (rounds {rounds}), hits {hits}/{total} ({hits / ideal:.1%} of ideal)",
              flush=True)
        del engine
    out["speedup"] = round(out["device_only"]["seconds"] / out["with_host_tier"]["seconds"], 2)
    out["outputs_identical"] = outputs["device_only"] == outputs["with_host_tier"]
    res.working_set = out


# ---- 2. TTFT by where the prefix is -------------------------------------------------------------------------
def ttft(engine_or_node, prompt: list[int], before=None) -> tuple[float, int]:
    """Seconds from submission to the first token (``before``: the peer fetch, timed with it)."""
    engine = getattr(engine_or_node, "engine", engine_or_node)
    t0 = time.perf_counter()
    if before is not None:
        before()
    engine.add_request("ttft", prompt, greedy(1))
    while True:
        done = [o for o in engine.step() if o.request_id == "ttft" and o.finished]
        if done:
            return time.perf_counter() - t0, done[0].cached_tokens


def tiers_of(engine: Engine, prefix: list[int]) -> set:
    held = dict(engine.cached_blocks())
    return {held.get(h) for h in hash_prompt_blocks(prefix, BS, engine.model_id)}


def drop_page_cache(folder: Path) -> bool:
    """Write back and drop every block file's pages, so the next read comes from the disk itself."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for path in folder.rglob("*.kvb"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def ttft_by_tier(lm, scale: Scale, tok: Tokens, res: Results, tmp: Path) -> None:
    from cache_service.cache_node import CacheNodeConfig
    from cache_service.local_node import LocalCacheNode
    from cache_service.prefix_fetcher import FetcherConfig

    prefix = tok(scale.prefix_len)
    # Two fillers a little longer than a request each: together they take every block of the pool.
    fillers = [tok(scale.prefix_len + scale.question_len + 3 * BS) for _ in range(2)]
    two = 2 * blocks_for(scale)  # a pool that holds two requests: the two fillers push the prefix out
    host_gb = 8 * blocks_for(scale) * res.block_nbytes / 2**30
    mk = lambda **kw: Engine(EngineConfig(block_size=BS, max_num_seqs=4, **kw), loaded=lm)  # noqa: E731

    device = mk(num_blocks=4 * blocks_for(scale))
    host = mk(num_blocks=two, host_cache_gb=host_gb)
    disk_dir = tmp / "disk"
    disk = mk(num_blocks=two, disk_cache_dir=str(disk_dir))
    cold = mk(num_blocks=4 * blocks_for(scale))
    fetch_cfg = CacheNodeConfig(fetcher=FetcherConfig(always_transfer=True, min_deadline_s=30, max_deadline_s=60))
    source = LocalCacheNode(mk(num_blocks=4 * blocks_for(scale)), "source", config=fetch_cfg).start()
    sink = LocalCacheNode(mk(num_blocks=4 * blocks_for(scale)), "sink", config=fetch_cfg).start()
    for e in (device, host, disk):
        e.generate([prefix + tok(scale.question_len)], greedy(1))
    source.generate([prefix + tok(scale.question_len)], greedy(1))
    num_prefix_blocks = scale.prefix_len // BS
    hint = PeerHint("source", source.transfer_address, num_prefix_blocks)

    def push_down(engine: Engine, want: Tier) -> None:
        for f in fillers:
            engine.generate([f], greedy(1))
        where = tiers_of(engine, prefix)
        assert where == {want}, f"prefix expected in {want.name}, found {where}"

    runs: dict[str, list[float]] = {k: [] for k in ("device", "host", "disk_page_cache", "disk_cold",
                                                      "disk_after_restart", "peer", "recomputed")}
    hits: dict[str, int] = {}
    cold_ok = True
    try:
        for _ in range(scale.ttft_reps):
            q = lambda: prefix + tok(scale.question_len)  # noqa: E731 - a fresh question each time
            s, hits["device"] = ttft(device, q())
            runs["device"].append(s)
            push_down(host, Tier.HOST)
            s, hits["host"] = ttft(host, q())
            runs["host"].append(s)
            push_down(disk, Tier.DISK)
            s, hits["disk_page_cache"] = ttft(disk, q())
            runs["disk_page_cache"].append(s)
            push_down(disk, Tier.DISK)
            cold_ok = drop_page_cache(disk_dir) and cold_ok
            s, hits["disk_cold"] = ttft(disk, q())
            runs["disk_cold"].append(s)
            restarted = mk(num_blocks=two, disk_cache_dir=str(disk_dir))  # the prefix's files are still there
            s, hits["disk_after_restart"] = ttft(restarted, q())
            runs["disk_after_restart"].append(s)
            del restarted
            assert sink.call(lambda e: e.reset_cache())
            p = q()
            s, hits["peer"] = ttft(sink, p, before=lambda: sink.fetch_prefix(p, peer=hint, peer_known=True))
            runs["peer"].append(s)
            assert cold.reset_cache()
            s, hits["recomputed"] = ttft(cold, q())
            runs["recomputed"].append(s)
            print("  ttft " + ", ".join(f"{k} {v[-1] * 1000:.0f} ms" for k, v in runs.items()), flush=True)
    finally:
        source.stop()
        sink.stop()
    if not cold_ok:
        res.notes.append("posix_fadvise is not available: disk_cold read from the page cache")
    res.ttft_s = {k: round(statistics.median(v), 4) for k, v in runs.items()}
    res.ttft_runs_s = {k: [round(x, 4) for x in v] for k, v in runs.items()}
    res.ttft_s["cached_tokens"] = hits


def run(model: str, scale: Scale, threads: int) -> Results:
    if threads:
        torch.set_num_threads(threads)
    res = Results(scale=asdict(scale))
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if model == "llama55m":
            from benchmarks.bench_engine import Scale as EngineScale
            from benchmarks.bench_engine import build_checkpoint

            folder = tmp / "llama55m"
            folder.mkdir()
            lm = load_model(str(build_checkpoint(folder, EngineScale())))
        else:
            lm = load_model("demo")
        res.model = model
        res.block_nbytes = Engine(EngineConfig(block_size=BS, num_blocks=1), loaded=lm).block_nbytes
        tok = Tokens(lm.config.vocab_size)
        print(f"model {model}, {res.block_nbytes} bytes per block", flush=True)
        print("1. working set 4x the device pool", flush=True)
        working_set(lm, scale, tok, res)
        print("2. TTFT by where the prefix is", flush=True)
        ttft_by_tier(lm, scale, tok, res, tmp)
    return res


def print_table(r: Results) -> None:
    w = r.working_set
    print(f"\n1. {w['requests']} requests, {w['prompt_tokens']} prompt tokens; unbounded cache: "
          f"{w['ideal_hit_tokens']} hit tokens")
    print("| engine | total time | hit rate | of the ideal |")
    print("| --- | --- | --- | --- |")
    for name in ("device_only", "with_host_tier"):
        x = w[name]
        print(f"| {name} | {x['seconds']:.1f} s | {x['hit_rate']:.1%} | {x['of_ideal']:.1%} |")
    print(f"speedup {w['speedup']}x; outputs identical: {w['outputs_identical']}")
    print("\n2. TTFT (median)")
    print("| prefix | TTFT | vs recomputed |")
    print("| --- | --- | --- |")
    base = r.ttft_s["recomputed"]
    for k, v in r.ttft_s.items():
        if k != "cached_tokens":
            print(f"| {k} | {v * 1000:.0f} ms | {base / v:.1f}x faster |")
    print(f"cached tokens: {r.ttft_s['cached_tokens']}")
    for n in r.notes:
        print(f"note: {n}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("demo", "llama55m"), default="demo")
    parser.add_argument("--quick", action="store_true", help="a scaled-down run")
    parser.add_argument("--json", help="write the results as JSON to this file")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1; 0 = torch's default)")
    args = parser.parse_args(argv)
    results = run(args.model, QUICK if args.quick else Scale(), args.threads)
    print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(results), indent=2))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
