"""Domain errors. No HTTP in here: `sidecar.responses` maps them to status codes and bodies."""

from __future__ import annotations

MSG_MISSING = "Authorization header must be provided and start with 'Bearer'"
MSG_SCHEME = "Authorization scheme must be 'Bearer'"
MSG_INVALID = "Access token is invalid"


class SidecarError(Exception):
    """Base of every error the sidecar turns into a response itself."""

    message = "internal error"

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or self.message)
        self.message = message or self.message


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

    def __init__(self, headers: dict[str, str]) -> None:
        super().__init__()
        self.headers = headers


class StoreUnavailable(Exception):
    """Raised by a token store when its backend cannot answer (connection, timeout)."""


class UpstreamUnavailable(SidecarError):
    message = "Upstream service is unavailable"


class UpstreamTimeout(SidecarError):
    message = "Upstream service did not respond in time"
