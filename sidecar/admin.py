"""Admin API on the ops listener (SPEC 3.4): `POST /admin/invalidate`.

Rules that hold here:
1. Without `SIDECAR_ADMIN_TOKEN` the admin API does not exist (404), so an ops port exposed
   by mistake offers nothing to try.
2. The admin token is compared in constant time; a wrong or missing one gets the same 401.
3. Responses never echo the token being invalidated.
4. Bodies are read until their end, at most `MAX_BODY` bytes (413 beyond), however they are
   framed or cut into TCP segments.
"""

from __future__ import annotations

import hmac
import uuid

import orjson
from aiohttp import StreamReader, web

from sidecar.credentials import parse_authorization
from sidecar.errors import Unauthorized
from sidecar.responses import WWW_AUTHENTICATE, json_error
from sidecar.services import ops_services

MAX_BODY = 64 * 1024


async def _read_body(content: StreamReader, limit: int) -> bytes | None:
    """The whole body, or None once it exceeds `limit` bytes. `read(n)` returns only what has
    arrived so far, so a body in several TCP segments takes several reads; a chunked body has
    no Content-Length to check up front, hence the limit here."""
    body = bytearray()
    while len(body) <= limit:
        chunk = await content.read(limit + 1 - len(body))
        if not chunk:
            return bytes(body)
        body += chunk
    return None


def _bad_request(message: str) -> web.Response:
    return json_error(400, "bad_request", message)


async def invalidate(request: web.Request) -> web.Response:
    svc = ops_services(request)
    admin = svc.settings.admin_token
    if admin is None:
        return json_error(404, "not_found", "Not found")
    try:
        given = parse_authorization(request.headers.getall("Authorization", ()), 4096)
    except Unauthorized as exc:
        return json_error(401, "unauthorized", exc.message, {"WWW-Authenticate": WWW_AUTHENTICATE})
    if not hmac.compare_digest(given.encode(), admin.get_secret_value().encode()):
        return json_error(401, "unauthorized", "Access token is invalid",
                          {"WWW-Authenticate": WWW_AUTHENTICATE})

    if request.content_length is not None and request.content_length > MAX_BODY:
        return json_error(413, "payload_too_large", "Body too large")
    body = await _read_body(request.content, MAX_BODY)
    if body is None:
        return json_error(413, "payload_too_large", "Body too large")
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return _bad_request("Body must be a JSON object")
    if not isinstance(doc, dict):
        return _bad_request("Body must be a JSON object")

    inv = svc.invalidator
    token, scope, tenant = doc.get("token"), doc.get("scope"), doc.get("tenant_id")
    if (token is None) == (tenant is None):
        return _bad_request("Give exactly one of 'token' or 'tenant_id'")
    if scope is not None and (token is None or not isinstance(scope, str) or not scope):
        return _bad_request("'scope' must be a non-empty string and goes with 'token'")
    if token is not None:
        if not isinstance(token, str) or not token:
            return _bad_request("'token' must be a non-empty string")
        await inv.token(token, scope, source="admin")
        return web.json_response({"invalidated": "token", "scope": scope or "all"},
                                 dumps=lambda o: orjson.dumps(o).decode())
    try:
        tenant_id = str(uuid.UUID(str(tenant)))
    except ValueError:
        return _bad_request("'tenant_id' must be a UUID")
    await inv.tenant(tenant_id, source="admin", publish=True)
    return web.json_response({"invalidated": "tenant", "tenant_id": tenant_id},
                             dumps=lambda o: orjson.dumps(o).decode())
