"""Hold exactly the pins the cache service assigns to this node.

Every heartbeat answer lists the complete set of pins the node must hold
(``PinAssignment``s). The keeper releases pins no longer listed and warms
new ones: first by pulling the prefix from a peer that holds it (the same
transfer-or-recompute decision as any request), then ``Engine.pin``, which
prefills whatever is still missing and keeps the blocks from eviction. This
is how a pinned prefix is re-warmed on a replacement node when a holder dies.

A pin never takes a worker's last free blocks: ``Engine.pin`` refuses one that would
leave fewer than ``pin_reserve_blocks`` allocatable, so that requests keep being served
however many pins arrive (per-tenant quotas bound each tenant; this bounds them all
together). The keeper checks the same before warming, so that a pin the engine would
refuse is not first pulled from a peer on every heartbeat.
"""

from __future__ import annotations

from typing import Awaitable, Callable, Sequence

from cache_service.engine_port import EngineCall, EnginePort
from cache_service.types import PinAssignment
from common.logs import get_logger

log = get_logger("cache_service")

# Pulls a prefix to be pinned from a peer that holds it, when cheaper (CacheNode.fetch_pinned_prefix).
WarmFn = Callable[[Sequence[int], str], Awaitable[object]]

# One request's worth of tokens: the scheduler's default prefill budget per step (max_num_batched_tokens).
PIN_RESERVE_REQUEST_TOKENS = 2048


def pin_reserve_blocks(capacity_blocks: int, block_size: int) -> int:
    """Blocks that pins must leave allocatable on a worker: max(one request's worth, 10% of the pool).

    The request's worth is capped at a quarter of the pool, so that a small pool can still hold pins."""
    request = min(-(-PIN_RESERVE_REQUEST_TOKENS // block_size), capacity_blocks // 4)
    return max(-(-capacity_blocks // 10), request)


def pin_refusal(num_free_blocks: int, capacity_blocks: int, block_size: int, num_blocks: int) -> str | None:
    """Why a pin of ``num_blocks`` must be refused on a worker with ``num_free_blocks`` allocatable, or None.

    Counts every block of the pin as taken from the free ones (some may be held already): a pin may be
    refused a little early, never let through late."""
    reserve = pin_reserve_blocks(capacity_blocks, block_size)
    if num_free_blocks - num_blocks >= reserve:
        return None
    return (f"pin refused: {num_blocks} blocks would leave {max(0, num_free_blocks - num_blocks)} of "
            f"{capacity_blocks} KV blocks free, fewer than the {reserve} kept for requests")


def _refusal(e: EnginePort, num_blocks: int) -> str | None:
    load = e.load()
    return pin_refusal(load.num_free_blocks, load.capacity_blocks, e.block_size, num_blocks)


class PinKeeper:
    """Converges the engine's pin table (the one table, keyed by pin id) on the service's assignments."""

    def __init__(self, engine_call: EngineCall, warm: WarmFn | None = None) -> None:
        self.engine_call = engine_call
        self.warm = warm

    async def apply(self, assignments: list[PinAssignment]) -> None:
        """Converge on ``assignments``; raises (after trying them all) if a pin could not be warmed."""
        wanted = {p.pin_id: p for p in assignments}
        held = await self.engine_call(lambda e: e.pinned())
        for pin_id in [p for p in held if p not in wanted]:
            await self.engine_call(lambda e, p=pin_id: e.unpin(p))
            log.info("released pin", extra={"pin_id": pin_id})
        errors = []
        for pin_id, p in wanted.items():
            if pin_id in held:
                continue
            try:
                refused = await self.engine_call(lambda e, n=p.num_blocks: _refusal(e, n))
                if refused is not None:
                    errors.append(f"{pin_id}: {refused}")  # tried again with the next heartbeat
                    continue
                if self.warm is not None:
                    await self.warm(p.token_ids, p.cache_salt)
                num = await self.engine_call(lambda e, p=p: e.pin(p.pin_id, list(p.token_ids), p.cache_salt))
            except Exception as exc:  # noqa: BLE001 - one bad pin must not block the others
                errors.append(f"{pin_id}: {exc}")
                continue
            log.info("holding pin", extra={"pin_id": pin_id, "num_blocks": num})
        if errors:
            raise RuntimeError("could not warm pins: " + "; ".join(errors))
