"""create_app(settings): the only place that wires the sidecar together.

Objects are built here synchronously; anything that opens a connection or starts a task does
so in a `cleanup_ctx` entry, one per resource, in dependency order, so tear-down runs in
reverse and only for what started (the last-used queue flushes before the pool closes).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from aiohttp import web
from prometheus_client import CollectorRegistry

from sidecar.auth import Authenticator
from sidecar.cache import LocalCache
from sidecar.decision import DECISION_ROUTE, make_decision_handler
from sidecar.gate import gate_middleware, not_found, proxy_handler
from sidecar.invalidation import Invalidator
from sidecar.last_used import DeferredPostgresWriter, LastUsedQueue
from sidecar.metrics import Metrics
from sidecar.ops import create_ops_app
from sidecar.proxy import Forwarder
from sidecar.ratelimit import RateLimiter
from sidecar.rediscache import PUBSUB_CHANNEL, RedisCache, connect
from sidecar.routing import Router
from sidecar.services import SERVICES, Services
from sidecar.settings import Settings
from sidecar.store import PostgresTokenStore
from sidecar.subscriptions import PostgresSubscription, RedisSubscriber

log = logging.getLogger("sidecar.app")

FINAL_FLUSH_TIMEOUT = 10.0

SUBSCRIPTIONS = web.AppKey("sidecar.subscriptions", list[PostgresSubscription | RedisSubscriber])

__all__ = ["build_services", "create_app", "create_ops_app"]


def build_services(settings: Settings, registry: CollectorRegistry | None = None) -> Services:
    metrics = Metrics(registry)
    store = PostgresTokenStore(
        settings.database_url.get_secret_value(),
        metrics=metrics,
        pool_size=settings.database_pool_size,
        timeout=settings.database_timeout,
        token_hash=settings.token_hash,
        lookup_sql=settings.token_lookup_sql,
    )
    redis = None
    if settings.redis_url is not None:
        redis = RedisCache(
            connect(settings.redis_url.get_secret_value(), settings.redis_timeout), metrics
        )
    authenticator = Authenticator(
        store,
        local=LocalCache(settings.local_cache_size, settings.local_cache_ttl),
        shared=redis,
        metrics=metrics,
        ttl=settings.cache_ttl,
        negative_ttl=settings.negative_cache_ttl,
        stale_if_error=settings.stale_if_error,
        hashed_storage=settings.token_hash == "sha256",
    )
    forwarder = None
    if settings.upstream_url:
        forwarder = Forwarder(
            settings.upstream_url,
            metrics=metrics,
            timeout=settings.upstream_timeout,
            connect_timeout=settings.upstream_connect_timeout,
            pool_timeout=settings.upstream_pool_timeout,
            max_connections=settings.upstream_max_connections,
            websocket_max_message=settings.websocket_max_message,
            hide_credentials=settings.hide_credentials,
            host_header=settings.upstream_host_header,
        )
    usage = LastUsedQueue(
        DeferredPostgresWriter(lambda: store.pool, table=settings.last_used_table,
                               min_age=settings.last_used_min_age, metrics=metrics),
        flush_interval=settings.last_used_flush_interval,
        max_pending=settings.last_used_max_pending,
        metrics=metrics,
    )
    invalidator = Invalidator(authenticator, redis, settings.scopes, metrics)
    limiter = RateLimiter(
        per_token=settings.rate_limit,
        per_tenant=settings.tenant_rate_limit,
        redis=redis,
        fail_open=settings.rate_limit_fail_open,
        metrics=metrics,
    )
    return Services(
        settings=settings,
        metrics=metrics,
        router=Router(settings.scope_routes, settings.public_routes),
        store=store,
        redis=redis,
        authenticator=authenticator,
        forwarder=forwarder,
        usage=usage,
        invalidator=invalidator,
        limiter=limiter,
    )


def create_app(settings: Settings, *, registry: CollectorRegistry | None = None) -> web.Application:
    svc = build_services(settings, registry)
    # client_max_size=0: bodies are streamed, never buffered, so no size cap applies here.
    app = web.Application(middlewares=[gate_middleware], client_max_size=0)
    app[SERVICES] = svc

    async def store_ctx(_: web.Application) -> AsyncIterator[None]:
        await svc.store.open()
        if await svc.store.ping():
            log.info("postgres reachable")
        else:
            log.warning("postgres not reachable yet; will keep trying on demand")
        yield
        await svc.store.close()

    async def redis_ctx(_: web.Application) -> AsyncIterator[None]:
        yield
        if svc.redis is not None:
            await svc.redis.client.aclose()

    async def forwarder_ctx(_: web.Application) -> AsyncIterator[None]:
        if svc.forwarder is not None:
            await svc.forwarder.start()
        yield
        if svc.forwarder is not None:
            await svc.forwarder.close()

    async def subscriptions_ctx(_: web.Application) -> AsyncIterator[None]:
        inv = svc.invalidator
        subs: list[PostgresSubscription | RedisSubscriber] = [PostgresSubscription(
            settings.database_url.get_secret_value(), settings.notify_channel,
            inv.on_notify, lambda: inv.on_reconnect("notify"),
        )]
        if svc.redis is not None:
            subs.append(RedisSubscriber(svc.redis.client, PUBSUB_CHANNEL, inv.on_pubsub,
                                        lambda: inv.on_reconnect("pubsub")))
        for sub in subs:
            sub.start()
        app[SUBSCRIPTIONS] = subs
        yield
        for sub in subs:
            await sub.close()

    async def usage_ctx(_: web.Application) -> AsyncIterator[None]:
        svc.usage.start()
        yield
        # In-flight requests already had the grace period; the final flush gets its own short
        # bound so that shutdown as a whole stays predictable for the orchestrator.
        await svc.usage.close(timeout=FINAL_FLUSH_TIMEOUT)

    app.cleanup_ctx.extend([store_ctx, redis_ctx, subscriptions_ctx, forwarder_ctx, usage_ctx])
    app.router.add_route("*", DECISION_ROUTE, make_decision_handler())
    app.router.add_route("*", "/{tail:.*}", proxy_handler if svc.forwarder else not_found,
                         expect_handler=Forwarder.defer_continue)
    return app
