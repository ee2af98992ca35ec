"""Header hygiene (SPEC 5, 6): what a client may not send on, and what the sidecar adds.

Rules that hold here:
1. Identity header names are compared after lower-casing and mapping every character other
   than a letter or digit to `-`, because several servers (gunicorn/werkzeug, CGI, PHP) read
   `X_Tenant_Id` or even `X.Tenant.Id` as `X-Tenant-Id`.
2. Forwarding headers from a client are believed only when its peer address is trusted
   (`sidecar.trust`).
"""

from __future__ import annotations

import functools
import re

from multidict import CIMultiDict, CIMultiDictProxy

from sidecar.models import Identity

IDENTITY_HEADERS = ("X-Tenant-Id", "X-App-Id", "X-Api-Token-Id", "X-Api-Token-Scope")
_IDENTITY = frozenset(h.lower() for h in IDENTITY_HEADERS)

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
    "trailer", "trailers", "transfer-encoding", "upgrade", "proxy-connection",
})

# Set by the sidecar itself from what it saw; a copy from an untrusted client is dropped.
_FORWARDING = frozenset({
    "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-forwarded-port",
    "x-forwarded-uri", "x-forwarded-method", "x-forwarded-prefix", "forwarded", "x-real-ip",
    "x-original-uri", "x-original-method", "x-original-url",
})


_NOT_ALNUM = re.compile(r"[^0-9a-z]")


@functools.lru_cache(maxsize=1024)
def canonical(name: str) -> str:
    # Cached: it runs for every header of every proxied request, over few distinct names.
    return _NOT_ALNUM.sub("-", name.lower())


def is_identity(name: str) -> bool:
    return canonical(name) in _IDENTITY


def identity_headers(identity: Identity) -> dict[str, str]:
    return {
        "X-Tenant-Id": identity.tenant_id,
        "X-App-Id": identity.app_id,
        "X-Api-Token-Id": identity.token_id,
        "X-Api-Token-Scope": identity.scope,
    }


def connection_tokens(headers: CIMultiDictProxy[str]) -> frozenset[str]:
    """Header names listed in `Connection:`; they are hop-by-hop for this message too."""
    names: set[str] = set()
    for value in headers.getall("Connection", ()):
        names.update(t.strip().lower() for t in value.split(",") if t.strip())
    return frozenset(names)


def upstream_request_headers(
    headers: CIMultiDictProxy[str],
    *,
    peer: str | None,
    trusted: bool,
    scheme: str,
    identity: Identity | None,
    hide_credentials: bool,
    host_override: str | None,
    request_id: str,
) -> CIMultiDict[str]:
    # `Expect` too: the sidecar meets the client's 100-continue itself (sidecar.proxy rule 5);
    # passing it on would make the upstream answer an expectation nobody waits for.
    drop = HOP_BY_HOP | connection_tokens(headers) | {"expect"}
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        low = name.lower()
        if low in drop or is_identity(name) or low == "x-request-id":
            continue
        if low in _FORWARDING and not trusted:
            continue
        if low in ("x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"):
            continue  # rebuilt below
        if hide_credentials and low == "authorization":
            continue
        out.add(name, value)

    prior_xff = ", ".join(headers.getall("X-Forwarded-For", ())) if trusted else ""
    if peer:
        out["X-Forwarded-For"] = f"{prior_xff}, {peer}" if prior_xff else peer
    elif prior_xff:
        out["X-Forwarded-For"] = prior_xff
    proto = headers.get("X-Forwarded-Proto") if trusted else None
    out["X-Forwarded-Proto"] = proto or scheme
    host = headers.get("Host", "")
    fwd_host = headers.get("X-Forwarded-Host") if trusted else None
    if fwd_host or host:
        out["X-Forwarded-Host"] = fwd_host or host
    if host_override:
        out["Host"] = host_override
    out["X-Request-Id"] = request_id
    if identity is not None:
        out.update(identity_headers(identity))
    return out


def downstream_response_headers(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    drop = HOP_BY_HOP | connection_tokens(headers)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        if name.lower() not in drop:
            out.add(name, value)
    return out
