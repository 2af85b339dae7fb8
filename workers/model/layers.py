"""The decoder block of the Llama family (Llama 2/3, Mistral, Qwen2 differ only in biases and masks).

Numerics follow transformers: RMSNorm computes in fp32 and casts back before the weight multiply; SiLU-gated
MLP; RoPE applied in the activation dtype. For speed q/k/v are one fused projection and gate/up another (the
loader concatenates the checkpoint's separate weights), and on CPU every projection runs through oneDNN on a
prepacked copy of its weight (``Linear``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import workers.model.fused_ops as fused_ops
from workers.model.attention import paged_attention, write_kv
from workers.model.config import ModelConfig
from workers.model.forward_batch import AttentionPlan
from workers.model.kv_cache import LayerKV
from workers.model.rope import apply_rope


def _can_pack(weight: torch.Tensor) -> bool:
    if weight.device.type != "cpu" or weight.dim() != 2 or not torch.backends.mkldnn.is_available():
        return False
    if weight.dtype == torch.float32:
        return True
    return weight.dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same checkpoint layout) whose CPU forward is oneDNN on a prepacked weight.

    Why: torch's CPU ``F.linear`` is MKL sgemm for float32, which on this project's AMD EPYC runs 2-6x below
    oneDNN's AVX-512 kernels (measured 31-98 vs 111-240 GFLOP/s, one thread, the model's shapes), and for
    bfloat16 it reorders the weight into oneDNN's blocked layout on every call: packing once is 1.05x (2048
    rows) to 1.5x (16 rows, a decode step) faster. The packed copy is made on first use and again whenever the
    weight changes (its version counter), so loading and in-place edits need no extra step; it costs one more
    copy of the weights in memory. Other devices and dtypes (CUDA, float16 without AVX512-FP16) use F.linear.

    ``forward(x, residual)`` adds ``residual`` in the GEMM's epilogue (oneDNN's binary post-op) and
    ``silu_mul(x)`` computes ``silu(x Wg) * (x Wu)`` of a fused gate/up weight as two GEMMs with fused
    epilogues: each saves whole passes over the activations (measured below in layers' users).
    """

    def _packs(self, x: torch.Tensor) -> dict | None:
        """The packed weights for ``x`` (None: use F.linear), repacked when the weight changed."""
        w = self.weight
        key = (w.data_ptr(), w._version, w.dtype)
        if getattr(self, "_packed_key", None) != key:
            self._packed_key = key
            self._packed = {} if _can_pack(w) else None
        if self._packed is None or x.device.type != "cpu" or x.dtype != w.dtype:
            return None
        return self._packed

    @staticmethod
    def _pack(w: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(False), torch.no_grad():  # an ordinary tensor, usable in any mode
            return torch.ops.mkldnn._reorder_linear_weight(w.detach().contiguous(), 16)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        packs = self._packs(x)
        if packs is None:
            y = F.linear(x, self.weight, self.bias)
            return y if residual is None else residual + y
        if self._small(x):
            panels = packs.get("small")
            if panels is None:
                panels = packs["small"] = fused_ops.pack_small(self.weight)
            return fused_ops.gemm_small(x, panels, self.out_features, self.bias, residual)
        w = packs.get("full")
        if w is None:
            w = packs["full"] = self._pack(self.weight)
        if residual is None:
            return torch.ops.mkldnn._linear_pointwise(x, w, self.bias, "none", [], "")
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual, w, self.bias, "add")

    def _small(self, x: torch.Tensor) -> bool:
        """A decode-sized float32 GEMM that fused_ops' small-batch kernel runs faster than oneDNN (not the LM
        head: its 32000-row weight streams from memory at the same rate either way)."""
        return (x.dtype == torch.float32 and x.dim() == 2 and x.shape[0] <= fused_ops.SMALL_GEMM_ROWS
                and self.out_features <= SMALL_GEMM_MAX_OUT and fused_ops.usable(x))

    def silu_mul(self, x: torch.Tensor, split: int) -> torch.Tensor:
        """``silu(gate) * up`` where this layer's output is ``[gate | up]`` (``split`` columns each)."""
        packs = self._packs(x)
        if packs is None or x.dtype not in FUSED_EPILOGUES:
            y = self.forward(x)
            if fused_ops.usable(y):  # one pass, rounded as the two ops below
                return fused_ops.silu_mul(y, split)
            gate, up = y.split(split, dim=-1)
            return F.silu(gate) * up
        if self._small(x):
            return fused_ops.silu_mul(self.forward(x), split)
        halves = packs.get("halves")
        if halves is None:
            halves = packs["halves"] = (self._pack(self.weight[:split]), self._pack(self.weight[split:]))
        b = self.bias
        b_gate, b_up = (None, None) if b is None else (b[:split].contiguous(), b[split:].contiguous())
        gate = torch.ops.mkldnn._linear_pointwise(x, halves[0], b_gate, "swish", [], "")
        return torch.ops.mkldnn._linear_pointwise.binary(x, gate, halves[1], b_up, "mul")


