#!/usr/bin/env bash
# A working sidecar on this machine in one command. Starts, on 127.0.0.1 only: a throwaway
# PostgreSQL and Redis under .local/demo, the token schema, a demo token, a demo upstream,
# and `sidecar serve` in front of it. Prints curl commands to try from another shell;
# Ctrl-C stops everything and deletes .local/demo.
#
# Usage: deploy/local/demo.sh [--check]
#   --check (or DEMO_CHECK=1)  send those requests itself, verify the answers, exit 0 or 1.
#
# Ports: DEMO_SIDECAR_PORT (8080), DEMO_OPS_PORT (9090), DEMO_UPSTREAM_PORT (55001),
# DEMO_PG_PORT (55432), DEMO_REDIS_PORT (56379). A default port that is taken is replaced
# by a free one (the printed commands say which); a port you set that is taken is an error.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"
cd "$ROOT"

usage() { sed -n '2,12p' "$0" | sed -e 's/^# \{0,1\}//'; }

CHECK="${DEMO_CHECK:-0}"
for arg in "$@"; do
  case "$arg" in
    --check) CHECK=1 ;;
    -h | --help) usage; exit 0 ;;
    *) say "unknown argument: $arg (see --help)"; exit 2 ;;
  esac
done
case "$CHECK" in 1 | true | yes) CHECK=1 ;; *) CHECK=0 ;; esac

LOCAL="$ROOT/.local"
STATE="$LOCAL/demo"
PY="$VENV/bin/python"
SIDECAR="$VENV/bin/sidecar"

# ---------------------------------------------------------------------------------------------
# Stopping. Every process we start has its pid in $STATE/<name>.pid, so the same code cleans up
# after this run and after an earlier run that was killed too hard to clean up after itself.

as_pg_owner() {
  # initdb and the postmaster refuse to run as root. The subshell's cd matters too: postgres
  # tools fail when they cannot read the current directory, which root's may not allow.
  if [ "$(id -u)" -eq 0 ]; then
    (cd "$PGHOME" && runuser -u postgres -- "$@")
  else
    (cd "$PGHOME" && "$@")
  fi
}

# stop_pid NAME MATCH SECONDS: TERM the recorded process, KILL it after SECONDS. MATCH must occur
# in its command line, so a recycled pid that now belongs to someone else is left alone.
stop_pid() {
  local file="$STATE/$1.pid" pid i
  [ -f "$file" ] || return 0
  pid="$(cat "$file")"
  if [ -n "$pid" ] && grep -qaF -- "$2" "/proc/$pid/cmdline" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < $3 * 10; i++)); do
      grep -qaF -- "$2" "/proc/$pid/cmdline" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$file"
}

