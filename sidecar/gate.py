"""One request's way through the main listener, top to bottom:

    request id -> route (public? scope?) -> credentials -> Authenticator -> rate limit
               -> record last use -> Forwarder (proxy mode) or identity headers (decision)

Rules that hold here:
1. The `Gate` holds exactly what deciding on a request needs, passed in by `create_app`;
   handlers get the Gate (and the Forwarder) from their factories, never from a bag on the app.
2. Errors are raised, and become responses in one place (`sidecar.responses`).
3. Identity headers a client sent are never copied anywhere: the Forwarder builds the
   upstream headers from scratch and skips them, and decisions only carry our own.
4. The outcome and scope of each request are stored on the request for metrics and the
   access log; labels come from fixed sets (`Outcome`, the configured scopes).
5. Headers every response carries (`X-Request-Id`, an allowed request's `RateLimit-*`) are
   added by `RequestInfo.stamp` where a response is built: in `Gate.handler` for every
   response a handler returns unprepared (errors, decisions), in the Forwarder before it
   prepares a streamed or WebSocket response.
6. Every route of the main listener is wrapped in `Gate.handler`, and the main app has no
   middleware and no `on_response_prepare` hook: per request, one wrapper does what two
   middlewares and a signal did (they were a fifth of a decision's cost).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from aiohttp import web

from sidecar.credentials import parse_authorization
from sidecar.errors import (
    AuthUnavailable,
    BadRequest,
    InvalidToken,
    NotFound,
    RateLimited,
    Unauthorized,
)
from sidecar.outcomes import Outcome
from sidecar.request_info import REQUEST_INFO, RequestInfo, info_of
from sidecar.responses import answer_errors, client_gone
from sidecar.routing import INVALID_TARGET_RE, NO_SCOPE, normalize_path
from sidecar.trust import IPNetwork, peer_trusted

if TYPE_CHECKING:
    from sidecar.auth import Authenticator
    from sidecar.last_used import LastUsedQueue
    from sidecar.metrics import Metrics
    from sidecar.models import Identity
    from sidecar.proxy import Forwarder
    from sidecar.ratelimit import RateLimiter
    from sidecar.routing import Router

# A client's X-Request-Id is passed on only if it is short and plain (it reaches logs).
REQUEST_ID_PATTERN = r"^[A-Za-z0-9._:/+=-]{1,128}$"
_REQUEST_ID_RE = re.compile(REQUEST_ID_PATTERN)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_TRUST_CACHE_SIZE = 4096


class RequestIds:
    """Request ids of this process: 64 random bits drawn at start, then a counter, as 32 hex
    digits (the length of the 128 random bits drawn per request before, which cost more than
    the decision they label). Unique across replicas and workers as long as no two processes
    draw the same prefix (one chance in 2**32 among 2**16 processes), and in a process by the
    counter. They are labels for logs, never credentials: a neighbour being guessable from
    one id gives nothing away. A forked child draws its own prefix."""

    def __init__(self) -> None:
        self.reset()
        os.register_at_fork(after_in_child=self.reset)

    def reset(self) -> None:
        self._prefix = os.urandom(8).hex()
        self._counter = itertools.count(1)

    def next(self) -> str:
        return f"{self._prefix}{next(self._counter) & 0xFFFFFFFFFFFFFFFF:016x}"


_IDS = RequestIds()


def request_id_of(request: web.Request) -> str:
    given = request.headers.get("X-Request-Id")
    if given is not None and _REQUEST_ID_RE.match(given):
        return given
    return _IDS.next()


@dataclass(frozen=True, slots=True)
class Gate:
    router: Router
    authenticator: Authenticator
    limiter: RateLimiter
    last_used: LastUsedQueue
    metrics: Metrics
    max_token_length: int
    trusted_proxies: tuple[IPNetwork, ...]
    # peer address -> trusted? Asked on every request, by a few distinct peers (the proxies).
    _trust: dict[str, bool] = field(default_factory=dict, repr=False, compare=False)

    def is_trusted(self, peer: str | None) -> bool:
        if peer is None:
            return False
        known = self._trust.get(peer)
        if known is None:
            if len(self._trust) >= _TRUST_CACHE_SIZE:
                self._trust.clear()  # a flood of distinct clients: start over, stay bounded
            known = self._trust[peer] = peer_trusted(peer, self.trusted_proxies)
        return known

    def handler(self, inner: Handler) -> Handler:
        """`inner` with the request id, the in-flight gauge, the error table
        (`answer_errors`), the per-request counter (rule 4) and the headers of rule 5.
        Errors are counted with the outcome the table gives them."""
        metrics = self.metrics
        in_flight = metrics.in_flight
        counter = metrics.request_counter

        async def handle(request: web.Request) -> web.StreamResponse:
            info = request[REQUEST_INFO] = RequestInfo(request_id_of(request))
            in_flight.inc()
            try:
                try:
                    response = await answer_errors(request, inner)
                except web.HTTPException as exc:
                    # As aiohttp would answer it, but with our headers (none raised today).
                    response = web.Response(status=exc.status, reason=exc.reason,
                                            text=exc.text, headers=exc.headers)
                if not response.prepared:
                    info.stamp(response.headers)
                return response
            except asyncio.CancelledError:
                # aiohttp cancels the handler when the client's connection is lost (if the
                # runner asks it to): the client left, nothing failed.
                if client_gone(request):
                    info.outcome = Outcome.CLIENT_CLOSED
                raise
            finally:
                in_flight.dec()
                scope = info.scope if info.scope is not None else NO_SCOPE.value
                counter(info.outcome or Outcome.ERROR, scope).inc()

        return handle

    async def authorize(self, request: web.Request, method: str, raw_path: str
                        ) -> Identity | None:
        """Decide on a request for (method, raw path): the Identity, None for a public route,
        or raise Unauthorized / RateLimited / AuthUnavailable."""
        info = info_of(request)
        scope = self.router.required_scope(method, raw_path)
        if scope is None:
            info.outcome = Outcome.PUBLIC
            return None
        info.scope = scope.value if scope is NO_SCOPE else scope
        started = time.perf_counter()
        # Until proven otherwise: a 500 is never counted as an allowed request.
        outcome = Outcome.ERROR
        try:
            token = parse_authorization(
                request.headers.getall("Authorization", ()), self.max_token_length
            )
            if scope is NO_SCOPE:
                # No scope route covers the path: no token can be right, so ask nobody.
                raise InvalidToken()
            identity = await self.authenticator.authenticate(token, scope)
            if self.limiter.enabled:
                verdict = await self.limiter.check(identity)
                if verdict is not None:
                    info.rate_headers = verdict.headers()
            outcome = Outcome.ALLOWED
        except Unauthorized:
            outcome = Outcome.UNAUTHORIZED
            raise
        except RateLimited:
            outcome = Outcome.RATE_LIMITED
            raise
        except AuthUnavailable:
            outcome = Outcome.UNAVAILABLE
            raise
        finally:
            info.outcome = outcome
            self.metrics.auth_timer(outcome).observe(time.perf_counter() - started)
        info.token_id = identity.token_id
        info.tenant_id = identity.tenant_id
        self.last_used.record(identity.token_id)
        return identity


def make_proxy_handler(gate: Gate, forwarder: Forwarder) -> Handler:
    async def proxy_handler(request: web.Request) -> web.StreamResponse:
        target = request.raw_path
        if INVALID_TARGET_RE.search(target):
            # e.g. `/v1/datasets#x`: matched as `/v1/datasets#x` but sent upstream as
            # `/v1/datasets` by any client library that reads `#` as a fragment. Refuse
            # rather than guess.
            raise BadRequest("Invalid characters in the request target")
        if not target.startswith("/"):
            target = _origin_form(target)
        raw_path, _, query = target.partition("?")
        # The access log names this path: the one judged and forwarded.
        info_of(request).judged_path = raw_path
        identity = await gate.authorize(request, request.method, raw_path)
        return await forwarder.forward(
            request,
            path=normalize_path(raw_path),
            query=query,
            identity=identity,
            trusted_peer=gate.is_trusted(request.remote),
            request_id=info_of(request).request_id,
        )

    return proxy_handler


def _origin_form(target: str) -> str:
    """The path and query of an absolute-form target (`GET http://host/v1/x`, RFC 9112
    3.2.2), which is judged and forwarded like `GET /v1/x`; anything else is refused."""
    try:
        parts = urlsplit(target)
    except ValueError:  # e.g. an unclosed IPv6 literal
        raise BadRequest("Invalid request target") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        raise BadRequest("Invalid request target")
    return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")


async def not_found(request: web.Request) -> web.StreamResponse:
    """Every path but the decision endpoint in decision-only mode."""
    raise NotFound()
