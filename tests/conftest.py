"""Shared fixtures: real Postgres and Redis (started here or taken from the environment),
a real upstream app, and a sidecar factory.

`SIDECAR_TEST_DATABASE_URL` / `SIDECAR_TEST_REDIS_URL` point the suite at existing servers.
Otherwise the servers are started on loopback ports in temp dirs. With `CI=true` a server
that cannot be had fails the test run instead of skipping.
"""

from __future__ import annotations

import asyncio
import inspect
import io
import os
import secrets
import shutil
import sys
import threading
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import aiohttp
import asyncpg
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestServer
from aiohttp.web_runner import BaseRunner

from tests.servers import (
    PostgresServer,
    PostgresStandby,
    RedisClusterServers,
    RedisSentinelServers,
    RedisServer,
    RedisTlsServer,
    ServerUnavailable,
)
from tests.upstream import make_upstream

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = (ROOT / "config" / "schema.sql").read_text()
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


# The event loop may not stall for this long during a test: a blocking call in an async test
# or fixture (subprocess.run, time.sleep, a server's stop()) freezes every client and server
# sharing the loop, so whatever the test measures meanwhile is wrong. Generous, since a loaded
# 2-core CI machine can deschedule a healthy loop for a while.
STALL_SECONDS = float(os.environ.get("SIDECAR_TEST_STALL_SECONDS", "1.0"))


class LoopWatchdog:
    """Finds stalls of an event loop: a task on the loop stamps a heartbeat every few
    milliseconds and a thread checks its age, recording where the loop's thread was when a
    stall began. asyncio's debug mode (slow_callback_duration) finds the same, but it records
    a traceback for every callback scheduled and made the suite several times slower."""

    BEAT = 0.02

    def __init__(self, loop: asyncio.AbstractEventLoop, limit: float) -> None:
        self.loop, self.limit = loop, limit
        self.stalls: list[str] = []
        self._beat = time.monotonic()
        self._loop_thread = threading.get_ident()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="loop-watchdog", daemon=True)
        self._task: asyncio.Task[None] | None = None
        # Only the test function's own run is watched (see pytest_runtest_call): fixtures
        # that are not async run while the loop stands still, which is no stall of it.
        self.armed = False

    def arm(self, on: bool) -> None:
        self._beat = time.monotonic()
        self.armed = on

    async def _heartbeat(self) -> None:
        while True:
            self._beat = time.monotonic()
            await asyncio.sleep(self.BEAT)

    def _watch(self) -> None:
        reported = 0.0
        while not self._stop.wait(self.BEAT):
            beat = self._beat
            if self.armed and time.monotonic() - beat > self.limit and beat != reported:
                reported = beat  # one report per stall
                frame = sys._current_frames().get(self._loop_thread)
                stack = traceback.extract_stack(frame) if frame else []
                # Where in our code it happened, then the innermost frames.
                ours = [f for f in stack if f"{os.sep}tests{os.sep}" in f.filename
                        and not f.filename.endswith("conftest.py")][-2:]
                where = "".join(traceback.format_list(ours + stack[-2:])) or "?"
                self.stalls.append(f"loop stalled over {self.limit}s at:\n{where}")

    def start(self) -> None:
        self._task = self.loop.create_task(self._heartbeat())
        self._thread.start()

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            self._task.cancel()
        await asyncio.to_thread(self._thread.join)


WATCHDOG = pytest.StashKey[LoopWatchdog]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    watchdog = item.stash.get(WATCHDOG, None)
    if watchdog is not None:
        watchdog.arm(True)
    try:
        return (yield)
    finally:
        if watchdog is not None:
            watchdog.arm(False)


@pytest.fixture(autouse=True)
async def no_blocking_the_loop(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    """Fails a test during which the event loop stalled for STALL_SECONDS or more. Move
    blocking work to `asyncio.to_thread`; opt out with `@pytest.mark.blocking_ok`."""
    # A plain test function runs while the loop stands still; only async tests run on it.
    is_async = inspect.iscoroutinefunction(getattr(request, "function", None))
    if not is_async or request.node.get_closest_marker("blocking_ok") is not None:
        yield
        return
    watchdog = LoopWatchdog(asyncio.get_running_loop(), STALL_SECONDS)
    watchdog.start()
    request.node.stash[WATCHDOG] = watchdog
    try:
        yield
    finally:
        await watchdog.stop()
    if watchdog.stalls:
        pytest.fail("the event loop was blocked:\n" + "\n".join(watchdog.stalls[:3]),
                    pytrace=False)


def unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"required test server unavailable in CI: {reason}")
    pytest.skip(reason)


