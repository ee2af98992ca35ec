"""The ops listener and the command line against real Postgres/Redis."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from typing import Any

import aiohttp
import orjson
import pytest

from sidecar import __version__
from sidecar.outcomes import Outcome
from tests.conftest import Db, SidecarFactory
from tests.helpers import exchange, listening, scrape, scraped, within
from tests.helpers import families as parse_families
from tests.servers import PG_PASSWORD, PostgresServer, free_port

TENANT = "12345678-1234-1234-1234-123456789abc"


# An unknown token sent in the test below; like a real one, it must appear nowhere.
BOGUS = "bogus-token-q7w3e9"


async def test_metrics_parse_and_leak_nothing(
    make_sidecar: SidecarFactory, db: Db, upstream: Any, redis_url: str
) -> None:
    token, row_id = await db.add_token("app", tenant_id=TENANT)
    sc = await make_sidecar(upstream_url=str(upstream.make_url("")), redis_url=redis_url,
                            public_routes="/public")
    async with aiohttp.ClientSession() as http:
        for headers in ({"Authorization": f"Bearer {token}"}, {"Authorization": f"Bearer {BOGUS}"},
                        {}):
            async with http.get(sc.url(f"/v1/chat/{TENANT}"), headers=headers) as r:
                await r.read()
        async with http.get(sc.url("/public/x")) as r:
            assert r.status == 200
        async with http.get(sc.ops_url("/metrics")) as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("text/plain")
            text = await r.text()
    families = parse_families(text)
    # Ours are sidecar_*; process_* and python_* are prometheus-client's runtime collectors.
    assert all(name.startswith(("sidecar_", "process_", "python_")) for name in families)
    outcomes = {(s.labels["outcome"], s.labels["scope"]): s.value
                for s in families["sidecar_requests"].samples if s.name.endswith("_total")}
    assert outcomes[("allowed", "app")] == 1
    assert outcomes[("unauthorized", "app")] == 2
    assert outcomes[("public", "none")] == 1
    for name in ("sidecar_auth_duration_seconds", "sidecar_cache_lookups",
                 "sidecar_upstream_responses", "sidecar_upstream_duration_seconds",
                 "sidecar_in_flight_requests", "sidecar_last_used_pending"):
        assert name in families, name
    lookups = {(s.labels["tier"], s.labels["result"]): s.value
               for s in families["sidecar_cache_lookups"].samples if s.name.endswith("_total")}
    assert lookups[("l1", "miss")] >= 2
    assert lookups[("l2", "miss")] >= 2
    for secret in (token, TENANT, row_id, BOGUS):
        assert secret not in text


async def test_health_and_readiness(
    make_sidecar: SidecarFactory, db: Db, upstream: Any, redis_url: str
) -> None:
    sc = await make_sidecar(upstream_url=str(upstream.make_url("")), redis_url=redis_url)
    await listening(sc)  # `invalidation` is ok once LISTEN passed its self-test
    async with aiohttp.ClientSession() as http:
        async with http.get(sc.ops_url("/healthz")) as r:
            assert r.status == 200
        async with http.get(sc.ops_url("/readyz")) as r:
            assert r.status == 200
            assert orjson.loads(await r.read()) == {
                "status": "ready", "postgres": "ok", "redis": "ok", "upstream": "ok",
                "invalidation": "ok", "last_used": "ok"}
    bare = await make_sidecar()  # no Redis, decision-only
    async with aiohttp.ClientSession() as http:
        async with http.get(bare.ops_url("/readyz")) as r:
            doc = orjson.loads(await r.read())
        assert doc["redis"] == "disabled"
        assert doc["upstream"] == "disabled"
        async with http.get(bare.url("/anything")) as r:
            assert r.status == 404


async def test_readyz_not_ready_when_postgres_never_reached(
    make_sidecar: SidecarFactory, db: Db, upstream: Any
) -> None:
    sc = await make_sidecar(
        database_url=f"postgresql://sidecar:x@127.0.0.1:{free_port()}/sidecar",
        database_timeout=0.5, upstream_url=str(upstream.make_url("")))
    async with aiohttp.ClientSession() as http:
        async with http.get(sc.ops_url("/readyz")) as r:
            assert r.status == 503
            assert orjson.loads(await r.read())["status"] == "not_ready"
        async with http.get(sc.ops_url("/healthz")) as r:
            assert r.status == 200
        async with http.get(sc.url("/a"), headers={"Authorization": "Bearer t"}) as r:
            assert r.status == 503
            assert orjson.loads(await r.read())["code"] == "auth_unavailable"


def run_cli(*args: str, env: dict[str, str], stdin: str = "") -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    return subprocess.run([sys.executable, "-m", "sidecar", *args], env={**base, **env},
                          capture_output=True, text=True, timeout=60, input=stdin,
                          cwd="/")


def test_check_config_names_each_bad_variable_and_hides_password() -> None:
    dsn = f"postgresql://sidecar:{PG_PASSWORD}@127.0.0.1:5432/sidecar"
    res = run_cli("check-config", env={"SIDECAR_DATABASE_URL": dsn, "SIDECAR_CACHE_TTL": "abc",
                                       "SIDECAR_LISTEN": "nonsense",
                                       "SIDECAR_SCOPE_ROUTES": "v1=app"})
    assert res.returncode != 0
    assert "SIDECAR_CACHE_TTL" in res.stderr
    assert "SIDECAR_LISTEN" in res.stderr
    assert "SIDECAR_SCOPE_ROUTES" in res.stderr
    assert PG_PASSWORD not in res.stdout + res.stderr

    res = run_cli("check-config", env={"SIDECAR_CACHE_TTL": "5"})
    assert res.returncode != 0
    assert "SIDECAR_DATABASE_URL" in res.stderr

    res = run_cli("check-config", env={"SIDECAR_DATABASE_URL": dsn,
                                       "SIDECAR_REDIS_URL": "redis://:redispw@127.0.0.1:1/0",
                                       "SIDECAR_ADMIN_TOKEN": "admin-secret-0123456789"})
    assert res.returncode == 0, res.stderr
    assert "SIDECAR_DATABASE_URL=postgresql://sidecar:***@127.0.0.1:5432/sidecar" in res.stdout
    for secret in (PG_PASSWORD, "redispw", "admin-secret-0123456789"):
        assert secret not in res.stdout + res.stderr

    # libpq, asyncpg and redis-py also take passwords as query parameters.
    res = run_cli("check-config", env={
        "SIDECAR_DATABASE_URL": f"postgresql://sidecar@127.0.0.1:5432/sidecar"
                                f"?sslmode=prefer&password={PG_PASSWORD}&sslpassword=keypw",
        "SIDECAR_REDIS_URL": "redis://127.0.0.1:1/0?password=redispw",
    })
    assert res.returncode == 0, res.stderr
    assert ("SIDECAR_DATABASE_URL=postgresql://sidecar@127.0.0.1:5432/sidecar"
            "?sslmode=prefer&password=***&sslpassword=***") in res.stdout
    assert "SIDECAR_REDIS_URL=redis://127.0.0.1:1/0?password=***" in res.stdout
    for secret in (PG_PASSWORD, "redispw", "keypw"):
        assert secret not in res.stdout + res.stderr


def test_bad_password_in_invalid_dsn_is_not_printed() -> None:
    res = run_cli("check-config", env={"SIDECAR_DATABASE_URL": f"mysql://u:{PG_PASSWORD}@h/db"})
    assert res.returncode != 0
    assert "SIDECAR_DATABASE_URL" in res.stderr
    assert PG_PASSWORD not in res.stdout + res.stderr


async def test_schema_and_token_commands(own_postgres: PostgresServer) -> None:
    env = {"SIDECAR_DATABASE_URL": own_postgres.dsn}
    printed = await asyncio.to_thread(run_cli, "schema", env={})
    assert printed.returncode == 0
    assert "CREATE TABLE IF NOT EXISTS api_tokens" in printed.stdout
    custom = await asyncio.to_thread(run_cli, "schema",
                                     env={"SIDECAR_NOTIFY_CHANNEL": "tokens_changed"})
    assert "sidecar_token_notify('tokens_changed')" in custom.stdout
    assert "'sidecar_invalidate'" not in custom.stdout
    for _ in range(2):  # idempotent
        res = await asyncio.to_thread(run_cli, "schema", "--apply", env=env)
        assert res.returncode == 0, res.stderr
    res = await asyncio.to_thread(run_cli, "token", "create", "--scope", "dataset",
                                  "--tenant-id", TENANT, env=env)
    assert res.returncode == 0, res.stderr
    token = res.stdout.strip()
    assert token.startswith("dataset-")
    row = own_postgres.psql(f"SELECT type, tenant_id FROM api_tokens WHERE token = '{token}'")
    assert row == f"dataset|{TENANT}"
    res = await asyncio.to_thread(run_cli, "token", "revoke", env=env, stdin=token + "\n")
    assert res.returncode == 0, res.stderr
    assert own_postgres.psql("SELECT count(*) FROM api_tokens") == "0"
    # hashed storage: the raw token exists nowhere at rest
    res = await asyncio.to_thread(run_cli, "token", "create", "--scope", "app",
                                  env={**env, "SIDECAR_TOKEN_HASH": "sha256"})
    token = res.stdout.strip()
    stored = own_postgres.psql("SELECT token FROM api_tokens")
    assert stored != token
    assert len(stored) == 64


ADMIN = "admin-token-0123456789abcdef"


async def admin_raw(port: int | None, head: bytes, parts: list[bytes]) -> tuple[int, bytes]:
    """POST /admin/invalidate with the body written in `parts`, a pause between each, so the
    server sees it arrive in separate TCP segments; returns (status, body)."""
    resp = await exchange(port, [
        b"POST /admin/invalidate HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Authorization: Bearer " + ADMIN.encode() + b"\r\n"
        b"Content-Type: application/json\r\n" + head + b"\r\n", *parts], pause=0.2)
    return resp.status, resp.body


def chunked(*pieces: bytes) -> list[bytes]:
    return [b"%x\r\n%s\r\n" % (len(p), p) for p in pieces] + [b"0\r\n\r\n"]


async def test_admin_body_arriving_in_pieces_is_read_whole(
    make_sidecar: SidecarFactory, db: Db,
) -> None:
    sc = await make_sidecar(admin_token=ADMIN)
    body = orjson.dumps({"tenant_id": TENANT})
    expected = {"invalidated": "tenant", "tenant_id": TENANT}
    half = len(body) // 2

    status, answer = await admin_raw(sc.ops.port, b"Content-Length: %d\r\n" % len(body),
                                     [body[:half], body[half:]])
    assert status == 200, answer
    assert orjson.loads(answer) == expected

    status, answer = await admin_raw(sc.ops.port, b"Transfer-Encoding: chunked\r\n",
                                     chunked(body[:half], body[half:]))
    assert status == 200, answer
    assert orjson.loads(answer) == expected

    # Without a Content-Length the 64 KiB limit still holds, however the body is cut up.
    big = orjson.dumps({"tenant_id": TENANT, "pad": "x" * (70 * 1024)})
    status, answer = await admin_raw(sc.ops.port, b"Transfer-Encoding: chunked\r\n",
                                     chunked(*(big[i:i + 16384] for i in range(0, len(big),
                                                                                16384))))
    assert status == 413
    assert orjson.loads(answer)["code"] == "payload_too_large"


async def test_known_series_exist_at_zero_from_the_start(
    make_sidecar: SidecarFactory, http: aiohttp.ClientSession,
) -> None:
    # SPEC 10: a series with a known label value exists before its first event, so the first
    # 503 or Postgres error shows in rate(); nothing has been asked of this sidecar yet.
    sc = await make_sidecar(scope_routes="/v1/datasets=dataset,/=app")
    found = await scrape(http, sc.ops_url("/metrics"))
    for outcome in Outcome:
        for scope in ("app", "dataset", "none"):
            assert scraped(found, "sidecar_requests_total",
                           {"outcome": outcome.value, "scope": scope}) == 0
    for kind in ("lookup", "last_used"):
        assert scraped(found, "sidecar_postgres_errors_total", {"kind": kind}) == 0
    assert scraped(found, "sidecar_redis_errors_total", {"op": "ratelimit"}) == 0
    assert scraped(found, "sidecar_upstream_responses_total", {"status_class": "5xx"}) == 0
    assert scraped(found, "sidecar_invalidations_total", {"source": "notify"}) == 0


async def test_runtime_and_build_metrics_and_no_created_series(
    make_sidecar: SidecarFactory, http: aiohttp.ClientSession,
) -> None:
    # SPEC 10: process memory (against the pod limit) and the running version are exposed;
    # counters carry no *_created twin series.
    sc = await make_sidecar()
    found = await scrape(http, sc.ops_url("/metrics"))
    assert scraped(found, "process_resident_memory_bytes") > 10_000_000
    assert scraped(found, "process_open_fds") > 0
    assert scraped(found, "sidecar_build_info", {"version": __version__}) == 1
    assert "python_info" in found
    names = {s.name for f in found.values() for s in f.samples}
    assert "sidecar_requests_total" in names
    assert not [n for n in names if n.endswith("_created")]


async def test_subscription_connected_gauge(
    make_sidecar: SidecarFactory, http: aiohttp.ClientSession, redis_url: str,
) -> None:
    # The gauge the LISTEN-down alert reads follows the subscriptions' connected state.
    sc = await make_sidecar(redis_url=redis_url)

    async def connected() -> bool:
        found = await scrape(http, sc.ops_url("/metrics"))
        return all(scraped(found, "sidecar_subscription_connected", {"subscription": name}) == 1
                   for name in ("postgres-listen", "redis-subscribe"))

    await within(10, connected)
    bare = await make_sidecar()  # no Redis: no redis-subscribe series that reads as "down"
    found = await scrape(http, bare.ops_url("/metrics"))
    subscriptions = {s.labels["subscription"]
                     for s in found["sidecar_subscription_connected"].samples}
    assert subscriptions == {"postgres-listen"}


@pytest.mark.parametrize("credential", [b"Bearer \xff\xfe", b"Bearer " + ADMIN.encode() + b"\xff",
                                        b"Bearer \xc3\xa9t\xc3\xa9-0123456789abcdef"])
async def test_admin_answers_401_to_any_bytes_in_authorization(
    make_sidecar: SidecarFactory, credential: bytes
) -> None:
    sc = await make_sidecar(admin_token=ADMIN)
    body = orjson.dumps({"tenant_id": TENANT})
    resp = await exchange(sc.ops.port, [
        b"POST /admin/invalidate HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Authorization: " + credential + b"\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body) + body])
    assert resp.status == 401
    assert resp.json()["code"] == "unauthorized"
    assert credential not in resp.body


async def test_admin_refuses_an_unknown_scope(
    make_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    sc = await make_sidecar(admin_token=ADMIN, scope_routes="/v1/datasets=dataset,/=app")
    auth = {"Authorization": f"Bearer {ADMIN}"}
    url = sc.ops_url("/admin/invalidate")
    async with http.post(url, json={"token": "t-1", "scope": "datasets"}, headers=auth) as r:
        assert r.status == 400
        assert orjson.loads(await r.read())["code"] == "bad_request"
    async with http.post(url, json={"token": "t-1", "scope": "dataset"}, headers=auth) as r:
        assert r.status == 200


@pytest.mark.parametrize("taken", ["SIDECAR_LISTEN", "SIDECAR_OPS_LISTEN"])
async def test_address_in_use_exits_at_once_with_one_line(
    taken: str, redis_url: str, db: Db
) -> None:
    # SPEC 15: non-zero within 5 s, one line naming the address; nothing else was started
    # (the Redis subscriber used to keep a half-started sidecar alive).
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        busy = f"127.0.0.1:{holder.getsockname()[1]}"
        env = {"SIDECAR_DATABASE_URL": db.dsn, "SIDECAR_REDIS_URL": redis_url,
               "SIDECAR_LISTEN": f"127.0.0.1:{free_port()}",
               "SIDECAR_OPS_LISTEN": f"127.0.0.1:{free_port()}", taken: busy}
        started = time.monotonic()
        res = await asyncio.to_thread(run_cli, "serve", env=env)
        took = time.monotonic() - started
    assert res.returncode != 0
    assert took < 5
    lines = [line for line in (res.stdout + res.stderr).splitlines() if line.strip()]
    assert len(lines) == 1, lines
    doc = orjson.loads(lines[0])
    assert doc["level"] == "error"
    assert doc["address"] == busy
    assert doc["setting"] == taken
    assert PG_PASSWORD not in lines[0]
