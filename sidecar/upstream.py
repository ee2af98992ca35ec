"""A lean HTTP/1.1 client for the Forwarder: pooled keep-alive connections to the one upstream,
the request head written in one write, the response parsed by httptools (llhttp, in C).

aiohttp's ClientSession does much more per request than a proxy needs (cookies, redirects,
tracing, URL and header re-validation, a writer task per request); this does only what
forwarding one request needs, and keeps every framing rule of SPEC 6.

Rules that hold here:
1. A connection goes back to the pool only when both messages were whole: the request body
   fully written, the response complete by its framing (Content-Length, chunked, or a status
   that has no body), the response kept alive (HTTP/1.1 without `Connection: close`), no
   byte after it, and no error anywhere. Anything else closes it: a half-written or
   half-read connection is never reused.
2. Request framing is decided here, never copied: Content-Length when the client gave one
   (aiohttp's parser holds the client's body to it), else chunked when there is a body, else
   `Content-Length: 0` for methods that carry a body (as aiohttp's client does). The caller's
   headers never hold Transfer-Encoding or other hop-by-hop headers (`sidecar.headers`); a
   CR or LF in any of them is refused, so nothing can be smuggled into the head.
3. Response framing is llhttp's, strict: Content-Length together with Transfer-Encoding, a
   bad chunk, a bad status line are errors (`BadUpstreamResponse`: 502 before the head, a cut
   client connection after), and so are a status outside 100-599 and an interim response
   that announces a body. Interim 1xx responses are skipped, trailers dropped; a 101 is an
   error (no upgrade is ever asked for here). A response already whole when its head is read
   goes to the client with the length of the bytes sent, never the upstream's claim. A
   response read until close is whole only when the upstream closes cleanly. A response to
   HEAD has no body whatever its headers say; its connection is closed afterwards (llhttp
   cannot be told the request was HEAD).
4. Bounded memory: reading from the upstream pauses while more than `HIGH_WATER` bytes of
   body wait for the client; a response head, or bytes that complete nothing (a trailer
   line), over `MAX_HEAD_BYTES` are an error; writing the request body waits for the socket
   to drain.
5. Timeouts: connect within `connect_timeout` (else `ConnectTimeout`); the head and every
   body read within `read_timeout` of waiting (else TimeoutError).
6. Only a reused connection that broke before any byte of the response came back is retried,
   once, and only for a request without a body and an idempotent method: the upstream's
   keep-alive timeout can close a pooled connection just as a request is written on it.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from collections.abc import AsyncIterator
from typing import cast

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

HIGH_WATER = 256 * 1024
# The response head (status line, headers, interim responses) may be this big; llhttp itself
# has no bound. aiohttp's client allowed 128 fields of 8 KiB each.
MAX_HEAD_BYTES = 128 * 1024
LOW_WATER = 64 * 1024
KEEPALIVE_TIMEOUT = 30.0

_BODY_METHODS_WITHOUT_CL = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
# Interim statuses llhttp reads without a body whatever their headers say; any other 1xx would
# have its announced body read (and must not have one).
_BODYLESS_INTERIM = frozenset({100, 102, 103})


class UpstreamProtocolError(OSError):
    """The upstream connection broke or answered something that is not HTTP/1.1."""


class ConnectTimeout(UpstreamProtocolError):
    """No TCP (and TLS) connection to the upstream within the connect timeout."""


class BadUpstreamResponse(UpstreamProtocolError):
    """The upstream's bytes are not a valid HTTP/1.1 response (rule 3)."""


class UpstreamDisconnected(UpstreamProtocolError):
    """The upstream closed the connection before its response was whole."""


class RequestBodyFailed(UpstreamProtocolError):
    """Reading the client's body failed (it left, stalled, or sent less than it said)."""


