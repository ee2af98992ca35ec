"""The authenticating reverse proxy end to end: real Postgres, Redis and upstream app."""

from __future__ import annotations

import asyncio
import hashlib
import time
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis

from tests.conftest import Db, SidecarFactory
from tests.helpers import exchange
from tests.servers import RedisServer, free_port
from tests.upstream import CALLS

TENANT = "11111111-2222-3333-4444-555555555555"
APP = "66666666-7777-8888-9999-000000000000"
MISSING = "Authorization header must be provided and start with 'Bearer'"
SCHEME = "Authorization scheme must be 'Bearer'"
INVALID = "Access token is invalid"
DIFY_ROUTES = "/v1/datasets=dataset,/v1/workspaces/current/models=dataset,/=app"


def headers_of(doc: dict[str, Any]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for k, v in doc["headers"]:
        out.setdefault(k.lower(), []).append(v)
    return out



async def test_valid_token_reaches_upstream_with_identity(
    make_sidecar: SidecarFactory, db: Db, upstream: Any, http: aiohttp.ClientSession
) -> None:
    token, row_id = await db.add_token("app", tenant_id=TENANT, app_id=APP)
    sc = await make_sidecar(upstream_url=str(upstream.make_url("")))
    body = b"\x00binary body \xff" * 1000
    async with http.put(
        sc.url("/v1/chat-messages?conversation_id=42&x=%20y"),
        data=body,
        headers={"Authorization": f"Bearer {token}", "X-Custom": "kept",
                 "Content-Type": "application/x-thing", "X-Request-Id": "req-123"},
    ) as r:
        assert r.status == 200
        assert r.headers["X-Upstream"] == "echo"
        assert r.headers["X-Request-Id"] == "req-123"
        doc = orjson.loads(await r.read())
    h = headers_of(doc)
    assert doc["method"] == "PUT"
    assert doc["path"] == "/v1/chat-messages"
    assert doc["query"] == "conversation_id=42&x=%20y"
    assert doc["body_size"] == len(body)
    assert doc["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert h["x-tenant-id"] == [TENANT]
    assert h["x-app-id"] == [APP]
    assert h["x-api-token-id"] == [row_id]
    assert h["x-api-token-scope"] == ["app"]
    assert h["x-custom"] == ["kept"]
    assert h["content-type"] == ["application/x-thing"]
    assert h["authorization"] == [f"Bearer {token}"]  # Dify-style upstreams check it too
    assert h["x-request-id"] == ["req-123"]
    assert h["x-forwarded-for"] == ["127.0.0.1"]
    assert h["x-forwarded-proto"] == ["http"]
    # Null tenant/app columns are injected as empty strings, never omitted.
    token2, _ = await db.add_token("app")
    async with http.get(sc.url("/x"), headers={"Authorization": f"bearer {token2}"}) as r:
        assert r.status == 200
        h2 = headers_of(orjson.loads(await r.read()))
    assert h2["x-tenant-id"] == [""]
    assert h2["x-app-id"] == [""]


async def test_hide_credentials_removes_authorization(
    make_sidecar: SidecarFactory, db: Db, upstream: Any, http: aiohttp.ClientSession
) -> None:
    token, _ = await db.add_token("app")
    sc = await make_sidecar(upstream_url=str(upstream.make_url("")), hide_credentials=True)
    async with http.get(sc.url("/a"), headers={"Authorization": f"Bearer {token}"}) as r:
        assert r.status == 200
        h = headers_of(orjson.loads(await r.read()))
    assert "authorization" not in h
    assert h["x-api-token-scope"] == ["app"]


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({}, MISSING),
        ({"Authorization": "Basic dXNlcjpwdw=="}, SCHEME),
        ({"Authorization": "Bearer"}, MISSING),
        ({"Authorization": "Bearer "}, MISSING),
        ({"Authorization": "Bearer a b"}, MISSING),
        ({"Authorization": "Bearer tok\ten"}, MISSING),
        ({"Authorization": "Bearer " + "x" * 600}, INVALID),
        ({"Authorization": "Bearer app-unknown-token"}, INVALID),
    ],
    ids=["missing", "basic", "bearer-only", "empty", "two-credentials", "tab",
         "too-long", "unknown"],
)
async def test_rejections_have_dify_body_and_never_reach_upstream(
    make_sidecar: SidecarFactory, db: Db, upstream: Any, http: aiohttp.ClientSession,
    headers: dict[str, str], message: str,
) -> None:
    sc = await make_sidecar(upstream_url=str(upstream.make_url("")))
    async with http.post(sc.url("/v1/chat-messages"), headers=headers, data=b"x") as r:
        assert r.status == 401
        assert r.headers["WWW-Authenticate"] == 'Bearer realm="api"'
        assert r.headers["Content-Type"].startswith("application/json")
        assert orjson.loads(await r.read()) == {
            "code": "unauthorized", "message": message, "status": 401}
    assert upstream.app[CALLS] == []


