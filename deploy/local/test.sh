#!/usr/bin/env bash
# Run the whole test suite: installs PostgreSQL, Redis, nginx and PgBouncer (Debian packages) when missing,
# a .venv with the package and its test extras, then lint, type check and pytest.
# The tests start their own servers on loopback ports in temp dirs, or use
# SIDECAR_TEST_DATABASE_URL / SIDECAR_TEST_REDIS_URL when set. Extra args go to pytest.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
cd "$ROOT"

ensure_system_packages with-nginx
ensure_venv test

say "ruff"
"$VENV/bin/ruff" check sidecar tests benchmarks deploy
say "mypy"
"$VENV/bin/mypy"

say "pytest"
set +e
"$VENV/bin/python" -m pytest -p no:cacheprovider "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  say "pytest collected no tests: that is a failure"
  exit 1
fi
exit "$rc"
