"""The decoder's element-wise steps in one pass each (``csrc/ops.c``, in the fused attention kernel's library).

``rmsnorm``, ``add_rmsnorm``, ``rope`` and ``silu_mul`` compute what layers.py's and rope.py's torch code
computes, with the same roundings (bfloat16 results rounded once per torch op; see ops.c), on CPU tensors
of float32 or bfloat16 where the library is built (x86-64 with AVX-512, fused_attention.py). ``usable(x)``
says whether a tensor may take them; callers keep the torch code for everything else (CUDA, other dtypes,
other CPUs, ``PREFIXCACHE_FUSED_OPS=0``). Why: a bfloat16 forward of bench_vs_vllm's workload A spent
0.9 s of 4.3 s in some 30 small torch ops per layer (casts, multiplies, adds, a concatenation), each a
pass over the activations; the C versions read and write each tensor once.
"""

from __future__ import annotations

import ctypes
import os

import torch

import workers.model.fused_attention as fused_attention

_fns: dict = {}
_DTYPES = (torch.float32, torch.bfloat16)


def _lib():
    if "lib" not in _fns:
        k = fused_attention.kernel()
        lib = None
        if k is not None and os.environ.get("PREFIXCACHE_FUSED_OPS", "1") != "0":
            lib = k.lib
            i64, vp, c_int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
            lib.pc_rmsnorm.argtypes = [c_int, vp, i64, vp, i64, vp, vp, vp, c_int, c_int, ctypes.c_float, c_int]
            lib.pc_rope.argtypes = [c_int, vp, i64, vp, vp, vp, c_int, c_int, c_int, c_int]
            lib.pc_silu_mul.argtypes = [c_int, vp, i64, vp, c_int, c_int, c_int]
            lib.pc_pack_f32.argtypes = [vp, c_int, c_int, vp]
            lib.pc_gemm_small_f32.argtypes = [vp, i64, vp, vp, vp, i64, vp, c_int, c_int, c_int, c_int]
            for f in (lib.pc_rmsnorm, lib.pc_rope, lib.pc_silu_mul, lib.pc_pack_f32, lib.pc_gemm_small_f32):
                f.restype = None
            _fns["bf16"] = k.bf16
        _fns["lib"] = lib
    return _fns["lib"]


def usable(x: torch.Tensor) -> bool:
    """Whether ``x`` (a CPU float32 or bfloat16 tensor, last dimension contiguous) may take these kernels."""
    if x.device.type != "cpu" or x.dtype not in _DTYPES or x.stride(-1) != 1:
        return False
    return _lib() is not None and (x.dtype == torch.float32 or _fns["bf16"])


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as [rows, N] with unit stride along N (a copy only when the rows are not evenly spaced)."""
    x2 = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _rmsnorm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
             eps: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    x2 = _rows(x)
    r2 = None if residual is None else _rows(residual)
    w = weight.to(x.dtype).contiguous()
    out = torch.empty(x2.shape, dtype=x.dtype)
    total = None if r2 is None else torch.empty(x2.shape, dtype=x.dtype)
    _lib().pc_rmsnorm(int(x.dtype == torch.bfloat16), x2.data_ptr(), x2.stride(0),
                      None if r2 is None else r2.data_ptr(), 0 if r2 is None else r2.stride(0),
                      None if total is None else total.data_ptr(), w.data_ptr(), out.data_ptr(), x2.shape[0],
                      x2.shape[1], float(eps), torch.get_num_threads())
    return out.view(x.shape), None if total is None else total.view(x.shape)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * (x.float() * rsqrt(mean(x.float()**2) + eps)).to(x.dtype)`` over the last dimension."""
    return _rmsnorm(x, None, weight, eps)[0]


def add_rmsnorm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``s = x + residual`` (in the dtype) and ``rmsnorm(s)``: returns (normed, s)."""
    return _rmsnorm(x, residual, weight, eps)


def rope_usable(x: torch.Tensor, cos: torch.Tensor) -> bool:
    """``x [T, H, D]`` with heads D apart (a slice of the fused projection), D a multiple of 32, and
    ``cos [T, 1, D]`` of x's dtype."""
    return (usable(x) and x.dim() == 3 and x.shape[2] % 32 == 0 and x.stride(1) == x.shape[2]
            and cos.dtype == x.dtype and cos.shape[0] == x.shape[0] and cos.shape[-1] == x.shape[2])


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` for ``x [T, H, D]``, ``cos/sin [T, 1, D]``: a new [T, H, D]."""
    num_tokens, num_heads, head_dim = x.shape
    c, s = cos.reshape(num_tokens, head_dim).contiguous(), sin.reshape(num_tokens, head_dim).contiguous()
    out = torch.empty((num_tokens, num_heads, head_dim), dtype=x.dtype)
    _lib().pc_rope(int(x.dtype == torch.bfloat16), x.data_ptr(), x.stride(0), c.data_ptr(), s.data_ptr(),
                   out.data_ptr(), num_tokens, num_heads, head_dim, torch.get_num_threads())
    return out


def silu_mul(x: torch.Tensor, split: int) -> torch.Tensor:
    """``silu(x[..., :split]) * x[..., split:]`` (each rounded to the dtype, as torch's two ops)."""
    x2 = _rows(x)
    out = torch.empty((x2.shape[0], split), dtype=x.dtype)
    _lib().pc_silu_mul(int(x.dtype == torch.bfloat16), x2.data_ptr(), x2.stride(0), out.data_ptr(), x2.shape[0],
                       split, torch.get_num_threads())
    return out.view(*x.shape[:-1], split)


# Decode-sized float32 GEMMs (at most this many rows) run on ops.c's small-batch kernel. Measured against
# oneDNN on the packed weight, 2 threads, 16 rows, the 55M model's shapes: 1.1-2.0x with the weight in L2,
# 1.0-1.2x with it streamed from L3 (a decode step: the whole model does not fit in L2); the 32000-row LM
# head is no faster (layers.SMALL_GEMM_MAX_OUT), and from 32-64 rows oneDNN's blocking catches up.
SMALL_GEMM_ROWS = 16


def pack_small(weight: torch.Tensor) -> torch.Tensor:
    """``weight [N, K]`` (float32) as the small GEMM's column panels ``[ceil(N/32), K, 32]``."""
    n, k = weight.shape
    w = weight.detach().contiguous()
    out = torch.empty(((n + 31) // 32, k, 32), dtype=torch.float32)
    _lib().pc_pack_f32(w.data_ptr(), n, k, out.data_ptr())
    return out


def gemm_small(x: torch.Tensor, panels: torch.Tensor, n: int, bias: torch.Tensor | None = None,
               residual: torch.Tensor | None = None) -> torch.Tensor:
    """``x [M, K] @ W.T (+ bias) (+ residual)`` for ``panels = pack_small(W)``, float32, M small."""
    x2 = _rows(x)
    m, k = x2.shape
    out = torch.empty((m, n), dtype=torch.float32)
    r = None if residual is None else _rows(residual)
    b = None if bias is None else bias.contiguous()
    _lib().pc_gemm_small_f32(x2.data_ptr(), x2.stride(0), panels.data_ptr(), None if b is None else b.data_ptr(),
                             None if r is None else r.data_ptr(), 0 if r is None else r.stride(0), out.data_ptr(),
                             m, n, k, torch.get_num_threads())
    return out


__all__ = ["gemm_small", "pack_small", "add_rmsnorm", "rmsnorm", "rope", "rope_usable", "silu_mul", "usable"]