stop_all() {
  # The sidecar first: on SIGTERM it flushes pending last_used_at writes to Postgres.
  stop_pid sidecar "$SIDECAR" 15
  stop_pid upstream demo_upstream.py 5
  stop_pid logtail "$STATE/sidecar.log" 1
  # redis-server rewrites its process title, so its own name is what can be matched.
  stop_pid redis redis-server 5
  if [ -f "$STATE/pghome" ]; then
    PGHOME="$(cat "$STATE/pghome")"
    if [ -f "$PGHOME/data/postmaster.pid" ]; then
      as_pg_owner "$(pg_bindir)/pg_ctl" -D "$PGHOME/data" -m fast -w -t 30 stop >/dev/null 2>&1 \
        || as_pg_owner "$(pg_bindir)/pg_ctl" -D "$PGHOME/data" -m immediate -w stop >/dev/null 2>&1 \
        || say "could not stop PostgreSQL in $PGHOME/data"
    fi
    # Outside .local/ only when the postgres user could not reach .local/ (tests/servers.py).
    case "$PGHOME" in "$STATE"/*) ;; *) rm -rf "$PGHOME" ;; esac
  fi
  rm -rf "$STATE"
  rmdir "$LOCAL" 2>/dev/null || true
}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  set +e
  say "stopping the demo and removing ${STATE#"$ROOT"/}"
  stop_all
  exit "$rc"
}

# ---------------------------------------------------------------------------------------------
# Helpers.

port_free() {
  "$PY" - "$1" <<'PY'
import socket, sys
s = socket.socket()
# Servers set SO_REUSEADDR too: a port with only TIME_WAIT leftovers counts as free.
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except (OSError, OverflowError, ValueError):
    sys.exit(1)
PY
}

# choose_port VAR DEFAULT: the port the user set in VAR (it must be free), else DEFAULT, else
# whatever free port the kernel hands out.
choose_port() {
  local var="$1" default="$2" port
  if [ -n "${!var:-}" ]; then
    port="${!var}"
    port_free "$port" || { say "port $port (from $var) is in use or invalid"; return 1; }
  else
    port="$default"
    if ! port_free "$port"; then
      port="$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
      say "port $default is in use; using $port instead (set $var to choose)"
    fi
  fi
  echo "$port"
}

# wait_port PORT NAME PID: until something accepts on 127.0.0.1:PORT; fail early if PID died.
wait_port() {
  local i
  for ((i = 0; i < 150; i++)); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    kill -0 "$3" 2>/dev/null || { say "$2 exited during start-up"; return 1; }
    sleep 0.2
  done
  say "$2 is not listening on 127.0.0.1:$1 after 30 s"
  return 1
}

# Commands are printed for pasting into another shell: quote whatever the shell would split.
shell_quote() {
  local arg out=""
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then out+=" $arg"
    else out+=" '${arg//\'/\'\\\'\'}'"
    fi
  done
  printf '%s' "${out# }"
}

json_field() { # json_field FILE a.b.c: print one value of a JSON document
  "$PY" - "$1" "$2" <<'PY'
import json, sys
doc = json.load(open(sys.argv[1]))
for key in sys.argv[2].split("."):
    doc = doc[key]
print(doc)
PY
} 2>/dev/null  # a body that is not the expected JSON is reported by the caller

# ---------------------------------------------------------------------------------------------
# Starting.

# PostgreSQL and Redis, with $SECRET as their password (in the environment, never in argv),
# are started by the same helper the tests and benchmarks use; it records where they are in
# $STATE/pghome and $STATE/redis.pid, which stop_all reads.
start_servers() {
  (cd "$ROOT" && DEMO_SECRET="$SECRET" "$PY" -m tests.servers demo-up "$STATE" "$PG_PORT" \
    "$REDIS_PORT")
}

# sidecar ARGS...: run the CLI from $STATE, so that a .env file the user keeps in the checkout
# for other purposes cannot change the demo's settings.
sidecar() { (cd "$STATE" && exec "$SIDECAR" "$@"); }

# ---------------------------------------------------------------------------------------------
# Main.

if [ -f "$STATE/demo.pid" ] && grep -qaF demo.sh "/proc/$(cat "$STATE/demo.pid")/cmdline" 2>/dev/null
then
  say "another demo is running (pid $(cat "$STATE/demo.pid")); stop it first"
  exit 1
fi

# Without arguments: the demo needs neither nginx nor the test extras.
# shellcheck disable=SC2119
ensure_system_packages
# shellcheck disable=SC2119
ensure_venv
if ! command -v curl >/dev/null 2>&1; then
  say "installing curl (the demo's commands use it)"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq curl >/dev/null
fi

if [ -d "$STATE" ]; then
  say "cleaning up after an earlier demo"
  stop_all
fi
trap cleanup EXIT
# Ctrl-C and kill end up in the EXIT trap, which stops everything that was started.
trap 'exit 130' INT
trap 'exit 143' TERM
mkdir -p "$STATE"
echo "$$" >"$STATE/demo.pid"

SIDECAR_PORT="$(choose_port DEMO_SIDECAR_PORT 8080)"
OPS_PORT="$(choose_port DEMO_OPS_PORT 9090)"
UPSTREAM_PORT="$(choose_port DEMO_UPSTREAM_PORT 55001)"
PG_PORT="$(choose_port DEMO_PG_PORT 55432)"
REDIS_PORT="$(choose_port DEMO_REDIS_PORT 56379)"
# Hex only: it goes into URLs, SQL and config files without any quoting.
SECRET="$("$PY" -c 'import secrets; print(secrets.token_hex(16))')"

say "starting PostgreSQL on 127.0.0.1:$PG_PORT and Redis on 127.0.0.1:$REDIS_PORT"
start_servers

# Exported rather than passed on command lines: process listings would show the passwords.
export SIDECAR_DATABASE_URL="postgresql://sidecar:$SECRET@127.0.0.1:$PG_PORT/sidecar"
export SIDECAR_REDIS_URL="redis://:$SECRET@127.0.0.1:$REDIS_PORT/0"
export SIDECAR_UPSTREAM_URL="http://127.0.0.1:$UPSTREAM_PORT"
export SIDECAR_LISTEN="127.0.0.1:$SIDECAR_PORT"
export SIDECAR_OPS_LISTEN="127.0.0.1:$OPS_PORT"
# Dify's service API: dataset endpoints need a dataset token, everything else an app token.
export SIDECAR_SCOPE_ROUTES="/v1/datasets=dataset,/v1/workspaces/current/models=dataset,/=app"
# Short enough to watch last_used_at move during the demo; the defaults are 10 s and 60 s.
export SIDECAR_LAST_USED_FLUSH_INTERVAL=1
export SIDECAR_LAST_USED_MIN_AGE=0
export SIDECAR_SHUTDOWN_GRACE=5

say "applying the schema"
sidecar schema --apply 2>"$STATE/schema.log" || { cat "$STATE/schema.log" >&2; exit 1; }
TENANT_ID="$("$PY" -c 'import uuid; print(uuid.uuid4())')"
APP_ID="$("$PY" -c 'import uuid; print(uuid.uuid4())')"
say "creating a demo token (scope app)"
TOKEN="$(sidecar token create --scope app --tenant-id "$TENANT_ID" --app-id "$APP_ID" \
  2>"$STATE/token.err")" || { cat "$STATE/token.err" >&2; exit 1; }
TOKEN_ID="$(sed -n 's/^token id: //p' "$STATE/token.err")"

say "starting the demo upstream on 127.0.0.1:$UPSTREAM_PORT"
"$PY" "$ROOT/deploy/local/demo_upstream.py" --port "$UPSTREAM_PORT" >"$STATE/upstream.log" 2>&1 &
echo "$!" >"$STATE/upstream.pid"
wait_port "$UPSTREAM_PORT" "the demo upstream" "$!"

say "starting the sidecar on 127.0.0.1:$SIDECAR_PORT (ops 127.0.0.1:$OPS_PORT)"
# Not through the function above: `$!` must be the sidecar itself (exec), not a wrapping shell.
(cd "$STATE" && exec "$SIDECAR" serve) >"$STATE/sidecar.log" 2>&1 &
SIDECAR_PID="$!"
echo "$SIDECAR_PID" >"$STATE/sidecar.pid"
ready=""
for ((i = 0; i < 150; i++)); do
  if [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$OPS_PORT/readyz")" = 200 ]
  then ready=1; break
  fi
  kill -0 "$SIDECAR_PID" 2>/dev/null || break
  sleep 0.2
done
if [ -z "$ready" ]; then
  say "the sidecar did not become ready; its log:"
  tail -n 30 "$STATE/sidecar.log" >&2
  exit 1
fi

# The requests of the demo, as curl arguments: printed for the user, or run by --check.
API="http://127.0.0.1:$SIDECAR_PORT"
OPS="http://127.0.0.1:$OPS_PORT"
REQ_ALLOWED=(-H "Authorization: Bearer $TOKEN" -H "X-Tenant-Id: forged" "$API/v1/chat-messages")
REQ_NO_TOKEN=("$API/v1/chat-messages")
REQ_WRONG_SCOPE=(-H "Authorization: Bearer $TOKEN" "$API/v1/datasets")
PSQL_CMD=(psql "postgresql://sidecar:$SECRET@127.0.0.1:$PG_PORT/sidecar"
  -c "SELECT id, type, tenant_id, last_used_at FROM api_tokens")

if [ "$CHECK" = 0 ]; then
  cat <<EOF

The sidecar runs in proxy mode in front of a demo upstream that echoes what it receives,
with PostgreSQL and Redis, all on 127.0.0.1. Try these in another shell:

  # 200: a valid token. The upstream echoes the identity headers the sidecar injected;
  # the X-Tenant-Id the client sent is replaced, never passed on.
  curl -i $(shell_quote "${REQ_ALLOWED[@]}")

  # 401 with a Dify-shaped JSON body: no token.
  curl -i $(shell_quote "${REQ_NO_TOKEN[@]}")

  # 401: an app token on a dataset route (SIDECAR_SCOPE_ROUTES).
  curl -i $(shell_quote "${REQ_WRONG_SCOPE[@]}")

  # The ops listener: Prometheus metrics and readiness.
  curl -s $OPS/metrics | grep '^sidecar_'
  curl -s $OPS/readyz

  # last_used_at is written behind, in batches (here every second).
  $(shell_quote "${PSQL_CMD[@]}")

Demo token id $TOKEN_ID, tenant $TENANT_ID, app $APP_ID.
Sidecar access log lines follow. Ctrl-C stops everything and deletes ${STATE#"$ROOT"/}.

EOF
  tail -n 0 -f "$STATE/sidecar.log" &
  echo "$!" >"$STATE/logtail.pid"
  # Returns when the sidecar exits on its own; Ctrl-C interrupts it and runs the traps.
  set +e
  wait "$SIDECAR_PID"
  set -e
  say "the sidecar exited on its own; its log is above"
  exit 1
fi

# --check: the same requests, with the answers verified.
failures=0
pass() { printf 'ok   - %s\n' "$1"; }
fail() { printf 'FAIL - %s\n' "$1"; failures=$((failures + 1)); }

# request ARGS...: run curl, leave the body in $STATE/body and print the status code.
request() {
  curl -sS -o "$STATE/body" -D "$STATE/headers" -w '%{http_code}' "$@" || true
}

say "checking"
status="$(request "${REQ_ALLOWED[@]}")"
if [ "$status" = 200 ] \
  && [ "$(json_field "$STATE/body" headers.X-Tenant-Id)" = "$TENANT_ID" ] \
  && [ "$(json_field "$STATE/body" headers.X-App-Id)" = "$APP_ID" ] \
  && [ "$(json_field "$STATE/body" headers.X-Api-Token-Id)" = "$TOKEN_ID" ] \
  && [ "$(json_field "$STATE/body" headers.X-Api-Token-Scope)" = app ]; then
  pass "valid token: 200, upstream saw X-Tenant-Id $TENANT_ID (forged value replaced)"
else
  fail "valid token: want 200 with X-Tenant-Id $TENANT_ID; got $status $(cat "$STATE/body")"
fi

status="$(request "${REQ_NO_TOKEN[@]}")"
if [ "$status" = 401 ] && [ "$(json_field "$STATE/body" code)" = unauthorized ] \
  && grep -qi '^WWW-Authenticate: Bearer' "$STATE/headers"; then
  pass "no token: 401 $(cat "$STATE/body")"
else
  fail "no token: want 401 with code unauthorized; got $status $(cat "$STATE/body")"
fi

status="$(request "${REQ_WRONG_SCOPE[@]}")"
if [ "$status" = 401 ] && [ "$(json_field "$STATE/body" message)" = "Access token is invalid" ]
then
  pass "app token on /v1/datasets: 401"
else
  fail "app token on /v1/datasets: want 401; got $status $(cat "$STATE/body")"
fi

status="$(request "$OPS/metrics")"
if [ "$status" = 200 ] \
  && grep -q '^sidecar_requests_total{outcome="allowed",scope="app"} ' "$STATE/body" \
  && grep -q '^sidecar_requests_total{outcome="unauthorized",scope="app"} ' "$STATE/body"; then
  pass "metrics: 200 with sidecar_requests_total by outcome"
else
  fail "metrics: want 200 with sidecar_requests_total{outcome=...}; got $status"
fi

status="$(request "$OPS/readyz")"
if [ "$status" = 200 ] && [ "$(json_field "$STATE/body" status)" = ready ]; then
  pass "readyz: 200 $(cat "$STATE/body")"
else
  fail "readyz: want 200 ready; got $status $(cat "$STATE/body")"
fi

# The write-behind flushes every second here; give it a few.
used=""
for ((i = 0; i < 20; i++)); do
  used="$(PGPASSWORD="$SECRET" psql -h 127.0.0.1 -p "$PG_PORT" -U sidecar -d sidecar -qAt \
    -c "SELECT last_used_at IS NOT NULL FROM api_tokens WHERE id = '$TOKEN_ID'" || true)"
  [ "$used" = t ] && break
  sleep 0.5
done
if [ "$used" = t ]; then
  pass "last_used_at written behind"
else
  fail "last_used_at still empty after 10 s"
fi

if [ "$failures" -gt 0 ]; then
  say "$failures check(s) failed; the sidecar's log:"
  tail -n 30 "$STATE/sidecar.log" >&2
  exit 1
fi
say "all checks passed"
