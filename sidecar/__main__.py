"""Command line: `sidecar serve | check-config | schema | token | healthcheck` (SPEC 12)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.resources
import logging
import resource
import secrets
import signal
import sys
import uuid
from collections.abc import Sequence

import asyncpg
from aiohttp import web

from sidecar import __version__
from sidecar.settings import Settings, SettingsError, load_settings

log = logging.getLogger("sidecar")


# The channel written in schema.sql, which is also the setting's default.
DEFAULT_CHANNEL = str(Settings.model_fields["notify_channel"].default)


def schema_sql(channel: str = DEFAULT_CHANNEL) -> str:
    """The shipped schema with the NOTIFY channel the triggers use set to `channel` (a
    validated identifier, see Settings.notify_channel)."""
    sql = importlib.resources.files("sidecar").joinpath("schema.sql").read_text()
    return sql.replace(f"'{DEFAULT_CHANNEL}'", f"'{channel}'")


def _settings_or_exit() -> Settings:
    try:
        return load_settings()
    except SettingsError as exc:
        print("invalid configuration:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        raise SystemExit(2) from None


# Room for pools, subscriptions, logs and the ops listener besides the client connections.
OPS_MAX_CONNECTIONS = 64
FD_RESERVE = 512


def raise_fd_limit(connections: int) -> None:
    """Raise the soft file-descriptor limit to the hard one, and warn when the connection
    caps do not fit below it: at the limit accept() fails in a loop, and no client (not even
    a probe of the ops listener) gets in."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    needed = connections + FD_RESERVE
    if soft != resource.RLIM_INFINITY and soft < needed:
        log.warning("file-descriptor limit below the connection caps: lower "
                    "SIDECAR_MAX_CLIENT_CONNECTIONS or raise the limit",
                    extra={"fields": {"nofile": soft, "needed": needed}})


async def _serve(settings: Settings, *, reuse_port: bool = False, worker: int = 0) -> None:
    from sidecar.app import METRICS, create_app, create_main_runner, create_ops_app
    from sidecar.eventloop import resolve
    from sidecar.logs import stdout_access_log
    from sidecar.server import SidecarRunner, ops_limits
    from sidecar.sockets import BindError, bind

    try:
        main_sock = bind("SIDECAR_LISTEN", settings.listen, backlog=2048, reuse_port=reuse_port)
        ops_sock = bind("SIDECAR_OPS_LISTEN", settings.ops_listen, backlog=128,
                        reuse_port=reuse_port)
    except BindError as exc:
        log.error(str(exc), extra={"fields": {"setting": exc.setting, "address": exc.address}})
        raise SystemExit(1) from None

    app = create_app(settings, worker=worker)
    access_log = stdout_access_log(settings.access_log)
    metrics = app[METRICS]
    raise_fd_limit(settings.max_client_connections + OPS_MAX_CONNECTIONS)
    runner = create_main_runner(app, settings, access_log,
                                shutdown_timeout=settings.shutdown_grace,
                                handle_signals=False)
    await runner.setup()
    # sidecar_requests_total counts the main listener's requests only; the ops listener's
    # refused connections are counted under their own label.
    ops_runner = SidecarRunner(create_ops_app(app), limits=ops_limits(metrics),
                               access_log=None, handle_signals=False)
    await ops_runner.setup()
    try:
        await web.SockSite(runner, main_sock).start()
        await web.SockSite(ops_runner, ops_sock).start()
        log.info("listening", extra={"fields": {
            "listen": str(settings.listen), "ops_listen": str(settings.ops_listen),
            "mode": "proxy" if settings.upstream_url else "decision-only",
            "version": __version__, "event_loop": resolve(settings.event_loop),
            "access_log": settings.access_log,
        }})
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("shutting down", extra={"fields": {"grace_s": settings.shutdown_grace}})
    finally:
        # Main first: stop accepting, let in-flight requests finish (bounded by the grace),
        # then the cleanup contexts flush last-used writes and close pools.
        await runner.cleanup()
        await ops_runner.cleanup()
        if access_log is not None:
            access_log.close()  # the lines of the last requests, before "stopped"
    log.info("stopped")


