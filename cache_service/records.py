"""The records that cross a process boundary, one per concept, torch-free (router <-> worker <-> cache).

    router --GenerateCall(params: SamplingParams, peer: PeerHint | None)--> worker
    worker --Delta(token_ids, text, finish_reason, usage: Usage, failure: EngineFailure | None)--> router
    worker --WorkerPoll(load: WorkerLoad, counters: WorkerCounters, events: [BlockEvent] | snapshot)--> router
    engine --BlockEvent (BlockStored | BlockRemoved | AllBlocksCleared)--> feed, cache client, index, mirror

They live in ``cache_service`` (the lowest runtime layer) because block events are the cache's concept and
every layer above must speak the same records: workers produce them, the router and the simulator consume
them. Proto messages are converted to and from these at the gRPC edges only. Nothing here imports torch,
Ray or gRPC, so the router can use them without pulling in the engine.
"""

from __future__ import annotations

import enum
import math
import struct
from dataclasses import dataclass, field
from typing import NamedTuple

from cache_service.block_hash import BlockHash

__all__ = [
    "AllBlocksCleared", "BlockEvent", "BlockRemoved", "BlockStored", "Delta", "EngineFailure", "FailureKind",
    "GenerateCall", "HeldBlock", "InvalidRequestError", "MAX_STOP_CHARS", "MAX_STOP_STRINGS", "MAX_TEMPERATURE",
    "MAX_TOP_K", "MIN_TEMPERATURE", "MIN_TOP_P", "PeerHint", "SamplingParams", "Tier", "UnsupportedFeatureError",
    "Usage", "WorkerCounters", "WorkerInfo",
    "WorkerLoad", "WorkerPoll", "TRANSFER_BUCKETS",
]


# ---- block events: every change of an engine's cached set ---------------------------------------------
class Tier(enum.IntEnum):
    """Where a worker holds a block, fastest first. A worker's tier for a block is the fastest that holds it."""

    DEVICE = 0  # the engine's KV pool: a hit costs nothing
    HOST = 1  # host memory under the pool: a hit costs a copy back
    DISK = 2  # local files under the host tier: a hit costs a read and a copy back


# The event contract across tiers (one stream per worker; workers/lower_tiers.py and the block pool emit it):
#   a block computed, imported or loaded back into the device pool      BlockStored(h, tier=DEVICE)
#   evicted from the device pool into host memory                          BlockStored(h, tier=HOST)
#   moved on from host memory to disk (or from the pool to disk directly)   BlockStored(h, tier=DISK)
#   found on disk when a worker starts (its disk cache survived)            BlockStored(h, tier=DISK)
#   dropped from the last tier that held it                                 BlockRemoved(h)
# A copy kept in a slower tier while a faster one holds the block says nothing: the events track the fastest.


class BlockStored(NamedTuple):
    """The worker now holds ``block_hash``, at ``tier`` (also sent when a block moves between tiers)."""

    block_hash: BlockHash
    # What the engine knows beyond the hash; an index that only learns hashes (the cache service, a
    # snapshot) leaves them at their defaults.
    parent_hash: BlockHash | None = None
    token_ids: tuple[int, ...] = ()
    block_id: int | None = None
    tier: Tier = Tier.DEVICE


class BlockRemoved(NamedTuple):
    """The worker no longer holds ``block_hash`` in any tier."""

    block_hash: BlockHash


class AllBlocksCleared(NamedTuple):
    pass


BlockEvent = BlockStored | BlockRemoved | AllBlocksCleared


class HeldBlock(NamedTuple):
    """One entry of a worker's snapshot: a block it holds and the fastest tier that holds it (what the
    ``BlockStored`` events for it have said last). A plain ``(hash, tier)`` pair, so ``for h, tier in ...``."""

    block_hash: BlockHash
    tier: Tier = Tier.DEVICE


# ---- errors ---------------------------------------------------------------------------------------------
class InvalidRequestError(ValueError):
    """A request that can never be served as given; the message names the offending field."""


class UnsupportedFeatureError(Exception):
    """The worker's engine cannot do this at all (e.g. pins on a vLLM worker); the message says what and why.
    Relayed across Ray as it is, like ``InvalidRequestError``: it is neither the request's fault nor a failure."""


