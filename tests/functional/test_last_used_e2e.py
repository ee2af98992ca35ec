"""Last-used tracking (SPEC 8) end to end: real HTTP requests through a sidecar to an upstream,
`last_used_at` read back from Postgres.

Times are compared, not guessed: for every request the test notes when it sent it and when the
answer arrived (naive UTC, the same clock the sidecar uses). The sidecar records a use between
the two, so a token's stored `last_used_at` must lie in [latest send, latest answer] over its
requests; anything older means an entry was lost or moved backwards.

Runtime on the 2-core dev machine: 67-75 s, almost all of it the 20000-request burst (18-30 s,
depending on load) and the 30 s Postgres outage.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp.test_utils import TestServer

from sidecar.app import LAST_USED
from tests.conftest import SCHEMA, Db, Sidecar
from tests.helpers import scrape, scraped
from tests.servers import PostgresServer, free_port, wait_port

pytestmark = pytest.mark.timeout(180)

# A cheap upstream endpoint: the sidecar's work is what is measured, not the echo's.
PATH = "/status/200"

UPDATE_CALLS = (
    "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements WHERE query ILIKE 'UPDATE api_tokens%'"
)


def utc_now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


async def add_tokens(conn: asyncpg.Connection, n: int) -> list[str]:
    """n token rows in one statement; returns the raw tokens (stored plain)."""
    rows = await conn.fetch(
        "INSERT INTO api_tokens (type, token)"
        " SELECT 'app', 'e2e-' || g || '-' || md5(random()::text)"
        " FROM generate_series(1, $1) AS g ORDER BY g RETURNING token",
        n,
    )
    return [r[0] for r in rows]


async def last_used(conn: asyncpg.Connection) -> dict[str, datetime | None]:
    rows = await conn.fetch("SELECT token, last_used_at FROM api_tokens")
    return {r[0]: r[1] for r in rows}


async def update_calls(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval(UPDATE_CALLS))


@dataclass
class Uses:
    """What the client saw: per token the latest send and latest answer time, and statuses."""

    last_start: dict[str, datetime] = field(default_factory=dict)
    last_end: dict[str, datetime] = field(default_factory=dict)
    statuses: Counter[int] = field(default_factory=Counter)

    async def hit(self, http: aiohttp.ClientSession, url: str, token: str) -> float:
        """One request; returns its latency in seconds."""
        start = utc_now()
        t0 = time.perf_counter()
        async with http.get(url, headers={"Authorization": f"Bearer {token}"}) as resp:
            await resp.read()
            status = resp.status
        latency = time.perf_counter() - t0
        end = utc_now()
        self.statuses[status] += 1
        if token not in self.last_start or start > self.last_start[token]:
            self.last_start[token] = start
        if token not in self.last_end or end > self.last_end[token]:
            self.last_end[token] = end
        return latency

    @property
    def total(self) -> int:
        return sum(self.statuses.values())

    def wrong(self, stored: dict[str, datetime | None]) -> list[str]:
        """Tokens whose stored last_used_at is not the time of their latest use."""
        out = []
        for token, start in self.last_start.items():
            at = stored.get(token)
            if at is None or not start <= at <= self.last_end[token]:
                out.append(f"{token}: stored {at}, latest use in [{start}, {self.last_end[token]}]")
        return out

    def assert_stored(self, stored: dict[str, datetime | None]) -> None:
        wrong = self.wrong(stored)
        assert not wrong, f"{len(wrong)} of {len(self.last_start)} tokens wrong, e.g. {wrong[:3]}"


async def drive(
    http: aiohttp.ClientSession, url: str, tokens: Sequence[str], uses: Uses, in_flight: int
) -> list[float]:
    """Send one request per item of `tokens`, at most `in_flight` at a time; latencies."""
    it = iter(tokens)
    latencies: list[float] = []

    async def worker() -> None:
        for token in it:
            latencies.append(await uses.hit(http, url, token))

    await asyncio.gather(*(worker() for _ in range(max(1, min(in_flight, len(tokens))))))
    return latencies


async def ops_metric(http: aiohttp.ClientSession, ops_url: str, name: str,
                     labels: dict[str, str] | None = None) -> float:
    """One sample of the ops listener's /metrics, as a scraper would read it."""
    return scraped(await scrape(http, ops_url), name, labels)


