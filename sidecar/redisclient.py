"""The breaker-guarded Redis client every Redis user of the sidecar goes through (the token
cache, rate limits, readiness, the pub/sub subscriber), and how it is built for each
topology (SPEC 3.5): one server, a Redis Cluster, or a master found through Sentinels.

Rules that hold here:
1. `call()` never raises for a Redis problem: it is counted, trips the circuit breaker and
   reads as None. Redis is an accelerator; Postgres stays the source of truth.
2. While the breaker is open, calls are skipped without touching the network, except one probe
   per back-off period.
3. Lua scripts are registered once (`script()`): each call then sends EVALSHA and the SHA;
   redis-py loads the script again by itself when a server answers NOSCRIPT (after a restart
   or a failover).
4. Redirections are not failures: the cluster client follows MOVED/ASK itself, and only an
   error it gives up on reaches the breaker.
5. Every error that changes what we know is logged once, with the driver's own class and
   message and every configured password replaced by `***`: the circuit opening, and a
   different error while it stays open. Repeats of the same error are debug lines.
6. With Sentinel, writes never go to a demoted master: the master is asked of the Sentinels
   every MASTER_CHECK_INTERVAL (and by every new connection) and, when it moved,
   a connection still pointing at the old one is closed when taken or released
   (`_MasterOnlyPool`), and `generation` changes, so the subscriber moves too.
   The old master stays a master for several seconds after the switch (until the Sentinels
   reconfigure it), so waiting for READONLY would write to it meanwhile.
   redis-py's SentinelConnectionPool also turns READONLY into a lost connection; any READONLY
   that still reaches us (from a script) drops the pool's connections for the same effect.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import SSLConnection, parse_url
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.exceptions import ReadOnlyError, RedisClusterException, RedisError
from redis.retry import Retry

from sidecar.breaker import CircuitBreaker
from sidecar.metrics import Metrics

if TYPE_CHECKING:
    from sidecar.settings import Settings

# What "Redis could not answer" looks like from redis-py. The cluster client's own failures
# (no node reachable, a slot no node covers) are not RedisErrors.
REDIS_ERRORS: tuple[type[BaseException], ...] = (
    TimeoutError, RedisError, RedisClusterException, OSError)

log = logging.getLogger("sidecar.redis")

T = TypeVar("T")
Client = aioredis.Redis | RedisCluster

# Readiness probes time out after a few seconds: answer well within that.
PING_TIMEOUT = 1.0
# How often the Sentinels are asked where the master is (rule 6), seconds.
MASTER_CHECK_INTERVAL = 1.0
# What the readiness probe touches: one key of its own (a hash tag, so one slot in a
# cluster), written with an expiry, and Redis's clock, as the rate-limit script does.
PROBE_KEY = "sidecar:{probe}"
_PROBE = """
redis.replicate_commands()
local t = redis.call('TIME')
redis.call('SET', KEYS[1], t[1], 'PX', 60000)
return 1
"""

Script = Callable[[Sequence[str], Sequence[int | str]], Awaitable[Any]]


@dataclass(frozen=True)
class Topology:
    """How to reach Redis besides the URL (SIDECAR_REDIS_MODE and its settings)."""

    mode: str = "standalone"
    sentinels: Sequence[tuple[str, int]] = ()
    sentinel_master: str = "mymaster"
    sentinel_password: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    secrets: Sequence[str] = field(default=())


def topology_of(settings: Settings) -> Topology:
    url = settings.redis_url.get_secret_value() if settings.redis_url is not None else None
    sentinel_password = (settings.redis_sentinel_password.get_secret_value()
                         if settings.redis_sentinel_password is not None else None)
    secrets = [sentinel_password or ""]
    if url is not None:
        parsed = parse_url(url)
        secrets.append(str(parsed.get("password") or ""))
    return Topology(
        mode=settings.redis_mode,
        sentinels=[(s.host, s.port) for s in settings.redis_sentinels],
        sentinel_master=settings.redis_sentinel_master,
        sentinel_password=sentinel_password,
        ca_file=settings.redis_ca_file,
        cert_file=settings.redis_cert_file,
        key_file=settings.redis_key_file,
        secrets=tuple(s for s in secrets if s),
    )


class _MasterOnlyPool(SentinelConnectionPool):
    """redis-py's Sentinel pool, except that a connection pointing elsewhere than the current
    master is closed when taken or released, never reused (rule 6): the stock pool drops only
    the idle connections when the master moves, so one busy at that moment would go on
    writing to the old master."""

    def _elsewhere(self, connection: Any) -> bool:
        address = self.master_address
        return (address is not None and connection.is_connected
                and (connection.host, connection.port) != tuple(address))

    async def get_master_address(self) -> Any:
        # The stock pool drops idle connections here, concurrently with tasks that may be
        # taking one (a write then fails on a closing socket); they are dropped by whoever
        # takes or releases them instead (below), which owns them at that moment.
        self.master_address = await self.sentinel_manager.discover_master(self.service_name)
        return self.master_address

    async def ensure_connection(self, connection: Any) -> None:
        if self._elsewhere(connection):
            await connection.disconnect()
        await super().ensure_connection(connection)

    async def release(self, connection: Any) -> None:
        if self._elsewhere(connection):
            await connection.disconnect()
        await super().release(connection)


def _tls(topology: Topology) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if topology.ca_file:
        out["ssl_ca_certs"] = topology.ca_file
    if topology.cert_file:
        out["ssl_certfile"] = topology.cert_file
        out["ssl_keyfile"] = topology.key_file
    return out


def connect(url: str | None, timeout: float, topology: Topology | None = None) -> Client:
    """A client that fails fast: one attempt, short timeouts (the breaker does the retrying).
    `url` may be None only with Sentinel (no credentials)."""
    topology = topology or Topology()
    common: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": Retry(NoBackoff(), 0),
        "health_check_interval": 30,
    }
    if topology.mode == "cluster":
        assert url is not None
        # The retry here is the cluster's own (re-reading the slot map after a node was
        # lost); MOVED/ASK are followed regardless (rule 4).
        return RedisCluster.from_url(url, **common, **_tls(topology))
    if topology.mode == "sentinel":
        master: dict[str, Any] = {}
        if url is not None:
            master = dict(parse_url(url))
            for ignored in ("host", "port", "path"):
                master.pop(ignored, None)
            if master.pop("connection_class", None) is SSLConnection:
                master["ssl"] = True
        sentinel_kwargs: dict[str, Any] = {
            "socket_timeout": timeout, "socket_connect_timeout": timeout,
            "retry": Retry(NoBackoff(), 0)}
        if topology.sentinel_password:
            sentinel_kwargs["password"] = topology.sentinel_password
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            list(topology.sentinels), sentinel_kwargs=sentinel_kwargs)
        client: aioredis.Redis = sentinel.master_for(
            topology.sentinel_master, connection_pool_class=_MasterOnlyPool, **master,
            **common, **_tls(topology))
        return client
    assert url is not None
    return aioredis.from_url(url, **common, **_tls(topology))


def describe(exc: BaseException, secrets: Sequence[str] = ()) -> str:
    """The error class and the driver's message on one bounded line, passwords scrubbed."""
    message = " ".join(str(exc).split())
    for secret in secrets:
        if secret:
            message = message.replace(secret, "***")
    message = message[:300]
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


