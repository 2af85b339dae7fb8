"""The paged KV cache: one tensor holding every layer's K and V, cut into fixed-size blocks.

Layout (one allocation, so a block's bytes for export are one strided gather):

    tensor[layer, 0 (K) | 1 (V), block_id, offset_in_block, kv_head, head_dim]

A token's *slot* is ``block_id * block_size + offset``; viewing ``tensor[l, 0]`` as ``[num_slots, kv_heads,
head_dim]`` makes a slot a plain row index, which is how the model writes new K/V (index_copy_) and gathers a
sequence's context (index_select). The cache knows nothing about which block belongs to whom: the block pool
and block tables decide that.
"""

from __future__ import annotations

import torch

from workers.model.config import ModelConfig, canonical_dtype


class KVCache:
    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int, dtype, device) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks}, {block_size}")
        if not isinstance(dtype, torch.dtype):
            dtype = canonical_dtype(dtype)  # accept "bfloat16", "fp16", ...
        self.config = config
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.tensor = torch.zeros(
            (config.num_layers, 2, num_blocks, block_size, config.num_kv_heads, config.head_dim),
            dtype=dtype,
            device=torch.device(device),
        )

    @property
    def dtype(self) -> torch.dtype:
        return self.tensor.dtype

    @property
    def device(self) -> torch.device:
        return self.tensor.device

    @property
    def block_shape(self) -> tuple[int, ...]:
        """Shape of one exported block: [layers, 2, block_size, kv_heads, head_dim]."""
        t = self.tensor.shape
        return (t[0], t[1], t[3], t[4], t[5])

    @staticmethod
    def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return config.num_layers * 2 * block_size * config.num_kv_heads * config.head_dim * elem

    def block_nbytes(self) -> int:
        return self.bytes_per_block(self.config, self.block_size, self.tensor.dtype)

    @staticmethod
    def blocks_for_memory(config: ModelConfig, block_size: int, dtype, num_bytes: int) -> int:
        """How many blocks fit in ``num_bytes`` (0 when not even one does)."""
        if not isinstance(dtype, torch.dtype):
            dtype = canonical_dtype(dtype)
        return max(0, int(num_bytes) // KVCache.bytes_per_block(config, block_size, dtype))

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

    def read_block(self, block_id: int) -> torch.Tensor:
        """A CPU copy of one block: ``[layers, 2, block_size, kv_heads, head_dim]``."""
        block_id = self._check_block(block_id)
        return self.tensor[:, :, block_id].to("cpu", copy=True).contiguous()

    @torch.inference_mode()  # the cache may have been created in inference mode (in-place writes need it then)
    def write_block(self, block_id: int, data: torch.Tensor) -> None:
        """Overwrite one block with ``data`` as produced by ``read_block`` (same shape and dtype)."""
        block_id = self._check_block(block_id)
        if tuple(data.shape) != self.block_shape:
            raise ValueError(f"block data has shape {tuple(data.shape)}, expected {self.block_shape}")
        if data.dtype != self.tensor.dtype:
            raise ValueError(f"block data has dtype {data.dtype}, expected {self.tensor.dtype}")
        self.tensor[:, :, block_id].copy_(data)

    def read_blocks(self, block_ids: list[int]) -> torch.Tensor:
        """Several blocks at once: ``[n, layers, 2, block_size, kv_heads, head_dim]`` on CPU."""
        ids = torch.tensor([self._check_block(b) for b in block_ids], dtype=torch.long, device=self.device)
        return self.tensor.index_select(2, ids).movedim(2, 0).to("cpu").contiguous()

    @torch.inference_mode()
    def write_blocks(self, block_ids: list[int], data: torch.Tensor) -> None:
        """Inverse of ``read_blocks``."""
        if tuple(data.shape) != (len(block_ids), *self.block_shape):
            raise ValueError(f"block data has shape {tuple(data.shape)}, expected {(len(block_ids), *self.block_shape)}")
        if data.dtype != self.tensor.dtype:
            raise ValueError(f"block data has dtype {data.dtype}, expected {self.tensor.dtype}")
        ids = torch.tensor([self._check_block(b) for b in block_ids], dtype=torch.long, device=self.device)
        self.tensor.index_copy_(2, ids, data.to(self.device).movedim(0, 2))
