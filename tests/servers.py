"""Real Postgres, Redis and nginx servers for the tests, on loopback ports in temp dirs.

Each server can be stopped and started again on the same port, so tests can simulate outages.
Postgres refuses to run as root: when we are root, its commands run as the `postgres` user.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

PG_PASSWORD = "pg-secret-pw"  # appears in DSNs so tests can check it is never printed


class ServerUnavailable(RuntimeError):
    """The server's binaries are not installed on this machine."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 15.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s")


def _pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)
    path = found[0] if found else shutil.which(name)
    if not path:
        raise ServerUnavailable(f"PostgreSQL binary {name!r} not found (install postgresql)")
    return path


class PostgresServer:
    def __init__(self) -> None:
        self.initdb = _pg_bin("initdb")
        self.pg_ctl = _pg_bin("pg_ctl")
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="sidecar-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "postgres.log"
        self._as_user: list[str] = []
        if os.geteuid() == 0:
            self._as_user = ["runuser", "-u", "postgres", "--"]
            shutil.chown(self.dir, "postgres", "postgres")
        self.running = False

    @property
    def dsn(self) -> str:
        return f"postgresql://sidecar:{PG_PASSWORD}@127.0.0.1:{self.port}/sidecar"

    @property
    def admin_dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/sidecar"

    def _run(self, *cmd: str) -> None:
        subprocess.run([*self._as_user, *cmd], check=True, capture_output=True, timeout=120)

    def setup(self) -> PostgresServer:
        self._run(self.initdb, "-D", str(self.data), "-U", "postgres", "--auth=trust",
                  "--encoding=UTF8", "--no-sync")
        conf = self.data / "postgresql.conf"
        with open(conf, "a") as f:
            f.write(
                f"\nport = {self.port}\nlisten_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{self.dir}'\n"
                "shared_preload_libraries = 'pg_stat_statements'\n"
                "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
                "max_connections = 200\n"
            )
        self.start()
        self.psql(f"CREATE ROLE sidecar LOGIN SUPERUSER PASSWORD '{PG_PASSWORD}'", db="postgres")
        self.psql("CREATE DATABASE sidecar OWNER sidecar", db="postgres")
        self.psql("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        return self

    def start(self) -> None:
        self._run(self.pg_ctl, "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60",
                  "start")
        self.running = True

    def stop(self, mode: str = "fast") -> None:
        """`fast` keeps every committed row (outage tests restart the server); `immediate` is
        for throwing it away (it does not wait for backends, e.g. ones still authenticating
        connections that queued up while the server was paused)."""
        if self.running:
            self._run(self.pg_ctl, "-D", str(self.data), "-m", mode, "-w", "stop")
            self.running = False

    def _pids(self) -> list[int]:
        """The postmaster and its children (backends, checkpointer, ...)."""
        master = int((self.data / "postmaster.pid").read_text().split()[0])
        pids = [master]
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        if int(f.read().rsplit(")", 1)[1].split()[1]) == master:
                            pids.append(int(entry))
                except (OSError, ValueError, IndexError):
                    continue
        return pids

    def pause(self) -> None:
        """Hang (SIGSTOP) rather than stop: connections stay open and never answer."""
        for pid in self._pids():
            os.kill(pid, signal.SIGSTOP)

    def resume(self) -> None:
        for pid in self._pids():
            os.kill(pid, signal.SIGCONT)

    def psql(self, sql: str, db: str = "sidecar") -> str:
        out = subprocess.run(
            ["psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-d", db,
             "-v", "ON_ERROR_STOP=1", "-Atqc", sql],
            check=True, capture_output=True, text=True, timeout=60,
        )
        return out.stdout.strip()

    def destroy(self) -> None:
        try:
            if self.running:
                self.resume()  # a paused server cannot shut down
            self.stop("immediate")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def benchmark_postgres() -> Iterator[str]:
    """For benchmarks: SIDECAR_TEST_DATABASE_URL, or a throwaway server for the duration."""
    external = os.environ.get("SIDECAR_TEST_DATABASE_URL")
    if external:
        yield external
        return
    print("starting a throwaway Postgres ...", file=sys.stderr, flush=True)
    server = PostgresServer().setup()
    try:
        yield server.dsn
    finally:
        server.destroy()


class RedisServer:
    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if not binary:
            raise ServerUnavailable("redis-server not found (install redis-server)")
        self.binary = binary
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="sidecar-redis-"))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def setup(self) -> RedisServer:
        self.start()
        return self

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.dir), "--protected-mode", "no",
             "--logfile", str(self.dir / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_port(self.port)

    def pause(self) -> None:
        """Hang (SIGSTOP) rather than stop: the data stays, connections never answer."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGCONT)  # a paused server cannot die otherwise
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None

    def destroy(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


def nginx_binary() -> str:
    binary = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx")
                                       else None)
    if not binary:
        raise ServerUnavailable("nginx not found (install nginx-light)")
    return binary


class NginxServer:
    """nginx in the foreground with a configuration given as text (an `http {}` body)."""

    def __init__(self, http_body: str) -> None:
        self.binary = nginx_binary()
        self.dir = Path(tempfile.mkdtemp(prefix="sidecar-nginx-"))
        self.http_body = http_body
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, port: int) -> None:
        d = self.dir
        (d / "nginx.conf").write_text(
            f"daemon off;\nmaster_process off;\npid {d}/nginx.pid;\nerror_log {d}/error.log info;\n"
            "events { worker_connections 256; }\n"
            "http {\n"
            f"  access_log {d}/access.log;\n"
            f"  client_body_temp_path {d}/body; proxy_temp_path {d}/proxy;\n"
            f"  fastcgi_temp_path {d}/fcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;\n"
            f"{self.http_body}\n}}\n"
        )
        self.proc = subprocess.Popen(
            [self.binary, "-p", str(d), "-c", str(d / "nginx.conf")],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        try:
            wait_port(port, timeout=10)
        except TimeoutError:
            self.proc.kill()
            _, err = self.proc.communicate(timeout=5)
            raise RuntimeError(f"nginx did not start: {err.decode(errors='replace')}") from None

    def destroy(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)
