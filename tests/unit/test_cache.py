from __future__ import annotations

from datetime import datetime

from sidecar.breaker import CircuitBreaker
from sidecar.cache import CacheEntry, LocalCache
from sidecar.credentials import key_digest, token_digest
from sidecar.models import TokenRecord

REC = TokenRecord("id-1", "tenant-1", None, "app", datetime(2030, 1, 1, 12, 0), False)


def test_entry_round_trip_and_garbage_reads_as_miss() -> None:
    for entry in (CacheEntry(REC, 10.0, 20.0), CacheEntry(None, 5.0, 5.0)):
        assert CacheEntry.decode(entry.encode()) == entry
    for raw in (b"", b"not json", b"{}", b'{"v": 2, "f": 1, "s": 1, "neg": true}',
                b'{"v": 1, "f": "x", "s": 1, "neg": true}', b'{"v": 1, "f": 1, "s": 1}'):
        assert CacheEntry.decode(raw) is None


def test_negative_entries_are_never_stale_usable() -> None:
    neg = CacheEntry(None, 10.0, 100.0)
    pos = CacheEntry(REC, 10.0, 100.0)
    assert not neg.stale_usable(5.0)
    assert pos.stale_usable(50.0)
    assert not pos.stale_usable(100.0)
    assert pos.fresh(9.9)
    assert not pos.fresh(10.0)


def test_digest_is_of_the_stored_column() -> None:
    assert key_digest("tok", hashed_storage=False) == token_digest("tok")
    assert key_digest("tok", hashed_storage=True) == token_digest(token_digest("tok"))
    assert "tok" not in key_digest("tok", False)


def test_local_cache_lru_and_ttl() -> None:
    cache = LocalCache(max_size=2, ttl=1.0)
    cache.put("a", CacheEntry(REC, 100.0, 200.0), now=0.0)
    cache.put("b", CacheEntry(None, 100.0, 100.0), now=0.0)
    assert cache.get("a") is not None  # touch: b is now least recently used
    cache.put("c", CacheEntry(REC, 100.0, 200.0), now=0.0)
    assert cache.get("b") is None
    a = cache.get("a")
    assert a is not None
    assert a.fresh_until == 1.0  # its own TTL, shorter than the shared entry's
    assert a.stale_until == 200.0  # but the stale deadline of the shared entry is kept
    cache.put("d", CacheEntry(REC, 0.5, 0.5), now=0.0)
    d = cache.get("d")
    assert d is not None
    assert d.fresh_until == 0.5  # never fresher than the entry itself


def test_local_cache_pops() -> None:
    cache = LocalCache(10, 10.0)
    other = TokenRecord("id-2", "tenant-2", None, "app")
    cache.put("d1:app", CacheEntry(REC, 100.0, 100.0), now=0.0)
    cache.put("d1:dataset", CacheEntry(None, 100.0, 100.0), now=0.0)
    cache.put("d2:app", CacheEntry(other, 100.0, 100.0), now=0.0)
    assert cache.pop_digest("d1") == 2
    assert cache.pop_tenant("tenant-2") == 1
    assert len(cache) == 0
    disabled = LocalCache(0, 10.0)
    disabled.put("x", CacheEntry(REC, 100.0, 100.0))
    assert disabled.get("x") is None


def test_breaker_probes_once_per_backoff() -> None:
    now = [0.0]
    changes: list[bool] = []
    br = CircuitBreaker(base_delay=1.0, max_delay=8.0, clock=lambda: now[0],
                        on_change=changes.append)
    assert br.allow()
    br.failure()
    assert changes == [True]
    assert not br.allow()
    now[0] = 1.3  # past the first delay (1 s +- 20 %)
    assert br.allow()  # the probe
    assert not br.allow()  # only one at a time
    br.failure()
    now[0] = 2.4  # second delay is 2 s +- 20 %: not yet
    assert not br.allow()
    now[0] = 4.0
    assert br.allow()
    br.success()
    assert changes == [True, False]
    assert br.allow()
    assert br.allow()


def test_breaker_recovers_from_an_abandoned_probe() -> None:
    now = [0.0]
    br = CircuitBreaker(base_delay=1.0, max_delay=5.0, clock=lambda: now[0])
    br.failure()
    now[0] = 2.0
    assert br.allow()  # probe taken, caller never reports back
    now[0] = 6.0
    assert not br.allow()
    now[0] = 7.1
    assert br.allow()


def test_breaker_escalates_once_for_concurrent_failures() -> None:
    now = [0.0]
    br = CircuitBreaker(base_delay=1.0, max_delay=30.0, clock=lambda: now[0])
    allowed = [br.allow() for _ in range(20)]  # twenty calls in flight when Redis went away
    assert all(allowed)
    for _ in range(20):  # ... failing together
        br.failure()
    now[0] = 1.3  # still the first back-off (1 s +- 20 %), not 2**19 s capped at 30
    assert br.allow()
