"""The shipped manifests on the real API server: least-privilege RBAC and Pod Security.

The `operator` fixture runs `regmirror run` with the token of the ServiceAccount
that `manifests/rbac` binds, so a rule missing from the manifests shows up as a
403 in the audit log, and a rule too many would show up in review of the
request summary this module prints.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from harness import LocalCluster
from harness.objects import MirrorFactory
from harness.operator import (
    AGENT_NS,
    OPERATOR_NS,
    OPERATOR_USER,
    REPO,
    OperatorProcess,
    get_mirror,
    mirror_body,
    wait_condition,
)
from harness.waiting import wait_for
from regmirror.naming import child_name

MANIFESTS = REPO / "manifests"
MIRROR = "rbac-lifecycle"
SECRET = "rbac-lifecycle-creds"


def _kustomize(cluster: LocalCluster, path: Path) -> list[dict[str, Any]]:
    out = cluster.kubectl("kustomize", str(path)).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def _pod_from_template(template: dict[str, Any], name: str, namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": template["metadata"].get("labels", {})},
        "spec": template["spec"],
    }


def _dry_run_pod(cluster: LocalCluster, pod: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    return cluster.kubectl("create", "--dry-run=server", "-f", "-", input=pod, check=False)


def _request_summary(events: list[dict[str, Any]]) -> Counter[tuple[str, str, str, str, int]]:
    """(verb, group/resource[/subresource], namespace, name-or-*, code) of every completed request."""
    summary: Counter[tuple[str, str, str, str, int]] = Counter()
    for event in events:
        if event.get("stage") != "ResponseComplete" or "objectRef" not in event:
            continue
        ref = event["objectRef"]
        resource = "/".join(filter(None, [ref.get("apiGroup", ""), ref.get("resource", "")]))
        if ref.get("subresource"):
            resource += "/" + ref["subresource"]
        code = int((event.get("responseStatus") or {}).get("code", 0))
        summary[(event["verb"], resource, ref.get("namespace", ""), ref.get("name", "*"), code)] += 1
    return summary


# ------------------------------------------------------------------ manifests render


def test_kustomize_renders_the_whole_install(cluster: LocalCluster) -> None:
    objects = _kustomize(cluster, MANIFESTS)
    kinds = Counter(o["kind"] for o in objects)
    assert kinds["CustomResourceDefinition"] == 1
    assert kinds["Namespace"] == 2
    assert kinds["Deployment"] == 1
    assert kinds["ServiceAccount"] == 2
    namespaces = {o["metadata"]["name"]: o["metadata"]["labels"] for o in objects if o["kind"] == "Namespace"}
    assert namespaces[OPERATOR_NS]["pod-security.kubernetes.io/enforce"] == "restricted"
    assert namespaces[AGENT_NS]["pod-security.kubernetes.io/enforce"] == "privileged"
    # The ServiceMonitor is opt-in: the base must install on clusters without the Prometheus operator.
    assert "ServiceMonitor" not in kinds
    overlay = Counter(o["kind"] for o in _kustomize(cluster, MANIFESTS / "overlays" / "servicemonitor"))
    assert overlay["ServiceMonitor"] == 2  # the operator's metrics and every mirror's
    assert overlay["Deployment"] == 1


def test_server_accepts_the_install(cluster: LocalCluster, operator: OperatorProcess) -> None:
    """`kubectl apply --dry-run=server -k manifests/` passes validation and admission."""
    result = cluster.kubectl("apply", "--server-side", "--dry-run=server", "-k", str(MANIFESTS), check=False)
    assert result.returncode == 0, result.stderr
    # The operator's namespace warns at `restricted` as well: any warning would be a violation.
    assert "PodSecurity" not in result.stderr, result.stderr


def test_operator_pod_passes_restricted_pod_security(cluster: LocalCluster) -> None:
    """Pod Security admission enforces on pods, not Deployments: dry-run the pod the Deployment would create."""
    deployment = next(o for o in _kustomize(cluster, MANIFESTS) if o["kind"] == "Deployment")
    assert deployment["metadata"]["namespace"] == OPERATOR_NS
    labels = cluster.kubectl_json("get", "namespace", OPERATOR_NS)["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    result = _dry_run_pod(cluster, _pod_from_template(deployment["spec"]["template"], "operator-psa", OPERATOR_NS))
    assert result.returncode == 0, result.stderr
    assert "PodSecurity" not in result.stderr


def _agent_daemonset(*extra: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "regmirror", "render", "-f", str(REPO / "examples" / "dockerhub.yaml"), *extra],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return next(d for d in yaml.safe_load_all(out) if d and d["kind"] == "DaemonSet")


# What `baseline` finds in the agent pod, with and without the connection guard (hostNetwork, which makes
# its health port a host port, and NET_ADMIN).
VIOLATIONS = ("hostNetwork", "hostPort", "non-default capabilities", "hostPath volumes")
BASELINE_VIOLATIONS = {
    True: ["hostNetwork", "hostPort", "non-default capabilities", "hostPath volumes"],
    False: ["hostPath volumes"],
}


@pytest.mark.parametrize("guard", [True, False], ids=["guard", "no-guard"])
@pytest.mark.parametrize(
    ("level", "admitted"),
    [("privileged", True), ("baseline", False), ("restricted", False)],
)
def test_agent_pod_needs_privileged_only_for_host_path_and_the_guard(
    cluster: LocalCluster, namespace: str, level: str, admitted: bool, guard: bool
) -> None:
    """The agent passes `privileged`; `baseline` rejects it for hostPath volumes, plus hostNetwork (and so a hostPort) and NET_ADMIN with the guard."""
    cluster.kubectl("label", "namespace", namespace, f"pod-security.kubernetes.io/enforce={level}", "--overwrite")
    daemonset = _agent_daemonset(*([] if guard else ["--no-agent-guard-connections"]))
    cluster.kubectl("create", "serviceaccount", daemonset["spec"]["template"]["spec"]["serviceAccountName"], "-n", namespace)
    result = _dry_run_pod(cluster, _pod_from_template(daemonset["spec"]["template"], "agent-psa", namespace))
    if admitted:
        assert result.returncode == 0, result.stderr
        return
    assert result.returncode != 0 and "violates PodSecurity" in result.stderr, result.stderr
    if level == "baseline":
        # e.g. `violates PodSecurity "baseline:latest": host namespaces (hostNetwork=true), non-default capabilities
        # (container "agent" must not include "NET_ADMIN" in securityContext.capabilities.add), hostPath volumes (volumes ...)`
        violations = result.stderr.split(':latest":', 1)[1]
        found = [v for v in VIOLATIONS if v in violations]
        assert found == BASELINE_VIOLATIONS[guard], result.stderr
        assert violations.count("), ") == len(found) - 1, f"more than {found} violates baseline: {result.stderr}"


# ------------------------------------------------------------------ operator RBAC


def test_operator_lifecycle_is_never_forbidden(cluster: LocalCluster, operator: OperatorProcess, mirrors: MirrorFactory) -> None:
    """Create (with a missing then present Secret), update, drift, delete: the operator's SA never gets a 403."""
    mirrors.track("secret", SECRET)
    cluster.kubectl("delete", "secret", SECRET, "-n", OPERATOR_NS, check=False)
    mirrors.create(MIRROR, upstream={"url": "https://quay.io", "credentialsSecretRef": {"name": SECRET}})
    wait_condition(cluster, MIRROR, "Ready", "False", reason="CredentialsSecretMissing")
    cluster.kubectl("create", "secret", "generic", SECRET, "-n", OPERATOR_NS, "--from-literal=username=robot", "--from-literal=password=x")
    wait_condition(cluster, MIRROR, "Ready", "True")

    # Update: a new generation must be observed and Ready again.
    mirrors.create(MIRROR, upstream={"url": "https://quay.io", "credentialsSecretRef": {"name": SECRET}}, cache={"ttl": "1h"})
    generation = get_mirror(cluster, MIRROR)["metadata"]["generation"]
    wait_for(
        lambda: get_mirror(cluster, MIRROR).get("status", {}).get("observedGeneration") == generation,
        timeout=60,
        what="the update to be observed",
    )
    wait_condition(cluster, MIRROR, "Ready", "True")

    # Drift: a child deleted by hand is created again.
    cluster.kubectl("delete", "configmap", child_name(MIRROR), "-n", OPERATOR_NS)
    wait_for(
        lambda: cluster.kubectl("get", "configmap", child_name(MIRROR), "-n", OPERATOR_NS, check=False).returncode == 0,
        timeout=60,
        what="the ConfigMap to be restored",
    )

    # Secret rotation, then removal of the mirror (finalizer released after node cleanup).
    rotated = base64.b64encode(b"rotated").decode()
    cluster.kubectl("patch", "secret", SECRET, "-n", OPERATOR_NS, "-p", json.dumps({"data": {"password": rotated}}))
    mirrors.delete(MIRROR)
    cluster.kubectl("delete", "secret", SECRET, "-n", OPERATOR_NS, check=False)

    # Everything the operator did in this session (all tests sharing the fixture so far).
    # (Requests tests make as the operator's ServiceAccount to be refused carry their own User-Agent.)
    events = [e for e in cluster.audit_events(user=OPERATOR_USER) if "deliberately-denied" not in e.get("userAgent", "")]
    summary = _request_summary(events)
    print("\noperator requests (verb, resource, namespace, name, code): count")
    for key, count in sorted(summary.items()):
        print(f"  {key}: {count}")
    forbidden = sorted({k for k in summary if k[4] == 403})
    assert not forbidden, f"the operator was denied: {forbidden}"
    assert summary, "no audited request by the operator: is the fixture using the ServiceAccount?"


