"""`sidecar serve --workers N` as a subprocess, for tests that need the real process group.

`serve_workers(env)` starts it (optionally under a `prefix` command, e.g. `unshare`), waits
until every worker logs "listening", and on exit sends SIGTERM and requires exit code 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import IO


def workers_env(**settings: str) -> dict[str, str]:
    """This process's environment without any SIDECAR_ or multiprocess variable, plus
    `settings` given as SIDECAR_<NAME>=value."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SIDECAR_") and k != "PROMETHEUS_MULTIPROC_DIR"}
    env.update({f"SIDECAR_{name.upper()}": value for name, value in settings.items()})
    return env


@dataclass
class Workers:
    proc: subprocess.Popen[bytes]
    log: IO[bytes]
    final: str | None = None  # the whole output, once the process is gone

    def output(self) -> str:
        if self.final is not None:
            return self.final
        self.log.flush()
        with open(self.log.name, "rb") as f:
            return f.read().decode(errors="replace")


@contextlib.asynccontextmanager
async def serve_workers(
    env: dict[str, str], count: int = 2, *, prefix: Sequence[str] = (), cwd: str | None = None,
    start_timeout: float = 20.0,
) -> AsyncIterator[Workers]:
    command = [*prefix, sys.executable, "-m", "sidecar", "serve", "--workers", str(count)]
    with tempfile.NamedTemporaryFile() as log:
        proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=cwd)
        workers = Workers(proc, log)
        try:
            deadline = time.monotonic() + start_timeout
            # Each worker logs "listening" once both its sockets are bound.
            while workers.output().count('"msg":"listening"') < count:
                assert proc.poll() is None, f"serve exited early:\n{workers.output()}"
                assert time.monotonic() < deadline, f"workers did not start:\n{workers.output()}"
                await asyncio.sleep(0.05)
            yield workers
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                rc = await asyncio.to_thread(proc.wait, 30)
            except subprocess.TimeoutExpired:
                proc.kill()
                await asyncio.to_thread(proc.wait, 10)
                raise
            finally:
                workers.final = workers.output()
        assert rc == 0, workers.output()
