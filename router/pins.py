"""Shared system prompts: Pin warms a prefix on N workers and keeps it there; Unpin lets it go.

The cache service owns the assignment (which workers hold which pin, re-warming on a replacement
when a holder dies; workers learn their pins from heartbeat answers). The router adds the part a
client waits for: it tells the assigned workers to warm the prefix *now*, so that when ``Pin``
returns every replica already holds it and the next request starting with it hits on any of them.

A pin's id is the hash of its last full block: the same prefix (model, salt, tokens) always gets the
same id, so pinning twice is idempotent and Unpin needs only the prefix.

A pin belongs to the tenant that made it. Only that tenant (or an operator tenant: "operator" and those
named in ``operator_tenants``) unpins it; a tenant's pins hold at most its quota of blocks (by default a
quarter of the smallest live worker's pool); and a pin goes only to workers it leaves their reserve of
free blocks (``cache_service.pin_keeper.pin_reserve_blocks``; the engine refuses it too). The cache
service enforces the first two when there is one; without it, this module does, from its own table.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from cache_service.pin_keeper import pin_refusal
from cache_service.records import InvalidRequestError, UnsupportedFeatureError
from cache_service.types import DEFAULT_PIN_QUOTA_FRACTION, DEFAULT_TENANT, OPERATOR_TENANT
from router.cache_link import CacheLink
from router.dispatch import OverloadedError
from router.registry import WorkerRegistry, WorkerState
from router.tokenize import PromptEncoder
from router.validation import encode_prompt

MAX_TTL_S = 30 * 24 * 3600


class PinNotFoundError(LookupError):
    """Unpin of a prefix that is not pinned (NOT_FOUND)."""


class PinQuotaError(OverloadedError):
    """Over the tenant's quota of pinned blocks, or no worker has room for the pin beyond its reserve
    (RESOURCE_EXHAUSTED, as every OverloadedError at the edge)."""


class PinNotYoursError(PermissionError):
    """Unpin or pin again of another tenant's pin (without a cache service; with one, the service says)."""


class PinUnsupportedError(Exception):
    """Every worker chosen for the pin runs an engine that cannot hold blocks (vLLM workers: their ``pin``
    raises ``UnsupportedFeatureError``). FAILED_PRECONDITION at the edge, naming the workers and why; nothing
    of the pin is left behind."""


def _no_room(num_blocks: int) -> PinQuotaError:
    return PinQuotaError(f"no worker has room to pin {num_blocks} blocks and keep its reserve of free KV blocks "
                         f"for requests")


def tenant_of_salt(cache_salt: str) -> str:
    """The tenant a salt was derived for (``router.auth.tenant_salt``), else the default tenant (auth off).

    With auth on every salt is derived server-side, so the tenant read back is the authenticated one. With
    auth off a client may write such a salt itself, and gains nothing by it: its pin ids are those of its
    own salt, so it can only name its own pins."""
    parts = cache_salt.split("\x1f", 2)
    return parts[1] if len(parts) == 3 and parts[0] == "tenant" and parts[1] else DEFAULT_TENANT


@dataclass(slots=True)
class PinResult:
    pin_id: str
    workers: list[str]
    pinned_tokens: int
    num_blocks: int


