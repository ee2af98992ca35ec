"""A client that goes away mid-request (SPEC 15, issue 9 acceptance 9): counted as
`client_closed`, never as a 500 or an upstream failure, in the metrics and the access log."""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import web

from sidecar.app import METRICS, create_app
from sidecar.settings import load_settings
from tests.conftest import Db
from tests.helpers import sample, within
from tests.servers import free_port


async def reset_after(port: int | None, request: bytes, read: int) -> None:
    """Send `request`, read `read` bytes of the answer (0: none), then reset (RST)."""
    assert port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    if read:
        await asyncio.wait_for(reader.readexactly(read), 10)
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.close()


def outcomes(sc: Served) -> dict[str, float]:
    m = sc.app[METRICS]
    return {o: sample(m, "sidecar_requests_total", {"outcome": o, "scope": "app"})
            for o in ("allowed", "client_closed", "error")}


async def settled(sc: Served) -> None:
    async def idle() -> bool:
        return sample(sc.app[METRICS], "sidecar_in_flight_requests") == 0
    await within(10.0, idle)


@dataclass
class Served:
    app: web.Application
    port: int


@pytest.fixture
async def serve(db: Db) -> AsyncIterator[Callable[..., Awaitable[Served]]]:
    """The app on a runner of our own: `sidecar serve` leaves handlers running when a client
    is lost (aiohttp's default), aiohttp's TestServer cancels them; both are tested."""
    runners: list[web.AppRunner] = []

    async def start(*, cancel: bool, **overrides: Any) -> Served:
        app = create_app(load_settings(database_url=db.dsn, **overrides))
        runner = web.AppRunner(app, handler_cancellation=cancel)
        await runner.setup()
        runners.append(runner)
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        return Served(app, port)

    yield start
    for runner in runners:
        await runner.cleanup()


@pytest.mark.parametrize("cancel", [False, True], ids=["serve", "cancelling-runner"])
@pytest.mark.parametrize("case", ["reset while streaming the answer", "reset mid-upload"])
async def test_client_reset_is_client_closed_not_500(
    serve: Callable[..., Awaitable[Served]], db: Db, upstream: Any, case: str, cancel: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    token, _ = await db.add_token("app")
    sc = await serve(cancel=cancel, upstream_url=str(upstream.make_url("")))
    auth = b"Authorization: Bearer " + token.encode() + b"\r\n"
    if case == "reset while streaming the answer":
        request = (b"GET /sse?count=200&interval=0.02 HTTP/1.1\r\nHost: x\r\n" + auth + b"\r\n")
        read = 64  # the status line and some headers: the answer has started
    else:
        request = (b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n" + auth
                   + b"\r\n" + b"x" * 65536)
        read = 0
    with caplog.at_level(logging.WARNING):
        await reset_after(sc.port, request, read)
        await settled(sc)

        async def counted() -> bool:
            return outcomes(sc)["client_closed"] == 1
        await within(10.0, counted)
    assert outcomes(sc)["error"] == 0
    assert outcomes(sc)["allowed"] == 0
    assert not [r for r in caplog.records if "unhandled error" in r.getMessage()]
    assert not [r for r in caplog.records if r.name == "sidecar.proxy"
                and "upstream" in r.getMessage()]
    assert sample(sc.app[METRICS], "sidecar_upstream_responses_total",
                  {"status_class": "connect_error"}) == 0
