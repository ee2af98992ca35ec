"""`sidecar healthcheck` (the image's HEALTHCHECK) against a real `sidecar serve` whose ops
listener is on IPv6 loopback: it follows SIDECAR_OPS_LISTEN, maps `[::]` to ::1, and is
healthy only on a 200 from /healthz."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.conftest import prepare_db
from tests.servers import free_port, wait_port


def _free_port6() -> int:
    with socket.socket(socket.AF_INET6) as s:
        s.bind(("::1", 0))
        return int(s.getsockname()[1])


def healthcheck(env: dict[str, str], ops_listen: str,
                cwd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sidecar", "healthcheck", "--timeout", "3"],
                          env={**env, "SIDECAR_OPS_LISTEN": ops_listen}, cwd=cwd,
                          capture_output=True, text=True, timeout=60)


def test_healthcheck_follows_the_ops_listen_setting(pg_dsn: str) -> None:
    async def prepare() -> None:
        await (await prepare_db(pg_dsn)).close()

    asyncio.run(prepare())
    port, ops_port = free_port(), _free_port6()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")},
           "SIDECAR_DATABASE_URL": pg_dsn, "SIDECAR_LISTEN": f"127.0.0.1:{port}"}
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "sidecar.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "sidecar", "serve"], cwd=tmp, stdout=out,
                stderr=subprocess.STDOUT, env={**env, "SIDECAR_OPS_LISTEN": f"[::1]:{ops_port}"})
        try:
            wait_port(port)
            wait_port(ops_port, host="::1")
            for healthy in (f"[::1]:{ops_port}", f"[::]:{ops_port}"):
                result = healthcheck(env, healthy, tmp)
                assert result.returncode == 0, (healthy, result.stderr, log.read_text())
            # Nothing on IPv4 at that port: the old HEALTHCHECK dialled 127.0.0.1 whatever
            # the setting said.
            for setting in (f"127.0.0.1:{ops_port}", f"0.0.0.0:{ops_port}"):
                result = healthcheck(env, setting, tmp)
                assert result.returncode == 1, (setting, result.stderr)
                assert "127.0.0.1" in result.stderr
            # The main listener answers /healthz too, but not with 200 (no upstream: 404).
            result = healthcheck(env, f"0.0.0.0:{port}", tmp)
            assert result.returncode == 1, result.stderr
            assert "status 404" in result.stderr, result.stderr
        finally:
            proc.terminate()
            proc.wait(30)
    assert proc.returncode == 0
