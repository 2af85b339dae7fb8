"""How long simulated work takes on one node: prefill, batched decode and block transfer.

Defaults describe one H100 SXM serving a Llama-3-8B-class model in bf16 (the
project's engine has no GPU figures yet; every number is a flag):

    prefill      20,000 tokens/s  (16 GFLOP/token at ~40% of 989 TFLOP/s, derated for attention)
                 + 5 ms per prefill (scheduling, launch)
    decode step  1/150 s (weights, 16 GB at ~2.7 TB/s effective, plus overheads)
                 + KV read: num_kv_tokens_in_batch x 128 KiB / 2.7 TB/s
                 every running sequence gets one token per step, so tokens/s per
                 sequence falls as the batch (and its context) grows
    KV bytes     131,072 per token (32 layers x K,V x 8 kv heads x 128 dims x 2 bytes)
    transfer     100 Gbit/s per node pair, 1 ms latency per transfer
                 one 512-token block = 64 MiB -> 5.4 ms vs 25.6 ms to recompute (ratio ~0.21)
    host load    50 GB/s host -> GPU (PCIe 5.0 x16: 64 GB/s per direction, ~80% with pinned memory)
                 one block -> 1.3 ms (ratio ~0.05)
    disk load    13 GB/s disk -> GPU (one PCIe 5.0 NVMe per GPU: 14 GB/s sequential read, ~90%; read through
                 host memory, pipelined, so the drive is the bottleneck): one block -> 5.2 ms (ratio ~0.20)

Node capacity (``--capacity-tokens``) without lower tiers is the node's whole KV cache (Mooncake's 3M tokens
per node, which includes a host DRAM tier) and hits in it are charged nothing, as before tiers existed. With
``--host-capacity-tokens`` / ``--disk-capacity-tokens`` it is the device (HBM) tier, and hits in the lower
tiers are charged their load time (``load_s``) before the prefill, serialised with it as transfers are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(slots=True)
class TimeModel:
    prefill_tps: float = 20_000.0
    prefill_overhead_ms: float = 5.0
    decode_tps: float = 150.0  # one sequence with a short context (batch of 1)
    kv_bytes_per_token: int = 131_072
    hbm_gbs: float = 2_700.0  # effective GB/s for reading the batch's KV during decode
    transfer_gbps: float = 100.0  # Gbit/s between two nodes
    transfer_latency_ms: float = 1.0
    host_load_gbs: float = 50.0  # GB/s from the host tier back into the pool
    disk_load_gbs: float = 13.0  # GB/s from the disk tier back into the pool

    def __post_init__(self) -> None:
        for name in ("prefill_tps", "decode_tps", "hbm_gbs", "transfer_gbps", "host_load_gbs", "disk_load_gbs"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        for name in ("prefill_overhead_ms", "transfer_latency_ms"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be >= 0, got {value!r}")
        if self.kv_bytes_per_token < 0:
            raise ValueError("kv_bytes_per_token must be >= 0")

    def prefill_s(self, num_tokens: int) -> float:
        return self.prefill_overhead_ms / 1e3 + num_tokens / self.prefill_tps

    def decode_step_s(self, num_kv_tokens: int) -> float:
        """One decode step of a batch whose sequences hold ``num_kv_tokens`` in all."""
        return 1.0 / self.decode_tps + num_kv_tokens * self.kv_bytes_per_token / (self.hbm_gbs * 1e9)

    def transfer_s(self, num_blocks: int, block_size: int) -> float:
        if num_blocks <= 0:
            return 0.0
        nbytes = num_blocks * block_size * self.kv_bytes_per_token
        return self.transfer_latency_ms / 1e3 + nbytes * 8 / (self.transfer_gbps * 1e9)

    def transfer_cost_ratio(self, block_size: int) -> float:
        """Seconds to pull one block over seconds to prefill it (bandwidth terms only)."""
        pull = block_size * self.kv_bytes_per_token * 8 / (self.transfer_gbps * 1e9)
        return pull / (block_size / self.prefill_tps)

    def load_s(self, num_host_blocks: int, num_disk_blocks: int, block_size: int) -> float:
        """Loading hits back from the node's own host and disk tiers into its pool."""
        nbytes = block_size * self.kv_bytes_per_token
        return nbytes * (num_host_blocks / (self.host_load_gbs * 1e9) + num_disk_blocks / (self.disk_load_gbs * 1e9))

    def load_cost_ratio(self, load_gbs: float, block_size: int) -> float:
        """Seconds to load one block at ``load_gbs`` over seconds to prefill it: ``CostWeights.host_hit_cost``
        (at ``host_load_gbs``) and ``disk_hit_cost`` (at ``disk_load_gbs``)."""
        return block_size * self.kv_bytes_per_token / (load_gbs * 1e9) / (block_size / self.prefill_tps)