def cmd_serve(args: argparse.Namespace) -> int:
    from sidecar.logs import setup_logging

    settings = _settings_or_exit()
    setup_logging(settings.log_level)
    if args.workers < 1:
        print("--workers must be at least 1", file=sys.stderr)
        return 2
    from sidecar.eventloop import run

    if args.workers == 1:
        run(_serve(settings), settings.event_loop)
        return 0
    from sidecar.workers import run_workers

    def work(index: int) -> int:
        run(_serve(settings, reuse_port=True, worker=index), settings.event_loop)
        return 0

    return run_workers(args.workers, work)


def cmd_check_config(args: argparse.Namespace) -> int:
    settings = _settings_or_exit()
    for key, value in settings.redacted().items():
        print(f"{key}={value}")
    return 0


def cmd_healthcheck(args: argparse.Namespace) -> int:
    from sidecar.healthcheck import check

    problem = check(_settings_or_exit().ops_listen, args.timeout)
    if problem is not None:
        print(f"unhealthy: {problem}", file=sys.stderr)
        return 1
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    if not args.apply:
        # Printing needs no database, only the channel: a placeholder DSN lets the rest of the
        # environment (SIDECAR_NOTIFY_CHANNEL) be read and validated as usual.
        try:
            channel = load_settings(database_url="postgresql://unused/unused").notify_channel
        except SettingsError:
            channel = _settings_or_exit().notify_channel
        print(schema_sql(channel))
        return 0
    settings = _settings_or_exit()
    sql = schema_sql(settings.notify_channel)

    async def apply() -> None:
        conn = await asyncpg.connect(settings.database_url.get_secret_value())
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(apply())
    print("schema applied", file=sys.stderr)
    return 0


def _uuid_or_none(value: str | None) -> str | None:
    if value is None:
        return None
    return str(uuid.UUID(value))


def cmd_token(args: argparse.Namespace) -> int:
    from sidecar.metrics import Metrics
    from sidecar.store import PostgresTokenStore

    settings = _settings_or_exit()
    store = PostgresTokenStore(
        settings.database_url.get_secret_value(), metrics=Metrics(),
        token_hash=settings.token_hash, pool_size=1,
    )

    async def run() -> int:
        await store.open()
        try:
            if args.token_cmd == "create":
                token = f"{args.scope}-{secrets.token_urlsafe(24)}"
                row_id = await store.insert_token(
                    token, args.scope, _uuid_or_none(args.tenant_id), _uuid_or_none(args.app_id)
                )
                print(f"token id: {row_id}", file=sys.stderr)
                print(token)
                return 0
            token = sys.stdin.readline().strip()
            if not token:
                print("no token on standard input", file=sys.stderr)
                return 2
            deleted = await store.delete_token(token, args.scope)
            print(f"revoked {deleted} token row(s)", file=sys.stderr)
            return 0 if deleted else 1
        finally:
            await store.close()

    return asyncio.run(run())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sidecar",
        description="API-key authentication sidecar. Settings come from SIDECAR_* environment "
        "variables and an optional .env file (see config/sidecar.env.example).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command")
    p = sub.add_parser("serve", help="run the proxy/decision listener and the ops listener")
    p.add_argument("--workers", type=int, default=1,
                   help="processes sharing the ports via SO_REUSEPORT (default 1)")
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("check-config", help="validate settings and print them, secrets redacted")
    p.set_defaults(func=cmd_check_config)
    p = sub.add_parser("healthcheck", help="exit 0 when GET /healthz on SIDECAR_OPS_LISTEN "
                       "answers 200 (the container HEALTHCHECK)")
    p.add_argument("--timeout", type=float, default=2.0, help="seconds (default 2)")
    p.set_defaults(func=cmd_healthcheck)
    p = sub.add_parser("schema", help="print (or apply) the token table schema and triggers")
    p.add_argument("--apply", action="store_true", help="apply it to SIDECAR_DATABASE_URL")
    p.set_defaults(func=cmd_schema)
    p = sub.add_parser("token", help="create or revoke tokens")
    tsub = p.add_subparsers(dest="token_cmd", required=True)
    c = tsub.add_parser("create", help="create a token and print it once on standard output")
    c.add_argument("--scope", required=True, help="token type, e.g. app or dataset")
    c.add_argument("--tenant-id", help="tenant uuid")
    c.add_argument("--app-id", help="app uuid")
    c.set_defaults(func=cmd_token)
    r = tsub.add_parser("revoke", help="delete the token read from standard input "
                        "(never pass tokens as arguments: they show in process lists)")
    r.add_argument("--scope", help="only the row of this scope (default: every scope)")
    r.set_defaults(func=cmd_token)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["serve"])
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
