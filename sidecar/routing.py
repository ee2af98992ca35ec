"""Which scope a request needs, and whether it needs a token at all (SPEC 3.2).

Rules that hold here:
1. An escaped slash (`%2F`) is read two ways, because upstreams differ: as a separator (the
   path fully decoded, then `.`/`..` resolved: werkzeug and friends) and as data (only
   unreserved escapes decoded: routers that match before decoding). A request is public only
   when both readings are public; otherwise it needs the scope its protected readings agree
   on, or, when they disagree, a scope no token has. No spelling of a path can pick a
   weaker scope than the route an upstream would take.
2. Prefixes match on segment boundaries: `/v1/datasets` matches `/v1/datasets` and
   `/v1/datasets/x`, never `/v1/datasetsx`.
3. The longest matching prefix wins. No I/O, no aiohttp: pure functions.
"""

from __future__ import annotations

import enum
import functools
import re
from dataclasses import dataclass
from typing import Final
from urllib.parse import unquote

# Never in a request target (RFC 9112 3.2): whitespace, controls, and `#`, which some servers
# and clients take as the start of a fragment and others as part of the path, so no single
# reading of such a target can be trusted to be the upstream's.
INVALID_TARGET_RE = re.compile(r"[\x00-\x20\x7f#]")



class _NoScope(enum.Enum):
    NO_SCOPE = "none"


# The scope of a path that no scope route covers, or whose readings need different scopes:
# no token has it, so such a request is refused without asking anyone (fail closed).
NO_SCOPE: Final = _NoScope.NO_SCOPE
# What `Router.required_scope` answers: None for a public request, else the scope it needs.
RequiredScope = str | _NoScope | None

_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_PCT_RE = re.compile(r"%([0-9A-Fa-f]{2})")
_METHOD_RE = re.compile(r"^[A-Z]+$")
_SCOPE_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,16}$")


def _decode_unreserved(match: re.Match[str]) -> str:
    char = chr(int(match.group(1), 16))
    return char if char in _UNRESERVED else "%" + match.group(1).upper()


def _resolve(path: str) -> str:
    """Collapse duplicate slashes and resolve dot segments (RFC 3986 5.2.4)."""
    out: list[str] = []
    segments = path.split("/")
    for seg in segments[1:] if path.startswith("/") else segments:
        if seg in ("", "."):
            continue
        if seg == "..":
            if out:
                out.pop()
            continue
        out.append(seg)
    trailing = path.endswith(("/", "/.", "/..")) and bool(out)
    return "/" + "/".join(out) + ("/" if trailing else "")


@functools.lru_cache(maxsize=8192)
def normalize_path(raw_path: str) -> str:
    """The path to forward upstream: unreserved escapes decoded, `%2F` and friends kept.

    `raw_path` is the request target without the query string, still percent-encoded.
    """
    return _resolve(_PCT_RE.sub(_decode_unreserved, raw_path or "/"))


def match_path(raw_path: str) -> str:
    """The path scope and public routes are matched against (rule 1)."""
    return _resolve(unquote(normalize_path(raw_path), errors="surrogateescape"))


def _prefix_matches(prefix: str, path: str) -> bool:
    if prefix == "/":
        return True
    base = prefix.rstrip("/")
    return path == base or path.startswith(base + "/")


@dataclass(frozen=True, slots=True)
class ScopeRoute:
    prefix: str
    scope: str

    def __str__(self) -> str:
        return f"{self.prefix}={self.scope}"


@dataclass(frozen=True, slots=True)
class PublicRoute:
    method: str | None
    prefix: str

    def __str__(self) -> str:
        return f"{self.method} {self.prefix}" if self.method else self.prefix


def _clean_prefix(prefix: str) -> str:
    if not prefix.startswith("/"):
        raise ValueError(f"route prefix {prefix!r} must start with '/'")
    return match_path(prefix)


def parse_scope_routes(value: str) -> tuple[ScopeRoute, ...]:
    """`/v1/datasets=dataset,/=app` -> routes, longest prefix first."""
    routes: dict[str, ScopeRoute] = {}
    for item in value.split(","):
        item = item.strip()
        if not item:
            continue
        prefix, sep, scope = item.partition("=")
        prefix, scope = prefix.strip(), scope.strip()
        if not sep or not _SCOPE_RE.match(scope):
            raise ValueError(
                f"entry {item!r} must be PREFIX=SCOPE with a scope of 1-16 letters, digits or _.:-"
            )
        clean = _clean_prefix(prefix)
        if clean in routes:
            raise ValueError(f"prefix {prefix!r} is listed twice")
        routes[clean] = ScopeRoute(clean, scope)
    if not routes:
        raise ValueError("at least one PREFIX=SCOPE entry is required")
    return tuple(sorted(routes.values(), key=lambda r: len(r.prefix), reverse=True))


def parse_public_routes(value: str) -> tuple[PublicRoute, ...]:
    """`GET /health,/public` -> routes, longest prefix first."""
    routes = []
    for item in value.split(","):
        item = item.strip()
        if not item:
            continue
        parts = item.split()
        if len(parts) == 1:
            routes.append(PublicRoute(None, _clean_prefix(parts[0])))
        elif len(parts) == 2 and _METHOD_RE.match(parts[0].upper()):
            routes.append(PublicRoute(parts[0].upper(), _clean_prefix(parts[1])))
        else:
            raise ValueError(f"entry {item!r} must be 'METHOD /prefix' or '/prefix'")
    return tuple(sorted(routes, key=lambda r: len(r.prefix), reverse=True))


class Router:
    """Decides, for a method and a raw path, `None` (public), the scope a token needs, or
    `NO_SCOPE`."""

    def __init__(
        self, scope_routes: tuple[ScopeRoute, ...], public_routes: tuple[PublicRoute, ...]
    ) -> None:
        self._scopes = scope_routes
        self._public = public_routes
        # Routes never change, and most APIs see a few thousand distinct paths at most: the
        # decision for (method, raw path) is computed once. Bounded, so unique ids in paths
        # only cost a recomputation.
        self.required_scope = functools.lru_cache(maxsize=16384)(
            self._required_scope
        )

    def is_public(self, method: str, path: str) -> bool:
        return any(
            (r.method is None or r.method == method) and _prefix_matches(r.prefix, path)
            for r in self._public
        )

    def scope_for(self, path: str) -> str | None:
        for route in self._scopes:  # longest first
            if _prefix_matches(route.prefix, path):
                return route.scope
        return None

    def _required_scope(self, method: str, raw_path: str) -> RequiredScope:
        """`None` when the request is public; otherwise the scope its token must have.

        A path that no scope route covers gets `NO_SCOPE`, which no token has: it is refused
        rather than let through (fail closed). See rule 1 for the two readings.
        """
        method = method.upper()
        readings = {match_path(raw_path), normalize_path(raw_path)}
        protected = {p for p in readings if not self.is_public(method, p)}
        if not protected:
            return None
        scopes = {self.scope_for(p) for p in protected}
        scope = scopes.pop() if len(scopes) == 1 else None
        return NO_SCOPE if scope is None else scope
