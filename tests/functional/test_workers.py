"""`sidecar serve --workers N`: processes share the ports and their metrics add up."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import IO, Any

import aiohttp

from tests.conftest import Db
from tests.helpers import families as parse_families
from tests.servers import free_port, wait_port


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
