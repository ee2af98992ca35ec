"""The Authenticator: token + scope -> Identity, through L1, L2 and the store (SPEC 3.3).

Rules that hold here:
1. Fail closed. The only answers are an Identity, `InvalidToken` (the store, or a fresh
   cached answer, says no) or `AuthUnavailable` (nobody can say). A store outage never reads
   as "invalid", and a negative entry never answers past its own freshness.
2. The hot path (fresh L1 entry) awaits nothing.
3. Concurrent misses of one key in this process share one resolution (single flight); across
   replicas, a Redis lock lets one replica ask Postgres while the others wait for its answer
   in Redis. A lock that cannot be had in time, or a Redis error, never blocks a request: the
   replica then asks Postgres itself.
4. A lookup (of L2 or Postgres) that overlapped an invalidation answers its own request but
   is not cached: it may have read the row from before the change.
5. This module knows only Protocols for its tiers: no aiohttp, asyncpg or redis here.
6. When invalidations may have been missed (a lost LISTEN connection, a Redis delete that
   failed), L2 entries written before that moment are treated as misses: Postgres is asked
   again and L2 rewritten, instead of a revoked token living on for the L2 TTL.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from sidecar.cache import CacheEntry, LocalCache, cache_key
from sidecar.credentials import key_digest
from sidecar.errors import AuthUnavailable, InvalidToken, StoreUnavailable
from sidecar.metrics import Metrics
from sidecar.models import Identity, TokenRecord, utc_now_naive


class TokenStore(Protocol):
    async def lookup(self, token: str, scope: str) -> TokenRecord | None: ...


class SharedCache(Protocol):
    """The Redis tier. No method raises; `available` is False while it is known to be down."""

    @property
    def available(self) -> bool: ...
    async def get(self, key: str) -> CacheEntry | None: ...
    async def set(self, key: str, entry: CacheEntry, now: float | None = None) -> None: ...
    async def try_lock(self, key: str, ttl: float) -> str | None: ...
    async def unlock(self, key: str, owner: str) -> None: ...


# Replicas' clocks differ a little: an entry stamped up to this long after a missed-invalidation
# moment by a replica whose clock runs behind is refused too.
CLOCK_SKEW = 2.0


@dataclass(frozen=True, slots=True)
class CachePolicy:
    """How long answers live (SPEC 3.3): positive and negative TTLs in L2, and how long past
    its TTL a positive answer may still be used while the store cannot be asked. Defaults
    live in the settings only."""

    ttl: float
    negative_ttl: float
    stale_if_error: float


@dataclass(frozen=True, slots=True)
class LockPolicy:
    """Cross-replica single flight (SPEC 3.3): lock expiry, how long to wait, poll pacing."""

    ttl: float = 10.0
    wait: float = 5.0
    first_poll: float = 0.005
    max_poll: float = 0.1


class Authenticator:
    def __init__(
        self,
        store: TokenStore,
        *,
        local: LocalCache,
        shared: SharedCache | None,
        metrics: Metrics,
        policy: CachePolicy,
        hashed_storage: bool = False,
        lock: LockPolicy | None = None,
        clock: Callable[[], float] = time.time,
        prefilter: Callable[[str], bool] | None = None,
    ) -> None:
        self.store = store
        # The unknown-token filter (SPEC 15): False for a digest certainly not stored.
        self.prefilter = prefilter
        self.local = local
        self.shared = shared
        self.metrics = metrics
        self.policy = policy
        self.hashed_storage = hashed_storage
        self.lock = lock or LockPolicy()
        self.clock = clock
        self._epoch = 0
        self.not_before = 0.0
        self._inflight: dict[str, asyncio.Future[CacheEntry]] = {}
        m = metrics.cache_lookups
        self._l1_hit = m.labels(tier="l1", result="hit")
        self._l1_neg = m.labels(tier="l1", result="negative")
        self._l1_miss = m.labels(tier="l1", result="miss")

    def digest(self, token: str) -> str:
        return key_digest(token, self.hashed_storage)

    async def authenticate(self, token: str, scope: str) -> Identity:
        digest = self.digest(token)
        key = cache_key(digest, scope)
        now = self.clock()
        entry = self.local.get(key)
        if entry is not None and entry.fresh(now):
            (self._l1_neg if entry.negative else self._l1_hit).inc()
        else:
            self._l1_miss.inc()
            if self.prefilter is not None and not self.prefilter(digest):
                raise InvalidToken()  # no such token is stored: nobody needs asking
            entry = await self._single_flight(key, token, scope, entry)
        return self._decide(entry, scope)

    def _decide(self, entry: CacheEntry, scope: str) -> Identity:
        rec = entry.record
        # expires_at/disabled are checked on every request, cached or not (SPEC 4).
        if rec is None or rec.scope != scope or not rec.usable(utc_now_naive):
            raise InvalidToken()
        return Identity.of(rec)

    async def _single_flight(
        self, key: str, token: str, scope: str, local: CacheEntry | None
    ) -> CacheEntry:
        while (fut := self._inflight.get(key)) is not None:
            self.metrics.singleflight_waits.labels(scope=scope).inc()
            try:
                # shield: one waiter being cancelled must not cancel the lookup others await.
                return await asyncio.shield(fut)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if fut.cancelled() and (task is None or not task.cancelling()):
                    continue  # the leader was cancelled, not us: take over its lookup
                raise
        fut = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
        try:
            entry = await self._resolve_tiers(key, token, scope, local)
        except asyncio.CancelledError:
            fut.cancel()
            raise
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # retrieved here, so no "exception never retrieved" without waiters
            raise
        else:
            fut.set_result(entry)
            return entry
        finally:
            # An invalidation may already have dropped this flight (and a newer one started).
            if self._inflight.get(key) is fut:
                del self._inflight[key]

    async def _resolve_tiers(
        self, key: str, token: str, scope: str, local: CacheEntry | None
    ) -> CacheEntry:
        epoch = self._epoch
        shared = self.shared
        if shared is None:
            return await self._lookup(key, token, scope, epoch, local)
        seen = await self._shared_get(shared, key, epoch, count=True)
        if seen is not None and seen.fresh(self.clock()):
            return seen
        owner, seen = await self._lock_or_answer(shared, key, epoch, seen)
        try:
            if seen is not None and seen.fresh(self.clock()):
                return seen
            return await self._lookup(key, token, scope, epoch, local, seen)
        finally:
            if owner is not None:
                await shared.unlock(key, owner)

    async def _shared_get(
        self, shared: SharedCache, key: str, epoch: int, *, count: bool
    ) -> CacheEntry | None:
        """Read L2 (None for entries written before `not_before`, rule 6); a fresh entry is
        also put into L1 unless an invalidation happened meanwhile (rule 4)."""
        entry = await shared.get(key)
        if entry is not None and entry.written_at < self.not_before:
            entry = None
        now = self.clock()
        fresh = entry is not None and entry.fresh(now)
        if count:
            result = "miss" if entry is None or not fresh else (
                "negative" if entry.negative else "hit")
            self.metrics.cache_lookups.labels(tier="l2", result=result).inc()
        if entry is not None and fresh and epoch == self._epoch:
            self.local.put(key, entry, now)
        return entry

    async def _lock_or_answer(
        self, shared: SharedCache, key: str, epoch: int, seen: CacheEntry | None
    ) -> tuple[str | None, CacheEntry | None]:
        """Take the key's lock, or wait for the replica holding it to publish an answer.

        Returns (lock owner or None, the latest L2 entry seen). Gives up (owner None) when
        Redis is unavailable or the wait runs out: the caller then asks Postgres itself.
        The caller must release a lock it got, whatever it does next.
        """
        deadline = time.monotonic() + self.lock.wait
        poll = self.lock.first_poll
        while True:
            owner = await shared.try_lock(key, self.lock.ttl)
            if owner is not None:
                # Second check: the previous holder may have filled L2 just before we got in.
                entry = await self._shared_get(shared, key, epoch, count=False)
                return owner, entry if entry is not None else seen
            if not shared.available:
                return None, seen
            if time.monotonic() >= deadline:
                self.metrics.lock_timeouts.inc()
                return None, seen
            await asyncio.sleep(poll)
            poll = min(poll * 2, self.lock.max_poll)
            entry = await self._shared_get(shared, key, epoch, count=False)
            if entry is not None:
                seen = entry
                if entry.fresh(self.clock()):
                    return None, entry

    async def _lookup(
        self, key: str, token: str, scope: str, epoch: int, *stale: CacheEntry | None
    ) -> CacheEntry:
        try:
            record = await self.store.lookup(token, scope)
        except StoreUnavailable:
            return self._stale_or_unavailable(*stale)

        now = self.clock()
        policy = self.policy
        if record is None:
            until = now + policy.negative_ttl
            entry = CacheEntry(None, until, until, now)
        else:
            fresh = now + policy.ttl
            entry = CacheEntry(record, fresh, fresh + policy.stale_if_error, now)
        if epoch != self._epoch:
            return entry  # rule 4
        self.local.put(key, entry, now)
        if self.shared is not None:
            await self.shared.set(key, entry, now)
        return entry

    def _stale_or_unavailable(self, *candidates: CacheEntry | None) -> CacheEntry:
        now = self.clock()
        for cand in candidates:
            if cand is not None and cand.stale_usable(now):
                self.metrics.cache_lookups.labels(tier="stale", result="stale").inc()
                return cand
        raise AuthUnavailable()

    # Invalidation (admin API, LISTEN/NOTIFY, pub/sub): local tier only; the caller handles L2.
    # Each one also drops lookups in flight from the single-flight table, so a request that
    # arrives after the invalidation never joins a lookup that started before it.
    def _invalidated(self) -> None:
        self._epoch += 1
        self._inflight.clear()

    def forget(self, digest: str, scope: str | None = None) -> int:
        self._invalidated()
        if scope is None:
            return self.local.pop_digest(digest)
        return 1 if self.local.pop(cache_key(digest, scope)) else 0

    def forget_tenant(self, tenant_id: str) -> int:
        self._invalidated()
        return self.local.pop_tenant(tenant_id)

    def forget_all(self) -> None:
        self._invalidated()
        self.local.clear()

    def distrust_shared_before(self, moment: float) -> None:
        """Invalidations may have been missed up to `moment` (a lost LISTEN connection, a Redis
        delete that could not be made): refuse L2 entries written before it (rule 6)."""
        self.not_before = max(self.not_before, moment + CLOCK_SKEW)
