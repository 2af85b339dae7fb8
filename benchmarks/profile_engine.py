"""Where an engine step's time goes, by component, on bench_vs_vllm's workloads (CPU, one process).

    python -m benchmarks.profile_engine [--dtype bfloat16] [--workload A|B|C] [--threads 1] [--ops]

Each component below is wrapped with a timer of this thread's CPU time (``time.thread_time``: on a shared
machine wall time mostly measures the neighbours, and with one torch thread the CPU time of this thread is the
work done; ``--wall`` times wall clock instead, for more threads). Wrapped calls nest (attention runs inside
the layer); each is reported without its children:

    linear      every projection and the LM head (oneDNN / F.linear), fused epilogues included
    attention   paged attention for prefills, the K/V gathers and dequantization included
    decode cascade  cascade attention of decode steps (the same, for decodes)
    fused kernel    the fused C attention kernel (workers/model/fused_attention.py) inside either
    kv write    storing the step's new K/V into the cache
    model other embeddings, norms, rope, activations, residuals, the attention plan, logits copy
    batch       ForwardBatch construction (model_runner.py)
    schedule    the scheduler's step plan and commit (block allocation, hashing, prefix lookups)
    sample      sampling (greedy argmax and the rest)
    engine      everything else in Engine.step (outputs, detokenizing, bookkeeping)

``--ops`` adds torch.profiler's table of the top operators (its times are wall clock, inflated by load).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


class Split:
    def __init__(self, clock=time.thread_time) -> None:
        self.totals: dict[str, float] = {}
        self.stack: list[list] = []  # [name, start, child time]
        self.clock = clock

    def wrap(self, owner, attr: str, name: str) -> None:
        fn = getattr(owner, attr)

        @functools.wraps(fn)
        def timed(*a, **k):
            self.stack.append([name, self.clock(), 0.0])
            try:
                return fn(*a, **k)
            finally:
                _, start, child = self.stack.pop()
                spent = self.clock() - start
                self.totals[name] = self.totals.get(name, 0.0) + spent - child
                if self.stack:
                    self.stack[-1][2] += spent

        setattr(owner, attr, timed)


def install(split: Split) -> None:
    import workers.engine as engine_mod
    import workers.model.attention as attention
    import workers.model.causal_lm as causal_lm
    import workers.model.layers as layers
    from torch import nn
    from workers.scheduler import Scheduler

    split.wrap(engine_mod.Engine, "_step", "engine")
    split.wrap(Scheduler, "schedule", "schedule")
    split.wrap(Scheduler, "commit", "schedule")
    split.wrap(engine_mod, "build_forward_batch", "batch")
    split.wrap(engine_mod, "sample", "sample")
    split.wrap(causal_lm.CausalLM, "forward", "model other")
    split.wrap(nn.Linear, "forward", "linear")
    if hasattr(layers, "Linear") and layers.Linear.forward is not nn.Linear.forward:
        split.wrap(layers.Linear, "forward", "linear")
        if hasattr(layers.Linear, "silu_mul"):  # the MLP's gate/up GEMMs with their fused epilogues
            split.wrap(layers.Linear, "silu_mul", "linear")
    split.wrap(layers, "paged_attention", "attention")
    split.wrap(attention, "cascade_decode_attention", "decode cascade")
    from workers.model import fused_attention

    split.wrap(fused_attention, "attend_fused", "fused kernel")
    if hasattr(layers, "write_kv"):
        split.wrap(layers, "write_kv", "kv write")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--workload", default="A", choices=("A", "B", "C"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--ops", action="store_true", help="also print torch.profiler's top operators")
    parser.add_argument("--wall", action="store_true",
                        help="split wall-clock time instead of this thread's CPU time (for --threads > 1)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "prefixcache-profile")
    parser.add_argument("--json", help="append the split as one JSON line to this file")
    args = parser.parse_args(argv)

    import torch

    from benchmarks.bench_vs_vllm import ensure_checkpoint, make_prompts
    from cache_service.records import SamplingParams
    from workers.engine import Engine, EngineConfig
    from workers.model import load_model

    torch.set_num_threads(args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)
    checkpoint = ensure_checkpoint(args.workdir)
    prompts = make_prompts(args.workdir / "prompts.json", quick=False)
    engine = Engine(EngineConfig(model=str(checkpoint)), loaded=load_model(checkpoint, dtype=args.dtype))

    def generate(ps, n):
        return engine.generate(ps, SamplingParams(max_tokens=n, ignore_eos=True))

    for p in prompts["warmup"]:
        generate([p], 4)
    if args.workload == "A":
        work = [(prompts["a"], prompts["a_output_len"])]
    elif args.workload == "B":
        generate([prompts["b_system"] + prompts["b_questions"][0]], 1)
        work = [([prompts["b_system"] + q], 1) for q in prompts["b_questions"][1:]]
    else:
        work = [(prompts["c"], prompts["c_output_len"])]

    split = Split(time.perf_counter if args.wall else time.thread_time)
    install(split)
    profiler = None
    if args.ops:
        from torch.profiler import ProfilerActivity, profile

        profiler = profile(activities=[ProfilerActivity.CPU])
        profiler.__enter__()
    wall, cpu = time.perf_counter(), time.thread_time()
    for ps, n in work:
        generate(ps, n)
    wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
    if profiler is not None:
        profiler.__exit__(None, None, None)
    total = sum(split.totals.values())
    print(f"workload {args.workload}, {args.dtype}, {args.threads} thread(s): {wall:.2f} s wall, {cpu:.2f} s CPU "
          f"(this thread), load average {os.getloadavg()[0]:.1f}")
    for name, t in sorted(split.totals.items(), key=lambda kv: -kv[1]):
        print(f"  {name:12s} {t:8.3f} s  {t / total:6.1%}")
    if profiler is not None:
        print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=60))
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps({"workload": args.workload, "dtype": args.dtype, "threads": args.threads,
                                "wall_s": wall, "cpu_s": cpu, "split_s": split.totals}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
