"""The Helm chart: lint, the same objects as kustomize, and install/upgrade/uninstall on a real API server.

helm is built from the Go module proxy by `make helm` (tests/tools/build.sh);
kustomize is the control plane bundle's kubectl. The lifecycle runs on a
control plane of its own (not the session's `cluster`, where the `operator`
fixture's operator would reconcile this test's mirror too, and kubectl-applied
RBAC would collide with the release's). kwok nodes cannot run the operator's
image, so the operator runs as a process, exactly as the installed Deployment
describes it: with the release's ServiceAccount, environment and arguments.
"""

from __future__ import annotations

import difflib
import json
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import regmirror
from harness import LocalCluster, find_controlplane_dir
from harness.operator import REPO, apply, delete_mirror, mirror_body, wait_condition, wait_for
from regmirror import constants as c
from tools.binaries import go_tool

CHART = REPO / "manifests" / "helm" / "regmirror"
RELEASE = "regmirror"
# Labels Helm adds for its own bookkeeping; everything else must equal kustomize's.
HELM_LABELS = ("helm.sh/chart", "app.kubernetes.io/managed-by", "app.kubernetes.io/instance", "app.kubernetes.io/version")
ALL_MONITORING = ["serviceMonitor.enabled=true", "prometheusRule.enabled=true", "dashboard.enabled=true"]
# kustomize directory -> the chart values that render the same objects
EQUIVALENT = {
    "manifests": [],
    "manifests/overlays/servicemonitor": ["serviceMonitor.enabled=true"],
    "manifests/overlays/monitoring": ALL_MONITORING,
}

Key = tuple[str, str, str, str]


def _run(argv: list[str], *, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout, check=False)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {result.returncode}:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    return result


