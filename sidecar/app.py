"""create_app(settings): the only place that wires the sidecar together.

Objects are built here synchronously; anything that opens a connection or starts a task does
so in a `cleanup_ctx` entry, one per resource, in dependency order, so tear-down runs in
reverse and only for what started (the last-used queue flushes before the pool closes).

The few objects other code needs to reach afterwards (the ops app, tests) are kept on the
Application under typed keys; request handlers never read them there: their factories are
handed what they use.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry

from sidecar.auth import Authenticator, CachePolicy, LockPolicy
from sidecar.cache import LocalCache
from sidecar.decision import DECISION_ROUTE, make_decision_handler
from sidecar.gate import Gate, Handler, make_proxy_handler, not_found
from sidecar.invalidation import Invalidator
from sidecar.last_used import DeferredPostgresWriter, LastUsedQueue
from sidecar.last_used_handoff import RedisLastUsedHandoff
from sidecar.logs import AccessLog, access_logger_class
from sidecar.metrics import Metrics
from sidecar.ops import build_ops_app
from sidecar.proxy import Forwarder, UpstreamLimits
from sidecar.ratelimit import RateLimiter
from sidecar.readiness import Readiness
from sidecar.rediscache import PUBSUB_CHANNEL, RedisCache
from sidecar.redisclient import GuardedRedis, connect, topology_of
from sidecar.routing import Router
from sidecar.server import ConnectionLimits, SidecarRunner
from sidecar.settings import Settings, listen_dsn
from sidecar.store import PostgresTokenStore
from sidecar.subscriptions import PostgresSubscription, RedisSubscriber
from sidecar.token_filter import DEFAULT_FILTER_SQL, TokenFilter
from sidecar.workers import multiprocess_dir

log = logging.getLogger("sidecar.app")

FINAL_FLUSH_TIMEOUT = 10.0
# The name of the main listener's catch-all route: the upstream's API (or 404 without one).
UPSTREAM_ROUTE = "upstream"

METRICS = web.AppKey("sidecar.metrics", Metrics)
LAST_USED = web.AppKey("sidecar.last_used", LastUsedQueue)
# Only in proxy mode.
FORWARDER = web.AppKey("sidecar.forwarder", Forwarder)
OPS_APP = web.AppKey("sidecar.ops_app", web.Application)
DECISION_HANDLER: web.AppKey[Handler] = web.AppKey("sidecar.decision_handler")
STORE = web.AppKey("sidecar.store", PostgresTokenStore)
SUBSCRIPTIONS = web.AppKey("sidecar.subscriptions", list[PostgresSubscription | RedisSubscriber])

__all__ = ["FORWARDER", "LAST_USED", "METRICS", "create_app", "create_ops_app"]


def create_app(
    settings: Settings,
    *,
    registry: CollectorRegistry | None = None,
    lock: LockPolicy | None = None,
    clock: Callable[[], float] = time.time,
    worker: int = 0,
) -> web.Application:
    """The main Application; `lock` and `clock` are for tests (cross-replica lock pacing,
    the wall clock cache deadlines are read from). `worker`: this process's index under
    `serve --workers N`; worker 0 counts what every worker receives (a NOTIFY)."""
    metrics = Metrics(registry, multiprocess_dir=multiprocess_dir(), scopes=settings.scopes)
    read_url = settings.database_read_url
    store = PostgresTokenStore(
        settings.database_url.get_secret_value(),
        read_dsn=read_url.get_secret_value() if read_url is not None else None,
        metrics=metrics,
        pool_size=settings.database_pool_size,
        timeout=settings.database_timeout,
        statement_cache_size=settings.database_statement_cache_size,
        token_hash=settings.token_hash,
        lookup_sql=settings.token_lookup_sql,
    )
    guarded = None
    redis = None
    if settings.redis_enabled:
        topology = topology_of(settings)
        url = settings.redis_url.get_secret_value() if settings.redis_url is not None else None
        guarded = GuardedRedis(connect(url, settings.redis_timeout, topology), metrics,
                               secrets=topology.secrets)
        redis = RedisCache(guarded)
    token_filter = None
    if settings.token_filter and (settings.token_lookup_sql is None
                                  or settings.token_filter_sql is not None):
        token_filter = TokenFilter(settings.token_filter_sql or DEFAULT_FILTER_SQL,
                                   miss_budget=settings.token_filter_miss_budget,
                                   metrics=metrics, listening=lambda: False)
    authenticator = Authenticator(
        store,
        local=LocalCache(settings.local_cache_size, settings.local_cache_ttl),
        shared=redis,
        metrics=metrics,
        policy=CachePolicy(ttl=settings.cache_ttl, negative_ttl=settings.negative_cache_ttl,
                           stale_if_error=settings.stale_if_error),
        hashed_storage=settings.token_hash == "sha256",
        lock=lock,
        clock=clock,
        prefilter=token_filter.admits if token_filter is not None else None,
    )
    forwarder = None
    if settings.upstream_url:
        forwarder = Forwarder(
            settings.upstream_url,
            metrics=metrics,
            limits=UpstreamLimits(
                timeout=settings.upstream_timeout,
                connect_timeout=settings.upstream_connect_timeout,
                pool_timeout=settings.upstream_pool_timeout,
                max_connections=settings.upstream_max_connections,
                websocket_max_message=settings.websocket_max_message,
            ),
            hide_credentials=settings.hide_credentials,
            host_header=settings.upstream_host_header,
            lean=settings.upstream_client == "lean",
        )
    last_used = LastUsedQueue(
        DeferredPostgresWriter(lambda: store.pool, table=settings.last_used_table,
                               min_age=settings.last_used_min_age, metrics=metrics),
        flush_interval=settings.last_used_flush_interval,
        max_pending=settings.last_used_max_pending,
        metrics=metrics,
        handoff=RedisLastUsedHandoff(guarded) if guarded is not None else None,
    )
    invalidator = Invalidator(authenticator, redis, settings.scopes, metrics,
                              counts_broadcasts=worker == 0, on_change=store.changed)
    if guarded is not None:
        guarded.on_master_moved = invalidator.shared_lost
    rebuild = asyncio.Event()  # the token filter is rebuilt after a LISTEN gap

    async def on_notify(payloads: list[str]) -> None:
        if token_filter is not None:
            token_filter.note_payloads(payloads)
        await invalidator.on_notify(payloads)

    async def on_notify_reconnect() -> None:
        store.changed(None)  # changes may have been missed: the replica is not trusted yet
        if token_filter is not None:
            token_filter.forget()
            rebuild.set()
        await invalidator.on_reconnect("notify")

    async def self_test_notify(channel: str, payload: str) -> None:
        # Over the primary pool, not the LISTEN connection (sidecar.subscriptions rule 4).
        await store.pool.execute("SELECT pg_notify($1, $2)", channel, payload)

    listen = PostgresSubscription(
        listen_dsn(settings), settings.notify_channel, on_notify, on_notify_reconnect,
        timeout=settings.database_timeout, notify=self_test_notify, metrics=metrics)
    if store.fence is not None:
        store.fence.listening = listen.connected.is_set  # replica_fence rule 5
    limiter = RateLimiter(
        per_token=settings.rate_limit,
        per_tenant=settings.tenant_rate_limit,
        redis=guarded,
        fail_open=settings.rate_limit_fail_open,
        metrics=metrics,
    )
    gate = Gate(
        router=Router(settings.scope_routes, settings.public_routes),
        authenticator=authenticator,
        limiter=limiter,
        last_used=last_used,
        metrics=metrics,
        max_token_length=settings.max_token_length,
        trusted_proxies=settings.trusted_proxies,
    )

    # client_max_size=0: bodies are streamed, never buffered, so no size cap applies here.
    # No middleware and no on_response_prepare hook: each route's handler is wrapped in
    # `gate.handler`, which does their work in one call per request (sidecar.gate rule 6).
    app = web.Application(client_max_size=0)
    app[METRICS] = metrics
    app[LAST_USED] = last_used
    app[STORE] = store
    if forwarder is not None:
        app[FORWARDER] = forwarder
    app[OPS_APP] = build_ops_app(
        metrics=metrics,
        readiness=Readiness(store, redis, forwarder, listen=listen,
                            last_used=last_used if settings.last_used_table else None),
        invalidator=invalidator,
        admin_token=settings.admin_token,
    )

    async def store_ctx(_: web.Application) -> AsyncIterator[None]:
        await store.open()
        if await store.ping():
            log.info("postgres reachable")
        else:
            log.warning("postgres not reachable yet; will keep trying on demand")
        yield
        await store.close()

    async def redis_ctx(_: web.Application) -> AsyncIterator[None]:
        if guarded is not None:
            guarded.start()
        yield
        if guarded is not None:
            await guarded.aclose()

    async def forwarder_ctx(_: web.Application) -> AsyncIterator[None]:
        if forwarder is not None:
            await forwarder.start()
        yield
        if forwarder is not None:
            await forwarder.close()

    async def subscriptions_ctx(_: web.Application) -> AsyncIterator[None]:
        subs: list[PostgresSubscription | RedisSubscriber] = [listen]
        filter_task = None
        if token_filter is not None:
            # `connected`: LISTEN verified delivering by its self-test (subscriptions rule 4).
            token_filter.listening = listen.connected.is_set
            filter_task = asyncio.create_task(
                token_filter.keep_built(lambda: store.pool, listen.connected, rebuild),
                name="sidecar-token-filter")
        if guarded is not None:
            subs.append(RedisSubscriber(guarded, PUBSUB_CHANNEL, invalidator.on_pubsub,
                                        lambda: invalidator.on_reconnect("pubsub"),
                                        metrics=metrics))
        for sub in subs:
            sub.start()
        app[SUBSCRIPTIONS] = subs
        yield
        if filter_task is not None:
            filter_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await filter_task
        for sub in subs:
            await sub.close()

    async def last_used_ctx(_: web.Application) -> AsyncIterator[None]:
        last_used.start()
        yield
        # In-flight requests already had the grace period; the final flush gets its own short
        # bound so that shutdown as a whole stays predictable for the orchestrator.
        await last_used.close(timeout=FINAL_FLUSH_TIMEOUT)

    app.cleanup_ctx.extend([store_ctx, redis_ctx, subscriptions_ctx, forwarder_ctx,
                            last_used_ctx])
    decision = gate.handler(make_decision_handler(gate, trusted_peers_only=forwarder is not None))
    app[DECISION_HANDLER] = decision  # also the decision fast path's (sidecar.fastpath)
    app.router.add_route("*", DECISION_ROUTE, decision)
    app.router.add_route("*", "/{tail:.*}",
                         gate.handler(make_proxy_handler(gate, forwarder) if forwarder
                                      else not_found),
                         expect_handler=Forwarder.defer_continue, name=UPSTREAM_ROUTE)
    return app


def create_main_runner(app: web.Application, settings: Settings, access_log: AccessLog | None,
                       **kwargs: Any) -> SidecarRunner:
    """The runner of the main listener: the connection bounds of SPEC 15, the access log, and
    the decision fast path unless SIDECAR_DECISION_FAST_PATH is off."""
    limits = ConnectionLimits(
        header_timeout=settings.client_header_timeout,
        keepalive_timeout=settings.keepalive_timeout,
        body_timeout=settings.client_body_timeout,
        max_connections=settings.max_client_connections,
        max_header_bytes=settings.max_header_bytes, listener="main", metrics=app[METRICS])
    if access_log is None:
        kwargs["access_log"] = None
    else:
        kwargs["access_log_class"] = access_logger_class(access_log)
    return SidecarRunner(
        app, metrics=app[METRICS], limits=limits,
        fast_handler=app[DECISION_HANDLER] if settings.decision_fast_path else None,
        fast_access_log=access_log, **kwargs)


def create_ops_app(main: web.Application) -> web.Application:
    """The ops Application of `main` (built with it). Run it beside `main`, started after it:
    its handlers report on objects that `main`'s cleanup contexts open and close."""
    return main[OPS_APP]