def upstream_url(upstream: TestServer) -> str:
    return str(upstream.make_url(""))


async def start(make_sidecar: Any, upstream: TestServer, **overrides: Any) -> Sidecar:
    overrides.setdefault("last_used_min_age", 0)
    sc: Sidecar = await make_sidecar(upstream_url=upstream_url(upstream), **overrides)
    return sc


# 1. ---------------------------------------------------------------------------------------

# The issue asks for 100000 requests over 1000 tokens. Through the in-process test server
# (client, sidecar and upstream share one event loop) this 2-core machine does 650-1100
# requests/s, so 100000 would take 90-150 s; 20000 (20 uses per token, 18-30 s) is what fits
# the ~30 s budget. The property under test does not depend on the count: rows per flush are
# bounded by distinct tokens, and 20000 requests already repeat every token 20 times.
BURST_REQUESTS = 20_000
BURST_TOKENS = 1000
BURST_IN_FLIGHT = 50


async def test_burst_over_many_tokens_is_one_bounded_flush(
    db: Db, make_sidecar: Any, upstream: TestServer
) -> None:
    tokens = await add_tokens(db.conn, BURST_TOKENS)
    # A 1 h interval: the background flusher stays asleep during the burst and the test
    # triggers the one flush itself (the same `flush()` the timer calls), so a slow or busy
    # machine cannot split the burst over two intervals and make this flaky.
    sc = await start(make_sidecar, upstream, last_used_flush_interval=3600)
    main = sc.app
    sequence = tokens * (BURST_REQUESTS // BURST_TOKENS)
    random.Random(100_000).shuffle(sequence)
    uses = Uses()
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=BURST_IN_FLIGHT)
    ) as http:
        started = time.perf_counter()
        await drive(http, sc.url(PATH), sequence, uses, BURST_IN_FLIGHT)
        took = time.perf_counter() - started
        print(f"\n{BURST_REQUESTS} requests over {BURST_TOKENS} tokens in {took:.1f} s "
              f"({BURST_REQUESTS / took:.0f}/s)")
        assert uses.statuses == {200: BURST_REQUESTS}

        # Nothing was written on the request path; one entry per token waits.
        assert await update_calls(db.conn) == 0
        assert main[LAST_USED].pending == BURST_TOKENS

        rows = await main[LAST_USED].flush()

        assert await update_calls(db.conn) == 1, "one flush must be one UPDATE statement"
        assert rows == BURST_TOKENS  # at most one row per distinct token, not per request
        assert main[LAST_USED].pending == 0
        uses.assert_stored(await last_used(db.conn))
        ops = sc.ops_url("/metrics")
        assert await ops_metric(http, ops, "sidecar_last_used_rows_flushed_total") == rows
        assert await ops_metric(http, ops, "sidecar_postgres_queries_total",
                                {"kind": "last_used"}) == 1


# 2. ---------------------------------------------------------------------------------------

SLOW_FLUSH_S = 2.0


