"""Per-request facts the sidecar learns (scope, outcome, ids), for metrics and the access log."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web
from multidict import CIMultiDict

from sidecar.outcomes import Outcome


@dataclass(slots=True)
class RequestInfo:
    """What the sidecar learned about one request, for metrics and the access log."""

    request_id: str = ""
    judged_path: str | None = None  # the decision endpoint: the original request's path
    scope: str | None = None
    outcome: Outcome | None = None
    token_id: str | None = None
    tenant_id: str | None = None
    upstream_ms: float | None = None
    # RateLimit-* headers of an allowed request, for its response (SPEC 9).
    rate_headers: dict[str, str] | None = None

    def stamp(self, headers: CIMultiDict[str]) -> None:
        """Add the headers every response of the main listener carries: `X-Request-Id`, and
        an allowed request's `RateLimit-*`. Called where a response is built, before it is
        prepared (a streamed or WebSocket response cannot take headers afterwards)."""
        if self.request_id:
            headers["X-Request-Id"] = self.request_id
        if self.rate_headers and self.outcome == Outcome.ALLOWED:
            headers.update(self.rate_headers)


REQUEST_INFO = web.RequestKey("sidecar.request_info", RequestInfo)


def info_of(request: web.BaseRequest) -> RequestInfo:
    """The request's RequestInfo, created on first use."""
    info = request.get(REQUEST_INFO)
    if info is None:
        info = request[REQUEST_INFO] = RequestInfo()
    return info
