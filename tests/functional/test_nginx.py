"""The shipped `deploy/nginx` configuration, run by the real nginx, in front of the real
upstream app, asking a real sidecar in decision-only mode (SPEC 7, 14).

The template is rendered the way its header says (only the three ${...} placeholders are
replaced) and used unchanged, so what passes here is what a user copies.
"""

from __future__ import annotations

import re
import string
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer

from sidecar.app import FORWARDER
from sidecar.errors import MSG_INVALID, MSG_MISSING, MSG_SCHEME
from tests.conftest import ROOT, Db, Sidecar, SidecarFactory
from tests.functional.test_decision import (
    AMBIGUOUS_SPELLINGS,
    DATASET_SPELLINGS,
    DIFY_ROUTES,
    TENANT,
    bearer,
)
from tests.helpers import IDENTITY, RawResponse, raw_request
from tests.servers import NginxServer, ServerUnavailable, free_port
from tests.upstream import CALLS

TEMPLATE = ROOT / "deploy" / "nginx" / "sidecar.conf.template"
COMPOSE = ROOT / "deploy" / "compose" / "docker-compose.yml"
APP = "33333333-3333-3333-3333-333333333333"


def render(nginx_port: int, sidecar_port: int, upstream_port: int) -> str:
    text = TEMPLATE.read_text()
    rendered = string.Template(text).safe_substitute(
        NGINX_PORT=str(nginx_port),
        SIDECAR_ADDR=f"127.0.0.1:{sidecar_port}",
        UPSTREAM_ADDR=f"127.0.0.1:{upstream_port}",
    )
    live = [line for line in rendered.splitlines() if not line.lstrip().startswith("#")]
    assert not [line for line in live if "${" in line], "a placeholder the test does not fill"
    return rendered


class Front:
    """nginx on `port`, configured by the shipped template."""

    def __init__(self, server: NginxServer, port: int) -> None:
        self.server = server
        self.port = port

    async def request(self, method: str, target: str,
                      headers: list[tuple[str, str]] | None = None,
                      body: bytes = b"") -> RawResponse:
        return await raw_request(self.port, method, target, headers or [], body=body)

    def error_log(self) -> str:
        path = Path(self.server.dir) / "error.log"
        return path.read_text() if path.exists() else ""


StartFront = Callable[[int | None, int | None], Front]


@pytest.fixture
def start_front() -> Iterator[StartFront]:
    started: list[NginxServer] = []

    def start(sidecar_port: int | None, upstream_port: int | None) -> Front:
        assert sidecar_port is not None
        assert upstream_port is not None
        port = free_port()
        try:
            server = NginxServer(render(port, sidecar_port, upstream_port))
        except ServerUnavailable as exc:
            pytest.skip(str(exc))
        started.append(server)
        server.start(port)
        return Front(server, port)

    yield start
    for server in started:
        server.destroy()


@pytest.fixture
async def front(make_sidecar: SidecarFactory, upstream: TestServer,
                start_front: StartFront) -> Front:
    sc: Sidecar = await make_sidecar(scope_routes=DIFY_ROUTES, public_routes="GET /public")
    assert FORWARDER not in sc.app  # decision-only mode
    return start_front(sc.main.port, upstream.port)


def seen_by_upstream(resp: RawResponse) -> dict[str, Any]:
    """The upstream echo's view of the request nginx forwarded."""
    assert resp.headers.get("X-Upstream") == "echo", resp.body[:300]
    doc: dict[str, Any] = orjson.loads(resp.body)
    return doc


def identity_seen(doc: dict[str, Any]) -> list[tuple[str, str]]:
    """Every header the upstream got that some server could read as an identity header."""
    canonical = {h.lower() for h in IDENTITY}
    return [(k, v) for k, v in doc["headers"]
            if re.sub(r"[^0-9a-z]", "-", k.lower()) in canonical]


