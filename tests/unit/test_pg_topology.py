"""Pure logic of the Postgres topologies (SPEC 3.5): URL validation, the scrubbing of driver
messages, the read-replica fence, and self-test payloads never counting as changes."""

from __future__ import annotations

import asyncio
import logging

import orjson
import pytest

from sidecar.dependency_log import DependencyState, describe, register_secret
from sidecar.dsn import check_postgres_url
from sidecar.replica_fence import ReplicaFence
from sidecar.settings import SettingsError, load_settings
from sidecar.subscriptions import SELF_TEST_PREFIX, is_self_test
from sidecar.token_filter import TokenFilter
from tests.helpers import within

VALID = [
    "postgresql://u:p@h/db",
    "postgres://h",
    "postgresql://u:p%40x%3Ay%2Fz@h:5432/db",
    "postgresql://u:p@h1:5432,h2:5433,[::1]:5434/db?target_session_attrs=read-write",
    "postgresql://u:p@h/db?sslmode=verify-full&sslrootcert=/no/such/ca.pem",
    "postgresql://u:p@h/db?sslmode=require&sslcert=/c.pem&sslkey=/k.pem",
    "postgresql:///db?host=/run/postgresql",
]
MALFORMED = [
    "postgresql://u:secret:part/rest@h/db",
    "postgresql://u:sec@ret@h/db",
    "postgresql://u:sec:ret@h/db",
    "postgresql://u:secret@h:99999/db",
    "postgresql://u:secret@h:0/db",
    "postgresql://u:secret@h:5x/db",
    "postgresql://u:secret@h1:5432,,h2/db",
    "postgresql://u:secret@[::1/db",
]


@pytest.mark.parametrize("url", VALID)
def test_valid_urls(url: str) -> None:
    check_postgres_url(url)


@pytest.mark.parametrize("url", MALFORMED)
def test_malformed_urls_never_quote_the_password(url: str) -> None:
    with pytest.raises(ValueError, match="malformed URL") as err:
        check_postgres_url(url)
    for fragment in ("secret", "sec", "ret", "part", "rest", "5x", "99999"):
        assert fragment not in str(err.value)


def test_bad_tls_and_session_attrs_are_named() -> None:
    with pytest.raises(ValueError, match="sslmode must be one of"):
        check_postgres_url("postgresql://u:p@h/db?sslmode=verify")
    with pytest.raises(ValueError, match="target_session_attrs must be one of"):
        check_postgres_url("postgresql://u:p@h/db?target_session_attrs=rw")


def test_settings_name_the_variable() -> None:
    with pytest.raises(SettingsError) as err:
        load_settings(database_url="postgresql://u:p@h/db",
                      database_read_url="postgresql://u:a@b@h/db")
    assert err.value.problems == [
        "SIDECAR_DATABASE_READ_URL: malformed URL: more than one '@' before the host "
        "(percent-encode special characters in the password, e.g. @ as %40, : as %3A, / as %2F)"]


def test_describe_scrubs_urls_pairs_and_registered_secrets() -> None:
    register_secret("Reg1stered-pw")
    exc = ValueError("cannot use postgresql://u:Url-pw-9@h/db nor password=Pair-pw-3 nor "
                     "Reg1stered-pw\nsecond line")
    text = describe(exc)
    assert text.startswith("ValueError: cannot use postgresql://u:***@h/db")
    for secret in ("Url-pw-9", "Pair-pw-3", "Reg1stered-pw"):
        assert secret not in text
    assert "\n" not in text
    assert describe(OSError()) == "OSError"
    assert len(describe(ValueError("x" * 1000))) < 230


def test_dependency_state_logs_once_per_change(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("test.dependency")
    state = DependencyState("thing", log)
    with caplog.at_level(logging.INFO, logger="test.dependency"):
        for reason in ("A", "A", "A", "B", "B"):
            state.down(reason)
        state.up()
        state.up()
    assert [r.getMessage() for r in caplog.records] == [
        "thing unavailable: A", "thing unavailable: B", "thing available again"]


class Positions:
    def __init__(self) -> None:
        self.primary = 100
        self.replica = 0
        self.primary_reads = 0
        self.replica_reads = 0

    async def primary_lsn(self) -> int:
        self.primary_reads += 1
        return self.primary

    async def replica_lsn(self) -> int:
        self.replica_reads += 1
        return self.replica


async def test_fence_lifts_only_once_the_replica_replayed_the_change() -> None:
    pos = Positions()
    fence = ReplicaFence(pos.primary_lsn, pos.replica_lsn, poll_interval=0.01)
    assert not fence.allows("d1")  # at start nothing is known
    task = asyncio.create_task(fence.run())

    async def steps(n: int) -> None:  # until the fence has looked n more times
        target = pos.replica_reads + n
        await within(2.0, lambda: _true(pos.replica_reads >= target))

    try:
        await steps(2)
        assert not fence.allows("d1")  # the replica is behind the start position
        pos.replica = 100
        await within(2.0, lambda: _true(fence.allows("d1")))
        assert not fence.fenced
        fence.changed(["d1"])
        assert not fence.allows("d1")  # at once, before any await
        assert fence.allows("d2")
        pos.primary = 150
        await steps(2)
        assert not fence.allows("d1")  # replica at 100 < 150
        pos.replica = 150
        await within(2.0, lambda: _true(fence.allows("d1")))
        fence.everything()
        assert not fence.allows("d2")
        await within(2.0, lambda: _true(fence.allows("d2")))
    finally:
        task.cancel()


async def _true(value: bool) -> bool:
    return value


async def test_fence_keeps_tokens_fenced_while_positions_cannot_be_read() -> None:
    tries = [0]

    async def broken() -> int:
        tries[0] += 1
        raise OSError("down")

    pos = Positions()
    fence = ReplicaFence(pos.primary_lsn, broken, poll_interval=0.01)
    task = asyncio.create_task(fence.run())
    try:
        await within(2.0, lambda: _true(tries[0] >= 2))  # it kept trying
        assert not fence.allows("d1")
    finally:
        task.cancel()


async def test_fence_overflow_fences_everything() -> None:
    pos = Positions()
    fence = ReplicaFence(pos.primary_lsn, pos.replica_lsn, max_tokens=3)
    fence._all = None  # as if caught up
    fence.changed(["a", "b"])
    assert fence.allows("z")
    fence.changed(["c", "d"])
    assert not fence.allows("z")


def test_self_test_payloads_are_not_changes() -> None:
    payload = f'{SELF_TEST_PREFIX}"0123456789abcdef"}}'
    assert is_self_test(payload)
    assert isinstance(orjson.loads(payload), dict)  # valid JSON, but not a list of changes
    assert not is_self_test('[{"h": "' + "a" * 64 + '"}]')
    tf = TokenFilter("SELECT 1", miss_budget=0)
    tf._building = set()
    tf.note_payloads([payload])
    assert tf._building == set()
