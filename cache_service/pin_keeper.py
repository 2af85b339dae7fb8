"""Hold exactly the pins the cache service assigns to this node.

Every heartbeat answer lists the complete set of pins the node must hold
(``PinAssignment``s). The keeper releases pins no longer listed and warms
new ones: first by pulling the prefix from a peer that holds it (the same
transfer-or-recompute decision as any request), then ``Engine.pin``, which
prefills whatever is still missing and keeps the blocks from eviction. This
is how a pinned prefix is re-warmed on a replacement node when a holder dies.
"""

from __future__ import annotations

import logging
from typing import Any

from cache_service.prefix_fetcher import EngineCall, PrefixFetcher
from cache_service.types import PinAssignment, PinId

log = logging.getLogger(__name__)

PinKey = tuple[tuple[int, ...], str]  # (token ids, cache salt): what the engine pins by


class PinKeeper:
    def __init__(self, engine_call: EngineCall, fetcher: PrefixFetcher | None = None) -> None:
        self.engine_call = engine_call
        self.fetcher = fetcher
        self.held: dict[PinId, PinKey] = {}
        self.num_pinned_blocks: dict[PinId, int] = {}

    async def apply(self, assignments: list[PinAssignment]) -> None:
        """Converge on ``assignments``; raises (after trying them all) if a pin could not be warmed."""
        wanted: dict[PinId, PinKey] = {p.pin_id: (tuple(p.token_ids), p.cache_salt) for p in assignments}
        for pin_id in [p for p in self.held if wanted.get(p) != self.held[p]]:
            key = self.held.pop(pin_id)
            self.num_pinned_blocks.pop(pin_id, None)
            if key not in self.held.values():  # another pin id may hold the same prefix
                await self.engine_call(lambda e, k=key: e.unpin(list(k[0]), k[1]))
                log.info("released pin %s", pin_id)
        errors = []
        for pin_id, key in wanted.items():
            if pin_id in self.held:
                continue
            tokens, salt = key
            try:
                if self.fetcher is not None:
                    await self.fetcher.fetch_prefix(tokens, salt)
                num = await self.engine_call(lambda e: e.pin(list(tokens), salt))
            except Exception as exc:  # noqa: BLE001 - one bad pin must not block the others
                errors.append(f"{pin_id}: {exc}")
                continue
            self.held[pin_id] = key
            self.num_pinned_blocks[pin_id] = num
            log.info("holding pin %s (%d blocks)", pin_id, num)
        if errors:
            raise RuntimeError("could not warm pins: " + "; ".join(errors))

    def pinned(self) -> dict[PinId, Any]:
        return dict(self.num_pinned_blocks)
