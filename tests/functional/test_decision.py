"""The decision endpoint `/_sidecar/auth` (SPEC 7) on a real sidecar, Postgres and socket.

Requests are written byte for byte (`raw_request`), as nginx, Traefik and Envoy send them, so
no client library normalises a path or a header name on the way. Cases are tables run against
every proxy style: the same question must get the same answer however it is asked.
"""

from __future__ import annotations

import asyncio
import logging

import pytest
from aiohttp.test_utils import TestServer

from sidecar.app import METRICS
from sidecar.errors import MSG_INVALID, MSG_MISSING
from tests.conftest import Db, Sidecar, SidecarFactory
from tests.helpers import Headers, RawResponse, raw_request, sample
from tests.servers import free_port
from tests.upstream import CALLS

DIFY_ROUTES = "/v1/datasets=dataset,/v1/workspaces/current/models=dataset,/=app"
TENANT = "11111111-1111-1111-1111-111111111111"
APP = "22222222-2222-2222-2222-222222222222"
UNTRUSTED_ONLY = "10.255.255.254/32"  # excludes loopback; a config value, never contacted

def bearer(token: str) -> tuple[str, str]:
    return ("Authorization", f"Bearer {token}")


# How each proxy asks about (method, target), as it builds the request to the sidecar.
# `client` are the headers of the client's request, which each proxy passes on its own way.
Asked = tuple[str, str, list[tuple[str, str]]]  # method, target, headers of the auth request

def ask_nginx(method: str, target: str, client: Headers) -> Asked:
    # auth_request: a subrequest to the fixed URI, the client's headers, X-Original-* set.
    return "GET", "/_sidecar/auth", [
        *client, ("X-Original-URI", target), ("X-Original-Method", method),
        ("Content-Length", "0"),
    ]


def ask_traefik(method: str, target: str, client: Headers) -> Asked:
    # ForwardAuth: GET to the configured address, every client header copied, then the
    # X-Forwarded-* family set by Traefik.
    return "GET", "/_sidecar/auth", [
        *client, ("X-Forwarded-Method", method), ("X-Forwarded-Proto", "http"),
        ("X-Forwarded-Host", "api.example"), ("X-Forwarded-Uri", target),
        ("X-Forwarded-For", "192.0.2.10"),
    ]


def ask_envoy(method: str, target: str, client: Headers) -> Asked:
    # ext_authz http_service with path_prefix: the original method, path_prefix + the original
    # path, only the allowed headers (Authorization is always among them), no body.
    allowed = [(k, v) for k, v in client if k.lower() in ("authorization", "x-request-id")]
    return method, "/_sidecar/auth" + target, [
        *allowed, ("Content-Length", "0"), ("X-Forwarded-Proto", "http"),
        ("X-Envoy-Expected-Rq-Timeout-Ms", "200"),
    ]


STYLES = {"nginx": ask_nginx, "traefik": ask_traefik, "envoy": ask_envoy}


async def decide(sc: Sidecar, style: str, method: str, target: str,
                 client: Headers = ()) -> RawResponse:
    how, path, headers = STYLES[style](method, target, client)
    return await raw_request(sc.main.port, how, path, headers)


@pytest.fixture
async def dify(make_sidecar: SidecarFactory) -> Sidecar:
    return await make_sidecar(scope_routes=DIFY_ROUTES, public_routes="GET /public,/health")


@pytest.fixture
async def tokens(db: Db) -> dict[str, tuple[str, str]]:
    return {
        "app": await db.add_token("app", tenant_id=TENANT, app_id=APP),
        "dataset": await db.add_token("dataset", tenant_id=TENANT),
    }


def metric(sc: Sidecar, name: str, labels: dict[str, str]) -> float:
    return sample(sc.app[METRICS], name, labels)


# (method, target, token kind or None or "bogus", expected status, expected scope header)
DECISIONS = [
    ("POST", "/v1/chat-messages", "app", 200, "app"),
    ("POST", "/v1/chat-messages", "dataset", 401, None),
    ("GET", "/v1/datasets/ds-1/documents?page=2", "dataset", 200, "dataset"),
    ("GET", "/v1/datasets/ds-1/documents", "app", 401, None),
    ("GET", "/v1/workspaces/current/models/model-types/x", "dataset", 200, "dataset"),
    ("GET", "/v1/datasetsx", "app", 200, "app"),  # prefixes match whole segments
    ("POST", "/v1/chat-messages", "bogus", 401, None),
    ("POST", "/v1/chat-messages", None, 401, None),
    ("GET", "/public/logo.png", None, 200, None),
    ("POST", "/public/logo.png", None, 401, None),  # `GET /public` is public for GET only
    ("DELETE", "/health", None, 200, None),
]


