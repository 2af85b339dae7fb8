"""Our worker settings -> vLLM's engine arguments, and our sampling parameters -> vLLM's.

One place decides how a vLLM worker runs its engine, so that ``prefixcache serve --engine vllm`` flags mean
what they mean for the native engine:

    --model PATH        vLLM's model and tokenizer (a Hugging Face folder: config.json, safetensors, tokenizer)
    --dtype D           vLLM's dtype ("auto": the checkpoint's)
    --kv-cache-dtype    vLLM's kv_cache_dtype ("auto"; "fp8": vLLM's own fp8 KV cache, not this project's layout)
    --block-size N      vLLM's block_size; the router hashes with the same N (vLLM's CPU attention needs a
                        multiple of 32: the stack picks 32 for vLLM on CPU when --block-size is not given)
    --num-blocks N      vLLM's num_gpu_blocks_override (the pool's size in blocks); on CPU also the KV memory
                        vLLM reserves (its CPU backend otherwise claims a fraction of the machine's RAM)
    --max-num-seqs ...  the same names in vLLM

Always on: prefix caching, KV cache events on a ZMQ publisher bound to this worker's own ipc:// endpoint
(read by workers/vllm_kv_subscriber.py). On CPU, eager mode (no torch.compile: minutes of start-up on two
cores, and vLLM's CPU graph path wants triton).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cache_service.records import SamplingParams

__all__ = ["VllmOptions", "engine_args", "kv_block_nbytes", "sampling_params", "worker_env"]

_DTYPE_NBYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2}


@dataclass(slots=True)
class VllmOptions:
    """What only a vLLM worker has."""

    cpu_kv_cache_bytes: int = 1 << 30  # KV memory on CPU when --num-blocks is not given
    enforce_eager: bool | None = None  # None: eager on CPU, vLLM's default (CUDA graphs) on GPU
    # How long a finishing request waits for its blocks' KV events to reach the feed (vllm_store_watch.py).
    store_wait_s: float = 2.0
    gpu_memory_utilization: float = 0.9


def kv_block_nbytes(model: str, block_size: int, dtype: str | None) -> int:
    """Bytes of one KV block of ``model`` (K and V, every layer) at ``dtype`` (None/"auto": the checkpoint's)."""
    from workers.model.config import load_model_config

    cfg = load_model_config(Path(model).expanduser())
    name = cfg.torch_dtype if dtype in (None, "auto") else dtype
    return cfg.num_layers * 2 * block_size * cfg.num_kv_heads * cfg.head_dim * _DTYPE_NBYTES.get(name, 4)


def worker_env(num_threads: int | None, on_cpu: bool) -> dict[str, str]:
    """Environment for the engine's processes, set in the actor before vLLM starts (its children inherit it).

    ``spawn``: vLLM's engine core and model worker are separate processes, and forking a Ray worker (gRPC and
    Ray threads running) is unsafe. On CPU, vLLM binds its OpenMP threads to cores itself ("auto"), assuming it
    owns the machine; workers sharing a machine each get ``num_threads`` unbound threads instead, like a native
    CPU worker.
    """
    env = {"VLLM_WORKER_MULTIPROC_METHOD": "spawn", "VLLM_NO_USAGE_STATS": "1", "VLLM_DO_NOT_TRACK": "1"}
    if on_cpu:
        env["VLLM_CPU_OMP_THREADS_BIND"] = os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        if num_threads:
            env["OMP_NUM_THREADS"] = str(num_threads)
    return env


def engine_args(*, model: str, dtype: str | None, block_size: int, num_blocks: int | None, max_num_seqs: int,
                max_num_batched_tokens: int, kv_cache_dtype: str = "auto", kv_events_endpoint: str, on_cpu: bool,
                options: VllmOptions) -> Any:
    """vLLM's ``AsyncEngineArgs`` for one worker."""
    from vllm.config import KVEventsConfig
    from vllm.engine.arg_utils import AsyncEngineArgs

    from workers.model.config import load_model_config

    kwargs: dict[str, Any] = {}
    if num_blocks:
        # vLLM refuses a pool that cannot hold one max_model_len sequence; a native engine refuses such a
        # request instead (admission.py: "longer than the whole KV pool"). Cap the length as the pool does:
        # vLLM's block 0 is its null block, so a sequence gets num_blocks - 1 of them.
        context = load_model_config(Path(model).expanduser()).max_position_embeddings
        kwargs["max_model_len"] = min(context, (num_blocks - 1) * block_size)
    if on_cpu:
        # vLLM's CPU worker reserves gpu_memory_utilization x the machine's RAM unless told the KV size. A
        # quarter more than the blocks' bytes: vLLM's page size has padding, and the pool's size is set by
        # num_gpu_blocks_override anyway.
        per_block = kv_block_nbytes(model, block_size, dtype)
        kwargs["kv_cache_memory_bytes"] = ((num_blocks + 1) * per_block * 5 // 4 if num_blocks
                                           else options.cpu_kv_cache_bytes)
    else:
        kwargs["gpu_memory_utilization"] = options.gpu_memory_utilization
    eager = options.enforce_eager if options.enforce_eager is not None else on_cpu
    return AsyncEngineArgs(
        model=model, tokenizer=model, dtype=dtype or "auto", kv_cache_dtype=kv_cache_dtype, block_size=block_size,
        num_gpu_blocks_override=num_blocks, enable_prefix_caching=True, max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens, enforce_eager=eager, disable_log_stats=True,
        kv_events_config=KVEventsConfig(enable_kv_cache_events=True, publisher="zmq", endpoint=kv_events_endpoint),
        **kwargs,
    )


def sampling_params(params: SamplingParams) -> Any:
    """Ours (already validated) -> vLLM's, streaming deltas. Stop strings, EOS and detokenization are vLLM's."""
    from vllm import SamplingParams as VllmSamplingParams
    from vllm.sampling_params import RequestOutputKind

    return VllmSamplingParams(
        max_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
        seed=params.seed, stop=list(params.stop) or None, ignore_eos=params.ignore_eos,
        output_kind=RequestOutputKind.DELTA,
    )
