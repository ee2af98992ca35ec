"""Redis topologies (SPEC 3.5): Cluster, Sentinel failover, TLS, the minimum ACL, errors that
say why, and URLs that are refused before anything starts; all against real servers."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from sidecar.app import METRICS
from sidecar.metrics import Metrics
from sidecar.rediscache import RedisCache
from sidecar.redisclient import GuardedRedis, Topology, connect
from tests.conftest import Db, Sidecar, SidecarFactory
from tests.functional.test_ops import run_cli
from tests.helpers import listening, sample, status, within
from tests.servers import (
    PG_PASSWORD,
    SENTINEL_DATA_PASSWORD,
    SENTINEL_PASSWORD,
    RedisClusterServers,
    RedisSentinelServers,
    RedisServer,
    RedisTlsServer,
    free_port,
    redis_cli,
)

ROOT = Path(__file__).resolve().parents[2]
ADMIN = "admin-token-0123456789abcdef"
ACL_PASSWORD = "acl-pw-7c1d93"


def documented_acl(password: str) -> list[str]:
    """The ACL SETUSER line of the README, as arguments, with `password`."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    line = next(x for x in readme.splitlines() if x.startswith("ACL SETUSER sidecar "))
    return [f">{password}" if arg == ">CHANGE-ME" else arg for arg in line.split()]


async def readyz(http: aiohttp.ClientSession, sc: Sidecar) -> dict[str, str]:
    async with http.get(sc.ops_url("/readyz")) as r:
        doc: dict[str, str] = orjson.loads(await r.read())
        return doc


async def node_keys(port: int, pattern: str = "*", password: str | None = None
                    ) -> list[bytes]:
    client = aioredis.Redis(host="127.0.0.1", port=port, password=password)
    try:
        return [k async for k in client.scan_iter(match=pattern, count=1000)]
    finally:
        await client.aclose()


async def flush(*ports: int, password: str | None = None) -> None:
    for port in ports:
        client = aioredis.Redis(host="127.0.0.1", port=port, password=password)
        await client.flushall()
        await client.aclose()


# ---------------------------------------------------------------------------------------
# Redis Cluster
# ---------------------------------------------------------------------------------------

async def test_cluster_shares_one_limit_spreads_keys_and_invalidates(
    make_sidecar: SidecarFactory, db: Db, upstream: Any, http: aiohttp.ClientSession,
    redis_cluster: RedisClusterServers,
) -> None:
    ports = [n.port for n in redis_cluster.nodes]
    await flush(*ports)
    # The sidecar logs in as a user with the documented ACL (plus the cluster's commands).
    cluster_extra = ["+cluster|slots", "+command"]  # as the README says
    for port in ports:
        await asyncio.to_thread(redis_cli, port, *documented_acl(ACL_PASSWORD),
                                *cluster_extra)
    url = f"redis://sidecar:{ACL_PASSWORD}@127.0.0.1:{ports[0]}/0"
    tenant = str(uuid.uuid4())
    limited, _ = await db.add_token("app")
    tenant_tokens = [(await db.add_token("app", tenant_id=tenant))[0] for _ in range(3)]
    others = [(await db.add_token("app"))[0] for _ in range(12)]
    common = {"upstream_url": str(upstream.make_url("")), "redis_mode": "cluster",
              "redis_url": url, "rate_limit": "10/m", "rate_limit_fail_open": False,
              "admin_token": ADMIN}
    a, b = await make_sidecar(**common), await make_sidecar(**common)
    await listening(a, b)

    statuses = [await status(http, a if i % 2 else b, limited) for i in range(11)]
    assert statuses == [200] * 10 + [429]  # exactly 10 a minute across both sidecars
    for sc in (a, b):
        for token in [*tenant_tokens, *others]:
            assert await status(http, sc, token) == 200
    for sc in (a, b):
        assert sample(sc.app[METRICS], "sidecar_redis_circuit_open") == 0
        assert (await readyz(http, sc))["redis"] == "ok"
    sizes = [len(await node_keys(p)) for p in ports]
    assert sum(1 for n in sizes if n > 0) >= 2, sizes

    # Tenant invalidation through the admin API of one replica: the tenant's entries go
    # from whichever node holds them (and its index), the rest stay; the other replica
    # hears it over pub/sub (its L1 forgets).
    async def entries() -> int:
        return sum([len(await node_keys(p, "sidecar:tok:*")) for p in ports])

    assert await entries() == 1 + len(tenant_tokens) + len(others)
    async with http.post(a.ops_url("/admin/invalidate"), json={"tenant_id": tenant},
                         headers={"Authorization": f"Bearer {ADMIN}"}) as r:
        assert r.status == 200
    assert await entries() == 1 + len(others)
    assert not any([await node_keys(p, f"sidecar:tenant:{tenant}") for p in ports])

    async def heard_on_b() -> bool:
        return sample(b.app[METRICS], "sidecar_invalidations_total", {"source": "pubsub"}) >= 1

    await within(2.0, heard_on_b)  # pub/sub across the cluster

    # A deleted row is refused by both within a second.
    victim, victim_id = await db.add_token("app")
    assert await status(http, a, victim) == 200
    assert await status(http, b, victim) == 200
    await db.conn.execute("DELETE FROM api_tokens WHERE id = $1::uuid", victim_id)

    async def refused() -> bool:
        return await status(http, a, victim) == 401 and await status(http, b, victim) == 401

    await within(1.0, refused)
    for sc in (a, b):
        # MOVED/ASK were followed by the client, never counted as failures.
        assert sample(sc.app[METRICS], "sidecar_redis_circuit_open") == 0
        errors = sum(s.value for f in sc.app[METRICS].registry.collect()
                     if f.name == "sidecar_redis_errors" for s in f.samples
                     if s.name.endswith("_total"))
        assert errors == 0


