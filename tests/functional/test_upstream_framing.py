"""HTTP/1.1 framing of the proxy's upstream client (`sidecar.upstream`, SPEC 6), against an
upstream that sends exact bytes: what reaches the client, what reaches the upstream, and when
an upstream connection is reused (only after two whole messages) or closed.

The upstream here is a raw asyncio server: it reads each request (head, then a body framed by
Content-Length or chunked), records it with the connection it came on, and answers with the
bytes the test's `answer` returns for it (None: close without answering).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest

from tests.conftest import Db, Sidecar, SidecarFactory
from tests.helpers import RawResponse, exchange, parse_response, raw_request, within


@dataclass
class Received:
    connection: int
    head: bytes
    body: bytes


Answer = Callable[[Received], bytes | None]


@dataclass
class RawUpstream:
    answer: Answer
    server: asyncio.Server | None = None
    received: list[Received] = field(default_factory=list)
    connections: int = 0
    closed: list[int] = field(default_factory=list)  # connections the sidecar closed
    then_close: bool = False  # close the connection after the first answer

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number = self.connections
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    self.closed.append(number)
                    return
                body = b""
                length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
                if length:
                    body = await reader.readexactly(int(length.group(1)))
                elif re.search(rb"(?im)^transfer-encoding:\s*chunked", head):
                    while not body.endswith(b"0\r\n\r\n"):
                        chunk = await reader.read(65536)
                        if not chunk:
                            self.closed.append(number)
                            return
                        body += chunk
                got = Received(number, head, body)
                self.received.append(got)
                reply = self.answer(got)
                if reply is None:
                    return
                writer.write(reply)
                await writer.drain()
                if self.then_close:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            self.closed.append(number)
        finally:
            writer.close()


@pytest.fixture
async def raw_upstream() -> AsyncIterator[Callable[[Answer], RawUpstream]]:
    servers: list[RawUpstream] = []

    def start(answer: Answer) -> RawUpstream:
        up = RawUpstream(answer)
        servers.append(up)
        return up

    yield start
    for up in servers:
        if up.server is not None:
            up.server.close()


async def proxy_to(up: RawUpstream, make_sidecar: SidecarFactory, **settings: object) -> Sidecar:
    up.server = await asyncio.start_server(up.handle, "127.0.0.1", 0)
    return await make_sidecar(upstream_url=f"http://127.0.0.1:{up.port}", **settings)


async def get(sc: Sidecar, token: str, method: str = "GET", target: str = "/a",
              body: bytes = b"", headers: tuple[tuple[str, str], ...] = ()) -> RawResponse:
    lines = [("Authorization", f"Bearer {token}"), *headers]
    if body:
        lines.append(("Content-Length", str(len(body))))
    return await raw_request(sc.main.port, method, target, lines, body=body)


def fixed(reply: bytes) -> Answer:
    return lambda _: reply


OK_HELLO = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Up: 1\r\n\r\nhello"


async def test_content_length_response_and_connection_reused(
    make_sidecar: SidecarFactory, db: Db, raw_upstream: Callable[[Answer], RawUpstream]
) -> None:
    token, _ = await db.add_token("app")
    up = raw_upstream(fixed(OK_HELLO))
    sc = await proxy_to(up, make_sidecar)
    for _ in range(3):
        r = await get(sc, token)
        assert (r.status, r.body, r.headers["X-Up"]) == (200, b"hello", "1")
        assert r.headers["Content-Length"] == "5"
        assert "X-Request-Id" in r.headers
    assert [x.connection for x in up.received] == [1, 1, 1]


async def test_chunked_response_with_trailers_and_hop_by_hop_headers(
    make_sidecar: SidecarFactory, db: Db, raw_upstream: Callable[[Answer], RawUpstream]
) -> None:
    token, _ = await db.add_token("app")
    up = raw_upstream(fixed(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: X-Secret\r\n"
        b"X-Secret: s\r\nKeep-Alive: timeout=5\r\nTrailer: X-Trail\r\nX-Kept: k\r\n\r\n"
        b"3\r\nabc\r\n4;ext=1\r\ndefg\r\n0\r\nX-Trail: t\r\n\r\n"))
    sc = await proxy_to(up, make_sidecar)
    for _ in range(2):
        r = await get(sc, token)
        assert (r.status, r.body, r.headers["X-Kept"]) == (200, b"abcdefg", "k")
        for name in ("X-Secret", "Keep-Alive", "Trailer", "X-Trail"):
            assert name not in r.headers
    # Trailers ended the message; the connection stays in use.
    assert [x.connection for x in up.received] == [1, 1]


async def test_head_204_304_have_no_body(
    make_sidecar: SidecarFactory, db: Db, raw_upstream: Callable[[Answer], RawUpstream]
) -> None:
    token, _ = await db.add_token("app")

    def answer(got: Received) -> bytes:
        if got.head.startswith(b"HEAD"):
            return b"HTTP/1.1 200 OK\r\nContent-Length: 42\r\n\r\n"
        if b"/nc" in got.head.split(b"\r\n")[0]:
            return b"HTTP/1.1 204 No Content\r\n\r\n"
        return b"HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\n\r\n"

    up = raw_upstream(answer)
    sc = await proxy_to(up, make_sidecar)
    r = await get(sc, token, "HEAD")
    assert (r.status, r.body, r.headers["Content-Length"]) == (200, b"", "42")
    r = await get(sc, token, target="/nc")
    assert (r.status, r.body) == (204, b"")
    r = await get(sc, token, target="/nm")
    assert (r.status, r.body, r.headers["ETag"]) == (304, b"", '"x"')
    r = await get(sc, token, target="/nc")
    assert r.status == 204
    # HEAD's connection is not reused (its parser would wait for a body); 204/304's are.
    assert [x.connection for x in up.received] == [1, 2, 2, 2]
    await within(5, lambda: _closed(up, 1))


async def _closed(up: RawUpstream, connection: int) -> bool:
    return connection in up.closed


async def test_connection_close_and_read_until_close(
    make_sidecar: SidecarFactory, db: Db, raw_upstream: Callable[[Answer], RawUpstream]
) -> None:
    token, _ = await db.add_token("app")

    def answer(got: Received) -> bytes | None:
        if b"/close" in got.head:
            return b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
        return OK_HELLO

    up = raw_upstream(answer)
    sc = await proxy_to(up, make_sidecar)
    r = await get(sc, token, target="/close")
    assert (r.status, r.body) == (200, b"ok")
    r = await get(sc, token)
    assert r.body == b"hello"
    assert [x.connection for x in up.received] == [1, 2]

    until_close = raw_upstream(lambda _: None)

    async def eof_framed(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        until_close.connections += 1
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\npart one, ")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"part two")
        writer.close()

    until_close.server = await asyncio.start_server(eof_framed, "127.0.0.1", 0)
    sc2 = await make_sidecar(upstream_url=f"http://127.0.0.1:{until_close.port}")
    for _ in range(2):
        r = await get(sc2, token)
        assert (r.status, r.body) == (200, b"part one, part two")
    assert until_close.connections == 2  # never reused

    # Chunked only as the final coding: "x-chunked" is some other coding, so the body runs
    # until close (llhttp's reading), and a clean close ends it.
    other_coding = raw_upstream(fixed(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: x-chunked\r\n\r\nall of it"))
    other_coding.then_close = True
    sc3 = await proxy_to(other_coding, make_sidecar)
    r = await get(sc3, token)
    assert (r.status, r.body) == (200, b"all of it")


async def test_interim_responses_are_skipped(
    make_sidecar: SidecarFactory, db: Db, raw_upstream: Callable[[Answer], RawUpstream]
) -> None:
    token, _ = await db.add_token("app")
    up = raw_upstream(fixed(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n"
        + OK_HELLO))
    sc = await proxy_to(up, make_sidecar)
    for _ in range(2):
        r = await get(sc, token, "POST", body=b"data")
        assert (r.status, r.body) == (200, b"hello")
        assert "Link" not in r.headers
    assert [x.connection for x in up.received] == [1, 1]


@pytest.mark.parametrize("reply", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    b"HTTP/1.1 2OO OK\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n",
    b"SSH-2.0-OpenSSH_9.6\r\n",
    # An interim response that announces a body: read as part of the final response, it
    # would spill a whole forged response onto the client's keep-alive connection.
    b"HTTP/1.1 199 X\r\nContent-Length: 57\r\n\r\n"
    b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\nX-Evil: 1\r\n\r\nsmuggled"
    b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 099 X\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 999 X\r\nContent-Length: 0\r\n\r\n",
], ids=["cl-and-te", "two-cl", "bad-status", "bad-chunk-size", "upgrade", "not-http",
        "interim-with-body", "status-below-100", "status-above-599"])
async def test_invalid_responses_are_502_and_the_connection_is_dropped(
    make_sidecar: SidecarFactory, db: Db, raw_upstream: Callable[[Answer], RawUpstream],
    reply: bytes,
) -> None:
    token, _ = await db.add_token("app")
    replies = iter([reply, OK_HELLO])
    up = raw_upstream(lambda _: next(replies))
    sc = await proxy_to(up, make_sidecar)
    r = await get(sc, token)
    # Even a bad chunk after a valid head: it came in the same read, nothing was sent yet.
    assert r.status == 502
    assert r.json()["code"] == "bad_gateway"
    r = await get(sc, token)
    assert r.body == b"hello"
    assert [x.connection for x in up.received] == [1, 2]


async def test_truncated_body_cuts_the_client_connection(
    make_sidecar: SidecarFactory, db: Db, raw_upstream: Callable[[Answer], RawUpstream]
) -> None:
    token, _ = await db.add_token("app")
    up = raw_upstream(fixed(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this"))
    up.then_close = True
    sc = await proxy_to(up, make_sidecar)
    reader, writer = await asyncio.open_connection("127.0.0.1", sc.main.port)
    writer.write(f"GET /a HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n".encode())
    data = await asyncio.wait_for(reader.read(), 10)  # until the sidecar closes
    writer.close()
    r = parse_response(data)
    assert r.status == 200
    assert r.headers["Content-Length"] == "100"
    assert r.body == b"only this"  # less than announced, then the connection is cut


async def test_request_framing_sent_upstream(
    make_sidecar: SidecarFactory, db: Db, raw_upstream: Callable[[Answer], RawUpstream]
) -> None:
    token, _ = await db.add_token("app")
    up = raw_upstream(fixed(OK_HELLO))
    sc = await proxy_to(up, make_sidecar)
    # Content-Length from the client: kept, body as is.
    await get(sc, token, "PUT", "/p?q=1", body=b"0123456789")
    # A chunked upload: re-chunked by the sidecar, never copied.
    head = (f"POST /c HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer {token}\r\n"
            "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n").encode()
    r = await exchange(sc.main.port, [head, b"3\r\nabc\r\n", b"2\r\nde\r\n0\r\n\r\n"],
                       pause=0.05)
    assert r.status == 200
    # No body: Content-Length 0 for POST, nothing for GET.
    await get(sc, token, "POST", "/e")
    await get(sc, token, "GET", "/g")
    put, chunked, post, plain = up.received
    assert put.head.startswith(b"PUT /p?q=1 HTTP/1.1\r\n")
    assert b"\r\nContent-Length: 10\r\n" in put.head
    assert put.body == b"0123456789"
    assert b"\r\nTransfer-Encoding: chunked\r\n" in chunked.head
    assert b"Content-Length" not in chunked.head
    assert parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                          + chunked.body).body == b"abcde"
    assert b"\r\nContent-Length: 0\r\n" in post.head
    assert post.body == b""
    for got in (put, chunked, post, plain):
        assert got.head.count(b"\r\nHost: ") == 1
        assert b"Connection:" not in got.head
        assert b"Expect" not in got.head
    assert b"Content-Length" not in plain.head
    assert b"Transfer-Encoding" not in plain.head


async def test_half_written_request_is_never_reused(
    make_sidecar: SidecarFactory, db: Db, raw_upstream: Callable[[Answer], RawUpstream]
) -> None:
    token, _ = await db.add_token("app")
    up = raw_upstream(fixed(OK_HELLO))
    sc = await proxy_to(up, make_sidecar)
    assert (await get(sc, token)).body == b"hello"
    # An upload that announces 1000 bytes and stops after 10: the client goes away.
    _reader, writer = await asyncio.open_connection("127.0.0.1", sc.main.port)
    writer.write(f"POST /u HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
                 "Content-Length: 1000\r\n\r\n0123456789".encode())
    await writer.drain()
    await within(5, lambda: _connections(up, 1))
    writer.close()
    await within(5, lambda: _closed(up, 1))  # the upstream saw a cut, not a whole request
    assert (await get(sc, token)).body == b"hello"
    assert up.received[-1].connection == 2
    assert len(up.received) == 2  # the broken upload never reached the upstream whole


async def _connections(up: RawUpstream, at_least: int) -> bool:
    return up.connections >= at_least


async def test_early_response_before_upload_ends_is_not_reused(
    make_sidecar: SidecarFactory, db: Db, raw_upstream: Callable[[Answer], RawUpstream]
) -> None:
    token, _ = await db.add_token("app")
    up = raw_upstream(lambda _: None)

    async def early(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up.connections += 1
        number = up.connections
        head = await reader.readuntil(b"\r\n\r\n")
        if head.startswith(b"POST"):
            writer.write(b"HTTP/1.1 413 Too Large\r\nContent-Length: 3\r\n\r\nbig")
        else:
            writer.write(OK_HELLO)
        await writer.drain()
        try:
            while await reader.read(65536):
                pass
        except ConnectionError:
            pass
        up.closed.append(number)
        writer.close()

    up.server = await asyncio.start_server(early, "127.0.0.1", 0)
    sc = await make_sidecar(upstream_url=f"http://127.0.0.1:{up.port}")
    reader, writer = await asyncio.open_connection("127.0.0.1", sc.main.port)
    writer.write(f"POST /u HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
                 "Content-Length: 1000000\r\n\r\n".encode() + b"x" * 1000)
    data = await asyncio.wait_for(reader.readuntil(b"big"), 10)
    assert data.startswith(b"HTTP/1.1 413")
    writer.close()
    await within(5, lambda: _closed(up, 1))
    r = await get(sc, token)
    assert r.body == b"hello"
    assert up.connections == 2


async def test_stale_pooled_connection_is_retried_only_when_safe(
    make_sidecar: SidecarFactory, db: Db, raw_upstream: Callable[[Answer], RawUpstream]
) -> None:
    token, _ = await db.add_token("app")
    first_on_connection: set[int] = set()

    def answer(got: Received) -> bytes | None:
        # Every connection answers its first request, then closes on the next one unanswered
        # (as an upstream whose keep-alive timeout fires just as the request arrives).
        if got.connection in first_on_connection:
            return None
        first_on_connection.add(got.connection)
        return OK_HELLO

    up = raw_upstream(answer)
    sc = await proxy_to(up, make_sidecar)
    assert (await get(sc, token)).body == b"hello"
    r = await get(sc, token)  # GET, no body: retried once on a new connection
    assert (r.status, r.body) == (200, b"hello")
    assert [x.connection for x in up.received] == [1, 1, 2]
    r = await get(sc, token, "POST", body=b"once")  # never sent twice
    assert r.status == 502
    assert sum(1 for x in up.received if x.body == b"once") == 1


async def test_upstream_silent_after_head_cuts_the_client(
    make_sidecar: SidecarFactory, db: Db, raw_upstream: Callable[[Answer], RawUpstream]
) -> None:
    token, _ = await db.add_token("app")
    up = raw_upstream(lambda _: None)
    hold = asyncio.Event()

    async def stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        await writer.drain()
        await hold.wait()
        writer.close()

    up.server = await asyncio.start_server(stall, "127.0.0.1", 0)
    sc = await make_sidecar(upstream_url=f"http://127.0.0.1:{up.port}", upstream_timeout=0.5)
    try:
        r = await get(sc, token)
        assert (r.status, r.body) == (200, b"abc")  # then cut by the read timeout
    finally:
        hold.set()


async def test_aiohttp_client_setting_still_forwards(
    make_sidecar: SidecarFactory, db: Db, raw_upstream: Callable[[Answer], RawUpstream]
) -> None:
    token, _ = await db.add_token("app")
    up = raw_upstream(fixed(OK_HELLO))
    sc = await proxy_to(up, make_sidecar, upstream_client="aiohttp")
    r = await get(sc, token, "POST", body=b"data")
    assert (r.status, r.body, r.headers["X-Up"]) == (200, b"hello", "1")
    assert "X-Request-Id" in r.headers
    assert up.received[0].body == b"data"


async def test_oversized_head_is_502_and_header_bytes_pass_unchanged(
    make_sidecar: SidecarFactory, db: Db, raw_upstream: Callable[[Answer], RawUpstream]
) -> None:
    token, _ = await db.add_token("app")
    endless = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"f" * 1000) for i in range(200))
    replies = iter([
        b"HTTP/1.1 200 OK\r\n" + endless + b"Content-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-Name: caf\xc3\xa9\r\nContent-Length: 5\r\n\r\nhello",
    ])
    up = raw_upstream(lambda _: next(replies))
    sc = await proxy_to(up, make_sidecar)
    r = await get(sc, token)
    assert r.status == 502  # a head over 128 KiB is not buffered on and on
    reader, writer = await asyncio.open_connection("127.0.0.1", sc.main.port)
    writer.write(f"GET /a HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
                 "Connection: close\r\n\r\n".encode())
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    assert b"\r\nX-Name: caf\xc3\xa9\r\n" in data  # the upstream's bytes, not re-encoded


async def test_endless_trailer_is_cut_and_unasked_response_never_reused(
    make_sidecar: SidecarFactory, db: Db, raw_upstream: Callable[[Answer], RawUpstream]
) -> None:
    token, _ = await db.add_token("app")
    up = raw_upstream(lambda _: None)
    stop = asyncio.Event()

    async def trailing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up.connections += 1
        await reader.readuntil(b"\r\n\r\n")
        if up.connections == 1:
            # A second response right behind the first, in the same write.
            writer.write(OK_HELLO + b"HTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
            await reader.read()  # until the sidecar closes it
            writer.close()
            return
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"3\r\nabc\r\n0\r\nX-Trailer: ")
        while not stop.is_set() and not writer.is_closing():
            writer.write(b"t" * 16384)  # a trailer line that never ends
            try:
                await writer.drain()
            except ConnectionError:
                break
            await asyncio.sleep(0.005)
        writer.close()

    up.server = await asyncio.start_server(trailing, "127.0.0.1", 0)
    sc = await make_sidecar(upstream_url=f"http://127.0.0.1:{up.port}")
    try:
        r = await get(sc, token)
        assert (r.status, r.body) == (200, b"hello")  # the unasked-for 500 is not an answer
        r = await get(sc, token)  # a new connection: the first one was not reused
        assert up.connections == 2
        assert r.status == 200
        assert r.body == b"abc"  # then cut: the trailer is not buffered without end
    finally:
        stop.set()
