"""Invalidation (SPEC 3.4): dropping cached answers when token rows change.

Rules that hold here:
1. Sources: Postgres NOTIFY (every replica hears it and clears its L1 and the shared L2
   entries), the admin API (one replica hears it: it clears L2 and publishes on Redis so every
   replica clears its L1), and Redis pub/sub (L1 only: whoever published cleared L2).
2. Messages name tokens by digest (sidecar.credentials rule 2) and tenants by id: never a token.
3. A malformed message invalidates nothing and is counted; it can never widen what a token
   may do, only fail to narrow it, and NOTIFY payloads come from our own trigger.
4. L1 is cleared before and again after the L2 delete, so a request reading L2 while the
   delete is in flight cannot leave the old answer in L1. An L2 delete that could not be
   made (Redis down), or notifications that may have been lost (LISTEN reconnected), make
   this replica distrust every L2 entry written before that moment: they would otherwise
   bring a revoked token back for the rest of their TTL once Redis answers again.
5. With `serve --workers N` every worker hears each NOTIFY and each pub/sub message, and
   acts on it (each has its own L1); only one worker counts them (`counts_broadcasts`), so
   `sidecar_invalidations_total` says how many changes there were, not N times that.
   Reconnects are per connection, so every worker counts its own.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from typing import Any

import orjson

from sidecar.auth import Authenticator
from sidecar.cache import cache_key
from sidecar.metrics import Metrics
from sidecar.rediscache import RedisCache
from sidecar.subscriptions import is_self_test

log = logging.getLogger("sidecar.invalidation")

_DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")
# What every worker of a `serve --workers N` group receives (rule 5).
BROADCAST_SOURCES = frozenset({"notify", "notify_malformed", "pubsub", "pubsub_malformed"})


class Invalidator:
    def __init__(
        self,
        auth: Authenticator,
        redis: RedisCache | None,
        scopes: frozenset[str],
        metrics: Metrics,
        *,
        counts_broadcasts: bool = True,
        on_change: Callable[[list[str] | None], None] | None = None,
    ) -> None:
        # Told of every change NOTIFY reports (None: maybe every token), before any cache is
        # touched: the store fences those tokens off its read replica (sidecar.replica_fence).
        self.on_change = on_change
        self.auth = auth
        self.redis = redis
        self.scopes = scopes
        self.metrics = metrics
        self.counts_broadcasts = counts_broadcasts

    def _count(self, source: str, amount: int = 1) -> None:
        if source in BROADCAST_SOURCES and not self.counts_broadcasts:
            return  # rule 5: another worker counts it
        self.metrics.invalidations.labels(source=source).inc(amount)

    def shared_lost(self) -> None:
        """Redis itself may have lost invalidations (a Sentinel failover): L2 entries written
        before now are re-checked on Postgres."""
        self._shared_missed()

    def _shared_missed(self) -> None:
        self.auth.distrust_shared_before(time.time())

    async def token_digest(
        self, digest: str, scope: str | None, *, source: str, publish: bool
    ) -> None:
        await self._tokens({(digest, scope)}, source=source)
        if publish and self.redis is not None:
            await self.redis.publish(orjson.dumps({"d": digest, "s": scope}))

    async def token(self, token: str, scope: str | None, *, source: str) -> None:
        await self.token_digest(self.auth.digest(token), scope, source=source, publish=True)

    async def tenant(self, tenant_id: str, *, source: str, publish: bool) -> None:
        self.auth.forget_tenant(tenant_id)
        if self.redis is not None:
            if not await self.redis.delete_tenant(tenant_id):
                self._shared_missed()
            self.auth.forget_tenant(tenant_id)
            if publish:
                await self.redis.publish(orjson.dumps({"t": tenant_id}))
        self._count(source)

    async def everything(self, *, source: str, shared: bool) -> None:
        self.auth.forget_all()
        if shared and self.redis is not None:
            if not await self.redis.delete_all():
                self._shared_missed()
            self.auth.forget_all()
        self._count(source)

    async def on_notify(self, payloads: list[str]) -> None:
        """NOTIFYs from the token table's triggers, each a JSON array of changes. All the
        changes of a batch are dropped from L1 at once and from L2 in one round trip."""
        changes: set[tuple[str, str | None]] = set()
        everything = False
        for payload in payloads:
            if is_self_test(payload):
                continue  # a LISTEN self-test (sidecar.subscriptions rule 5), not a change
            items = _parse(payload)
            if not isinstance(items, list):
                self._count("notify_malformed")
                log.warning("ignored a malformed invalidation notification")
                continue
            for item in items:
                if not isinstance(item, dict):
                    continue
                if item.get("all") is True:
                    everything = True
                digest, scope = item.get("h"), item.get("s")
                if isinstance(digest, str) and _DIGEST_RE.match(digest):
                    changes.add((digest, scope if isinstance(scope, str) else None))
        if self.on_change is not None and (everything or changes):
            self.on_change(None if everything else [digest for digest, _ in changes])
        if everything:
            await self.everything(source="notify", shared=True)
        if changes:
            await self._tokens(changes, source="notify")

    async def _tokens(self, changes: set[tuple[str, str | None]], *, source: str) -> None:
        keys = [cache_key(digest, s) for digest, scope in changes
                for s in ([scope] if scope is not None else sorted(self.scopes))]
        self._forget(changes)
        if self.redis is not None:
            if not await self.redis.delete(*keys):
                self._shared_missed()
            self._forget(changes)  # rule 4
        self._count(source, len(changes))

    def _forget(self, changes: set[tuple[str, str | None]]) -> None:
        for digest, scope in changes:
            self.auth.forget(digest, scope)

    async def on_pubsub(self, data: str | bytes) -> None:
        """A message another replica (or this one) published after an admin invalidation."""
        item = _parse(data)
        if not isinstance(item, dict):
            self._count("pubsub_malformed")
            return
        digest, scope, tenant = item.get("d"), item.get("s"), item.get("t")
        if isinstance(digest, str) and _DIGEST_RE.match(digest):
            self.auth.forget(digest, scope if isinstance(scope, str) else None)
        elif isinstance(tenant, str):
            self.auth.forget_tenant(tenant)
        else:
            self._count("pubsub_malformed")
            return
        self._count("pubsub")

    async def on_reconnect(self, source: str) -> None:
        """Messages may have been missed while disconnected: drop what this process cached,
        and after a NOTIFY gap also distrust L2 (rule 4). Pub/sub messages only ever concern
        L1: whoever published them had already cleared L2."""
        self.auth.forget_all()
        if source == "notify":
            self._shared_missed()
        self._count(source + "_reconnect")


def _parse(raw: str | bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
