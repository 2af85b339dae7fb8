"""The workloads of ``bench_vs_vllm`` and the one driver both engine runners use (standard library only).

Each runner (``vs_vllm_run_prefixcache.py``, ``vs_vllm_run_vllm.py``) wraps its engine as a ``generate(prompts,
max_tokens) -> (token ids per prompt, prompt tokens served from the prefix cache)`` callable (token ids in,
greedy, EOS ignored) and hands it to ``run_workloads``,
so that both engines are timed by the same code around the same calls. The prompts come from the parent
process in a JSON file: both engines see exactly the same token ids.

    A  shared prefix: every A prompt submitted at once, ``a_output_len`` tokens each; total time.
    B  TTFT: the system prompt is cached first, then (alternating) a cached prompt (system + a fresh question)
       and a cold prompt of the question's length, one token each; medians of ``b_reps``.
    C  decode: ``c_batch`` prompts at once, 1 token (a prefill) and, with other prompts of the same length,
       ``c_output_len`` tokens; decode tok/s = batch * (output_len - 1) / (t_full - t_prefill).

This file is imported by the runners from inside their own interpreters (the vLLM one runs in a separate venv
without this project installed), so it imports nothing outside the standard library.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from typing import Callable

Generate = Callable[[list[list[int]], int], tuple[list[list[int]], int]]


def _timed(generate: Generate, prompts: list[list[int]], n: int):
    """(wall s, this process's CPU s, outputs, cached prompt tokens) of one generate call."""
    wall, cpu = time.perf_counter(), time.process_time()
    out, cached = generate(prompts, n)
    return time.perf_counter() - wall, time.process_time() - cpu, out, cached


def run_workloads(generate: Generate, prompts: dict, workloads: list[str]) -> dict:
    """Run the named workloads (in the order A, B, C: A needs a cache that holds none of its prefixes)."""
    res: dict = {"load_average_start": os.getloadavg()[0]}
    for p in prompts["warmup"]:  # first-call allocations, thread pools, lazy compilation
        generate([p], 4)
    generate(prompts["warmup"], 4)
    if "A" in workloads:
        wall, cpu, out, cached = _timed(generate, prompts["a"], prompts["a_output_len"])
        res["A"] = {"wall_s": wall, "cpu_s": cpu, "outputs": out, "cached_tokens": cached,
                    "prompt_tokens": sum(len(p) for p in prompts["a"])}
    if "B" in workloads:
        system = prompts["b_system"]
        generate([system + prompts["b_questions"][0]], 1)  # the prefix is cached from here on
        cached, cold, hits = [], [], []
        for q, c in zip(prompts["b_questions"][1:], prompts["b_cold"]):
            wall, _, _, hit = _timed(generate, [system + q], 1)
            cached.append(wall)
            hits.append(hit)
            cold.append(_timed(generate, [c], 1)[0])
        res["B"] = {"cached_s": statistics.median(cached), "cold_s": statistics.median(cold),
                    "cached_runs_s": cached, "cold_runs_s": cold, "cached_tokens": min(hits)}
    if "C" in workloads:
        n = prompts["c_output_len"]
        prefill, prefill_cpu, _, _ = _timed(generate, prompts["c_prefill"], 1)
        full, full_cpu, out, _ = _timed(generate, prompts["c"], n)
        num = len(prompts["c"]) * (n - 1)
        res["C"] = {"tokens_per_s": num / max(full - prefill, 1e-9),
                    "tokens_per_cpu_s": num / max(full_cpu - prefill_cpu, 1e-9),
                    "prefill_s": prefill, "full_s": full, "outputs": out}
    res["load_average_end"] = os.getloadavg()[0]
    return res


def main(make_engine: Callable[[dict], tuple[Generate, dict]]) -> None:
    """A runner's entry point: ``python runner.py SPEC.json OUT.json``.

    The spec names the checkpoint, dtype, threads, the workloads and the prompts file; ``make_engine(spec)``
    returns the engine's ``generate`` and facts about it (load time, versions), which go into the output.
    """
    spec = json.loads(open(sys.argv[1]).read())
    with open(spec["prompts_file"]) as f:
        prompts = json.load(f)
    t0 = time.perf_counter()
    generate, info = make_engine(spec)
    info["load_s"] = time.perf_counter() - t0
    res = run_workloads(generate, prompts, spec["workloads"])
    res["engine"] = info
    with open(sys.argv[2], "w") as f:
        json.dump(res, f)
