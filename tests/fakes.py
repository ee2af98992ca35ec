"""Fakes of the Protocols `sidecar.auth` depends on, for pure-logic tests.

Each is checked by mypy against its Protocol (the assignments at the bottom), and the shared
cache fake is held to the same contract as the real Redis tier by
tests/functional/test_shared_cache_contract.py, so a test passing on a fake means something.
"""

from __future__ import annotations

import asyncio
import itertools

from sidecar.auth import SharedCache, TokenStore
from sidecar.cache import CacheEntry
from sidecar.errors import StoreUnavailable
from sidecar.models import TokenRecord


class FakeStore:
    def __init__(self) -> None:
        self.rows: dict[tuple[str, str], TokenRecord] = {}
        self.calls = 0
        self.down = False
        self.delay = 0.0

    async def lookup(self, token: str, scope: str) -> TokenRecord | None:
        self.calls += 1
        row = self.rows.get((token, scope))  # read first, answer later: a snapshot in flight
        await asyncio.sleep(self.delay)
        if self.down:
            raise StoreUnavailable("down")
        return row


class FakeShared:
    def __init__(self) -> None:
        self.data: dict[str, CacheEntry] = {}
        self.locks: dict[str, str] = {}
        self.available = True
        self._owners = itertools.count(1)

    async def get(self, key: str) -> CacheEntry | None:
        return self.data.get(key) if self.available else None

    async def set(self, key: str, entry: CacheEntry, now: float | None = None) -> None:
        if self.available:
            self.data[key] = entry

    async def try_lock(self, key: str, ttl: float) -> str | None:
        if not self.available or key in self.locks:
            return None
        owner = f"owner-{next(self._owners)}"
        self.locks[key] = owner
        return owner

    async def unlock(self, key: str, owner: str) -> None:
        if self.locks.get(key) == owner:
            del self.locks[key]


# mypy checks these: a fake that drifts from its Protocol fails the type check.
_store: TokenStore = FakeStore()
_shared: SharedCache = FakeShared()
