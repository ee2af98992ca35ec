"""LastUsedQueue logic against a fake writer (no servers), and the Postgres writer's batch
preparation against a fake pool."""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, cast

import pytest
from prometheus_client import CollectorRegistry

from sidecar.last_used import LastUsedQueue, PostgresLastUsedWriter
from sidecar.metrics import Metrics
from tests.helpers import sample

T0 = datetime(2024, 5, 1, 12, 0, 0)


def ts(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


class FakeWriter:
    """Keeps the latest time per id like the real UPDATE; can fail or block on demand."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[str, datetime]]] = []
        self.stored: dict[str, datetime] = {}
        self.failures_left = 0
        self.gate: asyncio.Event | None = None
        self.entered = asyncio.Event()
        self.calls = 0

    async def write_last_used(self, batch: Sequence[tuple[str, datetime]]) -> int:
        self.calls += 1
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.failures_left > 0:
            self.failures_left -= 1
            raise ConnectionRefusedError("connection refused")
        self.batches.append(list(batch))
        for token_id, at in batch:
            prev = self.stored.get(token_id)
            if prev is None or at > prev:
                self.stored[token_id] = at
        return len(batch)

    def written_ids(self) -> list[str]:
        return [token_id for batch in self.batches for token_id, _ in batch]


def metric(m: Metrics, name: str) -> float:
    return sample(m, name)


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(CollectorRegistry())


def make_queue(
    writer: FakeWriter, metrics: Metrics | None = None, **kw: Any
) -> LastUsedQueue:
    kw.setdefault("flush_interval", 3600.0)
    kw.setdefault("max_pending", 100_000)
    return LastUsedQueue(writer, metrics=metrics, **kw)


# --- record -------------------------------------------------------------------------------


async def test_coalescing_keeps_latest_time_per_id() -> None:
    writer = FakeWriter()
    q = make_queue(writer)
    for at in (ts(1), ts(5), ts(3), ts(2)):
        q.record("a", at)
    q.record("b", ts(4))
    q.record("b", ts(0))
    assert q.pending == 2
    assert await q.flush() == 2
    assert writer.batches == [[("a", ts(5)), ("b", ts(4))]]
    assert q.pending == 0


async def test_record_defaults_to_naive_utc_now() -> None:
    writer = FakeWriter()
    q = make_queue(writer)
    before = datetime.now(UTC).replace(tzinfo=None)
    q.record("a")
    after = datetime.now(UTC).replace(tzinfo=None)
    await q.flush()
    ((_, at),) = writer.batches[0]
    assert at.tzinfo is None
    assert before <= at <= after


async def test_aware_times_are_stored_as_naive_utc() -> None:
    writer = FakeWriter()
    q = make_queue(writer)
    plus2 = timezone(timedelta(hours=2))
    q.record("a", datetime(2024, 5, 1, 14, 0, 0, tzinfo=plus2))
    # 13:30+02:00 is 11:30 UTC: older than the first, so it must not win.
    q.record("a", datetime(2024, 5, 1, 13, 30, 0, tzinfo=plus2))
    q.record("a", datetime(2024, 5, 1, 11, 59, 0))
    await q.flush()
    assert writer.batches == [[("a", datetime(2024, 5, 1, 12, 0, 0))]]


async def test_record_never_raises_and_queue_stays_usable(metrics: Metrics) -> None:
    writer = FakeWriter()
    q = make_queue(writer, metrics)
    q.record("a", cast(Any, "not a datetime"))
    q.record("a", cast(Any, 12345))
    gauge = metrics.last_used_pending

    class Broken:
        def set(self, value: float) -> None:
            raise RuntimeError("metrics backend broken")

    metrics.last_used_pending = cast(Any, Broken())
    q.record("b", ts(2))  # raises inside the gauge update: swallowed, entry kept
    q.record("a", ts(3))
    # Even a flush that fails on the broken gauge loses nothing.
    with pytest.raises(RuntimeError):
        await q.flush()
    assert q.pending == 2
    metrics.last_used_pending = gauge
    await q.flush()
    written = dict(writer.batches[0])
    assert written["a"] == ts(3)
    assert written["b"] == ts(2)


def test_record_does_not_await_or_need_a_loop() -> None:
    # Synchronous and loop-free: callable from plain code, no coroutine is created.
    assert not inspect.iscoroutinefunction(LastUsedQueue.record)
    q = make_queue(FakeWriter())
    q.record("a", ts(1))
    assert q.pending == 1


async def test_drops_new_ids_beyond_max_pending(metrics: Metrics) -> None:
    writer = FakeWriter()
    q = make_queue(writer, metrics, max_pending=100)
    for i in range(1000):
        q.record(f"id-{i}", ts(i))
    assert q.pending == 100
    assert metric(metrics, "sidecar_last_used_dropped_total") == 900
    assert metric(metrics, "sidecar_last_used_pending") == 100
    # A full queue still refreshes an id it holds: that costs no room and is not a drop.
    q.record("id-0", ts(5000))
    assert metric(metrics, "sidecar_last_used_dropped_total") == 900
    await q.flush()
    written = dict(writer.batches[0])
    assert sorted(written) == sorted(f"id-{i}" for i in range(100))
    assert written["id-0"] == ts(5000)
    assert metric(metrics, "sidecar_last_used_pending") == 0
    # After the flush there is room again.
    q.record("id-999", ts(1))
    assert q.pending == 1


# --- flush --------------------------------------------------------------------------------


async def test_flush_of_empty_queue_does_not_call_writer() -> None:
    writer = FakeWriter()
    q = make_queue(writer)
    assert await q.flush() == 0
    assert writer.calls == 0


async def test_flush_counts_metrics(metrics: Metrics) -> None:
    writer = FakeWriter()
    q = make_queue(writer, metrics)
    for i in range(10):
        q.record(f"id-{i}", ts(i))
    assert metric(metrics, "sidecar_last_used_pending") == 10
    assert await q.flush() == 10
    assert metric(metrics, "sidecar_last_used_rows_flushed_total") == 10
    assert metric(metrics, "sidecar_last_used_flush_duration_seconds_count") == 1
    assert metric(metrics, "sidecar_last_used_pending") == 0
    assert metric(metrics, "sidecar_last_used_flush_errors_total") == 0


async def test_failed_flush_keeps_entries_and_merges_with_newer(metrics: Metrics) -> None:
    writer = FakeWriter()
    q = make_queue(writer, metrics)
    q.record("a", ts(10))
    q.record("b", ts(10))
    writer.failures_left = 1
    with pytest.raises(ConnectionRefusedError):
        await q.flush()
    assert q.pending == 2
    assert metric(metrics, "sidecar_last_used_flush_errors_total") == 1
    assert metric(metrics, "sidecar_last_used_flush_duration_seconds_count") == 1
    assert metric(metrics, "sidecar_last_used_pending") == 2
    q.record("a", ts(20))  # newer than the failed entry: wins
    q.record("b", ts(5))  # older than the failed entry: loses
    q.record("c", ts(7))
    assert await q.flush() == 3
    assert dict(writer.batches[0]) == {"a": ts(20), "b": ts(10), "c": ts(7)}
    assert metric(metrics, "sidecar_last_used_rows_flushed_total") == 3


async def test_failed_flush_merge_respects_max_pending(metrics: Metrics) -> None:
    writer = FakeWriter()
    writer.gate = asyncio.Event()
    writer.failures_left = 1
    q = make_queue(writer, metrics, max_pending=3)
    for name in ("a", "b", "c"):
        q.record(name, ts(1))
    flushing = asyncio.create_task(q.flush())
    await writer.entered.wait()
    # Recorded while the failing flush is in flight: these take precedence over its batch.
    q.record("d", ts(2))
    q.record("e", ts(2))
    q.record("a", ts(3))
    writer.gate.set()
    with pytest.raises(ConnectionRefusedError):
        await flushing
    assert q.pending == 3
    # a is pending again (newer time), d and e kept; b and c no longer fit.
    assert metric(metrics, "sidecar_last_used_dropped_total") == 2
    await q.flush()
    assert dict(writer.batches[0]) == {"a": ts(3), "d": ts(2), "e": ts(2)}


async def test_records_during_flush_are_not_lost() -> None:
    writer = FakeWriter()
    writer.gate = asyncio.Event()
    q = make_queue(writer)
    for i in range(50):
        q.record(f"id-{i}", ts(i))
    flushing = asyncio.create_task(q.flush())
    await writer.entered.wait()
    assert q.pending == 0  # swapped out, being written
    expected = {f"id-{i}": ts(i) for i in range(50)}
    for i in range(25, 75):  # overlap with the batch in flight, plus new ids
        q.record(f"id-{i}", ts(1000 + i))
        expected[f"id-{i}"] = ts(1000 + i)
    assert q.pending == 50
    writer.gate.set()
    assert await flushing == 50
    assert q.pending == 50
    await q.flush()
    assert writer.stored == expected


async def test_concurrent_flushes_do_not_write_entries_twice() -> None:
    writer = FakeWriter()
    writer.gate = asyncio.Event()
    q = make_queue(writer)
    for i in range(100):
        q.record(f"id-{i}", ts(i))
    first = asyncio.create_task(q.flush())
    await writer.entered.wait()
    second = asyncio.create_task(q.flush())
    third = asyncio.create_task(q.flush())
    await asyncio.sleep(0.01)
    q.record("late", ts(1))
    writer.gate.set()
    results = await asyncio.gather(first, second, third)
    ids = writer.written_ids()
    assert len(ids) == len(set(ids)) == 101
    assert sorted(results) == [0, 1, 100]


async def test_cancelled_flush_keeps_entries() -> None:
    writer = FakeWriter()
    writer.gate = asyncio.Event()
    q = make_queue(writer)
    q.record("a", ts(1))
    flushing = asyncio.create_task(q.flush())
    await writer.entered.wait()
    flushing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await flushing
    assert q.pending == 1
    writer.gate.set()
    await q.flush()
    assert writer.stored == {"a": ts(1)}


# --- background task, back-off, close -----------------------------------------------------


async def test_background_task_flushes_periodically() -> None:
    writer = FakeWriter()
    q = make_queue(writer, flush_interval=0.02)
    q.start()
    q.start()  # idempotent: still one task
    try:
        q.record("a", ts(1))
        for _ in range(200):
            if writer.stored:
                break
            await asyncio.sleep(0.01)
        assert writer.stored == {"a": ts(1)}
        q.record("b", ts(2))
        for _ in range(200):
            if "b" in writer.stored:
                break
            await asyncio.sleep(0.01)
        assert writer.stored == {"a": ts(1), "b": ts(2)}
    finally:
        await q.close(timeout=1.0)
    assert writer.written_ids().count("a") == 1


async def test_backoff_grows_on_failures_and_resets_on_success(
    caplog: pytest.LogCaptureFixture,
) -> None:
    writer = FakeWriter()
    interval, cap = 1.0, 6.0
    q = make_queue(writer, flush_interval=interval, max_backoff=cap)
    # Failure script per flush: 5 failures, 1 success, 1 failure, 1 success.
    script = [True] * 5 + [False, True, False]
    sleeps: list[float] = []
    done = asyncio.Event()

    async def fake_sleep(delay: float) -> None:
        sleeps.append(delay)
        if len(sleeps) > len(script):
            done.set()
            await asyncio.Event().wait()  # park until close() cancels us
        q.record("secret-token-id", ts(len(sleeps)))
        writer.failures_left = 1 if script[len(sleeps) - 1] else 0

    q._sleep = fake_sleep
    with caplog.at_level(logging.WARNING, logger="sidecar.last_used"):
        q.start()
        await asyncio.wait_for(done.wait(), 5)
        failures_before_close = q.consecutive_failures
        await q.close(timeout=1.0)

    assert failures_before_close == 0
    assert sleeps[0] == interval
    backoff = sleeps[1:6]  # after failures 1..5
    assert backoff[0] <= interval
    assert all(b > a for a, b in itertools.pairwise(backoff[:4]))
    assert all(d <= cap for d in backoff)
    assert backoff[4] >= 0.75 * cap
    assert sleeps[6] == interval  # success resets
    assert sleeps[7] <= interval  # a new failure starts the back-off from the start
    assert sleeps[8] == interval
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    # Once per change of state: the first of the 5 failures, and the one after the success.
    assert len(warnings) == 2
    assert all("ConnectionRefusedError: connection refused" in w for w in warnings)
    assert all("secret-token-id" not in w for w in warnings)
    # Nothing was lost: the last recorded time reached the writer.
    assert writer.stored == {"secret-token-id": ts(len(script))}


async def test_close_does_a_final_flush(metrics: Metrics) -> None:
    writer = FakeWriter()
    q = make_queue(writer, metrics, flush_interval=3600.0)
    q.start()
    for i in range(10):
        q.record(f"id-{i}", ts(i))
    await q.close(timeout=1.0)
    assert len(writer.stored) == 10
    assert q.pending == 0
    assert q._task is None
    await q.close(timeout=1.0)  # a second close is harmless
    assert writer.calls == 1


async def test_close_without_start_flushes() -> None:
    writer = FakeWriter()
    q = make_queue(writer)
    q.record("a", ts(1))
    await q.close(timeout=1.0)
    assert writer.stored == {"a": ts(1)}


async def test_close_interrupting_a_background_flush_still_writes() -> None:
    writer = FakeWriter()
    writer.gate = asyncio.Event()
    q = make_queue(writer, flush_interval=0.01)
    q.record("a", ts(1))
    q.start()
    await asyncio.wait_for(writer.entered.wait(), 5)
    # The flusher is stuck in the writer; close() cancels it, then its final flush writes.
    closing = asyncio.create_task(q.close(timeout=2.0))
    await asyncio.sleep(0.05)
    writer.gate.set()
    await closing
    assert writer.stored == {"a": ts(1)}


async def test_close_does_not_hang_on_a_stuck_writer(caplog: pytest.LogCaptureFixture) -> None:
    writer = FakeWriter()
    writer.gate = asyncio.Event()  # never set
    q = make_queue(writer)
    q.record("a", ts(1))
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="sidecar.last_used"):
        await q.close(timeout=0.2)
    assert time.monotonic() - started < 1.0
    assert q.pending == 1  # not written, not pretended to be
    assert any("timed out" in r.getMessage() for r in caplog.records)


async def test_close_logs_and_gives_up_on_failure(caplog: pytest.LogCaptureFixture) -> None:
    writer = FakeWriter()
    writer.failures_left = 100
    q = make_queue(writer)
    q.record("tok-id", ts(1))
    with caplog.at_level(logging.WARNING, logger="sidecar.last_used"):
        await q.close(timeout=1.0)  # must not raise
    messages = [r.getMessage() for r in caplog.records]
    assert any("1 ids not written" in m for m in messages)
    assert all("tok-id" not in m for m in messages)


def test_queue_rejects_nonsense_settings() -> None:
    with pytest.raises(ValueError, match="flush_interval"):
        LastUsedQueue(FakeWriter(), flush_interval=0, max_pending=1)
    with pytest.raises(ValueError, match="max_pending"):
        LastUsedQueue(FakeWriter(), flush_interval=1, max_pending=0)


# --- PostgresLastUsedWriter batch preparation (fake pool) ---------------------------------


class FakePool:
    def __init__(self, fail: bool = False) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.fail = fail

    async def execute(self, sql: str, *args: Any, timeout: float | None = None) -> str:
        self.calls.append((sql, args))
        if self.fail:
            raise OSError("connection lost")
        return f"UPDATE {len(args[0])}"


async def test_writer_dedups_skips_invalid_ids_sorts_and_chunks(metrics: Metrics) -> None:
    pool = FakePool()
    writer = PostgresLastUsedWriter(cast(Any, pool), min_age=60, metrics=metrics, chunk_size=2)
    ids = sorted(str(uuid.uuid4()) for _ in range(3))
    aware = datetime(2024, 5, 1, 14, 0, tzinfo=timezone(timedelta(hours=2)))
    batch = [
        (ids[2], ts(1)),
        ("not-a-uuid", ts(1)),
        (ids[0], ts(1)),
        (ids[0].upper(), ts(9)),  # same uuid, later: wins
        (ids[1], aware),
        ("", ts(1)),
    ]
    assert await writer.write_last_used(batch) == 3
    assert len(pool.calls) == 2
    sql = pool.calls[0][0]
    assert sql.startswith("UPDATE api_tokens AS t SET last_used_at = v.at FROM unnest(")
    sent = [(str(i), at) for _, args in pool.calls for i, at in zip(args[0], args[1],
                                                                     strict=True)]
    assert sent == [(ids[0], ts(9)), (ids[1], datetime(2024, 5, 1, 12, 0)), (ids[2], ts(1))]
    assert all(args[2] == 60.0 for _, args in pool.calls)
    assert sample(metrics,
        "sidecar_postgres_queries_total", {"kind": "last_used"}) == 2


async def test_writer_counts_errors_and_raises(metrics: Metrics) -> None:
    writer = PostgresLastUsedWriter(cast(Any, FakePool(fail=True)), min_age=0, metrics=metrics)
    with pytest.raises(OSError, match="connection lost"):
        await writer.write_last_used([(str(uuid.uuid4()), ts(1))])
    assert sample(metrics,
        "sidecar_postgres_errors_total", {"kind": "last_used"}) == 1


async def test_writer_with_only_invalid_ids_sends_nothing() -> None:
    pool = FakePool()
    writer = PostgresLastUsedWriter(cast(Any, pool), min_age=0)
    assert await writer.write_last_used([("x", ts(1)), ("1234", ts(2))]) == 0
    assert pool.calls == []


@pytest.mark.parametrize("table", ["api_tokens; DROP TABLE x", "a b", '"quoted"', "", "a.b.c"])
def test_writer_rejects_unsafe_table_names(table: str) -> None:
    with pytest.raises(ValueError, match="table"):
        PostgresLastUsedWriter(cast(Any, FakePool()), min_age=0, table=table)


def test_writer_accepts_schema_qualified_table() -> None:
    PostgresLastUsedWriter(cast(Any, FakePool()), min_age=0, table="public.api_tokens")