async def numsub(port: int) -> int:
    out = await asyncio.to_thread(redis_cli, port, "PUBSUB", "NUMSUB", "sidecar:invalidate")
    return int(out.split()[1])


async def test_cluster_subscriber_moves_to_another_node(
    make_sidecar: SidecarFactory, upstream: Any, http: aiohttp.ClientSession,
    redis_cluster: RedisClusterServers,
) -> None:
    sc = await make_sidecar(upstream_url=str(upstream.make_url("")), redis_mode="cluster",
                            redis_url=redis_cluster.url, admin_token=ADMIN)
    await listening(sc)
    nodes = redis_cluster.nodes
    where = [n for n in nodes if await numsub(n.port)]
    assert len(where) == 1
    others = [n for n in nodes if n is not where[0]]
    await asyncio.to_thread(where[0].stop)
    try:
        async def moved() -> bool:
            return any([await numsub(n.port) for n in others])

        await within(3.0, moved)
        before = sample(sc.app[METRICS], "sidecar_invalidations_total", {"source": "pubsub"})
        await asyncio.to_thread(redis_cli, others[0].port, "PUBLISH", "sidecar:invalidate",
                                orjson.dumps({"t": str(uuid.uuid4())}).decode())

        async def heard() -> bool:
            return sample(sc.app[METRICS], "sidecar_invalidations_total",
                          {"source": "pubsub"}) == before + 1

        await within(2.0, heard)
    finally:
        await asyncio.to_thread(where[0].start)
        await asyncio.to_thread(redis_cluster.wait_formed)


# ---------------------------------------------------------------------------------------
# Sentinel
# ---------------------------------------------------------------------------------------

async def evalsha_calls(port: int) -> int:
    text = await asyncio.to_thread(redis_cli, port, "INFO", "commandstats",
                                   password=SENTINEL_DATA_PASSWORD)
    m = re.search(r"cmdstat_evalsha:calls=(\d+)", text)
    return int(m[1]) if m else 0


