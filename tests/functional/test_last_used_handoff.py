"""Shutdown while Postgres is down (SPEC 15, issue 9 acceptance 8): the final flush retries,
then hands what is left to Redis, and the next flush of another sidecar writes it; without
Redis the loss is counted and logged with its number."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp
import asyncpg
import pytest
import redis.asyncio as aioredis

from sidecar.app import LAST_USED, METRICS
from sidecar.last_used_handoff import HANDOFF_KEY
from tests.conftest import SCHEMA, SidecarFactory
from tests.helpers import sample, status, within
from tests.servers import PostgresServer


async def last_used_of(dsn: str, row_id: str) -> Any:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval("SELECT last_used_at FROM api_tokens WHERE id = $1::uuid",
                                   row_id)
    finally:
        await conn.close()


@pytest.mark.parametrize("with_redis", [True, False], ids=["redis", "no-redis"])
async def test_entries_outlive_a_shutdown_during_an_outage(
    own_postgres: PostgresServer, make_sidecar: SidecarFactory, upstream: Any,
    redis_url: str, redis_client: aioredis.Redis, with_redis: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    await redis_client.delete(HANDOFF_KEY)
    conn = await asyncpg.connect(own_postgres.dsn)
    try:
        await conn.execute(SCHEMA)
        row_id = str(await conn.fetchval(
            "INSERT INTO api_tokens (type, token) VALUES ('app', 'handoff-token') RETURNING id"))
    finally:
        await conn.close()
    redis = {"redis_url": redis_url} if with_redis else {}
    # A long interval: nothing is flushed before the shutdown, which must do it.
    first = await make_sidecar(database_url=own_postgres.dsn, last_used_flush_interval=60,
                               upstream_url=str(upstream.make_url("")), **redis)
    async with aiohttp.ClientSession() as http:
        assert await status(http, first, "handoff-token") == 200
    queue = first.app[LAST_USED]
    assert queue.pending == 1

    await asyncio.to_thread(own_postgres.stop)
    with caplog.at_level(logging.WARNING, logger="sidecar.last_used"):
        await queue.close(timeout=3.0)  # what the app's cleanup does on SIGTERM
    messages = [r.getMessage() for r in caplog.records if r.name == "sidecar.last_used"]
    if not with_redis:
        assert any("1 ids not written (lost)" in m for m in messages), messages
        assert sample(first.app[METRICS], "sidecar_last_used_lost_total") == 1
        assert queue.pending == 1  # not written, and not pretended to be
        return
    assert queue.pending == 0
    assert any("1 ids handed to Redis" in m for m in messages), messages
    assert await redis_client.hlen(HANDOFF_KEY) == 1
    assert sample(first.app[METRICS], "sidecar_last_used_lost_total") == 0

    await asyncio.to_thread(own_postgres.start)
    assert await last_used_of(own_postgres.dsn, row_id) is None
    # Another sidecar, which never saw the token, writes it with its next flush.
    await make_sidecar(database_url=own_postgres.dsn, last_used_flush_interval=0.2,
                       redis_url=redis_url)

    async def written() -> bool:
        return await last_used_of(own_postgres.dsn, row_id) is not None

    await within(10.0, written)
    assert await redis_client.exists(HANDOFF_KEY) == 0
