"""The OpenAPI 3.1 description served at `GET /openapi.json` on the ops listener (SPEC 10).

It describes what the sidecar answers itself: the decision endpoint on the main listener
(SPEC 7) and the ops listener. Every other path of the main listener is the upstream's API,
which the sidecar only proxies, so it is not described here.

Rules that hold here:
1. Built in code from the constants the handlers use (paths, header names, body limit, error
   messages), so a rename changes both. What cannot be derived is checked against the running
   app by `tests/functional/test_openapi.py`: a route, status or header added to a handler but
   not here fails that test.
2. Each operation is tagged with the listener that serves it (`main` or `ops`) and each path
   item carries that listener's `servers` entry: the two listeners are separate ports.
3. Error bodies are one schema, `Error`, narrowed per response to the code and status it has.
4. Operations of the HEAD method document no response content: HEAD answers have no body.
5. Header objects say `required: true` only for headers every response of that status has.
6. Request parameters describe exactly what is accepted (schemathesis checks, against a
   running sidecar, that schema-valid requests are not answered 400 and schema-invalid ones
   are): patterns come from the regular expressions the handlers use. Where OpenAPI cannot
   say it (Traefik's `X-Forwarded-*` instead of nginx's `X-Original-*`: "one of two headers"),
   the rule is in prose and the parameters describe one complete way of asking.
7. What depends on the settings (the scopes an admin request may name) is filled in from
   them: the served document describes this sidecar, not every possible one.
"""

from __future__ import annotations

import functools
from collections.abc import Collection
from typing import Any

import orjson

from sidecar import __version__
from sidecar.admin import MAX_BODY, TENANT_ID_PATTERN
from sidecar.decision import (
    DECISION_PATH,
    ENVOY_REMOVE_HEADER,
    METHOD_PATTERN,
    ORIGINAL_HEADERS,
    OWS,
)
from sidecar.errors import MSG_INVALID, MSG_MISSING, MSG_SCHEME
from sidecar.gate import REQUEST_ID_PATTERN
from sidecar.headers import IDENTITY_HEADERS
from sidecar.responses import WWW_AUTHENTICATE
from sidecar.routing import INVALID_TARGET_RE

JSON = dict[str, Any]

# The methods OpenAPI can name; the decision route accepts any method, so it lists all of them.
HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")

_ERROR_REF = "#/components/schemas/Error"
# A request target as the decision handler takes it (`decision._path_of`): origin form, or
# absolute form with an http(s) scheme and an authority; none of INVALID_TARGET_RE's
# characters; brackets (IPv6 literals) are left out of the authority, since urlsplit refuses
# malformed ones. Surrounded by optional whitespace, which the handler trims.
_NOT_IN_TARGET = INVALID_TARGET_RE.pattern.removeprefix("[").removesuffix("]")
_OWS = "[" + OWS.replace("\t", r"\t") + "]*"
_TARGET_PATTERN = (
    f"^{_OWS}(?:/[^{_NOT_IN_TARGET}]*"
    rf"|[Hh][Tt][Tt][Pp][Ss]?://[^/?\[\]{_NOT_IN_TARGET}]+(?:[/?][^{_NOT_IN_TARGET}]*)?)"
    f"{_OWS}$")
# An empty or blank method header is no description: the request's own method is used.
_METHOD_HEADER_PATTERN = f"^{_OWS}(?:{METHOD_PATTERN})?{_OWS}$"
_READINESS_REF = "#/components/schemas/Readiness"


def _server(port: int, listener: str, variable: str) -> JSON:
    return {
        "url": "http://{host}:{port}",
        "description": f"{listener} listener ({variable})",
        "variables": {"host": {"default": "localhost"}, "port": {"default": str(port)}},
    }


_MAIN_SERVERS = [_server(8080, "main", "SIDECAR_LISTEN")]
_OPS_SERVERS = [_server(9090, "ops", "SIDECAR_OPS_LISTEN")]


def _header(description: str, *, required: bool = True, schema: JSON | None = None) -> JSON:
    return {"description": description, "required": required,
            "schema": schema or {"type": "string"}}


def _json_body(schema: JSON) -> JSON:
    return {"application/json": {"schema": schema}}


def _error(status: int, code: str, description: str, *, head: bool = False,
           headers: JSON | None = None, messages: tuple[str, ...] = ()) -> JSON:
    narrowed: JSON = {"properties": {"code": {"const": code}, "status": {"const": status}}}
    if messages:
        narrowed["properties"]["message"] = {"enum": list(messages)}
    response: JSON = {"description": description}
    if headers:
        response["headers"] = headers
    if not head:
        response["content"] = _json_body({"allOf": [{"$ref": _ERROR_REF}, narrowed]})
    return response


