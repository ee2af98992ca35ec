"""The source of truth: token rows in Postgres, through an asyncpg pool.

Rules that hold here:
1. asyncpg and OS errors are converted once, here, into `StoreUnavailable` (httpx's
   "map exceptions at the boundary"): callers never see a driver exception. Any error but a
   data error (a token that cannot match a column's type) means "cannot answer": a wrong
   password, a missing table or a full disk must give 503 (or a stale answer), never a 500
   and never "invalid token".
2. Every call is bounded by `timeout` as a whole, waiting for a pool connection included: a
   Postgres that hangs costs a request at most that long.
3. A lookup is one statement. Its parameters are the token (or its SHA-256 when
   `SIDECAR_TOKEN_HASH=sha256`) and the scope; the token itself is never logged.
4. The pool starts empty (`min_size=0`), so a sidecar starts, and serves from caches, while
   Postgres is still down.
5. While Postgres is down, a circuit breaker answers lookups with `StoreUnavailable` at once
   (one probe per back-off, at most `MAX_BACKOFF` s), instead of letting every request wait
   for a timeout.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from datetime import datetime
from typing import Any

import asyncpg

from sidecar.breaker import CircuitBreaker
from sidecar.credentials import stored_value
from sidecar.errors import StoreUnavailable
from sidecar.metrics import Metrics
from sidecar.models import TokenRecord, naive_utc

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
    ) -> None:
        self._dsn = dsn
        self.metrics = metrics
        self.pool_size = pool_size
        self.timeout = timeout
        self.statement_cache_size = statement_cache_size
        self.hash_tokens = token_hash == "sha256"
        self.lookup_sql = lookup_sql or DEFAULT_LOOKUP_SQL
        self.ever_connected = False
        self.breaker = CircuitBreaker(base_delay=0.25, max_delay=MAX_BACKOFF,
                                      on_change=self._circuit_changed)
        self._pool: asyncpg.Pool | None = None

    @staticmethod
    def _circuit_changed(is_open: bool) -> None:
        if is_open:
            log.warning("postgres unavailable: answering from caches (stale-if-error) only")
        else:
            log.info("postgres available again")

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:  # not opened yet, or closed during shutdown
            raise StoreUnavailable("pool closed")
        return self._pool

    async def open(self) -> None:
        self._pool = await asyncpg.create_pool(
            self._dsn,
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
        if self._pool is not None:
            try:
                await asyncio.wait_for(self._pool.close(), timeout=5)
            except UNAVAILABLE_ERRORS:
                self._pool.terminate()
            self._pool = None

    async def lookup(self, token: str, scope: str) -> TokenRecord | None:
        """The row for (token, scope), None when there is none. Raises StoreUnavailable."""
        key = stored_value(token, self.hash_tokens)
        if not self.breaker.allow():
            raise StoreUnavailable("circuit open")
        self.metrics.postgres_queries.labels(kind="lookup").inc()
        try:
            async with asyncio.timeout(self.timeout):  # rule 2: pool wait included
                row = await self.pool.fetchrow(self.lookup_sql, key, scope)
        except asyncpg.DataError:
            # e.g. a custom lookup comparing the token to a uuid column: such a token cannot exist.
            self.breaker.success()
            return None
        except UNAVAILABLE_ERRORS as exc:
            self.metrics.postgres_errors.labels(kind="lookup").inc()
            self.breaker.failure()
            if not isinstance(exc, CONNECTION_ERRORS):
                log.error("token lookup failed: %s", type(exc).__name__)
            raise StoreUnavailable(type(exc).__name__) from None
        except asyncio.CancelledError:
            self.breaker.release()
            raise
        self.breaker.success()
        self.ever_connected = True
        return record_from_row(row) if row is not None else None

    async def ping(self) -> bool:
        try:
            # Readiness probes time out after a few seconds: answer well within that.
            async with asyncio.timeout(min(self.timeout, PING_TIMEOUT)):
                await self.pool.fetchval("SELECT 1")
        except UNAVAILABLE_ERRORS:
            return False
        self.ever_connected = True
        return True

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
