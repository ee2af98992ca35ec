"""The autouse `no_blocking_the_loop` check of tests/conftest.py can fail: run in a pytest of
its own, an async test that blocks the loop fails and one that sleeps properly passes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytest_plugins = ["pytester"]


def test_a_test_that_blocks_the_loop_fails(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makeini("[pytest]\nasyncio_mode = auto\n"
                     "asyncio_default_fixture_loop_scope = function\n"
                     "markers =\n    blocking_ok: opt out\n")
    pytester.makeconftest("from tests.conftest import (  # noqa: F401\n"
                          "    no_blocking_the_loop, pytest_runtest_call)\n")
    pytester.makepyfile(test_blocking="""
        import asyncio
        import time

        import pytest

        async def test_blocks():
            time.sleep(0.8)

        async def test_awaits():
            await asyncio.sleep(0.8)

        @pytest.mark.blocking_ok
        async def test_blocks_but_opted_out():
            time.sleep(0.8)
        """)
    env_path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    monkeypatch.setenv("PYTHONPATH", env_path)
    monkeypatch.setenv("SIDECAR_TEST_STALL_SECONDS", "0.5")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    # The check runs at teardown, so the blocking test reports an error (and the run fails);
    # the two others pass cleanly.
    assert result.ret != 0
    result.assert_outcomes(passed=3, errors=1)
    result.stdout.fnmatch_lines(["ERROR test_blocking.py::test_blocks - Failed: the event loop "
                                 "was blocked*"])
