"""The paged KV cache: one tensor holding every layer's K and V, cut into fixed-size blocks.

Layout (one allocation, so a block's bytes for export are one strided gather):

    tensor[layer, 0 (K) | 1 (V), block_id, offset_in_block, kv_head, head_dim]
    scales[layer, 0 (K) | 1 (V), block_id, offset_in_block, kv_head]          (fp8 only, float32)

A token's *slot* is ``block_id * block_size + offset``; viewing ``tensor[l, 0]`` as ``[num_slots, kv_heads,
head_dim]`` makes a slot a plain row index, which is how the model writes new K/V (index_copy_) and gathers a
sequence's context (index_select). The cache knows nothing about which block belongs to whom: the block pool
and block tables decide that.

Storage dtype vs compute dtype (``kv_cache_dtype``):

  * ``"auto"``: K/V are stored in the model's dtype (the compute dtype); no scales, nothing converts.
  * ``"fp8"``: K/V are stored as float8 e4m3 (``torch.float8_e4m3fn``, 1 byte) with one float32 scale per
    token slot, per layer, per K/V, per kv head: ``x ~= fp8 * scale`` with ``scale = amax(|x| over
    head_dim) / 448``. Writes quantize each new token with its own scale; reads gather values and scales
    and dequantize to the compute dtype. Per-slot scales (rather than one per block) because a block fills
    over several steps: a slot's scale is final when it is written, nothing is requantized, and a block's
    bytes do not depend on which step wrote which slot (a transferred block equals a local one). The scales
    cost ``4 / head_dim`` of the fp8 values (6.25% at head_dim 64, 3.1% at 128): ``bytes_per_block``
    counts them, so a byte budget holds ~3.8x the float32 blocks (~1.9x bfloat16) at head_dim 64.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from workers.model.config import ModelConfig, canonical_dtype, dtype_name

KV_CACHE_DTYPES = ("auto", "fp8")
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value (e4m3fn has no infinity: an overflow would become NaN)
SCALE_DTYPE = torch.float32


class LayerKV(NamedTuple):
    """One layer's slots: K and V ``[num_slots, kv_heads, head_dim]`` in the storage dtype, and for fp8 their
    scales ``[num_slots, kv_heads]`` (None when the cache stores the compute dtype). Views, no copies."""

    k: torch.Tensor
    v: torch.Tensor
    k_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None


def kv_storage_dtype(compute_dtype: torch.dtype, kv_cache_dtype: str = "auto") -> torch.dtype:
    """The dtype K/V are stored in for ``--kv-cache-dtype`` (ValueError naming the choices otherwise)."""
    if kv_cache_dtype == "auto":
        return compute_dtype
    if kv_cache_dtype == "fp8":
        return FP8_DTYPE
    raise ValueError(f"unsupported kv_cache_dtype {kv_cache_dtype!r}; use one of {', '.join(KV_CACHE_DTYPES)}")


def is_quantized(dtype: torch.dtype) -> bool:
    return dtype == FP8_DTYPE


# ---- fp8 quantization (per row over head_dim) -------------------------------------------------------------
def quantize_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [..., head_dim]`` -> (fp8 values ``[..., head_dim]``, float32 scales ``[...]``), ``x ~= q * scale``."""
    xf = x.float()
    amax = xf.abs().amax(-1)
    # An all-zero row keeps scale 1 (its values are 0 either way), so nothing divides by zero.
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    # The clamp matters: x / (amax / 448) can round a hair above 448, which e4m3fn would turn into NaN.
    q = (xf / scale.unsqueeze(-1)).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def _fp8_bits_as_half(values: torch.Tensor) -> torch.Tensor:
    """fp8 e4m3fn values as the float16 that is exactly ``value / 2**8`` (NaN codes excepted: never stored).

    e4m3 ``s eeee mmm`` shifted left by 7 is the float16 ``s 0eeee mmm0000000``: the exponent biases differ by
    8, and e4m3 subnormals land on float16 numbers with the same factor. Integer ops only, because on CPU
    torch's fp8 -> float cast is scalar code (several times slower than a copy) and a decode reads its whole
    context every step.
    """
    wide = values.view(torch.int8).to(torch.int16)  # sign-extended: bits 15..7 are all the sign
    return ((wide << 7) & -16385).view(torch.float16)  # clear bit 14 (a copy of the sign after the shift)