@pytest.mark.parametrize("target", [b"/v1/datasets#x", b"/v1/datasets#/../x", b"/v1/a#b?c=d"])
async def test_fragment_in_target_is_refused_before_it_can_change_the_scope(
    make_sidecar: SidecarFactory, db: Db, upstream: Any, target: bytes
) -> None:
    # An app token on `/v1/datasets#x`: matched as an app path, but any client library
    # forwarding it would send `/v1/datasets` (a dataset route). It must never be forwarded.
    token, _ = await db.add_token("app")
    sc = await make_sidecar(upstream_url=str(upstream.make_url("")), scope_routes=DIFY_ROUTES)
    resp = await exchange(sc.main.port, [
        b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Authorization: Bearer " + token.encode() + b"\r\n\r\n",
    ])
    status, body = resp.status, resp.body
    assert status == 400
    assert orjson.loads(body)["code"] == "bad_request"
    assert upstream.app[CALLS] == []


async def test_upstream_base_path_is_kept(
    make_sidecar: SidecarFactory, db: Db, upstream: Any, http: aiohttp.ClientSession
) -> None:
    token, _ = await db.add_token("app")
    sc = await make_sidecar(upstream_url=str(upstream.make_url("/base")))
    async with http.get(sc.url("/v1/x%20y?q=%23"),
                        headers={"Authorization": f"Bearer {token}"}) as r:
        doc = orjson.loads(await r.read())
    assert doc["raw_path"] == "/base/v1/x%20y?q=%23"


@pytest.mark.parametrize("char", [b"\x01", b"\x7f", b"\x1b"])
async def test_control_characters_in_token_are_refused(
    make_sidecar: SidecarFactory, db: Db, upstream: Any, char: bytes
) -> None:
    sc = await make_sidecar(upstream_url=str(upstream.make_url("")))
    resp = await exchange(sc.main.port, [
        b"GET /a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Authorization: Bearer tok" + char + b"en\r\n\r\n",
    ])
    status, body = resp.status, resp.body
    assert status in (400, 401)  # the HTTP parser itself may refuse it first
    if status == 401:
        assert orjson.loads(body)["message"] == MISSING
    assert upstream.app[CALLS] == []


