"""config/sidecar.env.example documents every setting, only settings, with true defaults.

A setting added to `Settings` without a line in the example (or a variable left in the
example after its setting was removed or renamed) fails here, so the file operators copy
never drifts from the code. Commented lines count as documentation too: settings without a
useful default are shown commented out.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from sidecar.settings import ENV_PREFIX, Settings

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "config" / "sidecar.env.example"

# Any mention, in a comment or not: a comment naming a variable that does not exist misleads.
_NAME_RE = re.compile(r"\bSIDECAR_[A-Z0-9_]+")
# `SIDECAR_X=value` or `# SIDECAR_X=value`.
_ASSIGN_RE = re.compile(r"^(?P<comment>#\s*)?(?P<name>SIDECAR_[A-Z0-9_]+)=(?P<value>.*)$")

SETTINGS = frozenset(ENV_PREFIX + name.upper() for name in Settings.model_fields)
DSN = "postgresql://user@127.0.0.1:5432/db"


def example_text() -> str:
    return EXAMPLE.read_text(encoding="utf-8")


def assignments() -> list[re.Match[str]]:
    return [m for line in example_text().splitlines() if (m := _ASSIGN_RE.match(line.strip()))]


def test_every_setting_has_a_line() -> None:
    assigned = {m["name"] for m in assignments()}
    missing = sorted(SETTINGS - assigned)
    assert not missing, f"settings missing from {EXAMPLE.name}: {missing}"


def test_example_names_only_existing_settings() -> None:
    unknown = sorted(set(_NAME_RE.findall(example_text())) - SETTINGS)
    assert not unknown, f"{EXAMPLE.name} names variables Settings does not have: {unknown}"


def test_each_setting_is_set_at_most_once() -> None:
    active = [m["name"] for m in assignments() if m["comment"] is None]
    repeated = sorted({n for n in active if active.count(n) > 1})
    assert not repeated, f"uncommented more than once: {repeated}"


def test_each_setting_states_its_default() -> None:
    # A block is a run of non-blank lines: the comment above a variable and the variable.
    for block in example_text().split("\n\n"):
        names = [m["name"] for line in block.splitlines() if (m := _ASSIGN_RE.match(line))]
        if names:
            assert "Default:" in block, f"no 'Default:' in the comment of {names}"


def test_uncommented_values_are_the_real_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)
    # _env_file=None: a developer's own .env must not leak into the comparison.
    defaults = Settings(_env_file=None, database_url=DSN)
    active = {m["name"]: m["value"] for m in assignments() if m["comment"] is None}
    for name, value in active.items():
        monkeypatch.setenv(name, value)
    documented = Settings(_env_file=None, database_url=DSN)
    for name in active:
        field = name.removeprefix(ENV_PREFIX).lower()
        assert getattr(documented, field) == getattr(defaults, field), (
            f"{name}={active[name]} in {EXAMPLE.name} is not the default"
        )


def test_readme_covers_every_setting() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    missing = sorted(name for name in SETTINGS if name not in readme)
    assert not missing, f"settings missing from README.md's configuration table: {missing}"