@pytest.mark.parametrize("style", list(STYLES))
async def test_same_decisions_for_nginx_traefik_and_envoy(
    dify: Sidecar, tokens: dict[str, tuple[str, str]], style: str
) -> None:
    for method, target, kind, status, scope in DECISIONS:
        client: list[tuple[str, str]] = []
        if kind == "bogus":
            client.append(bearer("app-not-a-real-token"))
        elif kind is not None:
            client.append(bearer(tokens[kind][0]))
        resp = await decide(dify, style, method, target, client)
        case = f"{style} {method} {target} with {kind}"
        assert resp.status == status, case
        if status == 200:
            assert resp.body == b"", case
            if scope is None:
                assert resp.identity() == {}, case
            else:
                token_id = tokens[kind][1]  # type: ignore[index]
                assert resp.identity() == {
                    "X-Tenant-Id": TENANT,
                    "X-App-Id": APP if kind == "app" else "",
                    "X-Api-Token-Id": token_id,
                    "X-Api-Token-Scope": scope,
                }, case
        else:
            assert resp.identity() == {}, case
            assert resp.headers["WWW-Authenticate"] == 'Bearer realm="api"', case
            body = resp.json()
            assert body["code"] == "unauthorized", case
            assert body["message"] == (MSG_MISSING if kind is None else MSG_INVALID), case
            assert body["status"] == 401, case


async def test_client_identity_headers_are_never_echoed(
    dify: Sidecar, tokens: dict[str, tuple[str, str]]
) -> None:
    forged = [("X-Tenant-Id", "evil"), ("x-app-id", "evil"), ("X_Api_Token_Id", "evil"),
              ("X-Api-Token-Scope", "dataset")]
    for style in STYLES:
        resp = await decide(dify, style, "GET", "/public/x", forged)
        assert resp.status == 200
        assert resp.identity() == {}, style
        resp = await decide(dify, style, "POST", "/v1/chat", [*forged, bearer(tokens["app"][0])])
        assert resp.status == 200
        assert resp.identity()["X-Tenant-Id"] == TENANT, style
        assert resp.identity()["X-Api-Token-Scope"] == "app", style
        assert "evil" not in str(resp.headers), style


async def test_envoy_is_told_to_strip_client_identity_headers(
    dify: Sidecar, tokens: dict[str, tuple[str, str]]
) -> None:
    # Envoy overwrites allowed_upstream_headers present in the answer, and leaves the client's
    # copies otherwise; then removes x-envoy-auth-headers-to-remove (SPEC 5 on a public route).
    public = await decide(dify, "envoy", "GET", "/public/x")
    removed = {h.strip() for h in public.headers["x-envoy-auth-headers-to-remove"].split(",")}
    assert {"x-tenant-id", "x-app-id", "x-api-token-id", "x-api-token-scope"} <= removed
    assert {"x_tenant_id", "x-api_token-scope", "x_app-id"} <= removed
    allowed = await decide(dify, "envoy", "POST", "/v1/chat", [bearer(tokens["app"][0])])
    removed = {h.strip() for h in allowed.headers["x-envoy-auth-headers-to-remove"].split(",")}
    # Removal runs after Envoy set our headers: the `-` names must not be listed on allow.
    assert not removed & {"x-tenant-id", "x-app-id", "x-api-token-id", "x-api-token-scope"}
    assert "x_tenant_id" in removed


async def test_any_method_and_only_the_decision_path(
    dify: Sidecar, tokens: dict[str, tuple[str, str]]
) -> None:
    token = tokens["app"][0]
    for method in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"):
        resp = await raw_request(dify.main.port, method, "/_sidecar/auth/v1/chat",
                                 [bearer(token)])
        assert resp.status == 200, method
        assert resp.headers["X-Api-Token-Scope"] == "app"
        # The bare endpoint with no description of the original request decides nothing.
        resp = await raw_request(dify.main.port, method, "/_sidecar/auth", [bearer(token)])
        assert resp.status == 400, method
        assert resp.identity() == {}, method
    # Decision-only mode: everything else is 404, including look-alikes of the endpoint.
    for target in ("/_sidecar/authx", "/_sidecar/auth%2Fv1", "/_sidecar/./auth", "/v1/chat",
                   "/_sidecar"):
        resp = await raw_request(dify.main.port, "GET", target, [bearer(token)])
        assert resp.status == 404, target
        assert resp.identity() == {}, target


