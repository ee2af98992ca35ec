"""The shared tier (L2): token entries in Redis, shared by every replica.

Rules that hold here:
1. No method raises: every call goes through `sidecar.redisclient.GuardedRedis`, so a Redis
   problem is counted, trips the circuit breaker and reads as a miss.
2. Keys are `sidecar:tok:<digest>:<scope>`; per-tenant index sets are `sidecar:tenant:<id>`;
   lookup locks are `sidecar:lock:<digest>:<scope>`. Nothing derived from a raw token except
   its digest is ever written (see sidecar.credentials rule 2).
3. Nothing here needs two keys in one slot (Redis Cluster): no script or transaction touches
   more than one key; the entry and its tenant index are written by a non-transactional
   pipeline, which the cluster client splits per node, and multi-key DEL is split per slot
   by the cluster client. A tenant's entries (and `delete_all`'s SCAN) span every node.
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import AsyncIterator

from sidecar.cache import CacheEntry
from sidecar.redisclient import Client, GuardedRedis

TOKEN_PREFIX = "sidecar:tok:"
TENANT_PREFIX = "sidecar:tenant:"
LOCK_PREFIX = "sidecar:lock:"
PUBSUB_CHANNEL = "sidecar:invalidate"

# Deletes the lock only if it is still ours: a lock that expired and was taken by another
# replica must not be released by us.
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""

class RedisCache:
    def __init__(self, redis: GuardedRedis) -> None:
        self.redis = redis
        self._client = redis.client
        self._call = redis.call
        self._release = redis.script("unlock", _RELEASE)

    @property
    def available(self) -> bool:
        return self.redis.available

    async def get(self, key: str) -> CacheEntry | None:
        raw = await self._call("get", lambda: self._client.get(TOKEN_PREFIX + key))
        if not isinstance(raw, bytes):
            return None
        return CacheEntry.decode(raw)

    async def set(self, key: str, entry: CacheEntry, now: float | None = None) -> None:
        now = time.time() if now is None else now
        # Keep the entry in Redis for as long as any replica may still use it (stale deadline).
        ttl = max(1, math.ceil(max(entry.fresh_until, entry.stale_until) - now))
        rec = entry.record

        async def write() -> None:
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.set(TOKEN_PREFIX + key, entry.encode(), ex=ttl)
                if rec is not None and rec.tenant_id:
                    index = TENANT_PREFIX + rec.tenant_id
                    pipe.sadd(index, key)
                    # Entries of a tenant share one TTL setting, so the newest entry lives
                    # longest: the index lives as long as it. (Plain EXPIRE: Redis 6 too.)
                    pipe.expire(index, ttl)
                await pipe.execute()

        await self._call("set", write)

    async def delete(self, *keys: str) -> bool:
        """Delete entries; False when Redis could not be asked (the caller must then assume
        the entries survive)."""
        if not keys:
            return True
        names = [TOKEN_PREFIX + k for k in keys]

        async def run() -> bool:
            await self._client.delete(*names)
            return True

        return bool(await self._call("delete", run))

    async def delete_tenant(self, tenant_id: str) -> bool:
        """Delete every cached entry indexed under the tenant; False when Redis could not."""
        index = TENANT_PREFIX + tenant_id

        async def run() -> bool:
            members = await self._client.smembers(index)
            names = [TOKEN_PREFIX + (m.decode() if isinstance(m, bytes) else m) for m in members]
            await self._client.delete(*names, index)
            return True

        return bool(await self._call("delete_tenant", run))

    async def delete_all(self) -> bool:
        """Drop every token entry (after TRUNCATE of the token table); False when Redis
        could not be asked."""

        async def run() -> bool:
            async for batch in _scan_batches(self._client, TOKEN_PREFIX + "*"):
                await self._client.delete(*batch)
            return True

        return bool(await self._call("delete_all", run))

    async def try_lock(self, key: str, ttl: float) -> str | None:
        """Take the cross-replica lookup lock of a key: its owner token, or None when another
        replica holds it or Redis cannot be asked (check `available` to tell which)."""
        owner = secrets.token_hex(8)
        ok = await self._call(
            "lock", lambda: self._client.set(LOCK_PREFIX + key, owner, nx=True,
                                            px=int(ttl * 1000))
        )
        return owner if ok else None

    async def unlock(self, key: str, owner: str) -> None:
        await self._release([LOCK_PREFIX + key], [owner])

    async def publish(self, message: bytes) -> None:
        await self._call("publish", lambda: self._client.publish(PUBSUB_CHANNEL, message))

    async def ping(self) -> bool:
        return await self.redis.ping()

    async def probe(self) -> bool:
        return await self.redis.probe()


async def _scan_batches(client: Client, pattern: str, size: int = 500) -> AsyncIterator[
        list[bytes]]:
    batch: list[bytes] = []
    async for name in client.scan_iter(match=pattern, count=size):
        batch.append(name)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch
