#!/usr/bin/env bash
# Refresh deploy/docker/requirements.lock: the exact versions, with the sha256 of every file
# of each release, that the image installs (`pip install --require-hashes`). Run it after a
# change of the dependencies in pyproject.toml, or to take newer releases; review the diff
# and commit it. Resolves for CPython 3.11 and later on any platform (markers are kept), from
# the index uv is configured with (PyPI by default; UV_INDEX_URL to change it).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
# shellcheck source=deploy/local/lib.sh
. "$ROOT/deploy/local/lib.sh"
cd "$ROOT"
ensure_venv test
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "uv>=0.5"
# `--upgrade`: the newest releases within pyproject's ranges, not the pins already here.
"$VENV/bin/uv" pip compile pyproject.toml deploy/docker/build.in --extra uvloop \
  --generate-hashes --universal --python-version 3.11 --upgrade --quiet \
  --custom-compile-command "deploy/docker/lock.sh" \
  --output-file deploy/docker/requirements.lock
say "wrote deploy/docker/requirements.lock"
