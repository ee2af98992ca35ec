# Shared by deploy/local/test.sh and deploy/local/demo.sh: install what a fresh Debian/Ubuntu
# machine lacks (PostgreSQL, Redis, nginx, a virtualenv with the package). Source, don't run.

# shellcheck shell=bash
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="$ROOT/.venv"
PYTHON="${PYTHON:-python3}"

say() { printf '==> %s\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"
  elif command -v sudo >/dev/null 2>&1; then sudo "$@"
  else say "need root (or sudo) to run: $*"; return 1
  fi
}

pg_bindir() {
  local d
  d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
  if [ -n "$d" ] && [ -x "$d/initdb" ]; then echo "$d"; return 0; fi
  command -v initdb >/dev/null 2>&1 && dirname "$(command -v initdb)" && return 0
  return 1
}

nginx_bin() { command -v nginx 2>/dev/null || { [ -x /usr/sbin/nginx ] && echo /usr/sbin/nginx; }; }

# ensure_system_packages [with-nginx]: install the servers the tests or the demo start.
ensure_system_packages() {
  local missing=()
  pg_bindir >/dev/null || missing+=(postgresql postgresql-contrib)
  command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
  command -v psql >/dev/null 2>&1 || missing+=(postgresql-client)
  if [ "${1:-}" = with-nginx ]; then
    # The test suite's extra servers: nginx (auth_request) and PgBouncer (SPEC 3.5).
    [ -n "$(nginx_bin)" ] || missing+=(nginx-light)
    command -v pgbouncer >/dev/null 2>&1 || [ -x /usr/sbin/pgbouncer ] || missing+=(pgbouncer)
    # The front proxies of deploy/caddy and deploy/haproxy (SPEC 14).
    command -v caddy >/dev/null 2>&1 || missing+=(caddy)
    command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || missing+=(haproxy)
    # promtool (checks and unit-tests deploy/prometheus/alerts.yml) comes with Prometheus.
    command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
    # Redis Cluster is formed with redis-cli; the Redis TLS test makes its certificates with
    # openssl.
    command -v redis-cli >/dev/null 2>&1 || missing+=(redis-tools)
    command -v openssl >/dev/null 2>&1 || missing+=(openssl)
  fi
  if [ ${#missing[@]} -gt 0 ]; then
    say "installing Debian packages: ${missing[*]}"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    # Their services are not started: the tests run their own servers on free ports, and a
    # system caddy or haproxy that cannot start (no systemd, a port taken) would otherwise fail
    # the install. A policy-rc.d already in place (container images ship one) is left alone.
    local policy=/usr/sbin/policy-rc.d own_policy=
    if [ ! -e "$policy" ]; then
      printf '#!/bin/sh\nexit 101\n' | as_root tee "$policy" >/dev/null
      as_root chmod 755 "$policy"
      own_policy=1
    fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      "${missing[@]}" >/dev/null || { [ -z "$own_policy" ] || as_root rm -f "$policy"; return 1; }
    [ -z "$own_policy" ] || as_root rm -f "$policy"
  fi
  # The Debian packages try to start system-wide services; we never use them.
  pg_bindir >/dev/null || { say "PostgreSQL binaries still missing"; return 1; }
}

# ensure_benchmark_tools: wrk (the load generator of benchmarks/bench_proxy.py); the tests never
# need it.
ensure_benchmark_tools() {
  ensure_system_packages with-nginx
  if ! command -v wrk >/dev/null 2>&1; then
    say "installing Debian packages: wrk"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      wrk >/dev/null
  fi
}

# ensure_venv [extras]: a .venv with the package installed in editable mode.
ensure_venv() {
  local extras="${1:-}"
  if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    say "Python 3.11 or newer is required ($PYTHON is $("$PYTHON" --version 2>&1))"; return 1
  fi
  if [ ! -x "$VENV/bin/python" ]; then
    say "creating $VENV"
    "$PYTHON" -m venv "$VENV" 2>/dev/null || {
      as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
      as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
      "$PYTHON" -m venv "$VENV"
    }
  fi
  say "installing the package into $VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e "$ROOT${extras:+[$extras]}"
}