def dequantize(values: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp8 ``values [..., head_dim]`` x float32 ``scales [...]`` -> ``dtype`` (products in float32).

    On CPU through ``_fp8_bits_as_half`` with the 2**8 folded into the scale (a power of two: the products
    are bit-identical to the native cast's); elsewhere (CUDA) the native cast."""
    scale = scales.unsqueeze(-1)
    if values.device.type == "cpu":
        out = _fp8_bits_as_half(values).float().mul_(scale * 256.0)
    else:
        out = values.float().mul_(scale)
    return out if dtype == torch.float32 else out.to(dtype)


def gather_slots(cache: torch.Tensor, scales: torch.Tensor | None, slots: torch.Tensor, dtype: torch.dtype):
    """Rows ``slots`` of a layer's K or V ``[num_slots, kv_heads, head_dim]``: as stored when ``scales`` is
    None (the caller casts, as before fp8 existed), else dequantized to ``dtype``."""
    if scales is None:
        return cache.index_select(0, slots)
    values = cache.view(torch.uint8).index_select(0, slots).view(cache.dtype)
    return dequantize(values, scales.index_select(0, slots), dtype)


class KVCache:
    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int, dtype, device,
                 kv_cache_dtype: str = "auto") -> None:
        """``dtype`` is the compute (model) dtype; ``kv_cache_dtype`` picks the storage ("auto" | "fp8")."""
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks}, {block_size}")
        if not isinstance(dtype, torch.dtype):
            dtype = canonical_dtype(dtype)  # accept "bfloat16", "fp16", ...
        self.config = config
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.compute_dtype = dtype
        self.kv_cache_dtype = kv_cache_dtype
        storage = kv_storage_dtype(dtype, kv_cache_dtype)
        device = torch.device(device)
        self.tensor = torch.zeros(
            (config.num_layers, 2, num_blocks, block_size, config.num_kv_heads, config.head_dim),
            dtype=storage,
            device=device,
        )
        # Zero scales: a slot never written dequantizes to 0, as an unwritten slot of an unquantized cache.
        self.scales: torch.Tensor | None = None
        if is_quantized(storage):
            self.scales = torch.zeros(self.tensor.shape[:-1], dtype=SCALE_DTYPE, device=device)

    @property
    def dtype(self) -> torch.dtype:
        """The storage dtype (what exported blocks carry)."""
        return self.tensor.dtype

    @property
    def dtype_name(self) -> str:
        """The storage dtype as exported blocks name it ("float32", "float8_e4m3fn", ...)."""
        return dtype_name(self.tensor.dtype)

    @property
    def quantized(self) -> bool:
        return self.scales is not None

    @property
    def device(self) -> torch.device:
        return self.tensor.device

    @property
    def block_shape(self) -> tuple[int, ...]:
        """Shape of one exported block: [layers, 2, block_size, kv_heads, head_dim]."""
        t = self.tensor.shape
        return (t[0], t[1], t[3], t[4], t[5])

    @property
    def scales_shape(self) -> tuple[int, ...]:
        """Shape of one block's scales: [layers, 2, block_size, kv_heads] (fp8 only)."""
        return self.block_shape[:-1]

    @staticmethod
    def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype, kv_cache_dtype: str = "auto") -> int:
        """Bytes one block takes in the pool: values, plus the scales of a quantized cache."""
        storage = kv_storage_dtype(dtype, kv_cache_dtype)
        slots = config.num_layers * 2 * block_size * config.num_kv_heads
        nbytes = slots * config.head_dim * torch.empty((), dtype=storage).element_size()
        if is_quantized(storage):
            nbytes += slots * torch.empty((), dtype=SCALE_DTYPE).element_size()
        return nbytes

    def block_nbytes(self) -> int:
        return self.bytes_per_block(self.config, self.block_size, self.compute_dtype, self.kv_cache_dtype)

    @staticmethod
    def blocks_for_memory(config: ModelConfig, block_size: int, dtype, num_bytes: int, kv_cache_dtype: str = "auto") -> int:
        """How many blocks fit in ``num_bytes`` (0 when not even one does)."""
        if not isinstance(dtype, torch.dtype):
            dtype = canonical_dtype(dtype)
        return max(0, int(num_bytes) // KVCache.bytes_per_block(config, block_size, dtype, kv_cache_dtype))

    def layer(self, layer: int) -> LayerKV:
        """Layer ``layer``'s slots (values and, for fp8, scales) as views: what the model reads and writes."""
        k, v = self.layer_slots(layer)
        if self.scales is None:
            return LayerKV(k, v)
        s = self.scales[layer]
        num_slots = self.num_blocks * self.block_size
        return LayerKV(k, v, s[0].view(num_slots, s.shape[-1]), s[1].view(num_slots, s.shape[-1]))

    def layer_slots(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``layer``'s K and V as ``[num_slots, kv_heads, head_dim]`` views (no copy)."""
        kv = self.tensor[layer]
        num_slots = self.num_blocks * self.block_size
        return (
            kv[0].view(num_slots, kv.shape[-2], kv.shape[-1]),
            kv[1].view(num_slots, kv.shape[-2], kv.shape[-1]),
        )

    def _check_block(self, block_id: int) -> int:
        block_id = int(block_id)
        if not 0 <= block_id < self.num_blocks:
            raise IndexError(f"block id {block_id} out of range [0, {self.num_blocks})")
        return block_id

    def _ids(self, block_ids: list[int]) -> torch.Tensor:
        return torch.tensor([self._check_block(b) for b in block_ids], dtype=torch.long, device=self.device)

    def _check_data(self, data: torch.Tensor, scales: torch.Tensor | None, lead: tuple[int, ...]) -> None:
        if tuple(data.shape) != (*lead, *self.block_shape):
            raise ValueError(f"block data has shape {tuple(data.shape)}, expected {(*lead, *self.block_shape)}")
        if data.dtype != self.tensor.dtype:
            raise ValueError(f"block data has dtype {data.dtype}, expected {self.tensor.dtype}")
        if self.scales is None:
            if scales is not None:
                raise ValueError(f"block scales given, but this KV cache stores {self.tensor.dtype} (no scales)")
            return
        if scales is None:
            raise ValueError(f"a {self.tensor.dtype} KV cache needs the block's scales")
        if tuple(scales.shape) != (*lead, *self.scales_shape) or scales.dtype != SCALE_DTYPE:
            raise ValueError(f"block scales are {scales.dtype} {tuple(scales.shape)}, "
                             f"expected {SCALE_DTYPE} {(*lead, *self.scales_shape)}")

    def read_block(self, block_id: int) -> torch.Tensor:
        """A CPU copy of one block's values: ``[layers, 2, block_size, kv_heads, head_dim]``."""
        block_id = self._check_block(block_id)
        return self.tensor[:, :, block_id].to("cpu", copy=True).contiguous()

    @torch.inference_mode()  # the cache may have been created in inference mode (in-place writes need it then)
    def write_block(self, block_id: int, data: torch.Tensor, scales: torch.Tensor | None = None) -> None:
        """Overwrite one block with ``data`` as produced by ``read_block`` (same shape and dtype) and, for a
        quantized cache, its ``scales`` as produced by ``read_scales``."""
        block_id = self._check_block(block_id)
        self._check_data(data, scales, ())
        self.tensor[:, :, block_id].copy_(data)
        if self.scales is not None:
            self.scales[:, :, block_id].copy_(scales)

    def read_blocks(self, block_ids: list[int]) -> torch.Tensor:
        """Several blocks' values at once: ``[n, layers, 2, block_size, kv_heads, head_dim]`` on CPU."""
        ids = self._ids(block_ids)
        if self.scales is None:
            return self.tensor.index_select(2, ids).movedim(2, 0).to("cpu").contiguous()
        # fp8 through a byte view: index_select / index_copy_ are not implemented for fp8 on CPU.
        raw = self.tensor.view(torch.uint8).index_select(2, ids).movedim(2, 0).to("cpu").contiguous()
        return raw.view(self.tensor.dtype)

    def read_scales(self, block_ids: list[int]) -> torch.Tensor | None:
        """Several blocks' scales: ``[n, layers, 2, block_size, kv_heads]`` float32 on CPU; None if unquantized."""
        if self.scales is None:
            return None
        return self.scales.index_select(2, self._ids(block_ids)).movedim(2, 0).to("cpu").contiguous()

    @torch.inference_mode()
    def write_blocks(self, block_ids: list[int], data: torch.Tensor, scales: torch.Tensor | None = None) -> None:
        """Inverse of ``read_blocks`` (+ ``read_scales`` for a quantized cache)."""
        self._check_data(data, scales, (len(block_ids),))
        ids = self._ids(block_ids)
        if self.scales is None:
            self.tensor.index_copy_(2, ids, data.to(self.device).movedim(0, 2))
            return
        raw = data.to(self.device).contiguous().view(torch.uint8)
        self.tensor.view(torch.uint8).index_copy_(2, ids, raw.movedim(0, 2))
        self.scales.index_copy_(2, ids, scales.to(self.device).movedim(0, 2))
