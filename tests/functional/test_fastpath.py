"""The decision fast path (`sidecar.fastpath`) on a real sidecar, Postgres and socket.

Every case is asked twice, byte for byte: of a sidecar with the fast path (the default) and
of one without it (SIDECAR_DECISION_FAST_PATH=false, aiohttp answers everything). The answers
must be the same but for Date and X-Request-Id, and the fast path must have answered exactly
the requests it claims (plain bodyless HTTP/1.1 heads for `/_sidecar/auth`), handing every
other one to aiohttp with its bytes.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from sidecar.fastpath import FastPath
from tests.conftest import Db, Sidecar, SidecarFactory
from tests.helpers import RawResponse, exchange_bytes, parse_response

ROUTES = "/v1/datasets=dataset,/=app"
VARYING = ("Date", "X-Request-Id")


def fast_path(sc: Sidecar) -> FastPath:
    runner = sc.main.runner
    assert runner is not None
    assert runner.server is not None
    fast = getattr(runner.server, "fast", None)
    assert isinstance(fast, FastPath)
    return fast


@pytest.fixture
async def pair(make_sidecar: SidecarFactory) -> tuple[Sidecar, Sidecar]:
    fast = await make_sidecar(scope_routes=ROUTES, public_routes="GET /public")
    slow = await make_sidecar(scope_routes=ROUTES, public_routes="GET /public",
                              decision_fast_path=False)
    assert slow.main.runner is not None
    assert slow.main.runner.server is not None
    assert getattr(slow.main.runner.server, "fast", None) is None
    return fast, slow


def head(target: str, *lines: str, method: str = "GET", version: str = "1.1",
         eol: str = "\r\n") -> bytes:
    return eol.join([f"{method} {target} HTTP/{version}", "Host: sidecar", *lines,
                     "", ""]).encode("latin-1")


def responses(data: bytes) -> list[RawResponse]:
    """Consecutive responses of one connection (each with a Content-Length)."""
    found = []
    while data:
        end = data.index(b"\r\n\r\n") + 4
        first = parse_response(data[:end])
        length = int(first.headers.get("Content-Length", "0"))
        found.append(parse_response(data[:end + length]))
        data = data[end + length:]
    return found


def same(a: RawResponse, b: RawResponse) -> bool:
    def stable(r: RawResponse) -> list[tuple[str, str]]:
        return sorted((k.lower(), v) for k, v in r.headers.items() if k not in VARYING)
    return (a.status, stable(a), a.body) == (b.status, stable(b), b.body)


async def ask_both(pair: tuple[Sidecar, Sidecar], data: bytes, *, pause: float = 0.0,
                   parts: int = 1) -> tuple[list[RawResponse], list[RawResponse]]:
    size = -(-len(data) // parts)
    chunks = [data[i:i + size] for i in range(0, len(data), size)]
    answers = [responses(await exchange_bytes(sc.main.port, chunks, pause=pause, reset_ok=True))
               for sc in pair]
    return answers[0], answers[1]


async def open_answered(sc: Sidecar, request: bytes
                        ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A keep-alive connection whose first request (a decision) was answered 200."""
    reader, writer = await asyncio.open_connection("127.0.0.1", sc.main.port)
    writer.write(request)
    answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert answer.startswith(b"HTTP/1.1 200 ")
    return reader, writer


async def test_fast_answers_are_aiohttps_answers(pair: tuple[Sidecar, Sidecar], db: Db) -> None:
    app_token, _ = await db.add_token("app")
    dataset_token, _ = await db.add_token("dataset")
    nginx = ("X-Original-URI: /v1/chat-messages?x=1", "X-Original-Method: POST")
    cases = [
        head("/_sidecar/auth", f"Authorization: Bearer {app_token}", *nginx),  # allowed
        head("/_sidecar/auth", f"Authorization: Bearer {dataset_token}", *nginx),  # wrong scope
        head("/_sidecar/auth", "Authorization: Bearer app-forged", *nginx),  # unknown
        head("/_sidecar/auth", *nginx),  # no token
        head("/_sidecar/auth", f"Authorization: Bearer {app_token}"),  # undescribed: 400
        head("/_sidecar/auth/v1/datasets/x?page=2", f"Authorization: Bearer {dataset_token}",
             method="POST"),  # Envoy path_prefix
        head("/_sidecar/auth", "X-Original-URI: /public/a", "X-Original-Method: GET"),  # public
        head("/_sidecar/auth", "X-Forwarded-Uri: /v1/a", "X-Original-URI: /v1/b",
             f"Authorization: Bearer {app_token}"),  # disagreeing descriptions: 400
        head("/_sidecar/auth", *nginx, f"Authorization: Bearer {app_token}",
             "X-Request-Id: given-by-the-proxy"),
        head("/_sidecar/auth", *nginx, f"Authorization: Bearer {app_token} \t",
             "X-Request-Id: given-by-the-proxy \t"),  # trailing OWS is not the value's
    ]
    fast = fast_path(pair[0])
    for case in cases:
        before = fast.answered
        fast_answers, slow_answers = await ask_both(pair, case + head(
            "/_sidecar/auth", "Connection: close", *nginx))
        assert fast.answered == before + 2, case
        assert len(fast_answers) == len(slow_answers) == 2, case
        assert all(same(a, b) for a, b in zip(fast_answers, slow_answers, strict=True)), (
            case, fast_answers, slow_answers)
        given = [r.headers["X-Request-Id"] == "given-by-the-proxy" for r in fast_answers]
        assert given == [r.headers["X-Request-Id"] == "given-by-the-proxy"
                         for r in slow_answers], case
    # The proxy's request id is kept on both paths; ours are fresh and distinct.
    assert fast_answers[0].headers["X-Request-Id"] != fast_answers[1].headers["X-Request-Id"]


