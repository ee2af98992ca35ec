#!/usr/bin/env bash
# Run the side-by-side benchmark (benchmarks/bench_proxy.py): installs wrk, nginx and
# PostgreSQL (Debian packages) when missing and a .venv with the package (uvloop included).
# Extra args go to the benchmark, e.g. --rounds 5 --seconds 3.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
cd "$ROOT"

ensure_benchmark_tools
ensure_venv test
exec "$VENV/bin/python" benchmarks/bench_proxy.py "$@"
