"""Every response of the main listener carries X-Request-Id (SPEC 13), however it was made:
a decision, an error the sidecar answers itself, a streamed upstream response, a WebSocket
handshake. The headers are stamped where each response is built (sidecar.gate rule 5)."""

from __future__ import annotations

from typing import Any

import aiohttp

from tests.conftest import Db, SidecarFactory

ID = "given-id-1"


async def test_every_kind_of_response_carries_the_request_id(
    make_sidecar: SidecarFactory, db: Db, upstream: Any, http: aiohttp.ClientSession
) -> None:
    token, _ = await db.add_token("app")
    sc = await make_sidecar(upstream_url=str(upstream.make_url("")))
    auth = {"Authorization": f"Bearer {token}", "X-Request-Id": ID}
    cases = [
        ("GET", "/hello", auth, 200),  # proxied
        ("GET", "/sse?count=2&interval=0", auth, 200),  # streamed, chunked
        ("GET", "/hello", {"X-Request-Id": ID}, 401),  # refused by the sidecar
        ("GET", "/_sidecar/auth/v1/x", auth, 200),  # decision (local peer: trusted)
        ("GET", "/_sidecar/auth", {"X-Request-Id": ID}, 400),  # undescribed decision
    ]
    for method, path, headers, status in cases:
        async with http.request(method, sc.url(path), headers=headers) as r:
            await r.read()
            assert r.status == status, path
            assert r.headers["X-Request-Id"] == ID, path
    async with http.get(sc.url("/hello")) as r:  # no id given: one is made
        assert r.status == 401
        assert len(r.headers["X-Request-Id"]) == 32
    async with http.ws_connect(sc.url("/ws"), headers=auth) as ws:
        assert ws._response.headers["X-Request-Id"] == ID
        await ws.close()
