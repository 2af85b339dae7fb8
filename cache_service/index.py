"""The cluster block index in Redis: which node holds which block, nodes, pins, counters.

A thin async shell over the Lua scripts of ``lua_scripts`` (the schema is
drawn there). Every call is one round trip except ``publish`` of a large
batch and ``stats``. A batch of up to ``PUBLISH_CHUNK`` events is one script,
so it is applied atomically; a larger one (a node's full snapshot) is a
pipeline of such scripts, each atomic, so that Redis keeps answering lookups
between chunks instead of blocking on one huge transaction. Scripts are
loaded once and run with EVALSHA; redis-py reloads them on NOSCRIPT, which
is what a restarted (empty) Redis answers.

Redis failures surface as ``IndexUnavailable`` (the servicer's UNAVAILABLE).

Tiers: each (block, holder) entry keeps the holder's fastest tier for the block (``records.Tier``); a
``BlockStored`` with another tier moves it there, and ``lookup`` answers each node's prefix with its split
over the tiers (``PrefixMatch.tiers``).

Pins have an owner (a tenant): only it, or an operator, unpins a pin or pins it again
(``PinNotYours``), and a tenant's pins together hold at most its quota of blocks
(``PinQuotaExceeded``), by default a quarter of the smallest live node's pool, so that no
tenant can fill a worker with pins. Counters saturate at 2^62 (``lua_scripts``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import redis.asyncio as aioredis
from redis import exceptions as rexc

from cache_service import lua_scripts
from cache_service.block_hash import HASH_NBYTES, BlockHash
from cache_service.records import AllBlocksCleared, BlockEvent, BlockStored, Tier, WorkerLoad
from cache_service.types import (
    DEFAULT_PIN_QUOTA_FRACTION,
    DEFAULT_TENANT,
    HeartbeatResult,
    IndexStats,
    NodeId,
    NodeInfo,
    NodeStatus,
    PinAssignment,
    PinSpec,
    PinStatus,
    PrefixMatch,
    Registration,
    TierCounts,
    TransferCounts,
)
from cache_service.validation import clamp_counter_delta

DEFAULT_PREFIX = "pc:"
# Ops per script call inside one publish: bounds how long one script blocks Redis.
PUBLISH_CHUNK = 4096
SWEEP_BATCH = 4096
FORGET_AFTER_S = 600.0

# NodeInfo attribute <-> field of the ``n:<i>`` hash.
_INFO_FIELDS = (
    ("transfer_address", "addr", str),
    ("model_id", "model", str),
    ("block_size", "bs", int),
    ("capacity_blocks", "cap", int),
    ("block_nbytes", "nbytes", int),
    ("prefill_tokens_per_s", "prefill", float),
    ("transfer_bytes_per_s", "bw", float),
    ("ray_node_id", "ray", str),
)


class IndexUnavailable(RuntimeError):
    """Redis cannot be reached (or refused the command): retry later."""


class NodeNotFound(LookupError):
    """The node is not registered (never was, expired and swept, or Redis lost it)."""


class NodeExpired(LookupError):
    """The node's heartbeat expired: it must register again."""


class StaleEpoch(RuntimeError):
    """A publication from an earlier incarnation of the node."""


class PinNotYours(PermissionError):
    """Unpin (or pin again) of a pin that belongs to another tenant."""


class PinQuotaExceeded(RuntimeError):
    """The tenant's pins would hold more blocks than its quota."""


@dataclass(slots=True)
class SweepResult:
    num_dead_nodes: int
    num_removed_entries: int
    num_forgotten_nodes: int


# ---- key names: the schema drawn in lua_scripts (its scripts build the same names from ARGV) ----------------
def node_ids_key(prefix: str) -> str:
    """The hash node_id -> i: a node's small integer index, which names its other keys."""
    return prefix + "ids"


def heartbeat_key(prefix: str, idx: str | int) -> str:
    """Node i's heartbeat: it exists while the node is alive (SET PX ttl at registration, PEXPIRE on each
    heartbeat). Once it is gone the node is dead: lookups and pins skip it at once, the sweeper removes its
    entries, and its next heartbeat answers known=false."""
    return f"{prefix}hb:{idx}"


def pin_key(prefix: str, pin_id: str) -> str:
    """Pin ``pin_id``'s hash: replicas, model, salt, tokens, num_blocks, expire_ms (0 = no TTL; else the
    Redis time, in ms, after which the next heartbeat drops the pin)."""
    return f"{prefix}pin:{pin_id}"


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def pack_tokens(token_ids: Sequence[int]) -> bytes:
    return np.asarray(token_ids, dtype="<u4").tobytes()


