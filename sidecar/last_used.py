"""`last_used_at` write-behind (SPEC 8): record on the request path, write in batches later.

Rules that hold here:
1. `record()` is the only thing the request path calls. It is synchronous, O(1), never awaits
   and never raises: a bookkeeping problem must not turn an allowed request into an error.
2. At most one pending entry per token id, holding the latest time seen. Rows written per
   flush are therefore bounded by distinct tokens used, not by requests.
3. Pending ids are bounded by `max_pending`. A full queue still refreshes ids it already holds;
   only new ids are dropped, and every drop is counted.
4. An entry leaves the queue only when the writer confirmed its batch. A failed (or cancelled)
   flush merges its batch back, keeping the later time per id; ids recorded meanwhile take
   precedence for the free room, so the bound of rule 3 holds across failures.
5. The database only ever moves `last_used_at` forward: the UPDATE compares with the stored
   value, so replicas flushing overlapping batches in any order cannot move it back.
6. Times are naive UTC (Dify's `timestamp` column); aware datetimes are converted on entry.
7. Logs carry counts and the error class/message only (scrubbed, sidecar.dependency_log),
   never a token id. Failing background flushes are logged once per change of state: the
   first failure, a different error, and the first success after failures.
8. Shutdown while the database is down (SPEC 15): the final flush is retried until its
   deadline; what is left is handed to Redis (`handoff`), and every flush of any sidecar
   first takes what was handed off. Only without a hand-off are entries lost, and then
   counted (`sidecar_last_used_lost_total`) and logged with their number.

Everything here runs on one event loop; nothing is thread-safe and nothing needs to be.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Protocol

from sidecar.backoff import backoff_delay
from sidecar.dependency_log import describe as _describe
from sidecar.models import naive_utc, utc_now_naive

if TYPE_CHECKING:
    import asyncpg

    from sidecar.metrics import Metrics

_log = logging.getLogger("sidecar.last_used")

# A table name is put into the SQL text (identifiers cannot be parameters). Only plain,
# optionally schema-qualified names are accepted; they are not quoted so that the statement
# reads `UPDATE api_tokens ...` in pg_stat_statements and Postgres logs.
_TABLE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?$")

# Of the final flush's time, what is kept for handing entries to Redis (rule 8), seconds.
HANDOFF_RESERVE = 1.0


class Handoff(Protocol):
    """Where entries go that a stopping sidecar could not write (rule 8)."""

    async def put(self, entries: Mapping[str, datetime]) -> bool: ...
    async def take(self) -> dict[str, datetime]: ...


class LastUsedWriter(Protocol):
    async def write_last_used(self, batch: Sequence[tuple[str, datetime]]) -> int:
        """Write one batch of (token row id, naive UTC time); return rows updated.

        Raises on failure; the caller keeps the batch and retries it later.
        """
        ...


class PostgresLastUsedWriter:
    """`LastUsedWriter` on an asyncpg pool: one `UPDATE ... FROM unnest(...)` per chunk."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        min_age: float,
        metrics: Metrics | None = None,
        table: str = "api_tokens",
        chunk_size: int = 5000,
        timeout: float | None = None,
    ) -> None:
        if not _TABLE_RE.match(table):
            raise ValueError(f"invalid table name {table!r}: expected name or schema.name")
        if chunk_size < 1:
            raise ValueError("chunk_size must be at least 1")
        if min_age < 0:
            raise ValueError("min_age must not be negative")
        self._pool = pool
        self._min_age = float(min_age)
        self._metrics = metrics
        self._chunk_size = chunk_size
        # None: the pool's command_timeout applies.
        self._timeout = timeout
        # `<=` with `v.at - min_age` both skips rows written less than min_age before the new
        # time and refuses to move a row backwards (min_age >= 0), in one indexed statement.
        # min_age is a parameter so the statement text, and its prepared plan, never change.
        self._sql = (
            f"UPDATE {table} AS t SET last_used_at = v.at"
            " FROM unnest($1::uuid[], $2::timestamp[]) AS v(id, at)"
            " WHERE t.id = v.id AND (t.last_used_at IS NULL"
            " OR t.last_used_at <= v.at - make_interval(secs => $3::float8))"
        )

    async def write_last_used(self, batch: Sequence[tuple[str, datetime]]) -> int:
        latest: dict[uuid.UUID, datetime] = {}
        for token_id, at in batch:
            try:
                key = uuid.UUID(token_id)
            except (ValueError, TypeError, AttributeError):
                # Not a uuid: no row of a uuid column can have it, and sending it would make
                # Postgres reject the whole statement, and with it every valid id of the batch.
                continue
            at = naive_utc(at)
            prev = latest.get(key)
            # If an id appeared twice in one statement, Postgres would pick one of its rows
            # unpredictably; keep only the latest time per id.
            if prev is None or at > prev:
                latest[key] = at
        # Sorted ids make every writer lock rows in the same order, so replicas flushing
        # overlapping batches wait for each other instead of deadlocking.
        ids = sorted(latest)
        rows = 0
        for start in range(0, len(ids), self._chunk_size):
            chunk = ids[start:start + self._chunk_size]
            rows += await self._execute(chunk, [latest[i] for i in chunk])
        return rows

    async def _execute(self, ids: list[uuid.UUID], ats: list[datetime]) -> int:
        metrics = self._metrics
        if metrics is not None:
            metrics.postgres_queries.labels(kind="last_used").inc()
        try:
            status = await self._pool.execute(
                self._sql, ids, ats, self._min_age, timeout=self._timeout
            )
        except Exception:
            if metrics is not None:
                metrics.postgres_errors.labels(kind="last_used").inc()
            raise
        # The command tag is "UPDATE <rows>".
        count = status.rpartition(" ")[2]
        return int(count) if count.isdigit() else 0


