"""KVCache: layout, sizing, and exact block export/import."""

from __future__ import annotations

import pytest
import torch

from model_fixtures import single_thread
from workers.model import KVCache, load_model
from workers.model.demo import demo_config


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with single_thread():
        yield


def _filled(num_blocks=6, block_size=4, dtype=torch.float32):
    cache = KVCache(demo_config(), num_blocks, block_size, dtype, "cpu")
    gen = torch.Generator().manual_seed(0)
    cache.tensor.copy_(torch.randn(cache.tensor.shape, generator=gen).to(dtype))
    return cache


def test_layout_and_sizes():
    cfg = demo_config()
    cache = KVCache(cfg, 10, 16, torch.float32, "cpu")
    assert cache.tensor.shape == (cfg.num_layers, 2, 10, 16, cfg.num_kv_heads, cfg.head_dim)
    assert cache.block_shape == (cfg.num_layers, 2, 16, cfg.num_kv_heads, cfg.head_dim)
    assert cache.block_nbytes() == 4 * 2 * 16 * 2 * 64 * 4
    assert KVCache.blocks_for_memory(cfg, 16, torch.float32, 10 * cache.block_nbytes() + 5) == 10
    assert KVCache.blocks_for_memory(cfg, 16, torch.bfloat16, cache.block_nbytes()) == 2
    assert KVCache.blocks_for_memory(cfg, 16, torch.float32, 100) == 0
    k, v = cache.layer_slots(2)
    assert k.shape == (160, cfg.num_kv_heads, cfg.head_dim)
    k[16 * 3 + 5] = 7.0  # slot = block * block_size + offset
    assert (cache.tensor[2, 0, 3, 5] == 7.0).all() and (v == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_read_write_round_trip(dtype):
    src, dst = _filled(dtype=dtype), KVCache(demo_config(), 6, 4, dtype, "cpu")
    block = src.read_block(3)
    assert block.shape == src.block_shape and block.dtype == dtype and block.device.type == "cpu"
    assert torch.equal(block, src.tensor[:, :, 3])
    block_copy = block.clone()
    src.tensor.zero_()  # read_block returned a copy
    assert torch.equal(block, block_copy)
    dst.write_block(5, block)
    assert torch.equal(dst.read_block(5), block_copy)
    assert (dst.tensor[:, :, :5] == 0).all()


def test_read_write_many():
    src, dst = _filled(), KVCache(demo_config(), 6, 4, torch.float32, "cpu")
    data = src.read_blocks([4, 0, 2])
    assert data.shape == (3, *src.block_shape)
    dst.write_blocks([1, 5, 3], data)
    for s, d in ((4, 1), (0, 5), (2, 3)):
        assert torch.equal(dst.read_block(d), src.read_block(s))


def test_write_block_rejects_bad_input():
    cache = _filled()
    with pytest.raises(ValueError, match="shape"):
        cache.write_block(0, torch.zeros(1, 2, 3))
    with pytest.raises(ValueError, match="dtype"):
        cache.write_block(0, cache.read_block(1).half())
    with pytest.raises(IndexError, match="out of range"):
        cache.read_block(6)
    with pytest.raises(ValueError):
        KVCache(demo_config(), 0, 16, torch.float32, "cpu")


def test_cache_created_in_inference_mode_is_writable():
    with torch.inference_mode():
        cache = KVCache(demo_config(), 4, 4, torch.float32, "cpu")
    cache.write_block(1, _filled().read_block(2))
    assert torch.equal(cache.read_block(1), _filled().read_block(2))


def test_demo_forward_writes_cache():
    from workers.model import ForwardBatch

    loaded = load_model("demo")
    cache = KVCache(loaded.config, 4, 4, loaded.dtype, loaded.device)
    ids = loaded.tokenizer.encode("abcdef")  # 7 tokens -> blocks 2 (4 slots) and 0 (3 slots)
    table = torch.tensor([[2, 0, 3, 1]])
    slots = [8, 9, 10, 11, 0, 1, 2]
    loaded.model(ForwardBatch(torch.tensor(ids), torch.arange(7), torch.tensor(slots), [7], [7], table), cache)
    assert (cache.tensor[:, :, 2] != 0).any(dim=(-1, -2)).all()
    assert (cache.tensor[:, :, 0, :3] != 0).any(dim=(-1, -2)).all() and (cache.tensor[:, :, 0, 3] == 0).all()
    assert (cache.tensor[:, :, 1] == 0).all() and (cache.tensor[:, :, 3] == 0).all()


def test_forward_rejects_inconsistent_batches():
    from workers.model import ForwardBatch

    loaded = load_model("demo")
    cache = KVCache(loaded.config, 4, 4, loaded.dtype, loaded.device)
    table = torch.arange(4).view(1, -1)

    def batch(n=3, query_lens=None, context_lens=None, slots=None, table=table):
        return ForwardBatch(torch.zeros(n, dtype=torch.long), torch.arange(n), slots if slots is not None else torch.arange(n),
                            query_lens or [n], context_lens or [n], table)

    with pytest.raises(ValueError, match="sum\\(query_lens\\)"):
        loaded.model(batch(query_lens=[2]), cache)
    with pytest.raises(ValueError, match="query_len <= context_len"):
        loaded.model(batch(context_lens=[2]), cache)
    with pytest.raises(ValueError, match="does not fit in 1 blocks"):
        loaded.model(batch(n=5, table=table[:, :1]), cache)
    with pytest.raises(ValueError, match="past the end of the KV cache"):
        loaded.model(batch(slots=torch.tensor([0, 1, 16])), cache)
    big = KVCache(loaded.config, 260, 16, loaded.dtype, loaded.device)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        loaded.model(ForwardBatch(torch.zeros(1, dtype=torch.long), torch.tensor([4096]), torch.tensor([4096]), [1], [4097],
                                  torch.arange(260).view(1, -1)), big)


# ---- fp8 storage ----------------------------------------------------------------------------------------------
def _filled_fp8(num_blocks=6, block_size=4):
    from workers.model.kv_cache import quantize_fp8

    cache = KVCache(demo_config(), num_blocks, block_size, torch.float32, "cpu", "fp8")
    values, scales = quantize_fp8(torch.randn(cache.tensor.shape, generator=torch.Generator().manual_seed(0)))
    cache.tensor.copy_(values)
    cache.scales.copy_(scales)
    return cache


def test_fp8_layout_and_byte_counted_sizes():
    cfg = demo_config()  # 4 layers, 2 kv heads, head_dim 64
    cache = KVCache(cfg, 10, 16, torch.float32, "cpu", "fp8")
    assert (cache.dtype, cache.compute_dtype, cache.dtype_name, cache.quantized) == (
        torch.float8_e4m3fn, torch.float32, "float8_e4m3fn", True)
    assert cache.tensor.shape == (4, 2, 10, 16, 2, 64) and cache.scales.shape == (4, 2, 10, 16, 2)
    assert cache.scales.dtype == torch.float32 and cache.scales_shape == (4, 2, 16, 2)
    values, scales = 4 * 2 * 16 * 2 * 64, 4 * 2 * 16 * 2 * 4  # one byte per value, one float32 per (slot, head)
    assert (values, scales) == (16384, 1024)  # the scales cost 4 / head_dim = 6.25% of the values
    assert cache.block_nbytes() == values + scales == 17408
    assert KVCache.bytes_per_block(cfg, 16, torch.bfloat16, "fp8") == 17408  # storage does not follow compute
    gib = 1 << 30
    counts = [KVCache.blocks_for_memory(cfg, 16, dt, gib, kv) for dt, kv in
              ((torch.float32, "auto"), (torch.bfloat16, "auto"), (torch.float32, "fp8"), (torch.bfloat16, "fp8"))]
    assert counts == [16384, 32768, 61680, 61680]  # fp8: 3.76x float32, 1.88x bfloat16 (4x, 2x less the scales)
    assert KVCache.blocks_for_memory(cfg, 16, torch.float32, 17407, "fp8") == 0
    with pytest.raises(ValueError, match="unsupported kv_cache_dtype 'fp4'; use one of auto, fp8"):
        KVCache(cfg, 10, 16, torch.float32, "cpu", "fp4")
    auto = KVCache(cfg, 10, 16, torch.float32, "cpu")
    assert auto.scales is None and auto.layer(0).k_scale is None and not auto.quantized
    layer = cache.layer(2)
    assert layer.k.shape == (160, 2, 64) and layer.k_scale.shape == (160, 2)
    layer.k_scale[16 * 3 + 5] = 7.0  # slot = block * block_size + offset, as for the values
    assert (cache.scales[2, 0, 3, 5] == 7.0).all() and (cache.scales[2, 1] == 0).all()


def test_fp8_quantization_error_is_bounded_per_value():
    from workers.model.kv_cache import FP8_MAX, dequantize, quantize_fp8

    x = torch.randn(64, 2, 64, generator=torch.Generator().manual_seed(1)) * torch.logspace(-6, 3, 64)[:, None, None]
    x[3] = 0.0  # an all-zero row: scale 1, values 0
    q, s = quantize_fp8(x)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (64, 2) and float(s[3].min()) == 1.0
    assert torch.equal(s[5], x[5].abs().amax(-1) / FP8_MAX)  # the largest value maps to 448
    assert not q.float().isnan().any()  # nothing overflowed into e4m3fn's NaN
    err = (dequantize(q, s, torch.float32) - x).abs()
    # e4m3 keeps 3 mantissa bits: half an ulp is 2^-4 of a normal value; below 2^-6 (subnormals) 2^-10.
    bound = torch.maximum(x.abs() * 2**-4, s[..., None] * 2**-10)
    assert (err <= bound).all() and float(err[3].max()) == 0.0


def test_fp8_cpu_dequantize_is_bit_identical_to_the_native_cast():
    """The CPU bit path (integer ops, scale x 2^8) against torch's own fp8 -> float32 cast, on every finite
    code and a range of scales; bfloat16 is the float32 result rounded once."""
    from workers.model.kv_cache import _fp8_bits_as_half, dequantize

    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)
    native = codes.float()
    finite = ~native.isnan()
    assert int(finite.sum()) == 254  # 0x7f and 0xff are e4m3fn's NaNs, never written (values are clamped)
    assert torch.equal(_fp8_bits_as_half(codes).float()[finite] * 256, native[finite])
    values = codes[finite].reshape(2, 127, 1).expand(2, 127, 8).contiguous()
    scales = torch.logspace(-8, 4, 254).reshape(2, 127)
    got = dequantize(values, scales, torch.float32)
    assert torch.equal(got, values.float() * scales[..., None])
    assert torch.equal(dequantize(values, scales, torch.bfloat16), (values.float() * scales[..., None]).bfloat16())


