"""The built-in ``demo`` model: a small Llama with deterministic random weights and a byte tokenizer.

Made on the fly (no download, well under a second) from a fixed seed with torch's CPU generator, so every
process on every node builds bit-identical weights and the whole stack (routing, block hashes, transfers) can
run and be tested without a checkpoint. The init is scaled so greedy decoding wanders over many tokens instead
of locking onto one; the BOS/PAD rows of the output head are zero so they are (practically) never generated.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from workers.model.config import ModelConfig
from workers.model.tokenizer import ByteTokenizer

if TYPE_CHECKING:  # the id and the config are torch-free (the router reads them); only the weights need torch
    import torch

    from workers.model.causal_lm import CausalLM

DEMO_MODEL_ID = "demo"
DEMO_SEED = 1234


def demo_config() -> ModelConfig:
    return ModelConfig(
        architecture="LlamaForCausalLM",
        vocab_size=256 + ByteTokenizer.NUM_SPECIALS,
        hidden_size=256,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        head_dim=64,
        intermediate_size=768,
        max_position_embeddings=4096,
        rope_theta=10000.0,
        rope_scaling=None,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        attention_bias=False,
        bos_token_id=ByteTokenizer.BOS,
        eos_token_ids=(ByteTokenizer.EOS,),
        torch_dtype="float32",
    )


def build_demo_model(dtype: torch.dtype, device: torch.device | str) -> CausalLM:
    import torch

    from workers.model.causal_lm import CausalLM

    config = demo_config()
    model = CausalLM.empty(config, torch.float32, "cpu")
    gen = torch.Generator().manual_seed(DEMO_SEED)
    with torch.no_grad():
        for name, param in model.named_parameters():  # deterministic order (module registration order)
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name == "embed_tokens.weight":
                param.copy_(torch.randn(param.shape, generator=gen))
            else:
                # std 1/sqrt(fan_in) keeps activations O(1) through the residual stream, so the output
                # depends strongly on the context (0.02-style init gives near-uniform, repetitive output).
                fan_in = param.shape[-1]
                param.copy_(torch.randn(param.shape, generator=gen) * (1.5 / fan_in**0.5))
        model.lm_head.weight[ByteTokenizer.BOS].zero_()
        model.lm_head.weight[ByteTokenizer.PAD].zero_()
    return model.to(dtype=dtype, device=torch.device(device)).eval()
