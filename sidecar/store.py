"""The source of truth: token rows in Postgres, through an asyncpg pool.

Rules that hold here:
1. asyncpg and OS errors are converted once, here, into `StoreUnavailable` (httpx's
   "map exceptions at the boundary"): callers never see a driver exception. Any error but a
   data error (a token that cannot match a column's type) means "cannot answer": a wrong
   password, a missing table or a full disk must give 503 (or a stale answer), never a 500
   and never "invalid token".
2. Every call is bounded by `timeout` as a whole, waiting for a pool connection included: a
   Postgres that hangs costs a request at most that long (with a read replica too: it gets
   at most half of it, the primary the rest).
3. A lookup is one statement. Its parameters are the token (or its SHA-256 when
   `SIDECAR_TOKEN_HASH=sha256`) and the scope; the token itself is never logged.
4. The pool starts empty (`min_size=0`), so a sidecar starts, and serves from caches, while
   Postgres is still down.
5. While Postgres is down, a circuit breaker answers lookups with `StoreUnavailable` at once
   (one probe per back-off, at most `MAX_BACKOFF` s), instead of letting every request wait
   for a timeout. Its opening is logged with the driver's message (sidecar.dependency_log),
   once per change of state.
6. With a read replica (`read_dsn`, SPEC 3.5), lookups go there first, through a pool and a
   breaker of its own. A row the replica does not have is asked of the primary before it
   counts as unknown (replication lag never refuses a valid token); a replica that cannot
   answer sends the lookup to the primary. Writes never go to the replica. A token changed
   on the primary is looked up there until the replica has replayed the change
   (sidecar.replica_fence), so a lagging replica never brings a revoked token back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from datetime import datetime
from typing import Any

import asyncpg

from sidecar.breaker import CircuitBreaker
from sidecar.credentials import stored_value, token_digest
from sidecar.dependency_log import DependencyState, describe
from sidecar.errors import StoreUnavailable
from sidecar.metrics import Metrics
from sidecar.models import TokenRecord, naive_utc
from sidecar.replica_fence import PRIMARY_LSN_SQL, REPLICA_LSN_SQL, ReplicaFence

log = logging.getLogger("sidecar.store")

MAX_BACKOFF = 5.0
PING_TIMEOUT = 1.0

DEFAULT_LOOKUP_SQL = (
    "SELECT id, tenant_id, app_id, type FROM api_tokens"
    " WHERE token = $1 AND type = $2 ORDER BY created_at DESC LIMIT 1"
)

# What "the database cannot answer" looks like from asyncpg (rule 1). Connection-level ones
# are expected during outages; the rest are logged as errors, since they need an operator.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.QueryCanceledError,
    # Raised by the client itself, e.g. TargetServerAttributeNotMatched: a multi-host URL with
    # target_session_attrs=read-write during a failover, while no host is the primary yet.
    asyncpg.exceptions.InternalClientError,
    StoreUnavailable,
)
UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (*CONNECTION_ERRORS, asyncpg.PostgresError)


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return str(value)


def _expires_at(value: Any) -> datetime | None:
    return naive_utc(value) if isinstance(value, datetime) else None


def record_from_row(row: asyncpg.Record) -> TokenRecord:
    keys = row.keys()
    return TokenRecord(
        id=str(row["id"]),
        tenant_id=_text(row["tenant_id"]),
        app_id=_text(row["app_id"]),
        scope=str(row["type"]),
        expires_at=_expires_at(row["expires_at"]) if "expires_at" in keys else None,
        disabled=bool(row["disabled"]) if "disabled" in keys else False,
    )


class _Pool:
    """One asyncpg pool with its breaker and its logged state (the primary or the replica)."""

    def __init__(self, dsn: str, name: str, *, pool_size: int, timeout: float,
                 statement_cache_size: int) -> None:
        self.dsn = dsn
        self.pool_size, self.timeout = pool_size, timeout
        self.statement_cache_size = statement_cache_size
        self.state = DependencyState(name, log)
        self.breaker = CircuitBreaker(base_delay=0.25, max_delay=MAX_BACKOFF,
                                      on_change=self._circuit_changed)
        self.pool: asyncpg.Pool | None = None
        self._reason = ""
        self._level = logging.WARNING

    def _circuit_changed(self, is_open: bool) -> None:
        if is_open:
            self.state.down(self._reason, level=self._level)
        else:
            self.state.up()

    def failed(self, exc: BaseException) -> None:
        """A call failed: the breaker hears of it, the log of a new reason (rule 5)."""
        self._reason = describe(exc)
        # Not a connection problem (a missing table, a permission, a read-only transaction):
        # an operator must act, so it is an error.
        self._level = logging.WARNING if isinstance(exc, CONNECTION_ERRORS) else logging.ERROR
        was_open = self.breaker.is_open
        self.breaker.failure()  # logs through _circuit_changed when it opens
        if was_open:
            self.state.down(self._reason, level=self._level)  # only if the reason changed

    def get(self) -> asyncpg.Pool:
        if self.pool is None:  # not opened yet, or closed during shutdown
            raise StoreUnavailable("pool closed")
        return self.pool

    async def open(self) -> None:
        self.pool = await asyncpg.create_pool(
            self.dsn,
            min_size=0,
            max_size=self.pool_size,
            timeout=self.timeout,
            command_timeout=self.timeout,
            max_inactive_connection_lifetime=300,
            # 0 behind PgBouncer's transaction pooling: a named prepared statement lives on
            # one server connection, the next transaction may run on another.
            statement_cache_size=self.statement_cache_size,
            server_settings={"application_name": "apikey-sidecar"},
        )

    async def close(self) -> None:
        if self.pool is not None:
            try:
                await asyncio.wait_for(self.pool.close(), timeout=5)
            except UNAVAILABLE_ERRORS:
                self.pool.terminate()
            self.pool = None

    async def ping(self) -> bool:
        try:
            # Readiness probes time out after a few seconds: answer well within that.
            async with asyncio.timeout(min(self.timeout, PING_TIMEOUT)):
                await self.get().fetchval("SELECT 1")
        except UNAVAILABLE_ERRORS:
            return False
        return True


class PostgresTokenStore:
    def __init__(
        self,
        dsn: str,
        *,
        metrics: Metrics,
        pool_size: int = 10,
        timeout: float = 5.0,
        statement_cache_size: int = 100,
        token_hash: str = "plain",
        lookup_sql: str | None = None,
        read_dsn: str | None = None,
    ) -> None:
        self.metrics = metrics
        self.pool_size = pool_size
        self.timeout = timeout
        self.statement_cache_size = statement_cache_size
        self.hash_tokens = token_hash == "sha256"
        self.lookup_sql = lookup_sql or DEFAULT_LOOKUP_SQL
        self.ever_connected = False
        self._primary = _Pool(dsn, "postgres", pool_size=pool_size, timeout=timeout,
                              statement_cache_size=statement_cache_size)
        self._replica = None if read_dsn is None else _Pool(
            read_dsn, "postgres read replica", pool_size=pool_size, timeout=timeout,
            statement_cache_size=statement_cache_size)
        self.breaker = self._primary.breaker
        self.fence = None
        if (replica := self._replica) is not None:
            self.fence = ReplicaFence(lambda: self._lsn(self._primary, PRIMARY_LSN_SQL),
                                      lambda: self._lsn(replica, REPLICA_LSN_SQL))
        self._fence_task: asyncio.Task[None] | None = None

    async def _lsn(self, target: _Pool, sql: str) -> int:
        try:
            async with asyncio.timeout(self.timeout):
                lsn = int(await target.get().fetchval(sql))
        except UNAVAILABLE_ERRORS as exc:
            target.failed(exc)  # logged like a failed lookup, once per change
            raise
        target.breaker.success()
        return lsn

    def changed(self, digests: list[str] | None) -> None:
        """Tokens changed on the primary (None: maybe any token): see sidecar.replica_fence."""
        if self.fence is not None:
            if digests is None:
                self.fence.everything()
            else:
                self.fence.changed(digests)

    @property
    def pool(self) -> asyncpg.Pool:
        """The primary's pool: writes, LISTEN self-tests, the token filter's build."""
        return self._primary.get()

    async def open(self) -> None:
        await self._primary.open()
        if self._replica is not None:
            await self._replica.open()
        if self.fence is not None:
            self._fence_task = asyncio.create_task(self.fence.run(), name="sidecar-fence")

    async def close(self) -> None:
        if self._fence_task is not None:
            self._fence_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._fence_task
            self._fence_task = None
        await self._primary.close()
        if self._replica is not None:
            await self._replica.close()

    async def lookup(self, token: str, scope: str) -> TokenRecord | None:
        """The row for (token, scope), None when there is none. Raises StoreUnavailable."""
        key = stored_value(token, self.hash_tokens)
        budget = self.timeout
        replica = self._replica
        if (replica is not None and self.fence is not None
                and self.fence.allows(token_digest(key)) and replica.breaker.allow()):
            started = asyncio.get_running_loop().time()
            try:
                # Rule 2 holds for the whole lookup: the replica gets at most half of it.
                row = await self._fetch(replica, "lookup_read", key, scope, budget / 2)
            except StoreUnavailable:
                pass  # rule 6: the primary answers instead
            else:
                self.ever_connected = True
                if row is not None:
                    return record_from_row(row)
                # Unknown to the replica: maybe not replicated yet (rule 6).
            budget -= asyncio.get_running_loop().time() - started
        if not self._primary.breaker.allow():
            raise StoreUnavailable("circuit open")
        row = await self._fetch(self._primary, "lookup", key, scope, max(budget, 0.001))
        self.ever_connected = True
        return record_from_row(row) if row is not None else None

    async def _fetch(self, target: _Pool, kind: str, key: str, scope: str,
                     seconds: float) -> asyncpg.Record | None:
        self.metrics.postgres_queries.labels(kind=kind).inc()
        try:
            async with asyncio.timeout(seconds):  # rule 2: pool wait included
                row: asyncpg.Record | None = await target.get().fetchrow(
                    self.lookup_sql, key, scope)
        except asyncpg.DataError:
            # e.g. a custom lookup comparing the token to a uuid column: such a token cannot exist.
            target.breaker.success()
            return None
        except UNAVAILABLE_ERRORS as exc:
            self.metrics.postgres_errors.labels(kind=kind).inc()
            target.failed(exc)
            raise StoreUnavailable(type(exc).__name__) from None
        except asyncio.CancelledError:
            target.breaker.release()
            raise
        target.breaker.success()
        return row

    async def ping(self) -> bool:
        if not await self._primary.ping():
            return False
        self.ever_connected = True
        return True

    async def ping_read(self) -> bool | None:
        """The replica answers (None: no replica configured)."""
        if self._replica is None:
            return None
        ok = await self._replica.ping()
        if ok:
            self._replica.breaker.success()  # lookups may use it again at once
        return ok

    async def insert_token(
        self, token: str, scope: str, tenant_id: str | None, app_id: str | None
    ) -> str:
        """Store a new token (plain or hashed per settings); returns its row id."""
        stored = stored_value(token, self.hash_tokens)
        row_id = await self.pool.fetchval(
            "INSERT INTO api_tokens (app_id, tenant_id, type, token) VALUES ($1, $2, $3, $4)"
            " RETURNING id",
            uuid.UUID(app_id) if app_id else None,
            uuid.UUID(tenant_id) if tenant_id else None,
            scope,
            stored,
        )
        return str(row_id)

    async def delete_token(self, token: str, scope: str | None) -> int:
        stored = stored_value(token, self.hash_tokens)
        if scope is None:
            result = await self.pool.execute("DELETE FROM api_tokens WHERE token = $1", stored)
        else:
            result = await self.pool.execute(
                "DELETE FROM api_tokens WHERE token = $1 AND type = $2", stored, scope
            )
        return int(result.split()[-1])
