"""The decoder's element-wise steps in C (workers/model/csrc/ops.c via fused_ops.py) against the torch code
they replace (layers.py's RMSNorm and SiLU-gated MLP, rope.py's rotary embedding).

What they must guarantee: rotary embedding bit-identical to torch's ops, both dtypes; RMSNorm (with and
without the residual add before it) and silu(gate) * up rounded as torch rounds them: bfloat16 results
equal but for a rare last-bit difference, float32 within a few units in the last place (the sum of squares
is added in another order); the residual sum itself exact; rows that are strided views and widths that are
not a multiple of the vector width; and no use of the kernels where they do not apply.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from workers.model import fused_attention as fa
from workers.model import fused_ops as fo
from workers.model.rope import rotate_half

needs_ops = pytest.mark.skipif(fo._lib() is None, reason=f"fused ops unavailable: {fa.why_not()}")
DTYPES = (torch.float32, torch.bfloat16)


def ref_rmsnorm(x, w, eps):
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(x.dtype)


def nearly_equal(got, want):
    """bfloat16: at most 1 in 1000 elements one bfloat16 step off; float32: within 4 units in the last place."""
    assert got.dtype == want.dtype and got.shape == want.shape
    if got.dtype == torch.bfloat16:
        diff = got.float() - want.float()
        assert (diff != 0).float().mean() <= 1e-3
        assert (diff.abs() <= want.float().abs() * 2**-7 + 1e-30).all()
    else:
        torch.testing.assert_close(got, want, rtol=5e-7, atol=1e-7)


def skip_without(dtype):
    if not fo.usable(torch.zeros(1, dtype=dtype)):
        pytest.skip(f"no fused ops for {dtype} here")


@needs_ops
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,width", ((1, 512), (7, 512), (300, 520), (65, 40)))
def test_rmsnorm_and_the_residual_add_round_like_torch(dtype, rows, width):
    skip_without(dtype)
    gen = torch.Generator().manual_seed(rows * width)
    wide = torch.randn(rows, width + 24, generator=gen).to(dtype)
    x = wide[:, 8 : 8 + width]  # a strided view: rows width + 24 apart
    residual = torch.randn(rows, width, generator=gen).to(dtype) * 3
    w = (torch.rand(width, generator=gen) + 0.5).to(dtype)
    nearly_equal(fo.rmsnorm(x, w, 1e-5), ref_rmsnorm(x, w, 1e-5))
    normed, total = fo.add_rmsnorm(x, residual, w, 1e-5)
    assert torch.equal(total, residual + x)
    nearly_equal(normed, ref_rmsnorm(residual + x, w, 1e-5))


@needs_ops
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", (32, 64, 128))
def test_rope_is_bit_identical_to_torch(dtype, head_dim):
    skip_without(dtype)
    gen = torch.Generator().manual_seed(head_dim)
    num_tokens, heads, kv_heads = 37, 8, 2
    qkv = torch.randn(num_tokens, (heads + 2 * kv_heads) * head_dim, generator=gen).to(dtype)
    q = qkv[:, : heads * head_dim].view(num_tokens, heads, head_dim)  # a slice of the fused projection
    k = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(num_tokens, kv_heads, head_dim)
    positions = torch.randint(0, 4000, (num_tokens,), generator=gen)
    freqs = positions[:, None].float() * (10000.0 ** (-torch.arange(0, head_dim, 2).float() / head_dim))[None]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(dtype)[:, None, :], emb.sin().to(dtype)[:, None, :]
    for x in (q, k):
        assert fo.rope_usable(x, cos)
        assert torch.equal(fo.rope(x, cos, sin), x * cos + rotate_half(x) * sin)


@needs_ops
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_rounds_like_torch(dtype):
    skip_without(dtype)
    gen = torch.Generator().manual_seed(3)
    for rows, inter in ((1, 1376), (200, 1376), (9, 40)):
        x = torch.randn(rows, 2 * inter, generator=gen).to(dtype) * 4
        x[0, :4] = torch.tensor([-120.0, 95.0, 0.0, -0.0]).to(dtype)  # exp's range ends and both zeros
        gate, up = x.split(inter, dim=-1)
        nearly_equal(fo.silu_mul(x, inter), F.silu(gate) * up)


def test_the_kernels_are_not_used_where_they_do_not_apply(monkeypatch):
    x = torch.zeros(4, 64)
    assert not fo.usable(x.to(torch.float16))
    assert not fo.usable(x.t())  # the last dimension is not contiguous
    assert not fo.rope_usable(torch.zeros(4, 2, 48), torch.zeros(4, 1, 48))  # head size not a multiple of 32
    assert not fo.rope_usable(x.view(4, 1, 64), torch.zeros(4, 1, 64, dtype=torch.bfloat16))  # cos of another dtype
    monkeypatch.setitem(fo._fns, "lib", None)  # no library (another CPU, PREFIXCACHE_FUSED_OPS=0)
    assert not fo.usable(x)
    from workers.model.layers import RMSNorm

    norm = RMSNorm(64, 1e-6)
    y = torch.randn(3, 64)
    assert torch.equal(norm(y), ref_rmsnorm(y, norm.weight, 1e-6))


@needs_ops
def test_small_batch_gemm_matches_torch_linear():
    """Decode-sized float32 GEMMs (ops.c's column-panel kernel): with and without bias and the residual add
    of the epilogue, row counts that are not a multiple of its 8-row blocks, widths not a multiple of its
    32-column panels, strided rows; and the Linear layer takes it only for decode-sized inputs."""
    from workers.model.layers import Linear

    gen = torch.Generator().manual_seed(4)
    for rows, n, k in ((1, 768, 512), (5, 40, 64), (16, 77, 1376), (9, 512, 100)):
        w = torch.randn(n, k, generator=gen)
        bias = torch.randn(n, generator=gen)
        x = torch.randn(rows, k + 3, generator=gen)[:, 1 : 1 + k]
        residual = torch.randn(rows, n, generator=gen)
        panels = fo.pack_small(w)
        want = x @ w.T
        torch.testing.assert_close(fo.gemm_small(x, panels, n), want, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(fo.gemm_small(x, panels, n, bias, residual), want + bias + residual,
                                   rtol=1e-5, atol=1e-4)
    lin = Linear(64, 48)
    with torch.no_grad():
        small, tall = torch.randn(16, 64, generator=gen), torch.randn(17, 64, generator=gen)
        assert lin._small(small) and not lin._small(tall) and not lin._small(small.to(torch.bfloat16))
        for x in (small, tall):
            torch.testing.assert_close(lin(x), x @ lin.weight.T + lin.bias, rtol=1e-5, atol=1e-4)
