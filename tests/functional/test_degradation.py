"""Degradation (SPEC 3.3): Postgres or Redis down, hanging or failing: stale answers within
STALE_IF_ERROR, 503 (never 401 or 500) otherwise, recovery without a restart."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import aiohttp
import asyncpg
import orjson

from sidecar.app import METRICS
from tests.conftest import SCHEMA, Db, SidecarFactory
from tests.helpers import sample, status, within
from tests.servers import PostgresServer, RedisServer


async def test_postgres_down_stale_if_error_then_recovery(
    make_sidecar: SidecarFactory, db: Db, upstream: Any, http: aiohttp.ClientSession,
    own_postgres: PostgresServer,
) -> None:
    conn = await asyncpg.connect(own_postgres.dsn)
    await conn.execute(SCHEMA)
    tokens = []
    for _ in range(3):
        t = "app-" + uuid.uuid4().hex
        await conn.execute("INSERT INTO api_tokens (type, token) VALUES ('app', $1)", t)
        tokens.append(t)
    await conn.close()
    common = {"upstream_url": str(upstream.make_url("")), "database_url": own_postgres.dsn,
              "cache_ttl": 1, "local_cache_ttl": 0.2, "database_timeout": 1}
    stale = await make_sidecar(**common)
    strict = await make_sidecar(**common, stale_if_error=0)
    for sc in (stale, strict):
        assert await status(http, sc, tokens[0]) == 200
    await asyncio.to_thread(own_postgres.stop)
    await asyncio.sleep(1.2)  # the cached entries are past their TTL now

    assert await status(http, stale, tokens[0]) == 200  # stale-if-error
    async with http.get(stale.url("/a"), headers={"Authorization": f"Bearer {tokens[1]}"}) as r:
        assert r.status == 503
        assert orjson.loads(await r.read()) == {
            "code": "auth_unavailable", "message": "Authentication is temporarily unavailable",
            "status": 503}
    assert await status(http, strict, tokens[0]) == 503  # fails closed
    metrics = stale.app[METRICS]
    assert metrics.cache_lookups.labels(tier="stale", result="stale")._value.get() >= 1
    async with http.get(stale.ops_url("/readyz")) as r:
        assert r.status == 200  # it can still answer for warm tokens
        assert orjson.loads(await r.read())["postgres"] == "down"

    await asyncio.to_thread(own_postgres.start)

    async def recovered() -> bool:
        results = [await status(http, sc, t) for sc in (stale, strict) for t in tokens]
        return results == [200] * len(results)

    await within(15.0, recovered)


async def test_redis_outage_under_load_uses_circuit_breaker(
    make_sidecar: SidecarFactory, db: Db, upstream: Any, http: aiohttp.ClientSession,
    own_redis: RedisServer,
) -> None:
    tokens = [(await db.add_token("app"))[0] for _ in range(20)]
    # L1 off: every request needs L2, so a Redis outage is felt by every request.
    sc = await make_sidecar(upstream_url=str(upstream.make_url("")), redis_url=own_redis.url,
                            local_cache_size=0)
    metrics = sc.app[METRICS]
    statuses: list[int] = []
    stop = asyncio.Event()

    async def load() -> None:
        i = 0
        while not stop.is_set():
            statuses.append(await status(http, sc, tokens[i % len(tokens)]))
            i += 1

    def redis_errors() -> float:
        return sum(s.value for f in metrics.registry.collect() if f.name == "sidecar_redis_errors"
                   for s in f.samples if s.name.endswith("_total"))

    workers = [asyncio.create_task(load()) for _ in range(4)]
    await asyncio.sleep(0.5)
    await asyncio.to_thread(own_redis.stop)
    outage_started = len(statuses)
    await asyncio.sleep(3.0)
    outage_requests = len(statuses) - outage_started
    errors_during_outage = redis_errors()
    assert metrics.redis_circuit_open._value.get() == 1
    await asyncio.to_thread(own_redis.start)

    async def redis_used_again() -> bool:
        return sample(metrics, "sidecar_redis_circuit_open") == 0

    await within(20.0, redis_used_again)
    stop.set()
    await asyncio.gather(*workers)
    assert statuses
    assert all(s == 200 for s in statuses), set(statuses)
    # Without a breaker every request would have failed against Redis; with it, only probes.
    assert outage_requests > 100
    assert errors_during_outage <= 12, (errors_during_outage, outage_requests)
    # The restarted Redis is empty: a request fills it and a later one is answered by it. Not
    # necessarily the very next one: a pooled connection opened before the restart fails once
    # when first used again (each failure is one Redis error, and the request is still 200).
    l2_hits = metrics.cache_lookups.labels(tier="l2", result="hit")
    hits_before = float(l2_hits._value.get())

    async def answered_by_redis() -> bool:
        assert await status(http, sc, tokens[0]) == 200
        return float(l2_hits._value.get()) > hits_before

    await within(5.0, answered_by_redis)


async def test_postgres_errors_other_than_connection_are_503_not_500(
    make_sidecar: SidecarFactory, db: Db, upstream: Any, http: aiohttp.ClientSession,
) -> None:
    sc = await make_sidecar(
        upstream_url=str(upstream.make_url("")),
        token_lookup_sql="SELECT id, tenant_id, app_id, type FROM no_such_table"
                         " WHERE token = $1 AND type = $2")
    async with http.get(sc.url("/a"), headers={"Authorization": "Bearer some-token"}) as r:
        assert r.status == 503
        assert orjson.loads(await r.read())["code"] == "auth_unavailable"
    metrics = sc.app[METRICS]
    assert metrics.requests.labels(outcome="unavailable", scope="app")._value.get() == 1
    assert metrics.requests.labels(outcome="allowed", scope="app")._value.get() == 0


async def test_hanging_postgres_costs_a_bounded_wait(
    make_sidecar: SidecarFactory, db: Db, upstream: Any, http: aiohttp.ClientSession,
    own_postgres: PostgresServer,
) -> None:
    conn = await asyncpg.connect(own_postgres.dsn)
    await conn.execute(SCHEMA)
    warm = "app-" + uuid.uuid4().hex
    await conn.execute("INSERT INTO api_tokens (type, token) VALUES ('app', $1)", warm)
    await conn.close()
    sc = await make_sidecar(upstream_url=str(upstream.make_url("")),
                            database_url=own_postgres.dsn, database_timeout=1,
                            database_pool_size=2, cache_ttl=1, local_cache_ttl=0.2)
    assert await status(http, sc, warm) == 200
    await asyncio.sleep(1.1)  # past the TTL: the next answer must come from Postgres or stale
    own_postgres.pause()
    try:
        started = time.monotonic()
        # More concurrent unseen tokens than pool connections: each waits at most ~timeout.
        results = await asyncio.gather(
            *(status(http, sc, f"unseen-{i}") for i in range(6)))
        elapsed = time.monotonic() - started
        assert results == [503] * 6
        assert elapsed < 2.5, elapsed
        assert await status(http, sc, warm) == 200  # stale-if-error, answered at once
        started = time.monotonic()
        async with http.get(sc.ops_url("/readyz")) as r:
            assert r.status == 200
            assert orjson.loads(await r.read())["postgres"] == "down"
        assert time.monotonic() - started < 2.0
    finally:
        own_postgres.resume()