async def test_valid_token_reaches_upstream_with_identity_from_the_decision(
    front: Front, db: Db
) -> None:
    token, token_id = await db.add_token("app", tenant_id=TENANT, app_id=APP)
    resp = await front.request("POST", "/v1/chat-messages?x=1", [
        bearer(token), ("Content-Type", "application/json"), ("Content-Length", "2")],
        body=b"{}")
    assert resp.status == 200
    doc = seen_by_upstream(resp)
    assert doc["method"] == "POST"
    assert doc["raw_path"] == "/v1/chat-messages?x=1"
    assert sorted(identity_seen(doc)) == sorted([
        ("X-Tenant-Id", TENANT), ("X-App-Id", APP), ("X-Api-Token-Id", token_id),
        ("X-Api-Token-Scope", "app"),
    ])
    # Dify-style upstreams check the token themselves: Authorization goes through.
    assert ("Authorization", f"Bearer {token}") in [tuple(h) for h in doc["headers"]]
    seen = {k.lower(): v for k, v in doc["headers"]}
    assert seen["x-forwarded-host"] == f"127.0.0.1:{front.port}"
    assert re.fullmatch(r"[0-9a-f]{32}", seen["x-request-id"])  # nginx's own $request_id


async def test_request_id_of_the_client_reaches_upstream(front: Front, db: Db) -> None:
    token, _ = await db.add_token("app", tenant_id=TENANT, app_id=APP)
    resp = await front.request("GET", "/v1/chat-messages",
                               [bearer(token), ("X-Request-Id", "req-from-client-1")])
    assert resp.status == 200
    ids = [v for k, v in seen_by_upstream(resp)["headers"] if k.lower() == "x-request-id"]
    assert ids == ["req-from-client-1"]


async def test_refusals_have_the_sidecar_status_body_and_challenge(
    front: Front, db: Db, upstream: TestServer
) -> None:
    cases = [
        ([bearer("app-not-a-token")], MSG_INVALID),
        ([], MSG_MISSING),
        ([("Authorization", "Bearer")], MSG_MISSING),
        ([("Authorization", "Basic dXNlcjpwYXNz")], MSG_SCHEME),
    ]
    for headers, message in cases:
        resp = await front.request("GET", "/v1/chat-messages", headers)
        assert resp.status == 401, headers
        assert resp.headers.getall("WWW-Authenticate") == ['Bearer realm="api"'], headers
        assert resp.headers["Content-Type"].startswith("application/json")
        assert orjson.loads(resp.body) == {
            "code": "unauthorized", "message": message, "status": 401}, headers
    assert upstream.app[CALLS] == []


async def test_client_identity_headers_never_reach_upstream(front: Front, db: Db) -> None:
    token, token_id = await db.add_token("dataset", tenant_id=TENANT)
    forged = [("X-Tenant-Id", "evil-1"), ("x-tenant-id", "evil-2"), ("X_Tenant_Id", "evil-3"),
              ("X-APP-ID", "evil-4"), ("x_api_token_id", "evil-5"),
              ("X-Api-Token-Scope", "evil-6"), ("X-Api_Token-Scope", "evil-7"),
              # CGI/WSGI/PHP read any punctuation as "_", so these alias the "-" names too.
              ("X.Tenant.Id", "evil-8"), ("X~App~Id", "evil-9")]
    # Allowed: only the decision's values arrive, once each. nginx sends no header for an
    # empty value, so a token without an app id arrives without X-App-Id.
    resp = await front.request("GET", "/v1/datasets/ds-1", [*forged, bearer(token)])
    assert resp.status == 200
    assert sorted(identity_seen(seen_by_upstream(resp))) == sorted([
        ("X-Tenant-Id", TENANT), ("X-Api-Token-Id", token_id), ("X-Api-Token-Scope", "dataset"),
    ])
    # Public route: the decision carries no identity, and none of the client's arrives either.
    resp = await front.request("GET", "/public/logo.png", forged)
    assert resp.status == 200
    assert identity_seen(seen_by_upstream(resp)) == []


async def test_dataset_token_follows_dify_scope_routes(
    front: Front, db: Db, upstream: TestServer
) -> None:
    token, _ = await db.add_token("dataset", tenant_id=TENANT)
    ok = await front.request("GET", "/v1/datasets/ds-1/documents", [bearer(token)])
    assert ok.status == 200
    assert seen_by_upstream(ok)["path"] == "/v1/datasets/ds-1/documents"
    models = await front.request("GET", "/v1/workspaces/current/models/model-types/llm",
                                 [bearer(token)])
    assert models.status == 200
    refused = await front.request("POST", "/v1/chat-messages", [bearer(token)])
    assert refused.status == 401
    assert orjson.loads(refused.body)["message"] == MSG_INVALID
    assert upstream.app[CALLS] == ["/v1/datasets/ds-1/documents",
                                     "/v1/workspaces/current/models/model-types/llm"]


async def test_public_route_is_public_for_its_method_only(front: Front) -> None:
    # The method the decision uses is the client's (X-Original-Method), not the subrequest's.
    assert (await front.request("GET", "/public/logo.png")).status == 200
    assert (await front.request("POST", "/public/logo.png", [("Content-Length", "0")])
            ).status == 401


async def test_path_tricks_through_nginx(front: Front, db: Db) -> None:
    # nginx passes the client's bytes ($request_uri) both to the decision and to the API.
    app, _ = await db.add_token("app", tenant_id=TENANT)
    dataset, _ = await db.add_token("dataset", tenant_id=TENANT)
    for target in DATASET_SPELLINGS:
        if target.startswith("/x/.."):
            continue  # nginx itself refuses `..` above the root (400)
        resp = await front.request("GET", target, [bearer(dataset)])
        assert resp.status == 200, target
        assert seen_by_upstream(resp)["raw_path"] == target
        resp = await front.request("GET", target, [bearer(app)])
        assert resp.status == 401, target
    resp = await front.request("GET", "/v1/datasets/%2e%2e/chat-messages", [bearer(app)])
    assert resp.status == 200
    for target in AMBIGUOUS_SPELLINGS:
        for token in (app, dataset):
            assert (await front.request("GET", target, [bearer(token)])).status == 401, target


async def test_direct_requests_to_the_auth_location_are_refused(front: Front, db: Db) -> None:
    token, _ = await db.add_token("app", tenant_id=TENANT)
    resp = await front.request("GET", "/_sidecar/auth", [bearer(token)])
    assert resp.status == 404
    assert identity_seen({"headers": list(resp.headers.items())}) == []


# --- what nginx makes of 429 and 503 ---------------------------------------------------

async def test_sidecar_down_is_503(
    make_sidecar: SidecarFactory, upstream: TestServer, start_front: StartFront
) -> None:
    front = start_front(free_port(), upstream.port)  # nothing listens there
    resp = await front.request("GET", "/v1/chat-messages", [bearer("app-x")])
    assert resp.status == 503
    assert orjson.loads(resp.body)["code"] == "auth_unavailable"
    assert upstream.app[CALLS] == []


async def test_postgres_down_is_503_with_retry_after(
    make_sidecar: SidecarFactory, upstream: TestServer, start_front: StartFront
) -> None:
    dead = f"postgresql://sidecar:pw@127.0.0.1:{free_port()}/sidecar"
    sc = await make_sidecar(database_url=dead, database_timeout=0.5)
    front = start_front(sc.main.port, upstream.port)
    resp = await front.request("GET", "/v1/chat-messages", [bearer("app-x")])
    assert resp.status == 503
    assert orjson.loads(resp.body)["code"] == "auth_unavailable"
    assert resp.headers["Retry-After"] == "1"
    assert upstream.app[CALLS] == []


@pytest.fixture
async def stub_decision() -> AsyncIterator[Callable[..., Awaitable[TestServer]]]:
    """A decision service answering with a fixed status and headers: shows what the shipped
    config does with answers the real sidecar gives only under load (429)."""
    servers: list[TestServer] = []

    async def start(status: int, headers: dict[str, str]) -> TestServer:
        async def handler(_: web.Request) -> web.Response:
            return web.Response(status=status, headers=headers, body=b'{"stub": true}',
                                content_type="application/json")

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handler)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.close()


async def test_rate_limited_decision_is_429_with_its_headers(
    stub_decision: Callable[..., Awaitable[TestServer]], upstream: TestServer,
    start_front: StartFront,
) -> None:
    stub = await stub_decision(429, {"Retry-After": "7", "RateLimit-Limit": "100",
                                     "RateLimit-Remaining": "0", "RateLimit-Reset": "7"})
    front = start_front(stub.port, upstream.port)
    resp = await front.request("GET", "/v1/chat-messages", [bearer("app-x")])
    assert resp.status == 429
    assert orjson.loads(resp.body)["code"] == "too_many_requests"
    assert resp.headers["Retry-After"] == "7"
    assert resp.headers["RateLimit-Limit"] == "100"
    assert resp.headers["RateLimit-Remaining"] == "0"
    assert resp.headers["RateLimit-Reset"] == "7"
    assert upstream.app[CALLS] == []
    assert "auth request unexpected status: 429" in front.error_log()


async def test_unavailable_decision_without_retry_after(
    stub_decision: Callable[..., Awaitable[TestServer]], upstream: TestServer,
    start_front: StartFront,
) -> None:
    stub = await stub_decision(503, {})
    front = start_front(stub.port, upstream.port)
    resp = await front.request("GET", "/v1/chat-messages")
    assert resp.status == 503
    assert orjson.loads(resp.body)["code"] == "auth_unavailable"
    assert "Retry-After" not in resp.headers  # an empty add_header adds nothing
    assert upstream.app[CALLS] == []


async def test_escaped_slash_dot_segments_do_not_open_a_protected_route(
    make_sidecar: SidecarFactory, upstream: TestServer, start_front: StartFront
) -> None:
    sc = await make_sidecar(scope_routes=DIFY_ROUTES, public_routes="/public")
    front = start_front(sc.main.port, upstream.port)
    resp = await front.request("GET", "/v1/datasets/x%2F..%2F..%2F..%2Fpublic/y")
    # The upstream routes this under /v1/datasets/ (aiohttp: `/v1/datasets/{id}/y`, id
    # "x/../../../public"); the decision must not have let it through without a token.
    assert resp.status == 401
    assert upstream.app[CALLS] == []


# --- deploy/compose runs this same template -------------------------------------------

def envsubst(text: str, env: dict[str, str]) -> str:
    """GNU envsubst with a variable list: `$NAME` and `${NAME}` of the listed names only."""
    names = "|".join(re.escape(n) for n in env)
    return re.sub(r"\$(?:\{(" + names + r")\}|(" + names + r")(?![A-Za-z0-9_]))",
                  lambda m: env[m.group(1) or m.group(2)], text)


def test_compose_nginx_is_the_template_with_the_compose_values() -> None:
    """The compose nginx mounts the template where the official image renders it at start,
    and its environment fills exactly the template's placeholders: what the tests above run
    is what compose runs, with other addresses."""
    service = yaml.safe_load(COMPOSE.read_text())["services"]["nginx"]
    mounts = [v.rsplit(":", 1)[0] if v.endswith(":ro") else v for v in service["volumes"]]
    templates = [(src, dst) for src, dst in (m.split(":", 1) for m in mounts)
                 if dst.startswith("/etc/nginx/templates/")]
    assert len(templates) == 1, mounts
    src, dst = templates[0]
    assert (COMPOSE.parent / src).resolve() == TEMPLATE.resolve()
    assert dst.endswith(".conf.template")  # rendered to /etc/nginx/conf.d/*.conf
    assert not [m for m in mounts if ":/etc/nginx/conf.d" in m]  # nothing to drift from

    env = {k: str(v) for k, v in service["environment"].items()}
    # Compose turns `$$` into `$`; the image's entrypoint renders only the names the
    # filter matches (awk regex), and nginx's own $variables must not be among them.
    name_filter = re.compile(env.pop("NGINX_ENVSUBST_FILTER").replace("$$", "$"))
    placeholders = set(re.findall(r"\$\{([A-Z_]+)\}", TEMPLATE.read_text()))
    assert set(env) == placeholders
    assert all(name_filter.search(n) for n in placeholders)
    assert not [v for v in re.findall(r"\$([A-Za-z_]+)", TEMPLATE.read_text())
                if name_filter.search(v) and v not in placeholders]

    rendered = envsubst(TEMPLATE.read_text(), env)
    sidecar, upstream = env["SIDECAR_ADDR"], env["UPSTREAM_ADDR"]
    assert f"server {sidecar};" in rendered
    assert f"server {upstream};" in rendered
    assert f"listen {env['NGINX_PORT']};" in rendered
    # The same text the tests render, only the addresses differ.
    ours = render(8000, 1, 2).replace("listen 8000;", f"listen {env['NGINX_PORT']};")
    ours = ours.replace("127.0.0.1:1;", f"{sidecar};").replace("127.0.0.1:2;", f"{upstream};")
    assert rendered == ours
