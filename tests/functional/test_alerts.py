"""deploy/prometheus: the alerting rules are valid, unit-tested by promtool, and every metric
they (and the Grafana dashboard) read exists in a real sidecar's /metrics, so they cannot
drift from the code."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.conftest import SidecarFactory, required_tool

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
ALERT_TESTS = ROOT / "deploy" / "prometheus" / "alerts.test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "sidecar-dashboard.json"

# A metric name in PromQL: ours and the runtime collectors'. Label names and values inside
# `{...}` never start with these prefixes.
METRIC_RE = re.compile(r"\b((?:sidecar|process|python)_[a-z0-9_]+)\b")
# The alerts the product promises (SPEC 14); more may exist.
REQUIRED = {"SidecarAuthUnavailable", "SidecarPostgresErrors", "SidecarRedisErrors",
            "SidecarInvalidationListenDown", "SidecarLastUsedDropped", "SidecarLastUsedBacklog",
            "SidecarUpstream5xx", "SidecarUpstreamUnreachable", "SidecarAuthLatencyHigh"}


def rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def promtool() -> str:
    return required_tool("promtool", "Debian package prometheus")


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], capture_output=True, text=True, timeout=120,
                          cwd=ALERTS.parent)


def test_promtool_checks_the_rules() -> None:
    res = run_promtool("check", "rules", ALERTS.name)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"SUCCESS: {len(rules())} rules found" in res.stdout


def test_promtool_unit_tests_pass() -> None:
    res = run_promtool("test", "rules", ALERT_TESTS.name)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout


def test_promtool_unit_tests_can_fail(tmp_path: Path) -> None:
    # The unit tests would notice a broken rule: a threshold no case reaches.
    broken = ALERTS.read_text().replace("> 0.01", "> 0.99", 1)
    assert broken != ALERTS.read_text()
    (tmp_path / "alerts.yml").write_text(broken)
    shutil.copy(ALERT_TESTS, tmp_path / "alerts.test.yml")
    res = subprocess.run([promtool(), "test", "rules", "alerts.test.yml"], capture_output=True,
                         text=True, timeout=120, cwd=tmp_path)
    assert res.returncode != 0
    assert "SidecarAuthUnavailable" in res.stdout + res.stderr


def test_every_alert_fires_and_stays_quiet_in_a_test_case() -> None:
    names = {rule["alert"] for rule in rules()}
    assert names >= REQUIRED
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in yaml.safe_load(ALERT_TESTS.read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert names - firing == set(), "alerts without a firing case"
    assert names - quiet == set(), "alerts without a non-firing case"
    for rule in rules():
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        assert rule["annotations"]["description"], rule["alert"]


def metric_names(promql: str) -> set[str]:
    # Label values are quoted: drop quoted strings first so a value is never taken for a name.
    return set(METRIC_RE.findall(re.sub(r'"[^"]*"', '""', promql)))


async def test_metrics_of_alerts_and_dashboard_exist(
    make_sidecar: SidecarFactory, http: aiohttp.ClientSession, upstream: Any, redis_url: str,
) -> None:
    # A fresh sidecar with every optional part on: each series the rules read is there
    # before its first event.
    sc = await make_sidecar(upstream_url=str(upstream.make_url("")), redis_url=redis_url)
    async with http.get(sc.ops_url("/metrics")) as r:
        text = await r.text()
    exposed = {line.split("{", 1)[0].split(" ", 1)[0]
               for line in text.splitlines() if line and not line.startswith("#")}
    in_alerts = set().union(*(metric_names(rule["expr"]) for rule in rules()))
    assert "sidecar_subscription_connected" in in_alerts
    assert in_alerts - exposed == set(), "alerts.yml reads metrics /metrics does not have"
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = re.findall(r'"expr":\s*"((?:[^"\\]|\\.)*)"', json.dumps(dashboard))
    assert exprs
    in_dashboard = set().union(*(metric_names(json.loads(f'"{e}"')) for e in exprs))
    assert in_dashboard - exposed == set(), "the dashboard reads metrics /metrics does not have"


@pytest.mark.parametrize("promql", ['rate(sidecar_x_total{a="sidecar_y"}[5m]) / process_z'])
def test_metric_names_ignore_label_values(promql: str) -> None:
    assert metric_names(promql) == {"sidecar_x_total", "process_z"}
