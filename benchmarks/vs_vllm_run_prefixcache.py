"""``bench_vs_vllm``'s runner for this project's engine: ``python -m benchmarks.vs_vllm_run_prefixcache SPEC OUT``.

Loads the checkpoint with ``load_model`` (load time is reported, not timed in the workloads), sets the thread
count the spec asks for (``threads: null`` keeps the engine's own default), and runs the shared driver.
"""

from __future__ import annotations

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def make_engine(spec: dict):
    import torch

    from cache_service.records import SamplingParams
    from workers.engine import Engine, EngineConfig
    from workers.model import load_model

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    lm = load_model(spec["checkpoint"], dtype=spec["dtype"], device="cpu")
    engine = Engine(EngineConfig(model=spec["checkpoint"], max_num_seqs=spec.get("max_num_seqs", 64),
                                 kv_cache_memory_bytes=spec.get("kv_cache_bytes", 256 << 20)), loaded=lm)

    def generate(prompts: list[list[int]], n: int) -> tuple[list[list[int]], int]:
        outs = engine.generate(prompts, SamplingParams(max_tokens=n, ignore_eos=True))
        return [o.new_token_ids for o in outs], sum(o.cached_tokens for o in outs)

    info = {"name": "prefixcache", "torch": torch.__version__, "threads": torch.get_num_threads(),
            "num_blocks": engine.num_blocks}
    return generate, info


if __name__ == "__main__":
    from benchmarks.vs_vllm_driver import main

    main(make_engine)
