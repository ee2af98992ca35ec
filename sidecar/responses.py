"""The one table from domain errors to HTTP responses (Dify-shaped JSON bodies)."""

from __future__ import annotations

import orjson
from aiohttp import web

from sidecar.errors import (
    AuthUnavailable,
    RateLimited,
    SidecarError,
    Unauthorized,
    UpstreamTimeout,
    UpstreamUnavailable,
)

WWW_AUTHENTICATE = 'Bearer realm="api"'

# error class -> (status, code, outcome label)
_TABLE: tuple[tuple[type[SidecarError], int, str, str], ...] = (
    (Unauthorized, 401, "unauthorized", "unauthorized"),
    (RateLimited, 429, "too_many_requests", "rate_limited"),
    (AuthUnavailable, 503, "auth_unavailable", "unavailable"),
    (UpstreamUnavailable, 502, "bad_gateway", "allowed"),
    (UpstreamTimeout, 504, "gateway_timeout", "allowed"),
)


def json_error(status: int, code: str, message: str, headers: dict[str, str] | None = None,
               *, body: bool = True) -> web.Response:
    payload = orjson.dumps({"code": code, "message": message, "status": status})
    return web.Response(status=status, body=payload if body else None,
                        content_type="application/json", headers=headers)


def outcome_of(exc: SidecarError) -> str:
    for cls, _, _, outcome in _TABLE:
        if isinstance(exc, cls):
            return outcome
    return "error"


def error_response(exc: SidecarError) -> web.Response:
    for cls, status, code, _ in _TABLE:
        if isinstance(exc, cls):
            headers = {"WWW-Authenticate": WWW_AUTHENTICATE} if status == 401 else None
            if status == 503:
                headers = {"Retry-After": "1"}
            if isinstance(exc, RateLimited):
                headers = exc.headers
            return json_error(status, code, exc.message, headers)
    return json_error(500, "internal_error", "Internal error")
