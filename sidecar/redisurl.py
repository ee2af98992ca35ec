"""Checks of the Redis settings that run before anything starts (sidecar.settings uses them).

Rules that hold here:
1. A message never contains the value it judges, nor any part of it: a Redis URL may hold a
   password, and a half-parsed URL may hold part of one in any field.
2. A URL accepted here is one that redis-py parses into exactly one server: one host, a
   numeric port, a numeric database, well-formed query options.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from redis.asyncio.connection import parse_url

# Host names, IPv4 and bracketed IPv6 addresses; anything else in the host part means the
# URL was split somewhere the operator did not mean (an unencoded `@`, `/`, `#` or `?` in the
# password) or names several hosts.
_HOST_RE = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+)$")
_ENCODE_HINT = ("percent-encode special characters of the user name and password "
                "(@ as %40, : as %3A, / as %2F, # as %23, ? as %3F)")


def check_redis_url(raw: str) -> None:
    """Raise ValueError (rule 1) when `raw` is not one well-formed redis://, rediss:// or
    unix:// URL."""
    try:
        parts = urlsplit(raw)
    except ValueError:
        raise ValueError(f"is not a valid URL; {_ENCODE_HINT}") from None
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ValueError("must be a redis://, rediss:// or unix:// URL")
    if "#" in raw:
        raise ValueError(f"has a '#' (a Redis URL has no fragment); {_ENCODE_HINT}")
    if parts.scheme == "unix":
        if not parts.path:
            raise ValueError("a unix:// URL needs the socket path, e.g. unix:///run/redis.sock")
    else:
        userinfo, _, hostport = parts.netloc.rpartition("@")
        if "@" in userinfo:
            raise ValueError(f"has more than one '@'; {_ENCODE_HINT}")
        if "," in hostport:
            raise ValueError("names several hosts; it takes one (for Redis Cluster or "
                             "Sentinel set SIDECAR_REDIS_MODE)")
        host = hostport
        if host.startswith("["):
            host = host[: host.find("]") + 1]
        elif ":" in host:
            host = host.split(":", 1)[0]
        if not host or not _HOST_RE.match(host):
            raise ValueError(f"has no valid host; {_ENCODE_HINT}")
        try:
            port = parts.port
        except ValueError:
            raise ValueError(f"has an invalid port (1-65535); {_ENCODE_HINT}") from None
        if port == 0:
            raise ValueError("has an invalid port (1-65535)")
        path = parts.path.strip("/")
        if path and not path.isdigit():
            raise ValueError(f"path must be the database number, e.g. /0; {_ENCODE_HINT}")
    try:
        parse_url(raw)
    except (ValueError, TypeError):
        # redis-py's own message names the option, never its value; kept generic anyway.
        raise ValueError("has an invalid query option") from None


@dataclass(frozen=True, slots=True)
class RedisUrlFacts:
    """What the mode checks need to know of a URL, nothing secret."""

    scheme: str
    db: int


def url_facts(raw: str) -> RedisUrlFacts:
    """The scheme and database of a URL that `check_redis_url` accepted."""
    kwargs = parse_url(raw)
    db = kwargs.get("db", 0)
    return RedisUrlFacts(urlsplit(raw).scheme, int(db) if db is not None else 0)


def check_readable_file(path: str) -> str:
    """`path` when it names a readable regular file; ValueError otherwise (file paths are
    not secret: the message names it)."""
    if not os.path.isfile(path):
        raise ValueError(f"no such file: {path}")
    if not os.access(path, os.R_OK):
        raise ValueError(f"file not readable by this process: {path}")
    return path
