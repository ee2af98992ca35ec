"""`sidecar serve --workers N`: N forked processes sharing the listeners (SO_REUSEPORT).

Rules that hold here:
1. The parent forks before any event loop, thread or Prometheus metric exists, and does
   nothing afterwards but forward signals and reap children.
2. Metrics go through Prometheus multiprocess mode: the parent points
   PROMETHEUS_MULTIPROC_DIR at an empty directory before forking, so every worker's values
   land in files that any worker's /metrics adds up.
3. A worker that dies on its own takes the group down (exit 1): the orchestrator restarts the
   pod, rather than it running silently with fewer workers. SIGTERM/SIGINT go to every
   worker, which shut down gracefully; the parent exits 0 when all of them did.
4. Each worker knows its index; worker 0 counts the events every worker receives (a NOTIFY,
   sidecar.invalidation rule 5), so they are counted once. Worker 0 lives as long as the
   group does (rule 3).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import tempfile
from collections.abc import Callable
from types import FrameType

log = logging.getLogger("sidecar.workers")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess_dir() -> str | None:
    """The multiprocess metrics directory of this process, if it is a worker (rule 2). This
    variable is prometheus-client's own, which it reads itself; every other setting is read
    by `sidecar.settings`."""
    return os.environ.get(MULTIPROC_ENV) or None


def prepare_multiprocess_dir() -> tuple[str, bool]:
    """The directory for multiprocess metrics, emptied; and whether we created it."""
    given = os.environ.get(MULTIPROC_ENV)
    if given:
        os.makedirs(given, exist_ok=True)
        for name in os.listdir(given):
            if name.endswith(".db"):
                os.unlink(os.path.join(given, name))
        return given, False
    path = tempfile.mkdtemp(prefix="sidecar-metrics-")
    os.environ[MULTIPROC_ENV] = path
    return path, True


def run_workers(count: int, work: Callable[[int], int]) -> int:
    """Fork `count` workers, each running `work(index)` (index 0..count-1), and wait."""
    path, created = prepare_multiprocess_dir()
    children: dict[int, int] = {}
    stopping = False

    def forward(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(children):  # a handler may run while the loop below edits it
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    # Handlers first: a signal arriving between two forks must still reach the children.
    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    try:
        for index in range(count):
            pid = os.fork()
            if pid == 0:  # the worker
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                code = 1
                try:
                    code = work(index)
                finally:
                    os._exit(code)
            children[pid] = index
        log.info("workers started", extra={"fields": {"workers": count, "pids": list(children)}})
        failed = False
        while children:
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                break
            children.pop(pid, None)
            _mark_dead(pid)
            code = os.waitstatus_to_exitcode(status)
            if code != 0 or not stopping:
                failed = True
                if not stopping:
                    log.error("worker exited unexpectedly; stopping the others",
                              extra={"fields": {"pid": pid, "exit_code": code}})
                    forward(signal.SIGTERM, None)
        return 1 if failed else 0
    finally:
        if created:
            shutil.rmtree(path, ignore_errors=True)


def _mark_dead(pid: int) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
