"""Cache entries and the in-process tier (L1).

Rules that hold here:
1. A cache key is `digest:scope`, the digest being `sidecar.credentials.key_digest` (the
   SHA-256 of the token as stored), which the NOTIFY triggers can compute from the column.
2. An entry carries wall-clock deadlines (`fresh_until`, `stale_until`) so that an entry read
   back from Redis means the same thing in every replica.
3. A negative entry (record is None) is never stale-usable: it answers only while fresh.
4. Every entry carries the wall-clock time it was written (`written_at`), so that a replica
   which may have missed invalidations can refuse entries written before the gap.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

from sidecar.models import TokenRecord

FORMAT_VERSION = 1


def cache_key(digest: str, scope: str) -> str:
    return f"{digest}:{scope}"


@dataclass(frozen=True, slots=True)
class CacheEntry:
    record: TokenRecord | None
    fresh_until: float
    stale_until: float
    written_at: float = 0.0

    @property
    def negative(self) -> bool:
        return self.record is None

    def fresh(self, now: float) -> bool:
        return now < self.fresh_until

    def stale_usable(self, now: float) -> bool:
        return self.record is not None and now < self.stale_until

    def encode(self) -> bytes:
        rec = self.record
        doc: dict[str, Any] = {"v": FORMAT_VERSION, "f": self.fresh_until, "s": self.stale_until,
                               "w": self.written_at}
        if rec is None:
            doc["neg"] = True
        else:
            doc["r"] = {
                "id": rec.id,
                "tenant_id": rec.tenant_id,
                "app_id": rec.app_id,
                "scope": rec.scope,
                "expires_at": rec.expires_at.isoformat() if rec.expires_at else None,
                "disabled": rec.disabled,
            }
        return orjson.dumps(doc)

    @classmethod
    def decode(cls, raw: bytes) -> CacheEntry | None:
        """Parse a stored entry; anything unexpected reads as a miss, never as an answer."""
        try:
            doc = orjson.loads(raw)
            if doc.get("v") != FORMAT_VERSION:
                return None
            fresh, stale = float(doc["f"]), float(doc["s"])
            written = float(doc.get("w", 0.0))
            if doc.get("neg") is True:
                return cls(None, fresh, stale, written)
            r = doc["r"]
            expires = datetime.fromisoformat(r["expires_at"]) if r.get("expires_at") else None
            record = TokenRecord(
                id=str(r["id"]),
                tenant_id=r.get("tenant_id"),
                app_id=r.get("app_id"),
                scope=str(r["scope"]),
                expires_at=expires,
                disabled=bool(r.get("disabled", False)),
            )
            return cls(record, fresh, stale, written)
        except (ValueError, KeyError, TypeError, AttributeError):
            return None


class LocalCache:
    """Bounded LRU of CacheEntry with its own short TTL.

    An entry stays in L1 until evicted by size, even past its L1 freshness, because it may still
    serve a stale-if-error answer when the store is down; `get` returns it with the deadline
    L1 assigned, and the caller decides.
    """

    def __init__(self, max_size: int, ttl: float) -> None:
        self.max_size = max_size
        self.ttl = ttl
        self._data: OrderedDict[str, CacheEntry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: str) -> CacheEntry | None:
        entry = self._data.get(key)
        if entry is not None:
            self._data.move_to_end(key)
        return entry

    def put(self, key: str, entry: CacheEntry, now: float | None = None) -> None:
        if self.max_size <= 0 or self.ttl <= 0:
            return
        now = time.time() if now is None else now
        # L1 is fresh for at most its own TTL, and never longer than the shared entry.
        local = CacheEntry(entry.record, min(entry.fresh_until, now + self.ttl), entry.stale_until,
                           entry.written_at)
        self._data[key] = local
        self._data.move_to_end(key)
        while len(self._data) > self.max_size:
            self._data.popitem(last=False)

    def pop(self, key: str) -> bool:
        return self._data.pop(key, None) is not None

    def pop_digest(self, digest: str) -> int:
        """Drop every scope's entry of one token; returns how many were dropped."""
        prefix = digest + ":"
        keys = [k for k in self._data if k.startswith(prefix)]
        for k in keys:
            del self._data[k]
        return len(keys)

    def pop_tenant(self, tenant_id: str) -> int:
        keys = [
            k for k, e in self._data.items()
            if e.record is not None and e.record.tenant_id == tenant_id
        ]
        for k in keys:
            del self._data[k]
        return len(keys)

    def clear(self) -> None:
        self._data.clear()
