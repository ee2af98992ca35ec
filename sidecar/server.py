"""The HTTP server side of both listeners, where aiohttp's own behaviour is not ours.

Rules that hold here:
1. A request aiohttp's parser refuses (a control character in a header, a line or header
   block over the limits, broken framing) is answered in the Dify shape of every other error,
   `{"code": "bad_request", ...}` (431 for sizes), and never quotes a byte of the request:
   aiohttp's own text/plain 400 echoes the offending line, and with it an Authorization
   header. The log line says what kind of error and from whom, never the bytes.
2. Such requests are counted like any other (`sidecar_requests_total{outcome="bad_request"}`).

Bounds on connections (SPEC 15). aiohttp has the keep-alive timeout (armed at connection start
too, so a silent new connection is closed by it, set from `ConnectionLimits`) and per-line
limits (8190 bytes a line or field, 128 fields: its defaults, kept). It has no deadline for the
header block, no stall timeout for a body, no cap on connections and no bound on a header
block as a whole; the handler here adds them:
3. Header deadline: from a connection's start, or the first byte of a later request, its
   request line and headers must be complete within `header_timeout`, else it is closed.
4. Header bytes: the bytes of an unfinished header block are counted as they arrive; beyond
   `max_header_bytes` the client gets 431 and the connection closes, so what an unfinished
   block holds is bounded by it (plus one read buffer), however many lines it has.
5. Body stall: while a handler runs and its body is unfinished, a body that sends nothing for
   `body_timeout` is failed (the reader raises, so an upstream request streaming it is
   aborted: the upstream never sees it complete) and the connection closes.
6. Cap: a connection beyond `max_connections` (aiohttp's and the decision fast path's
   together, `sidecar.fastpath`) is aborted at once, counted in
   `sidecar_client_connections_refused_total`, and logged at most once per 10 s.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from aiohttp.http_exceptions import LineTooLong
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from aiohttp.web_server import Server

from sidecar.fastpath import FastPath
from sidecar.gate import Handler
from sidecar.logs import AccessLog
from sidecar.metrics import NO_SCOPE_LABEL, Metrics
from sidecar.outcomes import Outcome

log = logging.getLogger("sidecar.server")

REFUSAL_LOG_INTERVAL = 10.0


class BodyTimeout(Exception):
    """The client's request body sent nothing for the body timeout."""


