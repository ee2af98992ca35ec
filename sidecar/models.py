"""Value objects shared by every layer. No I/O here."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime


# Dify stores times as naive UTC (`timestamp` columns); so does everything here.
def utc_now_naive() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def naive_utc(at: datetime) -> datetime:
    """`at` as naive UTC; a naive value is taken to be UTC already."""
    return at if at.tzinfo is None else at.astimezone(UTC).replace(tzinfo=None)


@dataclass(frozen=True, slots=True)
class TokenRecord:
    """One row of the token table, as far as the sidecar cares.

    `expires_at` is a naive UTC timestamp (as Dify stores times) or None.
    """

    id: str
    tenant_id: str | None
    app_id: str | None
    scope: str
    expires_at: datetime | None = None
    disabled: bool = False

    def usable(self, now_utc_naive: Callable[[], datetime]) -> bool:
        """Not disabled and not expired; the clock is read only for tokens that can expire."""
        if self.disabled:
            return False
        return self.expires_at is None or self.expires_at > now_utc_naive()


@dataclass(frozen=True, slots=True)
class Identity:
    """What an allowed request is told about its caller (SPEC 5)."""

    token_id: str
    tenant_id: str
    app_id: str
    scope: str

    @classmethod
    def of(cls, record: TokenRecord) -> Identity:
        return cls(record.id, record.tenant_id or "", record.app_id or "", record.scope)