class PinManager:
    def __init__(self, encoder: PromptEncoder, registry: WorkerRegistry, link: CacheLink | None,
                 *, warm_timeout_s: float = 120.0, pin_quota_blocks: int | None = None,
                 operator_tenants: frozenset[str] = frozenset()) -> None:
        self.encoder = encoder
        self.registry = registry
        self.link = link
        self.warm_timeout_s = warm_timeout_s
        self.pin_quota_blocks = pin_quota_blocks  # without a cache service; None: DEFAULT_PIN_QUOTA_FRACTION
        self.operator_tenants = frozenset(operator_tenants) | {OPERATOR_TENANT}
        # Without a cache service this is the pins' owner table: pin id -> (tenant, blocks).
        self._owners: dict[str, tuple[str, int]] = {}

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

    async def pin(self, text: str, token_ids: list[int], replicas: int, ttl_seconds: int, cache_salt: str,
                  tenant: str | None = None) -> PinResult:
        """``tenant``: the authenticated tenant (None: read from the salt, see ``tenant_of_salt``)."""
        pin_id, full, hashes = self._prefix(text, token_ids, cache_salt)
        tenant = tenant or tenant_of_salt(cache_salt)
        replicas = replicas or 1
        num_workers = len(self.registry.workers)
        if replicas > num_workers:
            raise InvalidRequestError(f"replicas is {replicas} but the stack has only {num_workers} workers")
        if not 0 <= ttl_seconds <= MAX_TTL_S:
            raise InvalidRequestError(f"ttl_seconds must be in 0..{MAX_TTL_S} (0: until Unpin), got {ttl_seconds}")
        if self.link is not None:
            chosen = await self.link.pin(pin_id, hashes, full, cache_salt, replicas, ttl_seconds, tenant)
            holders = [wid for wid in chosen if self._has_room(self.registry.get(wid), pin_id, len(hashes))]
            if chosen and not holders:
                await self.link.unpin(pin_id, tenant)  # kept nowhere: the Pin fails whole, nothing is left pending
                raise _no_room(len(hashes))
        else:
            self._check_owner_and_quota(pin_id, tenant, len(hashes))
            holders = self._choose_holders(pin_id, hashes, replicas)
            if not holders and self.registry.live_workers():
                raise _no_room(len(hashes))
        try:
            await self._warm(pin_id, full, cache_salt, holders)
        except PinUnsupportedError:
            if self.link is not None:  # kept nowhere: the service must not re-warm it on the workers either
                await self.link.unpin(pin_id, tenant)
            raise
        if self.link is None:
            self._owners[pin_id] = (tenant, len(hashes))
        return PinResult(pin_id, holders, len(full), len(hashes))

    def _check_owner_and_quota(self, pin_id: str, tenant: str, num_blocks: int) -> None:
        """Without a cache service: what its Pin checks (the same rules, from this router's own table)."""
        owner, _ = self._owners.get(pin_id, (tenant, 0))
        if owner != tenant and tenant not in self.operator_tenants:
            raise PinNotYoursError(f"pin {pin_id!r} belongs to another tenant")
        quota = self.pin_quota_blocks
        if quota is None:
            caps = [w.load.capacity_blocks for w in self.registry.live_workers() if w.load.capacity_blocks > 0]
            quota = int(min(caps) * DEFAULT_PIN_QUOTA_FRACTION) if caps else None
        used = sum(n for pid, (t, n) in self._owners.items() if t == owner and pid != pin_id)
        if quota is not None and used + num_blocks > quota:
            raise PinQuotaError(f"tenant {owner!r} has {used} pinned blocks; {num_blocks} more would exceed "
                                f"its quota of {quota} blocks (unpin some first)")

    def _has_room(self, w: WorkerState | None, pin_id: str, num_blocks: int) -> bool:
        """As the worker's last poll tells: it holds the pin already, or pinning leaves it its reserve."""
        if w is None:
            return False
        if pin_id in w.pins or w.load.capacity_blocks == 0:  # held, or no load known yet: the engine decides
            return True
        ld = w.load
        return pin_refusal(ld.num_free_blocks, ld.capacity_blocks, self.encoder.block_size, num_blocks) is None

    def _choose_holders(self, pin_id: str, hashes: list, replicas: int) -> list[str]:
        """Without a cache service: the live workers with room already holding most of it, then the emptiest."""
        matches = self.registry.mirror.lookup(hashes, include_pending=False)
        live = [w for w in self.registry.live_workers() if self._has_room(w, pin_id, len(hashes))]
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
                unsupported = [w.worker_id for w, r in zip(states, results) if isinstance(r, UnsupportedFeatureError)]
                if unsupported:
                    first = next(r for r in results if isinstance(r, UnsupportedFeatureError))
                    raise PinUnsupportedError(f"Pin is not available on {', '.join(unsupported)}: {first}")
                raise errors[0]

    async def unpin(self, text: str, token_ids: list[int], cache_salt: str, tenant: str | None = None) -> PinResult:
        pin_id, full, hashes = self._prefix(text, token_ids, cache_salt)
        tenant = tenant or tenant_of_salt(cache_salt)
        if self.link is not None:
            found, holders = await self.link.unpin(pin_id, tenant)
        else:
            owner, _ = self._owners.get(pin_id, (tenant, 0))
            if owner != tenant and tenant not in self.operator_tenants:
                raise PinNotYoursError(f"pin {pin_id!r} belongs to another tenant")
            self._owners.pop(pin_id, None)
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
