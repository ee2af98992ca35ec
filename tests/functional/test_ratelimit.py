"""Rate limits (SPEC 9) against real Redis, through the proxy and the decision endpoint."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import aiohttp
import orjson

from tests.conftest import Db, Sidecar, SidecarFactory
from tests.servers import RedisServer


async def get(http: aiohttp.ClientSession, sc: Sidecar, token: str,
              path: str = "/a") -> aiohttp.ClientResponse:
    async with http.get(sc.url(path), headers={"Authorization": f"Bearer {token}"}) as r:
        await r.read()
        return r



async def test_token_limit_with_headers_and_recovery(
    make_sidecar: SidecarFactory, db: Db, upstream: Any, http: aiohttp.ClientSession,
    redis_url: str,
) -> None:
    token, _ = await db.add_token("app")
    sc = await make_sidecar(upstream_url=str(upstream.make_url("")), redis_url=redis_url,
                            rate_limit="5/s")
    allowed = [await get(http, sc, token) for _ in range(5)]
    assert [r.status for r in allowed] == [200] * 5
    assert [r.headers["RateLimit-Remaining"] for r in allowed] == ["4", "3", "2", "1", "0"]
    assert allowed[0].headers["RateLimit-Limit"] == "5"
    async with http.get(sc.url("/a"), headers={"Authorization": f"Bearer {token}"}) as r:
        assert r.status == 429
        assert orjson.loads(await r.read()) == {
            "code": "too_many_requests", "message": "Too many requests", "status": 429}
        assert r.headers["Retry-After"] == "1"
        assert r.headers["RateLimit-Remaining"] == "0"
        assert int(r.headers["RateLimit-Reset"]) >= 1
    await asyncio.sleep(0.25)  # one emission interval (200 ms) later
    assert (await get(http, sc, token)).status == 200
    other, _ = await db.add_token("app")
    assert (await get(http, sc, other)).status == 200  # limits are per token


async def test_limit_is_shared_by_replicas_and_counts_tenants(
    make_sidecar: SidecarFactory, db: Db, upstream: Any, http: aiohttp.ClientSession,
    redis_url: str,
) -> None:
    tenant = str(uuid.uuid4())
    t1, _ = await db.add_token("app", tenant_id=tenant)
    t2, _ = await db.add_token("app", tenant_id=tenant)
    common = {"upstream_url": str(upstream.make_url("")), "redis_url": redis_url,
              "rate_limit": "6/m", "tenant_rate_limit": "8/m"}
    a, b = await make_sidecar(**common), await make_sidecar(**common)
    statuses = [(await get(http, a if i % 2 else b, t1)).status for i in range(7)]
    assert statuses == [200] * 6 + [429]  # one limit across both replicas
    statuses = [(await get(http, a, t2)).status for _ in range(3)]
    assert statuses == [200, 200, 429]  # the tenant's 8 are spent: 6 by t1, 2 by t2


async def test_redis_down_fails_open_per_process_or_closed(
    make_sidecar: SidecarFactory, db: Db, upstream: Any, http: aiohttp.ClientSession,
    own_redis: RedisServer,
) -> None:
    token, _ = await db.add_token("app")
    common = {"upstream_url": str(upstream.make_url("")), "redis_url": own_redis.url,
              "rate_limit": "3/m"}
    open_ = await make_sidecar(**common)
    closed = await make_sidecar(**common, rate_limit_fail_open=False)
    await asyncio.to_thread(own_redis.stop)
    # Fail open: limited per process, never an error.
    assert [(await get(http, open_, token)).status for _ in range(4)] == [200, 200, 200, 429]
    # Fail closed: nobody can say, so 503 (not 429, not 200).
    r = await get(http, closed, token)
    assert r.status == 503


async def test_decision_endpoint_answers_429_with_headers(
    make_sidecar: SidecarFactory, db: Db, http: aiohttp.ClientSession, redis_url: str,
) -> None:
    token, _ = await db.add_token("app")
    sc = await make_sidecar(redis_url=redis_url, rate_limit="2/m")
    headers = {"Authorization": f"Bearer {token}", "X-Original-URI": "/v1/chat"}
    statuses = []
    for _ in range(3):
        async with http.get(sc.url("/_sidecar/auth"), headers=headers) as r:
            statuses.append(r.status)
            last = r.headers
    assert statuses == [200, 200, 429]
    assert "Retry-After" in last
    assert last["RateLimit-Limit"] == "2"
    assert "X-Tenant-Id" not in last
    metrics_text = await (await http.get(sc.ops_url("/metrics"))).text()
    assert 'sidecar_requests_total{outcome="rate_limited",scope="app"} 1.0' in metrics_text
