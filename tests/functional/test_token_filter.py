"""The unknown-token filter on a real `sidecar serve` process (SPEC 15, issue 9 acceptance 6):
a flood of unknown tokens costs Postgres at most the miss budget, while new tokens work."""

from __future__ import annotations

import asyncio
import secrets
import time

import aiohttp

from tests.conftest import Db
from tests.functional.test_connection_bounds import Serve, serve  # noqa: F401 (fixture)
from tests.helpers import scrape, scraped


async def _status(http: aiohttp.ClientSession, port: int, token: str) -> int:
    async with http.get(f"http://127.0.0.1:{port}/_sidecar/auth/v1/x",
                        headers={"Authorization": f"Bearer {token}"}) as r:
        await r.read()
        return r.status


async def _metric(http: aiohttp.ClientSession, ops_port: int, name: str) -> float:
    found = await scrape(http, f"http://127.0.0.1:{ops_port}/metrics")
    return scraped(found, name, {})


async def _eventually(seconds: float, check: object) -> float:
    started = time.monotonic()
    while True:
        if await check():  # type: ignore[operator]
            return time.monotonic() - started
        assert time.monotonic() - started < seconds, f"not within {seconds}s"
        await asyncio.sleep(0.1)


async def test_unknown_token_flood_spares_postgres_and_new_tokens_work(
    serve: Serve, db: Db  # noqa: F811
) -> None:
    existing, _ = await db.add_token("app")
    sc = await serve()
    connector = aiohttp.TCPConnector(limit=32)
    async with aiohttp.ClientSession(connector=connector) as http:
        async def built() -> bool:
            return await _metric(http, sc.ops_port, "sidecar_token_filter_rebuilds_total") >= 1

        await _eventually(15, built)
        assert await _status(http, sc.port, existing) == 200
        await db.conn.execute("SELECT pg_stat_statements_reset()")

        queue = [f"app-{secrets.token_urlsafe(24)}" for _ in range(5000)]
        statuses: list[int] = []

        async def worker() -> None:
            while queue:
                statuses.append(await _status(http, sc.port, queue.pop()))

        await asyncio.gather(*(worker() for _ in range(32)))
        assert statuses == [401] * 5000
        lookups = await db.lookup_count()
        assert lookups <= 250, f"{lookups} Postgres lookups for 5000 unknown tokens"
        assert await _metric(http, sc.ops_port, "sidecar_token_filter_answers_total") >= 4000

        fresh, _ = await db.add_token("app")
        await asyncio.sleep(1)
        assert await _status(http, sc.port, fresh) == 200

        # A token created while the LISTEN connection is gone: its NOTIFY is lost, and the
        # filter answers nothing until it is rebuilt after the reconnect.
        await db.conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                              " WHERE application_name = 'apikey-sidecar-listen'")
        during, _ = await db.add_token("app")

        async def accepted() -> bool:
            return await _status(http, sc.port, during) == 200

        took = await _eventually(15, accepted)
        assert took < 15
