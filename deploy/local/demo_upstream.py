"""The API the demo protects: it answers every request with what the sidecar told it.

A real upstream (a Dify-style service API) trusts the identity headers the sidecar injects
instead of looking the token up itself. This stand-in echoes the request line and those
headers back as JSON, so `deploy/local/demo.sh` can show (and check) what an upstream
receives, including that a client-sent `X-Tenant-Id` never gets through.

Run: python deploy/local/demo_upstream.py --port 55001   (listens on 127.0.0.1 only)
"""

from __future__ import annotations

import argparse

from aiohttp import web

IDENTITY_HEADERS = ("X-Tenant-Id", "X-App-Id", "X-Api-Token-Id", "X-Api-Token-Scope")


async def whoami(request: web.Request) -> web.Response:
    # None (JSON null) means the header did not arrive at all, which is different from the
    # empty string the sidecar sends for a token without a tenant or app.
    return web.json_response({
        "method": request.method,
        "path": request.path,
        "headers": {name: request.headers.get(name) for name in IDENTITY_HEADERS},
    })


def build_app() -> web.Application:
    app = web.Application()
    app.router.add_route("*", "/{path:.*}", whoami)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Demo upstream: echoes the identity headers it receives as JSON."
    )
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: %(default)s)")
    parser.add_argument("--port", type=int, default=55001, help="port (default: %(default)s)")
    args = parser.parse_args()
    web.run_app(build_app(), host=args.host, port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
