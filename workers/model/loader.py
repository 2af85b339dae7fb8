"""``load_model``: a checkpoint folder (or ``"demo"``) -> model + config + tokenizer + stable model id.

What a checkpoint is without its weights (folder, model id, tokenizer alone) is ``checkpoint.py``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from workers.model.causal_lm import CausalLM
from workers.model.checkpoint import checkpoint_folder, checkpoint_model_id
from workers.model.config import ModelConfig, ModelLoadError, canonical_dtype, load_model_config
from workers.model.demo import DEMO_MODEL_ID, build_demo_model, demo_config
from workers.model.tokenizer import ByteTokenizer, Tokenizer, load_hf_tokenizer
from workers.model.weights import load_weights


@dataclass(slots=True)
class LoadedModel:
    model: CausalLM
    config: ModelConfig
    tokenizer: Tokenizer
    model_id: str
    dtype: torch.dtype
    device: torch.device
    num_params: int
    weight_bytes: int


def _resolve_device(device: str | torch.device) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device 'cuda' requested but CUDA is not available")
    return dev


def load_model(
    path_or_demo: str | Path, dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu"
) -> LoadedModel:
    """Load a Llama / Mistral / Qwen2 checkpoint folder, or build the demo model for ``"demo"``.

    ``dtype`` defaults to the checkpoint's ``torch_dtype``/``dtype`` (float32 when absent; always float32 for
    the demo). Raises ``ModelLoadError`` naming the missing/invalid file, field or tensor.
    """
    dev = _resolve_device(device)
    if str(path_or_demo) == DEMO_MODEL_ID:
        config = demo_config()
        torch_dtype = canonical_dtype(dtype, default=config.torch_dtype)
        model = build_demo_model(torch_dtype, dev)
        tokenizer: Tokenizer = ByteTokenizer()
        model_id = DEMO_MODEL_ID
    else:
        folder = checkpoint_folder(path_or_demo)
        config = load_model_config(folder)
        tokenizer = load_hf_tokenizer(folder, config.eos_token_ids, config.bos_token_id)
        if not config.eos_token_ids and tokenizer.eos_token_ids:
            config = dataclasses.replace(config, eos_token_ids=tokenizer.eos_token_ids)
        if config.bos_token_id is None and tokenizer.bos_token_id is not None:
            config = dataclasses.replace(config, bos_token_id=tokenizer.bos_token_id)
        torch_dtype = canonical_dtype(dtype, default=config.torch_dtype)
        model_id = checkpoint_model_id(folder)
        model = CausalLM.empty(config, torch_dtype, dev)
        model.config = config
        load_weights(model, folder)
    params = {id(p): p for p in model.parameters()}.values()  # tied weights count once
    num_params = sum(p.numel() for p in params)
    weight_bytes = sum(p.numel() * p.element_size() for p in params)
    return LoadedModel(
        model=model,
        config=config,
        tokenizer=tokenizer,
        model_id=model_id,
        dtype=torch_dtype,
        device=dev,
        num_params=num_params,
        weight_bytes=weight_bytes,
    )
