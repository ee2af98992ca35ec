"""The unknown-token filter (SPEC 15): a Bloom filter of the digests of every stored token.

Rules that hold here:
1. It only ever says "certainly absent" or "maybe present": a token it calls absent is
   answered 401 without a Postgres query; anything else goes the usual way. It has no false
   negatives for rows it was told about, so it can only refuse tokens that do not exist.
2. It is loaded by one streaming query that returns digests computed in SQL (the same
   sha256 of the token column that cache keys and NOTIFY payloads use), kept current by the
   NOTIFYs the sidecar receives anyway, and rebuilt after any LISTEN gap. Until a build has
   finished, and whenever LISTEN is down, it answers nothing (`admits` is True).
3. A small budget of "absent" answers per second still asks Postgres, so a token created a
   moment ago works even if its NOTIFY is late.
4. Sized at build time from the row count with headroom (2x, at least 100 000), for a
   false-positive rate of 0.1 % at that capacity: 14.4 bits and 10 hash probes per entry.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import orjson

if TYPE_CHECKING:
    import asyncpg

    from sidecar.metrics import Metrics

log = logging.getLogger("sidecar.token_filter")

FALSE_POSITIVE_RATE = 0.001
MIN_CAPACITY = 100_000
HEADROOM = 2

DEFAULT_FILTER_SQL = "SELECT encode(sha256(convert_to(token, 'UTF8')), 'hex') FROM api_tokens"


class BloomFilter:
    """m bits, k probes by double hashing of the (already uniformly random) digest bytes."""

    def __init__(self, capacity: int, rate: float = FALSE_POSITIVE_RATE) -> None:
        self.capacity = capacity
        self.bits = max(8, math.ceil(-capacity * math.log(rate) / math.log(2) ** 2))
        self.probes = max(1, round(self.bits / capacity * math.log(2)))
        self.array = bytearray((self.bits + 7) // 8)
        self.count = 0

    def _positions(self, digest: str) -> list[int]:
        raw = bytes.fromhex(digest)
        h1 = int.from_bytes(raw[:8], "big")
        h2 = int.from_bytes(raw[8:16], "big") | 1
        return [(h1 + i * h2) % self.bits for i in range(self.probes)]

    def add(self, digest: str) -> None:
        for p in self._positions(digest):
            self.array[p >> 3] |= 1 << (p & 7)
        self.count += 1

    def __contains__(self, digest: str) -> bool:
        return all(self.array[p >> 3] & (1 << (p & 7)) for p in self._positions(digest))

    @property
    def nbytes(self) -> int:
        return len(self.array)


def capacity_for(rows: int) -> int:
    return max(MIN_CAPACITY, rows * HEADROOM)


class TokenFilter:
    def __init__(self, sql: str, *, miss_budget: float, metrics: Metrics | None = None,
                 listening: Callable[[], bool] = lambda: True) -> None:
        self.sql = sql
        self.miss_budget = miss_budget
        self.metrics = metrics
        self.listening = listening
        self._bloom: BloomFilter | None = None
        self._building: set[str] | None = None
        self._generation = 0
        self._tokens = miss_budget
        self._refilled = time.monotonic()

    @property
    def ready(self) -> bool:
        return self._bloom is not None and self.listening()

    def admits(self, digest: str) -> bool:
        """False only when the token certainly does not exist and the per-second budget of
        such lookups is spent (rules 1, 3)."""
        bloom = self._bloom
        if bloom is None or not self.listening() or digest in bloom:
            return True
        now = time.monotonic()
        self._tokens = min(self.miss_budget,
                           self._tokens + (now - self._refilled) * self.miss_budget)
        self._refilled = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        if self.metrics is not None:
            self.metrics.token_filter_answers.inc()
        return False

    def note(self, digest: str) -> None:
        if self._bloom is not None:
            self._bloom.add(digest)
        if self._building is not None:
            self._building.add(digest)

    def note_payloads(self, payloads: list[str]) -> None:
        """NOTIFY payloads of the token triggers: every digest named is (maybe) stored now."""
        for payload in payloads:
            try:
                items = orjson.loads(payload)
            except orjson.JSONDecodeError:
                continue
            if isinstance(items, list):
                for item in items:
                    if isinstance(item, dict) and isinstance(item.get("h"), str):
                        self.note(item["h"])

    def forget(self) -> None:
        """LISTEN was lost: changes may have been missed, answer nothing until rebuilt."""
        self._bloom = None
        self._generation += 1

    async def build(self, pool: asyncpg.Pool) -> None:
        generation = self._generation
        self._building = set()
        started = time.monotonic()
        try:
            async with pool.acquire() as conn, conn.transaction(readonly=True):
                rows = await conn.fetchval("SELECT count(*) FROM api_tokens")
                bloom = BloomFilter(capacity_for(int(rows or 0)))
                async for record in conn.cursor(self.sql, prefetch=10_000):
                    if record[0] is not None:
                        bloom.add(str(record[0]))
            for digest in self._building:
                bloom.add(digest)
        finally:
            self._building = None
        if generation != self._generation:
            return  # LISTEN was lost meanwhile: a newer build follows
        self._bloom = bloom
        if self.metrics is not None:
            self.metrics.token_filter_rebuilds.inc()
            self.metrics.token_filter_entries.set(bloom.count)
            self.metrics.token_filter_bytes.set(bloom.nbytes)
        log.info("token filter built", extra={"fields": {
            "entries": bloom.count, "bytes": bloom.nbytes,
            "seconds": round(time.monotonic() - started, 3)}})

    async def keep_built(self, pool: Callable[[], asyncpg.Pool], connected: asyncio.Event,
                         rebuild: asyncio.Event) -> None:
        """Build once LISTEN is connected, and again after each reconnect (rule 2)."""
        while True:
            await connected.wait()
            try:
                await self.build(pool())
            except Exception as exc:
                log.warning("token filter build failed: %s", type(exc).__name__)
                await asyncio.sleep(2)
                continue
            await rebuild.wait()
            rebuild.clear()
