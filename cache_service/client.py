"""The worker-side cache client: register, heartbeat, publish block events, look up prefixes.

Runs as asyncio tasks on the owner's event loop (a Ray async actor's, or a
``LoopThread``). The engine's thread only ever calls ``offer_events``, which
never waits (see ``EventQueue``). Everything that talks to the service
tolerates it being down: failures are logged, retried with backoff, and the
node keeps serving from its local cache meanwhile.

Recovery: a heartbeat answered ``known=false`` (expired, or Redis lost its
data) or a publication refused with NOT_FOUND / FAILED_PRECONDITION makes
the client register again (a new epoch) and publish a full snapshot of the
engine's cached set before any further events.

Under a cluster credential (``CacheClientConfig.member``, the node's own identity) every call carries the
node's token (shared secret) or rides a mutual-TLS channel that checks the service's certificate names
``cache-service``; the service accepts the node's calls only under its own node id.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Sequence

import grpc

from cache_service.block_hash import BlockHash
from cache_service.event_queue import EventQueue
from cache_service.servicer import node_info_to_proto
from cache_service.types import NodeInfo, PinAssignment, PrefixMatch, TierCounts, TransferCounts
from cache_service.validation import MAX_EVENTS_PER_PUBLISH, MAX_MESSAGE_BYTES
from protos.prefixcache.v1 import cache_pb2 as pb
from protos.prefixcache.v1 import cache_pb2_grpc
from cache_service.records import AllBlocksCleared, BlockEvent, BlockRemoved, BlockStored, HeldBlock, WorkerLoad
from common.cluster_auth import CACHE_SERVICE_IDENTITY, Member
from common.logs import get_logger, request_id_metadata

log = get_logger("cache_service")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["CacheService"].full_name

# The node's held set: one HeldBlock (hash, fastest tier) per block (records.WorkerPoll.snapshot's format).
SnapshotFn = Callable[[], "list[HeldBlock] | Awaitable[list[HeldBlock]]"]
LoadFn = Callable[[], "WorkerLoad | Awaitable[WorkerLoad]"]
PinsFn = Callable[[list[PinAssignment]], "None | Awaitable[None]"]


@dataclass(slots=True)
class CacheClientConfig:
    ttl_s: int = 10  # heartbeat TTL the service applies (whole seconds)
    heartbeat_interval_s: float = 1.0  # keep well under ttl_s
    publish_interval_s: float = 0.05
    max_batch_events: int = 4_096
    queue_capacity: int = 65_536
    rpc_timeout_s: float = 2.0
    publish_timeout_s: float = 15.0  # a snapshot part can take a while on a busy Redis
    snapshot_part_events: int = 16_384  # events per PublishEvents request of a full snapshot
    lookup_timeout_s: float = 0.5
    backoff_initial_s: float = 0.1
    backoff_max_s: float = 2.0
    # The node's cluster identity (its node id) and credential; None: a service that runs open (tests).
    member: Member | None = None


@dataclass(slots=True)
class CacheClientStats:
    num_registrations: int = 0
    num_snapshots: int = 0
    num_published_events: int = 0
    num_publish_failures: int = 0
    num_heartbeat_failures: int = 0
    num_lookups: int = 0
    num_lookup_failures: int = 0
    last_error: str | None = None
    pins: list[PinAssignment] = field(default_factory=list)


def event_to_proto(event: BlockEvent) -> pb.BlockEvent:
    if isinstance(event, BlockStored):
        return pb.BlockEvent(stored=pb.BlockStoredEvent(block_hash=bytes(event.block_hash),
                                                        parent_hash=bytes(event.parent_hash or b""),
                                                        tier=int(event.tier)))
    if isinstance(event, BlockRemoved):
        return pb.BlockEvent(removed=pb.BlockRemovedEvent(block_hash=bytes(event.block_hash)))
    if isinstance(event, AllBlocksCleared):
        return pb.BlockEvent(cleared=pb.AllBlocksClearedEvent())
    raise TypeError(f"not a block event: {event!r}")


def match_from_proto(m: pb.NodeMatch) -> PrefixMatch:
    """A Lookup answer's match; its tier split only when the counts add up (a service that predates tiers
    sends none: ``tiers`` None, read as device)."""
    tiers = TierCounts(m.num_device_blocks, m.num_host_blocks, m.num_disk_blocks)
    return PrefixMatch(m.node_id, m.num_blocks, m.transfer_address,
                       tiers if tiers.num_blocks == m.num_blocks else None)


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


class CacheClient:
    def __init__(
        self,
        address: str,
        info: NodeInfo,
        *,
        snapshot: SnapshotFn,
        load: LoadFn | None = None,
        on_pins: PinsFn | None = None,
        config: CacheClientConfig | None = None,
    ) -> None:
        self.address = address
        self.info = info
        self.config = config or CacheClientConfig()
        self.queue = EventQueue(self.config.queue_capacity)
        self.stats = CacheClientStats()
        self._snapshot = snapshot
        self._load = load or WorkerLoad
        self._on_pins = on_pins
        self._channel: grpc.aio.Channel | None = None
        self._stub: cache_pb2_grpc.CacheServiceStub | None = None
        self._tasks: list[asyncio.Task] = []
        self._transfers = TransferCounts()
        self._applied_pins: list[PinAssignment] | None = None
        self.epoch: int | None = None  # None: not registered (yet, or any more)
        self._registered = asyncio.Event()
        self._snapshot_in_flight = False
        member = self.config.member
        if member is not None and member.identity != info.node_id:
            raise ValueError(f"node {info.node_id!r} holds the credential of {member.identity!r}: a node "
                             f"registers only under its own identity")

    def _metadata(self, method: str) -> tuple[tuple[str, str], ...]:
        """A call's metadata: the request id, and the node's token for ``method`` under a shared secret."""
        member = self.config.member
        auth = member.call_metadata(f"/{SERVICE_NAME}/{method}") if member is not None else ()
        return (*request_id_metadata(), *auth)

    # ---- engine thread ---------------------------------------------------------
    def offer_events(self, events: Sequence[BlockEvent]) -> None:
        """Hand over events drained from the engine (any thread; never blocks)."""
        self.queue.offer(events)

    def record_transfer(self, ok: bool, num_blocks: int, num_bytes: int) -> None:
        t = self._transfers
        t.num_transfers += 1
        t.num_failed += 0 if ok else 1
        t.num_blocks += num_blocks
        t.num_bytes += num_bytes

    # ---- lifecycle ---------------------------------------------------------------
    async def start(self) -> None:
        options = [
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            # gRPC's default reconnect backoff grows to minutes: a service that comes
            # back must be found within about a second.
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
        ]
        member = self.config.member
        self._channel = (member.channel(self.address, CACHE_SERVICE_IDENTITY, options) if member is not None
                         else grpc.aio.insecure_channel(self.address, options=options))
        self._stub = cache_pb2_grpc.CacheServiceStub(self._channel)
        self._tasks = [
            asyncio.create_task(self._heartbeat_loop(), name=f"cache-heartbeat-{self.info.node_id}"),
            asyncio.create_task(self._publish_loop(), name=f"cache-publish-{self.info.node_id}"),
        ]

    async def wait_registered(self, timeout_s: float = 10.0) -> bool:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._registered.wait(), timeout_s)
        return self._registered.is_set()

    async def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until every offered event (and any pending snapshot) is published."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if (self.epoch is not None and not self.queue.resync_needed and not self._snapshot_in_flight
                    and len(self.queue) == 0):
                return True
            await asyncio.sleep(0.01)
        return False

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []
        if self._channel is not None:
            await self._channel.close(grace=None)
            self._channel = None

    # ---- registration -----------------------------------------------------------
    def _unregister(self, why: str, epoch: int | None = None) -> None:
        """Forget our registration (only if it is still ``epoch``, when given: a concurrent
        re-registration must not be undone by a late failure of the previous epoch)."""
        if epoch is not None and epoch != self.epoch:
            return
        if self.epoch is not None:
            log.info("node must register again", extra={"node_id": self.info.node_id, "reason": why})
        self.epoch = None
        self._registered.clear()
        self.queue.request_resync()

    async def _register(self) -> None:
        assert self._stub is not None
        resp = await self._stub.RegisterNode(
            pb.RegisterNodeRequest(node=node_info_to_proto(self.info), ttl_seconds=self.config.ttl_s),
            timeout=self.config.rpc_timeout_s, metadata=self._metadata("RegisterNode"),
        )
        self.epoch = resp.epoch
        self.queue.request_resync()  # the service dropped what it held for us: republish everything
        self.stats.num_registrations += 1
        self._registered.set()
        log.info("registered with the cache service", extra={"node_id": self.info.node_id, "epoch": resp.epoch})

    # ---- heartbeats + pins ----------------------------------------------------------
    async def _heartbeat_loop(self) -> None:
        backoff = self.config.backoff_initial_s
        while True:
            try:
                if self.epoch is None:
                    await self._register()
                await self._heartbeat()
                backoff = self.config.backoff_initial_s
                await asyncio.sleep(self.config.heartbeat_interval_s)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the service or Redis is down: keep trying
                self.stats.num_heartbeat_failures += 1
                self._note_error("heartbeat", exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.config.backoff_max_s)

    async def _heartbeat(self) -> None:
        assert self._stub is not None and self.epoch is not None
        load = await _maybe_await(self._load())
        sent, self._transfers = self._transfers, TransferCounts()
        try:
            resp = await self._stub.Heartbeat(pb.HeartbeatRequest(
                node_id=self.info.node_id, epoch=self.epoch,
                load=pb.NodeLoad(num_running=load.num_running, num_waiting=load.num_waiting,
                                 num_free_blocks=load.num_free_blocks, num_cached_blocks=load.num_cached_blocks),
                transfers=pb.TransferCounters(num_transfers=sent.num_transfers, num_failed=sent.num_failed,
                                              num_blocks=sent.num_blocks, num_bytes=sent.num_bytes),
            ), timeout=self.config.rpc_timeout_s, metadata=self._metadata("Heartbeat"))
        except BaseException:
            t = self._transfers  # not delivered: count them with the next heartbeat
            t.num_transfers += sent.num_transfers
            t.num_failed += sent.num_failed
            t.num_blocks += sent.num_blocks
            t.num_bytes += sent.num_bytes
            raise
        if not resp.known:
            self._unregister("the service does not know this node (expired, or Redis lost its data)")
            await self._register()
            return
        pins = [PinAssignment(p.pin_id, tuple(p.token_ids), p.cache_salt, p.num_blocks) for p in resp.pins]
        self.stats.pins = pins
        if self._on_pins is not None and pins != self._applied_pins:
            try:
                await _maybe_await(self._on_pins(pins))
                self._applied_pins = pins
            except Exception as exc:  # noqa: BLE001 - retried on the next heartbeat
                self._note_error("pins", exc)

    # ---- publishing -----------------------------------------------------------------
    async def _publish_loop(self) -> None:
        backoff = self.config.backoff_initial_s
        while True:
            epoch = self.epoch
            try:
                if epoch is None:
                    await self._registered.wait()
                    continue
                published = await self._publish_once(epoch)
                backoff = self.config.backoff_initial_s
                if not published:
                    await asyncio.sleep(self.config.publish_interval_s)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001
                self.stats.num_publish_failures += 1
                if isinstance(exc, grpc.aio.AioRpcError) and exc.code() in (
                    grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION
                ):
                    self._unregister(exc.details() or exc.code().name, epoch)
                else:
                    self._note_error("publish", exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.config.backoff_max_s)

    async def _publish_once(self, epoch: int) -> bool:
        """Publish a pending snapshot, or one batch of events. False when there was nothing to do."""
        assert self._stub is not None
        if self.queue.resync_needed:
            cut = self.queue.cut()
            self._snapshot_in_flight = True
            try:
                held = list(await _maybe_await(self._snapshot()))
                await self._publish_snapshot(epoch, held)
            except BaseException:
                self.queue.request_resync()
                raise
            finally:
                self._snapshot_in_flight = False
            self.queue.ack(cut)
            self.stats.num_snapshots += 1
            return True
        batch = self.queue.peek(min(self.config.max_batch_events, MAX_EVENTS_PER_PUBLISH))
        if not batch:
            return False
        await self._stub.PublishEvents(pb.PublishEventsRequest(
            node_id=self.info.node_id, epoch=epoch, events=[event_to_proto(e) for _, e in batch],
        ), timeout=self.config.publish_timeout_s, metadata=self._metadata("PublishEvents"))
        self.queue.ack(batch[-1][0])
        self.stats.num_published_events += len(batch)
        return True

    async def _publish_snapshot(self, epoch: int, held: list[HeldBlock]) -> None:
        assert self._stub is not None
        step = min(self.config.snapshot_part_events, MAX_EVENTS_PER_PUBLISH)
        for start in range(0, max(1, len(held)), step):
            part = held[start : start + step]
            await self._stub.PublishEvents(pb.PublishEventsRequest(
                node_id=self.info.node_id, epoch=epoch, full_snapshot=start == 0,
                events=[pb.BlockEvent(stored=pb.BlockStoredEvent(block_hash=bytes(h), tier=int(tier)))
                        for h, tier in part],
            ), timeout=self.config.publish_timeout_s, metadata=self._metadata("PublishEvents"))
        self.stats.num_published_events += len(held)

    # ---- lookups --------------------------------------------------------------------
    async def lookup(self, block_hashes: Sequence[BlockHash], model_id: str | None = None) -> list[PrefixMatch]:
        """Per live node, the longest prefix it holds (longest first); [] when the service is unreachable."""
        if not block_hashes or self._stub is None:
            return []
        self.stats.num_lookups += 1
        try:
            resp = await self._stub.Lookup(pb.LookupRequest(
                block_hashes=[bytes(h) for h in block_hashes],
                model_id=self.info.model_id if model_id is None else model_id,
            ), timeout=self.config.lookup_timeout_s, metadata=self._metadata("Lookup"))
        except grpc.aio.AioRpcError as exc:
            self.stats.num_lookup_failures += 1
            self._note_error("lookup", exc)
            return []
        return [match_from_proto(m) for m in resp.matches]

    def _note_error(self, what: str, exc: BaseException) -> None:
        msg = f"{what}: {exc.code().name}: {exc.details()}" if isinstance(exc, grpc.aio.AioRpcError) else \
            f"{what}: {exc}"
        if msg != self.stats.last_error:
            log.warning("cache client error", extra={"node_id": self.info.node_id, "error": msg})
        self.stats.last_error = msg
