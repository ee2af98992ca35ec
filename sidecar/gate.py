"""One request's way through the main listener, top to bottom:

    request id -> route (public? scope?) -> credentials -> Authenticator -> record last use
               -> Forwarder (proxy mode) or identity headers (decision endpoint)

Rules that hold here:
1. Every error becomes a response in one place (`gate_middleware`), through the one table in
   `sidecar.responses`; anything unexpected is a 500 that leaks nothing.
2. Identity headers a client sent are never copied anywhere: the Forwarder builds the
   upstream headers from scratch and skips them, and decisions only carry our own.
3. The outcome and scope of each request are stored on the request for metrics and the
   access log; labels come from fixed sets.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from sidecar.credentials import parse_authorization
from sidecar.errors import (
    AuthUnavailable,
    InvalidToken,
    RateLimited,
    SidecarError,
    Unauthorized,
)
from sidecar.models import Identity
from sidecar.request_info import info_of
from sidecar.responses import error_response, json_error, outcome_of
from sidecar.routing import INVALID_TARGET_RE, normalize_path
from sidecar.services import SERVICES, Services

log = logging.getLogger("sidecar.gate")

# A client's X-Request-Id is passed on only if it is short and plain (it reaches logs).
REQUEST_ID_PATTERN = r"^[A-Za-z0-9._:/+=-]{1,128}$"
_REQUEST_ID_RE = re.compile(REQUEST_ID_PATTERN)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def request_id_of(request: web.Request) -> str:
    given = request.headers.get("X-Request-Id", "")
    return given if _REQUEST_ID_RE.match(given) else os.urandom(16).hex()


@web.middleware
async def gate_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    svc = request.app[SERVICES]
    metrics = svc.metrics
    info = info_of(request)
    info.request_id = request_id_of(request)
    metrics.in_flight.inc()
    try:
        try:
            response = await handler(request)
        except SidecarError as exc:
            info.outcome = info.outcome or outcome_of(exc)
            response = error_response(exc)
        except web.HTTPException:
            raise
        except Exception:
            log.exception("unhandled error", extra={"fields": {"request_id": info.request_id}})
            info.outcome = info.outcome or "error"
            response = json_error(500, "internal_error", "Internal error")
        if not response.prepared:
            response.headers["X-Request-Id"] = info.request_id
            if info.rate_headers and info.outcome == "allowed":
                response.headers.update(info.rate_headers)
        return response
    finally:
        metrics.in_flight.dec()
        metrics.request_counter(info.outcome or "error", info.scope or "none").inc()


async def authorize(
    request: web.Request, svc: Services, method: str, raw_path: str
) -> Identity | None:
    """Decide on a request for (method, raw path): the Identity, None for a public route,
    or raise Unauthorized / RateLimited / AuthUnavailable."""
    info = info_of(request)
    scope = svc.router.required_scope(method, raw_path)
    if scope is None:
        info.outcome = "public"
        return None
    info.scope = scope
    started = time.perf_counter()
    outcome = "error"  # until proven otherwise: a 500 is never counted as an allowed request
    try:
        token = parse_authorization(
            request.headers.getall("Authorization", ()), svc.settings.max_token_length
        )
        if not scope:
            # No scope route covers the path: no token can be right, so ask nobody.
            raise InvalidToken()
        identity = await svc.authenticator.authenticate(token, scope)
        if svc.limiter.enabled:
            verdict = await svc.limiter.check(identity)
            if verdict is not None:
                info.rate_headers = verdict.headers()
        outcome = "allowed"
    except Unauthorized:
        outcome = "unauthorized"
        raise
    except RateLimited:
        outcome = "rate_limited"
        raise
    except AuthUnavailable:
        outcome = "unavailable"
        raise
    finally:
        info.outcome = outcome
        svc.metrics.auth_timer(outcome).observe(time.perf_counter() - started)
    info.token_id = identity.token_id
    info.tenant_id = identity.tenant_id
    svc.usage.record(identity.token_id)
    return identity


async def proxy_handler(request: web.Request) -> web.StreamResponse:
    svc = request.app[SERVICES]
    forwarder = svc.forwarder
    if forwarder is None:  # decision-only mode
        return await not_found(request)
    raw_path, _, query = request.raw_path.partition("?")
    if INVALID_TARGET_RE.search(request.raw_path):
        # e.g. `/v1/datasets#x`: matched as `/v1/datasets#x` but sent upstream as `/v1/datasets`
        # by any client library that reads `#` as a fragment. Refuse rather than guess.
        info_of(request).outcome = "bad_request"
        return json_error(400, "bad_request", "Invalid characters in the request target")
    identity = await authorize(request, svc, request.method, raw_path)
    return await forwarder.forward(
        request,
        path=normalize_path(raw_path),
        query=query,
        identity=identity,
        trusted_peer=svc.is_trusted(request.remote),
        request_id=info_of(request).request_id,
    )


async def not_found(request: web.Request) -> web.StreamResponse:
    info_of(request).outcome = "not_found"
    return json_error(404, "not_found", "Not found")
