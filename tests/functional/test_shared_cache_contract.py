"""One contract, two implementations: the fake shared cache of tests/fakes.py (which the
Authenticator's unit tests rely on) and the real Redis tier must behave alike on every case
the Authenticator depends on (sidecar.auth.SharedCache)."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

import pytest

from sidecar.auth import SharedCache
from sidecar.cache import CacheEntry
from sidecar.metrics import Metrics
from sidecar.models import TokenRecord
from sidecar.rediscache import RedisCache
from sidecar.redisclient import GuardedRedis, connect
from tests.fakes import FakeShared

RECORD = TokenRecord(id=str(uuid.uuid4()), tenant_id=str(uuid.uuid4()), app_id=None,
                     scope="app")


@pytest.fixture(params=["fake", "redis"])
async def shared(request: pytest.FixtureRequest, redis_url: str
                 ) -> AsyncIterator[SharedCache]:
    if request.param == "fake":
        yield FakeShared()
        return
    guarded = GuardedRedis(connect(redis_url, 5.0), Metrics())
    yield RedisCache(guarded)
    await guarded.aclose()


def key() -> str:
    return f"{uuid.uuid4().hex}:app"


async def test_missing_key_reads_as_none(shared: SharedCache) -> None:
    assert shared.available
    assert await shared.get(key()) is None


async def test_positive_and_negative_entries_round_trip(shared: SharedCache) -> None:
    now = time.time()
    positive = CacheEntry(RECORD, now + 60, now + 360, now)
    negative = CacheEntry(None, now + 60, now + 60, now)
    k1, k2 = key(), key()
    await shared.set(k1, positive, now)
    await shared.set(k2, negative, now)
    assert await shared.get(k1) == positive
    got = await shared.get(k2)
    assert got == negative
    assert got is not None
    assert got.negative


async def test_a_newer_set_replaces_the_entry(shared: SharedCache) -> None:
    now = time.time()
    k = key()
    await shared.set(k, CacheEntry(RECORD, now + 60, now + 60, now), now)
    await shared.set(k, CacheEntry(None, now + 30, now + 30, now + 1), now + 1)
    got = await shared.get(k)
    assert got is not None
    assert got.negative


async def test_lock_is_exclusive_and_released_only_by_its_owner(shared: SharedCache) -> None:
    k = key()
    owner = await shared.try_lock(k, 10.0)
    assert owner is not None
    assert await shared.try_lock(k, 10.0) is None  # held
    await shared.unlock(k, "someone-else")
    assert await shared.try_lock(k, 10.0) is None  # still held: not theirs to release
    await shared.unlock(k, owner)
    again = await shared.try_lock(k, 10.0)
    assert again is not None
    await shared.unlock(k, again)


async def test_locks_of_different_keys_are_independent(shared: SharedCache) -> None:
    a, b = key(), key()
    owner_a = await shared.try_lock(a, 10.0)
    owner_b = await shared.try_lock(b, 10.0)
    assert owner_a is not None
    assert owner_b is not None
    assert owner_a != owner_b
    await shared.unlock(a, owner_a)
    await shared.unlock(b, owner_b)
