"""Model runtime: Llama-family checkpoints (Llama 2/3, Mistral, Qwen2) over a paged KV cache.

    loaded = load_model("demo")                  # or a Hugging Face checkpoint folder
    cache = KVCache(loaded.config, num_blocks, block_size, loaded.dtype, loaded.device)
    logits = loaded.model(ForwardBatch(...), cache)   # [num_seqs, vocab] fp32, last token of each sequence
"""

from workers.model.causal_lm import CausalLM
from workers.model.config import SUPPORTED_ARCHITECTURES, ModelConfig, ModelLoadError, parse_model_config
from workers.model.demo import DEMO_MODEL_ID
from workers.model.forward_batch import ForwardBatch
from workers.model.kv_cache import KVCache
from workers.model.loader import LoadedModel, checkpoint_model_id, load_model, load_tokenizer
from workers.model.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer

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