_REQUEST_ID = _header("The request's `X-Request-Id` if it was a valid one, else a generated id; "
                      "it is also in the access log line.")
_WWW_AUTHENTICATE = _header("The Bearer challenge.", schema={"const": WWW_AUTHENTICATE})
_RETRY_AFTER = _header("Seconds after which to try again.",
                       schema={"type": "string", "pattern": "^[0-9]+$"})
_UNAUTHORIZED_MESSAGES = (MSG_MISSING, MSG_SCHEME, MSG_INVALID)
# Keyed by the names the handler sets: a new identity header fails here until described.
_IDENTITY_DESCRIPTIONS = {
    "X-Tenant-Id": "The token's tenant id (empty string when null)",
    "X-App-Id": "The token's app id (empty string when null)",
    "X-Api-Token-Id": "The token row's id",
    "X-Api-Token-Scope": "The scope the original request needed",
}


def _decision_parameters(with_path: bool) -> list[JSON]:
    params: list[JSON] = []
    if with_path:
        params.append({
            "name": "path", "in": "path", "required": True, "schema": {"type": "string"},
            "description": "Envoy `path_prefix`: the original request's path (it may contain "
                           "`/`), judged with this request's own method whoever the peer is. "
                           "The X-Original-* and X-Forwarded-* headers, when a "
                           "trusted peer sends them too, must describe the same request "
                           "(else 400); they add nothing, so they are not parameters here.",
        })
    else:
        # nginx's pair; Traefik's pair is the same rule in prose (rule 6).
        (uri, method), (traefik_uri, traefik_method) = ORIGINAL_HEADERS
        params.append({
            "name": uri, "in": "header", "required": True,
            "schema": {"type": "string", "pattern": _TARGET_PATTERN},
            "description": "nginx `auth_request`: the original request target (origin or "
                           f"absolute form). Traefik `ForwardAuth` sends `{traefik_uri}` "
                           "instead, with the same rules; when both are sent they must name "
                           "the same path. Read only from peers in SIDECAR_TRUSTED_PROXIES: "
                           "from others, or without either header, the answer is 400.",
        })
        params.append({
            "name": method, "in": "header", "required": False,
            "schema": {"type": "string", "pattern": _METHOD_HEADER_PATTERN},
            "description": "nginx: the original request method (this request's own method "
                           f"when absent or blank). Traefik sends `{traefik_method}` instead; "
                           "when both are sent they must agree. Read only from peers in "
                           "SIDECAR_TRUSTED_PROXIES.",
        })
    params.append({"name": "X-Request-Id", "in": "header", "required": False,
                   "schema": {"type": "string"},
                   "description": "Passed through when it matches "
                                  f"`{REQUEST_ID_PATTERN}`, else replaced by a generated id "
                                  "(never refused)."})
    return params


def _decision_operation(method: str, with_path: bool) -> JSON:
    head = method == "head"
    identity = {name: _header(_IDENTITY_DESCRIPTIONS[name] + "; absent on a public route.",
                              required=False) for name in IDENTITY_HEADERS}
    allowed: JSON = {
        "description": "Allowed. Empty body. Carries the identity of the token, or none on a "
                       "public route (SIDECAR_PUBLIC_ROUTES). With rate limits configured, "
                       "also RateLimit-Limit, RateLimit-Remaining and RateLimit-Reset.",
        "headers": {
            **identity,
            ENVOY_REMOVE_HEADER: _header(
                "For Envoy ext_authz: the spellings of the identity headers it must strip "
                "from the client's request."),
            "X-Request-Id": _REQUEST_ID,
        },
    }
    responses: JSON = {
        "200": allowed,
        "400": _error(400, "bad_request", "The original request cannot be told unambiguously: "
                      "an invalid target or method, or descriptions that disagree.", head=head,
                      headers={"X-Request-Id": _REQUEST_ID}),
        "401": _error(401, "unauthorized", "Missing, malformed, unknown, revoked or wrong-scope "
                      "token (SPEC 3.1).", head=head, messages=_UNAUTHORIZED_MESSAGES,
                      headers={"WWW-Authenticate": _WWW_AUTHENTICATE,
                               "X-Request-Id": _REQUEST_ID}),
        "404": _error(404, "not_found", "The request target is another spelling of this path "
                      "(percent-encoded letters, dot segments): not the decision endpoint.",
                      head=head, headers={"X-Request-Id": _REQUEST_ID}),
        "429": _error(429, "too_many_requests", "Over SIDECAR_RATE_LIMIT or "
                      "SIDECAR_TENANT_RATE_LIMIT (SPEC 9).", head=head, headers={
                          "Retry-After": _RETRY_AFTER,
                          "RateLimit-Limit": _header("The limit that applies."),
                          "RateLimit-Remaining": _header("Requests left in the window."),
                          "RateLimit-Reset": _header("Seconds until the window resets."),
                          "X-Request-Id": _REQUEST_ID}),
        "503": _error(503, "auth_unavailable", "Cannot decide: the token store is unreachable "
                      "and no usable cached answer exists. Never answered as 401.", head=head,
                      headers={"Retry-After": _RETRY_AFTER, "X-Request-Id": _REQUEST_ID}),
    }
    suffix = "_path" if with_path else ""
    return {
        "tags": ["main"],
        "operationId": f"decide{suffix}_{method}",
        "summary": "Allow or deny the original request" + (
            " given by the path after the prefix (Envoy)" if with_path
            else " given by X-Original-* (nginx) or X-Forwarded-* (Traefik) headers"),
        # Optional: a request for a public route passes without one.
        "security": [{"apiToken": []}, {}],
        "parameters": _decision_parameters(with_path),
        "responses": responses,
    }


