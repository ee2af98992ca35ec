"""The breaker-guarded Redis client every Redis user of the sidecar goes through (the token
cache, rate limits, readiness, the pub/sub subscriber).

Rules that hold here:
1. `call()` never raises for a Redis problem: it is counted, trips the circuit breaker and
   reads as None. Redis is an accelerator; Postgres stays the source of truth.
2. While the breaker is open, calls are skipped without touching the network, except one probe
   per back-off period.
3. Lua scripts are registered once (`script()`): each call then sends EVALSHA and the SHA;
   redis-py loads the script again by itself when a server answers NOSCRIPT (after a restart
   or a failover).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from sidecar.breaker import CircuitBreaker
from sidecar.metrics import Metrics

log = logging.getLogger("sidecar.redis")

T = TypeVar("T")

# Readiness probes time out after a few seconds: answer well within that.
PING_TIMEOUT = 1.0

Script = Callable[[Sequence[str], Sequence[int | str]], Awaitable[Any]]


def connect(url: str, timeout: float) -> aioredis.Redis:
    """A client that fails fast: one attempt, short timeouts (the breaker does the retrying)."""
    return aioredis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=30,
    )


class GuardedRedis:
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

    @property
    def available(self) -> bool:
        return not self.breaker.is_open

    async def call(self, op: str, fn: Callable[[], Awaitable[T]]) -> T | None:
        """Run one Redis operation through the breaker: its result, or None when Redis
        could not be asked (rule 1)."""
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

    def script(self, op: str, source: str) -> Script:
        """Register a Lua script once (rule 3); the returned callable runs it guarded."""
        registered = self.client.register_script(source)

        async def run(keys: Sequence[str], args: Sequence[int | str]) -> Any:
            return await self.call(op, lambda: registered(keys=list(keys), args=list(args)))

        return run

    def pubsub(self) -> PubSub:
        return self.client.pubsub(ignore_subscribe_messages=True)

    async def ping(self) -> bool:
        try:
            async with asyncio.timeout(PING_TIMEOUT):
                return bool(await self.client.ping())
        except (TimeoutError, RedisError, OSError):
            return False

    async def aclose(self) -> None:
        await self.client.aclose()