def helm(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> str:
    """Run the built helm; its output."""
    return _run([str(go_tool("helm")), *args], env=env, timeout=timeout).stdout


def render_chart(*values: str) -> list[dict[str, Any]]:
    """`helm template` with the CRDs, as a kustomize build would list them."""
    argv = ["template", RELEASE, str(CHART), "--include-crds"]
    for value in values:
        argv += ["--set", value]
    return [d for d in yaml.safe_load_all(helm(*argv)) if d]


def render_kustomize(directory: str) -> list[dict[str, Any]]:
    kubectl = find_controlplane_dir() / "bin" / "kubectl"
    return [d for d in yaml.safe_load_all(_run([str(kubectl), "kustomize", str(REPO / directory)]).stdout) if d]


def _key(obj: dict[str, Any]) -> Key:
    meta = obj["metadata"]
    return (obj["apiVersion"], obj["kind"], meta.get("namespace", ""), meta["name"])


def normalise(objects: list[dict[str, Any]]) -> dict[Key, dict[str, Any]]:
    """Objects by identity, without Helm's bookkeeping labels (selectors and pod labels never carry them)."""
    out: dict[Key, dict[str, Any]] = {}
    for obj in objects:
        labels = obj["metadata"].get("labels") or {}
        for name in HELM_LABELS:
            labels.pop(name, None)
        key = _key(obj)
        assert key not in out, f"rendered twice: {key}"
        out[key] = obj
    return out


def _diff(want: dict[str, Any], got: dict[str, Any]) -> str:
    a = yaml.safe_dump(want, sort_keys=True).splitlines()
    b = yaml.safe_dump(got, sort_keys=True).splitlines()
    return "\n".join(difflib.unified_diff(a, b, "kustomize", "helm", lineterm=""))


def test_chart_lints_strictly_with_default_and_all_values() -> None:
    for values in ([], ALL_MONITORING):
        argv = ["lint", str(CHART), "--strict"]
        for value in values:
            argv += ["--set", value]
        out = helm(*argv)
        assert "0 chart(s) failed" in out, out


@pytest.mark.parametrize(("directory", "values"), EQUIVALENT.items(), ids=list(EQUIVALENT))
def test_chart_renders_the_same_objects_as_kustomize(directory: str, values: list[str]) -> None:
    kustomize = normalise(render_kustomize(directory))
    chart = normalise(render_chart(*values))
    assert sorted(chart) == sorted(kustomize), (
        f"only in helm: {sorted(set(chart) - set(kustomize))}; only in kustomize: {sorted(set(kustomize) - set(chart))}"
    )
    for key, want in kustomize.items():
        assert chart[key] == want, f"{key} differs:\n{_diff(want, chart[key])}"


def _container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    deployment = next(o for o in objects if o["kind"] == "Deployment")
    return dict(deployment["spec"]["template"]["spec"]["containers"][0])


_dns_label = st.from_regex(r"[a-z]([a-z0-9-]{0,14}[a-z0-9])?", fullmatch=True).filter(lambda s: s != "default")
_env_name = st.from_regex(r"REGMIRROR_X_[A-Z0-9_]{1,10}", fullmatch=True)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@example(operator_ns="a", agent_ns="b", tag="0", env={})  # found: --set made the tag an integer, which the schema refused
@example(operator_ns="a", agent_ns="b", tag="null", env={})  # found: rendered the image as ...:<nil>
@given(
    operator_ns=_dns_label,
    agent_ns=_dns_label,
    # true/false are booleans to --set (the schema test covers them); null removes the value.
    tag=st.from_regex(r"[a-z0-9][a-z0-9.-]{0,10}", fullmatch=True).filter(lambda t: t.lower() not in ("true", "false")),
    env=st.dictionaries(_env_name, st.text(st.characters(codec="ascii", min_codepoint=32), max_size=12), max_size=3),
)
def test_values_move_every_reference_together(operator_ns: str, agent_ns: str, tag: str, env: dict[str, str]) -> None:
    """Namespaces, image and settings from values reach every object that names them, and nothing else."""
    if operator_ns == agent_ns:
        return
    argv = ["template", RELEASE, str(CHART), "--set", f"namespaces.operator={operator_ns}", "--set", f"namespaces.agent={agent_ns}"]
    # --set turns an all-digit tag into an integer: the chart must still use it as the tag.
    argv += ["--set", f"image.tag={tag}"]
    for name, value in env.items():
        argv += ["--set-json", f"operator.env.{name}={json.dumps(value)}"]
    objects = [d for d in yaml.safe_load_all(helm(*argv)) if d]
    for obj in objects:
        namespace = obj["metadata"].get("namespace")
        assert namespace in (None, operator_ns, agent_ns, "default"), (obj["kind"], obj["metadata"]["name"], namespace)
        for subject in obj.get("subjects", []):
            expected = agent_ns if subject["name"] == "regmirror-agent" else operator_ns
            assert subject["namespace"] == expected, (obj["metadata"]["name"], subject)
    assert {o["metadata"]["name"] for o in objects if o["kind"] == "Namespace"} == {operator_ns, agent_ns}
    container = _container(objects)
    image = f"ghcr.io/regmirror/regmirror:{regmirror.__version__ if tag.lower() == 'null' else tag}"
    assert container["image"] == image
    rendered_env = {e["name"]: e.get("value") for e in container["env"]}
    assert rendered_env["REGMIRROR_AGENT_IMAGE"] == image  # the agent runs the operator's image
    assert rendered_env["REGMIRROR_AGENT_NAMESPACE"] == agent_ns
    assert {name: rendered_env[name] for name in env} == env


def test_a_setting_that_the_chart_owns_cannot_be_overridden_twice() -> None:
    """Two entries of one env name are ambiguous (and rejected by server-side apply): the chart refuses at render time."""
    result = subprocess.run(
        [str(go_tool("helm")), "template", RELEASE, str(CHART), "--set", "operator.env.REGMIRROR_AGENT_NAMESPACE=x"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode != 0
    assert "REGMIRROR_AGENT_NAMESPACE" in result.stderr and "namespaces.agent" in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("namespaces.operator=Regmirror_System", "/namespaces/operator"),
        ("operator.replicas=0", "/operator/replicas"),  # one leads, the others stand by: at least one
        ("serviceMonitor.interval=often", "/serviceMonitor/interval"),
        ("image.pullPolicy=Sometimes", "/image/pullPolicy"),
        ("image.tag=true", "/image/tag"),
    ],
)
def test_values_schema_names_the_bad_value(value: str, message: str) -> None:
    """A typo or an impossible value fails at `helm install` time, naming it, before anything reaches the cluster."""
    result = subprocess.run(
        [str(go_tool("helm")), "template", RELEASE, str(CHART), "--set", value], capture_output=True, text=True, check=False
    )
    assert result.returncode != 0 and message in result.stderr, result.stderr


# ---------------------------------------------------------------- lifecycle on a real API server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class DeploymentProcess:
    """The operator Deployment's container, run as a local process: same args, env and ServiceAccount."""

    def __init__(self, cluster: LocalCluster, log_path: Path) -> None:
        self.cluster = cluster
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        deployment = self.cluster.kubectl_json("get", "deployment", "regmirror-operator", "-n", c.DEFAULT_NAMESPACE)
        pod = deployment["spec"]["template"]["spec"]
        container = pod["containers"][0]
        env = self.cluster.env()
        env["KUBECONFIG"] = str(self.cluster.service_account_kubeconfig(deployment["metadata"]["namespace"], pod["serviceAccountName"]))
        # The Downward API's values for a pod of the Deployment (the only references the chart uses;
        # anything else would need the kubelet). The name stays across restarts, as a container's does.
        downward = {"metadata.namespace": deployment["metadata"]["namespace"], "metadata.name": "regmirror-operator-local"}
        for var in container["env"]:
            if "valueFrom" in var:
                field_path = var["valueFrom"]["fieldRef"]["fieldPath"]
                assert var["valueFrom"] == {"fieldRef": {"apiVersion": "v1", "fieldPath": field_path}} and field_path in downward, var
                env[var["name"]] = downward[field_path]
            else:
                env[var["name"]] = var["value"]
        # The ports are the pod's own in a cluster; here they must not collide with anything on the machine.
        env["REGMIRROR_METRICS_PORT"] = str(_free_port())
        args = [re.sub(r":8080/", f":{_free_port()}/", arg) for arg in container["args"]]
        assert container["command"] == ["regmirror"]
        log = open(self.log_path, "ab")  # noqa: SIM115 - the process owns it
        self.proc = subprocess.Popen([sys.executable, "-m", "regmirror", *args], env=env, stdout=log, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


@pytest.fixture(scope="module")
def helm_cluster() -> Iterator[LocalCluster]:
    """A control plane for the release alone; the CRD (which Helm never deletes) goes with it."""
    with LocalCluster(nodes=2) as local:
        yield local


def _live(cluster: LocalCluster, key: Key) -> bool:
    api_version, kind, namespace, name = key
    argv = ["get", f"{kind}.{api_version.split('/')[0]}" if "/" in api_version else kind, name]
    if namespace:
        argv += ["-n", namespace]
    return cluster.kubectl(*argv, check=False).returncode == 0


def test_install_upgrade_uninstall_with_a_ready_mirror(helm_cluster: LocalCluster, tmp_path: Path) -> None:
    cluster = helm_cluster
    env = cluster.env()
    release_objects = [_key(o) for o in render_chart()]
    helm("install", RELEASE, str(CHART), "--namespace", "default", "--wait", "--timeout", "3m", env=env)
    operator = DeploymentProcess(cluster, tmp_path / "operator.log")
    try:
        # Installed: every object the chart renders exists, the namespaces carry their Pod Security levels.
        missing = [key for key in release_objects if not _live(cluster, key)]
        assert not missing, missing
        labels = cluster.kubectl_json("get", "namespace", c.AGENT_NAMESPACE)["metadata"]["labels"]
        assert labels["pod-security.kubernetes.io/enforce"] == "privileged"

        # The operator as installed (its ServiceAccount's RBAC only) makes a mirror Ready.
        operator.start()
        apply(cluster, mirror_body("helm-dockerhub"))
        wait_condition(cluster, "helm-dockerhub", "Ready", "True", timeout=180)

        # Upgrade: a changed setting reaches the Deployment; the mirror stays Ready through the operator's restart.
        helm(
            "upgrade", RELEASE, str(CHART), "--namespace", "default", "--reuse-values", "--wait", "--timeout", "3m",
            "--set", "operator.env.REGMIRROR_WORKERS=2", "--set", "operator.resources.limits.memory=300Mi", env=env,
        )  # fmt: skip
        deployment = cluster.kubectl_json("get", "deployment", "regmirror-operator", "-n", c.DEFAULT_NAMESPACE)
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        assert {"name": "REGMIRROR_WORKERS", "value": "2"} in container["env"]
        assert container["resources"]["limits"]["memory"] == "300Mi"
        history = json.loads(helm("history", RELEASE, "--namespace", "default", "--output", "json", env=env))
        assert [h["revision"] for h in history] == [1, 2] and history[-1]["status"] == "deployed"
        operator.stop()
        operator.start()
        apply(cluster, mirror_body("helm-quay", upstream={"url": "https://quay.io"}))
        wait_condition(cluster, "helm-quay", "Ready", "True", timeout=180)
        wait_condition(cluster, "helm-dockerhub", "Ready", "True", timeout=30)

        # Uninstall as documented: the mirrors first (their finalizers clean the nodes), then the release.
        for name in ("helm-dockerhub", "helm-quay"):
            delete_mirror(cluster, name, timeout=180)
    finally:
        operator.stop()
        print(f"operator log: {operator.log_path}")
    helm("uninstall", RELEASE, "--namespace", "default", "--wait", "--timeout", "3m", env=env)

    # Nothing left but the CRD, which Helm never deletes (documented in NOTES.txt and docs/deploy.md).
    assert json.loads(helm("list", "--all-namespaces", "--output", "json", env=env)) == []
    assert cluster.kubectl("get", "secrets", "--all-namespaces", "-l", "owner=helm", "-o", "name").stdout.split() == []
    wait_for(
        lambda: not [key for key in release_objects if key[1] != "CustomResourceDefinition" and _live(cluster, key)],
        timeout=180,
        what="every object of the release to be gone",
    )
    leftovers = cluster.kubectl(
        "get", "all,configmaps,secrets,serviceaccounts,roles,rolebindings,persistentvolumeclaims", "--all-namespaces",
        "-l", "app.kubernetes.io/part-of=regmirror", "-o", "name",
    ).stdout.split()  # fmt: skip
    assert leftovers == []
    cluster_scoped = cluster.kubectl("get", "clusterroles,clusterrolebindings", "-o", "name").stdout.split()
    assert not [name for name in cluster_scoped if "regmirror" in name]
    assert _live(cluster, ("apiextensions.k8s.io/v1", "CustomResourceDefinition", "", c.CRD_NAME))
