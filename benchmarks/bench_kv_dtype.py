"""fp8 KV cache vs the model's dtype, side by side in one run (CPU, one torch thread by default).

    python -m benchmarks.bench_kv_dtype [--quick] [--json results.json] [--threads N]

For three models (the built-in random demo model, a random ~55M Llama as in bench_engine.py, and a tiny
Llama trained on counting sequences whose predictions are not noise; all float32) and both
``--kv-cache-dtype auto`` and ``fp8``:

  1. blocks per GiB of KV pool (block size 16; what ``KVCache.blocks_for_memory`` gives: the scales counted);
  2. prefill throughput: the prompts' tokens / the time of a 1-token generate on a cold cache;
  3. decode throughput: tokens / s over the steps where every sequence decodes (``engine_decode``);
  4. greedy agreement of fp8 with auto: free-running (the decode run's outputs, position by position),
     teacher-forced top-1 (along the auto trajectory, so both caches see the same tokens) and the largest
     logit error there.

Throughputs are medians of runs alternating auto and fp8 (this machine is shared). Nothing is asserted: the
trained model's >= 99% agreement is a test (tests/test_kv_fp8.py).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from benchmarks.bench_engine import Clock, Scale, build_checkpoint, engine_decode, greedy, print_rows  # noqa: E402
from tests.model_fixtures import build_trained_checkpoint, counting_sequence, teacher_forced_logits  # noqa: E402
from workers.engine import Engine, EngineConfig  # noqa: E402
from workers.model import KVCache, load_model  # noqa: E402

KV_DTYPES = ("auto", "fp8")


@dataclass
class Workload:
    prefill_prompts: int = 8
    prefill_len: int = 512
    decode_batch: int = 16
    decode_prompt_len: int = 256
    decode_tokens: int = 32
    forced_prompts: int = 8
    forced_tokens: int = 32
    repeats: int = 3


QUICK = Workload(prefill_prompts=4, prefill_len=256, decode_batch=8, decode_prompt_len=128, decode_tokens=16,
                 forced_prompts=4, forced_tokens=16, repeats=1)
# The trained model is measured on its own task (it was trained on 48-token sequences): 8-token prompts continued
# for 32 tokens, as in its test. Its throughputs say little (0.1M parameters); its agreement is the point.
TRAINED = dict(prefill_len=40, decode_prompt_len=8, decode_tokens=32, forced_tokens=32)


@dataclass
class ModelResult:
    name: str
    num_params: int
    dtype: str
    head_dim: int
    workload: dict = field(default_factory=dict)
    blocks_per_gib: dict = field(default_factory=dict)
    block_nbytes: dict = field(default_factory=dict)
    prefill_tokens_per_s: dict = field(default_factory=dict)
    decode_tokens_per_s: dict = field(default_factory=dict)
    agreement: dict = field(default_factory=dict)


def prompts_for(name: str, n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    if name == "trained":  # its own distribution: elsewhere it is as random as the others
        rng = random.Random(seed)
        return [counting_sequence(rng, length) for _ in range(n)]
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, min(vocab, 32000), (n, length), generator=gen).tolist()


def prefill_rate(engine: Engine, prompts: list[list[int]]) -> tuple[float, float]:
    """Prompt tokens per second of wall time and of process CPU time."""
    assert engine.reset_cache()  # cold: nothing of these prompts is cached from a previous run
    clock = Clock()
    outs = engine.generate(prompts, greedy(1))
    wall, cpu = clock.stop()
    assert all(o.error is None for o in outs), outs[0].error
    num = sum(len(p) for p in prompts)
    return num / wall, num / cpu


def measure(name: str, folder: str, w: Workload, threads: int) -> ModelResult:
    lm = load_model(folder, dtype="float32", device="cpu")
    cfg = lm.config
    res = ModelResult(name, lm.num_params, "float32", cfg.head_dim, asdict(w))
    for kv in KV_DTYPES:
        res.blocks_per_gib[kv] = KVCache.blocks_for_memory(cfg, 16, lm.dtype, 1 << 30, kv)
        res.block_nbytes[kv] = KVCache.bytes_per_block(cfg, 16, lm.dtype, kv)
    res.blocks_per_gib["bfloat16 (for reference)"] = KVCache.blocks_for_memory(cfg, 16, torch.bfloat16, 1 << 30)
    max_len = max(w.prefill_len, w.decode_prompt_len + w.decode_tokens)
    num_blocks = max(w.prefill_prompts, w.decode_batch) * (-(-max_len // 16) + 1)
    engines = {kv: Engine(EngineConfig(model=folder, num_blocks=num_blocks, kv_cache_dtype=kv, max_num_seqs=64,
                                       max_num_batched_tokens=2048), loaded=lm) for kv in KV_DTYPES}
    pre = prompts_for(name, w.prefill_prompts, w.prefill_len, cfg.vocab_size, seed=1)
    dec = prompts_for(name, w.decode_batch, w.decode_prompt_len, cfg.vocab_size, seed=2)
    scale = Scale(decode_tokens=w.decode_tokens)
    for e in engines.values():
        e.generate([dec[0][:32]], greedy(2))  # warm-up
    prefill: dict[str, list[tuple[float, float]]] = {kv: [] for kv in KV_DTYPES}
    decode: dict[str, list[tuple[float, float]]] = {kv: [] for kv in KV_DTYPES}
    outs: dict[str, list[list[int]]] = {}
    for rep in range(w.repeats):
        for kv in KV_DTYPES if rep % 2 == 0 else reversed(KV_DTYPES):  # alternate who goes first
            e = engines[kv]
            prefill[kv].append(prefill_rate(e, pre))
            assert e.reset_cache()
            rate, o = engine_decode(e, dec, scale, tag=f"{kv}{rep}-")
            decode[kv].append(rate)
            outs.setdefault(kv, o)
            e.check_integrity()
    for kv in KV_DTYPES:  # medians of wall and of CPU rates (the CPU ones are less sensitive to neighbours)
        res.prefill_tokens_per_s[kv] = statistics.median(r[0] for r in prefill[kv])
        res.prefill_tokens_per_s[kv + "_cpu"] = statistics.median(r[1] for r in prefill[kv])
        res.decode_tokens_per_s[kv] = statistics.median(r[0] for r in decode[kv])
        res.decode_tokens_per_s[kv + "_cpu"] = statistics.median(r[1] for r in decode[kv])
    num = sum(len(o) for o in outs["auto"])
    same = sum(a == b for x, y in zip(outs["auto"], outs["fp8"]) for a, b in zip(x, y))
    first_div = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), None) for x, y in zip(outs["auto"], outs["fp8"])]
    forced_prompts = dec[: w.forced_prompts]
    forced = [o[: w.forced_tokens] for o in outs["auto"][: w.forced_prompts]]
    ref = teacher_forced_logits(lm, forced_prompts, forced, block_size=16)
    fp8 = teacher_forced_logits(lm, forced_prompts, forced, block_size=16, kv_cache_dtype="fp8")
    top1 = sum(int((r.argmax(-1) == f.argmax(-1)).sum()) for r, f in zip(ref, fp8))
    margins = torch.cat([r.topk(2, -1).values.diff(dim=-1).neg().flatten() for r in ref])
    res.agreement = {
        "free_running": same / num, "free_running_tokens": f"{same}/{num}",
        "sequences_identical": sum(d is None for d in first_div), "num_sequences": len(first_div),
        "teacher_forced_top1": top1 / (len(forced) * w.forced_tokens),
        "max_abs_logit_error": max(float((r - f).abs().max()) for r, f in zip(ref, fp8)),
        "median_top2_margin": float(margins.median()),
        "logit_span": max(float((r.max(-1).values - r.min(-1).values).max()) for r in ref),
    }
    print(f"  {name}: done", flush=True)
    return res


def run(w: Workload, threads: int) -> dict:
    if threads:
        torch.set_num_threads(threads)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        print("building the trained tiny Llama (counting sequences) ...", flush=True)
        trained = build_trained_checkpoint(tmp)
        print("building the random ~55M Llama ...", flush=True)
        llama = build_checkpoint(Path(tmp) / "llama-55m", Scale())
        for name, folder in (("demo", "demo"), ("random 55M Llama", str(llama)), ("trained", str(trained))):
            print(f"measuring {name} ...", flush=True)
            results.append(measure(name, folder, replace(w, **TRAINED) if name == "trained" else w, threads))
    return {"workload": asdict(w), "torch_threads": torch.get_num_threads(), "load_average": os.getloadavg()[0],
            "models": [asdict(r) for r in results]}


def print_table(out: dict) -> None:
    rows = []
    for m in out["models"]:
        bpg, pre, dec, agr = m["blocks_per_gib"], m["prefill_tokens_per_s"], m["decode_tokens_per_s"], m["agreement"]
        name = f"{m['name']} ({m['num_params'] / 1e6:.1f}M, head_dim {m['head_dim']})"
        rows.append((name, "blocks / GiB", f"{bpg['auto']}", f"{bpg['fp8']}", f"{bpg['fp8'] / bpg['auto']:.2f}x"))
        for what, r in (("prefill", pre), ("decode", dec)):
            rows.append(("", f"{what} tok/s (per cpu-s)", f"{r['auto']:.0f} ({r['auto_cpu']:.0f})",
                         f"{r['fp8']:.0f} ({r['fp8_cpu']:.0f})",
                         f"{r['fp8'] / r['auto']:.2f}x ({r['fp8_cpu'] / r['auto_cpu']:.2f}x)"))
        rows.append(("", "greedy agreement (free-running)", "", agr["free_running_tokens"],
                     f"{agr['free_running']:.1%} ({agr['sequences_identical']}/{agr['num_sequences']} sequences)"))
        rows.append(("", "teacher-forced top-1 / max logit error", "", f"{agr['teacher_forced_top1']:.1%}",
                     f"{agr['max_abs_logit_error']:.3f} (median top-2 margin {agr['median_top2_margin']:.2f})"))
    print_rows(("model (float32)", "measure", "auto", "fp8", "fp8 vs auto"), rows)
    w = out["workload"]
    print(f"\nprefill: {w['prefill_prompts']} x {w['prefill_len']} tokens cold; decode: {w['decode_batch']} sequences "
          f"x {w['decode_tokens']} tokens after {w['decode_prompt_len']}-token prompts; medians of {w['repeats']}; "
          f"{out['torch_threads']} torch thread(s), load average {out['load_average']:.1f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a scaled-down run")
    parser.add_argument("--json", help="write the results as JSON to this file")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1; 0 = torch's default)")
    args = parser.parse_args(argv)
    out = run(QUICK if args.quick else Workload(), args.threads)
    print()
    print_table(out)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
