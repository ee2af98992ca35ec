"""How the decision fast path writes a response (`sidecar.fastpath._serialise`)."""

from __future__ import annotations

import pytest
from aiohttp import web

from sidecar.fastpath import _serialise


def parsed(data: bytes) -> tuple[str, dict[str, str], bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    status, *lines = head.decode().split("\r\n")
    return status, dict(line.split(": ", 1) for line in lines), body


def test_a_decision_is_one_block_with_aiohttps_headers() -> None:
    data, keep_alive = _serialise(web.Response(headers={"X-Tenant-Id": "t-1"}), True)
    status, headers, body = parsed(data)
    assert keep_alive
    assert status == "HTTP/1.1 200 OK"
    assert headers["X-Tenant-Id"] == "t-1"
    assert headers["Content-Length"] == "0"
    assert "Content-Type" not in headers  # no body, no type (as aiohttp)
    assert headers["Server"].startswith("Python/")
    assert "Date" in headers
    assert "Connection" not in headers
    assert body == b""


def test_an_error_keeps_its_type_and_length_and_may_close() -> None:
    response = web.Response(status=401, body=b'{"code":"unauthorized"}',
                            content_type="application/json",
                            headers={"Content-Length": "999"})
    data, keep_alive = _serialise(response, False)
    status, headers, body = parsed(data)
    assert not keep_alive
    assert status == "HTTP/1.1 401 Unauthorized"
    assert headers["Content-Type"] == "application/json"
    assert headers["Content-Length"] == str(len(body))  # from the body, never a stale one
    assert headers["Connection"] == "close"
    assert body == b'{"code":"unauthorized"}'


def test_a_forced_close_is_honoured() -> None:
    response = web.Response()
    response.force_close()
    data, keep_alive = _serialise(response, True)
    assert not keep_alive
    assert parsed(data)[1]["Connection"] == "close"


@pytest.mark.parametrize("value", ["a\r\nX-Evil: 1", "a\nX-Evil: 1", "a\rb", "a\r"])
def test_a_header_value_never_splits_the_response(value: str) -> None:
    response = web.Response()
    response.headers["X-Tenant-Id"] = value
    with pytest.raises(ValueError, match="newline"):
        _serialise(response, True)


def test_only_plain_responses_are_written() -> None:
    with pytest.raises(RuntimeError):
        _serialise(web.StreamResponse(), True)
