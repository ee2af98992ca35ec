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
4. A LISTEN counts as connected (`connected` is set) only once it is known to deliver: after
   every (re)connect a self-test NOTIFY is sent over another connection (`notify`, the
   primary pool) and must arrive within SELF_TEST_TIMEOUT. A LISTEN that cannot work (on a
   standby; through PgBouncer's transaction pooling it "succeeds" but nothing arrives) is
   logged with its reason and retried; the self-test repeats every SELF_TEST_INTERVAL, and a
   working LISTEN that stops delivering is reconnected (notifications may have been lost).
5. Self-test payloads (this replica's or any other's) are consumed here and never reach
   `on_messages`: they invalidate nothing and are never counted.
6. `connected` (an Event) and the `sidecar_subscription_connected{subscription}` gauge change
   together, in `_set_connected`, so alerts see what readiness sees.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import asyncpg
from redis.exceptions import RedisClusterException, RedisError

from sidecar.backoff import Backoff
from sidecar.dependency_log import DependencyState
from sidecar.dependency_log import describe as _driver_describe

if TYPE_CHECKING:
    from sidecar.metrics import Metrics
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


# Self-test of a LISTEN (rule 4), seconds. The interval re-checks a verified LISTEN with one
# NOTIFY; the retry re-sends the test while a LISTEN is not delivering.
SELF_TEST_TIMEOUT = 5.0
SELF_TEST_INTERVAL = 30.0
SELF_TEST_RETRY = 10.0
SELF_TEST_SEND_RETRY = 1.0  # when the self-test NOTIFY could not even be sent
# How long to wait before connecting again to a server that cannot LISTEN (a standby).
UNUSABLE_RETRY = 5.0
# Self-test payloads start with this: a JSON object, where the triggers send JSON arrays.
SELF_TEST_PREFIX = '{"sidecar_self_test":'
Notify = Callable[[str, str], Awaitable[None]]
_LOST = ""  # queued when the LISTEN connection terminates (no NOTIFY is handled after it)


def is_self_test(payload: str) -> bool:
    return payload.startswith(SELF_TEST_PREFIX)


class ListenUnusable(Exception):
    """The LISTEN connection reaches a server where LISTEN cannot work."""


class SubscriptionLost(Exception):
    """A subscription ended; its message already says why (driver class and message)."""


def _describe(exc: BaseException) -> str:
    """The driver's class and message, one line, bounded and scrubbed (sidecar.dependency_log);
    a SubscriptionLost already carries such a line."""
    if isinstance(exc, SubscriptionLost):
        return str(exc)
    return _driver_describe(exc)


class _Subscription:
    name = "subscription"

    def __init__(self, on_reconnect: OnReconnect, metrics: Metrics | None = None) -> None:
        self.on_reconnect = on_reconnect
        self.connected = asyncio.Event()
        self.connects = 0
        self._task: asyncio.Task[None] | None = None
        # Created at 0 now: "not connected yet" shows from the start (metrics rule 2).
        self._gauge = (metrics.subscription_connected.labels(subscription=self.name)
                       if metrics is not None else None)

    def _set_connected(self, connected: bool) -> None:
        """Rule 4."""
        if connected:
            self.connected.set()
        else:
            self.connected.clear()
        if self._gauge is not None:
            self._gauge.set(1 if connected else 0)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"sidecar-{self.name}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._set_connected(False)

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
                unusable = isinstance(exc, ListenUnusable)
                log.log(level, "%s %s: %s", self.name, "cannot work" if unusable else "lost",
                        str(exc) if unusable else _describe(exc))
                delay = UNUSABLE_RETRY if unusable else None
            else:
                delay = None
            self._set_connected(False)
            await asyncio.sleep(backoff.next_delay() if delay is None else delay)

    async def _connected(self, backoff: Backoff) -> None:
        retries = backoff.failures
        backoff.reset()
        self.connects += 1
        if self.connects > 1:
            await self.on_reconnect()
        self._set_connected(True)
        log.info("%s connected%s", self.name, f" after {retries} retries" if retries else "")

    async def _session(self, backoff: Backoff) -> None:
        raise NotImplementedError


class PostgresSubscription(_Subscription):
    """LISTEN on a channel over a dedicated connection (pooled connections get recycled)."""

    name = "postgres-listen"

    def __init__(
        self, dsn: str, channel: str, on_messages: OnMessages, on_reconnect: OnReconnect,
        *, health_interval: float = 2.0, timeout: float = 5.0, notify: Notify | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        super().__init__(on_reconnect, metrics)
        self.on_messages = on_messages
        self.dsn, self.channel = dsn, channel
        self.health_interval, self.timeout = health_interval, timeout
        self.notify = notify
        self.delivery = DependencyState(self.name, log)

    async def _session(self, backoff: Backoff) -> None:
        conn = await asyncpg.connect(self.dsn, timeout=self.timeout,
                                     server_settings={"application_name": "apikey-sidecar-listen"})
        queue: asyncio.Queue[str] = asyncio.Queue()
        lost = asyncio.Event()
        try:
            def terminated(_conn: object) -> None:
                lost.set()
                # Wakes the loop at once (it may be waiting on the queue for seconds): a lost
                # LISTEN must stop counting as connected now, not at the next health check.
                queue.put_nowait(_LOST)

            conn.add_termination_listener(terminated)
            if await conn.fetchval("SELECT pg_is_in_recovery()", timeout=self.timeout):
                raise ListenUnusable(
                    "the LISTEN connection reaches a standby (pg_is_in_recovery() is true), "
                    "where LISTEN cannot work; point SIDECAR_DATABASE_LISTEN_URL (default "
                    "SIDECAR_DATABASE_URL) at the primary")
            await conn.add_listener(self.channel, lambda _c, _pid, _ch, payload: queue.put_nowait(
                str(payload)))
            if self.notify is None:
                await self._connected(backoff)
            else:
                await self._reconnected(backoff)
            await self._listen(conn, queue, lost)
            raise ConnectionError("listen connection terminated")
        finally:
            if not conn.is_closed():
                conn.terminate()

    async def _reconnected(self, backoff: Backoff) -> None:
        """Like `_connected`, but `connected` waits for the self-test (rule 4)."""
        backoff.reset()
        self.connects += 1
        if self.connects > 1:
            await self.on_reconnect()

    async def _listen(self, conn: asyncpg.Connection, queue: asyncio.Queue[str],
                      lost: asyncio.Event) -> None:
        sending: list[asyncio.Task[bool]] = []
        try:
            await self._deliver(conn, queue, lost, sending)
        finally:
            for task in sending:
                task.cancel()

    async def _deliver(self, conn: asyncpg.Connection, queue: asyncio.Queue[str],
                       lost: asyncio.Event, sending: list[asyncio.Task[bool]]) -> None:
        loop = asyncio.get_running_loop()
        # One nonce per connection: a late answer to a test of an earlier connection proves
        # nothing about this one.
        probe = f'{SELF_TEST_PREFIX}"{secrets.token_hex(8)}"}}'
        next_test = loop.time() if self.notify is not None else float("inf")
        deadline: float | None = None
        checked = loop.time()
        failed_once = False
        while not lost.is_set():
            now = loop.time()
            if deadline is None and now >= next_test:
                # Sent beside the loop: notifications keep being handled meanwhile.
                sending[:] = [asyncio.create_task(self._send_probe(probe))]
                deadline = now + SELF_TEST_TIMEOUT
            wake = min(checked + self.health_interval,
                       deadline if deadline is not None else next_test)
            try:
                # asyncio.timeout, not wait_for: Python 3.11's wait_for can swallow a
                # cancellation that coincides with the wait's end, and close() then hangs.
                async with asyncio.timeout(max(wake - loop.time(), 0.001)):
                    payload = await queue.get()
            except TimeoutError:
                now = loop.time()
                if deadline is not None and now >= deadline:
                    deadline = None
                    sent = sending[0] if sending else None
                    if sent is None or not (sent.done() and sent.result()):
                        # The other connection failed (or hangs), not the LISTEN: the test
                        # proved nothing; try again soon.
                        if sent is not None:
                            sent.cancel()
                        next_test = now + SELF_TEST_SEND_RETRY
                        continue
                    next_test = now + SELF_TEST_RETRY
                    if self.connected.is_set():
                        # It used to deliver: notifications may have been lost (rule 4).
                        raise ConnectionError(
                            f"self-test NOTIFY not received within {SELF_TEST_TIMEOUT:g} s"
                        ) from None
                    failed_once = True
                    self.delivery.down(
                        f"self-test NOTIFY not received within {SELF_TEST_TIMEOUT:g} s: "
                        "LISTEN through transaction pooling (PgBouncer pool_mode=transaction)"
                        " or a standby cannot work; point SIDECAR_DATABASE_LISTEN_URL at "
                        "Postgres directly or at session pooling")
                if now - checked >= self.health_interval:
                    # Quiet channel: make sure the connection is still there (a killed backend
                    # is not always noticed until we talk to it).
                    await conn.fetchval("SELECT 1", timeout=self.timeout)
                    checked = loop.time()
                continue
            batch = [payload]
            while len(batch) < MAX_BATCH and not queue.empty():
                batch.append(queue.get_nowait())
            # What arrived before the connection was lost is still handled; then the loop ends.
            batch = [p for p in batch if p != _LOST]
            if any(is_self_test(p) for p in batch):  # rule 5
                if probe in batch and deadline is not None:
                    deadline = None
                    next_test = loop.time() + SELF_TEST_INTERVAL
                    if not self.connected.is_set():
                        await self._verified(failed_once)
                        failed_once = False
                batch = [p for p in batch if not is_self_test(p)]
            if batch:
                await self.on_messages(batch)

    async def _send_probe(self, probe: str) -> bool:
        assert self.notify is not None
        try:
            async with asyncio.timeout(self.timeout):
                await self.notify(self.channel, probe)
        except Exception as exc:
            if not self.connected.is_set():
                self.delivery.down(f"self-test NOTIFY could not be sent: {_describe(exc)}")
            return False
        return True

    async def _verified(self, after_failure: bool) -> None:
        if after_failure:
            # Changes made while it did not deliver went unheard: as after a reconnect.
            await self.on_reconnect()
        self.delivery.up()
        self._set_connected(True)
        log.info("%s connected, self-test NOTIFY received", self.name)


class RedisSubscriber(_Subscription):
    """SUBSCRIBE to a Redis channel."""

    name = "redis-subscribe"

    def __init__(
        self, redis: GuardedRedis, channel: str, on_message: OnMessage,
        on_reconnect: OnReconnect, *, metrics: Metrics | None = None,
    ) -> None:
        super().__init__(on_reconnect, metrics)
        self.on_message = on_message
        self.redis, self.channel = redis, channel

    async def _session(self, backoff: Backoff) -> None:
        generation = self.redis.generation
        try:
            pubsub = await self.redis.pubsub()
        except (RedisError, RedisClusterException) as exc:
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
        except (RedisError, RedisClusterException) as exc:
            raise SubscriptionLost(self.redis.describe(exc)) from None
        finally:
            with contextlib.suppress(RedisError, RedisClusterException, OSError):
                await pubsub.aclose()  # type: ignore[no-untyped-call]
