"""A request as the simulator sees it: block identities, sizes, and what happened to it.

Two sources of block identity:

    Mooncake ids   one pool block per hash id, the last one possibly partial (the
                   trace's own convention: its published hit rates count every id);
                   hash = the id (plus a per-replica offset) as 16 little-endian bytes
    token ids      the canonical chained hash of every *full* block (block_hash.py);
                   the tail that does not fill a block is always prefilled

Hashes are made on arrival and dropped when the request finishes, so a
replicated trace with millions of requests stays small in memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import heapq
from typing import Iterator, Sequence

from cache_service.block_hash import BlockHash, hash_prompt_blocks
from loadgen.workloads import WorkloadRequest
from workers.block_pool import Block

SIM_MODEL_ID = "prefixcache-sim"


@dataclass(slots=True, eq=False)
class SimRequest:
    index: int  # arrival order; also the policy's request_key
    arrival_s: float
    num_prompt_tokens: int
    output_len: int
    block_ids: Sequence[int] | None = None  # Mooncake ids (hashes made on arrival)
    id_offset: int = 0  # replica offset added to every id
    block_hashes: list[BlockHash] | None = None
    session_id: str | None = None
    # ---- filled in by the simulation ----
    node: int | None = None
    predicted_cached_blocks: int = 0
    transfer_from: int | None = None
    num_planned_transfer: int = 0
    num_local_hit_blocks: int = 0  # every tier of its node
    num_host_hit_blocks: int = 0  # of those, loaded back from host
    num_disk_hit_blocks: int = 0  # ... and from disk
    num_transferred_blocks: int = 0
    num_computed_tokens: int = 0
    blocks: list[Block] = field(default_factory=list)
    prefill_start_s: float | None = None
    first_token_s: float | None = None
    finish_s: float | None = None
    rejected: bool = False

    @property
    def num_blocks(self) -> int:
        if self.block_hashes is not None:
            return len(self.block_hashes)
        assert self.block_ids is not None
        return len(self.block_ids)

    def hashes(self) -> list[BlockHash]:
        if self.block_hashes is None:
            assert self.block_ids is not None
            off = self.id_offset
            self.block_hashes = [BlockHash((i + off).to_bytes(16, "little")) for i in self.block_ids]
        return self.block_hashes

    @property
    def num_hit_blocks(self) -> int:
        return self.num_local_hit_blocks + self.num_transferred_blocks

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.arrival_s


def hit_tokens(num_hit_blocks: int, block_size: int, num_prompt_tokens: int) -> int:
    """Tokens covered by the first ``num_hit_blocks`` blocks (the last block may be partial)."""
    return min(num_hit_blocks * block_size, num_prompt_tokens)


def from_workload(requests: Sequence[WorkloadRequest], block_size: int) -> list[SimRequest]:
    """Simulator requests sorted by arrival (stable); trace requests keep their ids, token
    requests get the canonical chained hashes of their full blocks."""
    out: list[SimRequest] = []
    for r in requests:
        if r.prompt_token_ids is None:
            assert r.block_ids is not None
            if r.block_size != block_size:
                raise ValueError(
                    f"{r.request_id}: trace blocks are {r.block_size} tokens, the simulator's {block_size};"
                    " use --block-size equal to the trace's"
                )
            out.append(SimRequest(0, r.arrival_s, r.num_prompt_tokens, r.output_len,
                                  block_ids=r.block_ids, session_id=r.session_id))
        else:
            hashes = hash_prompt_blocks(r.prompt_token_ids, block_size, SIM_MODEL_ID)
            out.append(SimRequest(0, r.arrival_s, r.num_prompt_tokens, r.output_len,
                                  block_hashes=hashes, session_id=r.session_id))
    out.sort(key=lambda q: q.arrival_s)
    for i, q in enumerate(out):
        q.index = i
    return out


def replicate(requests: Sequence[SimRequest], replicas: int) -> Iterator[SimRequest]:
    """Tile a trace given by block ids ``replicas`` times, lazily, in arrival order.

    Copy c gets ids offset by c*(max id + 1) (disjoint working sets, like
    independent tenants) and arrivals shifted by c/replicas of the mean gap, so
    the request rate grows ``replicas``-fold while each copy keeps its timing
    and its reuse.
    """
    if replicas < 1:
        raise ValueError(f"replicas must be >= 1, got {replicas}")
    if any(r.block_ids is None for r in requests):
        raise ValueError("replicas > 1 needs a trace given by block ids (a Mooncake file)")
    if not requests:
        return iter(())
    max_id = max(max(r.block_ids) for r in requests if r.block_ids)  # type: ignore[type-var]
    gap = (requests[-1].arrival_s - requests[0].arrival_s) / max(len(requests) - 1, 1)

    def copy(c: int) -> Iterator[tuple[float, int, int, SimRequest]]:
        shift = c * gap / replicas
        for i, r in enumerate(requests):
            yield r.arrival_s + shift, i, c, r

    def gen() -> Iterator[SimRequest]:
        for index, (t, _, c, r) in enumerate(heapq.merge(*(copy(c) for c in range(replicas)))):
            yield SimRequest(index, t, r.num_prompt_tokens, r.output_len, block_ids=r.block_ids,
                             id_offset=c * (max_id + 1), session_id=r.session_id)

    return gen()