async def test_slow_flush_does_not_delay_requests(
    db: Db, make_sidecar: Any, upstream: TestServer
) -> None:
    tokens = await add_tokens(db.conn, 20)
    sc = await start(make_sidecar, upstream, last_used_flush_interval=3600,
                     local_cache_ttl=600)
    main = sc.app
    uses = Uses()
    async with aiohttp.ClientSession() as http:
        url = sc.url(PATH)
        await drive(http, url, tokens, uses, 5)  # every token cached from here on
        before = await drive(http, url, tokens * 15, uses, 4)
        used_before_flush = utc_now()

        # Every UPDATE of api_tokens now takes 2 s more (once per statement).
        await db.conn.execute(
            "CREATE OR REPLACE FUNCTION e2e_slow_update() RETURNS trigger LANGUAGE plpgsql AS"
            f" $$ BEGIN PERFORM pg_sleep({SLOW_FLUSH_S}); RETURN NULL; END $$;"
            " CREATE TRIGGER e2e_slow_update BEFORE UPDATE ON api_tokens"
            " FOR EACH STATEMENT EXECUTE FUNCTION e2e_slow_update()"
        )
        try:
            flush_started = time.perf_counter()
            flush = asyncio.create_task(main[LAST_USED].flush())
            flush_ended: list[float] = []
            flush.add_done_callback(lambda _: flush_ended.append(time.perf_counter()))
            during: list[tuple[float, float]] = []  # (sent at, latency)

            async def traffic(offset: int) -> None:
                i = offset
                while not flush.done():
                    sent = time.perf_counter()
                    during.append((sent, await uses.hit(http, url, tokens[i % len(tokens)])))
                    i += 1

            await asyncio.gather(*(traffic(k) for k in range(4)))
            rows = await flush
        finally:
            await db.conn.execute(
                "DROP TRIGGER IF EXISTS e2e_slow_update ON api_tokens;"
                " DROP FUNCTION IF EXISTS e2e_slow_update()"
            )

    flush_took = flush_ended[0] - flush_started
    # Requests sent while the flush was running, however long they took themselves.
    in_flush = [lat for sent, lat in during if flush_started <= sent < flush_ended[0]]
    median_before, median_during = statistics.median(before), statistics.median(in_flush)
    print(f"\nflush took {flush_took:.2f} s; {len(in_flush)} requests sent meanwhile; median "
          f"latency before {median_before * 1000:.1f} ms, during {median_during * 1000:.1f} ms, "
          f"max during {max(in_flush) * 1000:.1f} ms")
    assert rows == len(tokens)
    assert flush_took >= SLOW_FLUSH_S, "the trigger did not slow the flush down"
    assert uses.statuses == {200: uses.total}
    # Had requests waited for the flush, 4 sequential clients would have sent about 4.
    assert len(in_flush) >= 100
    assert median_during < 0.1
    assert max(in_flush) < SLOW_FLUSH_S / 2, "a request waited for the flush"
    # The flush wrote what was recorded before it; uses during it were recorded meanwhile
    # and wait for the next flush.
    stored = await last_used(db.conn)
    assert all(at is not None and at <= used_before_flush for at in stored.values()), stored
    assert main[LAST_USED].pending == len(tokens)
    assert await main[LAST_USED].flush() == len(tokens)
    uses.assert_stored(await last_used(db.conn))


# 3. ---------------------------------------------------------------------------------------

# The 30 s; the test's runtime is dominated by it (~34 s with Postgres setup).
OUTAGE_S = 30.0
OUTAGE_FLUSH_INTERVAL = 0.5