def _ops_get(operation_id: str, summary: str, responses: JSON) -> JSON:
    return {"get": {"tags": ["ops"], "operationId": operation_id, "summary": summary,
                    "security": [], "responses": responses}}


def _readiness(statuses: list[str]) -> JSON:
    return _json_body({"allOf": [{"$ref": _READINESS_REF},
                                 {"properties": {"status": {"enum": statuses}}}]})


def _admin_invalidate() -> JSON:
    return {"post": {
        "tags": ["ops"],
        "operationId": "adminInvalidate",
        "summary": "Drop cached answers for one token (one or all scopes) or a whole tenant",
        "description": "Clears this replica's caches and Redis, and tells every replica over "
                       "Redis pub/sub. Exists only when SIDECAR_ADMIN_TOKEN is set.",
        "security": [{"adminToken": []}],
        "requestBody": {"required": True, "content": _json_body(
            {"$ref": "#/components/schemas/InvalidateRequest"})},
        "responses": {
            "200": {"description": "Invalidated. The token itself is never echoed.",
                    "content": _json_body({"$ref": "#/components/schemas/InvalidateResult"})},
            "400": _error(400, "bad_request", "The body is not one of the documented forms "
                          "(an unknown key or scope, a tenant id not spelt 8-4-4-4-12)."),
            "401": _error(401, "unauthorized", "Missing or wrong admin token.",
                          messages=_UNAUTHORIZED_MESSAGES,
                          headers={"WWW-Authenticate": _WWW_AUTHENTICATE}),
            "404": _error(404, "not_found", "The admin API is disabled (no SIDECAR_ADMIN_TOKEN)."),
            "413": _error(413, "payload_too_large", f"The body is over {MAX_BODY} bytes."),
        },
    }}


def _schemas(scopes: Collection[str] | None) -> JSON:
    non_empty: JSON = {"type": "string", "minLength": 1}
    tenant_id: JSON = {"type": "string", "format": "uuid", "pattern": TENANT_ID_PATTERN}
    scope: JSON | bool = {**non_empty, "description": "Only this scope; all scopes when absent."}
    scope_done: JSON = {**non_empty, "description": "The scope given, or `all`."}
    if scopes is not None:
        # An unknown scope is refused (a typo would otherwise invalidate nothing).
        scope = {"enum": sorted(scopes), "description": "Only this scope (one of "
                 "SIDECAR_SCOPE_ROUTES's); all scopes when absent."} if scopes else False
        scope_done = {"enum": sorted({*scopes, "all"}), "description": scope_done["description"]}
    return {
        "Error": {
            "type": "object",
            "description": "Dify-shaped error body.",
            "required": ["code", "message", "status"],
            "additionalProperties": False,
            "properties": {
                "code": {"type": "string"},
                "message": {"type": "string"},
                "status": {"type": "integer"},
            },
        },
        "Readiness": {
            "type": "object",
            "required": ["status", "postgres", "redis", "upstream"],
            # Components present only where configured (`postgres_read`, `invalidation`,
            # `last_used`, ...) report in the same words.
            "additionalProperties": {"enum": ["ok", "down", "disabled"]},
            "properties": {
                "status": {"enum": ["ready", "degraded", "not_ready"],
                           "description": "`degraded`: serving from Postgres or a warm cache "
                                          "with a dependency down; `not_ready`: Postgres was "
                                          "never reached, so nothing can be answered."},
                "postgres": {"enum": ["ok", "down"]},
                "redis": {"enum": ["ok", "down", "disabled"]},
                "upstream": {"enum": ["ok", "down", "disabled"],
                             "description": "`disabled` in decision-only mode."},
                "postgres_read": {"enum": ["ok", "down"],
                                  "description": "Only with SIDECAR_DATABASE_READ_URL: the "
                                                 "read replica answers."},
                "invalidation": {"enum": ["ok", "down"],
                                 "description": "LISTEN connected and its self-test NOTIFY "
                                                "received."},
                "last_used": {"enum": ["ok", "down"],
                              "description": "`down` while last_used_at flushes fail; absent "
                                             "when none are written."},
            },
        },
        "InvalidateRequest": {"oneOf": [
            {"type": "object", "title": "token", "required": ["token"],
             "additionalProperties": False,
             "properties": {"token": non_empty, "scope": scope}},
            {"type": "object", "title": "tenant", "required": ["tenant_id"],
             "additionalProperties": False,
             "properties": {"tenant_id": tenant_id}},
        ]},
        "InvalidateResult": {"oneOf": [
            {"type": "object", "title": "token", "required": ["invalidated", "scope"],
             "additionalProperties": False,
             "properties": {"invalidated": {"const": "token"},
                            "scope": scope_done}},
            {"type": "object", "title": "tenant", "required": ["invalidated", "tenant_id"],
             "additionalProperties": False,
             "properties": {"invalidated": {"const": "tenant"},
                            "tenant_id": tenant_id}},
        ]},
    }


