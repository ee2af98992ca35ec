"""Admin API on the ops listener (SPEC 3.4): `POST /admin/invalidate`.

Rules that hold here:
1. Without `SIDECAR_ADMIN_TOKEN` the admin API does not exist (404), so an ops port exposed
   by mistake offers nothing to try.
2. The admin token is compared in constant time, as bytes, whatever bytes the header holds
   (aiohttp reads undecodable ones as surrogates); a wrong or missing one gets the same 401.
3. Responses never echo the token being invalidated.
4. Bodies are read until their end, at most `MAX_BODY` bytes (413 beyond), however they are
   framed or cut into TCP segments.
5. A body is accepted only in one of the documented forms (`sidecar.openapi`): exactly the
   keys of one form, each of its type, a tenant id in the canonical 8-4-4-4-12 spelling. A
   misspelt key or an unknown scope is a 400, never a 200 that invalidated nothing.
"""

from __future__ import annotations

import hmac
import re
import uuid
from typing import TYPE_CHECKING

import orjson
from aiohttp import StreamReader, web
from pydantic import SecretStr

from sidecar.credentials import parse_authorization
from sidecar.errors import BadRequest, InvalidToken, NotFound, PayloadTooLarge
from sidecar.responses import Handler, json_body

if TYPE_CHECKING:
    from sidecar.invalidation import Invalidator

MAX_BODY = 64 * 1024
# The canonical spelling only: uuid.UUID also takes braces, `urn:uuid:` and bare hex, which the
# documented `format: uuid` does not.
TENANT_ID_PATTERN = (r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}"
                     r"-[0-9a-fA-F]{12}$")
_TENANT_ID_RE = re.compile(TENANT_ID_PATTERN)
_TOKEN_KEYS = frozenset({"token", "scope"})


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


def make_invalidate_handler(invalidator: Invalidator, admin_token: SecretStr | None) -> Handler:
    """`POST /admin/invalidate`; errors are raised and answered by the error middleware."""

    async def invalidate(request: web.Request) -> web.StreamResponse:
        if admin_token is None:
            raise NotFound()  # rule 1
        given = parse_authorization(request.headers.getall("Authorization", ()), 4096)
        expected = admin_token.get_secret_value().encode()
        if not hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected):
            raise InvalidToken()

        if request.content_length is not None and request.content_length > MAX_BODY:
            raise PayloadTooLarge()
        body = await _read_body(request.content, MAX_BODY)
        if body is None:
            raise PayloadTooLarge()
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise BadRequest("Body must be a JSON object") from None
        if not isinstance(doc, dict):
            raise BadRequest("Body must be a JSON object")

        if ("token" in doc) == ("tenant_id" in doc):
            raise BadRequest("Give exactly one of 'token' or 'tenant_id'")
        if "token" in doc:
            if not doc.keys() <= _TOKEN_KEYS:
                raise BadRequest("Only 'scope' may go with 'token'")
            token, scope = doc["token"], doc.get("scope")
            if "scope" in doc and (not isinstance(scope, str) or not scope):
                raise BadRequest("'scope' must be a non-empty string")
            if scope is not None and scope not in invalidator.scopes:
                # A typo would otherwise invalidate nothing and still answer 200.
                raise BadRequest("'scope' is not one of the scopes in SIDECAR_SCOPE_ROUTES")
            if not isinstance(token, str) or not token:
                raise BadRequest("'token' must be a non-empty string")
            await invalidator.token(token, scope, source="admin")
            return json_body({"invalidated": "token", "scope": scope or "all"})
        if len(doc) != 1:
            raise BadRequest("'tenant_id' goes alone")
        tenant = doc["tenant_id"]
        if not isinstance(tenant, str) or not _TENANT_ID_RE.fullmatch(tenant):
            raise BadRequest("'tenant_id' must be a UUID")
        tenant_id = str(uuid.UUID(tenant))
        await invalidator.tenant(tenant_id, source="admin", publish=True)
        return json_body({"invalidated": "tenant", "tenant_id": tenant_id})

    return invalidate
