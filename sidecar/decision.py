"""The decision endpoint `/_sidecar/auth` (SPEC 7): allow or deny a request that another proxy
(nginx `auth_request`, Traefik `ForwardAuth`, Envoy `ext_authz`) is about to forward itself.

Rules that hold here:
1. The request judged is the one a proxy describes, never one a client describes:
   * the path after `/_sidecar/auth` (Envoy `path_prefix`, which keeps the original method) is
     built by the proxy from the request it holds, so it is used whoever the peer is;
   * `X-Original-URI`/`X-Original-Method` (nginx) and `X-Forwarded-Uri`/`X-Forwarded-Method`
     (Traefik) are read only from peers in SIDECAR_TRUSTED_PROXIES. From any other peer the
     request is judged on its own path and method; a bare `/_sidecar/auth` then describes no
     request at all and is answered 400, never judged as `/` (which would let a token of the
     `/` scope pass for any path a misconfigured proxy forwards).
2. A trusted proxy passes the client's other headers through (Traefik copies all of them into
   the auth request, an nginx subrequest carries them too), so a client can add the family of
   headers that proxy does not set. Every description present must therefore agree (as paths
   normalised for forwarding, so mere spellings of one path do), or the answer is 400: a
   client can make its own request fail, never make it pass as a different one.
3. The decision itself is `Gate.authorize`: the same routing, credentials, cache tiers,
   last-used queue and metrics as a proxied request. Its errors (and this module's
   `BadDecisionRequest`s) become 400/401/429/503 responses in the error middleware, like
   everywhere else.
4. 200 has an empty body and carries only headers set here: the identity headers of the token
   (none on a public route), and for Envoy the list of identity-header spellings it must strip
   from the client's request. Identity headers the client sent are never read.
"""

from __future__ import annotations

import itertools
import logging
import re
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from aiohttp import web
from multidict import CIMultiDict

from sidecar.errors import BadDecisionRequest, NotFound, UndescribedRequest
from sidecar.gate import Gate, Handler
from sidecar.headers import IDENTITY_HEADERS, identity_headers
from sidecar.request_info import info_of
from sidecar.routing import INVALID_TARGET_RE, normalize_path

log = logging.getLogger("sidecar.decision")

DECISION_PATH = "/_sidecar/auth"
# `/_sidecar/auth` and `/_sidecar/auth/...` only: `/_sidecar/authx` is an ordinary path.
# `[\s\S]`, not `.`: the router matches the decoded path, and a `%0A` in it must not send
# the request past this endpoint (to the proxy, or to a plain-text 404).
DECISION_ROUTE = DECISION_PATH + r"{tail:(?:/[\s\S]*)?}"

# (uri header, method header) per proxy family, in the order they are reported in errors.
ORIGINAL_HEADERS = (
    ("X-Original-URI", "X-Original-Method"),  # nginx auth_request
    ("X-Forwarded-Uri", "X-Forwarded-Method"),  # Traefik ForwardAuth
)

# Envoy's HTTP ext_authz removes the request headers named here (on 200 only), after it has
# set the `allowed_upstream_headers`. So the canonical names may be listed only when no
# identity is set (public route); the `_` spellings, which some upstreams read as the `-` ones
# (SPEC 5), are different names and are always listed.
ENVOY_REMOVE_HEADER = "x-envoy-auth-headers-to-remove"


def _spellings(name: str) -> list[str]:
    parts = name.lower().split("-")
    return [
        parts[0] + "".join(sep + part for sep, part in zip(seps, parts[1:], strict=True))
        for seps in itertools.product("-_", repeat=len(parts) - 1)
    ]


_CANONICAL = [h.lower() for h in IDENTITY_HEADERS]
_VARIANTS = [s for h in IDENTITY_HEADERS for s in _spellings(h) if s not in _CANONICAL]
_REMOVE_ON_ALLOW = ", ".join(_VARIANTS)
_REMOVE_ON_PUBLIC = ", ".join(_CANONICAL + _VARIANTS)
# Built once: the 200 of a public route is always the same (Response copies it).
_PUBLIC_HEADERS: CIMultiDict[str] = CIMultiDict({ENVOY_REMOVE_HEADER: _REMOVE_ON_PUBLIC})

METHOD_PATTERN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,32}"  # an RFC 9110 token
_METHOD_RE = re.compile(METHOD_PATTERN)
OWS = " \t"  # RFC 9110 optional whitespace

_UNTRUSTED_WARNING_INTERVAL = 60.0


class NotDecisionPath(Exception):
    """The router sent a normalised spelling of the endpoint here (`/_sidecar/./auth`)."""


@dataclass(frozen=True, slots=True)
class OriginalRequest:
    """The request to decide on: its method and raw (still percent-encoded) path."""

    method: str
    path: str


def _path_of(target: str, source: str) -> str:
    """The raw path of a request target in origin form (`/p?q`) or absolute form."""
    if INVALID_TARGET_RE.search(target):
        raise BadDecisionRequest(f"{source} is not a valid request target")
    if target.startswith("/"):
        return target.partition("?")[0]
    try:
        parts = urlsplit(target)
    except ValueError:  # e.g. an unclosed IPv6 literal
        parts = None
    if parts is None or parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        raise BadDecisionRequest(f"{source} is not a valid request target")
    return parts.path or "/"


