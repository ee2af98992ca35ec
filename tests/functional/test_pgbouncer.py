"""PgBouncer in transaction pooling mode in front of Postgres (SPEC 3.5, issue 8 acceptance 1,
first half): with SIDECAR_DATABASE_STATEMENT_CACHE_SIZE=0 and the LISTEN connection going
straight to Postgres (SIDECAR_DATABASE_LISTEN_URL), lookups, revocation and last_used_at
writes all work."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest

from sidecar.app import SUBSCRIPTIONS
from sidecar.subscriptions import PostgresSubscription
from tests.conftest import SCHEMA, SidecarFactory, running, started
from tests.helpers import listening, status, within
from tests.servers import PG_PASSWORD, PgBouncerServer, PostgresServer


@pytest.fixture(scope="module")
def backend() -> Iterator[PostgresServer]:
    yield from running(lambda: PostgresServer().setup())


@pytest.fixture(scope="module")
def pgbouncer(backend: PostgresServer) -> Iterator[PgBouncerServer]:
    yield from running(lambda: PgBouncerServer(backend, pool_mode="transaction").start())


async def test_transaction_pooling_with_statement_cache_off_and_direct_listen(
    backend: PostgresServer, pgbouncer: PgBouncerServer, make_sidecar: SidecarFactory,
    upstream: Any, http: aiohttp.ClientSession,
) -> None:
    conn = await asyncpg.connect(backend.dsn)
    try:
        await conn.execute(SCHEMA)
        rows = await conn.fetch(
            "INSERT INTO api_tokens (type, token) SELECT 'app', 'pgb-' || g"
            " FROM generate_series(1, 120) g RETURNING id, token")
    finally:
        await conn.close()
    tokens = {r["token"]: str(r["id"]) for r in rows}
    sc = await make_sidecar(database_url=pgbouncer.dsn, database_statement_cache_size=0,
                            database_listen_url=backend.dsn,
                            upstream_url=str(upstream.make_url("")))
    await listening(sc)
    names = sorted(tokens)
    # Three rounds of 40 concurrent tokens never seen before: every lookup is a statement
    # through PgBouncer, interleaved on its 4 server connections.
    for round_ in range(3):
        batch = names[round_ * 40:(round_ + 1) * 40]
        assert await asyncio.gather(*(status(http, sc, t) for t in batch)) == [200] * 40

    conn = await asyncpg.connect(backend.dsn)
    try:
        revoked = names[0]
        await conn.execute("DELETE FROM api_tokens WHERE token = $1", revoked)

        async def refused() -> bool:
            return await status(http, sc, revoked) == 401

        await within(1.0, refused)

        async def written() -> bool:
            n = await conn.fetchval("SELECT count(*) FROM api_tokens"
                                    " WHERE last_used_at IS NOT NULL")
            return bool(n == len(names) - 1)

        await within(10.0, written)
    finally:
        await conn.close()
    async with http.get(sc.ops_url("/readyz")) as r:
        assert r.status == 200
        doc = orjson.loads(await r.read())
    assert doc["status"] == "ready"
    assert doc["invalidation"] == "ok"


async def test_listen_through_transaction_pooling_is_reported_down_with_its_reason(
    backend: PostgresServer, pgbouncer: PgBouncerServer, make_sidecar: SidecarFactory,
    http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture,
) -> None:
    """SPEC 3.5: LISTEN through transaction pooling "succeeds" but never hears a NOTIFY. The
    self-test catches it: /readyz says `invalidation: down` and the log says why."""
    conn = await asyncpg.connect(backend.dsn)
    try:
        await conn.execute(SCHEMA)
    finally:
        await conn.close()
    caplog.set_level(logging.INFO, logger="sidecar.subscriptions")
    sc = await make_sidecar(database_url=pgbouncer.dsn, database_statement_cache_size=0)

    def reasons() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "sidecar.subscriptions"
                and r.levelno == logging.WARNING and "self-test NOTIFY not received" in
                r.getMessage()]

    async def explained() -> bool:
        return bool(reasons())

    await within(10.0, explained)
    assert "pool_mode=transaction" in reasons()[0]
    assert "SIDECAR_DATABASE_LISTEN_URL" in reasons()[0]
    assert PG_PASSWORD not in caplog.text
    async with http.get(sc.ops_url("/readyz")) as r:
        assert r.status == 200  # it can serve: Postgres answers through PgBouncer
        doc = orjson.loads(await r.read())
    assert doc["postgres"] == "ok"
    assert doc["invalidation"] == "down"
    assert doc["status"] == "degraded"
    listen = next(s for s in sc.app[SUBSCRIPTIONS] if isinstance(s, PostgresSubscription))
    assert not listen.connected.is_set()  # so the token filter does not trust it either


async def test_listen_through_session_pooling_is_verified(
    backend: PostgresServer, make_sidecar: SidecarFactory, http: aiohttp.ClientSession,
) -> None:
    """Session pooling keeps one server connection per client: LISTEN works through it, the
    self-test passes and `invalidation` is ok (no LISTEN URL of its own needed)."""
    conn = await asyncpg.connect(backend.dsn)
    try:
        await conn.execute(SCHEMA)
    finally:
        await conn.close()
    session = await asyncio.to_thread(
        started, lambda: PgBouncerServer(backend, pool_mode="session").start())
    try:
        sc = await make_sidecar(database_url=session.dsn)
        await listening(sc)
        async with http.get(sc.ops_url("/readyz")) as r:
            doc = orjson.loads(await r.read())
        assert doc["invalidation"] == "ok"
        assert doc["status"] == "ready"
    finally:
        await asyncio.to_thread(session.destroy)
