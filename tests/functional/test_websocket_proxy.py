"""WebSocket proxying in process (SPEC 6): message size limit on both sides, Host, refused
handshakes, and the upstream connection a socket holds.

The upstream here is a small app of this file's own that reports what it saw (the Host of the
handshake, every message received), so a test can tell what did or did not reach it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import aiohttp
import orjson
import pytest
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestServer

from tests.conftest import Db, SidecarFactory
from tests.servers import free_port

LIMIT = 1024
RECEIVED = web.AppKey("received", list[str | bytes])


async def ws(request: web.Request) -> web.WebSocketResponse:
    """Greets with the Host it saw; echoes; `send:N` makes it send N bytes."""
    sock = web.WebSocketResponse(max_msg_size=0)
    await sock.prepare(request)
    await sock.send_str("host:" + request.headers.get("Host", ""))
    async for msg in sock:
        if msg.type == WSMsgType.TEXT:
            request.app[RECEIVED].append(msg.data)
            if msg.data.startswith("send:"):
                await sock.send_bytes(b"u" * int(msg.data.removeprefix("send:")))
            else:
                await sock.send_str("echo:" + msg.data)
        elif msg.type == WSMsgType.BINARY:
            request.app[RECEIVED].append(msg.data)
            await sock.send_bytes(msg.data)
    return sock


async def refuse(request: web.Request) -> web.Response:
    code = int(request.match_info["code"])
    return web.Response(status=code, text="upstream says no",
                        headers={"WWW-Authenticate": 'Bearer realm="upstream"',
                                 "X-Upstream-Reason": "refused"})


@pytest.fixture
async def ws_upstream() -> AsyncIterator[TestServer]:
    app = web.Application()
    app[RECEIVED] = []
    app.router.add_get("/ws", ws)
    app.router.add_get("/refuse/{code}", refuse)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield server
    await server.close()



async def test_messages_over_the_limit_close_the_socket_either_way(
    make_sidecar: SidecarFactory, db: Db, ws_upstream: TestServer,
    http: aiohttp.ClientSession,
) -> None:
    token, _ = await db.add_token("app")
    auth = {"Authorization": f"Bearer {token}"}
    sc = await make_sidecar(upstream_url=str(ws_upstream.make_url("")),
                            websocket_max_message=LIMIT)
    received = ws_upstream.app[RECEIVED]

    # Client to upstream: at the limit passes, one byte over closes with 1009 and is dropped.
    async with http.ws_connect(sc.url("/ws"), headers=auth, max_msg_size=0) as sock:
        assert (await asyncio.wait_for(sock.receive_str(), 5)).startswith("host:")
        at_limit = "a" * (LIMIT - len("echo:"))
        await sock.send_str(at_limit)
        assert await asyncio.wait_for(sock.receive_str(), 5) == "echo:" + at_limit
        await sock.send_bytes(b"b" * LIMIT)
        assert await asyncio.wait_for(sock.receive_bytes(), 5) == b"b" * LIMIT
        await sock.send_bytes(b"c" * (LIMIT + 1))
        msg = await asyncio.wait_for(sock.receive(), 5)
        assert msg.type == WSMsgType.CLOSE
        assert msg.data == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
    await asyncio.sleep(0.1)
    assert received == [at_limit, b"b" * LIMIT]

    # Upstream to client: the same limit, the same close code.
    async with http.ws_connect(sc.url("/ws"), headers=auth, max_msg_size=0) as sock:
        await asyncio.wait_for(sock.receive_str(), 5)
        await sock.send_str(f"send:{LIMIT}")
        assert await asyncio.wait_for(sock.receive_bytes(), 5) == b"u" * LIMIT
        await sock.send_str(f"send:{LIMIT + 1}")
        msg = await asyncio.wait_for(sock.receive(), 5)
        assert msg.type == WSMsgType.CLOSE
        assert msg.data == aiohttp.WSCloseCode.MESSAGE_TOO_BIG


async def test_handshake_carries_the_clients_host_or_the_configured_one(
    make_sidecar: SidecarFactory, db: Db, ws_upstream: TestServer,
    http: aiohttp.ClientSession,
) -> None:
    token, _ = await db.add_token("app")
    headers = {"Authorization": f"Bearer {token}", "Host": "api.example:8443"}
    passthrough = await make_sidecar(upstream_url=str(ws_upstream.make_url("")))
    override = await make_sidecar(upstream_url=str(ws_upstream.make_url("")),
                                  upstream_host_header="internal.example")
    for sc, expected in ((passthrough, "api.example:8443"), (override, "internal.example")):
        async with http.ws_connect(sc.url("/ws"), headers=headers) as sock:
            assert await asyncio.wait_for(sock.receive_str(), 5) == "host:" + expected


@pytest.mark.parametrize("code", [400, 401, 403, 404, 429])
async def test_upstream_refusing_the_handshake_with_4xx_is_passed_through(
    make_sidecar: SidecarFactory, db: Db, ws_upstream: TestServer,
    http: aiohttp.ClientSession, code: int,
) -> None:
    token, _ = await db.add_token("app")
    sc = await make_sidecar(upstream_url=str(ws_upstream.make_url("")))
    with pytest.raises(aiohttp.WSServerHandshakeError) as exc:
        await http.ws_connect(sc.url(f"/refuse/{code}"),
                              headers={"Authorization": f"Bearer {token}"})
    assert exc.value.status == code
    assert exc.value.headers is not None
    assert exc.value.headers["X-Upstream-Reason"] == "refused"
    assert exc.value.headers["WWW-Authenticate"] == 'Bearer realm="upstream"'
    # The same refusal seen by a plain client, body included.
    async with http.get(sc.url(f"/refuse/{code}"),
                        headers={"Authorization": f"Bearer {token}", "Upgrade": "websocket",
                                 "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
                                 "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}) as r:
        assert r.status == code
        assert r.headers["Content-Type"].startswith("application/json")
        doc = orjson.loads(await r.read())
    assert doc["status"] == code
    assert doc["message"] == "Upstream refused the WebSocket handshake"


async def test_upstream_failing_the_handshake_is_502(
    make_sidecar: SidecarFactory, db: Db, ws_upstream: TestServer,
    http: aiohttp.ClientSession,
) -> None:
    token, _ = await db.add_token("app")
    auth = {"Authorization": f"Bearer {token}"}
    sc = await make_sidecar(upstream_url=str(ws_upstream.make_url("")))
    down = await make_sidecar(upstream_url=f"http://127.0.0.1:{free_port()}")
    for target, path in ((sc, "/refuse/500"), (sc, "/refuse/503"), (down, "/ws")):
        with pytest.raises(aiohttp.WSServerHandshakeError) as exc:
            await http.ws_connect(target.url(path), headers=auth)
        assert exc.value.status == 502


async def test_open_socket_holds_its_upstream_connection(
    make_sidecar: SidecarFactory, db: Db, ws_upstream: TestServer,
    http: aiohttp.ClientSession,
) -> None:
    token, _ = await db.add_token("app")
    auth = {"Authorization": f"Bearer {token}"}
    sc = await make_sidecar(upstream_url=str(ws_upstream.make_url("")),
                            upstream_max_connections=1, upstream_pool_timeout=0.2)
    async with http.ws_connect(sc.url("/ws"), headers=auth) as sock:
        await asyncio.wait_for(sock.receive_str(), 5)
        started = time.monotonic()
        async with asyncio.timeout(3):
            async with http.get(sc.url("/refuse/404"), headers=auth) as r:
                assert r.status == 504
            with pytest.raises(aiohttp.WSServerHandshakeError) as exc:
                await http.ws_connect(sc.url("/ws"), headers=auth)
        assert exc.value.status == 504
        assert time.monotonic() - started < 1.5
    await asyncio.sleep(0.1)  # the sidecar notices the close and lets the connection go
    async with http.get(sc.url("/refuse/404"), headers=auth) as r:
        assert r.status == 404
