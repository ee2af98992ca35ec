"""A hot-standby read replica for lookups (SPEC 3.5): SIDECAR_DATABASE_READ_URL.

Against a real primary and its streaming standby (`pg_basebackup -R`). Where a statement ran
is counted with pg_stat_statements on each server. Replication lag is simulated exactly by
pausing WAL replay on the standby (`pg_wal_replay_pause()`)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest

from sidecar.app import STORE
from tests.conftest import SCHEMA, SidecarFactory
from tests.helpers import always, listening, status, within
from tests.servers import PG_PASSWORD, PostgresServer, PostgresStandby

LOOKUP = "SELECT id, tenant_id, app_id, type FROM api_tokens%"

Pair = tuple[PostgresServer, PostgresStandby]


async def lookups(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval(
        "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements WHERE query ILIKE $1", LOOKUP))


@pytest.fixture
async def conns(pg_replicated: Pair) -> AsyncIterator[tuple[asyncpg.Connection,
                                                            asyncpg.Connection]]:
    primary, standby = pg_replicated
    p = await asyncpg.connect(primary.dsn)
    s = await asyncpg.connect(standby.dsn)
    try:
        await p.execute(SCHEMA)
        await p.execute("TRUNCATE api_tokens")
        yield p, s
    finally:
        if await s.fetchval("SELECT pg_is_wal_replay_paused()"):
            await s.execute("SELECT pg_wal_replay_resume()")
        await p.close()
        await s.close()


async def replicated(p: asyncpg.Connection, s: asyncpg.Connection) -> None:
    """Until the standby has replayed everything the primary wrote so far."""
    # The insert position: with asynchronous commit the write position may be behind a commit.
    target = await p.fetchval("SELECT pg_current_wal_insert_lsn()")

    async def caught_up() -> bool:
        return bool(await s.fetchval("SELECT pg_last_wal_replay_lsn() >= $1", target))

    await within(10.0, caught_up)


async def test_lookups_on_the_replica_rechecked_on_the_primary_writes_on_the_primary(
    pg_replicated: Pair, conns: tuple[asyncpg.Connection, asyncpg.Connection],
    make_sidecar: SidecarFactory, upstream: Any, http: aiohttp.ClientSession,
) -> None:
    primary, standby = pg_replicated
    p, s = conns
    known = "app-replica-known"
    await p.execute("INSERT INTO api_tokens (type, token) VALUES ('app', $1)", known)
    await replicated(p, s)
    sc = await make_sidecar(database_url=primary.dsn, database_read_url=standby.dsn,
                            upstream_url=str(upstream.make_url("")), local_cache_ttl=0,
                            cache_ttl=1)
    await listening(sc)
    store = sc.app[STORE]
    assert store.fence is not None

    async def unfenced() -> bool:  # the replica has caught up with the start position
        return not store.fence.fenced  # type: ignore[union-attr]

    await within(5.0, unfenced)

    # 1. A lookup runs on the replica, not on the primary.
    before = await lookups(p), await lookups(s)
    assert await status(http, sc, known) == 200
    assert (await lookups(p), await lookups(s)) == (before[0], before[1] + 1)

    # 2. Replication lag never refuses a valid token: with replay paused, a token inserted on
    # the primary without a NOTIFY (triggers off) is unknown to the replica, re-checked on the
    # primary and accepted at once.
    await s.execute("SELECT pg_wal_replay_pause()")
    fresh = "app-replica-fresh"
    async with p.transaction():
        await p.execute("SET LOCAL session_replication_role = replica")
        await p.execute("INSERT INTO api_tokens (type, token) VALUES ('app', $1)", fresh)
    before = await lookups(p), await lookups(s)
    assert await status(http, sc, fresh) == 200
    assert (await lookups(p), await lookups(s)) == (before[0] + 1, before[1] + 1)
    # An unknown token is asked of both, and refused.
    assert await status(http, sc, "app-replica-never-stored") == 401

    # 3. A DELETE on the primary is refused within 1 s, though the paused replica still has
    # the row: the NOTIFY (heard on the primary) fences the token off the replica until it has
    # replayed the change.
    assert await s.fetchval("SELECT count(*) FROM api_tokens WHERE token = $1", known) == 1
    await p.execute("DELETE FROM api_tokens WHERE token = $1", known)

    async def refused() -> bool:
        return await status(http, sc, known) == 401

    await within(1.0, refused)
    assert await s.fetchval("SELECT count(*) FROM api_tokens WHERE token = $1", known) == 1
    await s.execute("SELECT pg_wal_replay_resume()")

    # 4. last_used_at lands on the primary (the replica is read-only anyway).
    async def written() -> bool:
        return bool(await p.fetchval(
            "SELECT last_used_at IS NOT NULL FROM api_tokens WHERE token = $1", fresh))

    await within(10.0, written)
    async with http.get(sc.ops_url("/readyz")) as r:
        doc = orjson.loads(await r.read())
    assert doc["postgres_read"] == "ok"
    assert doc["invalidation"] == "ok"
    assert doc["last_used"] == "ok"
    assert doc["status"] == "ready"


async def test_replica_down_lookups_fall_back_to_the_primary(
    pg_replicated: Pair, conns: tuple[asyncpg.Connection, asyncpg.Connection],
    make_sidecar: SidecarFactory, upstream: Any, http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from tests.servers import free_port

    primary, _ = pg_replicated
    p, _s = conns
    token = "app-replica-fallback"
    await p.execute("INSERT INTO api_tokens (type, token) VALUES ('app', $1)", token)
    caplog.set_level(logging.INFO, logger="sidecar.store")
    dead = f"postgresql://sidecar:{PG_PASSWORD}@127.0.0.1:{free_port()}/sidecar"
    sc = await make_sidecar(database_url=primary.dsn, database_read_url=dead,
                            upstream_url=str(upstream.make_url("")), database_timeout=1)
    await listening(sc)
    before = await lookups(p)
    assert await status(http, sc, token) == 200
    assert await lookups(p) == before + 1
    async with http.get(sc.ops_url("/readyz")) as r:
        assert r.status == 200
        doc = orjson.loads(await r.read())
    assert doc["postgres_read"] == "down"
    assert doc["status"] == "degraded"
    def lines() -> list[str]:
        return [r.getMessage() for r in caplog.records
                if "read replica unavailable" in r.getMessage()]

    async def logged() -> bool:
        return bool(lines())

    # Logged when the replica is first asked: by the fence, once LISTEN hears (replica_fence
    # rule 5), or by a lookup.
    await within(2.0, logged)
    await always(0.5, logged)  # ... and once only, however often it is asked meanwhile
    found = lines()
    assert len(found) == 1, found
    assert "ConnectionRefusedError" in found[0]  # the driver's own words
    assert PG_PASSWORD not in caplog.text


async def test_standby_as_listen_url_is_reported_down_with_its_reason(
    pg_replicated: Pair, conns: tuple[asyncpg.Connection, asyncpg.Connection],
    make_sidecar: SidecarFactory, http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    primary, standby = pg_replicated
    caplog.set_level(logging.INFO, logger="sidecar.subscriptions")
    sc = await make_sidecar(database_url=primary.dsn, database_listen_url=standby.dsn)

    def reasons() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "sidecar.subscriptions"
                and r.levelno == logging.WARNING and "standby" in r.getMessage()]

    async def explained() -> bool:
        return bool(reasons())

    await within(10.0, explained)
    assert "pg_is_in_recovery" in reasons()[0]
    assert "SIDECAR_DATABASE_LISTEN_URL" in reasons()[0]
    assert PG_PASSWORD not in caplog.text
    async with http.get(sc.ops_url("/readyz")) as r:
        assert r.status == 200
        doc = orjson.loads(await r.read())
    assert doc["invalidation"] == "down"
    assert doc["status"] == "degraded"


async def test_last_used_on_a_read_only_server_is_logged_and_reported(
    pg_replicated: Pair, conns: tuple[asyncpg.Connection, asyncpg.Connection],
    make_sidecar: SidecarFactory, upstream: Any, http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A misconfiguration: SIDECAR_DATABASE_URL on the standby. Lookups work, but the
    last_used_at flush fails; the log carries Postgres' own words and /readyz says so."""
    _, standby = pg_replicated
    p, s = conns
    token = "app-replica-readonly"
    await p.execute("INSERT INTO api_tokens (type, token) VALUES ('app', $1)", token)
    await replicated(p, s)
    caplog.set_level(logging.INFO, logger="sidecar.last_used")
    sc = await make_sidecar(database_url=standby.dsn, upstream_url=str(upstream.make_url("")))
    assert await status(http, sc, token) == 200

    def said() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "sidecar.last_used"
                and r.levelno == logging.WARNING and "read-only transaction" in r.getMessage()]

    async def explained() -> bool:
        return bool(said())

    await within(10.0, explained)
    assert "ReadOnlySQLTransactionError" in said()[0]
    assert PG_PASSWORD not in caplog.text
    async with http.get(sc.ops_url("/readyz")) as r:
        doc = orjson.loads(await r.read())
    assert doc["last_used"] == "down"
    assert doc["invalidation"] == "down"  # LISTEN on a standby cannot work either
    assert doc["status"] == "degraded"


