"""Streaming through a real `sidecar serve` process: GiB bodies in bounded memory, SSE event by
event, WebSocket, and a graceful SIGTERM."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import pytest

from tests.conftest import Db
from tests.servers import free_port, wait_port

GIB = 1024**3
CHUNK = b"\xa5" * (256 * 1024)
TENANT = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"


@dataclass
class SidecarProcess:
    proc: subprocess.Popen[bytes]
    port: int
    ops_port: int

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def rss_kib(self, field: str = "VmRSS") -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        raise AssertionError(f"{field} not found")


def start_sidecar(env: dict[str, str]) -> SidecarProcess:
    port, ops_port = free_port(), free_port()
    full = {
        **{k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")},
        "SIDECAR_LISTEN": f"127.0.0.1:{port}",
        "SIDECAR_OPS_LISTEN": f"127.0.0.1:{ops_port}",
        **env,
    }
    proc = subprocess.Popen([sys.executable, "-m", "sidecar", "serve"], env=full,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    wait_port(ops_port)
    wait_port(port)
    return SidecarProcess(proc, port, ops_port)


@pytest.fixture
def sidecar_env(db: Db) -> dict[str, str]:
    return {"SIDECAR_DATABASE_URL": db.dsn, "SIDECAR_LAST_USED_MIN_AGE": "0",
            "SIDECAR_LAST_USED_FLUSH_INTERVAL": "0.5"}


@pytest.fixture
def serve(sidecar_env: dict[str, str]) -> Iterator[Any]:
    started: list[SidecarProcess] = []

    async def run(**env: str) -> SidecarProcess:
        # Off the loop: starting waits for the ports, which would stall the test's loop.
        sp = await asyncio.to_thread(start_sidecar, {**sidecar_env, **env})
        started.append(sp)
        return sp

    yield run
    for sp in started:
        if sp.proc.poll() is None:
            sp.proc.kill()
            sp.proc.wait()


def sha256_of_body(total: int) -> str:
    """What `body(total)` sends, hashed (a GiB: in a thread, not on the loop)."""
    digest = hashlib.sha256()
    sent = 0
    while sent < total:
        n = min(len(CHUNK), total - sent)
        digest.update(CHUNK[:n])
        sent += n
    return digest.hexdigest()


async def body(total: int) -> AsyncIterator[bytes]:
    sent = 0
    while sent < total:
        n = min(len(CHUNK), total - sent)
        yield CHUNK[:n]
        sent += n


@pytest.mark.slow
async def test_gib_upload_and_download_in_bounded_memory(
    serve: Any, db: Db, upstream: Any
) -> None:
    token, _ = await db.add_token("app")
    sp = await serve(SIDECAR_UPSTREAM_URL=str(upstream.make_url("")))
    auth = {"Authorization": f"Bearer {token}"}
    timeout = aiohttp.ClientTimeout(total=240)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        async with http.get(sp.url("/warm"), headers=auth) as r:  # imports and pools warm
            assert r.status == 200
        baseline = sp.rss_kib()

        async with http.post(sp.url("/upload"), headers=auth, data=body(GIB)) as r:
            assert r.status == 200
            doc = orjson.loads(await r.read())
        assert doc["body_size"] == GIB
        assert doc["body_sha256"] == await asyncio.to_thread(sha256_of_body, GIB)
        after_upload = sp.rss_kib("VmHWM")

        received = 0
        async with http.get(sp.url(f"/download?size={GIB}"), headers=auth) as r:
            assert r.status == 200
            assert r.headers["Content-Length"] == str(GIB)
            async for chunk in r.content.iter_chunked(1 << 20):
                received += len(chunk)
        assert received == GIB
        peak = sp.rss_kib("VmHWM")
    growth_mib = (peak - baseline) / 1024
    print(f"sidecar RSS baseline {baseline / 1024:.1f} MiB, peak after upload "
          f"{after_upload / 1024:.1f} MiB, peak after download {peak / 1024:.1f} MiB")
    assert growth_mib < 100, f"RSS grew by {growth_mib:.1f} MiB"


async def test_sse_arrives_event_by_event(serve: Any, db: Db, upstream: Any) -> None:
    token, _ = await db.add_token("app")
    sp = await serve(SIDECAR_UPSTREAM_URL=str(upstream.make_url("")))
    arrivals: list[tuple[float, bytes]] = []
    async with aiohttp.ClientSession() as http:
        started = time.monotonic()
        async with http.get(sp.url("/sse?count=5&interval=0.2"),
                            headers={"Authorization": f"Bearer {token}"}) as r:
            assert r.status == 200
            assert r.headers["Content-Type"] == "text/event-stream"
            async for line in r.content:
                if line.startswith(b"data:"):
                    arrivals.append((time.monotonic() - started, line.strip()))
    assert [a[1] for a in arrivals] == [f"data: event {i}".encode() for i in range(5)]
    first, last = arrivals[0][0], arrivals[-1][0]
    assert first < 0.5, f"first event after {first:.2f}s: buffered"
    assert last - first > 0.6, "events arrived together: buffered"


async def test_websocket_round_trip(serve: Any, db: Db, upstream: Any) -> None:
    token, _ = await db.add_token("app", tenant_id=TENANT)
    sp = await serve(SIDECAR_UPSTREAM_URL=str(upstream.make_url("")))
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(sp.url("/ws"),
                                   headers={"Authorization": f"Bearer {token}"}) as ws:
            greeting = await asyncio.wait_for(ws.receive_str(), 5)
            assert greeting == f"hello {TENANT}"  # identity headers reached the upstream
            await ws.send_str("ping-1")
            assert await asyncio.wait_for(ws.receive_str(), 5) == "echo:ping-1"
            await ws.send_bytes(b"\x00\x01binary")
            assert await asyncio.wait_for(ws.receive_bytes(), 5) == b"\x00\x01binary"
        # and without a token the upgrade is refused before reaching the upstream
        with pytest.raises(aiohttp.WSServerHandshakeError) as exc:
            await http.ws_connect(sp.url("/ws"))
        assert exc.value.status == 401


async def test_sigterm_finishes_in_flight_and_exits_zero(
    serve: Any, db: Db, upstream: Any
) -> None:
    token, row_id = await db.add_token("app")
    sp = await serve(SIDECAR_UPSTREAM_URL=str(upstream.make_url("")),
               SIDECAR_LAST_USED_FLUSH_INTERVAL="3600")
    async with aiohttp.ClientSession() as http:
        pending = asyncio.ensure_future(
            http.get(sp.url("/slow?delay=1"), headers={"Authorization": f"Bearer {token}"}))
        await asyncio.sleep(0.3)
        sp.proc.send_signal(signal.SIGTERM)
        resp = await pending
        assert resp.status == 200
        assert await resp.text() == "late"
        resp.release()
    rc = await asyncio.get_running_loop().run_in_executor(None, sp.proc.wait, 15)
    output = sp.proc.stdout.read().decode() if sp.proc.stdout else ""
    assert rc == 0, output
    # The pending last_used_at write was flushed on the way out (flush interval was 1 h).
    assert await db.conn.fetchval(
        "SELECT last_used_at IS NOT NULL FROM api_tokens WHERE id = $1::uuid", row_id)
    # JSON access log line, without the token.
    lines = [orjson.loads(line) for line in output.splitlines() if line.startswith("{")]
    access = [entry for entry in lines if entry.get("msg") == "access"]
    assert access
    assert access[0]["status"] == 200
    assert access[0]["token_id"] == row_id
    assert token not in output