async def test_proxy_mode_answers_decisions_and_proxies_look_alikes(
    make_sidecar: SidecarFactory, upstream: TestServer, tokens: dict[str, tuple[str, str]]
) -> None:
    sc = await make_sidecar(scope_routes=DIFY_ROUTES, upstream_url=str(upstream.make_url("")))
    auth = [bearer(tokens["dataset"][0])]
    resp = await decide(sc, "nginx", "GET", "/v1/datasets/x", auth)
    assert resp.status == 200
    assert resp.body == b""
    assert resp.headers["X-Api-Token-Scope"] == "dataset"
    assert upstream.app[CALLS] == []  # a decision, not a proxied request
    resp = await raw_request(sc.main.port, "GET", "/_sidecar/authx", [bearer(tokens["app"][0])])
    assert resp.status == 200
    assert resp.json()["path"] == "/_sidecar/authx"
    assert upstream.app[CALLS] == ["/_sidecar/authx"]


async def test_proxy_mode_answers_decisions_to_trusted_peers_only(
    make_sidecar: SidecarFactory, upstream: TestServer, tokens: dict[str, tuple[str, str]]
) -> None:
    # In proxy mode any client could otherwise ask the decision endpoint about its own token
    # and read the row ids in the identity headers; from an untrusted peer it is a 404 and
    # nothing reaches the upstream. Decision-only mode keeps answering Envoy's path style.
    proxy = await make_sidecar(scope_routes=DIFY_ROUTES, upstream_url=str(upstream.make_url("")),
                               trusted_proxies=UNTRUSTED_ONLY)
    decision_only = await make_sidecar(scope_routes=DIFY_ROUTES, trusted_proxies=UNTRUSTED_ONLY)
    auth = [bearer(tokens["dataset"][0])]
    for target in ("/_sidecar/auth/v1/datasets/x", "/_sidecar/auth"):
        resp = await raw_request(proxy.main.port, "GET", target, auth)
        assert resp.status == 404, target
        assert resp.json()["code"] == "not_found"
        assert resp.identity() == {}
    assert upstream.app[CALLS] == []
    resp = await raw_request(decision_only.main.port, "GET", "/_sidecar/auth/v1/datasets/x", auth)
    assert resp.status == 200
    assert resp.headers["X-Api-Token-Scope"] == "dataset"


async def test_decisions_count_in_metrics_and_last_used(
    dify: Sidecar, db: Db, tokens: dict[str, tuple[str, str]]
) -> None:
    token, token_id = tokens["dataset"]
    for _ in range(3):
        resp = await decide(dify, "nginx", "GET", "/v1/datasets/x", [bearer(token)])
        assert resp.status == 200
    assert (await decide(dify, "nginx", "GET", "/v1/chat", [bearer(token)])).status == 401
    assert (await decide(dify, "traefik", "GET", "/public/a")).status == 200
    requests = "sidecar_requests_total"
    assert metric(dify, requests, {"outcome": "allowed", "scope": "dataset"}) == 3
    assert metric(dify, requests, {"outcome": "unauthorized", "scope": "app"}) == 1
    assert metric(dify, requests, {"outcome": "public", "scope": "none"}) == 1
    assert metric(dify, "sidecar_auth_duration_seconds_count", {"outcome": "allowed"}) == 3
    # Written behind by the queue (flush interval 0.2 s in tests), not on the request path.
    for _ in range(50):
        if await db.conn.fetchval("SELECT last_used_at FROM api_tokens WHERE id = $1::uuid",
                                  token_id):
            break
        await asyncio.sleep(0.1)
    else:
        pytest.fail("last_used_at was never written for a token used through decisions")
    unused = await db.conn.fetchval(
        "SELECT last_used_at FROM api_tokens WHERE id = $1::uuid", tokens["app"][1]
    )
    assert unused is None


async def test_unavailable_store_is_503_never_401(
    make_sidecar: SidecarFactory, db: Db
) -> None:
    dead = f"postgresql://sidecar:pw@127.0.0.1:{free_port()}/sidecar"
    sc = await make_sidecar(database_url=dead, database_timeout=0.5, scope_routes=DIFY_ROUTES)
    for style in STYLES:
        resp = await decide(sc, style, "GET", "/v1/datasets/x", [bearer("app-some-token")])
        assert resp.status == 503, style
        assert resp.json()["code"] == "auth_unavailable"
        assert resp.identity() == {}


