"""Shared system prompts: Pin warms a prefix on N workers and keeps it there; Unpin lets it go.

The cache service owns the assignment (which workers hold which pin, re-warming on a replacement
when a holder dies; workers learn their pins from heartbeat answers). The router adds the part a
client waits for: it tells the assigned workers to warm the prefix *now*, so that when ``Pin``
returns every replica already holds it and the next request starting with it hits on any of them.

A pin's id is the hash of its last full block: the same prefix (model, salt, tokens) always gets the
same id, so pinning twice is idempotent and Unpin needs only the prefix.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from router.cache_link import CacheLink
from router.registry import WorkerRegistry
from router.tokenize import PromptEncoder
from router.validation import encode_prompt
from cache_service.records import InvalidRequestError

MAX_TTL_S = 30 * 24 * 3600


class PinNotFoundError(LookupError):
    """Unpin of a prefix that is not pinned (NOT_FOUND)."""


@dataclass(slots=True)
class PinResult:
    pin_id: str
    workers: list[str]
    pinned_tokens: int
    num_blocks: int


class PinManager:
    def __init__(self, encoder: PromptEncoder, registry: WorkerRegistry, link: CacheLink | None,
                 *, warm_timeout_s: float = 120.0) -> None:
        self.encoder = encoder
        self.registry = registry
        self.link = link
        self.warm_timeout_s = warm_timeout_s

    def _prefix(self, text: str, token_ids: list[int], cache_salt: str) -> tuple[str, list[int], list]:
        ids = encode_prompt(text, token_ids, self.encoder, what="prefix to pin")
        bs = self.encoder.block_size
        num_blocks = len(ids) // bs
        if num_blocks == 0:
            raise InvalidRequestError(f"the prefix has {len(ids)} tokens; pinning needs at least one full block "
                                      f"of {bs} tokens (only full blocks are shared)")
        full = ids[: num_blocks * bs]
        hashes = self.encoder.block_hashes(full, cache_salt)
        return hashes[-1].hex(), full, hashes

    async def pin(self, text: str, token_ids: list[int], replicas: int, ttl_seconds: int, cache_salt: str) -> PinResult:
        pin_id, full, hashes = self._prefix(text, token_ids, cache_salt)
        replicas = replicas or 1
        num_workers = len(self.registry.workers)
        if replicas > num_workers:
            raise InvalidRequestError(f"replicas is {replicas} but the stack has only {num_workers} workers")
        if not 0 <= ttl_seconds <= MAX_TTL_S:
            raise InvalidRequestError(f"ttl_seconds must be in 0..{MAX_TTL_S} (0: until Unpin), got {ttl_seconds}")
        if self.link is not None:
            holders = await self.link.pin(pin_id, hashes, full, cache_salt, replicas, ttl_seconds)
        else:
            holders = self._choose_holders(hashes, replicas)
        await self._warm(pin_id, full, cache_salt, holders)
        return PinResult(pin_id, holders, len(full), len(hashes))

    def _choose_holders(self, hashes: list, replicas: int) -> list[str]:
        """Without a cache service: the live workers already holding most of it, then the emptiest."""
        matches = self.registry.mirror.lookup(hashes, include_pending=False)
        live = self.registry.live_workers()
        live.sort(key=lambda w: (-matches.get(w.worker_id, 0), w.load.num_active_blocks, w.worker_id))
        return [w.worker_id for w in live[:replicas]]

    async def _warm(self, pin_id: str, full: list[int], cache_salt: str, holders: list[str]) -> None:
        states = [w for w in map(self.registry.get, holders) if w is not None and w.live]
        if states:
            calls = [w.client.pin(pin_id, full, cache_salt) for w in states]
            results = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), self.warm_timeout_s)
            for w, r in zip(states, results):
                if not isinstance(r, BaseException):
                    # Held now: an Unpin before the next poll reports it must find it (as unpin drops it at once).
                    w.pins = w.pins | {pin_id}
            errors = [r for r in results if isinstance(r, BaseException)]
            if errors and len(errors) == len(results):
                raise errors[0]

    async def unpin(self, text: str, token_ids: list[int], cache_salt: str) -> PinResult:
        pin_id, full, hashes = self._prefix(text, token_ids, cache_salt)
        if self.link is not None:
            found, holders = await self.link.unpin(pin_id)
        else:
            holders = [w.worker_id for w in self.registry.snapshot() if pin_id in w.pins]
            found = bool(holders)
        if not found:
            raise PinNotFoundError(f"no pin for this prefix (pin id {pin_id})")
        # Workers report the pins they hold: release it wherever it still is.
        for w in self.registry.snapshot():
            if pin_id in w.pins and w.worker_id not in holders:
                holders.append(w.worker_id)
        states = [w for w in map(self.registry.get, holders) if w is not None]
        for w in states:
            w.pins = w.pins - {pin_id}  # the next poll confirms; until then, do not report it as held
        calls = [w.client.unpin(pin_id) for w in states if w.live]
        if calls:
            await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), self.warm_timeout_s)
        return PinResult(pin_id, sorted(holders), len(full), len(hashes))