def test_namespace_admin_cannot_create_a_mirror(cluster: LocalCluster, namespace: str, mirrors: MirrorFactory) -> None:
    """RegistryMirror is cluster-scoped: even `admin` of a namespace cannot redirect the nodes' pulls."""
    mirrors.track_mirror("ns-admin-was-here")  # should the create ever succeed, it is not left behind
    cluster.kubectl("create", "serviceaccount", "ns-admin", "-n", namespace)
    cluster.kubectl("create", "rolebinding", "ns-admin", "-n", namespace, "--clusterrole=admin", f"--serviceaccount={namespace}:ns-admin")
    as_admin = ["--kubeconfig", str(cluster.service_account_kubeconfig(namespace, "ns-admin"))]

    # Sanity: the binding works inside the namespace.
    assert cluster.kubectl(*as_admin, "auth", "can-i", "create", "deployments", "-n", namespace, check=False).stdout.strip() == "yes"

    can_i = cluster.kubectl(*as_admin, "auth", "can-i", "create", "registrymirrors.regmirror.dev", check=False)
    assert can_i.stdout.strip() == "no", can_i.stdout + can_i.stderr
    attempt = cluster.kubectl(*as_admin, "create", "-f", "-", input=mirror_body("ns-admin-was-here"), check=False)
    assert attempt.returncode != 0
    assert "Forbidden" in attempt.stderr or "forbidden" in attempt.stderr, attempt.stderr
    assert cluster.kubectl("get", "registrymirror", "ns-admin-was-here", check=False).returncode != 0
