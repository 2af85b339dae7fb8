"""One request's state inside the engine, and what the engine reports about it.

A sequence's tokens are one list, prompt then output; the KV cache holds the first ``num_computed_tokens``
of them, in the blocks of ``block_table``:

    token_ids      [ p0 p1 ... p(P-1) | o0 o1 ... o(k-1) ]
    computed       [<------- num_computed_tokens ------>]  (the newest sampled token is never computed yet)
    block_table    [ blk | blk | blk | ... ]  block i holds positions i*bs .. i*bs+bs-1
    block_hashes   one chained hash per *full* block of token_ids (prompt and generated alike)

After a preemption the table is emptied and ``num_computed_tokens`` drops to 0; the output is kept and the
whole of ``token_ids`` is prefilled again (its full blocks are usually still cached).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from cache_service.block_hash import BlockHash
from cache_service.records import FailureKind, SamplingParams
from workers.block_pool import Block


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True, eq=False)
class Sequence:
    request_id: str
    token_ids: list[int]  # prompt + output
    num_prompt_tokens: int
    params: SamplingParams
    cache_salt: str = ""
    generator: torch.Generator | None = None
    status: SequenceStatus = SequenceStatus.WAITING
    block_table: list[Block] = field(default_factory=list)
    block_hashes: list[BlockHash] = field(default_factory=list)
    num_computed_tokens: int = 0
    # Leading blocks of block_table already registered in the pool's hash map (hits, or cached by us).
    num_registered_blocks: int = 0
    num_cached_tokens: int | None = None  # the prefix hit at first admission (reported as cached_tokens)
    # Of that hit, tokens loaded back from the host / disk tier for this sequence (kv_manager.lookup_prefix;
    # capped to the hit at first admission by the scheduler).
    num_host_hit_tokens: int = 0
    num_disk_hit_tokens: int = 0
    num_preemptions: int = 0
    finish_reason: str | None = None
    error: str | None = None
    # Whose failure ``error`` is, when set. ENGINE by default: the scheduler fails a request when this worker's
    # KV cache has no room for it (pins hold the rest), and another worker may have room. The engine sets
    # REQUEST when the request's own part of a step failed (workers/engine.py ``_fail_request``).
    error_kind: FailureKind = FailureKind.ENGINE
    # Incremental detokenization and what was reported so far (workers/detokenizer.py).
    output_text: str = ""
    num_emitted_chars: int = 0
    num_emitted_tokens: int = 0
    prefix_offset: int = 0
    read_offset: int = 0
    internal: bool = False  # engine-owned (pin warm-up): its outputs are never returned by step()

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED


@dataclass(slots=True)
class RequestOutput:
    """What one request produced in one step (or, from ``Engine.generate``, in total)."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" | "error" | None while running
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    error: str | None = None
    error_kind: FailureKind | None = None  # set with ``error``: whether another worker could serve it
    host_cached_tokens: int = 0  # of cached_tokens, loaded back from the host tier
    disk_cached_tokens: int = 0  # of cached_tokens, loaded back from the disk tier