@pytest.mark.slow
async def test_postgres_outage_loses_no_last_used(
    own_postgres: PostgresServer, make_sidecar: Any, upstream: TestServer
) -> None:
    conn = await asyncpg.connect(own_postgres.dsn)
    try:
        await conn.execute(SCHEMA)
        tokens = await add_tokens(conn, 100)
    finally:
        await conn.close()
    sc = await start(make_sidecar, upstream, database_url=own_postgres.dsn,
                     last_used_flush_interval=OUTAGE_FLUSH_INTERVAL, database_timeout=2)
    main = sc.app
    uses = Uses()
    async with aiohttp.ClientSession() as http:
        url = sc.url(PATH)
        ops = sc.ops_url("/metrics")
        # Warm the caches; the background flusher writes the uses within one interval.
        await drive(http, url, tokens, uses, 10)
        warmed = time.perf_counter()
        check = await asyncpg.connect(own_postgres.dsn)
        try:
            while uses.wrong(await last_used(check)):
                assert time.perf_counter() - warmed < OUTAGE_FLUSH_INTERVAL + 2.0, (
                    "background flush did not write the uses within one interval"
                )
                await asyncio.sleep(0.05)
        finally:
            await check.close()
        errors_before = await ops_metric(http, ops, "sidecar_last_used_flush_errors_total")

        await asyncio.to_thread(own_postgres.stop)
        stopped_at = utc_now()
        rng = random.Random(30)
        outage_started = time.perf_counter()
        while (elapsed := time.perf_counter() - outage_started) < OUTAGE_S:
            # Token i is last used about i % into the outage, so the latest uses of most
            # tokens come before some of the failed flushes: an entry lost by a failed flush
            # would show. Each round: the 5 tokens about to retire plus 15 random others,
            # ~100 requests/s, all answered from the cache (fresh for local_cache_ttl = 10 s,
            # then stale-if-error because the store cannot be reached).
            first = int(len(tokens) * elapsed / OUTAGE_S)
            rest = tokens[first + 5:]
            batch = tokens[first:first + 5] + rng.sample(rest, min(15, len(rest)))
            await drive(http, url, batch, uses, 10)
            await asyncio.sleep(0.15)

        # Still down: flushes failed, were retried, and kept every entry.
        assert await ops_metric(http, ops, "sidecar_last_used_flush_errors_total") > (
            errors_before + 1
        )
        assert main[LAST_USED].consecutive_failures > 0
        assert main[LAST_USED].pending > 0
        # Past local_cache_ttl the answers came from the stale-if-error path.
        assert await ops_metric(http, ops, "sidecar_cache_lookups_total",
                                {"tier": "stale", "result": "stale"}) > 0
        await asyncio.to_thread(own_postgres.start)

        # The background retry may be up to 60 s away (max back-off); flush now instead of
        # waiting for it. The first attempts may still meet connections of the old server.
        deadline = time.perf_counter() + 20
        while True:
            try:
                await main[LAST_USED].flush()
                break
            except Exception:
                if time.perf_counter() > deadline:
                    raise
                await asyncio.sleep(0.2)
        assert main[LAST_USED].pending == 0
        assert await ops_metric(http, ops, "sidecar_last_used_dropped_total") == 0

    print(f"\n{uses.total} requests, {uses.total - len(tokens)} of them during the "
          f"{OUTAGE_S:.0f} s outage")
    assert uses.statuses == {200: uses.total}, "a request failed while Postgres was down"
    used_in_outage = {t for t, s in uses.last_start.items() if s >= stopped_at}
    assert used_in_outage == set(tokens)
    check = await asyncpg.connect(own_postgres.dsn)
    try:
        stored = await last_used(check)
    finally:
        await check.close()
    # Includes every token's uses during the outage: its latest use came after stopped_at.
    uses.assert_stored(stored)


# 4. ---------------------------------------------------------------------------------------