def unpack_tokens(raw: bytes) -> tuple[int, ...]:
    return tuple(int(t) for t in np.frombuffer(raw, dtype="<u4"))


def _encode_event(event: BlockEvent) -> bytes:
    """One PUBLISH op (lua_scripts): a stored block carries its tier as a trailing digit, none for device
    (the common case, and the op an index without tiers wrote)."""
    if isinstance(event, AllBlocksCleared):
        return b"C"
    assert len(event.block_hash) == HASH_NBYTES
    if isinstance(event, BlockStored):
        tier = Tier(event.tier)  # raises on a tier the schema's 2 bits cannot hold
        return b"S" + event.block_hash + (b"%d" % tier if tier else b"")
    return b"R" + event.block_hash


class ClusterIndex:
    def __init__(self, client: aioredis.Redis, *, prefix: str = DEFAULT_PREFIX,
                 bulk_client: aioredis.Redis | None = None) -> None:
        self.redis = client
        # Publications and sweeps may legitimately take longer than a lookup:
        # they get a client with a longer read timeout (same server).
        self.bulk_redis = bulk_client or client
        self.prefix = prefix
        self._register = client.register_script(lua_scripts.REGISTER)
        self._publish = client.register_script(lua_scripts.PUBLISH)
        self._lookup = client.register_script(lua_scripts.LOOKUP)
        self._sweep = client.register_script(lua_scripts.SWEEP)
        self._heartbeat = client.register_script(lua_scripts.HEARTBEAT)
        self._pin = client.register_script(lua_scripts.PIN)
        self._unpin = client.register_script(lua_scripts.UNPIN)

    async def _run(self, script: Any, args: Sequence[Any], client: aioredis.Redis | None = None) -> Any:
        try:
            return await script(keys=[], args=[self.prefix, *args], client=client)
        except (rexc.ConnectionError, rexc.TimeoutError, rexc.BusyLoadingError, OSError) as exc:
            raise IndexUnavailable(f"Redis unavailable: {exc}") from exc
        except rexc.ResponseError as exc:  # OOM, READONLY replica, ...
            raise IndexUnavailable(f"Redis refused the command: {exc}") from exc

    async def ping(self) -> bool:
        try:
            return bool(await self.redis.ping())
        except (rexc.RedisError, OSError):
            return False

    async def close(self) -> None:
        await self.redis.aclose()
        if self.bulk_redis is not self.redis:
            await self.bulk_redis.aclose()

    # ---- nodes -------------------------------------------------------------
    async def register(self, info: NodeInfo, ttl_s: float) -> Registration:
        fields: list[Any] = []
        for attr, name, _ in _INFO_FIELDS:
            fields += [name, str(getattr(info, attr))]
        ttl_ms = max(1, int(ttl_s * 1000))
        _, epoch = await self._run(self._register, [info.node_id, ttl_ms, *fields])
        return Registration(info.node_id, int(epoch))

    async def heartbeat(
        self, node_id: NodeId, epoch: int, load: WorkerLoad, transfers: TransferCounts | None = None
    ) -> HeartbeatResult:
        t = transfers or TransferCounts()
        # Clamped here, whoever calls: the script saturates the totals, this bounds what one heartbeat adds.
        deltas = [clamp_counter_delta(x) for x in (t.num_transfers, t.num_failed, t.num_blocks, t.num_bytes)]
        out = await self._run(
            self._heartbeat,
            [node_id, epoch, load.num_running, load.num_waiting, load.num_free_blocks,
             load.num_cached_blocks, *deltas],
        )
        if int(out[0]) != 1:
            return HeartbeatResult(known=False)
        pins = [
            PinAssignment(_s(out[i]), unpack_tokens(out[i + 1]), _s(out[i + 2]), int(out[i + 3]))
            for i in range(1, len(out), 4)
        ]
        pins.sort(key=lambda p: p.pin_id)
        return HeartbeatResult(known=True, pins=pins)

    async def node_epoch(self, node_id: NodeId) -> int | None:
        """The node's current epoch, or None when it is not registered."""
        try:
            idx = await self.redis.hget(node_ids_key(self.prefix), node_id)
            if idx is None:
                return None
            epoch = await self.redis.hget(f"{self.prefix}n:{_s(idx)}", "epoch")
        except (rexc.RedisError, OSError) as exc:
            raise IndexUnavailable(f"Redis unavailable: {exc}") from exc
        return None if epoch is None else int(epoch)

    # ---- block events ----------------------------------------------------------
    async def publish(
        self, node_id: NodeId, epoch: int, events: Sequence[BlockEvent], *, full_snapshot: bool = False
    ) -> int:
        """Apply a node's events (atomically up to PUBLISH_CHUNK); returns how many were applied."""
        ops = [_encode_event(e) for e in events]
        chunks = [ops[i : i + PUBLISH_CHUNK] for i in range(0, len(ops), PUBLISH_CHUNK)] or [[]]
        if len(chunks) == 1:
            results = [await self._run(self._publish, [node_id, epoch, int(full_snapshot), 1, *chunks[0]],
                                       self.bulk_redis)]
        else:
            try:
                async with self.bulk_redis.pipeline(transaction=False) as pipe:
                    for i, chunk in enumerate(chunks):
                        full = int(full_snapshot and i == 0)
                        await self._publish(
                            keys=[], args=[self.prefix, node_id, epoch, full, int(i == 0), *chunk], client=pipe
                        )
                    results = await pipe.execute()
            except (rexc.ConnectionError, rexc.TimeoutError, rexc.BusyLoadingError, OSError) as exc:
                raise IndexUnavailable(f"Redis unavailable: {exc}") from exc
            except rexc.ResponseError as exc:
                raise IndexUnavailable(f"Redis refused the command: {exc}") from exc
        status, _, current = (int(x) for x in results[0])
        if status == -1:
            raise NodeNotFound(f"node {node_id!r} is not registered")
        if status == -2:
            raise StaleEpoch(f"node {node_id!r}: epoch {epoch} is stale (current epoch {current})")
        if status == -3:
            raise NodeExpired(f"node {node_id!r}: heartbeat expired, register again")
        return sum(int(r[1]) for r in results)

    # ---- lookups -----------------------------------------------------------
    async def lookup(self, block_hashes: Sequence[BlockHash], model_id: str = "") -> list[PrefixMatch]:
        """Per live node, the longest prefix of ``block_hashes`` it holds in any tier, and how it splits over
        the tiers (longest first)."""
        out = await self._run(self._lookup, [model_id, *block_hashes])
        matches = [PrefixMatch(_s(out[i]), int(out[i + 1]), _s(out[i + 2]),
                               TierCounts(int(out[i + 3]), int(out[i + 4]), int(out[i + 5])))
                   for i in range(0, len(out), 6)]
        matches.sort(key=lambda m: (-m.num_blocks, m.node_id))
        return matches

    # ---- dead nodes --------------------------------------------------------
    async def sweep(self, *, batch: int = SWEEP_BATCH, forget_after_s: float = FORGET_AFTER_S) -> SweepResult:
        """Remove every entry of nodes whose heartbeat expired (loops until done)."""
        total = SweepResult(0, 0, 0)
        while True:
            dead, removed, more, forgotten = (
                int(x)
                for x in await self._run(self._sweep, [batch, int(forget_after_s * 1000)], self.bulk_redis)
            )
            total.num_dead_nodes = dead
            total.num_removed_entries += removed
            total.num_forgotten_nodes += forgotten
            if not more:
                return total

    # ---- pins --------------------------------------------------------------
    async def pin(self, spec: PinSpec, *, operator: bool = False, quota_blocks: int | None = None,
                  quota_fraction: float = DEFAULT_PIN_QUOTA_FRACTION) -> list[NodeId]:
        """The pin's holders. ``quota_blocks`` None: ``quota_fraction`` of the smallest live node of the model
        (no quota while no such node reports its capacity). Raises ``PinNotYours`` when the pin exists and is
        another tenant's (unless ``operator``), ``PinQuotaExceeded`` over the owner's quota; neither writes."""
        quota = -1 if quota_blocks is None else quota_blocks
        out = await self._run(
            self._pin,
            [spec.pin_id, spec.replicas, int(spec.ttl_seconds * 1000), spec.model_id, spec.cache_salt,
             pack_tokens(spec.token_ids), len(spec.block_hashes), spec.tenant, int(operator), quota,
             repr(float(quota_fraction)), *spec.block_hashes],
        )
        status = int(out[0])
        if status == -1:
            raise PinNotYours(f"pin {spec.pin_id!r} belongs to another tenant")
        if status == -2:
            used, limit = int(out[1]), int(out[2])
            raise PinQuotaExceeded(
                f"tenant {spec.tenant!r} has {used} pinned blocks; {len(spec.block_hashes)} more would exceed "
                f"its quota of {limit} blocks (unpin some first)")
        return sorted(_s(x) for x in out[1:])

    async def unpin(self, pin_id: str, tenant: str = DEFAULT_TENANT, *, operator: bool = False
                    ) -> tuple[bool, list[NodeId]]:
        """(found, holders); ``PinNotYours`` when the pin is another tenant's (unless ``operator``)."""
        out = await self._run(self._unpin, [pin_id, tenant, int(operator)])
        if int(out[0]) == -1:
            raise PinNotYours(f"pin {pin_id!r} belongs to another tenant")
        return bool(int(out[0])), sorted(_s(x) for x in out[1:])

    # ---- introspection -------------------------------------------------------
    async def stats(self) -> IndexStats:
        p = self.prefix
        try:
            ids = {_s(k): _s(v) for k, v in (await self.redis.hgetall(node_ids_key(p))).items()}
            pipe = self.redis.pipeline(transaction=False)
            order = sorted(ids)
            for node_id in order:
                idx = ids[node_id]
                pipe.hgetall(f"{p}n:{idx}")
                pipe.exists(heartbeat_key(p, idx))
                pipe.scard(f"{p}nb:{idx}")
            pipe.hgetall(p + "ctr")
            pipe.hget(p + "stat", "num_blocks")
            pipe.smembers(p + "pins")
            res = await pipe.execute()
            pin_ids = sorted(_s(x) for x in res[-1])
            pipe = self.redis.pipeline(transaction=False)
            for pid in pin_ids:
                # The length of the tokens, not the tokens (nor the salt): stats never carry a prompt.
                pipe.hmget(pin_key(p, pid), "replicas", "num_blocks", "tenant")
                pipe.hstrlen(pin_key(p, pid), "tokens")
                pipe.smembers(f"{p}pinh:{pid}")
            pin_res = await pipe.execute()
            used_memory = int((await self.redis.info("memory"))["used_memory"])
        except (rexc.RedisError, OSError) as exc:
            raise IndexUnavailable(f"Redis unavailable: {exc}") from exc
        nodes = []
        for i, node_id in enumerate(order):
            h = {_s(k): _s(v) for k, v in res[3 * i].items()}
            info = NodeInfo(node_id=node_id)
            for attr, name, conv in _INFO_FIELDS:
                if name in h:
                    setattr(info, attr, conv(h[name]))
            load = WorkerLoad(node_id, num_running=int(h.get("running", 0)), num_waiting=int(h.get("waiting", 0)),
                              num_free_blocks=int(h.get("free", 0)), num_cached_blocks=int(h.get("cached", 0)))
            nodes.append(NodeStatus(info, load, int(res[3 * i + 2]), bool(res[3 * i + 1]), int(h.get("epoch", 0))))
        counters = {_s(k): int(v) for k, v in res[-3].items()}
        pins = []
        for j, pid in enumerate(pin_ids):
            (replicas, num_blocks, tenant), tokens_len, holders = pin_res[3 * j : 3 * j + 3]
            if replicas is None:
                continue
            pins.append(PinStatus(pid, int(replicas), int(num_blocks), int(tokens_len) // 4,
                                  _s(tenant or DEFAULT_TENANT), sorted(_s(x) for x in holders)))
        return IndexStats(
            nodes=nodes,
            num_blocks=int(res[-2] or 0),
            num_entries=sum(n.num_indexed_blocks for n in nodes),
            counters=counters,
            pins=pins,
            redis_used_memory_bytes=used_memory,
        )

    async def check_integrity(self) -> None:
        """Every block entry is mirrored in its node's set and the block gauge is exact (tests)."""
        p = self.prefix.encode()
        num_blocks = 0
        entries: set[tuple[bytes, bytes]] = set()
        async for key in self.redis.scan_iter(match=p + b"b:*", count=1000):
            num_blocks += 1
            h = key[len(p) + 2 :]
            assert len(h) == HASH_NBYTES, f"malformed block key {key!r}"
            for idx in await self.redis.hkeys(key):
                entries.add((idx, h))
        mirrored: set[tuple[bytes, bytes]] = set()
        async for key in self.redis.scan_iter(match=p + b"nb:*", count=1000):
            idx = key[len(p) + 3 :]
            for h in await self.redis.smembers(key):
                mirrored.add((idx, h))
        assert entries == mirrored, f"block entries and node sets disagree: {len(entries ^ mirrored)} differ"
        gauge = int(await self.redis.hget(self.prefix + "stat", "num_blocks") or 0)
        assert gauge == num_blocks, f"num_blocks gauge {gauge} != {num_blocks} block keys"
