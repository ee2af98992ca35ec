"""Reading the bearer token from a request's headers (SPEC 3.1). Pure functions, no I/O.

Rule: every rejection here happens before any cache or database is touched, and the error
raised never contains the header's value.
"""

from __future__ import annotations

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