async def test_two_authorization_headers_and_wrong_scope_are_refused(
    make_sidecar: SidecarFactory, db: Db, upstream: Any, http: aiohttp.ClientSession
) -> None:
    app_token, _ = await db.add_token("app")
    ds_token, _ = await db.add_token("dataset")
    sc = await make_sidecar(upstream_url=str(upstream.make_url("")), scope_routes=DIFY_ROUTES)
    two = [("Authorization", f"Bearer {app_token}"), ("Authorization", f"Bearer {app_token}")]
    async with http.get(sc.url("/v1/chat-messages"), headers=two) as r:
        assert r.status == 401
        assert orjson.loads(await r.read())["message"] == MISSING
    # A dataset token on an app route, and an app token on a dataset route: "invalid", as if
    # unknown, so a caller cannot probe which scope a token has.
    for token, path in ((ds_token, "/v1/chat-messages"), (app_token, "/v1/datasets/1/documents")):
        async with http.get(sc.url(path), headers={"Authorization": f"Bearer {token}"}) as r:
            assert r.status == 401
            assert orjson.loads(await r.read())["message"] == INVALID
    assert upstream.app[CALLS] == []
    async with http.get(sc.url("/v1/datasets/1/documents"),
                        headers={"Authorization": f"Bearer {ds_token}"}) as r:
        assert r.status == 200
    async with http.get(sc.url("/v1//datasets/./1"),
                        headers={"Authorization": f"Bearer {ds_token}"}) as r:
        assert r.status == 200
        assert orjson.loads(await r.read())["path"] == "/v1/datasets/1"


@pytest.mark.parametrize("spelling", ["X-Tenant-Id", "x-tenant-id", "X_Tenant_Id", "X-TENANT-ID"])
async def test_client_identity_headers_never_reach_upstream(
    make_sidecar: SidecarFactory, db: Db, upstream: Any, http: aiohttp.ClientSession,
    spelling: str,
) -> None:
    token, _ = await db.add_token("app", tenant_id=TENANT)
    sc = await make_sidecar(upstream_url=str(upstream.make_url("")), public_routes="/public")
    evil = {spelling: "evil", "X-App-Id": "evil", "X_Api_Token_Id": "evil",
            "x-api-token-scope": "evil"}
    # valid token
    async with http.get(sc.url("/v1/x"), headers={**evil, "Authorization": f"Bearer {token}"}) as r:
        assert r.status == 200
        doc = orjson.loads(await r.read())
    assert "evil" not in str(doc["headers"])
    assert headers_of(doc)["x-tenant-id"] == [TENANT]
    # public route: no identity headers at all
    async with http.get(sc.url("/public/info"), headers=evil) as r:
        assert r.status == 200
        doc = orjson.loads(await r.read())
    assert "evil" not in str(doc["headers"])
    assert "x-tenant-id" not in headers_of(doc)
    # denied request: never forwarded
    calls = len(upstream.app[CALLS])
    async with http.get(sc.url("/v1/x"), headers={**evil, "Authorization": "Bearer nope"}) as r:
        assert r.status == 401
    assert len(upstream.app[CALLS]) == calls


async def test_forwarded_headers_from_untrusted_peer_are_replaced(
    make_sidecar: SidecarFactory, db: Db, upstream: Any, http: aiohttp.ClientSession
) -> None:
    token, _ = await db.add_token("app")
    auth = {"Authorization": f"Bearer {token}"}
    spoof = {"X-Forwarded-For": "6.6.6.6", "X-Forwarded-Host": "evil.example",
             "X-Forwarded-Proto": "https", "X-Real-IP": "6.6.6.6"}
    untrusted = await make_sidecar(upstream_url=str(upstream.make_url("")),
                                   trusted_proxies="10.255.255.254/32")
    async with http.get(untrusted.url("/a"), headers={**auth, **spoof}) as r:
        h = headers_of(orjson.loads(await r.read()))
    assert h["x-forwarded-for"] == ["127.0.0.1"]
    assert h["x-forwarded-proto"] == ["http"]
    assert "evil.example" not in str(h)
    assert "x-real-ip" not in h
    trusted = await make_sidecar(upstream_url=str(upstream.make_url("")))
    async with http.get(trusted.url("/a"), headers={**auth, **spoof}) as r:
        h = headers_of(orjson.loads(await r.read()))
    assert h["x-forwarded-for"] == ["6.6.6.6, 127.0.0.1"]
    assert h["x-forwarded-host"] == ["evil.example"]
    assert h["x-forwarded-proto"] == ["https"]