async def test_sentinel_failover_is_followed_and_old_master_left_alone(
    make_sidecar: SidecarFactory, db: Db, upstream: Any, http: aiohttp.ClientSession,
    redis_sentinel: RedisSentinelServers, caplog: pytest.LogCaptureFixture,
) -> None:
    old = await asyncio.to_thread(redis_sentinel.master_port)
    pw = SENTINEL_DATA_PASSWORD
    await flush(old, password=pw)
    tokens = [(await db.add_token("app"))[0] for _ in range(5)]
    # The URL gives the master's password; its host is ignored (nothing listens there).
    sc = await make_sidecar(upstream_url=str(upstream.make_url("")), redis_mode="sentinel",
                            redis_sentinels=redis_sentinel.sentinels,
                            redis_sentinel_password=SENTINEL_PASSWORD,
                            redis_url=f"redis://:{pw}@127.0.0.1:1/0", rate_limit="1000/m",
                            rate_limit_fail_open=False)
    await listening(sc)
    for token in tokens:
        assert await status(http, sc, token) == 200
    assert await node_keys(old, "sidecar:tok:*", pw)
    assert (await readyz(http, sc))["redis"] == "ok"

    started = time.monotonic()
    await asyncio.to_thread(redis_cli, redis_sentinel.port, "SENTINEL", "FAILOVER",
                            redis_sentinel.master_name, password=SENTINEL_PASSWORD)
    seen: list[int] = []

    async def all_ok() -> bool:
        codes = [await status(http, sc, t) for t in tokens]
        seen.extend(codes)
        return await asyncio.to_thread(redis_sentinel.master_port) != old and all(
            c == 200 for c in codes)

    await within(5.0, all_ok, interval=0.05)
    new = await asyncio.to_thread(redis_sentinel.master_port)
    assert new != old

    # Fresh keys land on the new master; the old one runs no more scripts of ours.
    async def on_new_master() -> bool:
        fresh, row_id = await db.add_token("app")
        assert await status(http, sc, fresh) == 200
        client = aioredis.Redis(host="127.0.0.1", port=new, password=pw)
        try:
            return bool(await client.exists(f"sidecar:rl:{{tok:{row_id}}}:tok:{row_id}"))
        finally:
            await client.aclose()

    await within(5.0, on_new_master)
    before = await evalsha_calls(old)
    for _ in range(10):
        fresh, row_id = await db.add_token("app")
        assert await status(http, sc, fresh) == 200
        client = aioredis.Redis(host="127.0.0.1", port=new, password=pw)
        assert await client.exists(f"sidecar:rl:{{tok:{row_id}}}:tok:{row_id}") == 1
        await client.aclose()
    assert await evalsha_calls(old) == before
    assert time.monotonic() - started < 15
    # Every request after the first 5 s was answered.
    assert all(c == 200 for c in seen[-len(tokens):])
    assert (await readyz(http, sc))["redis"] == "ok"

    async def logged() -> bool:
        # The watch asks the Sentinels every second; the pool may have moved first.
        return any(r.getMessage() == f"redis master moved (sentinel failover): now "
                   f"127.0.0.1:{new}" for r in caplog.records)

    await within(3.0, logged)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert pw not in text
    assert SENTINEL_PASSWORD not in text


# ---------------------------------------------------------------------------------------
# TLS
# ---------------------------------------------------------------------------------------

