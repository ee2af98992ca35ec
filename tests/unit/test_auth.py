"""The Authenticator's decisions with fake tiers (pure logic; the real tiers are exercised in
tests/functional)."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta

import pytest

from sidecar.auth import Authenticator, CachePolicy, LockPolicy
from sidecar.cache import CacheEntry, LocalCache
from sidecar.errors import AuthUnavailable, InvalidToken
from sidecar.metrics import Metrics
from sidecar.models import TokenRecord
from tests.fakes import FakeShared, FakeStore


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(store: FakeStore, shared: FakeShared | None = None, clock: Clock | None = None,
         **kw: float) -> Authenticator:
    return Authenticator(
        store, local=LocalCache(100, kw.pop("local_ttl", 10.0)), shared=shared,
        metrics=Metrics(),
        policy=CachePolicy(ttl=kw.pop("ttl", 600), negative_ttl=60,
                           stale_if_error=kw.pop("stale", 300)),
        clock=clock or Clock(),
        lock=LockPolicy(ttl=10, wait=kw.pop("wait", 5.0), first_poll=0.001, max_poll=0.01),
    )


REC = TokenRecord("row-1", "tenant", "app-id", "app")


async def test_allows_and_fills_caches() -> None:
    store, shared = FakeStore(), FakeShared()
    store.rows[("tok", "app")] = REC
    auth = make(store, shared)
    ident = await auth.authenticate("tok", "app")
    assert (ident.token_id, ident.tenant_id, ident.app_id, ident.scope) == (
        "row-1", "tenant", "app-id", "app")
    await auth.authenticate("tok", "app")
    assert store.calls == 1
    assert len(shared.data) == 1
    assert "tok" not in next(iter(shared.data))


async def test_wrong_scope_unknown_disabled_expired_are_invalid() -> None:
    store = FakeStore()
    store.rows[("tok", "app")] = REC
    past = datetime.now() - timedelta(days=400)  # naive on purpose: Dify stores naive UTC
    store.rows[("old", "app")] = TokenRecord("r2", None, None, "app", expires_at=past)
    store.rows[("off", "app")] = TokenRecord("r3", None, None, "app", disabled=True)
    auth = make(store)
    for token, scope in (("tok", "dataset"), ("nope", "app"), ("old", "app"), ("off", "app")):
        with pytest.raises(InvalidToken):
            await auth.authenticate(token, scope)


async def test_single_flight_in_process() -> None:
    store = FakeStore()
    store.rows[("tok", "app")] = REC
    store.delay = 0.05
    auth = make(store)
    results = await asyncio.gather(*(auth.authenticate("tok", "app") for _ in range(200)))
    assert {r.token_id for r in results} == {"row-1"}
    assert store.calls == 1


async def test_single_flight_shares_errors_too() -> None:
    store = FakeStore()
    store.down = True
    store.delay = 0.02
    auth = make(store)
    results = await asyncio.gather(*(auth.authenticate("tok", "app") for _ in range(50)),
                                   return_exceptions=True)
    assert all(isinstance(r, AuthUnavailable) for r in results)
    assert store.calls == 1


async def test_stale_if_error_window() -> None:
    store, clock = FakeStore(), Clock()
    store.rows[("tok", "app")] = REC
    auth = make(store, clock=clock, ttl=60, stale=30)
    await auth.authenticate("tok", "app")
    store.down = True
    clock.now += 61  # expired 1 s ago: within the stale window
    assert (await auth.authenticate("tok", "app")).token_id == "row-1"
    clock.now += 30  # expired 31 s ago
    with pytest.raises(AuthUnavailable):
        await auth.authenticate("tok", "app")
    with pytest.raises(AuthUnavailable):
        await auth.authenticate("never-seen", "app")


async def test_negative_entry_does_not_answer_an_outage_past_its_ttl() -> None:
    store, clock = FakeStore(), Clock()
    auth = make(store, clock=clock)
    with pytest.raises(InvalidToken):
        await auth.authenticate("nope", "app")
    store.down = True
    with pytest.raises(InvalidToken):  # fresh negative entry: still a 401
        await auth.authenticate("nope", "app")
    clock.now += 61
    with pytest.raises(AuthUnavailable):  # expired: cannot say, so 503, not 401
        await auth.authenticate("nope", "app")


async def test_lookup_overlapping_an_invalidation_is_not_cached() -> None:
    store = FakeStore()
    store.rows[("tok", "app")] = REC
    store.delay = 0.05
    auth = make(store)
    pending = asyncio.ensure_future(auth.authenticate("tok", "app"))
    await asyncio.sleep(0.01)
    del store.rows[("tok", "app")]  # revoked while the lookup was in flight...
    auth.forget(auth.digest("tok"))  # ...and the invalidation arrives before it returns
    assert (await pending).token_id == "row-1"  # that request saw the old row
    with pytest.raises(InvalidToken):  # but it was not cached
        await auth.authenticate("tok", "app")
    assert store.calls == 2


async def test_waits_for_the_lock_holder_instead_of_querying() -> None:
    store, shared = FakeStore(), FakeShared()
    store.rows[("tok", "app")] = REC
    auth = make(store, shared)
    key = f"{auth.digest('tok')}:app"
    shared.locks[key] = "other-replica"

    async def other_replica_answers() -> None:
        await asyncio.sleep(0.05)
        shared.data[key] = CacheEntry(REC, 10_000.0, 10_000.0)
        del shared.locks[key]

    helper = asyncio.ensure_future(other_replica_answers())
    ident = await auth.authenticate("tok", "app")
    await helper
    assert ident.token_id == "row-1"
    assert store.calls == 0


async def test_lock_wait_timeout_or_redis_down_queries_postgres() -> None:
    store, shared = FakeStore(), FakeShared()
    store.rows[("tok", "app")] = REC
    auth = make(store, shared, wait=0.05)
    shared.locks[f"{auth.digest('tok')}:app"] = "stuck-replica"
    assert (await auth.authenticate("tok", "app")).token_id == "row-1"
    assert store.calls == 1
    assert auth.metrics.lock_timeouts._value.get() == 1

    store2, down = FakeStore(), FakeShared()
    store2.rows[("tok", "app")] = REC
    down.available = False
    auth2 = make(store2, down)
    assert (await auth2.authenticate("tok", "app")).token_id == "row-1"
    assert store2.calls == 1


class SlowShared(FakeShared):
    def __init__(self) -> None:
        super().__init__()
        self.get_delay = 0.0
        self.gets = 0
        self.hide_first = False

    async def get(self, key: str) -> CacheEntry | None:
        self.gets += 1
        entry = self.data.get(key)  # read now, answer later: a GET in flight
        await asyncio.sleep(self.get_delay)
        if self.hide_first and self.gets == 1:
            return None
        return entry


async def test_l2_read_overlapping_an_invalidation_does_not_refill_l1() -> None:
    store, shared = FakeStore(), SlowShared()
    auth = make(store, shared)
    key = f"{auth.digest('tok')}:app"
    shared.data[key] = CacheEntry(REC, 10_000.0, 10_000.0, 999.0)
    shared.get_delay = 0.05
    pending = asyncio.ensure_future(auth.authenticate("tok", "app"))
    await asyncio.sleep(0.01)
    del shared.data[key]
    auth.forget(auth.digest("tok"))  # revoked while the L2 read was in flight
    assert (await pending).token_id == "row-1"
    assert auth.local.get(key) is None  # the old answer was not cached in L1


async def test_lock_is_released_when_the_second_check_finds_an_answer() -> None:
    store, shared = FakeStore(), SlowShared()
    auth = make(store, shared)
    key = f"{auth.digest('tok')}:app"
    shared.data[key] = CacheEntry(REC, 10_000.0, 10_000.0, 999.0)
    shared.hide_first = True  # first read misses, the second check (under the lock) hits
    assert (await auth.authenticate("tok", "app")).token_id == "row-1"
    assert store.calls == 0
    assert shared.locks == {}


async def test_entries_written_before_a_missed_invalidation_are_not_trusted() -> None:
    store, shared, clock = FakeStore(), FakeShared(), Clock()
    auth = make(store, shared, clock=clock)
    key = f"{auth.digest('tok')}:app"
    shared.data[key] = CacheEntry(REC, clock.now + 600, clock.now + 900, clock.now - 5)
    auth.distrust_shared_before(clock.now)
    with pytest.raises(InvalidToken):  # Postgres says the row is gone; L2 is not believed
        await auth.authenticate("tok", "app")
    assert store.calls == 1
    assert shared.data[key].negative  # and L2 was rewritten with the current answer


async def test_cancelled_leader_does_not_cancel_its_waiters() -> None:
    store = FakeStore()
    store.rows[("tok", "app")] = REC
    store.delay = 0.05
    auth = make(store)
    leader = asyncio.ensure_future(auth.authenticate("tok", "app"))
    await asyncio.sleep(0.01)
    waiter = asyncio.ensure_future(auth.authenticate("tok", "app"))
    await asyncio.sleep(0.01)
    leader.cancel()
    assert (await waiter).token_id == "row-1"  # took over instead of failing
    with pytest.raises(asyncio.CancelledError):
        await leader