async def test_sigterm_flushes_pending_entries(
    db: Db, upstream: TestServer, tmp_path: Path
) -> None:
    tokens = await add_tokens(db.conn, 50)
    port, ops_port = free_port(), free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")},
        "SIDECAR_LISTEN": f"127.0.0.1:{port}",
        "SIDECAR_OPS_LISTEN": f"127.0.0.1:{ops_port}",
        "SIDECAR_DATABASE_URL": db.dsn,
        "SIDECAR_UPSTREAM_URL": upstream_url(upstream),
        "SIDECAR_LAST_USED_FLUSH_INTERVAL": "3600",  # nothing is flushed before the signal
        "SIDECAR_LAST_USED_MIN_AGE": "0",
    }
    log_path = tmp_path / "sidecar.log"
    with open(log_path, "wb") as log:  # a file, not a pipe: access lines must never block it
        proc = subprocess.Popen([sys.executable, "-m", "sidecar", "serve"], env=env,
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        await asyncio.to_thread(wait_port, ops_port)
        await asyncio.to_thread(wait_port, port)
        uses = Uses()
        sequence = tokens * 3
        random.Random(4).shuffle(sequence)
        async with aiohttp.ClientSession() as http:
            await drive(http, f"http://127.0.0.1:{port}{PATH}", sequence, uses, 10)
            pending = await ops_metric(http, f"http://127.0.0.1:{ops_port}/metrics",
                                       "sidecar_last_used_pending")
        assert uses.statuses == {200: len(sequence)}
        assert pending == len(tokens)
        assert await update_calls(db.conn) == 0
        assert set((await last_used(db.conn)).values()) == {None}

        proc.send_signal(signal.SIGTERM)
        rc = await asyncio.to_thread(proc.wait, 30)
        output = log_path.read_text(errors="replace")[-4000:]  # the tail: shutdown lines
        assert rc == 0, output
        assert await update_calls(db.conn) == 1, output
        uses.assert_stored(await last_used(db.conn))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_two_sidecars_never_move_last_used_backwards(
    db: Db, make_sidecar: Any, upstream: TestServer
) -> None:
    tokens = await add_tokens(db.conn, 40)
    early_a, early_b = tokens[:20], tokens[20:]  # used first on a / first on b
    a = await start(make_sidecar, upstream, last_used_flush_interval=3600)
    b = await start(make_sidecar, upstream, last_used_flush_interval=3600)
    qa, qb = a.app[LAST_USED], b.app[LAST_USED]
    uses = Uses()  # one record for both: the stored time must be the latest on either

    async with aiohttp.ClientSession() as http:

        async def use_both() -> None:
            # Sequential phases, so an older use ends before the newer one starts.
            await drive(http, a.url(PATH), early_a, uses, 10)
            await drive(http, b.url(PATH), early_b, uses, 10)
            await drive(http, b.url(PATH), early_a, uses, 10)
            await drive(http, a.url(PATH), early_b, uses, 10)
            # a now holds older times for early_a and newer ones for early_b; b the reverse.

        await use_both()
        # a first: its newer early_b times are written before b's older ones arrive.
        assert await qa.flush() == 40
        assert await qb.flush() == 20  # only early_a moves (forward); early_b stays
        uses.assert_stored(await last_used(db.conn))

        await use_both()
        # b first: the mirror image.
        assert await qb.flush() == 40
        assert await qa.flush() == 20
        uses.assert_stored(await last_used(db.conn))

        await use_both()
        # Both at once, overlapping batches.
        await asyncio.gather(qa.flush(), qb.flush())
        uses.assert_stored(await last_used(db.conn))
        assert uses.statuses == {200: uses.total}


# 5. ---------------------------------------------------------------------------------------


async def test_pending_bound_drops_and_counts_new_ids(
    db: Db, make_sidecar: Any, upstream: TestServer
) -> None:
    tokens = await add_tokens(db.conn, 1000)
    sc = await start(make_sidecar, upstream, last_used_flush_interval=3600,
                     last_used_max_pending=100)
    main = sc.app
    uses = Uses()
    async with aiohttp.ClientSession() as http:
        await drive(http, sc.url(PATH), tokens, uses, 20)
        ops = sc.ops_url("/metrics")
        dropped = await ops_metric(http, ops, "sidecar_last_used_dropped_total")
        pending_gauge = await ops_metric(http, ops, "sidecar_last_used_pending")
        assert uses.statuses == {200: 1000}, "a full queue must not fail requests"
        assert dropped == 900
        assert main[LAST_USED].pending <= 100
        assert pending_gauge == main[LAST_USED].pending == 100
        # Again: the 100 pending ids are refreshed (not dropped), the 900 others dropped again.
        await drive(http, sc.url(PATH), tokens, uses, 20)
        assert await ops_metric(http, ops, "sidecar_last_used_dropped_total") == 1800
        assert main[LAST_USED].pending == 100
    assert uses.statuses == {200: 2000}
    assert await main[LAST_USED].flush() == 100
    stored = await last_used(db.conn)
    written = {t: at for t, at in stored.items() if at is not None}
    assert len(written) == 100
    # Each written row carries its token's latest use (the second round), not the first.
    assert not [t for t, at in written.items()
                if not uses.last_start[t] <= at <= uses.last_end[t]]