class FailureKind(str, enum.Enum):
    """Whose failure it was, which decides whether the router tries another worker."""

    INVALID = "invalid"  # the request's own fault (INVALID_ARGUMENT): retrying elsewhere cannot help
    # This request's own failure in the per-request part of a step (sampling its row, detokenizing, its
    # stop strings) although it passed validation: retrying elsewhere would fail the same way.
    REQUEST = "request"
    ENGINE = "engine"  # the worker could not serve it (a failed step, shutdown): another worker may


@dataclass(frozen=True, slots=True)
class EngineFailure:
    """Why a worker ended a request without finishing it."""

    kind: FailureKind
    message: str

    @property
    def invalid(self) -> bool:
        return self.kind is FailureKind.INVALID


# ---- a request, router -> worker -------------------------------------------------------------------------
# The bounds of SamplingParams.validate (why these: its docstring).
MIN_TEMPERATURE = 1e-3
MAX_TEMPERATURE = 100.0
MIN_TOP_P = 1e-6
MAX_TOP_K = 1 << 20
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
_F32 = struct.Struct("<f")


def _float32(x: float) -> float:
    return _F32.unpack(_F32.pack(x))[0]


# The gRPC fields are float32: a client that sends exactly a documented bound must be accepted however float32
# rounded it (1e-6 arrives as 9.99999997e-07), so a lower bound also admits its float32 rounding.
_TEMPERATURE_LOW = min(MIN_TEMPERATURE, _float32(MIN_TEMPERATURE))
_TOP_P_LOW = min(MIN_TOP_P, _float32(MIN_TOP_P))


