"""Domain errors. No HTTP in here: `sidecar.responses` maps each to a status, a Dify-shaped
body, headers and an outcome, in one table.

    SidecarError                  answered by the sidecar itself (never with its message
    │                             quoting a request's bytes or a token)
    ├── Unauthorized              401
    │   ├── MissingCredentials
    │   ├── WrongScheme
    │   └── InvalidToken          unknown, revoked, expired or wrong-scope: one error for all
    ├── RateLimited               429, with Retry-After and RateLimit-* headers
    ├── AuthUnavailable           503: cannot decide (the token store is down)
    ├── BadRequest                400
    │   └── BadDecisionRequest    the decision endpoint cannot tell the original request
    │       └── UndescribedRequest
    ├── NotFound                  404
    ├── PayloadTooLarge           413
    ├── ExpectationFailed         417
    ├── UpstreamError             the upstream could not be asked
    │   ├── UpstreamUnavailable   502
    │   └── UpstreamTimeout       504
    └── ClientClosed              the client went away mid-request: 499 in the access log
                                  (nginx's convention), never a 500; nobody reads the body

    StoreUnavailable              raised by a token store whose backend cannot answer; the
                                  Authenticator turns it into a stale answer or
                                  AuthUnavailable, so it never reaches a client as such.

Rule: handlers raise these; only the error middleware builds error responses. A subclass
without a row in the table is a bug that a test catches.
"""

from __future__ import annotations

from collections.abc import Mapping

MSG_MISSING = "Authorization header must be provided and start with 'Bearer'"
MSG_SCHEME = "Authorization scheme must be 'Bearer'"
MSG_INVALID = "Access token is invalid"


class SidecarError(Exception):
    """Base of every error the sidecar turns into a response itself."""

    message = "internal error"

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or self.message)
        self.message = message or self.message
        # Extra response headers this instance needs (beyond its table row's).
        self.headers: Mapping[str, str] = {}


class Unauthorized(SidecarError):
    """The request carries no acceptable credential. Never says which part was wrong
    beyond the three Dify messages, and never includes the token."""

    message = MSG_INVALID


class MissingCredentials(Unauthorized):
    message = MSG_MISSING


class WrongScheme(Unauthorized):
    message = MSG_SCHEME


class InvalidToken(Unauthorized):
    """Unknown, revoked, expired or wrong-scope token: deliberately one error for all."""

    message = MSG_INVALID


class AuthUnavailable(SidecarError):
    """The token store cannot be asked and no usable cached answer exists: 503, never 401."""

    message = "Authentication is temporarily unavailable"


class RateLimited(SidecarError):
    """Over a rate limit (SPEC 9); `headers` are the Retry-After and RateLimit-* headers."""

    message = "Too many requests"

    def __init__(self, headers: Mapping[str, str]) -> None:
        super().__init__()
        self.headers = headers


class BadRequest(SidecarError):
    """A request the sidecar will not judge as it stands. The message names what is wrong,
    never the offending bytes."""

    message = "Bad request"


class BadDecisionRequest(BadRequest):
    """The original request cannot be told unambiguously: answered 400, never allowed."""


class UndescribedRequest(BadDecisionRequest):
    """The bare decision endpoint with no description of the original request a trusted
    proxy could have sent; `ignored` names such headers that came from a peer we do not
    trust."""

    message = (
        "The original request is not described: send X-Original-URI (nginx) or "
        "X-Forwarded-Uri (Traefik) from a peer in SIDECAR_TRUSTED_PROXIES, or append the "
        "path to /_sidecar/auth (Envoy path_prefix)"
    )

    def __init__(self, ignored: tuple[str, ...]) -> None:
        super().__init__()
        self.ignored = ignored


class NotFound(SidecarError):
    message = "Not found"


class PayloadTooLarge(SidecarError):
    message = "Body too large"


class ExpectationFailed(SidecarError):
    message = "Only 'Expect: 100-continue' is supported"


class UpstreamError(SidecarError):
    """The upstream could not be asked, or did not answer, before its response began."""


class UpstreamUnavailable(UpstreamError):
    message = "Upstream service is unavailable"


class UpstreamTimeout(UpstreamError):
    message = "Upstream service did not respond in time"


class ClientClosed(SidecarError):
    """The client's connection broke while its request was read or answered (a reset, a
    close mid-upload): nothing went wrong here or upstream, and nobody is left to answer."""

    message = "Client closed the connection"


class StoreUnavailable(Exception):
    """Raised by a token store when its backend cannot answer (connection, timeout)."""
