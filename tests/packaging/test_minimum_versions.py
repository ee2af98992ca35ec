"""The declared dependency floors work: the package is installed with the minimum version of
each runtime dependency (minimum-versions.txt) into a throwaway venv, every module is
imported, the app is wired, and the unit tests run there.

This talks to the package index and takes about a minute, so it is marked slow; CI runs it.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
MINIMUM = Path(__file__).with_name("minimum-versions.txt")

SMOKE = """
import importlib, pkgutil, sidecar
for mod in pkgutil.iter_modules(sidecar.__path__):
    importlib.import_module("sidecar." + mod.name)
from sidecar.app import create_app, create_ops_app
from sidecar.settings import Settings
settings = Settings(database_url="postgresql://u@127.0.0.1:9/x",
                    redis_url="redis://127.0.0.1:9/0", upstream_url="http://127.0.0.1:9")
create_ops_app(create_app(settings))
"""


def _pins() -> dict[str, str]:
    pins = {}
    for line in MINIMUM.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[name.lower()] = version
    return pins


def test_every_floor_is_pinned_at_its_minimum() -> None:
    # The constraints file must follow pyproject.toml: each runtime dependency, at its floor.
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    floors = {}
    for dep in deps:
        match = re.match(r"^([A-Za-z0-9_.-]+)\s*>=\s*([0-9][^,;\s]*)", dep)
        assert match, f"{dep!r} has no >= floor"
        floors[match.group(1).lower()] = Version(match.group(2))
    assert {name: Version(v) for name, v in _pins().items()} == floors


@pytest.mark.slow
def test_package_works_with_minimum_versions(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    subprocess.run(
        [py, "-m", "pip", "install", "-q", "--disable-pip-version-check",
         "-c", str(MINIMUM), f"{ROOT}[test]"],
        check=True, timeout=600,
    )
    installed = subprocess.run(
        [py, "-m", "pip", "list", "--format=freeze", "--disable-pip-version-check"],
        check=True, capture_output=True, text=True,
    ).stdout.lower().replace("_", "-")
    for name, version in _pins().items():
        assert f"{name}=={version}" in installed, name
    subprocess.run([py, "-c", SMOKE], check=True, cwd=tmp_path, timeout=120)
    # The unit tests are pure logic plus the parsing libraries: they must pass at the floor.
    result = subprocess.run(
        [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "tests" / "unit")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
