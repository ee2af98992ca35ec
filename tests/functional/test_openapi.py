"""The OpenAPI document (SPEC 10) checked against the running sidecar.

Rules that hold here:
1. Routes are compared in both directions: every route the apps register is documented and
   every documented operation is routed to it, so an endpoint added without documentation
   (or documented and then dropped) fails.
2. Every documented status of every operation is produced by a real request on real Postgres
   (Redis for the admin API), except the statuses in NOT_YET_REACHABLE, which must be exactly
   the ones never seen; every response seen has a documented status, a body valid against the
   documented schema (or no body when none is documented) and the documented headers.
3. Bodies are validated by JSON pointer into the document itself, so the `$ref`s resolve as an
   OpenAPI reader would resolve them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from jsonschema import Draft202012Validator
from openapi_spec_validator import OpenAPIV31SpecValidator, validate
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012
from yarl import URL

import sidecar
from sidecar.admin import MAX_BODY
from sidecar.app import UPSTREAM_ROUTE, create_app, create_ops_app
from sidecar.headers import IDENTITY_HEADERS
from sidecar.openapi import HTTP_METHODS, openapi_document
from sidecar.settings import load_settings
from tests.conftest import Db, Sidecar, SidecarFactory
from tests.servers import free_port

# Documented statuses no request can produce yet (none since rate limiting exists).
# When a feature makes one reachable, its request goes below and the status leaves this set.
NOT_YET_REACHABLE: frozenset[int] = frozenset()


DOC_URI = "urn:sidecar:openapi"
ADMIN = "admin-token-0123456789abcdef"
TENANT = "33333333-3333-3333-3333-333333333333"
PORTS = {"main": "8080", "ops": "9090"}


def pointer(*parts: str) -> str:
    return "/" + "/".join(p.replace("~", "~0").replace("/", "~1") for p in parts)


def operations(doc: Mapping[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(path, method, operation) for every documented operation."""
    return [(path, method, item[method]) for path, item in doc["paths"].items()
            for method in HTTP_METHODS if method in item]


def concrete(path: str) -> str:
    # A `{path}` parameter stands for a whole path, slashes included.
    return re.sub(r"\{[^}]+\}", "v1/chat-messages", path)


def test_document_is_valid_openapi_3_1() -> None:
    doc = openapi_document()
    validate(doc, cls=OpenAPIV31SpecValidator)
    assert doc["openapi"].startswith("3.1.")
    assert doc["info"]["version"] == sidecar.__version__
    for path, method, op in operations(doc):
        # Each operation names its listener, and its path item says where that listener is.
        (tag,) = op["tags"]
        assert tag in PORTS, (path, method)
        ports = {s["variables"]["port"]["default"] for s in doc["paths"][path]["servers"]}
        assert ports == {PORTS[tag]}, (path, method)
    assert {p for p, _, op in operations(doc) if op["tags"] == ["main"]} == {
        "/_sidecar/auth", "/_sidecar/auth/{path}"}


def _routes(app: web.Application) -> set[web.AbstractRoute]:
    """The app's routes that the document must describe."""
    routes = list(app.router.routes())
    # `add_get` registers a HEAD twin of each GET; HEAD is GET without a body (RFC 9110), not
    # an endpoint of its own, and is left undocumented like in most OpenAPI documents.
    gets = {(r.resource, r.handler) for r in routes if r.method == "GET"}
    return {r for r in routes
            if not (r.method == "HEAD" and (r.resource, r.handler) in gets)
            # The catch-all: the upstream's API, proxied, not described by our document.
            and r.name != UPSTREAM_ROUTE}


async def test_every_route_is_documented_and_every_operation_routed() -> None:
    # Built, never started: routing needs no connection (the DSN's port is never dialled).
    settings = load_settings(database_url="postgresql://u@127.0.0.1:9/none", admin_token=ADMIN)
    main = create_app(settings)
    apps = {"main": main, "ops": create_ops_app(main)}
    doc = openapi_document()
    for listener, app in apps.items():
        registered = _routes(app)
        hits: dict[tuple[web.AbstractRoute, str], set[str]] = {}  # (route, path): methods
        for path, method, op in operations(doc):
            if op["tags"] != [listener]:
                continue
            request = make_mocked_request(method.upper(), concrete(path), app=app)
            match = await app.router.resolve(request)
            assert match.http_exception is None, f"documented {method} {path} is not routed"
            assert match.route in registered, f"documented {method} {path} reaches the proxy"
            hits.setdefault((match.route, path), set()).add(method.upper())
        undocumented = {f"{r.method} {r.resource.canonical if r.resource else '?'}"
                        for r in registered - {route for route, _ in hits}}
        assert not undocumented, f"{listener} routes missing from the document: {undocumented}"
        for (route, path), methods in hits.items():
            # A `*` route answers every method, so each of its paths must list every method.
            expected = {m.upper() for m in HTTP_METHODS} if route.method == "*" else {
                route.method}
            assert methods == expected, f"{path}: documented {methods}, routed {expected}"


@dataclass
class Checker:
    """Sends requests, checks each response against the document, records what it saw."""

    doc: dict[str, Any]
    http: aiohttp.ClientSession
    registry: Registry[Any] = field(init=False)
    seen: set[tuple[str, str, int]] = field(default_factory=set)

    def __post_init__(self) -> None:
        resource = Resource.from_contents(self.doc, default_specification=DRAFT202012)
        self.registry = Registry().with_resource(DOC_URI, resource)

    def validator(self, *parts: str) -> Draft202012Validator:
        return Draft202012Validator({"$ref": DOC_URI + "#" + pointer(*parts)},
                                    registry=self.registry,
                                    format_checker=Draft202012Validator.FORMAT_CHECKER)

    async def call(
        self, base: str, method: str, path: str, target: str, *, expect: int,
        headers: Mapping[str, str] | None = None, data: bytes | None = None,
        absent: frozenset[str] = frozenset(),
    ) -> tuple[aiohttp.ClientResponse, bytes]:
        """`method target` on `base`, checked as the documented operation `method path`;
        `absent` are optional documented headers this response must not carry."""
        url = URL(base + target, encoded=True)  # sent as written: no client normalisation
        async with self.http.request(method, url, headers=headers, data=data) as resp:
            body = await resp.read()
        case = f"{method} {target} -> {resp.status}"
        assert method.lower() in self.doc["paths"][path], f"undocumented operation: {case}"
        op = self.doc["paths"][path][method.lower()]
        assert str(resp.status) in op["responses"], f"undocumented status: {case}"
        assert resp.status == expect, f"{case}, expected {expect}: {body[:200]!r}"
        documented = op["responses"][str(resp.status)]

        for name, header in documented.get("headers", {}).items():
            # Every documented header is expected, the optional ones too, unless the case
            # is one where the document says it is left out (identity on a public route).
            if name in absent:
                assert not header["required"], f"{case}: {name} is documented as required"
                assert name not in resp.headers, f"{case}: {name} should be absent"
                continue
            assert name in resp.headers, f"{case}: no {name}"
            self.validator("paths", path, method.lower(), "responses", str(resp.status),
                           "headers", name, "schema").validate(resp.headers[name])

        content = documented.get("content")
        if content is None:
            assert body == b"", f"{case}: a body where none is documented"
        else:
            media = resp.headers.get("Content-Type", "").partition(";")[0].strip()
            assert media in content, f"{case}: {media} not documented"
            value = orjson.loads(body) if media == "application/json" else body.decode()
            self.validator("paths", path, method.lower(), "responses", str(resp.status),
                           "content", media, "schema").validate(value)
        self.seen.add((path, method.lower(), resp.status))
        return resp, body


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def check_decision(ck: Checker, live: Sidecar, dead: Sidecar, limited: Sidecar,
                         token: str) -> None:
    identity = frozenset(IDENTITY_HEADERS)
    # The 404 below is the decision handler's own (a respelling of its path), not the
    # catch-all's: the router decodes `%61` and hands the request to the decision route.
    for spelling in ("/_sidecar/%61uth", "/_sidecar/%61uth/v1/a"):
        request = make_mocked_request("GET", spelling, app=live.app)
        resource = (await live.app.router.resolve(request)).route.resource
        assert resource is not None
        assert resource.canonical == "/_sidecar/auth{tail}", spelling
    for method in HTTP_METHODS:
        m = method.upper()
        bare, tail = "/_sidecar/auth", "/_sidecar/auth/{path}"
        # nginx/Traefik style: the original request in headers (loopback is a trusted peer).
        nginx = {"X-Original-URI": "/v1/chat-messages?x=1", "X-Original-Method": "POST"}
        await ck.call(live.url(""), m, bare, "/_sidecar/auth", expect=200,
                      headers={**nginx, **bearer(token)})
        await ck.call(live.url(""), m, bare, "/_sidecar/auth", expect=200, absent=identity,
                      headers={"X-Forwarded-Uri": "/public/x", "X-Forwarded-Method": "GET"})
        await ck.call(live.url(""), m, bare, "/_sidecar/auth", expect=400,
                      headers={"X-Original-URI": "/a", "X-Forwarded-Uri": "/b", **bearer(token)})
        await ck.call(live.url(""), m, bare, "/_sidecar/auth", expect=401, headers=nginx)
        await ck.call(live.url(""), m, bare, "/_sidecar/%61uth", expect=404, headers=nginx)
        await ck.call(dead.url(""), m, bare, "/_sidecar/auth", expect=503,
                      headers={**nginx, **bearer(token)})
        # Envoy style: the original path after the prefix, the original method.
        await ck.call(live.url(""), m, tail, "/_sidecar/auth/v1/chat-messages", expect=200,
                      headers=bearer(token))
        await ck.call(live.url(""), m, tail, "/_sidecar/auth/public/x", expect=200,
                      absent=identity)
        await ck.call(live.url(""), m, tail, "/_sidecar/auth/v1/a", expect=400,
                      headers={"X-Original-URI": "/v1/b", **bearer(token)})
        await ck.call(live.url(""), m, tail, "/_sidecar/auth/v1/a", expect=401,
                      headers=bearer("app-unknown"))
        await ck.call(live.url(""), m, tail, "/_sidecar/%61uth/v1/a", expect=404)
        await ck.call(dead.url(""), m, tail, "/_sidecar/auth/v1/a", expect=503,
                      headers=bearer(token))
        # `limited` allows one request per token per hour: the token used first spent it.
        await ck.call(limited.url(""), m, bare, "/_sidecar/auth", expect=429,
                      headers={**nginx, **bearer(token)})
        await ck.call(limited.url(""), m, tail, "/_sidecar/auth/v1/a", expect=429,
                      headers=bearer(token))