@dataclass(slots=True)
class SamplingParams:
    """How a request samples its tokens. ``validate`` admits only what can be computed, with the same rules
    at every edge (the router, ``prefixcache generate``, ``Engine.add_request``), and workers/sampling.py is
    numerically safe over exactly the admitted range:

    - temperature: 0 (greedy) or in [MIN_TEMPERATURE, MAX_TEMPERATURE] = [1e-3, 100]. A positive temperature
      below a floor once reached the sampler as logits / 1e-38 = inf and a NaN softmax, which failed the
      engine step and every request in it. vLLM raises temperatures below 1e-2 to 1e-2 ("may cause numerical
      errors") and treats < 1e-5 as greedy; we refuse rather than silently change a request. Since the sampler
      subtracts the row max before dividing, any temperature that is a normal float32 is computable; the floor
      of 1e-3 keeps 35 orders of magnitude of margin over float32's least normal (hardware that flushes
      denormals to zero would turn 1e-45 into 0, and 0 / 0 is NaN) while admitting every temperature a client
      plausibly means (at 1e-3 a logit gap of 0.01 is a factor e^10: greedy in all but name). OpenAI allows
      0..2; the ceiling of 100 is generous (the distribution is all but uniform well before it) and only
      refuses mistakes.
    - top_p: in [MIN_TOP_P, 1] = [1e-6, 1]. The most likely token has probability >= 1 / vocab, so a top_p
      below that keeps exactly that token; 1e-6 is below 1 / vocab for every vocabulary under a million, so
      refusing smaller values refuses nothing that behaves differently, and the floor is a normal float32 (a
      JSONL top_p of 1e-46 was 0.0 in float32 and dropped every token).
    - top_k: 0 (off) or at most MAX_TOP_K = 2^20. A top_k at or above the vocabulary keeps every token and is
      not refused (clients send one top_k to models of different vocabularies); the cap only bounds the field.
    - stop: at most MAX_STOP_STRINGS = 16 non-empty strings of at most MAX_STOP_CHARS = 256 characters. Every
      step searches each one in a window of the newest text and the stream holds back max(len) - 1 characters
      (workers/detokenizer.py): per-request costs, so bounded (OpenAI allows 4).
    - max_tokens: positive; with the prompt, within the model's context (that depends on the prompt and the
      model: the router's validation and workers/admission.py check it).
    - seed: [0, 2^64), the proto's uint64.
    """

    max_tokens: int = 16
    # 0 means greedy. Also the proto3 default, so an unset gRPC field and an unset JSONL field agree.
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = disabled
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        elif not isinstance(self.stop, tuple):
            self.stop = tuple(self.stop)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self) -> None:
        """Checks that do not depend on the prompt or the model (raises ``InvalidRequestError`` naming the
        field); the bounds and why: the class docstring."""
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            raise InvalidRequestError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        t = self.temperature
        if not _is_number(t) or not math.isfinite(t) or t < 0:
            raise InvalidRequestError(f"temperature must be >= 0, got {t!r}")
        if t != 0 and not _TEMPERATURE_LOW <= t <= MAX_TEMPERATURE:
            raise InvalidRequestError(
                f"temperature must be 0 (greedy) or in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}], got {t!r}")
        if not _is_number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.top_p < _TOP_P_LOW:
            raise InvalidRequestError(
                f"top_p must be at least {MIN_TOP_P:g} (anything smaller keeps only the most likely token "
                f"already), got {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise InvalidRequestError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if self.top_k > MAX_TOP_K:
            raise InvalidRequestError(
                f"top_k must be at most {MAX_TOP_K} (a top_k at or above the vocabulary keeps every token), "
                f"got {self.top_k!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed < 2**64):
            raise InvalidRequestError(f"seed must be an integer in [0, 2^64), got {self.seed!r}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise InvalidRequestError(f"stop must be a list of non-empty strings, got {list(self.stop)!r}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidRequestError(
                f"stop has {len(self.stop)} strings; at most {MAX_STOP_STRINGS} are allowed")
        for i, s in enumerate(self.stop):
            if len(s) > MAX_STOP_CHARS:
                raise InvalidRequestError(
                    f"stop[{i}] is {len(s)} characters long; at most {MAX_STOP_CHARS} are allowed")
        if not isinstance(self.ignore_eos, bool):
            raise InvalidRequestError(f"ignore_eos must be a boolean, got {self.ignore_eos!r}")


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


class PeerHint(NamedTuple):
    """A peer that holds a longer prefix of the prompt than the worker the request goes to."""

    node_id: str
    transfer_address: str
    num_blocks: int


@dataclass(slots=True)
class GenerateCall:
    """One attempt of a request on one worker."""

    request_id: str  # unique per attempt
    prompt_ids: list[int]
    params: SamplingParams
    cache_salt: str = ""
    # The router's index knowledge: the peer to pull a longer prefix from, or None for "no peer holds more".
    peer: PeerHint | None = None
    # True when ``peer`` is the router's answer (the worker then skips its own Lookup); False: the worker
    # asks the cache service itself.
    peer_known: bool = False


# ---- the answer, worker -> router -> client ------------------------------------------------------------
@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    transferred_tokens: int = 0  # of cached_tokens, those pulled from a peer for this request
    predicted_cached_tokens: int = 0  # what the router predicted (set by the router)
    host_cached_tokens: int = 0  # of cached_tokens, those loaded back from the worker's host tier
    disk_cached_tokens: int = 0  # of cached_tokens, those loaded back from the worker's disk tier


@dataclass(slots=True)
class Delta:
    """Tokens since the previous delta of a stream; the last one has ``finish_reason`` and ``usage``.

    A worker sends these; the router forwards them with ``worker_id`` set, and ``restart`` when a retry on
    another worker replaces what the client saw before.
    """

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    usage: Usage | None = None
    failure: EngineFailure | None = None
    worker_id: str = ""
    restart: bool = False

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


# ---- a worker's state, worker -> router (polls) and -> cache service (heartbeats) -------------------------
@dataclass(slots=True)
class WorkerLoad:
    """One engine's load and cache occupancy at an instant (the policies' input, the heartbeat's payload)."""

    worker_id: str = ""
    num_running: int = 0  # sequences running (prefill or decode)
    num_waiting: int = 0  # queued, not started
    num_active_blocks: int = 0  # KV blocks held by running sequences and pins (decode load)
    num_free_blocks: int = 0  # allocatable: free + cached-unreferenced
    capacity_blocks: int = 0
    # Blocks still to prefill on this worker (queued + in progress). A caller that does not know it leaves 0
    # and the policies' queue term drops out.
    num_waiting_blocks: int = 0
    num_cached_blocks: int = 0
    num_pinned_blocks: int = 0
    prefix_query_tokens: int = 0
    prefix_hit_tokens: int = 0  # every tier: what requests reported as cached_tokens
    num_preemptions: int = 0
    prefill_tokens_per_s: float = 0.0
    decode_tokens_per_s: float = 0.0
    # The tiers under the device pool (--host-cache-gb, --disk-cache): blocks in host memory (never also on
    # the device) and on disk (files: a block loaded back keeps its file), and of prefix_hit_tokens those
    # loaded back from each (cumulative, like prefix_hit_tokens; the device's own share is
    # prefix_hit_tokens - prefix_host_hit_tokens - prefix_disk_hit_tokens: router/metrics.py load_tier_tokens).
    num_host_blocks: int = 0
    num_disk_blocks: int = 0
    prefix_host_hit_tokens: int = 0
    prefix_disk_hit_tokens: int = 0


TRANSFER_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


@dataclass(slots=True)
class WorkerCounters:
    """Cumulative counters of one worker incarnation (reset when it restarts)."""

    num_blocks_stored: int = 0
    num_blocks_evicted: int = 0
    num_transfers_ok: int = 0
    num_transfers_fallback: int = 0
    num_transfer_bytes: int = 0
    num_transferred_blocks: int = 0
    transfer_bucket_bounds: tuple[float, ...] = TRANSFER_BUCKETS
    transfer_bucket_counts: list[int] = field(default_factory=lambda: [0] * len(TRANSFER_BUCKETS))
    transfer_seconds_sum: float = 0.0
    num_transfer_observations: int = 0
    # Imported runs recomputed and compared (cache_service/peer_trust.py), those that failed, the peer
    # quarantines the failures started, and fetches that passed over a quarantined peer.
    num_verifications: int = 0
    num_verification_failures: int = 0
    num_quarantines: int = 0
    num_quarantine_skips: int = 0

    def observe_transfer(self, ok: bool, num_bytes: int, num_blocks: int, seconds: float) -> None:
        if ok:
            self.num_transfers_ok += 1
        else:
            self.num_transfers_fallback += 1
        self.num_transfer_bytes += num_bytes
        self.num_transferred_blocks += num_blocks
        self.transfer_seconds_sum += seconds
        self.num_transfer_observations += 1
        for i, bound in enumerate(self.transfer_bucket_bounds):
            if seconds <= bound:
                self.transfer_bucket_counts[i] += 1
                break

    def observe_verification(self, verified: bool, failed: bool, quarantined: bool, skipped: bool) -> None:
        """One fetch's trust figures: it verified its run (``failed``: the run did not match), its failure
        quarantined the peer, it passed over a quarantined peer."""
        self.num_verifications += verified
        self.num_verification_failures += failed
        self.num_quarantines += quarantined
        self.num_quarantine_skips += skipped

    def observe_events(self, events: list[BlockEvent]) -> None:
        for ev in events:
            if isinstance(ev, BlockStored):
                self.num_blocks_stored += 1
            elif isinstance(ev, BlockRemoved):
                self.num_blocks_evicted += 1


@dataclass(slots=True)
class WorkerInfo:
    worker_id: str
    node_id: str
    model_id: str
    device: str
    block_size: int
    num_blocks: int
    transfer_address: str


@dataclass(slots=True)
class WorkerPoll:
    """A worker's answer to the router's poll: load, counters, and the block events since the asked seq."""

    feed_epoch: str
    feed_seq: int
    events: list[BlockEvent]  # since the asked seq (empty when snapshot is given)
    # The whole held set, when the feed could not continue: one ``HeldBlock(hash, tier)`` per block the
    # worker holds in any tier, each at its fastest tier (DEVICE for every block of a worker without host or
    # disk tiers). A consumer that only tracks holders takes ``[h for h, _ in snapshot]``.
    snapshot: list[HeldBlock] | None
    # The engine loop's latest load; num_waiting_blocks also counts requests still being admitted.
    load: WorkerLoad = field(default_factory=WorkerLoad)
    counters: WorkerCounters = field(default_factory=WorkerCounters)
    pins: list[str] = field(default_factory=list)
    # Seconds since the engine loop last went round (it does at least every 0.5 s when idle): a hung
    # engine must leave rotation even though its actor still answers polls.
    engine_stalled_s: float = 0.0
    transfer_address: str = ""  # changes when Ray restarts the actor
