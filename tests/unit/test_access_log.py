"""AccessLog: one whole JSON line per request, in batches; RequestIds; the event loop choice."""

from __future__ import annotations

import asyncio
import importlib.util
import io
import os
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from sidecar import eventloop
from sidecar.gate import RequestIds
from sidecar.logs import ACCESS_BUFFER_BYTES, AccessLog
from sidecar.outcomes import Outcome
from sidecar.request_info import info_of
from sidecar.settings import SettingsError, load_settings

DSN = "postgresql://user@127.0.0.1:5432/db"


class _Scheduled:
    """Stands for the flush timer: as if one were pending, so only size or close() write."""

    def cancel(self) -> None:
        pass


def _request(outcome: Outcome, path: str = "/v1/x") -> Any:
    request = make_mocked_request("GET", path)
    info = info_of(request)
    info.outcome, info.request_id, info.token_id = outcome, "rid-1", "row-1"
    return request


def test_lines_wait_for_the_flush_and_are_whole() -> None:
    out = io.BytesIO()
    log = AccessLog(out)
    log._timer = _Scheduled()  # type: ignore[assignment]
    log.log(_request(Outcome.ALLOWED), web.Response(status=200), 0.0012345)
    log.log(_request(Outcome.UNAUTHORIZED), web.Response(status=401), 0.001)
    assert out.getvalue() == b""
    log.close()
    lines = out.getvalue().splitlines()
    first, second = (orjson.loads(line) for line in lines)
    assert first["msg"] == "access"
    assert first["pid"] == os.getpid()
    assert first["path"] == "/v1/x"
    assert first["status"] == 200
    assert first["outcome"] == "allowed"
    assert first["token_id"] == "row-1"
    assert first["request_id"] == "rid-1"
    assert first["latency_ms"] == 1.234
    assert second["status"] == 401


def test_a_full_buffer_is_written_at_once() -> None:
    out = io.BytesIO()
    log = AccessLog(out)
    log._timer = _Scheduled()  # type: ignore[assignment]
    while not out.getvalue():
        log.log(_request(Outcome.ALLOWED), web.Response(), 0.0)
    assert len(out.getvalue()) >= ACCESS_BUFFER_BYTES
    assert out.getvalue().endswith(b"}\n")


async def test_the_timer_writes_a_batch() -> None:
    out = io.BytesIO()
    log = AccessLog(out, flush_interval=0.01)
    log.log(_request(Outcome.ALLOWED), web.Response(), 0.0)
    log.log(_request(Outcome.ALLOWED), web.Response(), 0.0)
    assert out.getvalue() == b""
    for _ in range(500):
        if out.getvalue():
            break
        await asyncio.sleep(0.01)
    assert len(out.getvalue().splitlines()) == 2


def test_denied_keeps_only_refusals() -> None:
    out = io.BytesIO()
    log = AccessLog(out, only_denied=True)
    for outcome in Outcome:
        log.log(_request(outcome), web.Response(), 0.0)
    log.close()
    logged = {orjson.loads(line)["outcome"] for line in out.getvalue().splitlines()}
    assert logged == set(Outcome) - {Outcome.ALLOWED, Outcome.PUBLIC}


def test_request_ids_are_unique_and_prefix_per_process() -> None:
    ids = RequestIds()
    seen = [ids.next() for _ in range(10_000)]
    assert len(set(seen)) == len(seen)
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in seen)
    assert len({i[:16] for i in seen}) == 1
    other = RequestIds()  # another process (or a forked child: reset() at fork)
    assert other.next()[:16] != seen[0][:16]


def test_event_loop_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    async def loop_class() -> str:
        return type(asyncio.get_running_loop()).__module__

    assert eventloop.run(loop_class(), "asyncio").startswith("asyncio")
    assert load_settings(database_url=DSN).event_loop == "auto"
    if eventloop.uvloop_installed():
        assert eventloop.run(loop_class(), "uvloop").startswith("uvloop")
        assert eventloop.run(loop_class(), "auto").startswith("uvloop")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert eventloop.resolve("auto") == "asyncio"
    with pytest.raises(RuntimeError):
        eventloop.resolve("uvloop")
    with pytest.raises(SettingsError, match="uvloop is not installed"):
        load_settings(database_url=DSN, event_loop="uvloop")


def test_access_log_setting_values() -> None:
    assert load_settings(database_url=DSN).access_log == "all"
    assert load_settings(database_url=DSN, access_log="denied").access_log == "denied"
    with pytest.raises(SettingsError):
        load_settings(database_url=DSN, access_log="some")


def test_timestamps_match_the_formatter_to_the_millisecond() -> None:
    from datetime import UTC, datetime

    log = AccessLog(io.BytesIO())
    for now in (1764700000.0, 1764700000.0004, 1764700000.9996, 1764700001.0, 1764700001.5,
                1764700001.5009, 1764786399.123):
        expected = datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds")
        assert log._ts(now) == expected, now
