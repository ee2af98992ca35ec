"""What became of a request, as the metrics and the access log name it (SPEC 10).

Rule: the set is closed. Every value is a label value of `sidecar_requests_total`, so the
metrics module creates each series from this enum at start (SPEC 10: a series exists at 0
before its first event) and nothing else may be used as an outcome.
"""

from __future__ import annotations

from enum import StrEnum


class Outcome(StrEnum):
    ALLOWED = "allowed"  # authenticated (and, in proxy mode, forwarded, whatever it answered)
    PUBLIC = "public"  # a public route: no token needed
    UNAUTHORIZED = "unauthorized"
    RATE_LIMITED = "rate_limited"
    UNAVAILABLE = "unavailable"  # could not decide: the token store is down (503)
    BAD_REQUEST = "bad_request"  # malformed request or ambiguous description of one
    NOT_FOUND = "not_found"
    CLIENT_CLOSED = "client_closed"  # the client went away before its answer was complete
    ERROR = "error"  # a bug: answered 500, never counted as allowed