# --- untrusted peers (SPEC 6, 7) --------------------------------------------------------

@pytest.fixture
async def untrusted(make_sidecar: SidecarFactory) -> Sidecar:
    return await make_sidecar(scope_routes=DIFY_ROUTES, public_routes="GET /public",
                              trusted_proxies=UNTRUSTED_ONLY)


async def test_untrusted_original_headers_are_reported_once(
    untrusted: Sidecar, caplog: pytest.LogCaptureFixture
) -> None:
    # Usually a proxy missing from SIDECAR_TRUSTED_PROXIES: say so, without flooding the log.
    with caplog.at_level(logging.WARNING, logger="sidecar.decision"):
        # Envoy style: the path is the proxy's own, nothing was lost by ignoring the header.
        resp = await raw_request(untrusted.main.port, "GET", "/_sidecar/auth/public/x",
                                 [("X-Original-URI", "/public/x")])
        assert resp.status == 200
        assert not caplog.records
        for _ in range(3):
            resp = await raw_request(untrusted.main.port, "GET", "/_sidecar/auth",
                                     [("X-Original-URI", "/public/x")])
            assert resp.status == 400
    warnings = [r for r in caplog.records if r.name == "sidecar.decision"]
    assert len(warnings) == 1
    assert "SIDECAR_TRUSTED_PROXIES" in warnings[0].getMessage()


@pytest.mark.parametrize(("uri_header", "method_header"), [
    ("X-Original-URI", "X-Original-Method"), ("X-Forwarded-Uri", "X-Forwarded-Method"),
])
async def test_untrusted_peer_cannot_choose_the_request(
    untrusted: Sidecar, tokens: dict[str, tuple[str, str]], uri_header: str, method_header: str
) -> None:
    port = untrusted.main.port
    # A description from an untrusted peer is ignored, which leaves the bare endpoint with
    # no request to judge: refused whatever the token, so a protected path never becomes
    # public and no token passes for a scope it does not have (fail closed).
    for headers in ([(uri_header, "/public/x"), (method_header, "GET")],
                    [(uri_header, "/v1/datasets/x"), bearer(tokens["dataset"][0])],
                    [(uri_header, "/v1/datasets/x"), bearer(tokens["app"][0])],
                    [(uri_header, "/v1/chat"), bearer(tokens["app"][0])]):
        resp = await raw_request(port, "GET", "/_sidecar/auth", headers)
        assert resp.status == 400, headers
        assert resp.identity() == {}, headers
    # The path after /_sidecar/auth is the peer's own request: judged as it is...
    resp = await raw_request(port, "GET", "/_sidecar/auth/public/x",
                             [(uri_header, "/v1/datasets/x")])
    assert resp.status == 200
    resp = await raw_request(port, "GET", "/_sidecar/auth/v1/datasets/x",
                             [(uri_header, "/public/x"), bearer(tokens["dataset"][0])])
    assert resp.status == 200
    assert resp.headers["X-Api-Token-Scope"] == "dataset"
    # ... with its own method: a claimed GET does not open the `GET /public` route to a POST.
    resp = await raw_request(port, "POST", "/_sidecar/auth/public/x", [(method_header, "GET")])
    assert resp.status == 401


async def test_trusted_proxy_passing_client_headers_cannot_be_steered(
    dify: Sidecar, tokens: dict[str, tuple[str, str]]
) -> None:
    # Traefik copies every client header into the auth request and sets only its own family;
    # nginx's subrequest carries the client's headers too; Envoy may be told to pass them.
    port = dify.main.port
    cases = [
        ("traefik", "POST", "/v1/chat", [("X-Original-URI", "/public/x")]),
        ("traefik", "POST", "/public/x", [("X-Original-Method", "GET"),
                                          ("X-Original-URI", "/public/x")]),
        ("nginx", "GET", "/v1/datasets/x", [("X-Forwarded-Uri", "/public/x")]),
        ("envoy", "GET", "/v1/datasets/x", [("X-Original-URI", "/public/x")]),
        ("envoy", "POST", "/public/x", [("X-Forwarded-Method", "GET")]),
    ]
    for style, method, target, forged in cases:
        how, path, headers = STYLES[style](method, target, forged)
        if style == "envoy":  # as if its allowed_headers let the client's copies through
            headers = [*headers, *forged]
        resp = await raw_request(port, how, path, headers)
        assert resp.status == 400, (style, forged)
        assert resp.json()["code"] == "bad_request"
        assert resp.identity() == {}
    # Spellings of one path are one path: no conflict.
    resp = await raw_request(port, "GET", "/_sidecar/auth/v1/./datasets/x", [
        ("X-Forwarded-Uri", "/v1/%64atasets//x?q=1"), bearer(tokens["dataset"][0])])
    assert resp.status == 200
    assert resp.headers["X-Api-Token-Scope"] == "dataset"
    # But an escaped slash is not a slash: some upstreams route `/v1%2Fdatasets` elsewhere.
    resp = await raw_request(port, "GET", "/_sidecar/auth", [
        ("X-Original-URI", "/v1/datasets/x"), ("X-Forwarded-Uri", "/v1%2Fdatasets/x"),
        bearer(tokens["dataset"][0])])
    assert resp.status == 400


