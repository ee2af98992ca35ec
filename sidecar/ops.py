"""The ops listener (SPEC 10): health, readiness, metrics, the admin API and /openapi.json.

Rule: `/healthz` touches no dependency (it says only that the event loop runs); `/readyz`
asks each dependency once, with short timeouts, and reports 503 only when the sidecar cannot
answer anything at all (it has never reached Postgres, so no cache can be warm).
"""

from __future__ import annotations

import asyncio

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from sidecar.admin import invalidate
from sidecar.openapi import openapi_json
from sidecar.services import MAIN_APP, Services, ops_services


def _json(doc: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(doc), status=status, content_type="application/json")


async def healthz(request: web.Request) -> web.Response:
    return _json({"status": "ok"})


async def _upstream_reachable(svc: Services) -> str:
    forwarder = svc.forwarder
    if forwarder is None:
        return "disabled"
    host, port = forwarder.address
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout=1.0)
    except (TimeoutError, OSError):
        return "down"
    writer.close()
    return "ok"


async def readyz(request: web.Request) -> web.Response:
    svc = ops_services(request)
    redis_check = svc.redis.ping() if svc.redis is not None else None
    pg_ok, redis_ok, upstream = await asyncio.gather(
        svc.store.ping(),
        redis_check if redis_check is not None else asyncio.sleep(0, None),
        _upstream_reachable(svc),
    )
    redis = "disabled" if svc.redis is None else ("ok" if redis_ok else "down")
    if pg_ok and redis != "down":
        status = "ready"
    elif pg_ok or svc.store.ever_connected:
        status = "degraded"
    else:
        status = "not_ready"
    doc = {
        "status": status,
        "postgres": "ok" if pg_ok else "down",
        "redis": redis,
        "upstream": upstream,
    }
    return _json(doc, 503 if status == "not_ready" else 200)


async def metrics(request: web.Request) -> web.Response:
    svc = ops_services(request)
    body = svc.metrics.exposition()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def openapi(request: web.Request) -> web.Response:
    return web.Response(body=openapi_json(), content_type="application/json")


def create_ops_app(main: web.Application) -> web.Application:
    """The ops Application; it reads the main app's services, so start it after the main app."""
    app = web.Application()
    app[MAIN_APP] = main
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/admin/invalidate", invalidate)
    app.router.add_get("/openapi.json", openapi)
    return app
