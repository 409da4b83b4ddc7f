"""A mirror's children as the API server has them, and what is wrong with the whole set.

``ownership_problems`` is the invariant the fault tests check after a crash or an
outage: every mirror has exactly the children the operator renders for its spec (no
duplicate, none missing), every object the operator manages belongs to a mirror that
exists, and there is one agent DaemonSet and one node plan.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from harness.cluster import LocalCluster
from harness.operator import AGENT_NS, OPERATOR_NS
from regmirror import constants as c
from regmirror import naming
from regmirror.models import RegistryMirrorSpec
from regmirror.render.mirror import render_mirror_children

#: Collections of the namespaced kinds a mirror owns, by kind.
CHILD_PATHS = {
    "Deployment": f"/apis/apps/v1/namespaces/{OPERATOR_NS}/deployments",
    "Service": f"/api/v1/namespaces/{OPERATOR_NS}/services",
    "ConfigMap": f"/api/v1/namespaces/{OPERATOR_NS}/configmaps",
    "PersistentVolumeClaim": f"/api/v1/namespaces/{OPERATOR_NS}/persistentvolumeclaims",
    "PodDisruptionBudget": f"/apis/policy/v1/namespaces/{OPERATOR_NS}/poddisruptionbudgets",
    "NetworkPolicy": f"/apis/networking.k8s.io/v1/namespaces/{OPERATOR_NS}/networkpolicies",
}
MANAGED = f"{c.LABEL_MANAGED_BY}={c.MANAGED_BY}"


def child(cluster: LocalCluster, kind: str, mirror: str) -> dict[str, Any] | None:
    """A mirror's child object (with managedFields), or None when it does not exist."""
    result = cluster.kubectl("get", kind, naming.child_name(mirror), "-n", OPERATOR_NS, "-o", "json", "--show-managed-fields", check=False)
    return dict(json.loads(result.stdout)) if result.returncode == 0 else None


def managed_children(cluster: LocalCluster) -> list[dict[str, Any]]:
    """Every object the operator manages in its namespace (by the managed-by label), with its kind set."""
    found = []
    for kind, path in CHILD_PATHS.items():
        for item in cluster.api("GET", f"{path}?labelSelector={MANAGED}")["items"]:
            found.append({**item, "kind": kind})
    return found


def rendered_kinds(mirror: dict[str, Any]) -> Counter[str]:
    """How many children of each kind the operator renders for this mirror's spec."""
    spec = RegistryMirrorSpec.model_validate(mirror.get("spec") or {})
    meta = mirror["metadata"]
    return Counter(obj["kind"] for obj in render_mirror_children(meta["name"], meta["uid"], spec, OPERATOR_NS))


def ownership_problems(cluster: LocalCluster, mirrors: list[str]) -> list[str]:
    """Duplicates, missing children and orphans among the operator's objects; [] when all is well.

    An orphan is a child of a mirror that no longer exists which nobody has deleted. One
    already being deleted (a deletionTimestamp: the garbage collector followed its owner
    reference) is not: a finalizer holds it, e.g. pvc-protection while a pod still mounts a
    claim. CI once saw that pod outlive its ReplicaSet for good after a 3-minute API server
    outage (kube-controller-manager's garbage collector never deleted it), which kept one
    claim Terminating for the rest of the session (8 minutes and more) and failed every later
    test that checked ownership.
    """
    bodies = {m["metadata"]["name"]: m for m in cluster.api("GET", f"/apis/{c.API_VERSION}/{c.PLURAL}")["items"]}
    live = {name: m["metadata"]["uid"] for name, m in bodies.items()}
    problems = []
    per_mirror: Counter[tuple[str, str]] = Counter()
    for obj in managed_children(cluster):
        meta = obj["metadata"]
        owner = (meta.get("labels") or {}).get(c.LABEL_MIRROR)
        per_mirror[(owner or "", obj["kind"])] += 1
        owner_uids = {ref.get("uid") for ref in meta.get("ownerReferences") or []}
        if owner not in live:
            if not meta.get("deletionTimestamp"):
                problems.append(f"orphan {obj['kind']} {meta['name']}: its mirror {owner!r} does not exist")
        elif owner_uids and live[owner] not in owner_uids:
            problems.append(f"{obj['kind']} {meta['name']} is owned by {sorted(owner_uids)}, not by mirror {owner} ({live[owner]})")
    for mirror in mirrors:
        kinds = {kind: per_mirror[(mirror, kind)] for kind in CHILD_PATHS}
        wanted = rendered_kinds(bodies[mirror]) if mirror in bodies else Counter()
        if any(kinds[kind] != wanted.get(kind, 0) for kind in CHILD_PATHS):
            problems.append(f"mirror {mirror} has children {kinds}, the operator renders {dict(wanted)}")
    for kind, path in (
        ("DaemonSet", f"/apis/apps/v1/namespaces/{AGENT_NS}/daemonsets"),
        ("ConfigMap", f"/api/v1/namespaces/{AGENT_NS}/configmaps"),
    ):
        names = [i["metadata"]["name"] for i in cluster.api("GET", f"{path}?labelSelector={MANAGED}")["items"]]
        expected = [c.AGENT_NAME] if kind == "DaemonSet" else [c.NODE_CONFIG_NAME]
        if names != expected:
            problems.append(f"agent namespace has {kind}s {names}, expected {expected}")
    return problems
