"""Prometheus metrics of one sidecar (its own registry, so several can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class LoaderMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.tier_bytes = Gauge("sllm_loader_tier_bytes", "Bytes held (reserved) in a tier", ["tier"], registry=r)
        self.tier_capacity = Gauge("sllm_loader_tier_capacity_bytes", "Byte budget of a tier", ["tier"], registry=r)
        self.tier_entries = Gauge("sllm_loader_tier_entries", "Checkpoints in a tier", ["tier"], registry=r)
        self.transfer_seconds = Histogram("sllm_loader_transfer_seconds", "Duration of a whole transfer",
                                          ["hop"], buckets=_DURATION_BUCKETS, registry=r)
        self.transfer_bytes = Counter("sllm_loader_transfer_bytes", "Bytes moved per hop", ["hop"], registry=r)
        self.hits = Counter("sllm_loader_hits", "Requests served from a tier", ["tier"], registry=r)
        self.misses = Counter("sllm_loader_misses", "Requests a tier could not serve", ["tier"], registry=r)
        self.joins = Counter("sllm_loader_joins", "Requests that joined a fill of the tier already under way",
                             ["tier"], registry=r)
        self.evictions = Counter("sllm_loader_evictions", "Checkpoints evicted", ["tier"], registry=r)
        self.failures = Counter("sllm_loader_failures", "Failed fetches and fills by error kind", ["kind"],
                                registry=r)
        self.retries = Counter("sllm_loader_retries", "Range requests retried after a transient failure",
                               ["store"], registry=r)
        self.fetches = Counter("sllm_loader_fetches", "Transfers started (one per checkpoint and hop)", ["hop"],
                               registry=r)
        self.leases = Gauge("sllm_loader_leases", "Leases held by instances", registry=r)
        # The NodeCache publisher (--kube-node): outcomes created, written, overwritten (a status
        # someone else wrote, rewritten), conflict (409, read again), node_missing, error.
        self.nodecache_publishes = Counter("sllm_loader_nodecache_publishes",
                                           "NodeCache writes and failed attempts, by outcome", ["outcome"],
                                           registry=r)
        self.nodecache_last_publish = Gauge("sllm_loader_nodecache_last_publish_timestamp_seconds",
                                            "Unix time of the last NodeCache status the API server accepted",
                                            registry=r)

    def nodecache_outcome(self, outcome: str) -> None:
        self.nodecache_publishes.labels(outcome).inc()
        if outcome in ("written", "overwritten"):
            self.nodecache_last_publish.set_to_current_time()

    def transfer(self, hop: str, nbytes: int, seconds: float) -> None:
        self.transfer_seconds.labels(hop).observe(seconds)
        self.transfer_bytes.labels(hop).inc(nbytes)
