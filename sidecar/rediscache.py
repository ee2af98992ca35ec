"""The shared tier (L2): token entries in Redis, shared by every replica.

Rules that hold here:
1. No method raises: a Redis problem is counted, trips the circuit breaker and reads as a miss.
   Redis is an accelerator; Postgres stays the source of truth.
2. Keys are `sidecar:tok:<sha256>:<scope>`; per-tenant index sets are `sidecar:tenant:<id>`.
   Nothing derived from a raw token except its SHA-256 is ever written.
3. While the breaker is open, calls are skipped without touching the network, except one probe
   per back-off period.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable
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

    async def _call(self, op: str, fn: Callable[[], Awaitable[T]]) -> T | None:
        if not self.breaker.allow():
            return None
        try:
            result = await fn()
        except (TimeoutError, RedisError, OSError) as exc:
            self.metrics.redis_errors.labels(op=op).inc()
            self.breaker.failure()
            log.debug("redis %s failed: %s", op, type(exc).__name__)
            return None
        except BaseException:
            # Cancelled mid-call: no verdict on Redis, but free the probe slot.
            self.breaker.failure()
            raise
        self.breaker.success()
        return result

    @property
    def available(self) -> bool:
        return not self.breaker.is_open

    async def get(self, key: str) -> CacheEntry | None:
        raw = await self._call("get", lambda: self.client.get(TOKEN_PREFIX + key))
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
                    pipe.expire(index, ttl, gt=True)
                    pipe.expire(index, ttl, nx=True)
                await pipe.execute()

        await self._call("set", write)

    async def delete(self, *keys: str) -> None:
        if keys:
            names = [TOKEN_PREFIX + k for k in keys]
            await self._call("delete", lambda: self.client.delete(*names))

    async def ping(self) -> bool:
        try:
            return bool(await self.client.ping())
        except (TimeoutError, RedisError, OSError):
            return False