@pytest.mark.parametrize(("name", "data"), [
    ("bare LF line ends", head("/_sidecar/auth", "Connection: close", eol="\n")),
    ("folded line", b"GET /_sidecar/auth HTTP/1.1\r\nHost: s\r\nX-Original-URI: /v1\r\n"
                    b" /x\r\nConnection: close\r\n\r\n"),
    ("HTTP/1.0", head("/_sidecar/auth", "X-Original-URI: /v1/a", version="1.0")),
    ("HEAD", head("/_sidecar/auth", "X-Original-URI: /v1/a", "Connection: close",
                  method="HEAD")),
    ("encoded slash", head("/_sidecar%2Fauth", "X-Original-URI: /v1/a", "Connection: close")),
    ("encoded tail", head("/_sidecar/auth/v1%2Fdatasets", "Connection: close")),
    ("dot segment", head("/_sidecar/auth/../v1/a", "Connection: close")),
    ("double slash", head("/_sidecar/auth//v1/a", "Connection: close")),
    ("other path", head("/v1/chat-messages", "Connection: close")),
    ("a body", head("/_sidecar/auth", "X-Original-URI: /v1/a", "Content-Length: 2",
                    "Connection: close") + b"{}"),
    ("chunked body", head("/_sidecar/auth", "X-Original-URI: /v1/a",
                          "Transfer-Encoding: chunked", "Connection: close")
     + b"2\r\n{}\r\n0\r\n\r\n"),
    ("empty body", head("/_sidecar/auth", "X-Original-URI: /v1/a", "Content-Length: 0",
                        "Connection: close")),
    ("expect", head("/_sidecar/auth", "X-Original-URI: /v1/a", "Expect: 100-continue",
                    "Content-Length: 0", "Connection: close")),
    ("upgrade", head("/_sidecar/auth", "X-Original-URI: /v1/a", "Connection: Upgrade, close",
                     "Upgrade: websocket")),
    ("control character", head("/_sidecar/auth", "X-Original-URI: /v1/\x01a",
                               "Connection: close")),
    ("long line", head("/_sidecar/auth", "X-Original-URI: /v1/" + "a" * 9000,
                       "Connection: close")),
    ("many fields", head("/_sidecar/auth", *[f"X-F{i}: v" for i in range(200)],
                         "Connection: close")),
    ("space in target", b"GET /_sidecar/auth x HTTP/1.1\r\nHost: s\r\nConnection: close\r\n\r\n"),
    ("no Host", b"GET /_sidecar/auth HTTP/1.1\r\nX-Original-URI: /v1/a\r\n"
                b"Connection: close\r\n\r\n"),
    ("two Hosts", head("/_sidecar/auth", "Host: other", "Connection: close")),
    ("two User-Agents", head("/_sidecar/auth", "User-Agent: a", "User-Agent: b",
                             "Connection: close")),
    ("Sec-WebSocket-Key1", head("/_sidecar/auth", "Sec-WebSocket-Key1: x", "Connection: close")),
])
async def test_other_heads_are_handed_to_aiohttp_with_their_bytes(
        pair: tuple[Sidecar, Sidecar], name: str, data: bytes) -> None:
    fast = fast_path(pair[0])
    fast_answers, slow_answers = await ask_both(pair, data)
    assert fast.answered == 0, name
    assert fast_answers, name
    assert [(r.status, r.body) for r in fast_answers] == [
        (r.status, r.body) for r in slow_answers], name


async def test_pipelined_requests_are_answered_in_order_across_the_hand_over(
        pair: tuple[Sidecar, Sidecar], db: Db) -> None:
    token, _ = await db.add_token("app")
    auth = f"Authorization: Bearer {token}"
    data = b"".join([
        head("/_sidecar/auth", auth, "X-Original-URI: /v1/a"),  # fast: 200
        head("/_sidecar/auth", "Authorization: Bearer app-nope", "X-Original-URI: /v1/a"),
        # a body: handed over here, with the two requests after it
        head("/_sidecar/auth", "X-Original-URI: /v1/a", "Content-Length: 2") + b"{}",
        head("/_sidecar/auth", auth, "X-Original-URI: /v1/b"),
        head("/_sidecar/auth", auth, "X-Original-URI: /v1/c", "Connection: close"),
    ])
    fast = fast_path(pair[0])
    # One write, and the same bytes cut into small pieces (heads split anywhere).
    for parts in (1, 23):
        before = fast.answered
        fast_answers, slow_answers = await ask_both(pair, data, parts=parts, pause=0.01)
        assert [r.status for r in fast_answers] == [200, 401, 401, 200, 200], parts
        assert fast.answered == before + 2, parts
        assert all(same(a, b) for a, b in zip(fast_answers, slow_answers, strict=True))


