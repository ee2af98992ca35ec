"""last_used_at writes: write-behind queue (SPEC 8) against a per-request UPDATE (as Dify did).

    .venv/bin/python benchmarks/bench_last_used.py [--requests 100000] [--tokens 1000]

Starts a throwaway Postgres (tests.servers.PostgresServer) unless SIDECAR_TEST_DATABASE_URL
is set; on an existing database it creates the schema if missing and TRUNCATEs api_tokens.

Traffic is simulated: request i happens at `start + i / rate` (uniformly random token), and
the queue is flushed whenever that simulated clock passes a flush interval, plus once at the
end (as on shutdown). So the queue sees the flush cadence of `--rate` req/s with a real
`--flush-interval`, without the benchmark waiting for the traffic's duration in real time.
Uniform token choice is the worst case for the queue (most distinct ids per flush).
The numbers of statements and rows come from pg_stat_statements when it is available.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make `sidecar` and `tests` importable
    sys.path.insert(0, str(ROOT))

from sidecar.last_used import LastUsedQueue, PostgresLastUsedWriter  # noqa: E402
from tests.servers import benchmark_postgres  # noqa: E402

SCHEMA = (ROOT / "config" / "schema.sql").read_text()
BASELINE_SQL = "UPDATE api_tokens SET last_used_at=$1 WHERE id=$2"
STATS_SQL = (
    "SELECT coalesce(sum(calls), 0)::bigint, coalesce(sum(rows), 0)::bigint"
    " FROM pg_stat_statements WHERE query ILIKE 'UPDATE api_tokens%'"
)


@dataclass
class Result:
    statements: int
    rows: int
    wall: float
    request_path: list[float]  # seconds each simulated request spent on last_used bookkeeping
    source: str  # where statements/rows were counted


def traffic(ids: list[str], requests: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [rng.choice(ids) for _ in range(requests)]


async def reset(conn: asyncpg.Connection, have_stats: bool) -> None:
    await conn.execute("UPDATE api_tokens SET last_used_at = NULL")
    if have_stats:
        await conn.execute("SELECT pg_stat_statements_reset()")


async def pg_counts(conn: asyncpg.Connection) -> tuple[int, int]:
    row = await conn.fetchrow(STATS_SQL)
    assert row is not None  # an aggregate always returns one row
    return int(row[0]), int(row[1])


async def run_queue(
    pool: asyncpg.Pool, conn: asyncpg.Connection, seq: list[str], start: datetime, *,
    rate: float, flush_interval: float, min_age: float, have_stats: bool,
) -> Result:
    writer = PostgresLastUsedWriter(pool, min_age=min_age)
    queue = LastUsedQueue(writer, flush_interval=flush_interval, max_pending=100_000)
    statements = rows = 0
    costs: list[float] = []
    next_flush = flush_interval
    step = 1.0 / rate
    perf = time.perf_counter
    began = perf()
    for i, token_id in enumerate(seq):
        elapsed = i * step
        if elapsed >= next_flush:
            rows += await queue.flush()
            statements += 1
            next_flush += flush_interval
        t = perf()
        queue.record(token_id, start + timedelta(seconds=elapsed))
        costs.append(perf() - t)
    rows += await queue.flush()  # shutdown flush
    statements += 1
    wall = perf() - began
    if have_stats:
        statements, rows = await pg_counts(conn)
        return Result(statements, rows, wall, costs, "pg_stat_statements")
    return Result(statements, rows, wall, costs, "client")


async def run_baseline(
    pool: asyncpg.Pool, conn: asyncpg.Connection, seq: list[str], start: datetime, *,
    rate: float, concurrency: int, have_stats: bool,
) -> Result:
    step = 1.0 / rate
    costs: list[float] = [0.0] * len(seq)
    rows = 0
    perf = time.perf_counter
    next_index = 0

    async def worker() -> None:
        nonlocal next_index, rows
        while next_index < len(seq):
            i = next_index
            next_index += 1
            t = perf()
            status = await pool.execute(BASELINE_SQL, start + timedelta(seconds=i * step),
                                        seq[i])
            costs[i] = perf() - t
            rows += int(status.rpartition(" ")[2])

    began = perf()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = perf() - began
    if have_stats:
        statements, rows = await pg_counts(conn)
        return Result(statements, rows, wall, costs, "pg_stat_statements")
    return Result(len(seq), rows, wall, costs, "client")


async def max_lag(conn: asyncpg.Connection, seq: list[str], start: datetime,
                  rate: float) -> float:
    """Largest gap between a token's true last use and its stored last_used_at, in seconds."""
    truth: dict[str, datetime] = {}
    for i, token_id in enumerate(seq):
        truth[token_id] = start + timedelta(seconds=i / rate)
    stored = {r[0]: r[1] for r in await conn.fetch(
        "SELECT id::text, last_used_at FROM api_tokens WHERE last_used_at IS NOT NULL")}
    lags = [(at - stored[t]).total_seconds() if t in stored else float("inf")
            for t, at in truth.items()]
    return max(lags, default=0.0)


