"""`sidecar serve --workers N`: processes share the ports and their metrics add up."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable
from typing import IO, Any

import aiohttp

from sidecar import __version__
from tests.conftest import Db
from tests.helpers import always, scrape, scraped, within
from tests.helpers import families as parse_families
from tests.servers import free_port, wait_port
from tests.workers import serve_workers, workers_env


def _count(log: IO[bytes], needle: str) -> int:
    log.flush()
    with open(log.name, "rb") as f:
        return f.read().decode(errors="replace").count(needle)


async def test_workers_share_ports_and_aggregate_metrics(db: Db, upstream: Any) -> None:
    token, _ = await db.add_token("app")
    port, ops_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SIDECAR_") and k != "PROMETHEUS_MULTIPROC_DIR"}
    env.update({
        "SIDECAR_LISTEN": f"127.0.0.1:{port}", "SIDECAR_OPS_LISTEN": f"127.0.0.1:{ops_port}",
        "SIDECAR_DATABASE_URL": db.dsn, "SIDECAR_UPSTREAM_URL": str(upstream.make_url("")),
    })
    with tempfile.NamedTemporaryFile() as log:
        proc = subprocess.Popen([sys.executable, "-m", "sidecar", "serve", "--workers", "2"],
                                env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            await asyncio.to_thread(wait_port, port)
            await asyncio.to_thread(wait_port, ops_port)
            # Each worker logs "listening" once both its sockets are bound.
            deadline = time.monotonic() + 20
            while _count(log, '"msg":"listening"') < 2:
                assert time.monotonic() < deadline, "the workers did not both start"
                await asyncio.sleep(0.05)
            pids: set[int] = set()
            requests = 60
            for _ in range(requests):
                # A fresh connection each time, so the kernel spreads them over the workers.
                async with aiohttp.ClientSession(
                        connector=aiohttp.TCPConnector(force_close=True)) as http:
                    async with http.get(f"http://127.0.0.1:{port}/a",
                                        headers={"Authorization": f"Bearer {token}"}) as r:
                        assert r.status == 200
                    async with http.get(f"http://127.0.0.1:{ops_port}/metrics") as r:
                        text = await r.text()
            families = parse_families(text)
            allowed = sum(s.value for s in families["sidecar_requests"].samples
                          if s.name == "sidecar_requests_total"
                          and s.labels.get("outcome") == "allowed")
            assert allowed == requests  # every worker's requests, whichever worker answered
        finally:
            proc.send_signal(signal.SIGTERM)
            rc = await asyncio.get_running_loop().run_in_executor(None, proc.wait, 20)
        log.seek(0)
        output = log.read().decode()
    assert rc == 0, output
    for line in output.splitlines():
        if '"msg":"access"' in line:
            pids.add(int(line.split('"pid":', 1)[1].split(",", 1)[0]))
    assert len(pids) == 2, f"requests were served by {pids}"
    assert token not in output


async def test_a_notify_is_counted_once_with_two_workers(db: Db, upstream: Any) -> None:
    # Every worker LISTENs and drops the token from its own L1, but the change is one change
    # (SPEC 10): sidecar_invalidations_total{source="notify"} must say 1, not 2.
    token, row_id = await db.add_token("app")
    port, ops_port = free_port(), free_port()
    env = workers_env(listen=f"127.0.0.1:{port}", ops_listen=f"127.0.0.1:{ops_port}",
                      database_url=db.dsn, upstream_url=str(upstream.make_url("")))
    metrics_url = f"http://127.0.0.1:{ops_port}/metrics"
    async with serve_workers(env, 2) as workers, aiohttp.ClientSession() as http:

        async def both_listening() -> bool:
            # livemin over the workers: 1 only once each worker's LISTEN is up.
            found = await scrape(http, metrics_url)
            return scraped(found, "sidecar_subscription_connected",
                           {"subscription": "postgres-listen"}) == 1

        async def notified() -> float:
            found = await scrape(http, metrics_url)
            assert not any(s.name.endswith("_created")
                           for f in found.values() for s in f.samples)
            return scraped(found, "sidecar_invalidations_total", {"source": "notify"})

        await within(20, both_listening)
        assert await notified() == 0
        await db.conn.execute("DELETE FROM api_tokens WHERE id = $1::uuid", row_id)
        await within(10, lambda: _truthy(notified()))
        # Both workers got the NOTIFY within milliseconds; a second count would show here.
        await always(1.5, lambda: _equals(notified(), 1))
        assert scraped(await scrape(http, metrics_url), "sidecar_build_info",
                       {"version": __version__}) == 1
    assert token not in workers.output()


async def _truthy(value: Awaitable[float]) -> bool:
    return bool(await value)


async def _equals(value: Awaitable[float], expected: float) -> bool:
    return await value == expected
