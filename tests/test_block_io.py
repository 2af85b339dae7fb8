"""Block payloads: bit-exact round trips in every dtype, and every corruption or mismatch detected."""

from __future__ import annotations

import struct

import pytest
import torch

from cache_service.block_hash import hash_prompt_blocks
from cache_service.block_wire import MAGIC, BlockImportError, read_header
from workers.block_io import decode_block, encode_block

SHAPE = (2, 2, 4, 2, 8)  # layers, K/V, block_size, kv_heads, head_dim
H = hash_prompt_blocks([1, 2, 3, 4], 4, "m")[0]


def block(dtype=torch.float32, seed=0) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed)).to(dtype)


def decode(payload, **kw):
    args = dict(model_id="m", dtype=torch.float32, shape=SHAPE, block_hash=H)
    args.update(kw)
    return decode_block(payload, **args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_is_bit_exact(dtype):
    data = block(dtype)
    data[0, 0, 0, 0, 0] = float("nan")  # odd values survive too
    data[1, 1, 3, 1, 7] = float("-inf")
    payload = encode_block("m", H, data)
    out = decode(payload, dtype=dtype)
    assert out.dtype == dtype and tuple(out.shape) == SHAPE
    assert torch.equal(out.view(torch.uint8), data.view(torch.uint8))  # bytes, so NaN compares too
    h = read_header(payload)
    assert (h.model_id, h.dtype, h.shape, h.block_hash) == ("m", str(dtype).removeprefix("torch."), SHAPE, H)
    assert payload.startswith(MAGIC) and len(payload) == h.data_offset + data.numel() * data.element_size()


def test_non_contiguous_source_blocks_export_their_values():
    big = torch.randn(2, 2, 3, 4, 2, 8)  # a cache: [layers, 2, num_blocks, block_size, kv_heads, head_dim]
    view = big[:, :, 1]  # one block: a strided view, as read from a cache
    assert torch.equal(decode(encode_block("m", H, view)), view)


def test_every_flipped_byte_is_detected():
    payload = encode_block("m", H, block())
    for i in range(len(payload)):
        corrupted = bytearray(payload)
        corrupted[i] ^= 0x01
        with pytest.raises(BlockImportError):
            decode(bytes(corrupted))


def test_mismatches_name_the_problem():
    payload = encode_block("m", H, block())
    with pytest.raises(BlockImportError, match="block is for model 'm', this engine runs 'other'"):
        decode(payload, model_id="other")
    with pytest.raises(BlockImportError, match="block has dtype float32, this engine's KV cache is bfloat16"):
        decode(payload, dtype=torch.bfloat16)
    with pytest.raises(BlockImportError, match=r"block has shape \[2, 2, 4, 2, 8\], this engine expects"):
        decode(payload, shape=(2, 2, 8, 2, 8))
    other = hash_prompt_blocks([5, 6, 7, 8], 4, "m")[0]
    with pytest.raises(BlockImportError, match=f"payload is for hash {H.hex()}, offered as {other.hex()}"):
        decode(payload, block_hash=other)
    with pytest.raises(BlockImportError, match="truncated"):
        decode(payload[:20])
    with pytest.raises(BlockImportError, match="block data is"):
        decode(payload[:-4])
    with pytest.raises(BlockImportError, match="bad magic"):
        decode(b"XXXX" + payload[4:])
    future = payload[:4] + struct.pack("<H", 9) + payload[6:]
    with pytest.raises(BlockImportError, match="unsupported block format version 9"):
        decode(future)
    data = bytearray(payload)
    data[-1] ^= 0x80
    with pytest.raises(BlockImportError, match="failed its checksum"):
        decode(bytes(data))


# ---- fp8 blocks: values + a scales section ---------------------------------------------------------------------
F8 = torch.float8_e4m3fn


def fp8_block(seed=0) -> tuple[torch.Tensor, torch.Tensor]:
    from workers.model.kv_cache import quantize_fp8

    return quantize_fp8(block(seed=seed))


def test_fp8_round_trip_is_bit_exact_with_its_scales():
    from workers.block_io import decode_block_scaled

    values, scales = fp8_block()
    payload = encode_block("m", H, values, scales)
    out, out_scales = decode_block_scaled(payload, model_id="m", dtype=F8, shape=SHAPE, block_hash=H)
    assert out.dtype == F8 and torch.equal(out.view(torch.uint8), values.view(torch.uint8))
    assert out_scales.dtype == torch.float32 and torch.equal(out_scales, scales) and out_scales.shape == SHAPE[:-1]
    h = read_header(payload)
    assert (h.dtype, h.shape) == ("float8_e4m3fn", SHAPE)
    # values (1 byte each) then one float32 per (layer, K/V, slot, kv head): 256 + 4 * 32 bytes
    assert h.data_nbytes == 256 + 128 and len(payload) == h.data_offset + 384
    assert payload[h.data_offset + 256 :] == scales.numpy().tobytes()
    # Unscaled payloads are what they always were: data only, so a version-1 peer reads them unchanged.
    plain = encode_block("m", H, block())
    assert read_header(plain).data_nbytes == 4 * 256 and struct.unpack("<H", plain[4:6]) == (1,)


def test_fp8_every_flipped_byte_is_detected_scales_included():
    from workers.block_io import decode_block_scaled

    payload = encode_block("m", H, *fp8_block())
    for i in range(len(payload)):
        corrupted = bytearray(payload)
        corrupted[i] ^= 0x01
        with pytest.raises(BlockImportError):
            decode_block_scaled(bytes(corrupted), model_id="m", dtype=F8, shape=SHAPE, block_hash=H)


def test_kv_dtype_mismatches_are_refused_by_name():
    from workers.block_io import decode_block_scaled

    values, scales = fp8_block()
    fp8_payload = encode_block("m", H, values, scales)
    with pytest.raises(BlockImportError, match="block has dtype float8_e4m3fn, this engine's KV cache is float32 "
                                               r"\(blocks move only between engines of the same KV cache dtype\)"):
        decode(fp8_payload)
    with pytest.raises(BlockImportError, match="block has dtype float32, this engine's KV cache is float8_e4m3fn"):
        decode_block_scaled(encode_block("m", H, block()), model_id="m", dtype=F8, shape=SHAPE, block_hash=H)
    with pytest.raises(BlockImportError, match="block data is 380 bytes"):  # a scales section cut short
        decode_block_scaled(fp8_payload[:-4], model_id="m", dtype=F8, shape=SHAPE, block_hash=H)
    with pytest.raises(ValueError, match="decode it with decode_block_scaled"):
        decode(fp8_payload, dtype=F8)
    with pytest.raises(ValueError, match="a float8_e4m3fn block needs scales"):
        encode_block("m", H, values)
    with pytest.raises(ValueError, match="a float32 block has no scales"):
        encode_block("m", H, block(), scales)
    with pytest.raises(ValueError, match=r"block scales are torch.float16 \[2, 2, 4, 2\], expected torch.float32"):
        encode_block("m", H, values, scales.half())
