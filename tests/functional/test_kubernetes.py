"""deploy/kubernetes: the Kustomize base and the decision-only overlay render with kubectl,
validate strictly against the Kubernetes 1.30 schemas, and hold what operating them needs
(native sidecar, writable /tmp under a read-only root, preStop on both containers, a grace
period that covers the shutdown, PDB, NetworkPolicy, no namespace, no service-account token).
The /tmp part is checked on the real program too: `serve --workers 2` on a read-only
filesystem except a mounted /tmp."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema
import kubernetes_validate
import pytest
import yaml

from sidecar.app import FINAL_FLUSH_TIMEOUT
from tests.conftest import Db, required_tool, unavailable
from tests.servers import free_port
from tests.workers import serve_workers, workers_env

ROOT = Path(__file__).resolve().parents[2]
KUBERNETES = ROOT / "deploy" / "kubernetes"
OVERLAY = KUBERNETES / "overlays" / "decision-only"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
K8S_VERSION = "1.30.0"
POD_TMP = "/tmp"  # noqa: S108 (the path inside the pod, not a file of this test)

Doc = dict[str, Any]


def kubectl() -> str:
    return required_tool("kubectl", "kubectl ships Kustomize")


def render(directory: Path) -> list[Doc]:
    res = subprocess.run([kubectl(), "kustomize", str(directory)], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return [doc for doc in yaml.safe_load_all(res.stdout) if doc]


def one(docs: list[Doc], kind: str) -> Doc:
    found = [doc for doc in docs if doc["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind}"
    return found[0]


# The Prometheus Operator's kinds are CRDs, for which kubernetes-validate has no schema. They
# are checked against the subset of the operator's CRD schemas (monitoring.coreos.com/v1) that
# these manifests use, with unknown fields refused: a field added here must first be looked up
# in the CRD. The rules inside the PrometheusRule are checked by promtool as well (below).
_DURATION = {"type": "string", "pattern": "^(0|([0-9]+(ms|s|m|h))+)$"}
_LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
_METADATA = {"type": "object", "required": ["name"],
             "properties": {"name": {"type": "string"}, "namespace": {"type": "string"},
                            "labels": _LABELS, "annotations": _LABELS},
             "additionalProperties": False}
CRD_SCHEMAS: dict[str, Doc] = {
    "ServiceMonitor": {
        "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"type": "string"},
            "metadata": _METADATA,
            "spec": {
                "type": "object", "required": ["selector", "endpoints"],
                "additionalProperties": False,
                "properties": {
                    "selector": {"type": "object", "additionalProperties": False,
                                 "properties": {"matchLabels": _LABELS}},
                    "endpoints": {"type": "array", "minItems": 1, "items": {
                        "type": "object", "additionalProperties": False,
                        "properties": {"port": {"type": "string"}, "path": {"type": "string"},
                                       "interval": _DURATION, "scrapeTimeout": _DURATION}}},
                },
            },
        },
    },
    "PrometheusRule": {
        "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"type": "string"},
            "metadata": _METADATA,
            "spec": {
                "type": "object", "required": ["groups"], "additionalProperties": False,
                "properties": {"groups": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "required": ["name", "rules"],
                    "additionalProperties": False,
                    "properties": {
                        "name": {"type": "string", "minLength": 1},
                        "rules": {"type": "array", "items": {
                            "type": "object", "required": ["expr"],
                            "additionalProperties": False,
                            "properties": {"alert": {"type": "string"},
                                           "record": {"type": "string"},
                                           "expr": {"type": "string"}, "for": _DURATION,
                                           "labels": _LABELS, "annotations": _LABELS}}},
                    }}}},
            },
        },
    },
}


def validate(docs: list[Doc]) -> None:
    """Core kinds strictly (unknown fields are errors) for Kubernetes 1.30; CRDs by the
    subset schemas above."""
    for doc in docs:
        if doc["kind"] in CRD_SCHEMAS:
            jsonschema.validate(doc, CRD_SCHEMAS[doc["kind"]])
        else:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def pod_spec(docs: list[Doc]) -> Doc:
    spec: Doc = one(docs, "Deployment")["spec"]["template"]["spec"]
    return spec


def container(spec: Doc, name: str) -> Doc:
    for c in spec.get("initContainers", []) + spec["containers"]:
        if c["name"] == name:
            return dict(c)
    raise AssertionError(f"no container {name}")


def env_of(c: Doc) -> dict[str, str]:
    return {e["name"]: e.get("value", "<from secret>") for e in c.get("env", [])}


def check_pod(docs: list[Doc]) -> None:
    """What every rendering must hold (base and overlays)."""
    spec = pod_spec(docs)
    sidecar = container(spec, "sidecar")
    # A native sidecar: an init container that keeps running.
    assert sidecar in spec["initContainers"]
    assert sidecar["restartPolicy"] == "Always"
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert sidecar[probe]["httpGet"]["port"] == "metrics", probe
    assert sidecar["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert sidecar["readinessProbe"]["httpGet"]["path"] == "/readyz"
    # Writable /tmp (an emptyDir) under a read-only root.
    security = sidecar["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["runAsNonRoot"] is True
    volumes = {v["name"]: v for v in spec["volumes"]}
    tmp = [m for m in sidecar["volumeMounts"] if m["mountPath"] == POD_TMP]
    assert len(tmp) == 1
    assert "emptyDir" in volumes[tmp[0]["name"]]
    assert env_of(sidecar).get("TMPDIR", POD_TMP) == POD_TMP
    # Nothing at pod level constrains the API container's user.
    assert "runAsNonRoot" not in spec.get("securityContext", {})
    assert spec["automountServiceAccountToken"] is False
    # preStop on both; the grace period covers the whole shutdown in the kubelet's order.
    api = container(spec, "api")
    api_stop = api["lifecycle"]["preStop"]["sleep"]["seconds"]
    sidecar_stop = sidecar["lifecycle"]["preStop"]["sleep"]["seconds"]
    grace = float(env_of(sidecar)["SIDECAR_SHUTDOWN_GRACE"])
    assert api_stop >= sidecar_stop > 0
    assert spec["terminationGracePeriodSeconds"] >= (
        api_stop + sidecar_stop + grace + FINAL_FLUSH_TIMEOUT + 5)
    # PDB and NetworkPolicy select the pods; the ops port is open only to monitoring.
    labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    for kind in ("PodDisruptionBudget", "NetworkPolicy"):
        doc = one(docs, kind)
        selector = doc["spec"]["selector" if kind == "PodDisruptionBudget" else "podSelector"]
        assert selector["matchLabels"].items() <= labels.items(), kind
    rules = one(docs, "NetworkPolicy")["spec"]["ingress"]
    metrics_rules = [r for r in rules if any(p["port"] == "metrics" for p in r["ports"])]
    assert metrics_rules == [{
        "from": [{"namespaceSelector": {
            "matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}],
        "ports": [{"port": "metrics", "protocol": "TCP"}]}]
    # The Service and ServiceMonitor agree on the port name.
    ports = {p["name"] for p in one(docs, "Service")["spec"]["ports"]}
    assert {e["port"] for e in one(docs, "ServiceMonitor")["spec"]["endpoints"]} <= ports


def test_base_renders_validates_and_holds_what_operating_needs() -> None:
    docs = render(KUBERNETES)
    validate(docs)
    assert {d["kind"] for d in docs} == {"Deployment", "Service", "PodDisruptionBudget",
                                         "NetworkPolicy", "ServiceMonitor", "PrometheusRule"}
    check_pod(docs)
    # No namespace: the one of the kubectl context or of an overlay applies.
    assert all("namespace" not in d["metadata"] for d in docs)
    # The main port is open to every client (the Service sends them to the sidecar).
    rules = one(docs, "NetworkPolicy")["spec"]["ingress"]
    assert {"ports": [{"port": "http", "protocol": "TCP"}]} in rules
    assert one(docs, "Service")["spec"]["ports"][0]["targetPort"] == "http"
    assert "SIDECAR_UPSTREAM_URL" in env_of(container(pod_spec(docs), "sidecar"))


def test_prometheusrule_carries_alerts_yml(tmp_path: Path) -> None:
    rule = one(render(KUBERNETES), "PrometheusRule")
    assert rule["spec"]["groups"] == yaml.safe_load(ALERTS.read_text())["groups"], (
        "regenerate deploy/kubernetes/base/prometheusrule.yaml (command in its header)")
    promtool = required_tool("promtool", "Debian package prometheus")
    rules_file = tmp_path / "rules.yml"
    rules_file.write_text(yaml.safe_dump(rule["spec"]))
    res = subprocess.run([promtool, "check", "rules", str(rules_file)], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


def test_decision_only_overlay() -> None:
    docs = render(OVERLAY)
    validate(docs)
    check_pod(docs)
    namespaces = {d["metadata"].get("namespace") for d in docs}
    assert len(namespaces) == 1
    assert namespaces != {None}
    assert namespaces != {"default"}
    (namespace,) = namespaces
    sidecar_env = env_of(container(pod_spec(docs), "sidecar"))
    assert "SIDECAR_UPSTREAM_URL" not in sidecar_env  # decision-only
    assert "SIDECAR_TRUSTED_PROXIES" in sidecar_env
    ingress = one(docs, "Ingress")
    annotations = ingress["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/auth-url"] == (
        f"http://dify-api.{namespace}.svc.cluster.local:8080/_sidecar/auth")
    assert annotations["nginx.ingress.kubernetes.io/auth-method"] == "GET"
    assert set(annotations["nginx.ingress.kubernetes.io/auth-response-headers"].split(",")) == {
        "X-Tenant-Id", "X-App-Id", "X-Api-Token-Id", "X-Api-Token-Scope"}
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    service_ports = {p["name"]: p for p in one(docs, "Service")["spec"]["ports"]}
    assert service_ports[backend["port"]["name"]]["targetPort"] == "api"
    # Decisions and the API's port only from the ingress controller's namespace.
    rules = one(docs, "NetworkPolicy")["spec"]["ingress"]
    open_rules = [r for r in rules if "from" not in r]
    assert open_rules == []


def test_strict_validation_refuses_unknown_fields() -> None:
    # The check can fail: a misspelt field (here one a native sidecar needs) is an error.
    docs = render(KUBERNETES)
    deployment = one(docs, "Deployment")
    sidecar = deployment["spec"]["template"]["spec"]["initContainers"][0]
    sidecar["restartPolicyy"] = sidecar.pop("restartPolicy")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)
    monitor = one(docs, "ServiceMonitor")
    monitor["spec"]["endpoints"][0]["intervall"] = "15s"
    with pytest.raises(jsonschema.ValidationError):
        validate([monitor])


# The shipped pod's filesystem, rebuilt in a private mount namespace: every directory Python's
# tempfile would try (TMPDIR unset as in the pod, then /tmp, /var/tmp, /usr/tmp and the working
# directory) is a read-only mount, as on a read-only root filesystem; with "emptydir" a
# writable tmpfs is mounted at /tmp, as the manifest's emptyDir volume is. Nothing outside
# this namespace is touched (private propagation, fresh tmpfs mounts only). The checkout and
# the virtualenv may themselves sit under /tmp (a CI clone): each directory named after the
# mode is bind-mounted back at its own path over the new /tmp, through a stash on /var/tmp.
READ_ONLY_ROOT = r"""
set -e
mode=$1; shift
mount -t tmpfs -o size=64k tmpfs /var/tmp
keep=""
while [ "$1" != -- ]; do
  case "$1" in /tmp/*)
    n=$(echo "$keep" | wc -w); mkdir "/var/tmp/$n"; mount --bind "$1" "/var/tmp/$n"
    keep="$keep $1";;
  esac
  shift
done
shift
if [ -d /usr/tmp ]; then mount -t tmpfs -o ro,size=4k tmpfs /usr/tmp; fi
mount -t tmpfs -o size=64m,mode=1777 tmpfs /tmp
n=0
for d in $keep; do mkdir -p "$d"; mount --bind "/var/tmp/$n" "$d"; n=$((n + 1)); done
if [ "$mode" != emptydir ]; then mount -o remount,ro /tmp; fi
mount -o remount,ro /var/tmp
cd /tmp
exec "$@"
"""


def read_only_root(mode: str) -> list[str]:
    unshare = required_tool("unshare", "Debian package util-linux")
    command = [unshare, "--mount", "--propagation", "private"]
    if os.geteuid() != 0:
        command[1:1] = ["--user", "--map-root-user"]
    keep = [str(ROOT), sys.prefix, "--"]
    script = [*command, "sh", "-c", READ_ONLY_ROOT, "sh", mode, *keep]
    probe = subprocess.run([*script, sys.executable, "-c", "import sidecar"],
                           capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        unavailable(f"cannot make a private mount namespace: {probe.stderr.strip()}")
    return script


def pod_like_env(db: Db, upstream: Any, port: int, ops_port: int) -> dict[str, str]:
    env = workers_env(listen=f"127.0.0.1:{port}", ops_listen=f"127.0.0.1:{ops_port}",
                      database_url=db.dsn, upstream_url=str(upstream.make_url("")))
    for name in ("TMPDIR", "TEMP", "TMP"):
        env.pop(name, None)
    return env


async def test_two_workers_serve_on_a_read_only_root_with_tmp_mounted(
    db: Db, upstream: Any,
) -> None:
    """`serve --workers 2` keeps its per-worker metrics files in a temporary directory. On a
    read-only root filesystem without a writable /tmp it cannot start ("No usable temporary
    directory found", the failure seen with the earlier manifest); with the manifest's
    emptyDir at /tmp it serves from both workers.

    Why a mount namespace: the tempfile module falls back from TMPDIR to /tmp, /var/tmp,
    /usr/tmp and the working directory, and root writes anywhere, so only read-only mounts
    reproduce the pod (an unprivileged user would still find /tmp writable). The first run is
    the control that shows the simulation is faithful; the second is the shipped layout."""
    token, _ = await db.add_token("app")
    port, ops_port = free_port(), free_port()
    env = pod_like_env(db, upstream, port, ops_port)
    control = await asyncio.to_thread(read_only_root, "read-only")
    failed = await asyncio.to_thread(
        subprocess.run, [*control, sys.executable, "-m", "sidecar", "serve", "--workers", "2"],
        env=env, capture_output=True, text=True, timeout=60)
    assert failed.returncode != 0
    assert "No usable temporary directory found" in failed.stdout + failed.stderr

    pids: set[str] = set()
    shipped = await asyncio.to_thread(read_only_root, "emptydir")
    async with serve_workers(env, 2, prefix=shipped) as workers:
        for _ in range(200):
            # A new connection each time, so the kernel spreads them over the workers.
            async with aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(force_close=True)) as fresh, fresh.get(
                    f"http://127.0.0.1:{port}/a",
                    headers={"Authorization": f"Bearer {token}"}) as r:
                assert r.status == 200
            pids = {line.split('"pid":', 1)[1].split(",", 1)[0]
                    for line in workers.output().splitlines() if '"msg":"access"' in line}
            if len(pids) == 2:
                break
        async with aiohttp.ClientSession() as http, http.get(
                f"http://127.0.0.1:{ops_port}/metrics") as r:
            assert r.status == 200
            assert "sidecar_requests_total" in await r.text()
    assert len(pids) == 2, f"requests were served by {pids}"
