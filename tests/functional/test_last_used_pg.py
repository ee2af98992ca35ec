"""LastUsedQueue + PostgresLastUsedWriter against a real Postgres (SPEC 8)."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator
from datetime import datetime, timedelta

import asyncpg
import pytest
from prometheus_client import CollectorRegistry

from sidecar.last_used import LastUsedQueue, PostgresLastUsedWriter
from sidecar.metrics import Metrics
from tests.conftest import SCHEMA, Db
from tests.helpers import sample
from tests.servers import PostgresServer

T0 = datetime(2024, 5, 1, 12, 0, 0)

UPDATE_CALLS = (
    "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements WHERE query ILIKE 'UPDATE api_tokens%'"
)


def ts(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


async def add_tokens(conn: asyncpg.Connection, n: int) -> list[str]:
    """n token rows in one statement (row ids as text, in insertion order)."""
    rows = await conn.fetch(
        "INSERT INTO api_tokens (type, token) SELECT 'app', 'tok-' || g"
        " FROM generate_series(1, $1) AS g ORDER BY g RETURNING id::text",
        n,
    )
    return [r[0] for r in rows]


async def last_used(conn: asyncpg.Connection) -> dict[str, datetime | None]:
    rows = await conn.fetch("SELECT id::text, last_used_at FROM api_tokens")
    return {r[0]: r[1] for r in rows}


async def update_calls(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval(UPDATE_CALLS))


def metric(m: Metrics, name: str, labels: dict[str, str] | None = None) -> float:
    return sample(m, name, labels)


@pytest.fixture
async def pool(db: Db) -> AsyncIterator[asyncpg.Pool]:
    p = await asyncpg.create_pool(db.dsn, min_size=1, max_size=4)
    yield p
    await p.close()


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(CollectorRegistry())


async def test_many_requests_one_statement_latest_times(
    db: Db, pool: asyncpg.Pool, metrics: Metrics
) -> None:
    ids = await add_tokens(db.conn, 1000)
    writer = PostgresLastUsedWriter(pool, min_age=60, metrics=metrics)
    queue = LastUsedQueue(writer, flush_interval=10, max_pending=100_000, metrics=metrics)
    rng = random.Random(8)
    expected: dict[str, datetime] = {}
    for _ in range(100_000):
        token_id = rng.choice(ids)
        # Microsecond times in random order: the queue must keep the maximum, not the last.
        at = ts(rng.randrange(0, 3_600_000_000) / 1e6)
        queue.record(token_id, at)
        if token_id not in expected or at > expected[token_id]:
            expected[token_id] = at
    assert queue.pending == len(expected)
    before = await update_calls(db.conn)
    rows = await queue.flush()
    assert await update_calls(db.conn) - before == 1
    assert rows == len(expected) <= 1000
    stored = await last_used(db.conn)
    assert {k: v for k, v in stored.items() if v is not None} == expected
    assert metric(metrics, "sidecar_last_used_rows_flushed_total") == rows
    assert metric(metrics, "sidecar_postgres_queries_total", {"kind": "last_used"}) == 1
    assert metric(metrics, "sidecar_postgres_errors_total", {"kind": "last_used"}) == 0


async def test_never_moves_backwards(db: Db, pool: asyncpg.Pool) -> None:
    ids = await add_tokens(db.conn, 3)
    writer = PostgresLastUsedWriter(pool, min_age=0)
    queue = LastUsedQueue(writer, flush_interval=10, max_pending=100)
    for token_id in ids:
        queue.record(token_id, ts(100))
    assert await queue.flush() == 3
    queue.record(ids[0], ts(50))  # older: must not win
    queue.record(ids[1], ts(150))  # newer: must win
    assert await queue.flush() == 1
    assert await last_used(db.conn) == {ids[0]: ts(100), ids[1]: ts(150), ids[2]: ts(100)}


async def test_concurrent_overlapping_flushes_keep_the_latest(db: Db, pool: asyncpg.Pool) -> None:
    ids = await add_tokens(db.conn, 300)
    # Two queues stand for two replicas; each has its own writer, sharing one table.
    queues = [
        LastUsedQueue(PostgresLastUsedWriter(pool, min_age=0), flush_interval=10,
                      max_pending=10_000)
        for _ in range(2)
    ]
    rng = random.Random(3)
    expected: dict[str, datetime] = {}
    for round_no in range(5):
        for queue in queues:
            # Overlapping halves: ids 0..199 and 100..299, times in random order per round.
            subset = ids[:200] if queue is queues[0] else ids[100:]
            for token_id in subset:
                at = ts(rng.randrange(0, 10_000) + round_no)
                queue.record(token_id, at)
                if token_id not in expected or at > expected[token_id]:
                    expected[token_id] = at
        await asyncio.gather(*(q.flush() for q in queues))
    assert await last_used(db.conn) == expected


async def test_min_age_skips_recent_rows(db: Db, pool: asyncpg.Pool) -> None:
    (a, b) = await add_tokens(db.conn, 2)
    queue = LastUsedQueue(PostgresLastUsedWriter(pool, min_age=60), flush_interval=10,
                          max_pending=100)
    queue.record(a, ts(0))
    queue.record(b, ts(0))
    assert await queue.flush() == 2  # NULL is always written
    queue.record(a, ts(30))  # 30 s after the stored time: skipped
    queue.record(b, ts(59.999))
    assert await queue.flush() == 0
    assert await last_used(db.conn) == {a: ts(0), b: ts(0)}
    queue.record(a, ts(60))  # exactly min_age later: written
    queue.record(b, ts(61))
    assert await queue.flush() == 2
    assert await last_used(db.conn) == {a: ts(60), b: ts(61)}


async def test_chunking(db: Db, pool: asyncpg.Pool, metrics: Metrics) -> None:
    ids = await add_tokens(db.conn, 1000)
    writer = PostgresLastUsedWriter(pool, min_age=60, metrics=metrics, chunk_size=100)
    queue = LastUsedQueue(writer, flush_interval=10, max_pending=100_000)
    for i, token_id in enumerate(ids):
        queue.record(token_id, ts(i))
    before = await update_calls(db.conn)
    assert await queue.flush() == 1000
    assert await update_calls(db.conn) - before == 10
    assert metric(metrics, "sidecar_postgres_queries_total", {"kind": "last_used"}) == 10
    assert await last_used(db.conn) == {token_id: ts(i) for i, token_id in enumerate(ids)}


async def test_invalid_and_unknown_ids_do_not_fail_the_batch(db: Db, pool: asyncpg.Pool) -> None:
    (a,) = await add_tokens(db.conn, 1)
    queue = LastUsedQueue(PostgresLastUsedWriter(pool, min_age=0), flush_interval=10,
                          max_pending=100)
    queue.record("not-a-uuid", ts(1))
    queue.record(str(uuid.uuid4()), ts(1))  # valid but deleted meanwhile: simply no row
    queue.record(a, ts(1))
    assert await queue.flush() == 1
    assert queue.pending == 0
    assert await last_used(db.conn) == {a: ts(1)}


async def test_postgres_outage_loses_nothing(own_postgres: PostgresServer) -> None:
    conn = await asyncpg.connect(own_postgres.dsn)
    await conn.execute(SCHEMA)
    ids = await add_tokens(conn, 200)
    await conn.close()

    metrics = Metrics(CollectorRegistry())
    pool = await asyncpg.create_pool(own_postgres.dsn, min_size=1, max_size=2, timeout=2)
    writer = PostgresLastUsedWriter(pool, min_age=0, metrics=metrics)
    queue = LastUsedQueue(writer, flush_interval=0.05, max_pending=10_000, metrics=metrics,
                          max_backoff=0.2)
    expected: dict[str, datetime] = {}
    clock = 0

    def record_some() -> None:
        nonlocal clock
        for token_id in ids:
            clock += 1
            queue.record(token_id, ts(clock))
            expected[token_id] = ts(clock)

    try:
        queue.start()
        record_some()
        await asyncio.sleep(0.2)
        await asyncio.to_thread(own_postgres.stop)
        # Records keep coming while Postgres is away; flushes fail and are retried.
        for _ in range(5):
            record_some()
            await asyncio.sleep(0.1)
        assert metric(metrics, "sidecar_last_used_flush_errors_total") > 0
        assert queue.consecutive_failures > 0
        await asyncio.to_thread(own_postgres.start)
        record_some()

        check = await asyncio.wait_for(asyncpg.connect(own_postgres.dsn), 10)
        try:
            stored: dict[str, datetime | None] = {}
            for _ in range(200):
                stored = await last_used(check)
                if stored == expected:
                    break
                await asyncio.sleep(0.05)
            assert stored == expected
        finally:
            await check.close()
        assert queue.consecutive_failures == 0
        assert metric(metrics, "sidecar_last_used_dropped_total") == 0
    finally:
        await queue.close(timeout=5)
        pool.terminate()