# The small-batch float32 GEMM (fused_ops.gemm_small) serves layers with at most this many output features.
SMALL_GEMM_MAX_OUT = 8192

# Dtypes whose MLP and residual adds use the fused epilogues. float32: the whole shared-prefix workload
# (bench_vs_vllm A, one thread) ran 5% faster (12.1-12.2 -> 11.3-11.6 s CPU). bfloat16: no measurable
# difference (7.6-7.7 s either way), so it keeps the unfused ops, which round like transformers and vLLM
# (each GEMM's output rounded to bfloat16 before the activation and the add).
FUSED_EPILOGUES = (torch.float32,)


class Embedding(nn.Module):
    """Token embedding without nn.Embedding's random init (weights are always loaded; init on meta is slow)."""

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused_ops.usable(x) and self.weight.device.type == "cpu":
            return fused_ops.rmsnorm(x, self.weight, self.eps)
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(``forward(residual + x)``, ``residual + x``): the residual add and the norm in one pass on CPU."""
        if fused_ops.usable(x) and fused_ops.usable(residual) and self.weight.device.type == "cpu":
            return fused_ops.add_rmsnorm(x, residual, self.weight, self.eps)
        total = residual + x
        return self.forward(total), total


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = config.num_heads * config.head_dim
        self.kv_size = config.num_kv_heads * config.head_dim
        self.scale = config.head_dim**-0.5
        self.qkv_proj = Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.attention_bias)
        self.o_proj = Linear(self.q_size, config.hidden_size, bias=config.o_proj_bias)

    def forward(
        self,
        x: torch.Tensor,  # [T, hidden]
        cos: torch.Tensor,
        sin: torch.Tensor,
        slot_mapping: torch.Tensor,
        kv: LayerKV,  # views of this layer's K/V slots (and their fp8 scales)
        plan: AttentionPlan,
        residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The attention block's output (plus ``residual``, added in o_proj's epilogue when given)."""
        num_tokens = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = apply_rope(q.view(num_tokens, self.num_heads, self.head_dim), cos, sin)
        k = apply_rope(k.view(num_tokens, self.num_kv_heads, self.head_dim), cos, sin)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        write_kv(kv, slot_mapping, k, v)
        out = paged_attention(q, k, v, kv, plan, self.scale)
        return self.o_proj(out.reshape(num_tokens, self.q_size), residual)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj = Linear(config.hidden_size, 2 * config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return self.down_proj(self.gate_up_proj.silu_mul(x, self.intermediate_size), residual)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, slot_mapping, kv, plan) -> torch.Tensor:
        if x.dtype in FUSED_EPILOGUES and x.device.type == "cpu":  # the adds ride in the GEMMs' epilogues
            x = self.self_attn(self.input_layernorm(x), cos, sin, slot_mapping, kv, plan, residual=x)
            return self.mlp(self.post_attention_layernorm(x), residual=x)
        h, x = self.post_attention_layernorm.add_forward(
            self.self_attn(self.input_layernorm(x), cos, sin, slot_mapping, kv, plan), x)
        return x + self.mlp(h)
