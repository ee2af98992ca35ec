"""The HTTP server side of both listeners, where aiohttp's own behaviour is not ours.

Rules that hold here:
1. A request aiohttp's parser refuses (a control character in a header, a line or header
   block over the limits, broken framing) is answered in the Dify shape of every other error,
   `{"code": "bad_request", ...}` (431 for sizes), and never quotes a byte of the request:
   aiohttp's own text/plain 400 echoes the offending line, and with it an Authorization
   header. The log line says what kind of error and from whom, never the bytes.
2. Such requests are counted like any other (`sidecar_requests_total{outcome="bad_request"}`).
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from aiohttp import web
from aiohttp.http_exceptions import LineTooLong
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from aiohttp.web_server import Server

from sidecar.metrics import NO_SCOPE_LABEL, Metrics
from sidecar.outcomes import Outcome

log = logging.getLogger("sidecar.server")


class _SidecarRequestHandler(RequestHandler):
    metrics: Metrics | None = None

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

    def __call__(self) -> RequestHandler:
        handler = _SidecarRequestHandler(self, loop=self._loop, **self._kwargs)
        handler.metrics = self.metrics
        return handler


class SidecarRunner(web.AppRunner):
    """An AppRunner whose connections answer parser errors by rule 1."""

    def __init__(self, app: web.Application, *, metrics: Metrics | None = None,
                 **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._metrics = metrics

    async def _make_server(self) -> Server:
        server = await super()._make_server()
        # aiohttp builds its Server inside Application._make_handler; the subclass only
        # changes which RequestHandler each connection gets.
        server.__class__ = _SidecarServer
        assert isinstance(server, _SidecarServer)
        server.metrics = self._metrics
        return server
