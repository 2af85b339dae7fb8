"""The router's Prometheus metrics (names fixed by the metrics contract; Grafana queries them).

Two sources:
- what the router itself observes per request (requests, prefix-cache queries/hits in tokens,
  predicted vs realised hits, decision and lookup latency, TTFT, inter-token latency): ordinary
  prometheus_client metrics updated on the request path;
- what only the workers know (blocks stored/evicted, transfers, queue depth, running, free blocks,
  liveness): read at scrape time from the registry's latest poll of each worker by a collector, so
  the numbers are never older than one poll and never double counted.

Each ``RouterMetrics`` has its own ``CollectorRegistry``: several stacks in one process (tests) never
collide.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

if TYPE_CHECKING:
    from router.registry import WorkerRegistry

# The *_created series are not in the contract and double the scrape size.
disable_created_metrics()

PREFIX = "prefixcache"
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_FAST_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 0.1)
MAX_TENANT_LABEL_CHARS = 64


def tenant_label(tenant: str) -> str:
    return (tenant or "default")[:MAX_TENANT_LABEL_CHARS]


NO_WORKER = "none"  # the worker label of requests refused before routing (stats leave it out)


class RouterMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(f"{PREFIX}_requests", "Generation requests by outcome",
                                ["worker", "tenant", "status"], registry=r)
        self.queries_tokens = Counter(f"{PREFIX}_prefix_cache_queries_tokens",
                                      "Prompt tokens looked up in the prefix cache", ["worker", "tenant"], registry=r)
        self.hits_tokens = Counter(f"{PREFIX}_prefix_cache_hits_tokens",
                                   "Prompt tokens served from cache (usage.cached_tokens)", ["worker", "tenant"],
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

    def record_finished(self, worker: str, tenant: str, prompt_tokens: int, cached_tokens: int,
                        predicted_tokens: int) -> None:
        t = tenant_label(tenant)
        self.requests.labels(worker, t, "ok").inc()
        self.queries_tokens.labels(worker, t).inc(prompt_tokens)
        self.hits_tokens.labels(worker, t).inc(cached_tokens)
        self.predicted_tokens.labels(worker).inc(predicted_tokens)
        self.realised_tokens.labels(worker).inc(cached_tokens)

    def record_failed(self, worker: str | None, tenant: str, status: str) -> None:
        """``worker`` None: refused before any worker was chosen (counted under the label ``NO_WORKER``)."""
        self.requests.labels(worker if worker is not None else NO_WORKER, tenant_label(tenant), status).inc()

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
        yield from (up, depth, running, free, stored, evicted, transfers, tbytes, tsec)