class GuardedRedis:
    def __init__(self, client: Client, metrics: Metrics, *,
                 secrets: Sequence[str] = ()) -> None:
        self.client = client
        self.metrics = metrics
        self.secrets = tuple(s for s in secrets if s)
        self.breaker = CircuitBreaker(on_change=self._circuit_changed)
        self._reason = ""  # the last error logged (rule 5)
        self._probe = self.script("probe", _PROBE)
        self.generation = 0  # changes when the master moved (rule 6)
        # Told when the master moved: deletes sent to the demoted master, or acknowledged by it
        # and never replicated, are lost, so entries written before may be stale (rule 6).
        self.on_master_moved: Callable[[], None] | None = None
        self._pubsub_turn = -1
        self._watch: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Background work of the topology: following a Sentinel master (rule 6)."""
        pool = getattr(self.client, "connection_pool", None)
        if isinstance(pool, SentinelConnectionPool) and self._watch is None:
            self._watch = asyncio.create_task(self._follow_master(pool),
                                              name="sidecar-redis-sentinel")

    async def _follow_master(self, pool: SentinelConnectionPool) -> None:
        lost = ""
        known: tuple[Any, ...] | None = None
        first = True
        while True:
            # The first look is at once: a failover in the first interval must not be
            # taken for where the master always was.
            if not first:
                await asyncio.sleep(MASTER_CHECK_INTERVAL)
            first = False
            try:
                async with asyncio.timeout(PING_TIMEOUT * 2):
                    address = await pool.sentinel_manager.discover_master(pool.service_name)
            except REDIS_ERRORS as exc:
                reason = self.describe(exc)
                if reason != lost:
                    log.warning("redis sentinels cannot name the master: %s", reason)
                lost = reason
                continue
            if lost:
                log.info("redis sentinels answer again")
                lost = ""
            address = tuple(address)
            if known is not None and address != known:
                # The pool may have seen it first (a new connection asks the Sentinels too):
                # compared with what this watch knew, so the move is logged either way.
                log.warning("redis master moved (sentinel failover): now %s:%s", *address)
                self.generation += 1
                if self.on_master_moved is not None:
                    self.on_master_moved()
                # Connections to the old master are closed when next taken or released.
                pool.master_address = address
            known = address

    def _circuit_changed(self, is_open: bool) -> None:
        self.metrics.redis_circuit_open.set(1 if is_open else 0)
        if is_open:
            log.warning("redis unavailable: %s; serving from local cache and postgres",
                        self._reason)
        else:
            log.info("redis available again")

    def describe(self, exc: BaseException) -> str:
        return describe(exc, self.secrets)

    @property
    def available(self) -> bool:
        return not self.breaker.is_open

    async def _failed(self, op: str, exc: BaseException) -> None:
        self.metrics.redis_errors.labels(op=op).inc()
        reason = self.describe(exc)
        was_open = self.breaker.is_open
        previous, self._reason = self._reason, reason
        self.breaker.failure()  # logs when this opens the circuit
        if was_open and reason != previous:
            log.warning("redis still unavailable: %s", reason)
        else:
            log.debug("redis %s failed: %s", op, reason)
        if isinstance(exc, ReadOnlyError) and isinstance(self.client, aioredis.Redis):
            await self.client.connection_pool.disconnect()  # rule 6

    async def call(self, op: str, fn: Callable[[], Awaitable[T]]) -> T | None:
        """Run one Redis operation through the breaker: its result, or None when Redis
        could not be asked (rule 1)."""
        if not self.breaker.allow():
            return None
        try:
            result = await fn()
        except REDIS_ERRORS as exc:
            await self._failed(op, exc)
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

    async def pubsub(self) -> PubSub:
        """A pub/sub connection. In a cluster, classic SUBSCRIBE/PUBLISH reach every node, so
        any node will do: each call takes the next node of the cluster's list, so that a
        subscriber whose node failed moves on to another one."""
        if isinstance(self.client, RedisCluster):
            await self.client.initialize()
            nodes = self.client.get_primaries() or self.client.get_nodes()
            self._pubsub_turn += 1
            node = nodes[self._pubsub_turn % len(nodes)]
            return self.client.pubsub(node=node, ignore_subscribe_messages=True)
        return self.client.pubsub(ignore_subscribe_messages=True)

    async def ping(self) -> bool:
        try:
            async with asyncio.timeout(PING_TIMEOUT):
                return bool(await self.client.ping())
        except REDIS_ERRORS:
            return False

    async def probe(self) -> bool:
        """True when Redis does what the sidecar needs right now: the circuit is closed (or
        this is its probe and it succeeds) and a script that reads Redis's clock and writes a
        key with an expiry runs. A read-only master, a command missing from the ACL or a
        cluster without the probe key's slot read False, and count as a failure."""
        try:
            async with asyncio.timeout(PING_TIMEOUT):
                return bool(await self._probe([PROBE_KEY], []) == 1)
        except TimeoutError:
            return False

    async def aclose(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
            self._watch = None
        await self.client.aclose()
        # The Sentinel connections of a master_for() client are not closed with it.
        manager = getattr(getattr(self.client, "connection_pool", None), "sentinel_manager",
                          None)
        for sentinel in getattr(manager, "sentinels", ()):
            await sentinel.aclose()