def test_fp8_blocks_round_trip_with_their_scales():
    src, dst = _filled_fp8(), KVCache(demo_config(), 6, 4, torch.float32, "cpu", "fp8")
    data, scales = src.read_blocks([4, 0]), src.read_scales([4, 0])
    assert data.dtype == torch.float8_e4m3fn and scales.shape == (2, *src.scales_shape)
    dst.write_blocks([1, 5], data, scales)
    dst.write_block(3, src.read_block(2), src.read_scales([2])[0])
    for s, d in ((4, 1), (0, 5), (2, 3)):
        assert torch.equal(dst.read_block(d).view(torch.uint8), src.read_block(s).view(torch.uint8))
        assert torch.equal(dst.read_scales([d]), src.read_scales([s]))
    assert (dst.scales[:, :, [0, 2, 4]] == 0).all()
    assert KVCache(demo_config(), 6, 4, torch.float32, "cpu").read_scales([0]) is None
    with pytest.raises(ValueError, match="needs the block's scales"):
        dst.write_block(0, data[0])
    with pytest.raises(ValueError, match="block scales are"):
        dst.write_block(0, data[0], scales[0].half())
    with pytest.raises(ValueError, match="block scales given, but this KV cache stores torch.float32"):
        _filled().write_block(0, _filled().read_block(1), scales[0])