async def test_cache_tiers_spare_postgres_and_never_store_raw_token(
    make_sidecar: SidecarFactory, db: Db, upstream: Any, http: aiohttp.ClientSession,
    redis_url: str, redis_client: aioredis.Redis,
) -> None:
    token, _ = await db.add_token("app", tenant_id=TENANT)
    # L1 off, so the second request must be answered by Redis, not by the process.
    sc = await make_sidecar(upstream_url=str(upstream.make_url("")), redis_url=redis_url,
                            local_cache_size=0)
    for _ in range(2):
        async with http.get(sc.url("/a"), headers={"Authorization": f"Bearer {token}"}) as r:
            assert r.status == 200
    assert await db.lookup_count() == 1
    unknown = "app-does-not-exist-0123456789"
    for _ in range(2):
        async with http.get(sc.url("/a"), headers={"Authorization": f"Bearer {unknown}"}) as r:
            assert r.status == 401
    assert await db.lookup_count() == 2
    # A second replica sharing Redis needs no lookup either.
    other = await make_sidecar(upstream_url=str(upstream.make_url("")), redis_url=redis_url)
    async with http.get(other.url("/a"), headers={"Authorization": f"Bearer {token}"}) as r:
        assert r.status == 200
    assert await db.lookup_count() == 2

    keys = [k.decode() if isinstance(k, bytes) else k for k in await redis_client.keys("*")]
    assert keys, "nothing was cached in Redis"
    digest = hashlib.sha256(token.encode()).hexdigest()
    assert f"sidecar:tok:{digest}:app" in keys
    ttl_pos = await redis_client.ttl(f"sidecar:tok:{digest}:app")
    ttl_neg = await redis_client.ttl(
        f"sidecar:tok:{hashlib.sha256(unknown.encode()).hexdigest()}:app")
    assert 600 < ttl_pos <= 600 + 300  # fresh TTL plus the stale-if-error window
    assert 0 < ttl_neg <= 60
    for key in keys:
        value = await redis_client.type(key)
        dump = await redis_client.get(key) if value == b"string" else b""
        assert token not in key
        assert unknown not in key
        assert token.encode() not in (dump or b"")
        assert unknown.encode() not in (dump or b"")


async def test_local_cache_answers_without_postgres_or_redis(
    make_sidecar: SidecarFactory, db: Db, upstream: Any, http: aiohttp.ClientSession
) -> None:
    token, _ = await db.add_token("app")
    sc = await make_sidecar(upstream_url=str(upstream.make_url("")))
    for _ in range(20):
        async with http.get(sc.url("/a"), headers={"Authorization": f"Bearer {token}"}) as r:
            assert r.status == 200
    assert await db.lookup_count() == 1


async def test_upstream_down_gives_502_fast(
    make_sidecar: SidecarFactory, db: Db, http: aiohttp.ClientSession
) -> None:
    token, _ = await db.add_token("app")
    sc = await make_sidecar(upstream_url=f"http://127.0.0.1:{free_port()}")
    started = time.monotonic()
    async with http.get(sc.url("/a"), headers={"Authorization": f"Bearer {token}"}) as r:
        assert r.status == 502
        assert orjson.loads(await r.read())["code"] == "bad_gateway"
        assert r.headers["Content-Type"].startswith("application/json")
    assert time.monotonic() - started < 1.0


async def test_slow_upstream_gives_504(
    make_sidecar: SidecarFactory, db: Db, upstream: Any, http: aiohttp.ClientSession
) -> None:
    token, _ = await db.add_token("app")
    sc = await make_sidecar(upstream_url=str(upstream.make_url("")), upstream_timeout=0.5)
    started = time.monotonic()
    async with http.get(sc.url("/slow?delay=3"),
                        headers={"Authorization": f"Bearer {token}"}) as r:
        assert r.status == 504
        assert orjson.loads(await r.read()) == {
            "code": "gateway_timeout", "message": "Upstream service did not respond in time",
            "status": 504}
    assert time.monotonic() - started < 2.5


