"""What an engine reports about its load: queue lengths, block counts, prefix-hit counters, measured rates.

The router reads a ``WorkerLoad`` to place requests, so two of its numbers are worth their cost:

  * the prefill backlog is net of the cache: a worker whose queue holds followers of a prefix it already
    caches must not look as busy as if it had to compute them all, or the router would send the next
    follower elsewhere;
  * the token rates are moving averages over steps (prefill and decode separately: a step with any prefill
    is dominated by it), so a router can turn a backlog into seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cache_service.records import WorkerLoad
from workers.kv_manager import KVManager, cdiv
from workers.scheduler import Scheduler, SchedulerOutput


@dataclass(slots=True)
class RateMeter:
    """Exponential moving average of a rate (tokens per second); None until measured."""

    alpha: float = 0.2
    value: float | None = None

    def update(self, num_tokens: int, seconds: float) -> None:
        if num_tokens <= 0 or seconds <= 0:
            return
        rate = num_tokens / seconds
        self.value = rate if self.value is None else (1 - self.alpha) * self.value + self.alpha * rate


@dataclass(slots=True)
class StepRates:
    prefill: RateMeter = field(default_factory=RateMeter)
    decode: RateMeter = field(default_factory=RateMeter)

    def observe(self, step: SchedulerOutput, seconds: float) -> None:
        """One forward of ``step`` took ``seconds``."""
        if step.num_prefill_tokens:
            self.prefill.update(step.num_tokens, seconds)
        else:
            self.decode.update(step.num_decode_tokens, seconds)


def worker_load(scheduler: Scheduler, kv: KVManager, num_pinned_blocks: int, rates: StepRates) -> WorkerLoad:
    s = scheduler.stats
    return WorkerLoad(
        num_running=len(scheduler.running),
        num_waiting=len(scheduler.waiting),
        num_active_blocks=kv.num_used_blocks,
        num_free_blocks=kv.num_free_blocks,
        capacity_blocks=kv.num_blocks,
        num_waiting_blocks=cdiv(prefill_backlog(scheduler, kv), kv.block_size),
        num_cached_blocks=kv.num_cached_blocks,
        num_pinned_blocks=num_pinned_blocks,
        prefix_query_tokens=s.num_query_tokens,
        prefix_hit_tokens=s.num_hit_tokens,
        num_preemptions=s.num_preemptions,
        prefill_tokens_per_s=rates.prefill.value or 0.0,
        decode_tokens_per_s=rates.decode.value or 0.0,
        num_host_blocks=kv.num_host_blocks,
        num_disk_blocks=kv.num_disk_blocks,
        prefix_host_hit_tokens=s.num_host_hit_tokens,
        prefix_disk_hit_tokens=s.num_disk_hit_tokens,
    )


def prefill_backlog(scheduler: Scheduler, kv: KVManager) -> int:
    """Tokens still to prefill: waiting sequences net of their cached prefix (any tier: a block below the pool
    is loaded back, not prefilled), plus running prefills."""
    total = 0
    for seq in scheduler.waiting:
        total += seq.num_tokens - kv.num_cached_prefix_blocks(kv.reusable_hashes(seq)) * kv.block_size
    for seq in scheduler.running:
        total += max(0, seq.num_tokens - seq.num_computed_tokens - 1)  # a decode has 1 uncomputed token
    return total
