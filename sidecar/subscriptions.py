"""Long-lived subscriptions that keep themselves alive: Postgres LISTEN and Redis pub/sub.

Rules that hold here:
1. A subscription that drops reconnects with jittered exponential back-off (capped at half a
   second: see RECONNECT_CAP), forever, until closed; it never takes the process down and
   never logs a payload.
2. After a reconnect, `on_reconnect` runs first: messages sent while we were away are lost,
   so the owner must assume everything changed (the Invalidator clears L1 and, after a
   NOTIFY gap, stops trusting L2 entries written before the reconnect).
3. Messages are handled in arrival order by a single consumer task. LISTEN hands over every
   notification already queued at once (up to `MAX_BATCH`), so a bulk change of many rows is
   handled in a few batches instead of one round trip per row.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import asyncpg
from redis.exceptions import RedisError

from sidecar.backoff import Backoff

if TYPE_CHECKING:
    from sidecar.redisclient import GuardedRedis

log = logging.getLogger("sidecar.subscriptions")

OnMessage = Callable[[str], Awaitable[None]]
OnMessages = Callable[[list[str]], Awaitable[None]]

MAX_BATCH = 1000
# Reconnect back-off of both subscriptions (sidecar.backoff), seconds. The cap is short on
# purpose: every notification sent while we are not listening is lost, so after an outage we
# must be listening again within a fraction of the 1 s revocation bound of the server's
# return (SPEC 3.4). An attempt against a server that is down is a refused connection: cheap.
RECONNECT_BASE = 0.1
RECONNECT_CAP = 0.5
OnReconnect = Callable[[], Awaitable[None]]


class SubscriptionLost(Exception):
    """A subscription ended; its message already says why (driver class and message)."""


def _describe(exc: BaseException) -> str:
    """The error class and the driver's message, one line, bounded; DSNs are not in these
    messages (asyncpg and redis-py name the host and port only)."""
    if isinstance(exc, SubscriptionLost):
        return str(exc)
    message = " ".join(str(exc).split())[:200]
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


class _Subscription:
    name = "subscription"

    def __init__(self, on_reconnect: OnReconnect) -> None:
        self.on_reconnect = on_reconnect
        self.connected = asyncio.Event()
        self.connects = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"sidecar-{self.name}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        backoff = Backoff(base=RECONNECT_BASE, cap=RECONNECT_CAP)
        while True:
            try:
                await self._session(backoff)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any failure: reconnect (rule 1)
                # Once per change of state: retries against a server that stays down are
                # not news (they come every RECONNECT_CAP seconds).
                level = logging.WARNING if backoff.failures == 0 else logging.DEBUG
                log.log(level, "%s lost: %s", self.name, _describe(exc))
            self.connected.clear()
            await asyncio.sleep(backoff.next_delay())

    async def _connected(self, backoff: Backoff) -> None:
        retries = backoff.failures
        backoff.reset()
        self.connects += 1
        if self.connects > 1:
            await self.on_reconnect()
        self.connected.set()
        log.info("%s connected%s", self.name, f" after {retries} retries" if retries else "")

    async def _session(self, backoff: Backoff) -> None:
        raise NotImplementedError


class PostgresSubscription(_Subscription):
    """LISTEN on a channel over a dedicated connection (pooled connections get recycled)."""

    name = "postgres-listen"

    def __init__(
        self, dsn: str, channel: str, on_messages: OnMessages, on_reconnect: OnReconnect,
        *, health_interval: float = 2.0, timeout: float = 5.0,
    ) -> None:
        super().__init__(on_reconnect)
        self.on_messages = on_messages
        self.dsn, self.channel = dsn, channel
        self.health_interval, self.timeout = health_interval, timeout

    async def _session(self, backoff: Backoff) -> None:
        conn = await asyncpg.connect(self.dsn, timeout=self.timeout,
                                     server_settings={"application_name": "apikey-sidecar-listen"})
        queue: asyncio.Queue[str] = asyncio.Queue()
        lost = asyncio.Event()
        try:
            conn.add_termination_listener(lambda _c: lost.set())
            await conn.add_listener(self.channel, lambda _c, _pid, _ch, payload: queue.put_nowait(
                str(payload)))
            await self._connected(backoff)
            while not lost.is_set():
                try:
                    payload = await asyncio.wait_for(queue.get(), self.health_interval)
                except TimeoutError:
                    # Quiet channel: make sure the connection is still there (a killed backend
                    # is not always noticed until we talk to it).
                    await conn.fetchval("SELECT 1", timeout=self.timeout)
                    continue
                batch = [payload]
                while len(batch) < MAX_BATCH and not queue.empty():
                    batch.append(queue.get_nowait())
                await self.on_messages(batch)
            raise ConnectionError("listen connection terminated")
        finally:
            if not conn.is_closed():
                conn.terminate()


class RedisSubscriber(_Subscription):
    """SUBSCRIBE to a Redis channel."""

    name = "redis-subscribe"

    def __init__(
        self, redis: GuardedRedis, channel: str, on_message: OnMessage,
        on_reconnect: OnReconnect,
    ) -> None:
        super().__init__(on_reconnect)
        self.on_message = on_message
        self.redis, self.channel = redis, channel

    async def _session(self, backoff: Backoff) -> None:
        generation = self.redis.generation
        try:
            pubsub = await self.redis.pubsub()
        except RedisError as exc:
            raise SubscriptionLost(self.redis.describe(exc)) from None
        try:
            await pubsub.subscribe(self.channel)
            await self._connected(backoff)
            while True:
                msg = await pubsub.get_message(timeout=1.0)
                if self.redis.generation != generation:
                    # The master moved (Sentinel): what is published now goes to the new one.
                    raise SubscriptionLost("redis master moved")
                if msg is None:
                    continue
                data = msg.get("data")
                if isinstance(data, bytes | str):
                    await self.on_message(data.decode() if isinstance(data, bytes) else data)
        except RedisError as exc:
            raise SubscriptionLost(self.redis.describe(exc)) from None
        finally:
            with contextlib.suppress(RedisError, OSError):
                await pubsub.aclose()  # type: ignore[no-untyped-call]