def required_tool(name: str, install: str) -> str:
    """The path of a command-line tool the test needs: a skip without it (a failure in CI)."""
    path = shutil.which(name)
    if path is None:
        unavailable(f"{name} not installed ({install})")
        raise AssertionError("unreachable")
    return path


S = TypeVar("S")


def started(setup: Callable[[], S]) -> S:
    """A server from `setup`, or a skip (a failure in CI) when its binaries are missing."""
    try:
        return setup()
    except ServerUnavailable as exc:
        unavailable(str(exc))
        raise


def start_postgres() -> PostgresServer:
    return started(lambda: PostgresServer().setup())


def start_redis() -> RedisServer:
    return started(lambda: RedisServer().setup())


class _Destroyable(Protocol):
    def destroy(self) -> None: ...


D = TypeVar("D", bound=_Destroyable)


def running(setup: Callable[[], D]) -> Iterator[D]:
    """For session fixtures: the server `setup` starts, destroyed when the run ends."""
    server = started(setup)
    try:
        yield server
    finally:
        server.destroy()


@pytest.fixture(scope="session")
def pg_dsn() -> Iterator[str]:
    external = os.environ.get("SIDECAR_TEST_DATABASE_URL")
    if external:
        yield external
        return
    server = start_postgres()
    try:
        yield server.dsn
    finally:
        server.destroy()


@pytest.fixture(scope="session")
def redis_server_url() -> Iterator[str]:
    external = os.environ.get("SIDECAR_TEST_REDIS_URL")
    if external:
        yield external
        return
    server = start_redis()
    try:
        yield server.url
    finally:
        server.destroy()


@pytest.fixture(scope="session")
def pg_replicated() -> Iterator[tuple[PostgresServer, PostgresStandby]]:
    """A primary and its streaming hot standby of their own (read-replica tests pause replay,
    which no other test must see)."""
    primary = start_postgres()
    try:
        standby = PostgresStandby(primary).setup()
        try:
            yield primary, standby
        finally:
            standby.destroy()
    finally:
        primary.destroy()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterServers]:
    """A Redis Cluster of 3 masters, formed once per run (it takes seconds)."""
    yield from running(lambda: RedisClusterServers().setup())


@pytest.fixture(scope="session")
def redis_sentinel() -> Iterator[RedisSentinelServers]:
    """A master, a replica and a Sentinel, once per run; a test may fail the master over
    (ask `master_port()` where it is now)."""
    yield from running(lambda: RedisSentinelServers().setup())


@pytest.fixture(scope="session")
def redis_tls() -> Iterator[RedisTlsServer]:
    """Redis with a mutual-TLS port (certificates made at start), once per run."""
    def setup() -> RedisTlsServer:
        server = RedisTlsServer()
        server.setup()
        return server

    yield from running(setup)


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    """A Postgres of this test's own, which it may stop and start."""
    yield from running(lambda: PostgresServer().setup())


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A Redis of this test's own, which it may stop and start."""
    yield from running(lambda: RedisServer().setup())


@dataclass
class Db:
    """Test-side access to the token table."""

    conn: asyncpg.Connection
    dsn: str

    async def add_token(
        self,
        scope: str = "app",
        *,
        tenant_id: str | None = None,
        app_id: str | None = None,
        token: str | None = None,
        stored: str | None = None,
    ) -> tuple[str, str]:
        """Insert a token row; returns (raw token, row id). `stored` overrides the column."""
        raw = token or "app-" + secrets.token_urlsafe(24)
        row_id = await self.conn.fetchval(
            "INSERT INTO api_tokens (app_id, tenant_id, type, token) VALUES ($1, $2, $3, $4)"
            " RETURNING id::text",
            uuid.UUID(app_id) if app_id else None,
            uuid.UUID(tenant_id) if tenant_id else None,
            scope,
            stored if stored is not None else raw,
        )
        return raw, row_id

    async def lookup_count(self) -> int:
        """Lookup statements Postgres executed since the test began (pg_stat_statements)."""
        value = await self.conn.fetchval(
            "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements"
            " WHERE query ILIKE 'SELECT id, tenant_id, app_id, type FROM api_tokens%'"
        )
        return int(value)