@pytest.mark.parametrize(("header", "value"), [
    ("X-Original-URI", "/public/x#/../../v1/datasets"),
    ("X-Original-URI", "public/x"),
    ("X-Original-URI", "ftp://host/public"),
    ("X-Original-URI", "http://[::1/public"),
    ("X-Forwarded-Uri", "/public x"),
    ("X-Original-Method", "GET /public"),
])
async def test_malformed_description_from_trusted_proxy_is_400(
    dify: Sidecar, header: str, value: str
) -> None:
    headers = [(header, value)]
    if "Method" in header:
        headers.append(("X-Original-URI", "/public/x"))
    resp = await raw_request(dify.main.port, "GET", "/_sidecar/auth", headers)
    assert resp.status == 400
    assert resp.json()["status"] == 400


async def test_absolute_form_uri_is_judged_on_its_path(
    dify: Sidecar, tokens: dict[str, tuple[str, str]]
) -> None:
    resp = await raw_request(dify.main.port, "GET", "/_sidecar/auth", [
        ("X-Original-URI", "http://api.example/v1/datasets/x?y=1"), bearer(tokens["dataset"][0])])
    assert resp.status == 200
    assert resp.headers["X-Api-Token-Scope"] == "dataset"


# --- path tricks (SPEC 3.2): the scope of the path the upstream would see -------------------

# Each spelling reaches a dataset route (tests/unit/test_routing.py has the reasons).
DATASET_SPELLINGS = [
    "/v1/datasets/x",
    "/v1//datasets/x",
    "/v1/./datasets/x",
    "/v1/x/../datasets/x",
    "/v1/x/%2e%2e/datasets/x",
    "/v1/%2e/datasets",
    "/v1/%64atasets/x",
    "/x/../../v1/datasets",
    "//v1/datasets/x",
    "/public/../v1/datasets/x",
    "/public/%2e%2e/v1/datasets/x",
    "/v1/datasets/x%2F..%2F..%2F..%2Fpublic/y",  # climbs to /public only if %2F splits
]
APP_SPELLINGS = [
    "/v1/datasets/../chat-messages",
    "/v1/datasets/%2e%2e/chat-messages",
    "/v1/datasets%2F..%2Fchat-messages",
    "/v1/datasetsx",
    "/v1/%2564atasets/x",  # %25 decodes once, to a literal "%64": not "datasets"
]
# Escaped slashes whose two readings (separator, data) need different scopes: no token fits.
AMBIGUOUS_SPELLINGS = [
    "/v1%2Fdatasets/x",
    "/v1%2fdatasets%2Fx",
    "/v1/x/%2E%2E%2Fdatasets/x",
    "/public%2F..%2Fv1/datasets/x",
]


@pytest.mark.parametrize("style", list(STYLES))
async def test_path_tricks_pick_the_upstream_scope(
    dify: Sidecar, tokens: dict[str, tuple[str, str]], style: str
) -> None:
    app, dataset = bearer(tokens["app"][0]), bearer(tokens["dataset"][0])
    for target in DATASET_SPELLINGS:
        assert (await decide(dify, style, "GET", target, [dataset])).status == 200, target
        assert (await decide(dify, style, "GET", target, [app])).status == 401, target
        assert (await decide(dify, style, "GET", target)).status == 401, target
    for target in APP_SPELLINGS:
        assert (await decide(dify, style, "GET", target, [app])).status == 200, target
        assert (await decide(dify, style, "GET", target, [dataset])).status == 401, target
    for target in AMBIGUOUS_SPELLINGS:
        for token in (app, dataset):
            assert (await decide(dify, style, "GET", target, [token])).status == 401, target
