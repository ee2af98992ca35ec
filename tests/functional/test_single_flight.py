"""Single flight and the cache tiers (SPEC 3.3): concurrent misses of one token make one
Postgres query per replica, one in total with Redis; a fresh L1 entry touches nothing else."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from tests.conftest import Db, SidecarFactory
from tests.helpers import status


async def redis_data_calls(client: aioredis.Redis) -> int:
    """Commands that touch cache data (not the pub/sub connection's own traffic)."""
    stats = await client.info("commandstats")
    return sum(int(v["calls"]) for k, v in stats.items()
               if k.split("_", 1)[1] in ("get", "set", "eval", "evalsha", "del", "sadd", "expire",
                                         "smembers"))


# Thousands of client and server connections share the test's one event loop: on a loaded
# 2-core machine a single loop iteration over them (or a GC pass over their objects) can
# exceed the stall threshold without anything blocking. What these tests assert is counts
# of lookups and Redis calls, which no stall can make pass wrongly.
CROWDED_LOOP = pytest.mark.blocking_ok


@CROWDED_LOOP
async def test_thousand_concurrent_misses_make_one_lookup(
    make_sidecar: SidecarFactory, db: Db, upstream: Any, http: aiohttp.ClientSession,
    redis_url: str,
) -> None:
    token, _ = await db.add_token("app")
    # One instance without Redis: in-process single flight alone.
    solo = await make_sidecar(upstream_url=str(upstream.make_url("")))
    results = await asyncio.gather(*(status(http, solo, token) for _ in range(1000)))
    assert results == [200] * 1000
    assert await db.lookup_count() == 1

    # Two instances sharing Redis, a token neither has seen: one lookup in total.
    token2, _ = await db.add_token("app")
    # One lookup in total holds only while every Redis call answers within redis_timeout: a
    # slow loop (debug mode, a busy machine) would otherwise time a lock call out, open the
    # breaker, and let each replica ask Postgres itself, which is right then but not this test.
    a = await make_sidecar(upstream_url=str(upstream.make_url("")), redis_url=redis_url,
                           redis_timeout=10)
    b = await make_sidecar(upstream_url=str(upstream.make_url("")), redis_url=redis_url,
                           redis_timeout=10)
    before = await db.lookup_count()
    results = await asyncio.gather(*(status(http, a if i % 2 else b, token2)
                                     for i in range(1000)))
    assert results == [200] * 1000
    assert await db.lookup_count() - before == 1
    # The same holds for a token that does not exist (negative answers are shared too).
    results = await asyncio.gather(*(status(http, a if i % 2 else b, "nope-" + "x" * 20)
                                     for i in range(400)))
    assert results == [401] * 400
    assert await db.lookup_count() - before == 2


@CROWDED_LOOP
async def test_fresh_local_entry_makes_no_redis_calls(
    make_sidecar: SidecarFactory, db: Db, upstream: Any, http: aiohttp.ClientSession,
    redis_url: str, redis_client: aioredis.Redis,
) -> None:
    token, _ = await db.add_token("app")
    # The request path is what is measured: the last-used flusher, which also collects what
    # stopped sidecars handed to Redis (one script call per flush), must not run meanwhile.
    sc = await make_sidecar(upstream_url=str(upstream.make_url("")), redis_url=redis_url,
                            local_cache_ttl=120, last_used_flush_interval=600)
    assert await status(http, sc, token) == 200
    before = await redis_data_calls(redis_client)
    sem = asyncio.Semaphore(50)

    async def one() -> int:
        async with sem:
            return await status(http, sc, token)

    results = await asyncio.gather(*(one() for _ in range(10000)))
    assert results == [200] * 10000
    assert await redis_data_calls(redis_client) == before
