"""What verifying an imported run costs, side by side in one run (ratios printed; never asserted).

    python -m benchmarks.bench_verify [--json] [--quick] [--skip-llama] [--tokens 2048] [--threads N]

For a ``--tokens``-token prefix, on the demo model and on a ~50M-parameter Llama (bench_cache.py's: hidden
512, 8 layers, 8 heads, 2 kv heads, vocab 32000; built with transformers in a temp dir), fp32 and bf16:

    recompute            a cold prefill of the prompt on the importer (what a fetch saves)
    fetch+import         BlockTransfer over loopback + import, no verification
    fetch+import+verify  the same with the last block recomputed and compared (the fetcher's path)
    verify               EnginePort.verify_block alone (one block_size-token prefill over the imported prefix)

and the verification's amortized cost under the default policy (first 2 fetches per peer, then 1 in 16).
Medians of ``reps`` alternating rounds. ``--threads`` sets torch's intra-op threads for every row alike: on a
shared, loaded machine a 16-token prefill on 2 spinning OpenMP threads can take 10x its single-thread time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cache_service.cache_node import CacheNodeConfig
from cache_service.local_node import LocalCacheNode
from cache_service.peer_trust import TrustConfig
from cache_service.prefix_fetcher import FetcherConfig, FetchOutcome
from cache_service.records import PeerHint, SamplingParams
from workers.engine import Engine, EngineConfig
from workers.model import load_model

NEVER = dict(verify_first=0, sample_every=0)
ALWAYS = dict(verify_first=0, sample_every=1)


def bench_one(loaded, num_tokens: int, reps: int) -> dict[str, Any]:
    vocab = loaded.config.vocab_size
    prompt = [(i * 7919) % (vocab - 3) + 3 for i in range(num_tokens + 1)]  # num_tokens cacheable + the last
    num_blocks = num_tokens // 16
    cfg = EngineConfig(model="bench", block_size=16, num_blocks=num_blocks + 8, max_num_batched_tokens=4096)
    params = SamplingParams(max_tokens=1)
    node_cfg = CacheNodeConfig(fetcher=FetcherConfig(always_transfer=True, max_deadline_s=120))
    a = LocalCacheNode(Engine(cfg, loaded=loaded), "A", config=node_cfg).start()
    b = LocalCacheNode(Engine(cfg, loaded=loaded), "B", config=node_cfg).start()
    trust = b.node.trust.config
    hint = PeerHint("A", a.transfer_address, num_blocks)
    rows: dict[str, list[float]] = {"recompute": [], "fetch_import": [], "fetch_import_verify": [], "verify": []}
    diffs = []
    try:
        a.call(lambda e: e.generate([prompt], params))  # warm-up; A holds the prefix
        b.call(lambda e: e.generate([prompt], params))
        for _ in range(reps):
            assert b.call(lambda e: e.reset_cache())
            t0 = time.perf_counter()
            out = b.call(lambda e: e.generate([prompt], params))[0]
            rows["recompute"].append(time.perf_counter() - t0)
            assert out.cached_tokens == 0
            for key, policy in (("fetch_import", NEVER), ("fetch_import_verify", ALWAYS)):
                trust.verify_first, trust.sample_every = policy["verify_first"], policy["sample_every"]
                assert b.call(lambda e: e.reset_cache())
                t0 = time.perf_counter()
                f = b.fetch_prefix(prompt, peer=hint, peer_known=True)
                rows[key].append(time.perf_counter() - t0)
                assert f.outcome == FetchOutcome.TRANSFERRED and f.num_tokens == num_tokens, f
                assert (f.verification is not None) == (policy is ALWAYS)
            t0 = time.perf_counter()
            check = b.call(lambda e: e.verify_block(prompt, "", num_blocks - 1))
            rows["verify"].append(time.perf_counter() - t0)
            assert check is not None and check.ok, check
            diffs.append(check.rel_diff)
        block_nbytes = a.engine.block_nbytes
    finally:
        a.stop()
        b.stop()
    med = {k: statistics.median(v) for k, v in rows.items()}
    # The default policy verifies 2 fetches of a peer, then 1 in 16: in the long run 1/16 of fetches.
    return {
        "dtype": str(loaded.dtype).removeprefix("torch."), "num_params": loaded.num_params, "num_tokens": num_tokens,
        "bytes": num_blocks * block_nbytes, "reps": reps, **{f"{k}_s": v for k, v in med.items()},
        "verify_vs_fetch_import": med["verify"] / med["fetch_import"],
        "verify_vs_recompute": med["verify"] / med["recompute"],
        "amortized_verify_vs_fetch_import": med["verify"] / 16 / med["fetch_import"],
        "honest_rel_diff_max": max(diffs),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--quick", action="store_true", help="one round per model (a smoke run)")
    parser.add_argument("--skip-llama", action="store_true", help="the demo model only")
    parser.add_argument("--tokens", type=int, default=2048, help="prefix length (a multiple of 16)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    reps = 1 if args.quick else 5
    models: list[tuple[str, Any]] = [("demo", lambda d: load_model("demo", d))]
    tmp = None
    if not args.skip_llama:
        from benchmarks.bench_cache import build_llama_50m

        tmp = tempfile.TemporaryDirectory()
        folder = Path(tmp.name) / "llama-50m"
        build_llama_50m(folder)
        models.append(("llama-50m", lambda d: load_model(folder, d)))
    out: dict[str, Any] = {}
    try:
        for name, load in models:
            for dtype in ("float32", "bfloat16"):
                out[f"{name}/{dtype}"] = bench_one(load(dtype), args.tokens, reps)
    finally:
        if tmp is not None:
            tmp.cleanup()
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    import torch

    print(f"Verifying an imported {args.tokens}-token prefix (last block recomputed), median of {reps}, "
          f"{torch.get_num_threads()} torch thread(s)")
    print(f"  {'model':<20}{'recompute':>11}{'fetch+imp':>11}{'+verify':>11}{'verify':>9}"
          f"{'v/fetch':>9}{'v/recomp':>10}{'amortized':>11}{'honest diff':>13}")
    for name, m in out.items():
        print(f"  {name + ' ' + format(m['num_params'] / 1e6, '.0f') + 'M':<20}{m['recompute_s'] * 1e3:>9.0f}ms"
              f"{m['fetch_import_s'] * 1e3:>9.1f}ms{m['fetch_import_verify_s'] * 1e3:>9.1f}ms"
              f"{m['verify_s'] * 1e3:>7.1f}ms{m['verify_vs_fetch_import']:>8.2f}x{m['verify_vs_recompute']:>9.3f}x"
              f"{m['amortized_verify_vs_fetch_import'] * 100:>10.1f}%{m['honest_rel_diff_max']:>13.2g}")
    print("  (v/fetch, v/recomp: one verification vs what it guards and vs recomputing; amortized: at 1 in 16,"
          " as a share of fetch+import; honest diff: max |diff| / scale of the verified block)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