def _tail_of(raw_target: str) -> str:
    """What follows `/_sidecar/auth` in the raw target, `""` for the bare endpoint."""
    path = _path_of(raw_target, "the request path")
    if not path.startswith(DECISION_PATH):
        raise NotDecisionPath()
    tail = path[len(DECISION_PATH):]
    if tail and not tail.startswith("/"):
        raise NotDecisionPath()
    return tail


def original_request(request: web.BaseRequest, *, trusted: bool) -> OriginalRequest:
    """Which request the caller asks about (rules 1 and 2)."""
    tail = _tail_of(request.raw_path)
    if not trusted:
        if not tail:
            # Fail closed: judging the bare endpoint as `/` would let a token of the `/` scope
            # pass for whatever path a proxy we do not trust (a missing
            # SIDECAR_TRUSTED_PROXIES entry, most likely) is about to forward.
            ignored = tuple(h for pair in ORIGINAL_HEADERS for h in pair
                            if h in request.headers)
            raise UndescribedRequest(ignored)
        return OriginalRequest(request.method.upper(), tail)

    paths: list[tuple[str, str]] = []  # (raw path, where it came from)
    methods: list[tuple[str, str]] = []
    if tail:
        paths.append((tail, "the path after " + DECISION_PATH))
        methods.append((request.method, "the request method"))
    headers = request.headers
    for uri_header, method_header in ORIGINAL_HEADERS:
        # `in` first: most requests carry one family, and getall allocates for each name.
        # Only HTTP's optional whitespace is trimmed: any other character around a value
        # (str.strip() would also drop \x1c or \xa0) makes it invalid, as documented.
        if uri_header in headers:
            for value in headers.getall(uri_header):
                if value := value.strip(OWS):
                    paths.append((_path_of(value, uri_header), uri_header))
        if method_header in headers:
            for value in headers.getall(method_header):
                if value := value.strip(OWS):
                    methods.append((value, method_header))
    if not paths:
        raise UndescribedRequest(())
    path, path_source = paths[0]
    method, method_source = methods[0] if methods else (request.method, "the request method")

    if len(paths) > 1:
        # Compared in the form the path is forwarded in, which fixes every reading the router
        # makes of it: spellings of one path (nginx's raw $request_uri, Traefik's re-escaped
        # one) agree, while `/v1%2Fdatasets` and `/v1/datasets` stay different requests.
        seen = normalize_path(path)
        for other, source in paths[1:]:
            if normalize_path(other) != seen:
                raise BadDecisionRequest(f"{source} and {path_source} describe different paths")
    if not _METHOD_RE.fullmatch(method):
        raise BadDecisionRequest(f"{method_source} is not a valid method")
    for other, source in methods[1:]:
        if other.upper() != method.upper():
            raise BadDecisionRequest(f"{source} and {method_source} describe different methods")
    return OriginalRequest(method.upper(), path)


def make_decision_handler(gate: Gate, *, trusted_peers_only: bool = False) -> Handler:
    """The handler of `DECISION_ROUTE`; one per app (it keeps its own log throttle).

    `trusted_peers_only` (proxy mode): the endpoint exists only for peers in
    SIDECAR_TRUSTED_PROXIES. Clients of the proxy have no use for it, and it would tell them
    the row ids of their own token; to them it is one more path of the upstream's API that
    the sidecar does not serve (404)."""
    last_warning = -_UNTRUSTED_WARNING_INTERVAL

    def warn_untrusted(request: web.Request, ignored: tuple[str, ...]) -> None:
        # An operator who forgot SIDECAR_TRUSTED_PROXIES gets 400 for every request: say why,
        # at most once a minute, since any client can send these headers too.
        nonlocal last_warning
        now = time.monotonic()
        if now - last_warning < _UNTRUSTED_WARNING_INTERVAL:
            return
        last_warning = now
        log.warning(
            "ignored original-request headers from an untrusted peer; is the proxy's "
            "address missing from SIDECAR_TRUSTED_PROXIES?",
            extra={"fields": {"peer": request.remote, "headers": list(ignored)}},
        )

    async def decision_handler(request: web.Request) -> web.StreamResponse:
        trusted = gate.is_trusted(request.remote)
        if trusted_peers_only and not trusted:
            raise NotFound()
        try:
            original = original_request(request, trusted=trusted)
        except NotDecisionPath:
            raise NotFound() from None
        except UndescribedRequest as exc:
            if exc.ignored:
                warn_untrusted(request, exc.ignored)
            raise
        info_of(request).judged_path = original.path
        identity = await gate.authorize(request, original.method, original.path)
        if identity is None:
            return web.Response(headers=_PUBLIC_HEADERS)
        headers = CIMultiDict(identity_headers(identity))
        headers[ENVOY_REMOVE_HEADER] = _REMOVE_ON_ALLOW
        return web.Response(headers=headers)

    return decision_handler
