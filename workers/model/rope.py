"""Rotary position embedding, the Hugging Face Llama convention (``rotate_half``, not interleaved pairs).

Frequencies are computed in fp32 exactly as transformers does (same formulas, same op order) so that greedy
output can be token-identical; cos/sin are computed once per forward for the batch's positions and shared by
every layer. Scaling types: plain, "linear" (positions divided by factor) and "llama3" (Llama 3.1's
wavelength-dependent smoothing).
"""

from __future__ import annotations

import math

import torch

from workers.model.config import ModelConfig


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """[head_dim // 2] fp32 inverse frequencies after any scaling."""
    dim = config.head_dim
    inv_freq = 1.0 / (
        config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim)
    )
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    factor = float(scaling["factor"])
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    # llama3: keep high frequencies, divide low frequencies by `factor`, interpolate in between.
    low = float(scaling["low_freq_factor"])
    high = float(scaling["high_freq_factor"])
    old_context_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low
    high_freq_wavelen = old_context_len / high
    wavelen = 2 * math.pi / inv_freq
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * inv_freq_llama / factor + smooth * inv_freq_llama
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, inv_freq_llama)


def rope_cos_sin(
    inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [T, 1, head_dim] (broadcast over heads), computed in fp32 then cast."""
    freqs = positions[:, None].float() * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype)[:, None, :], emb.sin().to(dtype)[:, None, :]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, head_dim]. On CPU one pass in C (fused_ops.rope: bit-identical to the torch ops below)."""
    import workers.model.fused_ops as fused_ops

    if fused_ops.rope_usable(x, cos):
        return fused_ops.rope(x, cos, sin)
    return (x * cos) + (rotate_half(x) * sin)