async def test_multi_host_url_with_read_write_finds_the_primary(
    pg_replicated: Pair, conns: tuple[asyncpg.Connection, asyncpg.Connection],
    make_sidecar: SidecarFactory, upstream: Any, http: aiohttp.ClientSession,
) -> None:
    """Failover URLs: the standby listed first, the primary second; with
    target_session_attrs=read-write every connection (pool and LISTEN) lands on the primary."""
    primary, standby = pg_replicated
    p, _ = conns
    token = "app-replica-multihost"
    await p.execute("INSERT INTO api_tokens (type, token) VALUES ('app', $1)", token)
    url = (f"postgresql://sidecar:{PG_PASSWORD}@127.0.0.1:{standby.port},"
           f"127.0.0.1:{primary.port}/sidecar?target_session_attrs=read-write")
    sc = await make_sidecar(database_url=url, upstream_url=str(upstream.make_url("")))
    await listening(sc)  # LISTEN passed its self-test: it is on the primary
    assert await status(http, sc, token) == 200
    await p.execute("DELETE FROM api_tokens WHERE token = $1", token)

    async def refused() -> bool:
        return await status(http, sc, token) == 401

    await within(1.0, refused)
    async with http.get(sc.ops_url("/readyz")) as r:
        doc = orjson.loads(await r.read())
    assert doc["status"] == "ready"
    assert doc["last_used"] == "ok"
