"""The request path's own decisions, independent of the mode (proxy or decision)."""

from __future__ import annotations

import io
from typing import Any

import aiohttp
import orjson
from aiohttp.test_utils import TestServer

from sidecar.app import LAST_USED, METRICS, create_app
from sidecar.logs import AccessLog, access_logger_class
from sidecar.settings import load_settings
from tests.conftest import Db, SidecarFactory


async def test_path_no_scope_route_covers_is_refused_without_a_lookup(
    make_sidecar: SidecarFactory, db: Db, upstream: Any
) -> None:
    token, _ = await db.add_token("app")
    sc = await make_sidecar(upstream_url=str(upstream.make_url("")), scope_routes="/v1=app")
    async with aiohttp.ClientSession() as http:
        async with http.get(sc.url("/v1/x"), headers={"Authorization": f"Bearer {token}"}) as r:
            assert r.status == 200
        async with http.get(sc.url("/admin"), headers={"Authorization": f"Bearer {token}"}) as r:
            assert r.status == 401
    assert await db.lookup_count() == 1  # only the /v1 request asked Postgres


async def test_decision_access_log_names_the_judged_path(db: Db) -> None:
    token, _ = await db.add_token("app")
    app = create_app(load_settings(database_url=db.dsn))
    out = io.BytesIO()
    access_log = AccessLog(out)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server(access_log_class=access_logger_class(access_log))
    try:
        async with aiohttp.ClientSession() as http, http.get(
                server.make_url("/_sidecar/auth"),
                headers={"Authorization": f"Bearer {token}",
                         "X-Original-URI": "/v1/chat?x=1"}) as r:
            assert r.status == 200
    finally:
        await server.close()
        access_log.close()
    fields = [orjson.loads(line) for line in out.getvalue().splitlines()]
    assert [f["msg"] for f in fields] == ["access"]
    assert fields[0]["path"] == "/_sidecar/auth"
    assert fields[0]["judged_path"] == "/v1/chat"
    assert fields[0]["outcome"] == "allowed"
    assert token.encode() not in out.getvalue()


async def test_last_used_goes_to_the_configured_table_or_nowhere(
    make_sidecar: SidecarFactory, db: Db, upstream: Any
) -> None:
    await db.conn.execute(
        "DROP TABLE IF EXISTS keys_elsewhere;"
        "CREATE TABLE keys_elsewhere (id uuid PRIMARY KEY DEFAULT gen_random_uuid(),"
        " tenant_id uuid, app_id uuid, type varchar(16) NOT NULL, token text NOT NULL,"
        " last_used_at timestamp)")
    try:
        row_id = await db.conn.fetchval(
            "INSERT INTO keys_elsewhere (type, token) VALUES ('app', 'elsewhere-token')"
            " RETURNING id::text")
        lookup = ("SELECT id, tenant_id, app_id, type FROM keys_elsewhere"
                  " WHERE token = $1 AND type = $2")
        for table, written in (("", False), ("keys_elsewhere", True)):
            sc = await make_sidecar(upstream_url=str(upstream.make_url("")),
                                    token_lookup_sql=lookup, last_used_table=table)
            async with aiohttp.ClientSession() as http, http.get(
                    sc.url("/a"), headers={"Authorization": "Bearer elsewhere-token"}) as r:
                assert r.status == 200
            main = sc.app
            await main[LAST_USED].flush()
            assert main[METRICS].last_used_flush_errors._value.get() == 0
            stored = await db.conn.fetchval(
                "SELECT last_used_at FROM keys_elsewhere WHERE id = $1::uuid", row_id)
            assert (stored is not None) is written, table
    finally:
        await db.conn.execute("DROP TABLE keys_elsewhere")
