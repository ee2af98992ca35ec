"""The Authenticator: token + scope -> Identity, through L1, L2 and the store (SPEC 3.3).

Rules that hold here:
1. Fail closed. The only answers are an Identity, `InvalidToken` (the store, or a fresh
   cached answer, says no) or `AuthUnavailable` (nobody can say). A store outage never reads
   as "invalid", and a negative entry never answers past its own freshness.
2. The hot path (fresh L1 entry) awaits nothing.
3. Concurrent misses of one key in this process share one resolution (single flight).
4. This module knows only Protocols for its tiers: no aiohttp, asyncpg or redis here.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Protocol

from sidecar.cache import CacheEntry, LocalCache, cache_key, token_digest
from sidecar.errors import AuthUnavailable, InvalidToken, StoreUnavailable
from sidecar.metrics import Metrics
from sidecar.models import Identity, TokenRecord


class TokenStore(Protocol):
    async def lookup(self, token: str, scope: str) -> TokenRecord | None: ...


class SharedCache(Protocol):
    async def get(self, key: str) -> CacheEntry | None: ...
    async def set(self, key: str, entry: CacheEntry, now: float | None = None) -> None: ...


def utcnow_naive() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


class Authenticator:
    def __init__(
        self,
        store: TokenStore,
        *,
        local: LocalCache,
        shared: SharedCache | None,
        metrics: Metrics,
        ttl: float,
        negative_ttl: float,
        stale_if_error: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.local = local
        self.shared = shared
        self.metrics = metrics
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self.stale_if_error = stale_if_error
        self.clock = clock
        self._inflight: dict[str, asyncio.Future[CacheEntry]] = {}
        m = metrics.cache_lookups
        self._l1_hit = m.labels(tier="l1", result="hit")
        self._l1_neg = m.labels(tier="l1", result="negative")
        self._l1_miss = m.labels(tier="l1", result="miss")

    async def authenticate(self, token: str, scope: str) -> Identity:
        key = cache_key(token_digest(token), scope)
        now = self.clock()
        entry = self.local.get(key)
        if entry is not None and entry.fresh(now):
            (self._l1_neg if entry.negative else self._l1_hit).inc()
        else:
            self._l1_miss.inc()
            entry = await self._resolve_shared(key, token, scope, entry)
        return self._decide(entry, scope)

    def _decide(self, entry: CacheEntry, scope: str) -> Identity:
        rec = entry.record
        # expires_at/disabled are checked on every request, cached or not (SPEC 4).
        if rec is None or rec.scope != scope or not rec.usable_at(utcnow_naive()):
            raise InvalidToken()
        return Identity.of(rec)

    async def _resolve_shared(
        self, key: str, token: str, scope: str, local: CacheEntry | None
    ) -> CacheEntry:
        fut = self._inflight.get(key)
        if fut is not None:
            self.metrics.singleflight_waits.labels(scope=scope).inc()
            # shield: one waiter being cancelled must not cancel the lookup the others await.
            return await asyncio.shield(fut)
        fut = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
        try:
            entry = await self._resolve(key, token, scope, local)
        except BaseException as exc:
            if not fut.done():
                fut.set_exception(exc)
                # Waiters, if any, retrieve it; this stops "exception never retrieved" noise.
                fut.exception()
            raise
        else:
            fut.set_result(entry)
            return entry
        finally:
            del self._inflight[key]

    async def _resolve(
        self, key: str, token: str, scope: str, local: CacheEntry | None
    ) -> CacheEntry:
        shared_entry: CacheEntry | None = None
        if self.shared is not None:
            shared_entry = await self.shared.get(key)
            now = self.clock()
            if shared_entry is not None and shared_entry.fresh(now):
                result = "negative" if shared_entry.negative else "hit"
                self.metrics.cache_lookups.labels(tier="l2", result=result).inc()
                self.local.put(key, shared_entry, now)
                return shared_entry
            self.metrics.cache_lookups.labels(tier="l2", result="miss").inc()

        try:
            record = await self.store.lookup(token, scope)
        except StoreUnavailable:
            return self._stale_or_unavailable(key, local, shared_entry)

        now = self.clock()
        if record is None:
            entry = CacheEntry(None, now + self.negative_ttl, now + self.negative_ttl)
        else:
            fresh = now + self.ttl
            entry = CacheEntry(record, fresh, fresh + self.stale_if_error)
        self.local.put(key, entry, now)
        if self.shared is not None:
            await self.shared.set(key, entry, now)
        return entry

    def _stale_or_unavailable(
        self, key: str, *candidates: CacheEntry | None
    ) -> CacheEntry:
        now = self.clock()
        for cand in candidates:
            if cand is not None and cand.stale_usable(now):
                self.metrics.cache_lookups.labels(tier="stale", result="stale").inc()
                return cand
        raise AuthUnavailable()

    # Invalidation entry points (used by the admin API, LISTEN/NOTIFY and pub/sub).
    def forget_local(self, digest: str) -> int:
        return self.local.pop_digest(digest)