def openapi_document(scopes: Collection[str] | None = None) -> JSON:
    """A new copy of the document (callers may mutate it); with `scopes`, the settings' scopes,
    it names the scopes an admin request may give, as the sidecar serves it (rule 7)."""
    decision = {method: _decision_operation(method, False) for method in HTTP_METHODS}
    decision_path = {method: _decision_operation(method, True) for method in HTTP_METHODS}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "API-key authentication sidecar",
            "version": __version__,
            "summary": "Decision endpoint and ops listener of the sidecar.",
            "description": "Paths tagged `main` are served on the main listener, those tagged "
                           "`ops` on the ops listener (see each path's `servers`). Every other "
                           "path of the main listener is proxied to the upstream and is "
                           "described by the upstream's own API. The decision endpoint "
                           "answers every method; OpenAPI 3.1 can name eight, and any other "
                           "(QUERY, PROPFIND, ...) is judged the same way.",
            "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
        },
        "tags": [
            {"name": "main", "description": "Main listener (SIDECAR_LISTEN, default :8080)."},
            {"name": "ops", "description": "Ops listener (SIDECAR_OPS_LISTEN, default :9090)."},
        ],
        "paths": {
            DECISION_PATH: {"servers": _MAIN_SERVERS, **decision},
            DECISION_PATH + "/{path}": {"servers": _MAIN_SERVERS, **decision_path},
            "/healthz": {"servers": _OPS_SERVERS, **_ops_get(
                "healthz", "Liveness: the event loop runs; touches no dependency", {
                    "200": {"description": "Alive.", "content": _json_body({
                        "type": "object", "required": ["status"],
                        "additionalProperties": False,
                        "properties": {"status": {"const": "ok"}}})}})},
            "/readyz": {"servers": _OPS_SERVERS, **_ops_get(
                "readyz", "Readiness: each dependency asked once, with short timeouts", {
                    "200": {"description": "Can serve (Postgres, or a warm cache).",
                            "content": _readiness(["ready", "degraded"])},
                    "503": {"description": "Cannot answer anything: Postgres never reached.",
                            "content": _readiness(["not_ready"])}})},
            "/metrics": {"servers": _OPS_SERVERS, **_ops_get(
                "metrics", "Prometheus metrics, all named `sidecar_*`", {
                    "200": {"description": "Prometheus text exposition format.",
                            "content": {"text/plain": {"schema": {"type": "string"}}}}})},
            "/admin/invalidate": {"servers": _OPS_SERVERS, **_admin_invalidate()},
            "/openapi.json": {"servers": _OPS_SERVERS, **_ops_get(
                "openapi", "This document", {
                    "200": {"description": "The OpenAPI 3.1 document.", "content": _json_body({
                        "type": "object", "required": ["openapi", "info", "paths"]})}})},
        },
        "components": {
            "schemas": _schemas(scopes),
            "securitySchemes": {
                "apiToken": {"type": "http", "scheme": "bearer",
                             "description": "An API token of the scope the original path "
                                            "needs (SIDECAR_SCOPE_ROUTES)."},
                "adminToken": {"type": "http", "scheme": "bearer",
                               "description": "SIDECAR_ADMIN_TOKEN."},
            },
        },
    }


@functools.cache
def openapi_json(scopes: frozenset[str]) -> bytes:
    """The served document, serialised once: it only changes with the code and the scopes."""
    return orjson.dumps(openapi_document(scopes))
