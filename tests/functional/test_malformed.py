"""Requests aiohttp's parser refuses get a Dify-shaped JSON 400/431 that quotes nothing of the
request, are counted as bad_request and logged without their bytes (SPEC 15, issue 9
acceptance 4), on a real `sidecar serve` process."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson
import pytest

from tests.conftest import Db
from tests.helpers import exchange, scrape, scraped
from tests.servers import free_port, wait_port

ADMIN = "admin-token-0123456789abcdef"


@pytest.fixture
async def served(db: Db) -> AsyncIterator[tuple[int, int, Path]]:
    port, ops_port = free_port(), free_port()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")},
           "SIDECAR_DATABASE_URL": db.dsn, "SIDECAR_LISTEN": f"127.0.0.1:{port}",
           "SIDECAR_OPS_LISTEN": f"127.0.0.1:{ops_port}", "SIDECAR_ADMIN_TOKEN": ADMIN}
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "sidecar.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "sidecar", "serve"], env=env,
                                    stdout=out, stderr=subprocess.STDOUT)
            try:
                await asyncio.to_thread(wait_port, port)
                await asyncio.to_thread(wait_port, ops_port)
                yield port, ops_port, log
            finally:
                proc.terminate()
                await asyncio.to_thread(proc.wait, 30)


async def test_malformed_requests_get_json_that_quotes_nothing(
    served: tuple[int, int, Path], db: Db
) -> None:
    port, ops_port, log = served
    token, _ = await db.add_token("app")
    head = b"GET /_sidecar/auth/v1/x HTTP/1.1\r\nHost: x\r\n"
    cases = [
        (port, head + b"Authorization: Bearer " + token.encode() + b"\x7f\r\n\r\n", 400),
        (port, head + b"X-Long: " + b"a" * 9000 + b"\r\n\r\n", 431),
        (port, head + b"X-Nul: a\x00" + token.encode() + b"\r\n\r\n", 400),
        (ops_port, b"POST /admin/invalidate HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
         + ADMIN.encode() + b"\x7f\r\nContent-Length: 2\r\n\r\n{}", 400),
    ]
    for target_port, request, status in cases:
        resp = await exchange(target_port, [request])
        assert resp.status == status, request[:60]
        assert resp.headers["Content-Type"].startswith("application/json")
        assert resp.json() == {"code": "bad_request", "message": resp.json()["message"],
                               "status": status}
        for secret in (token.encode(), ADMIN.encode(), b"aaaaaaaa"):
            assert secret not in resp.body
    async with aiohttp.ClientSession() as http:
        found = await scrape(http, f"http://127.0.0.1:{ops_port}/metrics")
    assert scraped(found, "sidecar_requests_total",
                   {"outcome": "bad_request", "scope": "none"}) == 3
    text = log.read_bytes()
    for secret in (token.encode(), ADMIN.encode(), b"a" * 100):
        assert secret not in text
    lines = [orjson.loads(line) for line in text.splitlines() if line.startswith(b"{")]
    assert sum(1 for d in lines if d.get("msg") == "malformed request refused") == 4