async def prepare_db(dsn: str) -> asyncpg.Connection:
    conn = await asyncpg.connect(dsn)
    await conn.execute(SCHEMA)
    await conn.execute("TRUNCATE api_tokens")
    await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
    await conn.execute("SELECT pg_stat_statements_reset()")
    return conn


@pytest.fixture
async def db(pg_dsn: str) -> AsyncIterator[Db]:
    conn = await prepare_db(pg_dsn)
    try:
        yield Db(conn, pg_dsn)
    finally:
        await conn.close()


@pytest.fixture
async def redis_url(redis_server_url: str) -> str:
    client = aioredis.from_url(redis_server_url)
    await client.flushall()
    await client.aclose()
    return redis_server_url


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A client for the tests: no connection limit (concurrency tests open hundreds), and
    bodies as the sidecar sent them (no decompression)."""
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
        yield session


@pytest.fixture
async def upstream() -> AsyncIterator[TestServer]:
    app = make_upstream()
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield server
    await server.close()


class MainListener(TestServer):
    """The main listener as `sidecar serve` runs it (`create_main_runner`: connection bounds,
    the decision fast path), the access log off."""

    def __init__(self, app: web.Application, settings: Any) -> None:
        super().__init__(app, host="127.0.0.1")
        self.settings = settings

    async def _make_runner(self, **kwargs: Any) -> BaseRunner:
        from sidecar.app import create_main_runner

        return create_main_runner(self.app, self.settings, None, **kwargs)


@dataclass
class Sidecar:
    main: TestServer
    ops: TestServer
    app: web.Application
    env: dict[str, Any] = field(default_factory=dict)

    def url(self, path: str) -> str:
        return str(self.main.make_url(path))

    def ops_url(self, path: str) -> str:
        return str(self.ops.make_url(path))


SidecarFactory = Callable[..., Awaitable[Sidecar]]


@pytest.fixture
async def make_sidecar(db: Db) -> AsyncIterator[SidecarFactory]:
    """Start sidecars (main + ops listener) with settings overrides given as keyword args."""
    from sidecar.app import create_app, create_ops_app
    from sidecar.settings import load_settings

    started: list[Sidecar] = []

    async def factory(**overrides: Any) -> Sidecar:
        overrides.setdefault("database_url", db.dsn)
        overrides.setdefault("last_used_flush_interval", 0.2)
        overrides.setdefault("last_used_min_age", 0)
        settings = load_settings(**overrides)
        app = create_app(settings)
        main = MainListener(app, settings)
        await main.start_server()
        ops = TestServer(create_ops_app(app), host="127.0.0.1")
        await ops.start_server()
        sc = Sidecar(main, ops, app, overrides)
        started.append(sc)
        return sc

    yield factory
    for sc in reversed(started):
        await closed_within(CLOSE_SECONDS, sc)


# A sidecar's shutdown is bounded (grace, final flush); one that hangs is a bug, reported
# with the tasks still pending rather than by the suite's much later timeout.
CLOSE_SECONDS = 30.0


async def closed_within(seconds: float, sc: Sidecar) -> None:
    async def close() -> None:
        await sc.ops.close()
        await sc.main.close()

    closing = asyncio.ensure_future(close())
    done, _ = await asyncio.wait({closing}, timeout=seconds)
    if done:
        closing.result()
        return
    pending = io.StringIO()
    for task in asyncio.all_tasks():
        if task is not asyncio.current_task() and task is not closing:
            task.print_stack(file=pending)
    pytest.fail(f"sidecar shutdown took over {seconds}s; pending tasks:\n{pending.getvalue()}",
                pytrace=False)