async def test_idle_and_unfinished_fast_connections_are_closed_in_time(
        make_sidecar: SidecarFactory, db: Db) -> None:
    sc = await make_sidecar(scope_routes=ROUTES, keepalive_timeout=0.5,
                            client_header_timeout=0.5)
    token, _ = await db.add_token("app")
    request = head("/_sidecar/auth", f"Authorization: Bearer {token}", "X-Original-URI: /v1")

    async def closed_after(first: bytes) -> tuple[float, bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", sc.main.port)
        started = time.monotonic()
        writer.write(first)
        try:
            data = await asyncio.wait_for(reader.read(), 10)
        finally:
            writer.close()
        return time.monotonic() - started, data

    idle, answered = await closed_after(request)  # answered, then idle: keep-alive timeout
    assert responses(answered)[0].status == 200
    partial, nothing = await closed_after(request[:30])  # an unfinished head: header timeout
    assert nothing == b""
    silent, _ = await closed_after(b"")  # nothing at all: header timeout
    for seconds in (idle, partial, silent):
        assert 0.4 < seconds < 5
    assert fast_path(sc).answered == 1


async def test_shutdown_closes_idle_fast_connections(make_sidecar: SidecarFactory,
                                                     db: Db) -> None:
    sc = await make_sidecar(scope_routes=ROUTES)
    token, _ = await db.add_token("app")
    reader, writer = await open_answered(sc, head(
        "/_sidecar/auth", f"Authorization: Bearer {token}", "X-Original-URI: /v1"))
    fast = fast_path(sc)
    assert len(fast.connections) == 1
    started = time.monotonic()
    await sc.main.close()
    assert await asyncio.wait_for(reader.read(), 10) == b""  # closed, not left open
    assert time.monotonic() - started < 5
    assert not fast.connections
    writer.close()


async def test_a_later_unfinished_head_has_the_header_timeout_not_the_keep_alive(
        make_sidecar: SidecarFactory, db: Db) -> None:
    sc = await make_sidecar(scope_routes=ROUTES, keepalive_timeout=30,
                            client_header_timeout=0.5)
    token, _ = await db.add_token("app")
    request = head("/_sidecar/auth", f"Authorization: Bearer {token}", "X-Original-URI: /v1")
    reader, writer = await open_answered(sc, request)
    try:
        # Idle past the first header deadline: the connection's timer now waits for the
        # keep-alive deadline, 30 s away.
        await asyncio.sleep(1.0)
        writer.write(request[:20])  # a next request that never finishes its head
        started = time.monotonic()
        assert await asyncio.wait_for(reader.read(), 10) == b""
        assert time.monotonic() - started < 5  # the header timeout, far below keep-alive's
    finally:
        writer.close()


async def test_a_small_max_header_bytes_holds_on_the_fast_path(
        make_sidecar: SidecarFactory) -> None:
    fast = await make_sidecar(scope_routes=ROUTES, max_header_bytes=2048)
    slow = await make_sidecar(scope_routes=ROUTES, max_header_bytes=2048,
                              decision_fast_path=False)
    # An unfinished head that crosses 2048 bytes with its last piece (nothing is written
    # after the 431, which would reset the connection before the answer is read).
    big = head("/_sidecar/auth", *[f"X-F{i}: {'v' * 30}" for i in range(64)])[:-2]
    assert 2048 + 300 < len(big) < 8190
    fast_answers, slow_answers = await ask_both((fast, slow), big, parts=5, pause=0.05)
    assert [r.status for r in fast_answers] == [r.status for r in slow_answers] == [431]
    assert fast_path(fast).answered == 0


async def test_a_client_that_half_closes_is_not_kept_waiting(
        make_sidecar: SidecarFactory, db: Db) -> None:
    sc = await make_sidecar(scope_routes=ROUTES, keepalive_timeout=30,
                            client_header_timeout=30)
    token, _ = await db.add_token("app")
    request = head("/_sidecar/auth", f"Authorization: Bearer {token}", "X-Original-URI: /v1")
    # A whole request, then part of a head or a request for aiohttp, then EOF: the answer
    # comes, and the connection closes without waiting for a deadline.
    for rest in (b"GET /_sidecar/au", head("/v1/other")):
        reader, writer = await asyncio.open_connection("127.0.0.1", sc.main.port)
        try:
            writer.write(request + rest)
            writer.write_eof()
            started = time.monotonic()
            data = await asyncio.wait_for(reader.read(), 10)
            assert data.startswith(b"HTTP/1.1 200 "), rest
            assert time.monotonic() - started < 5, rest
        finally:
            writer.close()
