"""Throwaway Postgres, Redis and nginx servers on loopback: the one implementation that the
tests, the benchmarks and `deploy/local/demo.sh` (`python -m tests.servers demo-up`) share.

Each server can be stopped and started again on the same port, so tests can simulate outages.
Postgres refuses to run as root: when we are root, its commands run as the `postgres` user.

Adding a kind of server: a class that takes its port (default: `free_port()`, never a fixed
port: those collide with the ephemeral range) and a directory (default: a new temp dir),
with `start()`/`stop()` that block until it answers or is gone, and `destroy()`; binaries
looked up here, raising `ServerUnavailable` when missing (CI turns that into a failure);
then a session-scoped fixture in tests/conftest.py that starts it once per test run.
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
from collections.abc import Callable, Iterator, Sequence
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
    """With `password`, every role needs it (scram, for the demo on a shared machine) and the
    `sidecar` role is an ordinary owner; without, local connections are trusted and `sidecar`
    is a superuser (tests read pg_stat_statements and terminate backends)."""

    def __init__(self, *, port: int | None = None, directory: Path | None = None,
                 password: str | None = None) -> None:
        self.initdb = _pg_bin("initdb")
        self.pg_ctl = _pg_bin("pg_ctl")
        self.port = port or free_port()
        self.password = password
        self._as_user: list[str] = []
        if directory is None:
            self.dir = Path(tempfile.mkdtemp(prefix="sidecar-pg-"))
        else:
            directory.mkdir(parents=True, exist_ok=True)
            self.dir = directory
        if os.geteuid() == 0:
            self._as_user = ["runuser", "-u", "postgres", "--"]
            shutil.chown(self.dir, "postgres", "postgres")
            self.dir.chmod(0o700)
            if subprocess.run([*self._as_user, "test", "-w", str(self.dir)]).returncode:
                # Below a directory the postgres user cannot enter (a checkout in /root):
                # rather than opening up the user's directories, a private temp dir.
                self.dir.rmdir()
                self.dir = Path(tempfile.mkdtemp(prefix="sidecar-pg-"))
                shutil.chown(self.dir, "postgres", "postgres")
        self.data = self.dir / "data"
        self.log = self.dir / "postgres.log"
        self.running = False

    @property
    def dsn(self) -> str:
        return f"postgresql://sidecar:{self.password or PG_PASSWORD}@127.0.0.1:{self.port}/sidecar"

    @property
    def admin_dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/sidecar"

    def _run(self, *cmd: str) -> None:
        # cwd: postgres tools fail when they cannot read the current directory.
        subprocess.run([*self._as_user, *cmd], check=True, capture_output=True, timeout=120,
                       cwd=self.dir)

    def setup(self) -> PostgresServer:
        auth = ["--auth=trust"]
        pwfile = self.dir / "pwfile"
        if self.password is not None:
            pwfile.write_text(self.password + "\n")
            pwfile.chmod(0o600)
            if self._as_user:
                shutil.chown(pwfile, "postgres", "postgres")
            auth = ["--auth=scram-sha-256", f"--pwfile={pwfile}"]
        try:
            self._run(self.initdb, "-D", str(self.data), "-U", "postgres", *auth,
                      "--encoding=UTF8", "--no-sync")
        finally:
            pwfile.unlink(missing_ok=True)
        # No unix socket for a given directory: a long checkout path would exceed the socket
        # path limit. Every client here uses TCP on loopback anyway.
        sockets = self.dir if self.password is None else ""
        with open(self.data / "postgresql.conf", "a") as f:
            f.write(
                f"\nport = {self.port}\nlisten_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{sockets}'\n"
                "shared_preload_libraries = 'pg_stat_statements'\n"
                "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
                "max_connections = 200\n"
            )
        self.start()
        if self.password is None:
            self.psql(f"CREATE ROLE sidecar LOGIN SUPERUSER PASSWORD '{PG_PASSWORD}'",
                      db="postgres")
        else:
            self.psql(f"CREATE ROLE sidecar LOGIN PASSWORD '{self.password}'", db="postgres")
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
            with contextlib.suppress(ProcessLookupError):  # a backend that just ended
                os.kill(pid, signal.SIGCONT)

    def psql(self, sql: str, db: str = "sidecar") -> str:
        # SQL on stdin, not in argv: with a password, the statements may carry it, and
        # process listings must not show it. The password goes in the environment.
        env = {**os.environ, **({"PGPASSWORD": self.password} if self.password else {})}
        out = subprocess.run(
            ["psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-d", db,
             "-v", "ON_ERROR_STOP=1", "-Atq"],
            input=sql, check=True, capture_output=True, text=True, timeout=60, env=env,
        )
        return out.stdout.strip()

    def destroy(self) -> None:
        try:
            if self.running:
                self.resume()  # a paused server cannot shut down
            self.stop("immediate")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


class PostgresStandby(PostgresServer):
    """A hot standby of a (trust-mode) PostgresServer: `pg_basebackup -R`, then streaming
    replication. Everything (roles, the `sidecar` database, pg_stat_statements) comes from
    the primary; initdb's pg_hba already lets loopback replication connections in."""

    def __init__(self, primary: PostgresServer) -> None:
        super().__init__()
        self.primary = primary

    def setup(self) -> PostgresStandby:
        self._run(_pg_bin("pg_basebackup"), "-h", "127.0.0.1", "-p", str(self.primary.port),
                  "-U", "postgres", "-D", str(self.data), "-R", "-X", "stream", "--no-sync",
                  # Not a spread checkpoint: that would take minutes on an idle primary.
                  "--checkpoint=fast")
        with open(self.data / "postgresql.conf", "a") as f:  # later lines win
            f.write(f"\nport = {self.port}\nunix_socket_directories = '{self.dir}'\n"
                    "hot_standby = on\n")
        self.start()
        deadline = time.monotonic() + 30
        while self.psql("SELECT count(*) FROM pg_stat_wal_receiver WHERE status = 'streaming'",
                        db="postgres") != "1":
            if time.monotonic() > deadline:
                raise RuntimeError("the standby does not stream from its primary")
            time.sleep(0.1)
        return self


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
    """With `password`, clients must AUTH (`requirepass`, in the config file, not in argv);
    `detach` keeps it running after this process exits (the demo stops it by pid)."""

    def __init__(self, *, port: int | None = None, directory: Path | None = None,
                 password: str | None = None, detach: bool = False,
                 extra: Sequence[str] = ()) -> None:
        binary = shutil.which("redis-server")
        if not binary:
            raise ServerUnavailable("redis-server not found (install redis-server)")
        self.binary = binary
        self.port = port or free_port()
        if directory is None:
            self.dir = Path(tempfile.mkdtemp(prefix="sidecar-redis-"))
        else:
            directory.mkdir(parents=True, exist_ok=True)
            self.dir = directory
        self.password = password
        self.detach = detach
        self.extra = list(extra)  # more configuration lines (cluster, replication, TLS)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def setup(self) -> RedisServer:
        self.start()
        return self

    def start(self) -> None:
        conf = self.dir / "redis.conf"
        lines = [f"port {self.port}", "bind 127.0.0.1", 'save ""', "appendonly no",
                 f"dir {self.dir}", f"logfile {self.dir / 'redis.log'}"]
        lines.append(f"requirepass {self.password}" if self.password else "protected-mode no")
        lines += self.extra
        conf.write_text("\n".join(lines) + "\n")
        conf.chmod(0o600)
        self.proc = subprocess.Popen(
            [self.binary, str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=self.detach,
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


def _started_or_raise(proc: subprocess.Popen[bytes], port: int, what: str) -> None:
    """Until `proc` listens on `port`; if it never does, its stderr in the error."""
    try:
        wait_port(port, timeout=10)
    except TimeoutError:
        proc.kill()
        _, err = proc.communicate(timeout=5)
        raise RuntimeError(f"{what} did not start: {err.decode(errors='replace')}") from None


def _terminate(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is not None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


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
        _started_or_raise(self.proc, port, "nginx")

    def destroy(self) -> None:
        _terminate(self.proc)
        self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)


def _demo_up(state: Path, pg_port: int, redis_port: int) -> None:
    """`python -m tests.servers demo-up STATE PG_PORT REDIS_PORT`, for deploy/local/demo.sh:
    Postgres and Redis with the password in $DEMO_SECRET, left running; their locations in
    STATE/pghome and STATE/redis.pid, which the demo's clean-up reads."""
    secret = os.environ["DEMO_SECRET"]
    pg = PostgresServer(port=pg_port, directory=state / "postgres", password=secret)
    (state / "pghome").write_text(f"{pg.dir}\n")
    try:
        pg.setup()
    except subprocess.CalledProcessError as exc:
        log = pg.log.read_text(errors="replace") if pg.log.exists() else ""
        sys.exit(f"PostgreSQL did not start: {exc.stderr!r}\n{log[-2000:]}")
    redis = RedisServer(port=redis_port, directory=state / "redis", password=secret,
                        detach=True)
    redis.start()
    assert redis.proc is not None
    (state / "redis.pid").write_text(f"{redis.proc.pid}\n")


if __name__ == "__main__":
    if len(sys.argv) != 5 or sys.argv[1] != "demo-up":
        sys.exit("usage: python -m tests.servers demo-up STATE PG_PORT REDIS_PORT")
    _demo_up(Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))


class PgBouncerServer:
    """PgBouncer in front of a PostgresServer, in the given pooling mode. It refuses to run as
    root, so as root it runs as the `postgres` user, like Postgres."""

    def __init__(self, backend: PostgresServer, pool_mode: str = "transaction") -> None:
        binary = shutil.which("pgbouncer") or (
            "/usr/sbin/pgbouncer" if os.path.exists("/usr/sbin/pgbouncer") else None)
        if not binary:
            raise ServerUnavailable("pgbouncer not found (install pgbouncer)")
        self.binary = binary
        self.backend = backend
        self.pool_mode = pool_mode
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="sidecar-pgbouncer-"))
        self._as_user: list[str] = []
        if os.geteuid() == 0:
            self._as_user = ["runuser", "-u", "postgres", "--"]
            shutil.chown(self.dir, "postgres", "postgres")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def dsn(self) -> str:
        return f"postgresql://sidecar:{PG_PASSWORD}@127.0.0.1:{self.port}/sidecar"

    def start(self) -> PgBouncerServer:
        conf = self.dir / "pgbouncer.ini"
        # auth_type=any: the backend trusts loopback connections, so the pooler needs no
        # user list; the sidecar's password in its URL is simply not checked here.
        conf.write_text(
            "[databases]\n"
            f"sidecar = host=127.0.0.1 port={self.backend.port} dbname=sidecar user=sidecar\n"
            "[pgbouncer]\n"
            f"listen_addr = 127.0.0.1\nlisten_port = {self.port}\n"
            f"pool_mode = {self.pool_mode}\nauth_type = any\nunix_socket_dir =\n"
            "default_pool_size = 4\nmax_client_conn = 200\n"
            f"logfile = {self.dir / 'pgbouncer.log'}\npidfile = {self.dir / 'pgbouncer.pid'}\n"
        )
        if self._as_user:
            shutil.chown(conf, "postgres", "postgres")
        self.proc = subprocess.Popen([*self._as_user, self.binary, str(conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _started_or_raise(self.proc, self.port, "pgbouncer")
        return self

    def destroy(self) -> None:
        _terminate(self.proc)
        self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)


class _FrontProxyServer:
    """A front proxy (Caddy, HAProxy) in the foreground, running a shipped configuration file
    unchanged: its addresses come from environment variables the file reads (`env`, which
    must put the proxy on `port`)."""

    what = ""

    def __init__(self, config: Path, env: dict[str, str], *, port: int | None = None,
                 directory: Path | None = None) -> None:
        self.config = config
        self.port = port or free_port()
        if directory is None:
            self.dir = Path(tempfile.mkdtemp(prefix=f"sidecar-{self.what}-"))
        else:
            directory.mkdir(parents=True, exist_ok=True)
            self.dir = directory
        self.env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.dir),
                    **env}
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> None:
        self.proc = subprocess.Popen(self.command(), env=self.env, cwd=self.dir,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _started_or_raise(self.proc, self.port, self.what)

    def stop(self) -> None:
        _terminate(self.proc)
        self.proc = None

    def destroy(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


class CaddyServer(_FrontProxyServer):
    """`caddy run` on a Caddyfile; its state (autosave, certificates) in the temp dir."""

    what = "caddy"

    def __init__(self, config: Path, env: dict[str, str], *, port: int | None = None,
                 directory: Path | None = None) -> None:
        binary = shutil.which("caddy")
        if not binary:
            raise ServerUnavailable("caddy not found (install caddy)")
        self.binary = binary
        super().__init__(config, env, port=port, directory=directory)
        self.env.update(XDG_CONFIG_HOME=str(self.dir / "config"),
                        XDG_DATA_HOME=str(self.dir / "data"))

    def command(self) -> list[str]:
        return [self.binary, "run", "--adapter", "caddyfile", "--config", str(self.config)]


class HAProxyServer(_FrontProxyServer):
    """`haproxy -db` (foreground, no daemon, no master) on a configuration file."""

    what = "haproxy"

    def __init__(self, config: Path, env: dict[str, str], *, port: int | None = None,
                 directory: Path | None = None) -> None:
        binary = shutil.which("haproxy") or (
            "/usr/sbin/haproxy" if os.path.exists("/usr/sbin/haproxy") else None)
        if not binary:
            raise ServerUnavailable("haproxy not found (install haproxy)")
        self.binary = binary
        super().__init__(config, env, port=port, directory=directory)

    def command(self) -> list[str]:
        return [self.binary, "-db", "-f", str(self.config)]


def redis_cli(port: int, *args: str, password: str | None = None) -> str:
    """One redis-cli command against a loopback Redis; the password goes in the environment
    (REDISCLI_AUTH), not in argv where process lists show it."""
    binary = shutil.which("redis-cli")
    if not binary:
        raise ServerUnavailable("redis-cli not found (install redis-tools)")
    env = {**os.environ, **({"REDISCLI_AUTH": password} if password else {})}
    out = subprocess.run([binary, "-h", "127.0.0.1", "-p", str(port), *args], env=env,
                         check=True, capture_output=True, text=True, timeout=30)
    return out.stdout.strip()


def _until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} after {timeout}s")
        time.sleep(0.1)


class RedisClusterServers:
    """A Redis Cluster of `size` masters on loopback (no replicas), slots spread evenly."""

    def __init__(self, size: int = 3) -> None:
        # The bus port is chosen too: the default (port + 10000) may not exist or be taken.
        self.nodes = [RedisServer(extra=["cluster-enabled yes", "cluster-config-file nodes.conf",
                                         "cluster-node-timeout 2000",
                                         f"cluster-port {free_port()}"]) for _ in range(size)]

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def setup(self) -> RedisClusterServers:
        for node in self.nodes:
            node.start()
        redis_cli(self.nodes[0].port, "--cluster", "create",
                  *(f"127.0.0.1:{n.port}" for n in self.nodes),
                  "--cluster-replicas", "0", "--cluster-yes")
        self.wait_formed()
        return self

    def wait_formed(self) -> None:
        """Until every node says the cluster is whole (after `setup`, or a node's restart:
        a node started again in its directory rejoins by its nodes.conf)."""

        def formed() -> bool:
            try:
                return all("cluster_state:ok" in redis_cli(n.port, "CLUSTER", "INFO")
                           for n in self.nodes)
            except subprocess.CalledProcessError:
                return False

        _until(formed, 30, "the Redis Cluster did not form")

    def destroy(self) -> None:
        for node in self.nodes:
            node.destroy()


SENTINEL_PASSWORD = "sentinel-secret-pw"  # the Sentinel's own requirepass
SENTINEL_DATA_PASSWORD = "sentinel-data-pw"  # the master's and the replica's


class RedisSentinelServers:
    """A master, one replica and one Sentinel (quorum 1) watching them as `master_name`.
    The Sentinel is redis-server in sentinel mode; it rewrites its own configuration file.
    Every one of them requires a password, as in production: the data nodes
    SENTINEL_DATA_PASSWORD, the Sentinel SENTINEL_PASSWORD."""

    def __init__(self, master_name: str = "mymaster") -> None:
        self.master_name = master_name
        pw = SENTINEL_DATA_PASSWORD
        self.master = RedisServer(password=pw, extra=[f"masterauth {pw}"])
        self.replica = RedisServer(password=pw, extra=[
            f"replicaof 127.0.0.1 {self.master.port}", f"masterauth {pw}"])
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="sidecar-sentinel-"))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def sentinels(self) -> str:
        return f"127.0.0.1:{self.port}"

    def master_port(self) -> int:
        """The master's port as the Sentinel says now."""
        return int(redis_cli(self.port, "SENTINEL", "get-master-addr-by-name",
                             self.master_name, password=SENTINEL_PASSWORD).split()[1])

    def setup(self) -> RedisSentinelServers:
        self.master.start()
        self.replica.start()
        conf = self.dir / "sentinel.conf"
        name = self.master_name
        conf.write_text("\n".join([
            f"port {self.port}", "bind 127.0.0.1", "protected-mode no", f"dir {self.dir}",
            f"logfile {self.dir / 'sentinel.log'}",
            f"requirepass {SENTINEL_PASSWORD}",
            f"sentinel monitor {name} 127.0.0.1 {self.master.port} 1",
            f"sentinel auth-pass {name} {SENTINEL_DATA_PASSWORD}",
            f"sentinel down-after-milliseconds {name} 1000",
            f"sentinel failover-timeout {name} 5000",
            f"sentinel parallel-syncs {name} 1",
        ]) + "\n")
        conf.chmod(0o600)
        binary = self.master.binary
        self.proc = subprocess.Popen([binary, str(conf), "--sentinel"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _started_or_raise(self.proc, self.port, "redis sentinel")

        def replica_known() -> bool:
            return "master_link_status:up" in redis_cli(
                self.replica.port, "INFO", "replication", password=SENTINEL_DATA_PASSWORD,
            ) and bool(redis_cli(self.port, "SENTINEL", "replicas", name,
                                 password=SENTINEL_PASSWORD))

        _until(replica_known, 30, "the Sentinel did not find the replica")
        return self

    def destroy(self) -> None:
        _terminate(self.proc)
        self.proc = None
        self.master.destroy()
        self.replica.destroy()
        shutil.rmtree(self.dir, ignore_errors=True)


class RedisTlsServer(RedisServer):
    """Redis with a TLS port besides its plain one; a throwaway CA, server and client
    certificates made with openssl in its directory. `tls-auth-clients` asks for a client
    certificate (mutual TLS)."""

    def __init__(self) -> None:
        self.tls_port = free_port()
        super().__init__()
        if not shutil.which("openssl"):
            raise ServerUnavailable("openssl not found (install openssl)")
        self._certificates()
        d = self.dir
        self.extra = [f"tls-port {self.tls_port}", f"tls-cert-file {d / 'server.pem'}",
                      f"tls-key-file {d / 'server.key'}", f"tls-ca-cert-file {d / 'ca.pem'}",
                      "tls-auth-clients yes"]

    def _openssl(self, *args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60,
                       cwd=self.dir)

    def _certificates(self) -> None:
        self._openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                      "-subj", "/CN=sidecar-test-ca", "-keyout", "ca.key", "-out", "ca.pem")
        ext = self.dir / "san.ext"
        ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        for name, cn in (("server", "127.0.0.1"), ("client", "sidecar")):
            self._openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={cn}",
                          "-keyout", f"{name}.key", "-out", f"{name}.csr")
            self._openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey",
                          "ca.key", "-CAcreateserial", "-days", "2", "-extfile", str(ext),
                          "-out", f"{name}.pem")

    @property
    def tls_url(self) -> str:
        return f"rediss://127.0.0.1:{self.tls_port}/0"
