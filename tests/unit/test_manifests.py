"""The shipped manifests agree with the code: names, image, CRD copy, least privilege.

Pure YAML reading; that the API server accepts them is tests/integration/test_rbac.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

import regmirror
from regmirror import constants as c
from regmirror.render import agent as agent_render
from regmirror.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "manifests"


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _all_docs(folder: Path) -> list[dict[str, Any]]:
    # The Helm chart's templates are not YAML until rendered: tests/integration/test_helm.py renders them.
    files = [f for f in sorted(folder.rglob("*.yaml")) if f.name != "kustomization.yaml" and "helm" not in f.relative_to(folder).parts]
    return [d for f in files for d in _docs(f)]


def _operator_deployment() -> dict[str, Any]:
    return next(d for d in _docs(MANIFESTS / "base" / "operator.yaml") if d["kind"] == "Deployment")


def test_crd_copy_equals_the_generated_crd() -> None:
    """kustomize cannot read ../crds/, so manifests/crd/ holds a copy that `make crd` refreshes."""
    original = ROOT / "crds" / f"{c.CRD_NAME}.yaml"
    copy = MANIFESTS / "crd" / f"{c.CRD_NAME}.yaml"
    assert copy.read_text() == original.read_text(), "manifests/crd/ is stale: run `make crd`"


def test_rbac_has_no_wildcards_and_no_secrets_writes() -> None:
    rules = [(d["metadata"]["name"], r) for d in _all_docs(MANIFESTS / "rbac") if d["kind"] in ("Role", "ClusterRole") for r in d["rules"]]
    assert rules
    for name, rule in rules:
        for key in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule.get(key, []), (name, rule)
        assert "resourceNames" not in rule or rule["resourceNames"], (name, rule)
        if "secrets" in rule["resources"]:
            # Only the operator writes Secrets (the access Secrets it generates, controller/access.py);
            # where it can name them (the agent's namespace), it updates that one by name only.
            writes = set(rule["verbs"]) - {"get", "list", "watch"}
            assert not writes or (name == "regmirror-operator" and writes <= {"create", "patch"}), (name, rule)
            assert "update" not in rule["verbs"], (name, rule)
        # Nothing in regmirror deletes through the API: garbage collection and the namespace do.
        assert not {"delete", "deletecollection", "escalate", "bind", "impersonate"} & set(rule["verbs"]), (name, rule)


def test_service_accounts_match_the_rendered_workloads() -> None:
    accounts = {(d["metadata"]["namespace"], d["metadata"]["name"]) for d in _all_docs(MANIFESTS / "rbac") if d["kind"] == "ServiceAccount"}
    deployment = _operator_deployment()
    assert (deployment["metadata"]["namespace"], deployment["spec"]["template"]["spec"]["serviceAccountName"]) in accounts
    assert (c.AGENT_NAMESPACE, agent_render.SERVICE_ACCOUNT) in accounts


def test_operator_deployment_settings_match_the_code() -> None:
    deployment = _operator_deployment()
    assert deployment["metadata"]["namespace"] == c.DEFAULT_NAMESPACE
    # Two replicas, one active (the Lease holder): a rolling update never leaves the cluster without one.
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == c.DEFAULT_OPERATOR_IMAGE
    assert c.DEFAULT_OPERATOR_IMAGE.endswith(f":{regmirror.__version__}")
    assert container["command"] == ["regmirror"]
    assert container["args"][:2] == ["run", "--standalone"]
    env = {e["name"]: e for e in container["env"]}
    assert env["REGMIRROR_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert env["REGMIRROR_AGENT_NAMESPACE"]["value"] == c.AGENT_NAMESPACE
    assert env["REGMIRROR_AGENT_IMAGE"]["value"] == c.DEFAULT_OPERATOR_IMAGE
    assert env["REGMIRROR_METRICS_PORT"]["value"] == "8000"
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"  # the Lease's holderIdentity
    liveness = container["args"][2]
    assert liveness == "--liveness=http://0.0.0.0:8080/healthz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"


def test_operator_pod_is_restricted() -> None:
    spec = _operator_deployment()["spec"]["template"]["spec"]
    pod = spec["securityContext"]
    assert pod["runAsNonRoot"] is True and pod["runAsUser"] == 65532
    assert pod["seccompProfile"]["type"] == "RuntimeDefault"
    container = spec["containers"][0]["securityContext"]
    assert container["allowPrivilegeEscalation"] is False
    assert container["readOnlyRootFilesystem"] is True
    assert container["capabilities"]["drop"] == ["ALL"]
    resources = spec["containers"][0]["resources"]
    assert resources["requests"] == {"cpu": "50m", "memory": "128Mi"}
    assert resources["limits"] == {"memory": "256Mi"}


def test_kustomize_image_entry_pins_the_operator_image() -> None:
    kustomization = yaml.safe_load((MANIFESTS / "base" / "kustomization.yaml").read_text())
    name, tag = c.DEFAULT_OPERATOR_IMAGE.rsplit(":", 1)
    assert kustomization["images"] == [{"name": name, "newTag": tag}]


def test_namespaces_carry_pod_security_levels() -> None:
    labels = {d["metadata"]["name"]: d["metadata"]["labels"] for d in _docs(MANIFESTS / "base" / "namespaces.yaml")}
    assert labels[c.DEFAULT_NAMESPACE]["pod-security.kubernetes.io/enforce"] == "restricted"
    agent = labels[c.AGENT_NAMESPACE]
    assert agent["pod-security.kubernetes.io/enforce"] == "privileged"
    assert agent["pod-security.kubernetes.io/warn"] == "baseline"
    assert agent["pod-security.kubernetes.io/audit"] == "restricted"


def test_operator_objects_are_not_mistaken_for_mirror_children() -> None:
    """The operator watches objects labelled managed-by=regmirror-operator as mirror children."""
    for doc in _all_docs(MANIFESTS):
        labels = (doc.get("metadata") or {}).get("labels") or {}
        assert labels.get(c.LABEL_MANAGED_BY) != c.MANAGED_BY, doc["metadata"]["name"]


def test_operator_replicas_prefer_different_nodes_and_one_survives_a_drain() -> None:
    deployment = _operator_deployment()
    selector = deployment["spec"]["selector"]["matchLabels"]
    (spread,) = deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert spread["topologyKey"] == "kubernetes.io/hostname" and spread["maxSkew"] == 1
    assert spread["whenUnsatisfiable"] == "ScheduleAnyway"  # a one-node cluster still runs both
    assert spread["labelSelector"]["matchLabels"] == selector
    (pdb,) = [d for d in _docs(MANIFESTS / "base" / "operator.yaml") if d["kind"] == "PodDisruptionBudget"]
    assert pdb["metadata"]["namespace"] == deployment["metadata"]["namespace"]
    assert pdb["spec"] == {"minAvailable": 1, "selector": {"matchLabels": selector}}
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"] == container["livenessProbe"]["httpGet"]  # a standby is ready


def test_operator_may_write_only_its_own_lease() -> None:
    settings = Settings()
    rules = [
        r
        for d in _all_docs(MANIFESTS / "rbac")
        if d["kind"] == "Role" and d["metadata"]["namespace"] == settings.namespace
        for r in d["rules"]
        if "leases" in r["resources"]
    ]
    assert [r["apiGroups"] for r in rules] == [["coordination.k8s.io"]] * 2
    by_name = [r for r in rules if r.get("resourceNames")]
    assert by_name == [
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "resourceNames": [settings.lease_name], "verbs": ["get", "update"]}
    ]
    unnamed = [r for r in rules if not r.get("resourceNames")]
    assert [r["verbs"] for r in unnamed] == [["create"]]  # a create cannot be limited by name