def request_head(method: str, target: str, headers: CIMultiDict[str], *,
                 has_body: bool, default_host: str) -> tuple[bytes, bool]:
    """The request line and headers (rule 2), and whether the body goes chunked."""
    chunked = False
    lines = [f"{method} {target} HTTP/1.1"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    if "Host" not in headers:
        lines.append(f"Host: {default_host}")
    if "Content-Length" not in headers:
        if has_body:
            chunked = True
            lines.append("Transfer-Encoding: chunked")
        elif method not in _BODY_METHODS_WITHOUT_CL:
            lines.append("Content-Length: 0")
    text = "\r\n".join(lines)
    # One CR and one LF per separator, none anywhere else (rule 2).
    if text.count("\r") != len(lines) - 1 or text.count("\n") != len(lines) - 1:
        raise ValueError("CR or LF in a request header")
    return (text + "\r\n\r\n").encode("utf-8", "surrogateescape"), chunked


class UpstreamConnection(asyncio.Protocol):
    """One connection to the upstream, and the one response being read on it."""

    def __init__(self, loop: asyncio.AbstractEventLoop, read_timeout: float) -> None:
        self.loop = loop
        self.read_timeout = read_timeout
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reused = False
        self.idle_since = 0.0
        self._idle = False
        self._write_paused = False
        self._drain: asyncio.Future[None] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self.exc: BaseException | None = None
        self._reading_paused = False
        self._start(head_request=False)

    # --- one exchange ------------------------------------------------------------------

    def _start(self, *, head_request: bool) -> None:
        if self._reading_paused:
            self._resume_reading()
        self._parser = httptools.HttpResponseParser(self)
        self.head_request = head_request
        self.status = 0
        self.reason = ""
        self._raw_headers: list[tuple[str, str]] = []
        self.headers: CIMultiDictProxy[str] | None = None
        self.head_done = False
        self.message_done = False
        self.keep_alive = False
        self._interim = False
        self._until_close = False
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self.received = False
        self.body_sent = False
        self._stalled_bytes = 0
        self._header_bytes = 0
        self._progress = False
        # Why the response is invalid, found inside a parser callback (which must not raise):
        # failed in data_received once the parser returns.
        self._bad: str | None = None

    def begin(self, head: bytes, *, head_request: bool) -> None:
        """Start an exchange: write the request head (the body follows with `write`)."""
        self._idle = False
        self._start(head_request=head_request)
        assert self.transport is not None
        self.transport.write(head)

    # --- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        # TCP_NODELAY: both loops set it on TCP connections themselves.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self._idle or self.message_done:
            # Bytes nobody asked for (rule 1): this connection cannot be trusted any more.
            self.keep_alive = False
            self.close()
            return
        self.received = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(BadUpstreamResponse("unexpected protocol upgrade"))
            return
        except httptools.HttpParserError:
            self._fail(BadUpstreamResponse("invalid HTTP response"))
            return
        if self._bad is not None:
            self._fail(BadUpstreamResponse(self._bad))
            return
        # Bytes that completed nothing (an unfinished head, an endless trailer line, which
        # httptools accumulates) are counted across reads, so what they hold stays under the
        # bound plus one read; a head that arrived in one read is counted by on_header.
        if self._progress:
            self._progress = False
            self._stalled_bytes = 0
        else:
            self._stalled_bytes += len(data)
        if self._stalled_bytes > MAX_HEAD_BYTES or self._header_bytes > MAX_HEAD_BYTES:
            self._fail(BadUpstreamResponse("response head or trailers too large"))
            return
        if self._buffered > HIGH_WATER and not self._reading_paused and self.transport:
            self._reading_paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost decides what it meant

    def connection_lost(self, exc: Exception | None) -> None:
        closed_by_us = self.closed
        self.closed = True
        # Read until close: whole only when the upstream closed cleanly (rule 3), never when we
        # closed it ourselves (a failed exchange, the client's upload broke).
        if (exc is None and not closed_by_us and self.head_done and not self.message_done
                and self._until_close):
            self.message_done = True  # read until close, and it closed cleanly (rule 3)
            self.keep_alive = False
        elif not self.message_done and self.exc is None:
            self.exc = UpstreamDisconnected("upstream closed the connection")
        self._wake()
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_exception(self.exc or UpstreamDisconnected("upstream closed"))
            drain.exception()  # retrieved: a body writer may have gone already

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_result(None)

    # --- httptools callbacks -----------------------------------------------------------

    def on_status(self, reason: bytes) -> None:
        # Called once per fragment when the status line spans reads; counted like a header.
        self._header_bytes += len(reason)
        self.reason += reason.decode("utf-8", "surrogateescape")

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.head_done:  # trailers (after the body) are dropped
            self._header_bytes += len(name) + len(value) + 4  # refused in data_received
            # Decoded as aiohttp's parsers do, so bytes reach the client as they came.
            self._raw_headers.append((name.decode("utf-8", "surrogateescape"),
                                      value.decode("utf-8", "surrogateescape")))

    def on_message_begin(self) -> None:
        if self.head_done:
            # A second response after ours in the same read: nobody asked for it, so the
            # connection is never reused (and on_headers_complete ignores its head).
            self.keep_alive = False

    def on_chunk_header(self) -> None:
        self._progress = True

    def on_headers_complete(self) -> None:
        self._progress = True
        if self.head_done:
            return  # the head of an unasked-for second response (on_message_begin)
        status = self._parser.get_status_code()
        if not 100 <= status <= 599:
            self._bad = "status code out of range"
            return
        if 100 <= status < 200:
            # Skipped; its on_message_complete resets what it set. An interim response has no
            # body: one that announces a body would have it read as part of the final one.
            self._interim = True
            if status not in _BODYLESS_INTERIM and any(
                    name.lower() in ("content-length", "transfer-encoding")
                    for name, _ in self._raw_headers):
                self._bad = "interim response with a body"
            return
        self.status = status
        headers = CIMultiDict(self._raw_headers)
        self.headers = CIMultiDictProxy(headers)
        self.keep_alive = self._parser.should_keep_alive()
        no_body = self.head_request or status in (204, 304)
        # Chunked is the final coding or the body runs until close (llhttp's rule; a coding
        # such as "x-chunked" is not chunked).
        codings = ",".join(headers.getall("Transfer-Encoding", ())).lower().split(",")
        final_coding = codings[-1].strip(" \t") if codings else ""
        self._until_close = (not no_body and "Content-Length" not in headers
                             and final_coding != "chunked")
        self.head_done = True
        if self.head_request:
            # No body follows, whatever the headers say; llhttp would wait for one.
            self.message_done = True
            self.keep_alive = False

    def on_body(self, body: bytes) -> None:
        self._progress = True
        if self.head_done and not self._interim and not self.message_done:
            self._chunks.append(body)
            self._buffered += len(body)

    def on_message_complete(self) -> None:
        self._progress = True
        if self._interim:
            self._interim = False
            self._raw_headers = []
            self.reason = ""
            return
        if not self.message_done:
            self.message_done = True

    # --- what the Forwarder uses ---------------------------------------------------------

    def _fail(self, exc: BaseException) -> None:
        if self.exc is None:
            self.exc = exc
        self.keep_alive = False
        self.close(hard=True)
        self._wake()

    def abort(self, exc: BaseException) -> None:
        """Fail the exchange from outside (the client's body broke): the upstream sees a
        cut connection, never a request that looks whole."""
        self._fail(exc)

    def close(self, *, hard: bool = False) -> None:
        """Close the connection; `hard` drops what is still buffered for the upstream at once
        (a failed exchange: nothing of it needs to arrive, and a peer that stopped reading must
        not hold the socket)."""
        self.closed = True
        if self.transport is not None:
            if hard:
                self.transport.abort()
            else:
                self.transport.close()

    def _resume_reading(self) -> None:
        self._reading_paused = False
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self) -> None:
        waiter = self._waiter = self.loop.create_future()
        timer = self.loop.call_later(self.read_timeout, _expire, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None

    async def read_head(self) -> None:
        """Until the response head is in. An error found meanwhile is raised even when the
        head was whole (a bad chunk in the same read): nothing is sent to the client yet."""
        while True:
            if self.exc is not None:
                raise self.exc
            if self.head_done:
                return
            if self.closed:
                raise UpstreamDisconnected("upstream closed the connection")
            await self._wait()

    def buffered_whole(self) -> bytes | None:
        """The whole body when it is in already (one write to the client), else None."""
        if not self.message_done or self.exc is not None:
            return None
        data = b"".join(self._chunks)
        self._chunks.clear()
        self._buffered = 0
        if self._reading_paused:
            self._resume_reading()
        return data

    def body(self) -> AsyncIterator[bytes]:
        return self._body()

    async def _body(self) -> AsyncIterator[bytes]:
        """The response body as it arrives: what is buffered, joined, per step."""
        chunks = self._chunks
        while True:
            if chunks:
                data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
                chunks.clear()
                self._buffered = 0
                if self._reading_paused:
                    self._resume_reading()
                yield data
                continue
            if self.message_done:
                return
            if self.exc is not None:
                raise self.exc
            if self.closed:
                raise UpstreamDisconnected("upstream closed the connection")
            await self._wait()

    def write(self, data: bytes) -> None:
        if self.closed or self.transport is None:
            raise self.exc or UpstreamDisconnected("upstream closed the connection")
        self.transport.write(data)

    async def drain(self) -> None:
        if not self._write_paused or self.closed:
            return
        self._drain = self.loop.create_future()
        try:
            await self._drain
        finally:
            self._drain = None

    def reusable(self) -> bool:
        return (self.message_done and self.keep_alive and self.body_sent and not self.closed
                and self.exc is None and not self._chunks)

    def park(self) -> None:
        self._idle = True
        self.reused = True
        self.idle_since = self.loop.time()


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class UpstreamPool:
    """Idle keep-alive connections to one upstream (LIFO). How many are in use at once is
    bounded by the Forwarder's slots, so the idle ones are bounded by it too."""

    def __init__(self, host: str, port: int, *, ssl_context: ssl.SSLContext | None,
                 connect_timeout: float, read_timeout: float,
                 keepalive_timeout: float = KEEPALIVE_TIMEOUT) -> None:
        self.read_timeout = read_timeout
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        self.connect_timeout = connect_timeout
        self.keepalive_timeout = keepalive_timeout
        self._idle: list[UpstreamConnection] = []

    async def acquire(self) -> UpstreamConnection:
        loop = asyncio.get_running_loop()
        now = loop.time()
        idle = self._idle
        while idle:
            conn = idle.pop()
            if conn.closed or now - conn.idle_since > self.keepalive_timeout:
                conn.close()
                continue
            return conn
        return await self.connect()

    async def connect(self) -> UpstreamConnection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: UpstreamConnection(loop, self.read_timeout), self.host, self.port,
                    ssl=self.ssl_context,
                    server_hostname=self.host if self.ssl_context is not None else None)
        except TimeoutError:
            raise ConnectTimeout("connecting to the upstream timed out") from None
        return conn

    def release(self, conn: UpstreamConnection) -> None:
        """Back to the pool if both messages were whole (rule 1), else closed."""
        if conn.reusable():
            conn.park()
            self._idle.append(conn)
        else:
            # Half-done exchanges are cut at once (rule 1); whole ones just say goodbye.
            conn.close(hard=not (conn.message_done and conn.body_sent and conn.exc is None))

    def close(self) -> None:
        for conn in self._idle:
            conn.close()
        self._idle.clear()
