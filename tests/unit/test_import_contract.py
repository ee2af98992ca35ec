"""Imports point inward (DESIGN: the shape we aim for). `sidecar.auth` decides on tokens over
two small Protocols and must stay testable without any driver: it imports no aiohttp,
asyncpg or redis, directly or through what it imports."""

from __future__ import annotations

import subprocess
import sys

import pytest

DRIVERS = ("aiohttp", "asyncpg", "redis")

PROBE = """
import sys
import {module}
print(",".join(sorted(m for m in {drivers!r} if m in sys.modules)))
"""


def loaded_drivers(module: str) -> set[str]:
    # A fresh interpreter: this test process has imported everything already.
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(module=module, drivers=DRIVERS)],
        check=True, capture_output=True, text=True, timeout=60,
    ).stdout.strip()
    return set(out.split(",")) - {""}


@pytest.mark.parametrize("module", ["sidecar.auth", "sidecar.cache", "sidecar.credentials",
                                    "sidecar.routing", "sidecar.errors", "sidecar.backoff"])
def test_core_modules_import_no_driver(module: str) -> None:
    assert loaded_drivers(module) == set()


def test_the_probe_sees_a_driver() -> None:
    # The check can fail: a module that does pull a driver in is reported.
    assert loaded_drivers("sidecar.store") >= {"asyncpg"}
