"""``bench_vs_vllm``'s runner for vLLM's CPU backend, run with the vLLM venv's interpreter:

    /path/to/vllm-venv/bin/python benchmarks/vs_vllm_run_vllm.py SPEC OUT

``vllm.LLM`` with prefix caching on, token ids in (no tokenizer), greedy, EOS ignored; everything else is
vLLM's default (its multiprocess engine core, block size, chunked-prefill budget, torch.compile warm-up).
Threads: vLLM binds its OpenMP threads to ``VLLM_CPU_OMP_THREADS_BIND`` (the parent sets it for matched
runs and leaves it unset for vLLM's default). This file runs outside this project's venv: it imports only
vLLM and the standard-library driver next to it.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; workload A needs ~0.2 GiB at float32


def make_engine(spec: dict):
    import torch
    import vllm
    from vllm import LLM, SamplingParams

    llm = LLM(model=spec["checkpoint"], dtype=spec["dtype"], enable_prefix_caching=True, skip_tokenizer_init=True,
              max_model_len=4096, seed=0)

    def generate(prompts: list[list[int]], n: int) -> tuple[list[list[int]], int]:
        params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs], sum(o.num_cached_tokens or 0 for o in outs)

    info = {"name": "vllm", "vllm": vllm.__version__, "torch": torch.__version__,
            "threads_bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "(vLLM default)")}
    return generate, info


if __name__ == "__main__":
    from vs_vllm_driver import main

    main(make_engine)
