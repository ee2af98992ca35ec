"""The one table from domain errors to HTTP responses (Dify-shaped JSON bodies), and
`answer_errors`, which applies it on both listeners.

Rules that hold here:
1. Every `SidecarError` has a row, found along its class's MRO (the most specific row wins);
   a test walks every subclass. Anything else a handler raises is a 500 that leaks nothing:
   the log says where it failed, the body says only "Internal error".
2. A row fixes status, code, outcome and the headers every such response carries; an error
   instance may add its own (the Retry-After and RateLimit-* of a RateLimited).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

import orjson
from aiohttp import web

from sidecar.errors import (
    AuthUnavailable,
    BadRequest,
    ClientClosed,
    ExpectationFailed,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    SidecarError,
    Unauthorized,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from sidecar.outcomes import Outcome
from sidecar.request_info import info_of

log = logging.getLogger("sidecar.responses")

WWW_AUTHENTICATE = 'Bearer realm="api"'

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class ErrorRow:
    status: int
    code: str
    outcome: Outcome
    headers: Mapping[str, str] = field(default_factory=dict)


_TABLE: dict[type[SidecarError], ErrorRow] = {
    Unauthorized: ErrorRow(401, "unauthorized", Outcome.UNAUTHORIZED,
                           {"WWW-Authenticate": WWW_AUTHENTICATE}),
    RateLimited: ErrorRow(429, "too_many_requests", Outcome.RATE_LIMITED),
    # Retry-After: the store is usually back (or a replica's cache warm) within seconds.
    AuthUnavailable: ErrorRow(503, "auth_unavailable", Outcome.UNAVAILABLE, {"Retry-After": "1"}),
    BadRequest: ErrorRow(400, "bad_request", Outcome.BAD_REQUEST),
    NotFound: ErrorRow(404, "not_found", Outcome.NOT_FOUND),
    PayloadTooLarge: ErrorRow(413, "payload_too_large", Outcome.BAD_REQUEST),
    ExpectationFailed: ErrorRow(417, "expectation_failed", Outcome.BAD_REQUEST),
    # The request was allowed; it is the upstream that failed it.
    UpstreamError: ErrorRow(502, "bad_gateway", Outcome.ALLOWED),
    UpstreamUnavailable: ErrorRow(502, "bad_gateway", Outcome.ALLOWED),
    UpstreamTimeout: ErrorRow(504, "gateway_timeout", Outcome.ALLOWED),
    ClientClosed: ErrorRow(499, "client_closed", Outcome.CLIENT_CLOSED),
}


def row_for(cls: type[SidecarError]) -> ErrorRow | None:
    for klass in cls.__mro__:
        row = _TABLE.get(klass)
        if row is not None:
            return row
    return None


def json_body(doc: object, status: int = 200, headers: Mapping[str, str] | None = None
              ) -> web.Response:
    """Every JSON response of the sidecar (errors, readiness, admin answers)."""
    return web.Response(body=orjson.dumps(doc), status=status, content_type="application/json",
                        headers=headers)


def json_error(status: int, code: str, message: str,
               headers: Mapping[str, str] | None = None) -> web.Response:
    return json_body({"code": code, "message": message, "status": status}, status, headers)


INTERNAL_ERROR = ErrorRow(500, "internal_error", Outcome.ERROR)


def error_response(exc: SidecarError) -> web.Response:
    row = row_for(type(exc))
    if row is None:  # rule 1 says this cannot happen; answer as for any other bug
        return json_error(500, INTERNAL_ERROR.code, "Internal error")
    return json_error(row.status, row.code, exc.message, {**row.headers, **exc.headers})


def outcome_of(exc: SidecarError) -> Outcome:
    row = row_for(type(exc))
    return row.outcome if row is not None else Outcome.ERROR


def client_gone(request: web.BaseRequest) -> bool:
    """The client's connection is closed or closing (aiohttp drops the transport on reset)."""
    transport = request.transport
    return transport is None or transport.is_closing()


async def answer_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Rule 1: `handler`'s response, or the response its error stands for. The outcome of an
    error is the table's, unless the handler already decided one (an allowed request the
    upstream failed stays `allowed`)."""
    try:
        return await handler(request)
    except SidecarError as exc:
        info = info_of(request)
        # A client that left is that, whatever was decided before it did.
        closed = isinstance(exc, ClientClosed)
        info.outcome = outcome_of(exc) if closed else info.outcome or outcome_of(exc)
        return error_response(exc)
    except web.HTTPException:
        raise
    except ConnectionResetError:  # aiohttp's ClientConnectionResetError too
        if not client_gone(request):
            raise
        info_of(request).outcome = Outcome.CLIENT_CLOSED
        return error_response(ClientClosed())
    except Exception:
        info = info_of(request)
        log.exception("unhandled error", extra={"fields": {"request_id": info.request_id}})
        info.outcome = info.outcome or Outcome.ERROR
        return json_error(500, INTERNAL_ERROR.code, "Internal error")


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Rule 1 as a middleware (the ops listener; the main one wraps its handlers in
    `Gate.handler`, which calls `answer_errors` itself)."""
    return await answer_errors(request, handler)