def fmt_us(seconds: float) -> str:
    return f"{seconds * 1e6:.2f} µs" if seconds < 1e-3 else f"{seconds * 1e3:.2f} ms"


def ratio(a: float, b: float) -> str:
    return f"{b / a:,.0f}x fewer" if a else "n/a"


async def bench(dsn: str, args: argparse.Namespace) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(SCHEMA)
        await conn.execute("TRUNCATE api_tokens")
        try:
            await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            await conn.execute("SELECT pg_stat_statements_reset()")
            have_stats = True
        except asyncpg.PostgresError:
            have_stats = False  # not preloaded or not permitted: count on the client side
        ids = [r[0] for r in await conn.fetch(
            "INSERT INTO api_tokens (type, token) SELECT 'app', 'bench-' || g"
            " FROM generate_series(1, $1) AS g RETURNING id::text", args.tokens)]
        seq = traffic(ids, args.requests, args.seed)
        start = datetime.now(UTC).replace(tzinfo=None)
        pool = await asyncpg.create_pool(dsn, min_size=args.concurrency,
                                         max_size=args.concurrency)
        try:
            await reset(conn, have_stats)
            q = await run_queue(pool, conn, seq, start, rate=args.rate,
                                flush_interval=args.flush_interval, min_age=args.min_age,
                                have_stats=have_stats)
            lag = await max_lag(conn, seq, start, args.rate)
            await reset(conn, have_stats)
            b = await run_baseline(pool, conn, seq, start, rate=args.rate,
                                   concurrency=args.concurrency, have_stats=have_stats)
        finally:
            await pool.close()
    finally:
        await conn.close()

    per = 100_000 / args.requests
    traffic_s = args.requests / args.rate
    print(f"\n{args.requests} requests over {args.tokens} tokens (uniform), simulated at "
          f"{args.rate:g} req/s = {traffic_s:g} s of traffic; queue: flush every "
          f"{args.flush_interval:g} s, min_age {args.min_age:g} s; baseline: "
          f"{args.concurrency} concurrent connections. Counts from {q.source}.\n")
    rows_fmt = [
        ("write statements / 100k requests", f"{q.statements * per:,.0f}",
         f"{b.statements * per:,.0f}", ratio(q.statements, b.statements)),
        ("rows written / 100k requests", f"{q.rows * per:,.0f}", f"{b.rows * per:,.0f}",
         ratio(q.rows, b.rows)),
        ("wall time (requests + writes)", f"{q.wall:.3f} s", f"{b.wall:.3f} s",
         f"{b.wall / q.wall:,.1f}x faster" if q.wall else "n/a"),
        ("request-path cost, mean", fmt_us(statistics.fmean(q.request_path)),
         fmt_us(statistics.fmean(b.request_path)),
         f"{statistics.fmean(b.request_path) / statistics.fmean(q.request_path):,.0f}x less"),
        ("request-path cost, p99", fmt_us(quantile(q.request_path, 0.99)),
         fmt_us(quantile(b.request_path, 0.99)), ""),
        ("max last_used_at lag at the end", f"{lag:.1f} s", "0 s", ""),
    ]
    head = ("", "write-behind queue", "per-request UPDATE (Dify)", "ratio")
    widths = [max(len(r[i]) for r in [head, *rows_fmt]) for i in range(4)]
    for n, row in enumerate([head, *rows_fmt]):
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
        if n == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--tokens", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=1000.0,
                        help="simulated requests per second (sets the flush cadence)")
    parser.add_argument("--flush-interval", type=float, default=10.0,
                        help="SIDECAR_LAST_USED_FLUSH_INTERVAL (default 10)")
    parser.add_argument("--min-age", type=float, default=60.0,
                        help="SIDECAR_LAST_USED_MIN_AGE (default 60)")
    parser.add_argument("--concurrency", type=int, default=10,
                        help="baseline: concurrent requests writing (pool size)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    if args.requests < 1 or args.tokens < 1 or args.rate <= 0 or args.concurrency < 1:
        parser.error("--requests, --tokens, --rate and --concurrency must be positive")

    with benchmark_postgres() as dsn:
        asyncio.run(bench(dsn, args))


if __name__ == "__main__":
    main()
