"""The Forwarder: streams an allowed request to the upstream and its response back (SPEC 6).

Rules that hold here:
1. Bodies are never read whole: the request body is handed to the client as a stream and the
   response is copied chunk by chunk as it arrives (so SSE events pass one by one, and GiB
   uploads and downloads use bounded memory).
2. Failures before the upstream's response headers become `UpstreamUnavailable` (502) or
   `UpstreamTimeout` (504). After the headers have been sent, the status can no longer change:
   the client connection is cut instead, so a truncated body is never mistaken for a whole one.
3. Neither client decompresses, follows redirects or keeps cookies: the upstream's
   bytes reach the client as they were.
4. At most `max_connections` requests and WebSockets talk to the upstream at once; a request
   waits at most `pool_timeout` for its turn, then gets 504. Nothing waits unbounded.
5. `100 Continue` is sent only here, once the request is authenticated and has its turn: a
   client that would be refused is never invited to upload its body
   (`Forwarder.defer_continue`).
6. A WebSocket message larger than `websocket_max_message` bytes, in either direction, closes
   the socket with 1009 instead of being buffered; it never reaches the other side.
7. Plain HTTP requests go through `sidecar.upstream` (`lean`, the default: its own framing
   rules hold there) or aiohttp's ClientSession (SIDECAR_UPSTREAM_CLIENT=aiohttp); both give
   the same answers for the same upstream bytes. WebSockets always use the ClientSession.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import ssl
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import aiohttp
from aiohttp import HttpVersion11, WSMsgType, web
from multidict import CIMultiDict, CIMultiDictProxy, MultiMapping
from yarl import URL

from sidecar.errors import (
    ClientClosed,
    ExpectationFailed,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from sidecar.headers import downstream_response_headers, upstream_request_headers
from sidecar.metrics import Metrics
from sidecar.models import Identity
from sidecar.outcomes import Outcome
from sidecar.request_info import info_of
from sidecar.responses import client_gone, error_response, json_error, outcome_of
from sidecar.upstream import (
    IDEMPOTENT,
    RequestBodyFailed,
    UpstreamConnection,
    UpstreamDisconnected,
    UpstreamPool,
    request_head,
)

log = logging.getLogger("sidecar.proxy")

# ws_connect writes its own handshake headers; Host is not among them: it is the client's, or
# SIDECAR_UPSTREAM_HOST_HEADER, exactly as for plain requests.
_WS_SKIP = frozenset({
    "sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions",
    "sec-websocket-protocol", "sec-websocket-accept", "content-length",
})
# Headers of a refused handshake's body, which is not relayed (ws_connect does not keep it).
_REFUSAL_SKIP = frozenset({"content-length", "content-type", "content-encoding"})
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def _status_class(status: int) -> str:
    return f"{status // 100}xx"


@contextlib.contextmanager
def upstream_errors(metrics: Metrics | None, request: web.BaseRequest) -> Iterator[None]:
    """aiohttp's and the OS's errors while talking to the upstream, as the sidecar's own
    (rule 2), mapped here once. With `metrics`, each is also counted by its kind; without,
    it is not (a body cut after the response was counted already). When the client's own
    connection broke meanwhile (its upload was cut, it reset while we answered), that is
    the cause, whatever the error says: `ClientClosed`, and the upstream is not blamed."""
    try:
        yield
    except UpstreamError:
        raise
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        if client_gone(request):
            raise ClientClosed() from exc
        raise _mapped(exc, metrics) from exc


def _mapped(exc: BaseException, metrics: Metrics | None) -> UpstreamError:
    # ConnectionTimeoutError first: it is also a ServerTimeoutError. Connecting took too
    # long: nobody answered, which is "unavailable", not "slow".
    error: UpstreamError
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        kind, error = "connect_error", UpstreamUnavailable()
    elif isinstance(exc, TimeoutError | aiohttp.ServerTimeoutError):
        kind, error = "timeout", UpstreamTimeout()
    else:
        kind, error = "connect_error", UpstreamUnavailable()
    _count(metrics, kind)
    return error


async def _relay(request: web.Request, response: web.StreamResponse,
                 chunks: AsyncIterator[bytes]) -> web.StreamResponse:
    """The upstream's response head, then its body chunk by chunk as it arrives, to the
    client (both upstream clients)."""
    try:
        with upstream_errors(None, request):
            await response.prepare(request)
            async for chunk in chunks:
                await response.write(chunk)
            await response.write_eof()
    except ClientClosed:
        info_of(request).outcome = Outcome.CLIENT_CLOSED
        return response
    except UpstreamError as exc:
        # Headers are out; cutting the connection is the only honest signal left.
        log.warning("upstream body interrupted: %s", _cause(exc))
        if request.transport is not None:
            request.transport.close()
        return response
    return response


def _count(metrics: Metrics | None, status_class: str) -> None:
    if metrics is not None:
        metrics.upstream_responses.labels(status_class=status_class).inc()


def _cause(exc: BaseException) -> str:
    """The class name of the driver error behind one of ours, for a log line: the message
    could quote the values involved."""
    return type(exc.__cause__ or exc).__name__


@dataclass(frozen=True, slots=True)
class UpstreamLimits:
    """How long and how many (SPEC 6 and rules 4, 6): the upstream response timeout, TCP
    connect timeout, wait for a free connection, connections at once, WebSocket message.
    Defaults live in the settings only."""

    timeout: float
    connect_timeout: float
    pool_timeout: float
    max_connections: int
    websocket_max_message: int


class Forwarder:
    def __init__(
        self,
        upstream_url: str,
        *,
        metrics: Metrics,
        limits: UpstreamLimits,
        hide_credentials: bool,
        host_header: str | None,
        lean: bool = True,
    ) -> None:
        self.base = upstream_url.rstrip("/")
        # Plain HTTP requests go through `sidecar.upstream` (lean) or aiohttp's ClientSession;
        # WebSockets always through the latter.
        self.lean = lean
        self.metrics = metrics
        self.hide_credentials = hide_credentials
        self.host_header = host_header
        self.limits = limits
        # `connect` covers aiohttp's own wait for a pooled connection plus the TCP connect. The
        # slots below already keep requests from queueing inside aiohttp, so this only makes
        # sure that no wait there can ever be unbounded.
        self.timeout = aiohttp.ClientTimeout(
            total=None, connect=limits.pool_timeout + limits.connect_timeout,
            sock_connect=limits.connect_timeout, sock_read=limits.timeout,
        )
        # One slot per upstream connection in use, held from before the request is sent until
        # its response (or WebSocket) is finished. Waiting for a slot here rather than in
        # aiohttp's pool tells "pool full" (504, below) apart from "cannot connect" (502).
        self._slots = asyncio.Semaphore(limits.max_connections)
        self._session: aiohttp.ClientSession | None = None
        base = URL(self.base)
        self._base_parts = (base.scheme, base.raw_host or "", base.explicit_port,
                            base.raw_path.rstrip("/"))
        self._status_children: dict[str, Any] = {}
        self._prefix = base.raw_path.rstrip("/")
        host = base.raw_host or ""
        bracketed = f"[{host}]" if ":" in host else host
        self._default_host = (bracketed if base.explicit_port is None
                              else f"{bracketed}:{base.explicit_port}")
        self._pool: UpstreamPool | None = None

    async def start(self) -> None:
        scheme, host, port, _ = self._base_parts
        self._pool = UpstreamPool(
            host, port or (443 if scheme == "https" else 80),
            ssl_context=ssl.create_default_context() if scheme == "https" else None,
            connect_timeout=self.limits.connect_timeout, read_timeout=self.limits.timeout)
        connector = aiohttp.TCPConnector(
            limit=self.limits.max_connections, limit_per_host=0, keepalive_timeout=30,
            enable_cleanup_closed=True,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=self.timeout,
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        )

    async def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("forwarder not started")
        return self._session

    @property
    def address(self) -> tuple[str, int]:
        url = URL(self.base)
        return url.host or "", url.port or 80

    def _url(self, path: str, query: str) -> URL:
        # Built from parts, so nothing in the path can be re-read as a query or a fragment.
        # The base is parsed once (in __init__), not per request.
        scheme, host, port, prefix = self._base_parts
        return URL.build(scheme=scheme, host=host, port=port, path=prefix + path,
                         query_string=query, encoded=True)

    def _count_status(self, status: int) -> None:
        # labels() takes a lock and builds a key per call; a handful of children, kept here.
        cls = _status_class(status)
        child = self._status_children.get(cls)
        if child is None:
            child = self._status_children[cls] = self.metrics.upstream_responses.labels(
                status_class=cls)
        child.inc()

    async def forward(
        self,
        request: web.Request,
        *,
        path: str,
        query: str,
        identity: Identity | None,
        trusted_peer: bool,
        request_id: str,
    ) -> web.StreamResponse:
        headers = upstream_request_headers(
            request.headers,
            peer=request.remote,
            trusted=trusted_peer,
            scheme=request.scheme,
            identity=identity,
            hide_credentials=self.hide_credentials,
            host_override=self.host_header,
            request_id=request_id,
        )
        url = self._url(path, query)
        await self._take_slot()
        try:
            if _is_websocket(request):
                return await self._websocket(request, url, headers)
            if self.lean and self._pool is not None:
                target = self._prefix + path + (f"?{query}" if query else "")
                return await self._lean(request, self._pool, target, headers)
            return await self._http(request, url, headers)
        finally:
            self._slots.release()

    @staticmethod
    async def defer_continue(request: web.Request) -> web.StreamResponse | None:
        """`expect_handler` of the proxy route. aiohttp's default sends `100 Continue` as soon
        as the headers are in, before any middleware, which invites an unauthenticated client
        to upload its body. This one sends nothing: `_http` sends it once the request is
        allowed (rule 5), and a refused request gets its final answer at once."""
        if request.version == HttpVersion11 and not _expects_continue(request):
            # As aiohttp's default does: an expectation nobody here can meet. The expect
            # handler runs before any middleware, hence the table is applied here directly.
            exc = ExpectationFailed()
            info_of(request).outcome = outcome_of(exc)
            return error_response(exc)
        return None

    async def _take_slot(self) -> None:
        if not self._slots.locked():
            await self._slots.acquire()  # a slot is free: returns without suspending
            return
        try:
            async with asyncio.timeout(self.limits.pool_timeout):
                await self._slots.acquire()
        except TimeoutError:
            # Every connection is taken, typically by long SSE streams or WebSockets. 504, not
            # 503: the request was allowed and it is the upstream side that could not take it
            # in time, which is what a gateway timeout says (and what clients retry); 503 is
            # the sidecar's "cannot decide on authentication" (SPEC 7), which nginx setups map.
            self.metrics.upstream_responses.labels(status_class="timeout").inc()
            log.warning("no free upstream connection within %ss (all %d in use)",
                        self.limits.pool_timeout, self.limits.max_connections)
            raise UpstreamTimeout("No upstream connection became free in time") from None

    async def _http(
        self, request: web.Request, url: URL, headers: CIMultiDict[str]
    ) -> web.StreamResponse:
        data = request.content if request.body_exists else None
        if data is not None and _expects_continue(request):
            await request.writer.write(_CONTINUE)
            # Like aiohttp's own expect handler: the interim response is not part of the
            # response size the access log reports.
            request.writer.output_size = 0
        started = time.perf_counter()
        try:
            with upstream_errors(self.metrics, request):
                upstream = await self.session.request(
                    request.method, url, headers=headers, data=data,
                    allow_redirects=False, compress=None,
                    chunked=None if "Content-Length" in headers or data is None else True,
                )
        except UpstreamUnavailable as exc:
            log.warning("upstream request failed: %s", _cause(exc))
            raise
        except ClientClosed:
            # The upload was cut by the client: the upstream saw a broken request.
            raise

        elapsed = time.perf_counter() - started
        info_of(request).upstream_ms = round(elapsed * 1000, 3)
        self.metrics.upstream_latency.observe(elapsed)
        self._count_status(upstream.status)
        async with upstream:
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            response.headers.extend(downstream_response_headers(upstream.headers))
            info_of(request).stamp(response.headers)  # X-Request-Id, RateLimit-*
            return await _relay(request, response, upstream.content.iter_any())

    async def _lean(self, request: web.Request, pool: UpstreamPool, target: str,
                    headers: CIMultiDict[str]) -> web.StreamResponse:
        """`_http` on `sidecar.upstream`: same answers, same framing to the client."""
        content = request.content if request.body_exists else None
        if content is not None and _expects_continue(request):
            await request.writer.write(_CONTINUE)
            request.writer.output_size = 0
        method = request.method
        head, chunked = request_head(method, target, headers, has_body=content is not None,
                                     default_host=self._default_host)
        started = time.perf_counter()
        conn: UpstreamConnection | None = None
        sender: asyncio.Task[None] | None = None
        try:
            try:
                with upstream_errors(self.metrics, request):
                    conn = await pool.acquire()
                    conn.begin(head, head_request=method == "HEAD")
                    if content is None:
                        conn.body_sent = True
                    else:
                        sender = asyncio.create_task(_send_body(conn, content, chunked))
                    try:
                        await conn.read_head()
                    except UpstreamDisconnected:
                        # Rule 6 of sidecar.upstream: a pooled connection the upstream closed
                        # as we wrote on it; nothing of the request was read by anyone.
                        if not (conn.reused and not conn.received and content is None
                                and method in IDEMPOTENT):
                            raise
                        conn.close()
                        conn = await pool.connect()
                        conn.begin(head, head_request=method == "HEAD")
                        conn.body_sent = True
                        await conn.read_head()
            except UpstreamUnavailable as exc:
                log.warning("upstream request failed: %s", _cause(exc))
                raise
            assert conn.headers is not None
            elapsed = time.perf_counter() - started
            info_of(request).upstream_ms = round(elapsed * 1000, 3)
            self.metrics.upstream_latency.observe(elapsed)
            self._count_status(conn.status)
            headers = downstream_response_headers(conn.headers)
            info_of(request).stamp(headers)  # X-Request-Id, RateLimit-*
            reason = conn.reason or None
            whole = conn.buffered_whole()
            if whole is not None:
                if method != "HEAD":
                    # The length of what is sent, computed by aiohttp from the body, never
                    # the upstream's claim: a body that disagreed would spill onto the
                    # client's next response.
                    headers.popall("Content-Length", None)
                # The whole response is in: answered as a plain Response, which aiohttp writes
                # head and body in one write (Content-Length set from the body unless the
                # upstream's is kept; none for HEAD, 204 and 304).
                return web.Response(status=conn.status, reason=reason, body=whole,
                                    headers=headers)
            response = web.StreamResponse(status=conn.status, reason=reason, headers=headers)
            return await _relay(request, response, conn.body())
        finally:
            if sender is not None and not sender.done():
                # The upstream answered before the upload was whole: the connection is closed
                # below (body_sent is False), so the upstream never sees it complete.
                sender.cancel()
            if conn is not None:
                pool.release(conn)

    async def _websocket(
        self, request: web.Request, url: URL, headers: CIMultiDict[str]
    ) -> web.StreamResponse:
        fwd = CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in _WS_SKIP)
        protocols = tuple(
            p.strip() for v in request.headers.getall("Sec-WebSocket-Protocol", ())
            for p in v.split(",") if p.strip()
        )
        # aiohttp refuses a message of exactly `max_msg_size` bytes (`>=`); one more makes the
        # setting the largest message that passes.
        max_msg_size = self.limits.websocket_max_message + 1
        with upstream_errors(self.metrics, request):
            try:
                upstream_ws = await self.session.ws_connect(
                    url.with_scheme("wss" if url.scheme == "https" else "ws"),
                    headers=fwd, protocols=protocols, autoping=False, autoclose=False,
                    timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=10.0),
                    max_msg_size=max_msg_size,
                )
            except aiohttp.WSServerHandshakeError as exc:
                _count(self.metrics, _status_class(exc.status))
                if 400 <= exc.status < 500:
                    # The upstream answered and said no (its own auth, unknown path, rate
                    # limit): that answer is the client's, not a gateway failure.
                    return _handshake_refusal(exc.status, exc.headers)
                raise UpstreamUnavailable() from None
        self.metrics.upstream_responses.labels(status_class="1xx").inc()

        client_ws = web.WebSocketResponse(
            protocols=(upstream_ws.protocol,) if upstream_ws.protocol else (),
            autoping=False, autoclose=False, max_msg_size=max_msg_size,
        )
        info_of(request).stamp(client_ws.headers)  # kept by the handshake's own headers
        await client_ws.prepare(request)

        async def pump(
            src: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
            dst: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
        ) -> None:
            async for msg in src:
                if msg.type == WSMsgType.TEXT:
                    await dst.send_str(msg.data)
                elif msg.type == WSMsgType.BINARY:
                    await dst.send_bytes(msg.data)
                elif msg.type == WSMsgType.PING:
                    await dst.ping(msg.data)
                elif msg.type == WSMsgType.PONG:
                    await dst.pong(msg.data)
                elif msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                    break
            await dst.close(code=src.close_code or 1000)

        tasks = [
            asyncio.create_task(pump(client_ws, upstream_ws)),
            asyncio.create_task(pump(upstream_ws, client_ws)),
        ]
        try:
            _, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for t in pending:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            await upstream_ws.close()
            await client_ws.close()
        return client_ws


def _handshake_refusal(status: int, upstream_headers: MultiMapping[str] | None) -> web.Response:
    """The upstream's 4xx to a WebSocket handshake, with its headers (WWW-Authenticate,
    Retry-After, ...). ws_connect does not keep the body, so a Dify-shaped one stands in."""
    try:
        code = re.sub(r"[^a-z0-9]+", "_", HTTPStatus(status).phrase.lower()).strip("_")
    except ValueError:  # a status Python has no name for
        code = "upstream_refused"
    response = json_error(status, code, "Upstream refused the WebSocket handshake")
    if isinstance(upstream_headers, CIMultiDictProxy):
        for name, value in downstream_response_headers(upstream_headers).items():
            if name.lower() not in _REFUSAL_SKIP:
                response.headers.add(name, value)
    return response


async def _send_body(conn: UpstreamConnection, content: aiohttp.StreamReader,
                     chunked: bool) -> None:
    """The client's body to the upstream as it arrives. Any failure aborts the exchange: the
    upstream connection is cut, never left looking like a whole request."""
    try:
        while True:
            data = await content.readany()
            if not data:
                break
            if chunked:
                conn.write(b"%x\r\n%b\r\n" % (len(data), data))
            else:
                conn.write(data)
            await conn.drain()
        if chunked:
            conn.write(b"0\r\n\r\n")
        conn.body_sent = True
    except asyncio.CancelledError:
        conn.close()
        raise
    except Exception as exc:
        conn.abort(RequestBodyFailed(type(exc).__name__))


def _expects_continue(request: web.Request) -> bool:
    return (request.version == HttpVersion11
            and request.headers.get("Expect", "").lower() == "100-continue")


def _is_websocket(request: web.Request) -> bool:
    upgrade = request.headers.get("Upgrade", "").lower()
    connection = request.headers.get("Connection", "").lower()
    return upgrade == "websocket" and "upgrade" in connection and request.method == "GET"
