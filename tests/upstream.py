"""A real upstream aiohttp app for the tests: echo, SSE, WebSocket, slow and large bodies."""

from __future__ import annotations

import asyncio
import hashlib

import orjson
from aiohttp import WSMsgType, web

CHUNK = b"x" * 65536
CALLS = web.AppKey("calls", list[str])


async def echo(request: web.Request) -> web.Response:
    digest = hashlib.sha256()
    size = 0
    async for chunk in request.content.iter_any():
        digest.update(chunk)
        size += len(chunk)
    request.app[CALLS].append(request.path)
    body = {
        "method": request.method,
        "path": request.path,
        "raw_path": request.raw_path,
        "query": request.raw_path.partition("?")[2],
        "headers": [[k, v] for k, v in request.headers.items()],
        "body_sha256": digest.hexdigest(),
        "body_size": size,
    }
    return web.Response(body=orjson.dumps(body), content_type="application/json",
                        headers={"X-Upstream": "echo"})


async def sse(request: web.Request) -> web.StreamResponse:
    count = int(request.query.get("count", "5"))
    interval = float(request.query.get("interval", "0.2"))
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                       "Cache-Control": "no-cache"})
    await resp.prepare(request)
    for i in range(count):
        await resp.write(f"data: event {i}\n\n".encode())
        await asyncio.sleep(interval)
    await resp.write_eof()
    return resp


async def download(request: web.Request) -> web.StreamResponse:
    size = int(request.query["size"])
    resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    resp.content_length = size
    await resp.prepare(request)
    left = size
    while left > 0:
        n = min(left, len(CHUNK))
        await resp.write(CHUNK[:n])
        left -= n
    await resp.write_eof()
    return resp


async def slow(request: web.Request) -> web.Response:
    await asyncio.sleep(float(request.query.get("delay", "5")))
    return web.Response(text="late")


async def status(request: web.Request) -> web.Response:
    return web.Response(status=int(request.match_info["code"]), text="status")


async def ws(request: web.Request) -> web.WebSocketResponse:
    sock = web.WebSocketResponse()
    await sock.prepare(request)
    await sock.send_str("hello " + request.headers.get("X-Tenant-Id", "?"))
    async for msg in sock:
        if msg.type == WSMsgType.TEXT:
            await sock.send_str("echo:" + msg.data)
        elif msg.type == WSMsgType.BINARY:
            await sock.send_bytes(msg.data)
    return sock


def make_upstream() -> web.Application:
    app = web.Application(client_max_size=0)
    app[CALLS] = []
    app.router.add_get("/sse", sse)
    app.router.add_get("/download", download)
    app.router.add_get("/slow", slow)
    app.router.add_get("/ws", ws)
    app.router.add_route("*", "/status/{code}", status)
    app.router.add_route("*", "/{tail:.*}", echo)
    return app
