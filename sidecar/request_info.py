"""Per-request facts the sidecar learns (scope, outcome, ids), for metrics and the access log."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

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


REQUEST_INFO = web.RequestKey("sidecar.request_info", RequestInfo)


def info_of(request: web.BaseRequest) -> RequestInfo:
    """The request's RequestInfo, created on first use."""
    info = request.get(REQUEST_INFO)
    if info is None:
        info = request[REQUEST_INFO] = RequestInfo()
    return info