def test_demo_forward_writes_quantized_slots_and_scales():
    from workers.model import ForwardBatch
    from workers.model.kv_cache import dequantize

    loaded = load_model("demo")
    fp8 = KVCache(loaded.config, 4, 4, loaded.dtype, loaded.device, "fp8")
    ref = KVCache(loaded.config, 4, 4, loaded.dtype, loaded.device)
    ids = loaded.tokenizer.encode("abcdef")  # 7 tokens -> blocks 2 (4 slots) and 0 (3 slots)
    batch = ForwardBatch(torch.tensor(ids), torch.arange(7), torch.tensor([8, 9, 10, 11, 0, 1, 2]), [7], [7],
                         torch.tensor([[2, 0, 3, 1]]))
    loaded.model(batch, fp8)
    loaded.model(batch, ref)
    written = (fp8.scales != 0).all(dim=-1)  # [layers, 2, blocks, offsets]
    assert written[:, :, 2].all() and written[:, :, 0, :3].all()
    assert not written[:, :, 0, 3].any() and not written[:, :, 1].any() and not written[:, :, 3].any()
    # Layer 0's K/V do not depend on attention: they are the float32 cache's, quantized.
    deq = dequantize(fp8.tensor[0], fp8.scales[0], torch.float32)
    bound = torch.maximum(ref.tensor[0].abs() * 2**-4, fp8.scales[0][..., None] * 2**-10)
    assert ((deq - ref.tensor[0]).abs() <= bound).all()
