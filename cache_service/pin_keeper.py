"""Hold exactly the pins the cache service assigns to this node.

Every heartbeat answer lists the complete set of pins the node must hold
(``PinAssignment``s). The keeper releases pins no longer listed and warms
new ones: first by pulling the prefix from a peer that holds it (the same
transfer-or-recompute decision as any request), then ``Engine.pin``, which
prefills whatever is still missing and keeps the blocks from eviction. This
is how a pinned prefix is re-warmed on a replacement node when a holder dies.
"""

from __future__ import annotations

from typing import Awaitable, Callable, Sequence

from cache_service.engine_port import EngineCall
from cache_service.types import PinAssignment
from common.logs import get_logger

log = get_logger("cache_service")

# Pulls a prefix to be pinned from a peer that holds it, when cheaper (CacheNode.fetch_pinned_prefix).
WarmFn = Callable[[Sequence[int], str], Awaitable[object]]


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
                if self.warm is not None:
                    await self.warm(p.token_ids, p.cache_salt)
                num = await self.engine_call(lambda e, p=p: e.pin(p.pin_id, list(p.token_ids), p.cache_salt))
            except Exception as exc:  # noqa: BLE001 - one bad pin must not block the others
                errors.append(f"{pin_id}: {exc}")
                continue
            log.info("holding pin", extra={"pin_id": pin_id, "num_blocks": num})
        if errors:
            raise RuntimeError("could not warm pins: " + "; ".join(errors))