async def test_redis_stopped_while_running_still_serves_from_postgres(
    make_sidecar: SidecarFactory, db: Db, upstream: Any, http: aiohttp.ClientSession,
    own_redis: RedisServer,
) -> None:
    tokens = [(await db.add_token("app"))[0] for _ in range(5)]
    sc = await make_sidecar(upstream_url=str(upstream.make_url("")), redis_url=own_redis.url,
                            local_cache_ttl=0.2)
    async with http.get(sc.url("/a"), headers={"Authorization": f"Bearer {tokens[0]}"}) as r:
        assert r.status == 200
    await asyncio.to_thread(own_redis.stop)
    await asyncio.sleep(0.3)  # let the L1 entry expire: Redis must be asked (and fail)
    statuses = []
    for _ in range(3):
        for token in tokens:
            async with http.get(sc.url("/a"),
                                headers={"Authorization": f"Bearer {token}"}) as r:
                statuses.append(r.status)
    assert statuses == [200] * len(statuses)
    async with http.get(sc.url("/a"), headers={"Authorization": "Bearer unknown-x"}) as r:
        assert r.status == 401
    async with http.get(sc.ops_url("/metrics")) as r:
        text = await r.text()
    assert 'sidecar_redis_errors_total{op="get"}' in text
    async with http.get(sc.ops_url("/readyz")) as r:
        doc = orjson.loads(await r.read())
        assert r.status == 200
    assert doc["redis"] == "down"
    assert doc["postgres"] == "ok"
    assert doc["status"] == "degraded"


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One response off a kept-open connection: (status, headers, body by Content-Length)."""
    status_line = await asyncio.wait_for(reader.readline(), 5)
    headers: dict[str, str] = {}
    while (line := await asyncio.wait_for(reader.readline(), 5)) != b"\r\n":
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    body = await asyncio.wait_for(reader.readexactly(int(headers.get("content-length", "0"))), 5)
    return int(status_line.split()[1]), headers, body


def expect_request(path: str, body: bytes, authorization: str | None) -> bytes:
    auth = b"Authorization: " + authorization.encode() + b"\r\n" if authorization else b""
    return (b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
            b"Content-Type: application/octet-stream\r\nContent-Length: %d\r\n" % len(body)
            + auth + b"\r\n")


@pytest.mark.parametrize("authorization", [None, "Basic dXNlcjpwdw==", "Bearer", "Bearer unknown"],
                         ids=["missing", "basic", "malformed", "unknown"])
async def test_expect_continue_is_not_sent_to_refused_requests(
    make_sidecar: SidecarFactory, db: Db, upstream: Any, authorization: str | None
) -> None:
    sc = await make_sidecar(upstream_url=str(upstream.make_url("")))
    reader, writer = await asyncio.open_connection("127.0.0.1", sc.main.port)
    try:
        writer.write(expect_request("/upload", b"body", authorization))
        await writer.drain()
        # The final answer comes without a "100 Continue" first: the body is never invited.
        status, headers, body = await read_response(reader)
    finally:
        writer.close()
    assert status == 401
    assert headers["www-authenticate"] == 'Bearer realm="api"'
    assert orjson.loads(body)["code"] == "unauthorized"
    assert upstream.app[CALLS] == []


async def test_expect_continue_is_sent_once_the_request_is_allowed(
    make_sidecar: SidecarFactory, db: Db, upstream: Any
) -> None:
    token, _ = await db.add_token("app")
    sc = await make_sidecar(upstream_url=str(upstream.make_url("")), public_routes="/public")
    payload = b"uploaded only after 100 Continue"
    for path, authorization in (("/upload", f"Bearer {token}"), ("/public/upload", None)):
        reader, writer = await asyncio.open_connection("127.0.0.1", sc.main.port)
        try:
            writer.write(expect_request(path, payload, authorization))
            await writer.drain()
            assert await asyncio.wait_for(reader.readline(), 5) == b"HTTP/1.1 100 Continue\r\n"
            assert await asyncio.wait_for(reader.readline(), 5) == b"\r\n"
            writer.write(payload)
            await writer.drain()
            status, _, body = await read_response(reader)
        finally:
            writer.close()
        assert status == 200
        doc = orjson.loads(body)
        assert doc["path"] == path
        assert doc["body_sha256"] == hashlib.sha256(payload).hexdigest()


async def test_unknown_expectation_is_refused(
    make_sidecar: SidecarFactory, db: Db, upstream: Any
) -> None:
    token, _ = await db.add_token("app")
    sc = await make_sidecar(upstream_url=str(upstream.make_url("")))
    resp = await exchange(sc.main.port, [
        b"POST /a HTTP/1.1\r\nHost: x\r\nConnection: close\r\nExpect: something-else\r\n"
        b"Content-Length: 0\r\nAuthorization: Bearer " + token.encode() + b"\r\n\r\n",
    ])
    status, body = resp.status, resp.body
    assert status == 417
    assert orjson.loads(body)["code"] == "expectation_failed"
    assert upstream.app[CALLS] == []


async def test_full_upstream_pool_answers_504_in_bounded_time(
    make_sidecar: SidecarFactory, db: Db, upstream: Any, http: aiohttp.ClientSession
) -> None:
    token, _ = await db.add_token("app")
    auth = {"Authorization": f"Bearer {token}"}
    sc = await make_sidecar(upstream_url=str(upstream.make_url("")), upstream_max_connections=1,
                            upstream_pool_timeout=0.3)

    async def get(path: str) -> tuple[int, bytes]:
        async with http.get(sc.url(path), headers=auth) as r:
            return r.status, await r.read()

    # A long request holds the only upstream connection.
    slow = asyncio.ensure_future(get("/slow?delay=1.5"))
    await asyncio.sleep(0.3)
    started = time.monotonic()
    status, body = await asyncio.wait_for(get("/a"), 3)
    assert time.monotonic() - started < 1.0
    assert status == 504
    assert orjson.loads(body)["code"] == "gateway_timeout"
    assert await asyncio.wait_for(slow, 5) == (200, b"late")
    # The connection went back to the pool: the next request is served.
    status, _ = await get("/a")
    assert status == 200
    async with http.get(sc.ops_url("/metrics")) as r:
        assert 'sidecar_upstream_responses_total{status_class="timeout"} 1.0' in await r.text()


async def test_absolute_form_target_is_judged_and_forwarded_on_its_path(
    make_sidecar: SidecarFactory, db: Db, upstream: Any
) -> None:
    # RFC 9112 3.2.2: `GET http://host/v1/datasets/x` is the request `GET /v1/datasets/x`,
    # so it needs the dataset scope, and the upstream sees that path (the access log names it).
    dataset, _ = await db.add_token("dataset")
    app_token, _ = await db.add_token("app")
    sc = await make_sidecar(upstream_url=str(upstream.make_url("")), scope_routes=DIFY_ROUTES)

    def request(token: str, target: bytes) -> list[bytes]:
        return [b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                b"Authorization: Bearer " + token.encode() + b"\r\n\r\n"]

    resp = await exchange(sc.main.port, request(dataset, b"http://x/v1/datasets/x?a=1"))
    assert resp.status == 200
    assert resp.json()["raw_path"] == "/v1/datasets/x?a=1"
    resp = await exchange(sc.main.port, request(app_token, b"http://x/v1/datasets/x"))
    assert resp.status == 401
    resp = await exchange(sc.main.port, request(dataset, b"ftp://x/v1/datasets/x"))
    assert resp.status == 400
    assert upstream.app[CALLS] == ["/v1/datasets/x"]
