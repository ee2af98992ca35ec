"""Connection bounds of SPEC 15 on a real `sidecar serve` process (issue 9 acceptance 1-3):
header deadline, keep-alive timeout, body stall, header-block size, connection cap."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import Db
from tests.helpers import raw_request, scrape, scraped
from tests.servers import free_port, wait_port


@dataclass
class Served:
    proc: subprocess.Popen[bytes]
    port: int
    ops_port: int
    log: Path

    def rss_kib(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise AssertionError("VmRSS not found")


Serve = Callable[..., Awaitable[Served]]


@pytest.fixture
async def serve(db: Db) -> AsyncIterator[Serve]:
    started: list[Served] = []
    with tempfile.TemporaryDirectory() as tmp:

        async def run(**settings: str) -> Served:
            port, ops_port = free_port(), free_port()
            env = {**{k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")},
                   "SIDECAR_DATABASE_URL": db.dsn, "SIDECAR_LISTEN": f"127.0.0.1:{port}",
                   "SIDECAR_OPS_LISTEN": f"127.0.0.1:{ops_port}",
                   **{f"SIDECAR_{k.upper()}": v for k, v in settings.items()}}
            log = Path(tmp) / f"sidecar-{len(started)}.log"
            with open(log, "wb") as out:
                proc = subprocess.Popen([sys.executable, "-m", "sidecar", "serve"], env=env,
                                        stdout=out, stderr=subprocess.STDOUT)
            served = Served(proc, port, ops_port, log)
            started.append(served)
            await asyncio.to_thread(wait_port, port)
            await asyncio.to_thread(wait_port, ops_port)
            return served

        try:
            yield run
        finally:
            for served in started:
                served.proc.terminate()
                await asyncio.to_thread(served.proc.wait, 30)


async def closed_after(reader: asyncio.StreamReader, limit: float) -> float:
    """Seconds until the server closes the connection (EOF or reset), at most `limit`."""
    started = time.monotonic()
    try:
        while await asyncio.wait_for(reader.read(65536), limit):
            pass
    except (ConnectionError, OSError):
        pass
    return time.monotonic() - started


async def read_all(reader: asyncio.StreamReader) -> bytes:
    """What the server sent until it closed; a reset ends it too."""
    data = b""
    try:
        while chunk := await reader.read(65536):
            data += chunk
    except (ConnectionError, OSError):
        pass
    return data


async def allowed(port: int, token: str) -> int:
    resp = await raw_request(port, "GET", "/_sidecar/auth/v1/x",
                             [("Authorization", f"Bearer {token}")])
    return resp.status


async def test_slow_silent_and_idle_connections_are_closed(serve: Serve, db: Db) -> None:
    token, _ = await db.add_token("app")
    sc = await serve(client_header_timeout="3", keepalive_timeout="3")

    async def drip() -> float:
        reader, writer = await asyncio.open_connection("127.0.0.1", sc.port)
        started = time.monotonic()

        async def feed() -> None:
            for byte in b"GET /_sidecar/auth/v1/x HTTP/1.1\r\nX-Slow: " + b"a" * 100:
                writer.write(bytes([byte]))
                await asyncio.sleep(0.5)

        feeder = asyncio.create_task(feed())
        try:
            await closed_after(reader, 20)
        finally:
            feeder.cancel()
            writer.close()
        return time.monotonic() - started

    async def silent() -> float:
        reader, writer = await asyncio.open_connection("127.0.0.1", sc.port)
        try:
            return await closed_after(reader, 20)
        finally:
            writer.close()

    async def idle_keepalive() -> float:
        reader, writer = await asyncio.open_connection("127.0.0.1", sc.port)
        try:
            writer.write(b"GET /_sidecar/auth/v1/x HTTP/1.1\r\nHost: x\r\n"
                         b"Authorization: Bearer " + token.encode() + b"\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert head.startswith(b"HTTP/1.1 200"), head
            return await closed_after(reader, 20)
        finally:
            writer.close()

    times = await asyncio.gather(drip(), silent(), idle_keepalive())
    for name, took in zip(("drip", "silent", "idle keep-alive"), times, strict=True):
        assert took < 8, f"{name} connection still open after {took:.1f}s"
    assert await allowed(sc.port, token) == 200


async def test_stalled_body_is_aborted_and_never_complete_upstream(
    serve: Serve, db: Db
) -> None:
    received: list[bytes] = []
    upstream_closed = asyncio.Event()

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = b""
        try:
            while chunk := await reader.read(65536):
                data += chunk
        except (ConnectionError, OSError):
            pass
        received.append(data)
        upstream_closed.set()
        writer.close()

    server = await asyncio.start_server(upstream, "127.0.0.1", 0)
    up_port = server.sockets[0].getsockname()[1]
    token, _ = await db.add_token("app")
    sc = await serve(upstream_url=f"http://127.0.0.1:{up_port}", client_body_timeout="2")
    reader, writer = await asyncio.open_connection("127.0.0.1", sc.port)
    try:
        writer.write(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n"
                     b"Authorization: Bearer " + token.encode() + b"\r\n\r\n" + b"x" * 10)
        await writer.drain()
        took = await closed_after(reader, 20)
        assert took < 8, f"stalled body not aborted after {took:.1f}s"
        await asyncio.wait_for(upstream_closed.wait(), 10)
    finally:
        writer.close()
        server.close()
    body = received[0].partition(b"\r\n\r\n")[2]
    assert len(body) < 1000  # the upstream saw a broken request, never a complete one


async def test_unfinished_header_blocks_hold_bounded_memory(serve: Serve, db: Db) -> None:
    token, _ = await db.add_token("app")
    sc = await serve()
    assert await allowed(sc.port, token) == 200  # warm
    baseline = sc.rss_kib()
    line = b"X-Pad: " + b"a" * 8000 + b"\r\n"
    block = b"GET / HTTP/1.1\r\nHost: x\r\n" + line * 100  # ~800 KB, never finished
    conns = []
    for _ in range(150):
        reader, writer = await asyncio.open_connection("127.0.0.1", sc.port)
        conns.append((reader, writer))
        writer.write(block)
    for _reader, writer in conns:
        with contextlib.suppress(ConnectionError, OSError):
            await asyncio.wait_for(writer.drain(), 10)
    # Each one is answered 431 and closed; a client still sending when the server closes
    # gets a reset instead (TCP discards the answer then), never an open connection.
    answers = [await asyncio.wait_for(read_all(reader), 10) for reader, _ in conns]
    grown = sc.rss_kib() - baseline
    for _reader, writer in conns:
        writer.close()
    assert grown < 64 * 1024, f"RSS grew by {grown} KiB"
    assert all(a == b"" or a.startswith(b"HTTP/1.1 431") for a in answers)
    assert all(b"aaaaaaaa" not in a for a in answers)
    async with aiohttp.ClientSession() as http:
        found = await scrape(http, f"http://127.0.0.1:{sc.ops_port}/metrics")
    assert scraped(found, "sidecar_requests_total",
                   {"outcome": "bad_request", "scope": "none"}) == 150
    assert await allowed(sc.port, token) == 200


async def test_connections_beyond_the_cap_are_closed_at_once(serve: Serve, db: Db) -> None:
    token, _ = await db.add_token("app")
    sc = await serve(max_client_connections="200", client_header_timeout="30")
    log_before = sc.log.stat().st_size
    conns = [await asyncio.open_connection("127.0.0.1", sc.port) for _ in range(260)]

    async def closed_now(reader: asyncio.StreamReader) -> bool:
        try:
            return await asyncio.wait_for(reader.read(1), 2) == b""
        except TimeoutError:
            return False
        except (ConnectionError, OSError):
            return True

    closed = sum(await asyncio.gather(*(closed_now(r) for r, _ in conns)))
    assert closed >= 40, f"only {closed} of 260 connections closed"
    async with aiohttp.ClientSession() as http:
        started = time.monotonic()
        async with http.get(f"http://127.0.0.1:{sc.ops_port}/healthz") as r:
            assert r.status == 200
        assert time.monotonic() - started < 1
        found = await scrape(http, f"http://127.0.0.1:{sc.ops_port}/metrics")
    assert scraped(found, "sidecar_client_connections_refused_total",
                   {"listener": "main"}) >= 40
    for _, writer in conns:
        writer.close()
    assert sc.log.stat().st_size - log_before < 200 * 1024

    async def answered() -> bool:
        try:
            return await allowed(sc.port, token) == 200
        except (ConnectionError, OSError, TimeoutError, IndexError):
            return False  # still over the cap: closed at once, no answer to parse

    deadline = time.monotonic() + 10
    while not await answered():
        assert time.monotonic() < deadline, "no 200 after the idle connections closed"
        await asyncio.sleep(0.1)
