"""Reading back what the operator wrote for a mirror: children, Secrets, the node plan.

``cluster`` is a ``harness.LocalCluster`` and ``operator`` a ``harness.operator.OperatorProcess``.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from harness.cluster import LocalCluster
from harness.dataplane.loopback import MirrorObjects
from harness.operator import AGENT_NS, OPERATOR_NS, OperatorProcess
from harness.waiting import wait_for
from regmirror import constants as c
from regmirror import naming
from regmirror.access import NODE_SECRET_NAME


def _kubectl_json(cluster: LocalCluster, *args: str) -> dict[str, Any] | None:
    result = cluster.kubectl(*args, "-o", "json", check=False)
    return dict(json.loads(result.stdout)) if result.returncode == 0 else None


def read_mirror_objects(cluster: LocalCluster, operator: OperatorProcess, name: str, timeout: float = 90) -> MirrorObjects:
    """Wait for the operator to write a mirror's ConfigMap, Service (with a ClusterIP) and Deployment."""
    child = naming.child_name(name)

    def children() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]] | None:
        cm = _kubectl_json(cluster, "get", "configmap", child, "-n", OPERATOR_NS)
        svc = _kubectl_json(cluster, "get", "service", child, "-n", OPERATOR_NS)
        deploy = _kubectl_json(cluster, "get", "deployment", child, "-n", OPERATOR_NS)
        if cm and svc and deploy and svc["spec"].get("clusterIP"):
            return cm, svc, deploy
        return None

    cm, svc, deploy = wait_for(children, timeout, f"the operator's children of {name}", diagnose=operator.log_tail)
    container = deploy["spec"]["template"]["spec"]["containers"][0]
    volumes = deploy["spec"]["template"]["spec"].get("volumes", [])
    env_refs = [(var.get("valueFrom") or {}).get("secretKeyRef") for var in container.get("env", [])]
    secret_names = [ref["name"] for ref in env_refs if ref] + [v["secret"]["secretName"] for v in volumes if "secret" in v]
    secrets: dict[str, dict[str, str]] = {}
    for secret_name in dict.fromkeys(secret_names):
        secret = _kubectl_json(cluster, "get", "secret", secret_name, "-n", OPERATOR_NS)
        assert secret is not None, f"Secret {secret_name} referenced by {child} is missing"
        secrets[secret_name] = {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
    port = next(p["port"] for p in svc["spec"]["ports"] if p["name"] == "registry")
    return MirrorObjects(name, cm["data"]["config.yml"], container, secrets, svc["spec"]["clusterIP"], int(port), volumes)


def read_node_plan(cluster: LocalCluster, operator: OperatorProcess, names: list[str], timeout: float = 90) -> str:
    """The node plan (ConfigMap regmirror-node/regmirror-node-config, key mirrors.json) once it lists `names`."""

    def plan() -> str | None:
        cm = _kubectl_json(cluster, "get", "configmap", c.NODE_CONFIG_NAME, "-n", AGENT_NS)
        text = ((cm or {}).get("data") or {}).get(c.NODE_CONFIG_KEY)
        if text and set(names) <= {m["name"] for m in json.loads(text).get("mirrors", [])}:
            return str(text)
        return None

    return str(wait_for(plan, timeout, f"the node plan listing {names}", diagnose=operator.log_tail))


def read_node_credentials(cluster: LocalCluster, operator: OperatorProcess, plan_json: str, timeout: float = 90) -> dict[str, str]:
    """The agent's Secret (regmirror-node/regmirror-agent-credentials) once it holds the revision `plan_json` names for each mirror.

    Every node mounts it; a node without the plan's revision reports CredentialPending
    for that mirror (and a Restricted mirror holds the node back), so the Secret read
    must match the plan read, not just hold a key per mirror.
    """
    revisions = {m["name"]: m["authRevision"] for m in json.loads(plan_json).get("mirrors", []) if m.get("authRevision") is not None}

    def entries() -> dict[str, str] | None:
        secret = _kubectl_json(cluster, "get", "secret", NODE_SECRET_NAME, "-n", AGENT_NS)
        data = {k: base64.b64decode(v).decode() for k, v in ((secret or {}).get("data") or {}).items()}
        held = {name: str(rev) in (json.loads(data[name]).get("authorizations") or {}) for name, rev in revisions.items() if name in data}
        return data if len(held) == len(revisions) and all(held.values()) else None

    return dict(wait_for(entries, timeout, f"{NODE_SECRET_NAME} holding the plan's revisions {revisions}", diagnose=operator.log_tail))