async def check_ops(ck: Checker, live: Sidecar, dead: Sidecar, token: str) -> None:
    for sc in (live, dead):
        await ck.call(sc.ops_url(""), "GET", "/healthz", "/healthz", expect=200)
    await ck.call(live.ops_url(""), "GET", "/readyz", "/readyz", expect=200)
    await ck.call(dead.ops_url(""), "GET", "/readyz", "/readyz", expect=503)
    await ck.call(live.ops_url(""), "GET", "/metrics", "/metrics", expect=200)
    _, body = await ck.call(live.ops_url(""), "GET", "/openapi.json", "/openapi.json",
                            expect=200)
    assert orjson.loads(body) == openapi_document(load_settings(**live.env).scopes)

    path = "/admin/invalidate"
    # The document as this sidecar serves it: it names the configured scopes.
    served = Checker(openapi_document(load_settings(**live.env).scopes), ck.http)
    request_schema = served.validator("paths", path, "post", "requestBody", "content",
                                      "application/json", "schema")
    admin = bearer(ADMIN)
    for doc in ({"token": token}, {"token": token, "scope": "app"}, {"tenant_id": TENANT}):
        request_schema.validate(doc)  # what the sidecar accepts, the document accepts
        await ck.call(live.ops_url(""), "POST", path, path, expect=200, headers=admin,
                      data=orjson.dumps(doc))
    refused: list[object] = [
        {"token": token, "tenant_id": TENANT}, {"tenant_id": "not-a-uuid"}, {"scope": "app"},
        {"token": ""}, {"tenant_id": TENANT, "scope": "app"}, [],
        # Unknown keys, nulls, unknown scopes and other spellings of a UUID are refused too.
        {"tenant_id": TENANT, "tenantid": TENANT}, {"token": token, "scope": None},
        {"token": token, "scope": "no-such-scope"}, {"tenant_id": "{" + TENANT + "}"},
        {"tenant_id": TENANT.replace("-", "")}, {"tenant_id": "urn:uuid:" + TENANT},
    ]
    for bad in refused:
        assert not request_schema.is_valid(bad), bad  # what it refuses, the document refuses
        await ck.call(live.ops_url(""), "POST", path, path, expect=400, headers=admin,
                      data=orjson.dumps(bad))
    await ck.call(live.ops_url(""), "POST", path, path, expect=400, headers=admin,
                  data=b"{not json")
    for auth in ({}, bearer("wrong-admin-token-0123456789"), {"Authorization": "Basic eA=="}):
        await ck.call(live.ops_url(""), "POST", path, path, expect=401, headers=auth,
                      data=orjson.dumps({"tenant_id": TENANT}))
    await ck.call(live.ops_url(""), "POST", path, path, expect=413, headers=admin,
                  data=b" " * (MAX_BODY + 1))
    await ck.call(dead.ops_url(""), "POST", path, path, expect=404, headers=admin,
                  data=orjson.dumps({"tenant_id": TENANT}))


async def test_every_documented_response_is_what_the_sidecar_answers(
    make_sidecar: SidecarFactory, db: Db, redis_url: str
) -> None:
    token, _ = await db.add_token("app", tenant_id=TENANT)
    live = await make_sidecar(redis_url=redis_url, admin_token=ADMIN, public_routes="/public")
    # Nothing listens on this port: Postgres is never reached, so decisions cannot be made.
    # No admin token: the admin API is disabled.
    dead = await make_sidecar(
        database_url=f"postgresql://sidecar:x@127.0.0.1:{free_port()}/sidecar",
        database_timeout=0.5)
    limited = await make_sidecar(redis_url=redis_url, rate_limit="1/h")
    doc = openapi_document()
    async with aiohttp.ClientSession() as http:
        ck = Checker(doc, http)
        await ck.call(limited.url(""), "GET", "/_sidecar/auth/{path}", "/_sidecar/auth/v1/a",
                      expect=200, headers=bearer(token))
        await check_decision(ck, live, dead, limited, token)
        await check_ops(ck, live, dead, token)

    documented = {(path, method, int(status)) for path, method, op in operations(doc)
                  for status in op["responses"]}
    unseen = documented - ck.seen
    assert unseen == {d for d in documented if d[2] in NOT_YET_REACHABLE}, sorted(unseen)
    assert {status for _, _, status in unseen} == NOT_YET_REACHABLE