def _431() -> bytes:
    body = orjson.dumps({"code": "bad_request", "message": "Request header fields too large",
                         "status": 431})
    return (b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
            b"Content-Type: application/json\r\nConnection: close\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


_TOO_LARGE = _431()


@dataclass
class ConnectionLimits:
    """One listener's bounds (rules 3-6), and the refusal bookkeeping its connections share."""

    header_timeout: float
    keepalive_timeout: float
    body_timeout: float
    max_connections: int
    max_header_bytes: int
    listener: str = "main"
    metrics: Metrics | None = None
    _last_log: float = field(default=-REFUSAL_LOG_INTERVAL, repr=False)
    _unlogged: int = field(default=0, repr=False)

    def handler_args(self) -> dict[str, Any]:
        """The RequestHandler settings aiohttp has itself."""
        return {"keepalive_timeout": self.keepalive_timeout}

    def refused(self) -> None:
        if self.metrics is not None:
            self.metrics.connections_refused.labels(listener=self.listener).inc()
        self._unlogged += 1
        now = time.monotonic()
        if now - self._last_log >= REFUSAL_LOG_INTERVAL:
            log.warning("client connections refused: over the connection limit", extra={
                "fields": {"listener": self.listener, "limit": self.max_connections,
                           "refused": self._unlogged}})
            self._last_log, self._unlogged = now, 0


# The ops listener's fixed bounds: probes and scrapes are short and few.
def ops_limits(metrics: Metrics | None) -> ConnectionLimits:
    return ConnectionLimits(header_timeout=10.0, keepalive_timeout=75.0, body_timeout=10.0,
                            max_connections=64, max_header_bytes=16384, listener="ops",
                            metrics=metrics)


class _SidecarRequestHandler(RequestHandler):
    metrics: Metrics | None = None
    limits: ConnectionLimits | None = None
    _refused = False
    _header_bytes = 0
    # Heads parsed and requests finished: between the two, bytes belong to a message (its
    # body), not to a next header block. aiohttp's own flags leave a gap: the handler task
    # of a parsed message may not have started yet when more of its body arrives.
    _heads = 0
    _finished = 0
    _header_timer: asyncio.TimerHandle | None = None
    _body_timer: asyncio.TimerHandle | None = None
    _last_data = 0.0

    # Rule 6
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        limits = self.limits
        manager = self._manager
        assert isinstance(manager, _SidecarServer)
        if limits is not None and manager.open_connections() >= limits.max_connections:
            self._refused = True
            limits.refused()
            if isinstance(transport, asyncio.Transport):
                transport.abort()  # RST: no FIN_WAIT state kept for a refused client
            else:
                transport.close()
            return
        super().connection_made(transport)
        self._arm_header_timer()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._refused:
            return
        for timer in (self._header_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        super().connection_lost(exc)

    def _waiting_for_headers(self) -> bool:
        return (self._heads == self._finished and not self._request_in_progress
                and not self._messages and not self._upgraded)

    # Rule 3
    def _arm_header_timer(self) -> None:
        if self._header_timer is None and self.limits is not None:
            self._header_timer = self._loop.call_later(self.limits.header_timeout,
                                                       self._header_deadline)

    def _header_deadline(self) -> None:
        self._header_timer = None
        # An idle keep-alive connection (no byte of a next request) is the keep-alive
        # timeout's; a new connection that sent nothing, or a partial block, is ours.
        if self._waiting_for_headers() and (self._header_bytes or not self._request_count):
            self._close_now()

    def _close_now(self) -> None:
        self.force_close()
        if self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        limits = self.limits
        if limits is None or self._force_close or self._close:
            super().data_received(data)
            return
        self._last_data = self._loop.time()
        if not self._waiting_for_headers():
            super().data_received(data)
            return
        before = self._request_count
        super().data_received(data)
        if self._request_count != before:
            # A whole header block arrived: the deadline and the count start over.
            self._heads += self._request_count - before
            self._header_bytes = 0
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None
            return
        self._header_bytes += len(data)
        self._arm_header_timer()
        if self._header_bytes > limits.max_header_bytes and not self._force_close:  # rule 4
            log.info("request refused: header block too large",
                     extra={"fields": {"status": 431, "listener": limits.listener}})
            if self.metrics is not None:
                self.metrics.request_counter(Outcome.BAD_REQUEST, NO_SCOPE_LABEL).inc()
            if self.transport is not None:
                self.transport.write(_TOO_LARGE)
            self._close_now()

    # Rule 5
    async def _handle_request(self, request: BaseRequest, start_time: float | None,
                              request_handler: Any) -> tuple[web.StreamResponse, bool]:
        self._last_data = self._loop.time()
        self._watch_body(request)
        try:
            return await super()._handle_request(request, start_time, request_handler)
        finally:
            self._finished += 1
            if self._body_timer is not None:
                self._body_timer.cancel()
                self._body_timer = None

    def _watch_body(self, request: BaseRequest) -> None:
        self._body_timer = None
        if self.limits is None or request.content.is_eof():
            return
        timeout = self.limits.body_timeout
        idle = self._loop.time() - self._last_data
        if idle < timeout:
            self._body_timer = self._loop.call_later(timeout - idle, self._watch_body, request)
            return
        request.content.set_exception(BodyTimeout("client body timeout"))
        log.info("client body stalled; request aborted", extra={"fields": {
            "listener": self.limits.listener, "timeout_s": timeout}})
        self._close_now()

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status >= 500:
            return super().handle_error(request, status, exc, message)
        if request.writer.output_size > 0:
            # As aiohttp: part of an answer is out, no other can follow.
            raise ConnectionError("Response is sent already, cannot send another response")
        if isinstance(exc, LineTooLong):
            status, text = 431, "Request header fields too large"
        else:
            text = "Malformed request"
        log.info("malformed request refused", extra={"fields": {
            "status": status, "error": type(exc).__name__ if exc else None,
            "remote": request.remote}})
        if self.metrics is not None:
            self.metrics.request_counter(Outcome.BAD_REQUEST, NO_SCOPE_LABEL).inc()
        body = orjson.dumps({"code": "bad_request", "message": text, "status": status})
        response = web.Response(status=status, body=body, content_type="application/json")
        response.force_close()
        return response


class _SidecarServer(Server):
    metrics: Metrics | None = None
    limits: ConnectionLimits | None = None
    fast: FastPath | None = None

    def __call__(self) -> asyncio.Protocol:  # type: ignore[override]
        # A new connection starts on the decision fast path when there is one; it hands
        # the connection to `make_handler()` at the first request it does not answer.
        return self.fast() if self.fast is not None else self.make_handler()

    def make_handler(self) -> RequestHandler:
        handler = _SidecarRequestHandler(self, loop=self._loop, **self._kwargs)
        handler.metrics = self.metrics
        handler.limits = self.limits
        return handler

    def open_connections(self) -> int:
        """Connections of this listener, aiohttp's and the fast path's (rule 6)."""
        return len(self._connections) + (len(self.fast.connections) if self.fast else 0)

    def pre_shutdown(self) -> None:
        super().pre_shutdown()
        if self.fast is not None:
            self.fast.close_idle()

    async def shutdown(self, timeout: float | None = None) -> None:  # noqa: ASYNC109 (aiohttp's)
        if self.fast is None:
            await super().shutdown(timeout)
            return
        await asyncio.gather(super().shutdown(timeout), self.fast.shutdown(timeout))


class SidecarRunner(web.AppRunner):
    """An AppRunner whose connections answer parser errors by rule 1, and start on the
    decision fast path (`sidecar.fastpath`) when given its handler."""

    def __init__(self, app: web.Application, *, metrics: Metrics | None = None,
                 limits: ConnectionLimits | None = None, fast_handler: Handler | None = None,
                 fast_access_log: AccessLog | None = None, **kwargs: Any) -> None:
        super().__init__(app, **({**limits.handler_args(), **kwargs} if limits else kwargs))
        self._metrics = metrics
        self._limits = limits
        self._fast_handler = fast_handler
        self._fast_access_log = fast_access_log

    async def _make_server(self) -> Server:
        server = await super()._make_server()
        # aiohttp builds its Server inside Application._make_handler; the subclass only
        # changes which RequestHandler each connection gets.
        server.__class__ = _SidecarServer
        assert isinstance(server, _SidecarServer)
        server.metrics = self._metrics
        server.limits = self._limits
        if self._fast_handler is not None and self._limits is not None:
            server.fast = FastPath(
                self._fast_handler, limits=self._limits, access_log=self._fast_access_log,
                handoff=server.make_handler, open_connections=server.open_connections,
                client_max_size=self._app._client_max_size)
        return server
