"""The router's Prometheus metrics (names fixed by the metrics contract; Grafana queries them).

Two sources:
- what the router itself observes per request (requests, prefix-cache queries/hits in tokens,
  predicted vs realised hits, decision and lookup latency, TTFT, inter-token latency): ordinary
  prometheus_client metrics updated on the request path;
- what only the workers know (blocks stored/evicted, transfers, queue depth, running, free blocks,
  liveness, the engines' own hits by tier): read at scrape time from the registry's latest poll of each
  worker by a collector, so the numbers are never older than one poll and never double counted.

Hits by tier (``TIER_LABELS``): device (the worker's KV pool), host and disk (its lower tiers, loaded back)
and peer (pulled from another worker). Per request they come from its ``Usage`` (``usage_tier_tokens``),
per engine from its ``WorkerLoad`` (``load_tier_tokens``).

Each ``RouterMetrics`` has its own ``CollectorRegistry``: several stacks in one process (tests) never
collide.

Tenant labels are bounded (``TenantLabels``): each label value is a series per worker (17 for a histogram), so no client can grow /metrics by naming tenants; and with auth off a tenant's label
is a digest of its cache salt (``anonymous_tenant``), never the salt, which is that tenant's only
isolation then.
"""

from __future__ import annotations

import hashlib
import threading
from typing import TYPE_CHECKING, Any, Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from cache_service.records import Usage, WorkerLoad

if TYPE_CHECKING:
    from router.registry import WorkerRegistry

# The *_created series are not in the contract and double the scrape size.
disable_created_metrics()

PREFIX = "prefixcache"
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_FAST_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 0.1)
MAX_TENANT_LABEL_CHARS = 64
MAX_TENANT_LABELS = 64
OTHER_TENANT = "other"
# Chosen by the router, never by a client: always their own label, outside the bound.
FIXED_TENANT_LABELS = ("default", "unauthenticated")


def tenant_label(tenant: str) -> str:
    """A tenant name as a label value (before the bound: ``TenantLabels`` decides whether it is used)."""
    return (tenant or "default")[:MAX_TENANT_LABEL_CHARS]


NO_WORKER = "none"  # the worker label of requests refused before routing (stats leave it out)

TIER_LABELS = ("device", "host", "disk", "peer")
# The per-tier fields of the worker's records (the capacity issue's worker side adds them): of
# Usage.cached_tokens, those loaded back from host / disk; of WorkerLoad.prefix_hit_tokens, the same since
# the engine started. Read with getattr so that the router also serves workers that predate them: every
# local hit is then a device hit.
USAGE_TIER_FIELDS = ("host_cached_tokens", "disk_cached_tokens")
LOAD_TIER_FIELDS = ("prefix_host_hit_tokens", "prefix_disk_hit_tokens")


def usage_tier_tokens(usage: Usage) -> tuple[int, int, int, int]:
    """A served request's cached tokens by where they came from: (device, host, disk, peer)."""
    peer = max(usage.transferred_tokens, 0)
    host, disk = (max(int(getattr(usage, f, 0) or 0), 0) for f in USAGE_TIER_FIELDS)
    return max(usage.cached_tokens - peer - host - disk, 0), host, disk, peer


def load_tier_tokens(load: WorkerLoad) -> tuple[int, int, int]:
    """An engine's own prefix hits since it started, by the tier it found them in: (device, host, disk)."""
    host, disk = (max(int(getattr(load, f, 0) or 0), 0) for f in LOAD_TIER_FIELDS)
    return max(load.prefix_hit_tokens - host - disk, 0), host, disk


def anonymous_tenant(cache_salt: str) -> str:
    """The tenant of a request when auth is off: its cache salt is all that tells clients apart, and is
    what keeps them apart, so it may be a secret. ``salt-<12 hex>``: stable across restarts and routers
    (a series keeps its name), useless for naming the salt's blocks; the empty salt is "default"."""
    if not cache_salt:
        return "default"
    digest = hashlib.blake2b(cache_salt.encode("utf-8", "surrogatepass"), digest_size=6, person=b"prefixcache-ten")
    return f"salt-{digest.hexdigest()}"


