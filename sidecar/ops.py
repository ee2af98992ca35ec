"""The ops listener (SPEC 10): health, readiness, metrics, the admin API and /openapi.json.

Rule: `/healthz` touches no dependency (it says only that the event loop runs); `/readyz`
asks each dependency once, with short timeouts (`sidecar.readiness`). Each handler is built
with exactly the objects it reports on, so the ops app needs nothing from the main one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import SecretStr

from sidecar.admin import make_invalidate_handler
from sidecar.openapi import openapi_json
from sidecar.responses import Handler, error_middleware, json_body

if TYPE_CHECKING:
    from sidecar.invalidation import Invalidator
    from sidecar.metrics import Metrics
    from sidecar.readiness import Readiness


async def healthz(request: web.Request) -> web.Response:
    return json_body({"status": "ok"})


def make_readyz(readiness: Readiness) -> Handler:
    async def readyz(request: web.Request) -> web.StreamResponse:
        status, doc = await readiness.report()
        return json_body(doc, status)

    return readyz


def make_metrics(metrics: Metrics) -> Handler:
    async def metrics_handler(request: web.Request) -> web.StreamResponse:
        return web.Response(body=metrics.exposition(),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    return metrics_handler


def make_openapi(scopes: frozenset[str]) -> Handler:
    body = openapi_json(scopes)

    async def openapi(request: web.Request) -> web.StreamResponse:
        return web.Response(body=body, content_type="application/json")

    return openapi


def build_ops_app(
    *,
    metrics: Metrics,
    readiness: Readiness,
    invalidator: Invalidator,
    admin_token: SecretStr | None,
) -> web.Application:
    app = web.Application(middlewares=[error_middleware])
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", make_readyz(readiness))
    app.router.add_get("/metrics", make_metrics(metrics))
    app.router.add_post("/admin/invalidate", make_invalidate_handler(invalidator, admin_token))
    app.router.add_get("/openapi.json", make_openapi(invalidator.scopes))
    return app
