"""`/readyz` (SPEC 10): what each dependency says right now, asked once per probe.

Rules that hold here:
1. A component is "ok" only when it really works: each check exercises what the sidecar
   needs of it, with a short timeout, and any failure reads "down".
2. The status is "not_ready" (503) only when the sidecar cannot answer anything at all: it
   has never reached Postgres, so no cache can be warm. Otherwise "degraded" while any
   component is down, else "ready".
3. Postgres components: `postgres` (the primary answers), `postgres_read` (only with a read
   replica: it answers), `invalidation` (LISTEN connected and its self-test NOTIFY received:
   a LISTEN that "works" but delivers nothing is down) and `last_used` (the last flush of
   last_used_at did not fail; "disabled" when no table is written).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sidecar.last_used import LastUsedQueue
    from sidecar.proxy import Forwarder
    from sidecar.rediscache import RedisCache
    from sidecar.store import PostgresTokenStore
    from sidecar.subscriptions import PostgresSubscription

UPSTREAM_CONNECT_TIMEOUT = 1.0


class Readiness:
    def __init__(
        self,
        store: PostgresTokenStore,
        redis: RedisCache | None,
        forwarder: Forwarder | None,
        *,
        listen: PostgresSubscription | None = None,
        last_used: LastUsedQueue | None = None,
    ) -> None:
        self._store = store
        self._redis = redis
        self._forwarder = forwarder
        self._listen = listen
        self._last_used = last_used

    async def _redis_state(self) -> str:
        if self._redis is None:
            return "disabled"
        # Not a PING: a script that reads the clock and writes with an expiry, through the
        # breaker (an open circuit is "down"), so a read-only master or an ACL without a
        # command the sidecar uses reads "down" too.
        return "ok" if await self._redis.probe() else "down"

    async def _postgres_state(self) -> str:
        return "ok" if await self._store.ping() else "down"

    async def _postgres_read_state(self) -> str | None:
        ok = await self._store.ping_read()
        return None if ok is None else "ok" if ok else "down"

    def _postgres_components(self) -> dict[str, str]:
        out = {}
        if self._listen is not None:
            out["invalidation"] = "ok" if self._listen.connected.is_set() else "down"
        if self._last_used is not None:
            out["last_used"] = self._last_used.state
        return out

    async def _upstream_state(self) -> str:
        if self._forwarder is None:
            return "disabled"
        host, port = self._forwarder.address
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port),
                                               timeout=UPSTREAM_CONNECT_TIMEOUT)
        except (TimeoutError, OSError):
            return "down"
        writer.close()
        return "ok"

    async def report(self) -> tuple[int, dict[str, str]]:
        """(HTTP status, the JSON document) of one probe."""
        postgres, redis, upstream, postgres_read = await asyncio.gather(
            self._postgres_state(), self._redis_state(), self._upstream_state(),
            self._postgres_read_state(),
        )
        components = {"postgres": postgres, "redis": redis, "upstream": upstream}
        if postgres_read is not None:
            components["postgres_read"] = postgres_read
        components.update(self._postgres_components())
        pg_ok = postgres == "ok"
        others_ok = all(v != "down" for k, v in components.items() if k != "postgres")
        if pg_ok and others_ok:
            status = "ready"
        elif pg_ok or self._store.ever_connected:
            status = "degraded"
        else:
            status = "not_ready"
        return (503 if status == "not_ready" else 200), {"status": status, **components}
