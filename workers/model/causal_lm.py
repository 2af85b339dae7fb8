"""The causal LM: embeddings -> decoder layers over the paged KV cache -> logits of each sequence's last token.

One implementation serves Llama, Mistral and Qwen2; the config's flags (biases, tied embeddings, sliding
window, rope scaling) are the only differences. ``weight_layout`` says which checkpoint tensors fill which
parameter (fused q/k/v and gate/up are concatenations of the checkpoint's separate tensors).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from workers.model.config import ModelConfig
from workers.model.forward_batch import ForwardBatch, build_attention_plan
from workers.model.kv_cache import KVCache
from workers.model.layers import DecoderLayer, Embedding, Linear, RMSNorm
from workers.model.rope import rope_cos_sin, rope_inv_freq


class WeightSource(NamedTuple):
    param: str  # our parameter name
    tensors: tuple[tuple[str, tuple[int, ...]], ...]  # checkpoint names + shapes, concatenated along dim 0


class CausalLM(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self._inv_freq: torch.Tensor | None = None  # fp32 rope frequencies, made on first forward on our device
        self.requires_grad_(False)

    @classmethod
    def empty(cls, config: ModelConfig, dtype: torch.dtype, device: torch.device | str) -> "CausalLM":
        """Allocate without initializing (weights are loaded right after): no time spent on random init."""
        with torch.device("meta"):
            model = cls(config)
        device = torch.device(device)
        # Materialize each parameter by hand (Module.to_empty has a slow first call); ties are set again below.
        for module in model.modules():
            for name, param in list(module.named_parameters(recurse=False)):
                empty = torch.empty(param.shape, dtype=dtype, device=device)
                setattr(module, name, nn.Parameter(empty, requires_grad=False))
        if config.tie_word_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
        return model.eval()

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def forward(self, batch: ForwardBatch, kv_cache: KVCache) -> torch.Tensor:
        """Write the batch's K/V into ``kv_cache``; return fp32 logits [num_seqs, vocab] of each last token."""
        with torch.inference_mode():
            logits = self._forward(batch, kv_cache)
        # A clone made outside inference mode is an ordinary tensor: callers may modify it in place
        # (temperature, penalties), which an inference tensor forbids.
        return logits.clone()

    def _forward(self, batch: ForwardBatch, kv_cache: KVCache) -> torch.Tensor:
        device = self.device
        if batch.slot_mapping.device.type == "cpu":  # cheap bookkeeping checks (no device sync needed)
            batch.validate(kv_cache.block_size, kv_cache.num_blocks, self.config.max_position_embeddings)
        if self._inv_freq is None or self._inv_freq.device != device:
            self._inv_freq = rope_inv_freq(self.config).to(device)
        input_ids = batch.input_ids.to(device=device, dtype=torch.long, non_blocking=True)
        positions = batch.positions.to(device=device, dtype=torch.long, non_blocking=True)
        slot_mapping = batch.slot_mapping.to(device=device, dtype=torch.long, non_blocking=True)
        plan = build_attention_plan(batch, kv_cache.block_size, device, self.config.sliding_window, self.dtype,
                                    quantized=kv_cache.quantized)
        cos, sin = rope_cos_sin(self._inv_freq, positions, self.dtype)

        x = self.embed_tokens(input_ids)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, slot_mapping, kv_cache.layer(i), plan)

        if plan.decodes_are_whole_batch:
            last = x  # one token per sequence, already in sequence order
        else:
            ends = torch.tensor(batch.query_lens, dtype=torch.long).cumsum(0) - 1
            last = x.index_select(0, ends.to(device))
        return self.lm_head(self.norm(last)).float()


def weight_layout(config: ModelConfig) -> list[WeightSource]:
    """Which checkpoint tensors (Hugging Face names and shapes) make each of our parameters."""
    c = config
    hidden, d = c.hidden_size, c.head_dim
    q_rows, kv_rows = c.num_heads * d, c.num_kv_heads * d

    def one(param: str, name: str, shape: tuple[int, ...]) -> WeightSource:
        return WeightSource(param, ((name, shape),))

    out = [one("embed_tokens.weight", "model.embed_tokens.weight", (c.vocab_size, hidden))]
    for i in range(c.num_layers):
        src, dst = f"model.layers.{i}", f"layers.{i}"
        out.append(one(f"{dst}.input_layernorm.weight", f"{src}.input_layernorm.weight", (hidden,)))
        out.append(one(f"{dst}.post_attention_layernorm.weight", f"{src}.post_attention_layernorm.weight", (hidden,)))
        attn = f"{src}.self_attn"
        qkv = ((f"{attn}.q_proj", q_rows), (f"{attn}.k_proj", kv_rows), (f"{attn}.v_proj", kv_rows))
        out.append(WeightSource(f"{dst}.self_attn.qkv_proj.weight", tuple((f"{n}.weight", (r, hidden)) for n, r in qkv)))
        if c.attention_bias:
            out.append(WeightSource(f"{dst}.self_attn.qkv_proj.bias", tuple((f"{n}.bias", (r,)) for n, r in qkv)))
        out.append(one(f"{dst}.self_attn.o_proj.weight", f"{attn}.o_proj.weight", (hidden, q_rows)))
        if c.o_proj_bias:
            out.append(one(f"{dst}.self_attn.o_proj.bias", f"{attn}.o_proj.bias", (hidden,)))
        mlp, inter = f"{src}.mlp", c.intermediate_size
        gate_up = ((f"{mlp}.gate_proj", inter), (f"{mlp}.up_proj", inter))
        out.append(WeightSource(f"{dst}.mlp.gate_up_proj.weight", tuple((f"{n}.weight", (r, hidden)) for n, r in gate_up)))
        out.append(one(f"{dst}.mlp.down_proj.weight", f"{mlp}.down_proj.weight", (hidden, inter)))
        if c.mlp_bias:
            out.append(WeightSource(f"{dst}.mlp.gate_up_proj.bias", tuple((f"{n}.bias", (r,)) for n, r in gate_up)))
            out.append(one(f"{dst}.mlp.down_proj.bias", f"{mlp}.down_proj.bias", (hidden,)))
    out.append(one("norm.weight", "model.norm.weight", (hidden,)))
    if not c.tie_word_embeddings:
        out.append(one("lm_head.weight", "lm_head.weight", (c.vocab_size, hidden)))
    return out
