"""Fuzzing the request path of a real `sidecar serve` process over raw sockets (SPEC 15,
issue 9 acceptance 10): random request lines, header names and values, and framing. Whatever
arrives, the answer is never a 500, never quotes the request's bytes, and nothing reaches the
upstream without a valid token. Bounded: a fixed number of examples, each a few seconds at most.
"""

from __future__ import annotations

import asyncio
import os
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import prepare_db
from tests.servers import free_port, wait_port

READ_TIMEOUT = 3.0


class _Upstream(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[bytes] = []


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.request.settimeout(5)
        data = b""
        try:
            while b"\r\n\r\n" not in data:
                chunk = self.request.recv(65536)
                if not chunk:
                    break
                data += chunk
        except OSError:
            pass
        assert isinstance(self.server, _Upstream)
        self.server.requests.append(data)
        self.request.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n"
                             b"\r\nok")


@dataclass
class Fuzzed:
    port: int
    upstream: _Upstream
    log: Path


@pytest.fixture(scope="module")
def fuzzed(pg_dsn: str) -> Iterator[Fuzzed]:
    async def prepare() -> None:
        conn = await prepare_db(pg_dsn)
        await conn.close()

    asyncio.run(prepare())
    upstream = _Upstream()
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    port, ops_port = free_port(), free_port()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")},
           "SIDECAR_DATABASE_URL": pg_dsn, "SIDECAR_LISTEN": f"127.0.0.1:{port}",
           "SIDECAR_OPS_LISTEN": f"127.0.0.1:{ops_port}",
           "SIDECAR_UPSTREAM_URL": f"http://127.0.0.1:{upstream.server_address[1]}",
           # Unfinished requests are closed quickly, so no example waits long.
           "SIDECAR_CLIENT_HEADER_TIMEOUT": "1", "SIDECAR_CLIENT_BODY_TIMEOUT": "1",
           "SIDECAR_KEEPALIVE_TIMEOUT": "1",
           "SIDECAR_SCOPE_ROUTES": "/v1/datasets=dataset,/=app"}
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "sidecar.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "sidecar", "serve"], env=env,
                                    stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_port(port)
            wait_port(ops_port)
            yield Fuzzed(port, upstream, log)
        finally:
            proc.terminate()
            proc.wait(30)
            upstream.shutdown()
            upstream.server_close()


def send(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=READ_TIMEOUT) as s:
        try:
            s.sendall(data)
        except OSError:
            return b""
        answer = b""
        try:
            while chunk := s.recv(65536):
                answer += chunk
        except OSError:  # timed out, or reset by the server
            pass
        return answer


# Bytes a client could send in a header value or a request target: anything but CR and LF
# most of the time (so the block stays framed), sometimes those too.
_value_bytes = st.binary(min_size=0, max_size=60).map(
    lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
_name = st.one_of(
    st.sampled_from([b"Authorization", b"Content-Length", b"Transfer-Encoding", b"Host",
                     b"X-Original-URI", b"X-Forwarded-Uri", b"X-Tenant-Id", b"Expect",
                     b"Connection", b"Upgrade"]),
    st.binary(min_size=1, max_size=20).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
)
_marker = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=16, max_size=16)
_method = st.one_of(st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"OPTIONS"]),
                    st.binary(min_size=0, max_size=10))
_target = st.one_of(
    st.sampled_from([b"/", b"/v1/datasets", b"/_sidecar/auth", b"/_sidecar/auth/v1/x",
                     b"http://evil/v1/datasets", b"*", b"/v1/%2e%2e/datasets", b"//x"]),
    _value_bytes,
)
_version = st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1 x", b""])
_framing = st.sampled_from([b"\r\n\r\n", b"\r\n", b"\n\n", b"", b"\r\n\r\nabc",
                            b"\r\nContent-Length: 5\r\n\r\nab",
                            b"\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab"])


@settings(max_examples=120, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(method=_method, target=_target, version=_version,
       headers=st.lists(st.tuples(_name, _value_bytes), max_size=6),
       marker=_marker, framing=_framing, bearer=st.booleans())
def test_fuzzed_requests(fuzzed: Fuzzed, method: bytes, target: bytes, version: bytes,
                         headers: list[tuple[bytes, bytes]], marker: str, framing: bytes,
                         bearer: bool) -> None:
    secret = marker.encode()
    lines = [method + b" " + target + b" " + version, b"Host: x", b"Connection: close"]
    lines += [name + b": " + value for name, value in headers]
    # A token-like value that is valid nowhere: it must never come back.
    lines.append((b"Authorization: Bearer " if bearer else b"X-Secret: ") + secret)
    before = len(fuzzed.upstream.requests)
    answer = send(fuzzed.port, b"\r\n".join(lines) + framing)
    if answer:
        status_line = answer.split(b"\r\n", 1)[0]
        assert not status_line.startswith(b"HTTP/1.1 5"), status_line
    assert secret not in answer
    assert len(fuzzed.upstream.requests) == before, "a request without a valid token got through"


def test_fuzzing_left_nothing_in_the_log(fuzzed: Fuzzed) -> None:
    text = fuzzed.log.read_bytes()
    assert b"Traceback" not in text
    assert b'"level":"error"' not in text