class DeferredPostgresWriter:
    """A `PostgresLastUsedWriter` built on first use: the pool only exists once the store is
    open, after the app is wired. With no table configured (a custom lookup SQL that names
    none) batches are dropped: there is nowhere to write them."""

    def __init__(
        self, pool: Callable[[], asyncpg.Pool], *, table: str, min_age: float,
        metrics: Metrics | None = None,
    ) -> None:
        self._pool = pool
        self._table = table
        self._min_age = min_age
        self._metrics = metrics
        self._writer: PostgresLastUsedWriter | None = None

    async def write_last_used(self, batch: Sequence[tuple[str, datetime]]) -> int:
        if not self._table:
            return 0
        if self._writer is None:
            self._writer = PostgresLastUsedWriter(
                self._pool(), table=self._table, min_age=self._min_age, metrics=self._metrics,
            )
        return await self._writer.write_last_used(batch)


class LastUsedQueue:
    def __init__(
        self,
        writer: LastUsedWriter,
        *,
        flush_interval: float,
        max_pending: int,
        metrics: Metrics | None = None,
        max_backoff: float = 60.0,
        handoff: Handoff | None = None,
    ) -> None:
        if flush_interval <= 0:
            raise ValueError("flush_interval must be positive")
        if max_pending < 1:
            raise ValueError("max_pending must be at least 1")
        self._writer = writer
        self._handoff = handoff
        self._lost: set[str] = set()
        self._interval = flush_interval
        self._max_pending = max_pending
        self._metrics = metrics
        # A cap below the interval would make a failing flusher retry faster than a healthy one.
        self._max_backoff = max(max_backoff, flush_interval)
        self._pending: dict[str, datetime] = {}
        # Held for the whole of a flush: a second flush waits and then takes only what was
        # recorded after the first one swapped its batch out, so no entry is written twice.
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._failures = 0
        self._last_error: str | None = None
        # The background loop sleeps through this; tests replace it to observe the back-off.
        self._sleep: Callable[[float], Awaitable[None]] = asyncio.sleep

    @property
    def pending(self) -> int:
        """Ids waiting for a flush (not counting a batch being written right now)."""
        return len(self._pending)

    @property
    def consecutive_failures(self) -> int:
        """Failed background flushes since the last successful one."""
        return self._failures

    @property
    def state(self) -> str:
        """For /readyz: "down" while background flushes are failing, else "ok"."""
        return "down" if self._failures else "ok"

    def record(self, token_id: str, at: datetime | None = None) -> None:
        try:
            at = utc_now_naive() if at is None else naive_utc(at)
            pending = self._pending
            prev = pending.get(token_id)
            if prev is None:
                if len(pending) >= self._max_pending:
                    self._dropped(1)
                    return
                pending[token_id] = at
                self._update_gauge()
            elif at > prev:
                pending[token_id] = at
        except Exception as exc:
            # Rule 1. Only reachable through a caller bug (a non-datetime `at`) or a broken
            # metrics backend; a debug line is enough and keeps the hot path quiet.
            _log.debug("last_used record ignored: %s", type(exc).__name__)

    async def flush(self) -> int:
        """Write everything pending now; return rows the writer reported.

        On failure the batch is merged back (rule 4) and the error re-raised.
        """
        async with self._lock:
            if self._handoff is not None:
                # Rule 8: what stopped sidecars left goes out with this batch (kept, like it,
                # if the write fails).
                self._merge_back(await self._handoff.take())
            batch = self._pending
            if not batch:
                return 0
            self._pending = {}
            metrics = self._metrics
            started = time.perf_counter()
            try:
                self._update_gauge()
                rows = await self._writer.write_last_used(list(batch.items()))
            except BaseException as exc:
                # BaseException too: a flush cancelled by shutdown has not been confirmed
                # either, and the final flush must still find its entries.
                self._merge_back(batch)
                if metrics is not None and isinstance(exc, Exception):
                    metrics.last_used_flush_errors.inc()
                raise
            finally:
                if metrics is not None:
                    metrics.last_used_flush_duration.observe(time.perf_counter() - started)
            if metrics is not None and rows > 0:
                metrics.last_used_rows_flushed.inc(rows)
            return rows

    def start(self) -> None:
        """Start the background flusher (needs a running loop). Idempotent."""
        if self._task is not None and not self._task.done():
            return
        self._failures = 0
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name="sidecar-last-used-flusher"
        )

    # The bound is a parameter, not left to the caller's asyncio.timeout(): on expiry close()
    # must still log what it could not write instead of being cancelled mid-way.
    async def close(self, timeout: float) -> None:  # noqa: ASYNC109
        """Stop the flusher, then flush once more; never takes much longer than `timeout`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(timeout, 0.0)
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            # A flush cancelled mid-write merges its batch back (rule 4) for the final flush.
            # Waiting is bounded: a writer that ignores cancellation must not hang shutdown.
            await asyncio.wait({task}, timeout=max(deadline - loop.time(), 0.0))
            if not task.done():
                _log.warning("last_used flusher did not stop in time")
            elif not task.cancelled() and (error := task.exception()) is not None:
                # Only a bug can end the loop with an error; retrieve it so it is not lost.
                _log.warning("last_used flusher had failed: %s", _describe(error))
        pending = self.pending
        # Some of the time is kept for the hand-off, should the database stay away.
        reserve = HANDOFF_RESERVE if self._handoff is not None else 0.0
        rows, problem = await self._flush_until(deadline - reserve)
        if problem is None:
            if pending:
                _log.info("last_used final flush: %d ids, %d rows written", pending, rows)
            return
        left = dict(self._pending)
        if self._handoff is not None and left and await self._handoff.put(left):
            self._pending = {}
            self._update_gauge()
            _log.warning("last_used final flush failed; %d ids handed to Redis for the next "
                         "flush of any sidecar: %s", len(left), problem)
            return
        if left:
            # They stay pending (nothing pretends they were written); counted once each,
            # should close() be called again.
            new = left.keys() - self._lost
            self._lost |= new
            if self._metrics is not None and new:
                self._metrics.last_used_lost.inc(len(new))
            _log.warning("last_used final flush failed; %d ids not written (lost): %s",
                         len(left), problem)

    async def _flush_until(self, deadline: float) -> tuple[int, str | None]:
        """Flush, retrying with the back-off until `deadline` (rule 8): (rows, None) once it
        worked, (0, what went wrong last) if it never did."""
        loop = asyncio.get_running_loop()
        failures = 0
        while True:
            try:
                async with asyncio.timeout(max(deadline - loop.time(), 0.0)):
                    return await self.flush(), None
            except TimeoutError:
                return 0, "timed out"
            except Exception as exc:
                failures += 1
                error = _describe(exc)
            pause = backoff_delay(failures, base=min(self._interval, 0.25), cap=1.0)
            if loop.time() + pause >= deadline:
                return 0, error
            await asyncio.sleep(pause)


    async def _run(self) -> None:
        delay = self._interval
        while True:
            await self._sleep(delay)
            try:
                await self.flush()
            except Exception as exc:
                self._failures += 1
                delay = backoff_delay(self._failures, base=self._interval,
                                      cap=self._max_backoff)
                error = _describe(exc)
                # Rule 7: a flush that keeps failing the same way is not news.
                level = logging.WARNING if error != self._last_error else logging.DEBUG
                self._last_error = error
                _log.log(
                    level,
                    "last_used flush failed (%d consecutive, %d ids pending); retrying in "
                    "%.1f s: %s",
                    self._failures, self.pending, delay, error,
                )
            else:
                if self._failures:
                    _log.info("last_used flush succeeded again after %d failures",
                              self._failures)
                self._failures = 0
                self._last_error = None
                delay = self._interval

    def _merge_back(self, batch: dict[str, datetime]) -> None:
        pending = self._pending
        room = self._max_pending - len(pending)
        dropped = 0
        for token_id, at in batch.items():
            prev = pending.get(token_id)
            if prev is not None:
                if at > prev:
                    pending[token_id] = at
            elif room > 0:
                pending[token_id] = at
                room -= 1
            else:
                dropped += 1
        if dropped:
            self._dropped(dropped)
        self._update_gauge()

    def _dropped(self, count: int) -> None:
        if self._metrics is not None:
            self._metrics.last_used_dropped.inc(count)

    def _update_gauge(self) -> None:
        # Set only when the number of ids changes: a repeat of a pending id costs nothing here.
        if self._metrics is not None:
            self._metrics.last_used_pending.set(len(self._pending))
