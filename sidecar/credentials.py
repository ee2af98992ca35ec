"""Reading the bearer token from a request's headers (SPEC 3.1) and the digests that stand
for it everywhere else. Pure functions, no I/O.

Rules that hold here:
1. Every rejection happens before any cache or database is touched, and the error raised
   never contains the header's value.
2. Past this module a token is named by its digest: the SHA-256 of the token *as stored in
   the token table* (the raw token, or its SHA-256 with `SIDECAR_TOKEN_HASH=sha256`). The
   database triggers compute the same digest from the column, so NOTIFY payloads and cache
   keys name a token without the raw value ever leaving the process that received it.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence

from sidecar.errors import InvalidToken, MissingCredentials, WrongScheme

_CONTROL_OR_SPACE = re.compile(r"[\x00-\x20\x7f]")


def parse_authorization(values: Sequence[str], max_length: int) -> str:
    """The token of the single `Authorization: Bearer <token>` header in `values`."""
    if len(values) != 1:
        # None, or several: with two headers nobody can say which one an upstream would read.
        raise MissingCredentials()
    header = values[0].strip(" \t")
    scheme, sep, token = header.partition(" ")
    if not sep or not scheme:
        raise MissingCredentials()
    if scheme.lower() != "bearer":
        raise WrongScheme()
    token = token.strip(" \t")
    if not token or _CONTROL_OR_SPACE.search(token):
        raise MissingCredentials()
    if len(token) > max_length:
        # Cannot be a valid token; answered like an unknown one.
        raise InvalidToken()
    return token


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


def stored_value(token: str, hashed_storage: bool) -> str:
    """What the token column holds for `token` (`SIDECAR_TOKEN_HASH`)."""
    return token_digest(token) if hashed_storage else token


def key_digest(token: str, hashed_storage: bool) -> str:
    """The digest cache keys use (rule 2): sha256 of the stored column value."""
    return token_digest(stored_value(token, hashed_storage))