async def test_mutual_tls(
    make_sidecar: SidecarFactory, db: Db, upstream: Any, http: aiohttp.ClientSession,
    redis_tls: RedisTlsServer, caplog: pytest.LogCaptureFixture,
) -> None:
    await flush(redis_tls.port)
    d = redis_tls.dir
    token, _ = await db.add_token("app")
    sc = await make_sidecar(upstream_url=str(upstream.make_url("")), redis_url=redis_tls.tls_url,
                            redis_ca_file=str(d / "ca.pem"), redis_cert_file=str(d / "client.pem"),
                            redis_key_file=str(d / "client.key"))
    assert await status(http, sc, token) == 200
    assert await node_keys(redis_tls.port, "sidecar:tok:*")  # written over TLS
    assert (await readyz(http, sc))["redis"] == "ok"
    # Without a client certificate the server refuses the handshake: down, and said why.
    bare = await make_sidecar(upstream_url=str(upstream.make_url("")),
                              redis_url=redis_tls.tls_url, redis_ca_file=str(d / "ca.pem"))
    assert (await readyz(http, bare))["redis"] == "down"
    assert any("redis unavailable: ConnectionError" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------------------------
# ACL and errors that say why
# ---------------------------------------------------------------------------------------

async def test_documented_acl_is_enough(
    make_sidecar: SidecarFactory, db: Db, upstream: Any, http: aiohttp.ClientSession,
    own_redis: RedisServer, caplog: pytest.LogCaptureFixture,
) -> None:
    await asyncio.to_thread(redis_cli, own_redis.port, *documented_acl(ACL_PASSWORD))
    url = f"redis://sidecar:{ACL_PASSWORD}@127.0.0.1:{own_redis.port}/0"
    tenant = str(uuid.uuid4())
    tokens = [(await db.add_token("app", tenant_id=tenant))[0] for _ in range(2)]
    common = {"upstream_url": str(upstream.make_url("")), "redis_url": url,
              "rate_limit": "10000/m", "rate_limit_fail_open": False, "admin_token": ADMIN}
    a, b = await make_sidecar(**common), await make_sidecar(**common)
    await listening(a, b)  # SUBSCRIBE allowed
    for sc in (a, b):
        for token in tokens:
            assert await status(http, sc, token) == 200  # cache and rate limit
        assert (await readyz(http, sc))["redis"] == "ok"
    base = await db.lookup_count()
    assert base == 2  # b was answered from Redis
    async with http.post(a.ops_url("/admin/invalidate"), json={"tenant_id": tenant},
                         headers={"Authorization": f"Bearer {ADMIN}"}) as r:
        assert r.status == 200  # SMEMBERS, DEL, PUBLISH

    async def reread() -> bool:
        for sc in (a, b):
            for t in tokens:
                assert await status(http, sc, t) == 200
        return await db.lookup_count() == base + 2

    await within(2.0, reread)
    for sc in (a, b):
        assert sample(sc.app[METRICS], "sidecar_redis_circuit_open") == 0
        assert sample(sc.app[METRICS], "sidecar_redis_errors_total", {"op": "ratelimit"}) == 0



@pytest.mark.parametrize(("missing", "said"), [
    # Redis 7.0 words a refusal inside a script without NOPERM; later versions add it.
    ("+time", ("can't run this command", "NOPERM")),
    ("+evalsha", ("NoPermissionError: ", "NOPERM")),
])
async def test_acl_missing_a_command_reads_down_and_says_why(
    make_sidecar: SidecarFactory, db: Db, upstream: Any, http: aiohttp.ClientSession,
    own_redis: RedisServer, caplog: pytest.LogCaptureFixture, missing: str,
    said: tuple[str, str],
) -> None:
    rules = [r for r in documented_acl(ACL_PASSWORD) if r != missing]
    await asyncio.to_thread(redis_cli, own_redis.port, *rules)
    token, _ = await db.add_token("app")
    sc = await make_sidecar(upstream_url=str(upstream.make_url("")), rate_limit="100/m",
                            redis_url=f"redis://sidecar:{ACL_PASSWORD}@127.0.0.1:"
                                      f"{own_redis.port}/0")
    assert (await readyz(http, sc))["redis"] == "down"
    assert await status(http, sc, token) == 200  # fails open: Postgres and local limits
    lines = [r.getMessage() for r in caplog.records if r.name == "sidecar.redis"]
    assert any(x.startswith("redis unavailable: ") and any(s in x for s in said)
               for x in lines), lines


async def test_wrong_password_is_logged_with_the_driver_message_not_the_password(
    make_sidecar: SidecarFactory, db: Db, upstream: Any, http: aiohttp.ClientSession,
    own_redis: RedisServer, caplog: pytest.LogCaptureFixture,
) -> None:
    await asyncio.to_thread(redis_cli, own_redis.port, *documented_acl(ACL_PASSWORD))
    wrong = "wrong-pw-5ee1b0"
    token, _ = await db.add_token("app")
    sc = await make_sidecar(upstream_url=str(upstream.make_url("")),
                            redis_url=f"redis://sidecar:{wrong}@127.0.0.1:{own_redis.port}/0")
    assert await status(http, sc, token) == 200  # Postgres answers
    assert (await readyz(http, sc))["redis"] == "down"
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "AuthenticationError" in text, text
    assert "invalid username-password pair" in text
    assert wrong not in text
    assert ACL_PASSWORD not in text


async def test_read_only_redis_reads_down(
    make_sidecar: SidecarFactory, db: Db, upstream: Any, http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A replica (of a master that does not exist) answers PING but refuses every write.
    replica = RedisServer(extra=["replicaof 127.0.0.1 1"])
    await asyncio.to_thread(replica.start)
    try:
        token, _ = await db.add_token("app")
        sc = await make_sidecar(upstream_url=str(upstream.make_url("")), redis_url=replica.url)
        assert await status(http, sc, token) == 200
        assert (await readyz(http, sc))["redis"] == "down"
        lines = [r.getMessage() for r in caplog.records if r.name == "sidecar.redis"]
        assert any("ReadOnlyError: You can't write against a read only replica" in x
                   for x in lines), lines
    finally:
        await asyncio.to_thread(replica.destroy)


# ---------------------------------------------------------------------------------------
# Malformed URLs
# ---------------------------------------------------------------------------------------

SECRET = "Zq9-secret-Xv"


@pytest.mark.parametrize("url", [
    f"redis://:pa/{SECRET}@127.0.0.1:6379/0",  # unencoded / in the password
    f"redis://user:p@{SECRET}@127.0.0.1:6379/0",  # unencoded @
    f"redis://:{SECRET}@h1:6379,h2:6379/0",  # several hosts
    f"redis://:{SECRET}@127.0.0.1:99999/0",  # bad port
    f"redis://user:{SECRET}:x@127.0.0.1/0#{SECRET}",  # unencoded # (and :)
    f"redis://:{SECRET}@127.0.0.1:6379/0?socket_timeout={SECRET}",
])
@pytest.mark.parametrize("command", ["check-config", "serve"])
async def test_malformed_redis_url_is_one_named_line(url: str, command: str) -> None:
    dsn = f"postgresql://sidecar:{PG_PASSWORD}@127.0.0.1:1/sidecar"
    res = await asyncio.to_thread(run_cli, command, env={
        "SIDECAR_DATABASE_URL": dsn, "SIDECAR_REDIS_URL": url,
        "SIDECAR_LISTEN": "127.0.0.1:0", "SIDECAR_OPS_LISTEN": "127.0.0.1:0"})
    out = res.stdout + res.stderr
    assert res.returncode != 0
    assert "Traceback" not in out
    problems = [x for x in res.stderr.splitlines() if x.startswith("  ")]
    assert len(problems) == 1, out
    assert problems[0].strip().startswith("SIDECAR_REDIS_URL:"), out
    for part in (SECRET, "pa/", PG_PASSWORD):
        assert part not in out


def test_serve_with_good_url_still_starts_checks() -> None:
    # A valid multi-setting configuration passes check-config (the URL checks are not
    # refusing ordinary URLs): user, encoded password, database and query options.
    res = run_cli("check-config", env={
        "SIDECAR_DATABASE_URL": "postgresql://u@127.0.0.1:1/d",
        "SIDECAR_REDIS_URL": "redis://user:p%40ss%2Fw@redis.internal:6380/2?socket_timeout=1"})
    assert res.returncode == 0, res.stderr
    assert "p%40ss" not in res.stdout



async def test_unreachable_cluster_reads_as_no_redis_never_an_error() -> None:
    # The cluster client's own failures (no node answers) are not RedisErrors: they must still
    # read as "Redis could not answer" (a cache miss, a probe that says no), never escape.
    metrics = Metrics(CollectorRegistry(), multiprocess_dir=None, scopes=frozenset({"app"}))
    guarded = GuardedRedis(connect(f"redis://127.0.0.1:{free_port()}/0", 0.5,
                                   Topology(mode="cluster")), metrics)
    try:
        assert await RedisCache(guarded).get("0" * 64) is None
        assert not await guarded.probe()
        assert sample(metrics, "sidecar_redis_errors_total", {"op": "get"}) == 1
    finally:
        await guarded.aclose()
