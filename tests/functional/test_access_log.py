"""The access log of `sidecar serve`: SIDECAR_ACCESS_LOG, and nothing buffered is lost at
SIGTERM (lines are written in batches, SPEC 13)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from typing import Any

import aiohttp
import orjson
import pytest

from tests.conftest import Db
from tests.servers import free_port, wait_port


async def _serve_and_stop(db: Db, upstream: Any, token: str, requests: int, *,
                          decision: bool = False, **settings: str
                          ) -> tuple[int, list[dict[str, Any]], str]:
    """Start `sidecar serve`, send `requests` allowed requests and one refused (proxied, or
    asked of the decision endpoint as nginx does), SIGTERM at once, and return the exit
    code, the access lines and the whole output."""
    port, ops_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SIDECAR_") and k != "PROMETHEUS_MULTIPROC_DIR"}
    env.update({
        "SIDECAR_LISTEN": f"127.0.0.1:{port}", "SIDECAR_OPS_LISTEN": f"127.0.0.1:{ops_port}",
        "SIDECAR_DATABASE_URL": db.dsn, "SIDECAR_UPSTREAM_URL": str(upstream.make_url("")),
        **{f"SIDECAR_{k.upper()}": v for k, v in settings.items()},
    })
    with tempfile.NamedTemporaryFile() as log:
        proc = subprocess.Popen([sys.executable, "-m", "sidecar", "serve"], env=env,
                                stdout=log, stderr=subprocess.STDOUT)
        try:
            await asyncio.to_thread(wait_port, port)
            async with aiohttp.ClientSession() as http:
                for i in range(requests + 1):
                    given = token if i < requests else "app-wrong"
                    headers = {"Authorization": f"Bearer {given}"}
                    url = f"http://127.0.0.1:{port}/a?n={i}"
                    if decision:
                        headers["X-Original-URI"] = f"/a?n={i}"
                        url = f"http://127.0.0.1:{port}/_sidecar/auth"
                    async with http.get(url, headers=headers) as r:
                        assert r.status == (200 if i < requests else 401)
        finally:
            # Right after the last answer: its line is still in the buffer (the timer is
            # 0.2 s), so only the shutdown flush can have written it.
            proc.send_signal(signal.SIGTERM)
            rc = await asyncio.get_running_loop().run_in_executor(None, proc.wait, 30)
        log.seek(0)
        output = log.read().decode()
    lines = [orjson.loads(line) for line in output.splitlines()]  # every line whole JSON
    access = [doc for doc in lines if doc["msg"] == "access"]
    return rc, access, output


@pytest.mark.parametrize("decision", [False, True], ids=["proxy", "decision-fast-path"])
async def test_every_line_is_written_by_sigterm(db: Db, upstream: Any, decision: bool) -> None:
    token, token_id = await db.add_token("app")
    started = time.time()
    rc, access, output = await _serve_and_stop(db, upstream, token, 300, decision=decision)
    assert rc == 0, output
    assert len(access) == 301, output[-2000:]
    allowed = [doc for doc in access if doc["outcome"] == "allowed"]
    assert [doc["judged_path"] for doc in allowed] == ["/a"] * 300
    assert {doc["path"] for doc in allowed} == {"/_sidecar/auth" if decision else "/a"}
    assert {doc["token_id"] for doc in allowed} == {token_id}
    assert access[-1]["status"] == 401
    assert access[-1]["outcome"] == "unauthorized"
    ids = [doc["request_id"] for doc in access]
    assert len(set(ids)) == len(ids)
    # The same envelope as every other line.
    for doc in access:
        assert doc["level"] == "info"
        assert doc["logger"] == "aiohttp.access"
        assert started - 5 < datetime.fromisoformat(doc["ts"]).timestamp() < time.time() + 5
    assert token not in output
    # "stopped" is the last line: the access lines were flushed before it.
    assert orjson.loads(output.splitlines()[-1])["msg"] == "stopped"


@pytest.mark.parametrize(("mode", "expected"), [("denied", ["unauthorized"]), ("off", [])])
async def test_access_log_setting(db: Db, upstream: Any, mode: str,
                                  expected: list[str]) -> None:
    token, _ = await db.add_token("app")
    rc, access, output = await _serve_and_stop(db, upstream, token, 3, access_log=mode)
    assert rc == 0, output
    assert [doc["outcome"] for doc in access] == expected
    assert '"msg":"listening"' in output  # other lines are not affected
