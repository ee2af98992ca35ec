"""The decision endpoint `/_sidecar/auth` on a cached token, next to a bare aiohttp handler.

    .venv/bin/python benchmarks/bench_decision.py [--target decision|proxy] [--requests 3000]
        [--seconds 4] [--concurrency 32] [--rounds 5]

With `--target proxy` the same harness measures the proxy instead: the bare handler is the
upstream, asked once directly and once through the sidecar in proxy mode (L1 hit), so the
difference is what the sidecar adds to a request on its way to the API.

Two servers, each in a process of its own started the same way (default asyncio loop, one
AppRunner, access log off, loopback): the sidecar in decision-only mode, and an
`async def handler(request): return web.Response()` app. One client process asks both the
same bytes (an nginx `auth_request`: `X-Original-URI`, `X-Original-Method`, a Bearer token)
over keep-alive connections, with a small hand-written HTTP/1.1 client so the client costs as
little as possible next to the server. Two phases:

1. latency: one connection, one request at a time: median and p99;
2. throughput: `--concurrency` connections at once: requests/s, median and p99.

Both servers run throughout and every phase alternates between them for `--rounds` rounds,
so a machine busy with something else for a while slows both alike.

The token is resolved once (Postgres) in the warm-up; every measured request is an L1 hit, the
sidecar's hot path, including the last-used queue and the metrics. Redis is not configured:
the hot path never touches it. Postgres is started with tests.servers.PostgresServer unless
SIDECAR_TEST_DATABASE_URL is set (then the schema is applied and one token row added).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make `sidecar` and `tests` importable
    sys.path.insert(0, str(ROOT))

SCHEMA = (ROOT / "config" / "schema.sql").read_text()
TOKEN = "app-bench-" + uuid.uuid4().hex


# --- servers (each in its own process) -----------------------------------------------------

def _serve(make_app: Callable[[], object], ready: Connection) -> None:
    from aiohttp import web

    async def main() -> None:
        app = make_app()
        assert isinstance(app, web.Application)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0, backlog=2048).start()
        ready.send(runner.addresses[0][1])
        try:
            await asyncio.get_running_loop().run_in_executor(None, ready.recv)  # until told
        finally:
            await runner.cleanup()

    asyncio.run(main())


def make_bare_app() -> object:
    from aiohttp import web

    async def handler(_: web.Request) -> web.Response:
        return web.Response()

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    return app


def make_sidecar_app() -> object:
    from sidecar.app import create_app
    from sidecar.settings import load_settings

    settings = load_settings(
        database_url=os.environ["BENCH_DATABASE_URL"],
        upstream_url=os.environ.get("BENCH_UPSTREAM_URL") or None,
        scope_routes="/v1/datasets=dataset,/v1/workspaces/current/models=dataset,/=app",
    )
    return create_app(settings)


@dataclass
class Server:
    name: str
    port: int
    process: multiprocessing.process.BaseProcess
    control: Connection

    def stop(self) -> None:
        self.control.send("stop")
        self.process.join(timeout=15)
        if self.process.is_alive():
            self.process.kill()


def start_server(name: str, make_app: Callable[[], object]) -> Server:
    ctx = multiprocessing.get_context("spawn")
    ours, theirs = ctx.Pipe()
    process = ctx.Process(target=_serve, args=(make_app, theirs), daemon=True)
    process.start()
    if not ours.poll(30):
        process.kill()
        raise RuntimeError(f"{name} server did not start")
    return Server(name, ours.recv(), process, ours)


# --- client ------------------------------------------------------------------------------

def request_bytes(port: int, target: str) -> bytes:
    if target == "proxy":
        line, extra = "POST /v1/chat-messages?user=bench", ""
    else:
        line = "GET /_sidecar/auth"
        extra = "X-Original-URI: /v1/chat-messages?user=bench\r\nX-Original-Method: POST\r\n"
    return (
        f"{line} HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{port}\r\n"
        f"Authorization: Bearer {TOKEN}\r\n"
        f"{extra}"
        "Content-Length: 0\r\n"
        "\r\n"
    ).encode()


class KeepAlive:
    """One keep-alive HTTP/1.1 connection; responses must carry Content-Length."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 request: bytes) -> None:
        self.reader, self.writer, self.request = reader, writer, request

    @classmethod
    async def open(cls, port: int, target: str) -> KeepAlive:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer, request_bytes(port, target))

    async def ask(self) -> int:
        self.writer.write(self.request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        if length:
            await self.reader.readexactly(length)
        return status

    def close(self) -> None:
        self.writer.close()


@dataclass
class Samples:
    seconds: list[float]  # one per request
    wall: float  # time the requests took together

    def add(self, other: Samples) -> None:
        self.seconds += other.seconds
        self.wall += other.wall


@dataclass
class Numbers:
    median_us: float
    p99_us: float
    rps: float

    @classmethod
    def of(cls, samples: Samples) -> Numbers:
        ordered = sorted(samples.seconds)
        p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
        return cls(statistics.median(ordered) * 1e6, p99 * 1e6, len(ordered) / samples.wall)


async def latency(port: int, target: str, requests: int) -> Samples:
    conn = await KeepAlive.open(port, target)
    try:
        for _ in range(100):  # warm-up: connection and code paths hot
            assert await conn.ask() == 200
        samples: list[float] = []
        started = time.perf_counter()
        for _ in range(requests):
            t0 = time.perf_counter()
            status = await conn.ask()
            samples.append(time.perf_counter() - t0)
            assert status == 200, status
        return Samples(samples, time.perf_counter() - started)
    finally:
        conn.close()


async def throughput(port: int, target: str, concurrency: int, seconds: float) -> Samples:
    conns = [await KeepAlive.open(port, target) for _ in range(concurrency)]
    samples: list[float] = []
    deadline = 0.0

    async def worker(conn: KeepAlive) -> None:
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            status = await conn.ask()
            samples.append(time.perf_counter() - t0)
            assert status == 200, status

    try:
        deadline = time.perf_counter() + 0.2  # warm-up
        await asyncio.gather(*(worker(c) for c in conns))
        samples.clear()
        started = time.perf_counter()
        deadline = started + seconds
        await asyncio.gather(*(worker(c) for c in conns))
        return Samples(samples, time.perf_counter() - started)
    finally:
        for conn in conns:
            conn.close()


# --- set-up and report -----------------------------------------------------------------------

async def prepare_database(dsn: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(SCHEMA)
        await conn.execute(
            "INSERT INTO api_tokens (type, token, tenant_id, app_id) VALUES ('app', $1, $2, $3)",
            TOKEN, uuid.uuid4(), uuid.uuid4(),
        )
    finally:
        await conn.close()


async def run(args: argparse.Namespace) -> dict[str, dict[str, Numbers]]:
    # Both servers run for the whole benchmark and the phases alternate between them, round
    # after round, so a machine busy with something else for a while slows both alike.
    bare = start_server("bare aiohttp handler", make_bare_app)
    if args.target == "proxy":
        bare.name = "direct to the upstream"
        os.environ["BENCH_UPSTREAM_URL"] = f"http://127.0.0.1:{bare.port}"
        servers = [bare, start_server("through the sidecar (L1 hit)", make_sidecar_app)]
    else:
        servers = [bare, start_server("/_sidecar/auth (L1 hit)", make_sidecar_app)]
    # (each server is asked as the target says, the reference server answers any path: 200)
    try:
        lat = {s.name: Samples([], 0.0) for s in servers}
        thr = {s.name: Samples([], 0.0) for s in servers}
        for _ in range(args.rounds):
            for s in servers:
                lat[s.name].add(await latency(s.port, args.target, args.requests // args.rounds))
            for s in servers:
                thr[s.name].add(await throughput(
                    s.port, args.target, args.concurrency, args.seconds / args.rounds))
    finally:
        for s in servers:
            s.stop()
    return {s.name: {"latency": Numbers.of(lat[s.name]), "throughput": Numbers.of(thr[s.name])}
            for s in servers}


def report(results: dict[str, dict[str, Numbers]], args: argparse.Namespace) -> None:
    bare, decision = list(results.values())
    reference, measured = list(results)
    print(f"\nPython {sys.version.split()[0]}, {os.cpu_count()} CPUs, default asyncio loop, "
          "servers and client in separate processes, loopback, keep-alive, access log off")
    print(f"latency: 1 connection, {args.requests} sequential requests; throughput: "
          f"{args.concurrency} connections for {args.seconds:g} s; in {args.rounds} rounds "
          "alternating between the servers, each phase after a warm-up\n")
    header = (f"{'':30}{'lat p50 us':>11}{'lat p99 us':>11}{'req/s':>9}"
              f"{'load p50 us':>12}{'load p99 us':>12}")
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        lat, thr = r["latency"], r["throughput"]
        print(f"{name:30}{lat.median_us:11.0f}{lat.p99_us:11.0f}{thr.rps:9.0f}"
              f"{thr.median_us:12.0f}{thr.p99_us:12.0f}")
    lb, ld = bare["latency"], decision["latency"]
    tb, td = bare["throughput"], decision["throughput"]
    print(f"\n{measured} / {reference}: latency p50 x{ld.median_us / lb.median_us:.2f} "
          f"(+{ld.median_us - lb.median_us:.0f} us), p99 x{ld.p99_us / lb.p99_us:.2f}; "
          f"throughput x{td.rps / tb.rps:.2f}; under load p50 x{td.median_us / tb.median_us:.2f}"
          f", p99 x{td.p99_us / tb.p99_us:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", choices=("decision", "proxy"), default="decision",
                        help="measure the decision endpoint or the proxy")
    parser.add_argument("--requests", type=int, default=3000,
                        help="sequential requests for the latency phase")
    parser.add_argument("--seconds", type=float, default=4.0,
                        help="duration of the throughput phase")
    parser.add_argument("--concurrency", type=int, default=32,
                        help="connections in the throughput phase")
    parser.add_argument("--rounds", type=int, default=5,
                        help="alternations between the two servers")
    args = parser.parse_args()

    from tests.servers import benchmark_postgres

    with benchmark_postgres() as dsn:
        asyncio.run(prepare_database(dsn))
        os.environ["BENCH_DATABASE_URL"] = dsn  # inherited by the spawned sidecar process
        report(asyncio.run(run(args)), args)


if __name__ == "__main__":
    main()