class TenantLabels:
    """The tenant label values in use: the first ``max_labels`` tenants a worker served get their own,
    every other one counts under "other".

    Only a served request (its first token, or its completion: ``admit``) can take a label; a refused
    one (bad request, bad token, no worker) only reuses its tenant's label if it has one (``label``).
    With auth on the tenants are the token file's (bounded there); with auth off they are client salts'
    digests, and this bound is what keeps their number in check.
    """

    def __init__(self, max_labels: int = MAX_TENANT_LABELS) -> None:
        self.max_labels = max_labels
        self._admitted: set[str] = set()
        self._lock = threading.Lock()  # so that the bound holds whichever thread records

    def admit(self, tenant: str) -> str:
        t = tenant_label(tenant)
        if t in FIXED_TENANT_LABELS or t in self._admitted:
            return t
        with self._lock:
            if len(self._admitted) < self.max_labels:
                self._admitted.add(t)
                return t
        return OTHER_TENANT

    def label(self, tenant: str) -> str:
        t = tenant_label(tenant)
        return t if t in FIXED_TENANT_LABELS or t in self._admitted else OTHER_TENANT


class RouterMetrics:
    def __init__(self, max_tenant_labels: int = MAX_TENANT_LABELS) -> None:
        r = self.registry = CollectorRegistry()
        self.tenants = TenantLabels(max_tenant_labels)
        self.requests = Counter(f"{PREFIX}_requests", "Generation requests by outcome",
                                ["worker", "tenant", "status"], registry=r)
        self.queries_tokens = Counter(f"{PREFIX}_prefix_cache_queries_tokens",
                                      "Prompt tokens looked up in the prefix cache", ["worker", "tenant"], registry=r)
        self.hits_tokens = Counter(f"{PREFIX}_prefix_cache_hits_tokens",
                                   "Prompt tokens served from cache (usage.cached_tokens)", ["worker", "tenant"],
                                   registry=r)
        self.tier_hits_tokens = Counter(f"{PREFIX}_prefix_cache_tier_hits_tokens",
                                        "Prompt tokens served from cache by where they came from (device, host,"
                                        " disk, peer); they sum to the hits", ["worker", "tenant", "tier"],
                                        registry=r)
        self.predicted_tokens = Counter(f"{PREFIX}_router_predicted_cached_tokens",
                                        "Cached tokens the router predicted when it chose the worker", ["worker"],
                                        registry=r)
        self.realised_tokens = Counter(f"{PREFIX}_router_realised_cached_tokens",
                                       "Cached tokens the worker realised", ["worker"], registry=r)
        self.decision_seconds = Histogram(f"{PREFIX}_router_decision_seconds",
                                          "Routing decision: tokenize + hash + lookup + score",
                                          buckets=_FAST_BUCKETS, registry=r)
        self.index_lookups = Counter(f"{PREFIX}_index_lookups", "Block index lookups", ["source"], registry=r)
        self.index_lookup_seconds = Histogram(f"{PREFIX}_index_lookup_seconds", "Block index lookup latency",
                                              ["source"], buckets=_FAST_BUCKETS, registry=r)
        self.ttft = Histogram(f"{PREFIX}_ttft_seconds", "Time to first token, at the router",
                              ["worker", "tenant"], buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram(f"{PREFIX}_inter_token_latency_seconds", "Time between streamed tokens",
                             ["worker"], buckets=_LATENCY_BUCKETS, registry=r)
        self._http_server = None

    def attach_registry(self, workers: WorkerRegistry) -> None:
        self.registry.register(_WorkerCollector(lambda: workers.snapshot()))

    def record_first_token(self, worker: str, tenant: str, seconds: float) -> None:
        """A served request's time to first token (it gives its tenant a label, within the bound)."""
        self.ttft.labels(worker, self.tenants.admit(tenant)).observe(seconds)

    def record_finished(self, worker: str, tenant: str, prompt_tokens: int, cached_tokens: int,
                        predicted_tokens: int, usage: Usage | None = None) -> None:
        """A served request; with its ``usage``, its hits are also counted by tier (``usage_tier_tokens``)."""
        t = self.tenants.admit(tenant)
        self.requests.labels(worker, t, "ok").inc()
        self.queries_tokens.labels(worker, t).inc(prompt_tokens)
        self.hits_tokens.labels(worker, t).inc(cached_tokens)
        self.predicted_tokens.labels(worker).inc(predicted_tokens)
        self.realised_tokens.labels(worker).inc(cached_tokens)
        if usage is not None:
            for tier, n in zip(TIER_LABELS, usage_tier_tokens(usage)):
                if n:
                    self.tier_hits_tokens.labels(worker, t, tier).inc(n)

    def record_failed(self, worker: str | None, tenant: str, status: str) -> None:
        """``worker`` None: refused before any worker was chosen (counted under the label ``NO_WORKER``)."""
        self.requests.labels(worker if worker is not None else NO_WORKER, self.tenants.label(tenant), status).inc()

    # ---- HTTP ---------------------------------------------------------------
    def serve_http(self, port: int, host: str = "127.0.0.1") -> int:
        """Serve /metrics on ``port`` (0: any free port); returns the bound port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._http_server = server
        return int(server.server_address[1])

    def stop_http(self) -> None:
        server, self._http_server = self._http_server, None
        if server is not None:
            server.shutdown()
            server.server_close()


class _WorkerCollector:
    """Worker-side numbers, read from the registry's latest poll at scrape time."""

    def __init__(self, snapshot: Callable[[], Iterable]) -> None:
        self._snapshot = snapshot

    def collect(self):
        up = GaugeMetricFamily(f"{PREFIX}_worker_up", "1 live, 0 out of rotation", labels=["worker"])
        depth = GaugeMetricFamily(f"{PREFIX}_queue_depth", "Waiting requests", labels=["worker"])
        running = GaugeMetricFamily(f"{PREFIX}_running_requests", "Running requests", labels=["worker"])
        free = GaugeMetricFamily(f"{PREFIX}_kv_blocks_free", "Allocatable KV blocks", labels=["worker"])
        stored = CounterMetricFamily(f"{PREFIX}_blocks_stored", "KV blocks cached", labels=["worker"])
        evicted = CounterMetricFamily(f"{PREFIX}_blocks_evicted", "KV blocks evicted", labels=["worker"])
        transfers = CounterMetricFamily(f"{PREFIX}_transfers", "Block transfers by outcome",
                                        labels=["worker", "outcome"])
        tbytes = CounterMetricFamily(f"{PREFIX}_transfer_bytes", "Bytes pulled from peers", labels=["worker"])
        tsec = HistogramMetricFamily(f"{PREFIX}_transfer_seconds", "Block transfer latency", labels=["worker"])
        verified = CounterMetricFamily(f"{PREFIX}_block_verifications", "Imported runs recomputed and compared, "
                                       "by outcome", labels=["worker", "outcome"])
        quarantines = CounterMetricFamily(f"{PREFIX}_peer_quarantines",
                                          "Peers quarantined after a failed verification", labels=["worker"])
        skips = CounterMetricFamily(f"{PREFIX}_quarantine_skips",
                                    "Fetches that passed over a quarantined peer", labels=["worker"])
        tier_hits = CounterMetricFamily(f"{PREFIX}_worker_prefix_hits_tokens",
                                        "The engine's own prefix-cache hits in tokens, by the tier it found them in",
                                        labels=["worker", "tier"])
        for w in self._snapshot():
            wid = w.worker_id
            up.add_metric([wid], 1.0 if w.live else 0.0)
            depth.add_metric([wid], w.load.num_waiting)
            running.add_metric([wid], w.load.num_running)
            free.add_metric([wid], w.load.num_free_blocks)
            s = w.counters
            stored.add_metric([wid], s.num_blocks_stored)
            evicted.add_metric([wid], s.num_blocks_evicted)
            transfers.add_metric([wid, "ok"], s.num_transfers_ok)
            transfers.add_metric([wid, "fallback"], s.num_transfers_fallback)
            tbytes.add_metric([wid], s.num_transfer_bytes)
            cumulative = 0
            buckets = []
            for bound, count in zip(s.transfer_bucket_bounds, s.transfer_bucket_counts):
                cumulative += count
                buckets.append((repr(float(bound)), cumulative))
            buckets.append(("+Inf", s.num_transfers_ok + s.num_transfers_fallback))
            tsec.add_metric([wid], buckets, s.transfer_seconds_sum)
            verified.add_metric([wid, "ok"], s.num_verifications - s.num_verification_failures)
            verified.add_metric([wid, "failed"], s.num_verification_failures)
            quarantines.add_metric([wid], s.num_quarantines)
            skips.add_metric([wid], s.num_quarantine_skips)
            for tier, n in zip(TIER_LABELS, load_tier_tokens(w.load)):
                tier_hits.add_metric([wid, tier], n)
        yield from (up, depth, running, free, stored, evicted, transfers, tbytes, tsec, verified, quarantines, skips,
                    tier_hits)
