"""Model runtime: Llama-family checkpoints (Llama 2/3, Mistral, Qwen2) over a paged KV cache.

    loaded = load_model("demo")                  # or a Hugging Face checkpoint folder
    cache = KVCache(loaded.config, num_blocks, block_size, loaded.dtype, loaded.device)
    logits = loaded.model(ForwardBatch(...), cache)   # [num_seqs, vocab] fp32, last token of each sequence

Importing this package does not import torch: the router needs the torch-free part (config, tokenizer, model id:
``config.py``, ``tokenizer.py``, ``checkpoint.py``, ``demo.py``), and the names that need torch are imported
on first use (PEP 562 ``__getattr__``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from workers.model.checkpoint import checkpoint_model_id, load_tokenizer
from workers.model.config import SUPPORTED_ARCHITECTURES, ModelConfig, ModelLoadError, parse_model_config
from workers.model.demo import DEMO_MODEL_ID
from workers.model.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer

if TYPE_CHECKING:
    from workers.model.causal_lm import CausalLM
    from workers.model.forward_batch import ForwardBatch
    from workers.model.kv_cache import KVCache
    from workers.model.loader import LoadedModel, load_model

# name -> the submodule that defines it (each imports torch)
_NEEDS_TORCH = {
    "CausalLM": "causal_lm",
    "ForwardBatch": "forward_batch",
    "KVCache": "kv_cache",
    "LoadedModel": "loader",
    "load_model": "loader",
}


def __getattr__(name: str):
    module = _NEEDS_TORCH.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


__all__ = [
    "ByteTokenizer",
    "CausalLM",
    "DEMO_MODEL_ID",
    "ForwardBatch",
    "HFTokenizer",
    "KVCache",
    "LoadedModel",
    "ModelConfig",
    "ModelLoadError",
    "SUPPORTED_ARCHITECTURES",
    "Tokenizer",
    "checkpoint_model_id",
    "load_model",
    "load_tokenizer",
    "parse_model_config",
]
