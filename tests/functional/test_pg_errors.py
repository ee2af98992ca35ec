"""Postgres configuration and dependency errors (SPEC 3.5, 11): a malformed URL is a named
configuration error that never echoes the password; a dependency error is logged with the
driver's own message, never with the password."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import aiohttp
import orjson
import pytest

from sidecar.app import METRICS
from sidecar.subscriptions import SELF_TEST_PREFIX
from tests.conftest import Db, SidecarFactory, running
from tests.helpers import listening, sample, status, within
from tests.servers import PostgresServer, free_port


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    return subprocess.run([sys.executable, "-m", "sidecar", *args], env={**base, **env},
                          capture_output=True, text=True, timeout=60, cwd="/")


# Each holds a password with a character that must be percent-encoded; FRAGMENTS are the
# pieces of those passwords that must appear nowhere in the output.
MALFORMED = [
    "postgresql://sidecar:Zq9xK:Wv7yQ/Kp4mR@db.internal/dify",  # ':' and '/' in it
    "postgresql://sidecar:Zq9xK@Wv7yQ@db.internal:5432/dify",  # '@' in it
    "postgresql://sidecar:Zq9xK@db.internal:Wv7yQ/dify",  # a port that is not one
    "postgresql://sidecar:Zq9xK@h1:5432,,h2:5432/dify",  # an empty host in the list
]
FRAGMENTS = ("Zq9xK", "Wv7yQ", "Kp4mR")
VARIABLES = ("SIDECAR_DATABASE_URL", "SIDECAR_DATABASE_READ_URL", "SIDECAR_DATABASE_LISTEN_URL")


@pytest.mark.parametrize("url", MALFORMED)
@pytest.mark.parametrize("command", ["check-config", "serve"])
def test_malformed_database_url_is_a_named_error_without_the_password(
    command: str, url: str,
) -> None:
    # Each URL setting in turn; the others valid.
    variable = VARIABLES[MALFORMED.index(url) % len(VARIABLES)]
    env = {"SIDECAR_DATABASE_URL": "postgresql://sidecar@127.0.0.1:1/sidecar",
           "SIDECAR_LISTEN": f"127.0.0.1:{free_port()}",
           "SIDECAR_OPS_LISTEN": f"127.0.0.1:{free_port()}", variable: url}
    res = run_cli(command, env=env)
    out = res.stdout + res.stderr
    assert res.returncode != 0
    assert "Traceback" not in out
    named = [line for line in out.splitlines() if variable in line]
    assert len(named) == 1, out
    assert "malformed URL" in named[0]
    assert "percent-encode" in named[0]
    for fragment in FRAGMENTS:
        assert fragment not in out


def test_multi_host_and_tls_urls_stay_valid() -> None:
    url = ("postgresql://sidecar:s%40cret@pg1.internal:5432,pg2.internal:5433/dify"
           "?target_session_attrs=read-write&sslmode=verify-full"
           "&sslrootcert=/etc/ssl/certs/pg-ca.pem")
    res = run_cli("check-config", env={"SIDECAR_DATABASE_URL": url,
                                       "SIDECAR_DATABASE_READ_URL": url})
    assert res.returncode == 0, res.stderr
    assert ("SIDECAR_DATABASE_URL=postgresql://sidecar:***@pg1.internal:5432,pg2.internal:5433"
            "/dify?target_session_attrs=read-write&sslmode=verify-full"
            "&sslrootcert=/etc/ssl/certs/pg-ca.pem") in res.stdout
    assert "s%40cret" not in res.stdout + res.stderr


@pytest.fixture
def password_postgres() -> Iterator[PostgresServer]:
    yield from running(lambda: PostgresServer(password="right-Pw-7731").setup())


async def test_wrong_password_is_logged_with_the_drivers_message_not_the_password(
    password_postgres: PostgresServer, make_sidecar: SidecarFactory, upstream: Any,
    http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture,
) -> None:
    wrong = "wrong-Pw-5519"
    dsn = f"postgresql://sidecar:{wrong}@127.0.0.1:{password_postgres.port}/sidecar"
    caplog.set_level(logging.INFO)
    sc = await make_sidecar(database_url=dsn, upstream_url=str(upstream.make_url("")))
    assert await status(http, sc, "app-some-token") == 503

    def said(where: str) -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == where
                and "password authentication failed for user" in r.getMessage()]

    async def explained() -> bool:
        return bool(said("sidecar.store")) and bool(said("sidecar.subscriptions"))

    await within(10.0, explained)
    await asyncio.sleep(1.0)  # retries meanwhile: still one line each (once per change)
    assert len(said("sidecar.store")) == 1
    assert len(said("sidecar.subscriptions")) == 1
    assert "InvalidPasswordError" in said("sidecar.store")[0]
    assert wrong not in caplog.text
    assert "right-Pw-7731" not in caplog.text
    async with http.get(sc.ops_url("/readyz")) as r:
        assert r.status == 503
        doc = orjson.loads(await r.read())
    assert doc["postgres"] == "down"
    assert doc["invalidation"] == "down"


async def test_another_sidecars_self_test_notify_changes_nothing(
    make_sidecar: SidecarFactory, db: Db, caplog: pytest.LogCaptureFixture,
) -> None:
    token, _ = await db.add_token("app")
    sc = await make_sidecar()
    await listening(sc)
    metrics = sc.app[METRICS]
    caplog.set_level(logging.WARNING, logger="sidecar.invalidation")
    # Another replica's self-test, then a real change: NOTIFYs arrive in order, so once the
    # change is counted the self-test has been handled.
    await db.conn.execute("SELECT pg_notify('sidecar_invalidate', $1)",
                          f'{SELF_TEST_PREFIX}"00112233445566ff"}}')
    await db.conn.execute("DELETE FROM api_tokens WHERE token = $1", token)

    async def counted() -> bool:
        return sample(metrics, "sidecar_invalidations_total", {"source": "notify"}) >= 1

    await within(5.0, counted)
    assert sample(metrics, "sidecar_invalidations_total", {"source": "notify"}) == 1
    assert sample(metrics, "sidecar_invalidations_total", {"source": "notify_malformed"}) == 0
    assert not [r for r in caplog.records if r.name == "sidecar.invalidation"]
