"""Every Prometheus metric of the sidecar, on a registry passed in (no module globals).

Rules that hold here:
1. Label values come from small fixed sets (outcome, scope from the configured routes, tier,
   result, kind, status class). A token, a path or a tenant id is never a label value.
2. Every labelled series whose label values are known is created at start, at 0 (SPEC 10), so
   the first error shows in `rate()` and `increase()`; the sets are the ones below and the
   `Outcome` enum, and code that counts a new value adds it here.
3. No `*_created` series (SPEC 10): they double the series count and no dashboard or alert
   reads them. `prometheus_client.disable_created_metrics()` is process-wide; it is called
   where a registry is built, here.
4. `process_*` and `python_*` come from prometheus-client's own collectors. With
   `serve --workers N` (multiprocess mode) prometheus-client can only describe the process
   that answers the scrape: `process_*` is then that one worker's (memory, CPU, open fds),
   not the pod's. For memory against the pod limit use the container's own metric
   (`container_memory_working_set_bytes`) whenever there is more than one worker.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client import multiprocess as _multiprocess

from sidecar import __version__
from sidecar.outcomes import Outcome

# Auth decisions on the hot path are tens of microseconds; a store round trip is milliseconds.
_AUTH_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                 0.5, 1.0, 2.5, 5.0)
_UPSTREAM_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                     60.0, 120.0, 300.0)


# The known label values (rule 2). "none": the scope label of requests that need no scope
# (public routes, the decision endpoint's bad requests) or one no token has.
NO_SCOPE_LABEL = "none"
CACHE_RESULTS = (("l1", "hit"), ("l1", "miss"), ("l1", "negative"), ("l2", "hit"),
                 ("l2", "miss"), ("l2", "negative"), ("stale", "stale"))
POSTGRES_KINDS = ("lookup", "lookup_read", "last_used")
REDIS_OPS = ("get", "set", "delete", "delete_tenant", "delete_all", "lock", "unlock",
             "publish", "ratelimit", "last_used_handoff", "probe")
UPSTREAM_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx", "connect_error", "timeout")
INVALIDATION_SOURCES = ("notify", "pubsub", "admin", "notify_malformed", "pubsub_malformed",
                        "notify_reconnect", "pubsub_reconnect")
# The Postgres LISTEN always runs; the Redis subscriber's series is created with it (no Redis,
# no series: a 0 there would read as "disconnected").
LISTEN_SUBSCRIPTION = "postgres-listen"


class Metrics:
    def __init__(
        self, registry: CollectorRegistry | None = None, *, multiprocess_dir: str | None = None,
        scopes: frozenset[str] = frozenset(),
    ) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]  # rule 3
        self.registry = registry if registry is not None else CollectorRegistry()
        # Set with `serve --workers N`: /metrics then adds up every worker's files.
        self.multiprocess_dir = multiprocess_dir
        self._scrape_registry: CollectorRegistry | None = None
        # labels() takes a lock and builds a tuple each call; the hot path asks for the same
        # few children every request, so they are kept here (label sets are small and fixed).
        self._children: dict[tuple[str, ...], Any] = {}
        r = self.registry
        self.requests = Counter(
            "sidecar_requests", "Requests by outcome and required scope.",
            ["outcome", "scope"], registry=r,
        )
        self.in_flight = Gauge(
            "sidecar_in_flight_requests", "Requests being handled now.", registry=r,
            multiprocess_mode="livesum",
        )
        self.auth_latency = Histogram(
            "sidecar_auth_duration_seconds", "Time to decide allow/deny for a request.",
            ["outcome"], buckets=_AUTH_BUCKETS, registry=r,
        )
        self.cache_lookups = Counter(
            "sidecar_cache_lookups", "Cache lookups by tier (l1, l2) and result "
            "(hit, miss, negative, stale).", ["tier", "result"], registry=r,
        )
        self.singleflight_waits = Counter(
            "sidecar_singleflight_waits",
            "Lookups that waited for a lookup of the same token already in flight.",
            ["scope"], registry=r,
        )
        self.lock_timeouts = Counter(
            "sidecar_redis_lock_timeouts",
            "Cross-replica lookup locks not acquired within their wait.", registry=r,
        )
        self.postgres_queries = Counter(
            "sidecar_postgres_queries", "Postgres statements by kind.", ["kind"], registry=r
        )
        self.postgres_errors = Counter(
            "sidecar_postgres_errors", "Failed Postgres statements by kind.", ["kind"], registry=r
        )
        self.redis_errors = Counter(
            "sidecar_redis_errors", "Failed Redis operations by operation.", ["op"], registry=r
        )
        self.redis_circuit_open = Gauge(
            "sidecar_redis_circuit_open",
            "1 while Redis is considered down and only probed, else 0.", registry=r,
            multiprocess_mode="livemax",
        )
        self.upstream_responses = Counter(
            "sidecar_upstream_responses", "Upstream responses by status class (2xx..5xx) "
            "or error (connect_error, timeout).", ["status_class"], registry=r,
        )
        self.upstream_latency = Histogram(
            "sidecar_upstream_duration_seconds",
            "Time from sending the request upstream to receiving its response headers.",
            buckets=_UPSTREAM_BUCKETS, registry=r,
        )
        self.invalidations = Counter(
            "sidecar_invalidations", "Cache invalidations by source (notify, pubsub, admin).",
            ["source"], registry=r,
        )
        self.last_used_pending = Gauge(
            "sidecar_last_used_pending", "Token ids waiting for their last_used_at write.",
            registry=r, multiprocess_mode="livesum",
        )
        self.last_used_rows_flushed = Counter(
            "sidecar_last_used_rows_flushed", "Rows whose last_used_at was written.", registry=r
        )
        self.last_used_flush_duration = Histogram(
            "sidecar_last_used_flush_duration_seconds", "Duration of one last_used_at flush.",
            registry=r,
        )
        self.last_used_flush_errors = Counter(
            "sidecar_last_used_flush_errors", "Failed last_used_at flushes.", registry=r
        )
        self.last_used_dropped = Counter(
            "sidecar_last_used_dropped",
            "Token ids not recorded because the pending set was full.", registry=r,
        )
        self.last_used_lost = Counter(
            "sidecar_last_used_lost",
            "Token ids whose last_used_at could not be written at shutdown, nor handed to "
            "Redis for another sidecar.", registry=r,
        )

        self.build_info = Gauge(
            "sidecar_build_info", "Always 1; the label says which version runs.", ["version"],
            registry=r, multiprocess_mode="max",  # one series, however many workers
        )
        self.build_info.labels(version=__version__).set(1)
        self.subscription_connected = Gauge(
            "sidecar_subscription_connected",
            "1 while the subscription is connected, else 0: postgres-listen (invalidations by "
            "NOTIFY), redis-subscribe (invalidations by pub/sub).", ["subscription"],
            registry=r, multiprocess_mode="livemin",  # any worker disconnected shows as 0
        )
        if not multiprocess_dir:
            _add_runtime_collectors(r)  # rule 4; in multiprocess mode: exposition()

        self._create_known_series(scopes)

    def _create_known_series(self, scopes: frozenset[str]) -> None:
        """Rule 2. Through the same memo the hot path uses, so its children are ready too."""
        for outcome in Outcome:
            self.auth_timer(outcome)
            for scope in (*sorted(scopes), NO_SCOPE_LABEL):
                self.request_counter(outcome, scope)
        for scope in sorted(scopes):
            self.singleflight_waits.labels(scope=scope)
        for tier, result in CACHE_RESULTS:
            self.cache_lookups.labels(tier=tier, result=result)
        for kind in POSTGRES_KINDS:
            self.postgres_queries.labels(kind=kind)
            self.postgres_errors.labels(kind=kind)
        for op in REDIS_OPS:
            self.redis_errors.labels(op=op)
        for status_class in UPSTREAM_CLASSES:
            self.upstream_responses.labels(status_class=status_class)
        for source in INVALIDATION_SOURCES:
            self.invalidations.labels(source=source)
        self.subscription_connected.labels(subscription=LISTEN_SUBSCRIPTION)

        self.connections_refused = Counter(
            "sidecar_client_connections_refused",
            "Client connections closed at once: over SIDECAR_MAX_CLIENT_CONNECTIONS on the "
            "main listener, or the ops listener's fixed cap.", ["listener"], registry=self.registry,
        )
        self.token_filter_answers = Counter(
            "sidecar_token_filter_answers",
            "Tokens answered 401 by the unknown-token filter, without a Postgres query.",
            registry=self.registry,
        )
        self.token_filter_rebuilds = Counter(
            "sidecar_token_filter_rebuilds", "Builds of the unknown-token filter.",
            registry=self.registry,
        )
        self.token_filter_entries = Gauge(
            "sidecar_token_filter_entries", "Token digests in the unknown-token filter.",
            registry=self.registry, multiprocess_mode="livemax",
        )
        self.token_filter_bytes = Gauge(
            "sidecar_token_filter_bytes", "Memory of the unknown-token filter's bit array.",
            registry=self.registry, multiprocess_mode="livemax",
        )
        for listener in ("main", "ops"):
            self.connections_refused.labels(listener=listener)

    def request_counter(self, outcome: str, scope: str) -> Any:
        key = ("requests", outcome, scope)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self.requests.labels(outcome=outcome, scope=scope)
        return child

    def auth_timer(self, outcome: str) -> Any:
        key = ("auth", outcome)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self.auth_latency.labels(outcome=outcome)
        return child

    def exposition(self) -> bytes:
        """The text format: this process's registry, or with `serve --workers N` (Prometheus
        multiprocess mode) the sum over every worker's files."""
        path = self.multiprocess_dir
        if not path:
            return bytes(generate_latest(self.registry))
        if self._scrape_registry is None:
            # The collector reads the files at each scrape, so one registry serves them all.
            registry = CollectorRegistry()
            _multiprocess.MultiProcessCollector(  # type: ignore[no-untyped-call]
                registry, path=path)
            _add_runtime_collectors(registry)  # rule 4: this worker's only
            self._scrape_registry = registry
        return bytes(generate_latest(self._scrape_registry))


def _add_runtime_collectors(registry: CollectorRegistry) -> None:
    """`process_*` (memory, CPU, fds, start time), `python_info` and `python_gc_*`, from
    prometheus-client's own collectors (rule 4)."""
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)  # registers itself on CPython only
