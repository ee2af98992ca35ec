"""Postgres URL validation (SPEC 3.5, 11): a malformed URL is a named configuration error.

Rules that hold here:
1. Nothing here ever puts the URL, or any part of it, into an error message: a mistyped URL
   is mostly a password with an unencoded `@`, `:` or `/`, and its fragments would otherwise
   land in the log. Messages say what is wrong and how to fix it, never with what.
2. The URL is checked twice: explicitly (one `@` before the host, no `:` or `/` left
   unencoded in the password, each host of a multi-host list non-empty with a port in
   1..65535), then by asyncpg's own DSN parser, so whatever asyncpg would refuse at the
   first connection is refused at start instead. The parser's exception text is discarded
   (it quotes the offending fragment).
3. Multi-host lists (`h1:5432,h2:5432`), `target_session_attrs`, TLS parameters (`sslmode`,
   `sslrootcert`, ...) and unix-socket hosts (`?host=/run/postgresql`) stay valid. Files the
   URL names (certificates, passfile, service file) are not opened here: they may exist only
   where the sidecar finally runs.
"""

from __future__ import annotations

import inspect
import re
from urllib.parse import parse_qsl, urlencode

from asyncpg import connect_utils

HINT = "percent-encode special characters in the password, e.g. @ as %40, : as %3A, / as %2F"
SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
TARGET_SESSION_ATTRS = ("any", "primary", "standby", "prefer-standby", "read-write",
                        "read-only")
# Query parameters that name files (or read them): kept away from the parse of rule 2.
_FILE_PARAMS = frozenset({"sslcert", "sslkey", "sslrootcert", "sslcrl", "sslpassword",
                          "passfile", "service", "servicefile"})
_HOST_RE = re.compile(r"^(?:\[[0-9A-Fa-f:.%A-Za-z]+\]|[^\[\]:/?#@]+)?(?::(?P<port>[^:]*))?$")


def _malformed(reason: str) -> ValueError:
    return ValueError(f"malformed URL: {reason} ({HINT})")


def check_postgres_url(url: str) -> None:
    """Raise ValueError (a message without any part of `url`) unless it is a usable DSN."""
    scheme, sep, rest = url.strip().partition("://")
    if not sep or scheme.lower() not in ("postgres", "postgresql"):
        raise ValueError("must be a postgresql:// URL")
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    netloc, tail = rest[:end], rest[end:]
    path = tail.partition("?")[0].partition("#")[0]
    if "@" in path:
        raise _malformed("an '@' after the host (is there an unencoded '/' in the password?)")
    if netloc.count("@") > 1:
        raise _malformed("more than one '@' before the host")
    userinfo, at, hosts = netloc.rpartition("@")
    if at and userinfo.count(":") > 1:
        raise _malformed("more than one ':' in the user and password")
    if hosts:
        for host in hosts.split(","):
            m = _HOST_RE.match(host)
            if not host or m is None:
                raise _malformed("an empty or invalid host in the host list")
            port = m["port"]
            if port is not None and not (port.isdigit() and 1 <= int(port) <= 65535):
                raise _malformed("a port that is not a number between 1 and 65535")
    query = dict(parse_qsl(tail.partition("?")[2].partition("#")[0], keep_blank_values=True))
    sslmode = query.get("sslmode")
    if sslmode is not None and sslmode not in SSLMODES:
        raise ValueError(f"sslmode must be one of {', '.join(SSLMODES)}")
    attrs = query.get("target_session_attrs")
    if attrs is not None and attrs not in TARGET_SESSION_ATTRS:
        raise ValueError(f"target_session_attrs must be one of {', '.join(TARGET_SESSION_ATTRS)}")
    # Rule 3: no file is read; sslmode=disable so that no default certificate is looked for.
    kept = {k: v for k, v in query.items() if k not in _FILE_PARAMS and k != "sslmode"}
    base = f"{scheme}://{netloc}{path}"
    probe = f"{base}?{urlencode({**kept, 'sslmode': 'disable'})}"
    # A private function of asyncpg: should a release drop it, the explicit checks remain.
    parse = getattr(connect_utils, "_parse_connect_dsn_and_args", None)
    if parse is None:
        return
    # Its keyword arguments vary between releases (service, krbsrvname, ...): every one but
    # the DSN is passed as None, "not given", whatever this release's list is.
    try:
        names = inspect.signature(parse).parameters
    except (TypeError, ValueError):
        return
    try:
        parse(**{name: None for name in names if name != "dsn"}, dsn=probe)
    except Exception:
        # Rule 1: the driver's message quotes the fragment it could not read.
        raise _malformed("the driver cannot parse it") from None
