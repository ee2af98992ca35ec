"""The shared tier (L2): token entries in Redis, shared by every replica.

Rules that hold here:
1. No method raises: a Redis problem is counted, trips the circuit breaker and reads as a miss.
   Redis is an accelerator; Postgres stays the source of truth.
2. Keys are `sidecar:tok:<digest>:<scope>`; per-tenant index sets are `sidecar:tenant:<id>`;
   lookup locks are `sidecar:lock:<digest>:<scope>`. Nothing derived from a raw token except
   its digest is ever written (see sidecar.cache rule 1).
3. While the breaker is open, calls are skipped without touching the network, except one probe
   per back-off period.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from sidecar.breaker import CircuitBreaker
from sidecar.cache import CacheEntry
from sidecar.metrics import Metrics

log = logging.getLogger("sidecar.redis")

TOKEN_PREFIX = "sidecar:tok:"
TENANT_PREFIX = "sidecar:tenant:"
LOCK_PREFIX = "sidecar:lock:"
PUBSUB_CHANNEL = "sidecar:invalidate"

# Deletes the lock only if it is still ours: a lock that expired and was taken by another
# replica must not be released by us.
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""

T = TypeVar("T")


def connect(url: str, timeout: float) -> aioredis.Redis:
    """A client that fails fast: one attempt, short timeouts (the breaker does the retrying)."""
    return aioredis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=30,
    )


class RedisCache:
    def __init__(self, client: aioredis.Redis, metrics: Metrics) -> None:
        self.client = client
        self.metrics = metrics
        self.breaker = CircuitBreaker(on_change=self._circuit_changed)

    def _circuit_changed(self, is_open: bool) -> None:
        self.metrics.redis_circuit_open.set(1 if is_open else 0)
        if is_open:
            log.warning("redis unavailable, serving from local cache and postgres")
        else:
            log.info("redis available again")

    async def call(self, op: str, fn: Callable[[], Awaitable[T]]) -> T | None:
        """Run one Redis operation through the breaker: its result, or None when Redis
        could not be asked (rule 1). Also used by other Redis users (rate limits)."""
        if not self.breaker.allow():
            return None
        try:
            result = await fn()
        except (TimeoutError, RedisError, OSError) as exc:
            self.metrics.redis_errors.labels(op=op).inc()
            self.breaker.failure()
            log.debug("redis %s failed: %s", op, type(exc).__name__)
            return None
        except asyncio.CancelledError:
            self.breaker.release()  # no verdict on Redis, but free the probe slot
            raise
        self.breaker.success()
        return result

    @property
    def available(self) -> bool:
        return not self.breaker.is_open

    async def get(self, key: str) -> CacheEntry | None:
        raw = await self.call("get", lambda: self.client.get(TOKEN_PREFIX + key))
        if not isinstance(raw, bytes):
            return None
        return CacheEntry.decode(raw)

    async def set(self, key: str, entry: CacheEntry, now: float | None = None) -> None:
        now = time.time() if now is None else now
        # Keep the entry in Redis for as long as any replica may still use it (stale deadline).
        ttl = max(1, math.ceil(max(entry.fresh_until, entry.stale_until) - now))
        rec = entry.record

        async def write() -> None:
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.set(TOKEN_PREFIX + key, entry.encode(), ex=ttl)
                if rec is not None and rec.tenant_id:
                    index = TENANT_PREFIX + rec.tenant_id
                    pipe.sadd(index, key)
                    # Entries of a tenant share one TTL setting, so the newest entry lives
                    # longest: the index lives as long as it. (Plain EXPIRE: Redis 6 too.)
                    pipe.expire(index, ttl)
                await pipe.execute()

        await self.call("set", write)

    async def delete(self, *keys: str) -> bool:
        """Delete entries; False when Redis could not be asked (the caller must then assume
        the entries survive)."""
        if not keys:
            return True
        names = [TOKEN_PREFIX + k for k in keys]

        async def run() -> bool:
            await self.client.delete(*names)
            return True

        return bool(await self.call("delete", run))

    async def delete_tenant(self, tenant_id: str) -> bool:
        """Delete every cached entry indexed under the tenant; False when Redis could not."""
        index = TENANT_PREFIX + tenant_id

        async def run() -> bool:
            members = await self.client.smembers(index)
            names = [TOKEN_PREFIX + (m.decode() if isinstance(m, bytes) else m) for m in members]
            await self.client.delete(*names, index)
            return True

        return bool(await self.call("delete_tenant", run))

    async def delete_all(self) -> bool:
        """Drop every token entry (after TRUNCATE of the token table); False when Redis
        could not be asked."""

        async def run() -> bool:
            async for batch in _scan_batches(self.client, TOKEN_PREFIX + "*"):
                await self.client.delete(*batch)
            return True

        return bool(await self.call("delete_all", run))

    async def try_lock(self, key: str, ttl: float) -> str | None:
        """Take the cross-replica lookup lock of a key: its owner token, or None when another
        replica holds it or Redis cannot be asked (check `available` to tell which)."""
        owner = secrets.token_hex(8)
        ok = await self.call(
            "lock", lambda: self.client.set(LOCK_PREFIX + key, owner, nx=True,
                                            px=int(ttl * 1000))
        )
        return owner if ok else None

    async def unlock(self, key: str, owner: str) -> None:
        await self.call("unlock", lambda: self.client.eval(_RELEASE, 1, LOCK_PREFIX + key,
                                                             owner))

    async def publish(self, message: bytes) -> None:
        await self.call("publish", lambda: self.client.publish(PUBSUB_CHANNEL, message))

    async def ping(self) -> bool:
        try:
            return bool(await self.client.ping())
        except (TimeoutError, RedisError, OSError):
            return False


async def _scan_batches(client: aioredis.Redis, pattern: str, size: int = 500) -> AsyncIterator[
        list[bytes]]:
    batch: list[bytes] = []
    async for name in client.scan_iter(match=pattern, count=size):
        batch.append(name)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch
