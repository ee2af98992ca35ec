"""The shipped `deploy/caddy` and `deploy/haproxy` configurations, run by the real Caddy and
HAProxy, in front of the real upstream app, asking a real sidecar in decision-only mode
(SPEC 5, 7, 14).

Each proxy runs once per module on the shipped file, unchanged: the file reads its addresses
from the environment. It is pointed at two ports fixed for the module; every test starts the
sidecar (or a stub decision service) and the upstream on them, with the settings it needs.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from sidecar.app import FORWARDER
from sidecar.errors import MSG_INVALID, MSG_MISSING
from sidecar.headers import IDENTITY_HEADERS, canonical, is_identity
from tests.conftest import ROOT, Db, unavailable
from tests.functional.test_decision import DIFY_ROUTES, TENANT, bearer
from tests.helpers import RawResponse, raw_request
from tests.servers import CaddyServer, HAProxyServer, ServerUnavailable, free_port
from tests.upstream import CALLS, make_upstream

APP = "44444444-4444-4444-4444-444444444444"
CADDYFILE = ROOT / "deploy" / "caddy" / "Caddyfile"
HAPROXY_CFG = ROOT / "deploy" / "haproxy" / "haproxy.cfg"

# Every character but a letter or digit that may appear in a header name (an RFC 9110 token):
# proxy mode reads each as "-" (sidecar.headers rule 1), and so do CGI/WSGI/PHP servers.
SEPARATORS = "".join(c for c in "!#$%&'*+-.^_`|~" if not c.isalnum())


def spellings() -> list[str]:
    """Each identity header written with each separator, in changing letter case."""
    out = []
    for name in IDENTITY_HEADERS:
        for i, sep in enumerate(SEPARATORS):
            spelled = name.replace("-", sep)
            out.append(spelled.upper() if i % 3 == 0 else spelled.lower() if i % 3 == 1
                       else spelled)
    out += ["X-Api_Token-Scope", "x-tenant.id", "X~App-Id", "x_api-token_id"]
    assert all(is_identity(n) for n in out)  # the rule the sidecar applies in proxy mode
    return out


FORGED = [(name, f"evil-{i}") for i, name in enumerate(spellings())]
# Names that are not identity headers must pass: a proxy that dropped everything would
# pass the checks above too.
KEPT = [("X-Tenant-Name", "kept-1"), ("X-Api-Token-Idx", "kept-2"), ("X-Custom", "kept-3")]


@dataclass(frozen=True)
class Ports:
    sidecar: int
    upstream: int


@dataclass
class Front:
    kind: str
    port: int

    async def request(self, method: str, target: str,
                      headers: list[tuple[str, str]] | None = None,
                      body: bytes = b"") -> RawResponse:
        return await raw_request(self.port, method, target, headers or [], body=body)


@pytest.fixture(scope="module")
def ports() -> Ports:
    return Ports(free_port(), free_port())


def _start(kind: str, ports: Ports) -> CaddyServer | HAProxyServer:
    port = free_port()
    addresses = {"SIDECAR_ADDR": f"127.0.0.1:{ports.sidecar}",
                 "UPSTREAM_ADDR": f"127.0.0.1:{ports.upstream}"}
    server: CaddyServer | HAProxyServer
    if kind == "caddy":
        server = CaddyServer(CADDYFILE, {**addresses, "CADDY_PORT": str(port),
                                         "CADDY_ADMIN": "off"}, port=port)
    else:
        server = HAProxyServer(HAPROXY_CFG, {**addresses, "HAPROXY_BIND": f"127.0.0.1:{port}"},
                               port=port)
    server.start()
    return server


@pytest.fixture(scope="module", params=["caddy", "haproxy"])
def front(request: pytest.FixtureRequest, ports: Ports) -> Iterator[Front]:
    kind: str = request.param
    try:
        server = _start(kind, ports)
    except ServerUnavailable as exc:
        unavailable(str(exc))
        raise
    try:
        yield Front(kind, server.port)
    finally:
        server.destroy()


@pytest.fixture
async def upstream(ports: Ports) -> AsyncIterator[TestServer]:
    server = TestServer(make_upstream(), host="127.0.0.1", port=ports.upstream)
    await server.start_server()
    yield server
    await server.close()


Start = Callable[..., Awaitable[None]]


@pytest.fixture
async def decision(db: Db, ports: Ports) -> AsyncIterator[Start]:
    """Starts the sidecar (decision-only, Dify routes, `GET /public` public) on the module's
    sidecar port, with settings overrides as keyword args."""
    from sidecar.app import create_app
    from sidecar.settings import load_settings

    servers: list[TestServer] = []

    async def start(**overrides: Any) -> None:
        overrides.setdefault("database_url", db.dsn)
        overrides.setdefault("scope_routes", DIFY_ROUTES)
        overrides.setdefault("public_routes", "GET /public")
        app = create_app(load_settings(**overrides))
        assert FORWARDER not in app
        server = TestServer(app, host="127.0.0.1", port=ports.sidecar)
        await server.start_server()
        servers.append(server)

    yield start
    for server in servers:
        await server.close()


@pytest.fixture
async def stub_decision(ports: Ports) -> AsyncIterator[Callable[..., Awaitable[None]]]:
    """A decision service with a fixed answer: what the real sidecar says only under load."""
    servers: list[TestServer] = []

    async def start(status: int, headers: dict[str, str], body: bytes) -> None:
        async def handler(_: web.Request) -> web.Response:
            return web.Response(status=status, headers=headers, body=body,
                                content_type="application/json")

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handler)
        server = TestServer(app, host="127.0.0.1", port=ports.sidecar)
        await server.start_server()
        servers.append(server)

    yield start
    for server in servers:
        await server.close()


def seen_by_upstream(resp: RawResponse) -> list[tuple[str, str]]:
    """The headers the upstream echo got from the proxy."""
    assert resp.status == 200, resp.body[:300]
    assert resp.headers.get("X-Upstream") == "echo", resp.body[:300]
    doc: dict[str, Any] = orjson.loads(resp.body)
    return [(k, v) for k, v in doc["headers"]]


def identity_seen(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Every header some server could read as an identity header, name in canonical form."""
    return sorted((canonical(k), v) for k, v in headers if is_identity(k))


def kept(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    names = {k.lower() for k, _ in KEPT}
    return sorted((k.lower(), v) for k, v in headers if k.lower() in names)


# --- allowed ------------------------------------------------------------------------------

async def test_valid_token_reaches_upstream_with_only_the_decided_identity(
    front: Front, decision: Start, upstream: TestServer, db: Db
) -> None:
    await decision()
    token, token_id = await db.add_token("app", tenant_id=TENANT, app_id=APP)
    resp = await front.request("POST", "/v1/chat-messages?x=1", [
        *FORGED, *KEPT, bearer(token), ("Content-Type", "application/json"),
        ("Content-Length", "2")], body=b"{}")
    headers = seen_by_upstream(resp)
    assert identity_seen(headers) == sorted([
        ("x-tenant-id", TENANT), ("x-app-id", APP), ("x-api-token-id", token_id),
        ("x-api-token-scope", "app")])
    assert kept(headers) == sorted((k.lower(), v) for k, v in KEPT)
    doc = orjson.loads(resp.body)
    assert (doc["method"], doc["raw_path"], doc["body_size"]) == (
        "POST", "/v1/chat-messages?x=1", 2)
    low = [(k.lower(), v) for k, v in headers]
    assert ("authorization", f"Bearer {token}") in low
    assert ("x-forwarded-host", f"127.0.0.1:{front.port}") in low
    assert len([v for k, v in low if k == "x-request-id" and v]) == 1  # the proxy's own
    assert upstream.app[CALLS] == ["/v1/chat-messages"]


async def test_dataset_token_has_an_empty_app_id_and_its_own_routes(
    front: Front, decision: Start, upstream: TestServer, db: Db
) -> None:
    await decision()
    token, token_id = await db.add_token("dataset", tenant_id=TENANT)
    resp = await front.request("GET", "/v1/datasets/ds-1/documents",
                               [*FORGED, bearer(token), ("X-Request-Id", "req-of-client")])
    headers = seen_by_upstream(resp)
    assert [v for k, v in headers if k.lower() == "x-request-id"] == ["req-of-client"]
    assert identity_seen(headers) == sorted([
        ("x-tenant-id", TENANT), ("x-app-id", ""), ("x-api-token-id", token_id),
        ("x-api-token-scope", "dataset")])
    # The wrong scope for the route: refused like an unknown token.
    resp = await front.request("POST", "/v1/chat-messages", [*FORGED, bearer(token)])
    assert resp.status == 401
    assert resp.headers["WWW-Authenticate"] == 'Bearer realm="api"'
    assert orjson.loads(resp.body)["message"] == MSG_INVALID
    assert upstream.app[CALLS] == ["/v1/datasets/ds-1/documents"]


# --- denied -------------------------------------------------------------------------------

async def test_refusals_carry_the_sidecar_status_challenge_and_body(
    front: Front, decision: Start, upstream: TestServer, db: Db
) -> None:
    await decision()
    token, _ = await db.add_token("app", tenant_id=TENANT, app_id=APP)
    cases = [([bearer("app-not-a-token")], MSG_INVALID), ([], MSG_MISSING),
             # Two Authorization headers are refused even when one is valid (SPEC 3.1): the
             # proxy must hand both to the sidecar, not pick one.
             ([bearer(token), bearer("app-not-a-token")], MSG_MISSING)]
    for headers, message in cases:
        resp = await front.request("GET", "/v1/chat-messages", [*FORGED, *headers])
        assert resp.status == 401, headers
        assert resp.headers.getall("WWW-Authenticate") == ['Bearer realm="api"']
        assert resp.headers["Content-Type"].startswith("application/json")
        assert orjson.loads(resp.body) == {
            "code": "unauthorized", "message": message, "status": 401}
        assert identity_seen(list(resp.headers.items())) == []
    assert upstream.app[CALLS] == []


# --- public routes ------------------------------------------------------------------------

async def test_public_route_passes_without_any_identity(
    front: Front, decision: Start, upstream: TestServer, db: Db
) -> None:
    await decision()
    resp = await front.request("GET", "/public/logo.png", [*FORGED, *KEPT])
    headers = seen_by_upstream(resp)
    assert identity_seen(headers) == []
    assert kept(headers) == sorted((k.lower(), v) for k, v in KEPT)
    # No literal template text either (Caddy 2.6 copies absent headers as "{http....}").
    assert not [(k, v) for k, v in headers if "{" in v or "{" in k]
    # Public for GET only.
    resp = await front.request("POST", "/public/logo.png", [("Content-Length", "0")])
    assert resp.status == 401
    assert upstream.app[CALLS] == ["/public/logo.png"]


# --- the sidecar cannot decide --------------------------------------------------------------

async def test_postgres_down_is_503_with_retry_after(
    front: Front, decision: Start, upstream: TestServer
) -> None:
    await decision(database_url=f"postgresql://sidecar:pw@127.0.0.1:{free_port()}/sidecar",
                   database_timeout=0.5)
    resp = await front.request("GET", "/v1/chat-messages", [*FORGED, bearer("app-x")])
    assert resp.status == 503
    assert orjson.loads(resp.body)["code"] == "auth_unavailable"
    assert resp.headers["Retry-After"] == "1"
    assert upstream.app[CALLS] == []


async def test_sidecar_unreachable_fails_closed(front: Front, upstream: TestServer) -> None:
    resp = await front.request("GET", "/public/logo.png", [bearer("app-x")])
    # HAProxy's script answers 503 auth_unavailable; Caddy's forward_auth answers 502, as
    # for any unreachable backend.
    assert resp.status == (503 if front.kind == "haproxy" else 502)
    if front.kind == "haproxy":
        assert orjson.loads(resp.body)["code"] == "auth_unavailable"
    assert upstream.app[CALLS] == []


async def test_rate_limited_decision_is_429_with_its_headers(
    front: Front, stub_decision: Callable[..., Awaitable[None]], upstream: TestServer
) -> None:
    body = b'{"code": "too_many_requests", "message": "Too many requests", "status": 429}'
    await stub_decision(429, {"Retry-After": "7", "RateLimit-Limit": "100",
                              "RateLimit-Remaining": "0", "RateLimit-Reset": "7"}, body)
    resp = await front.request("GET", "/v1/chat-messages", [bearer("app-x")])
    assert resp.status == 429
    assert resp.body == body
    for name, value in (("Retry-After", "7"), ("RateLimit-Limit", "100"),
                        ("RateLimit-Remaining", "0"), ("RateLimit-Reset", "7")):
        assert resp.headers[name] == value
    assert upstream.app[CALLS] == []


# --- the shipped files ----------------------------------------------------------------------

def test_the_files_read_their_addresses_from_the_environment() -> None:
    """The tests fill nothing in: what runs here is the file a user copies."""
    assert "${SIDECAR_ADDR}" in HAPROXY_CFG.read_text()
    assert "{$SIDECAR_ADDR}" in CADDYFILE.read_text()
