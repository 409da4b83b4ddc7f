"""The HA children on a real API server, scheduler and controllers (kwok nodes): spread, budget, tolerations, S3 rules.

The mirror's children are rendered exactly as the operator renders them for
`storage.s3` with three replicas and applied as they are (only the owner
reference is dropped: the owner is not created here, and the garbage
collector would remove children of a missing owner). What the cluster then
does with them is what a user sees: replicas on distinct nodes, a budget that
lets one replica go at a time, pods that leave a dead node after 30 s, and a
CRD that refuses an S3 spec it cannot honour.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from harness import LocalCluster
from harness.cluster import ApiError
from harness.operator import install_crd_and_namespaces
from regmirror import naming
from regmirror.models import RegistryMirrorSpec
from regmirror.render.mirror import NODE_FAILURE_TOLERATION_SECONDS, render_mirror_children

MIRROR = "hub"


def s3_spec(replicas: int) -> RegistryMirrorSpec:
    return RegistryMirrorSpec.model_validate(
        {
            "upstream": {"url": "https://registry-1.docker.io"},
            "replicas": replicas,
            "storage": {"s3": {"endpoint": "http://s3.invalid:9000", "bucket": "mirrors", "credentialsSecretRef": {"name": "bucket-key"}}},
        }
    )


def apply_children(cluster: LocalCluster, namespace: str, spec: RegistryMirrorSpec) -> list[dict[str, Any]]:
    children = render_mirror_children(MIRROR, "00000000-0000-0000-0000-000000000000", spec, namespace)
    for obj in children:
        obj["metadata"].pop("ownerReferences", None)
    cluster.kubectl(
        "apply", "--server-side", "--field-manager=regmirror", "-f", "-", input={"apiVersion": "v1", "kind": "List", "items": children}
    )
    return children


def mirror_pods(cluster: LocalCluster, namespace: str) -> list[dict[str, Any]]:
    selector = ",".join(f"{k}={v}" for k, v in naming.selector_labels(MIRROR).items())
    items: list[dict[str, Any]] = cluster.kubectl_json("get", "pods", "-n", namespace, "-l", selector)["items"]
    return [p for p in items if not p["metadata"].get("deletionTimestamp")]


def ready(pod: dict[str, Any]) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in pod.get("status", {}).get("conditions", []))


def evict(cluster: LocalCluster, namespace: str, pod: str) -> int:
    """POST an Eviction (what `kubectl drain` does); returns the HTTP status."""
    body = {"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": pod, "namespace": namespace}}
    try:
        cluster.api("POST", f"/api/v1/namespaces/{namespace}/pods/{pod}/eviction", body)
    except ApiError as exc:
        return int(exc.status)
    return 201


def test_three_replicas_land_on_three_nodes_and_a_drain_takes_one_at_a_time(cluster: LocalCluster, namespace: str) -> None:
    nodes = [n["metadata"]["name"] for n in cluster.kubectl_json("get", "nodes")["items"]]
    replicas = min(3, len(nodes))
    assert replicas >= 2, "this test needs at least two nodes"
    apply_children(cluster, namespace, s3_spec(replicas))

    def all_ready() -> list[dict[str, Any]] | None:
        pods = mirror_pods(cluster, namespace)
        return pods if len(pods) == replicas and all(ready(p) for p in pods) else None

    pods = cluster.wait_until(all_ready, timeout=120, what=f"{replicas} ready mirror pods")
    placed = sorted(p["spec"]["nodeName"] for p in pods)
    assert len(set(placed)) == replicas, f"one replica per node: {placed}"

    for pod in pods:
        failure = {t["key"]: t for t in pod["spec"]["tolerations"] if t.get("key", "").startswith("node.kubernetes.io/")}
        assert failure["node.kubernetes.io/not-ready"]["tolerationSeconds"] == NODE_FAILURE_TOLERATION_SECONDS
        assert failure["node.kubernetes.io/unreachable"]["tolerationSeconds"] == NODE_FAILURE_TOLERATION_SECONDS
        # The admission default (300 s) was not added next to ours.
        assert sum(1 for t in pod["spec"]["tolerations"] if t.get("key") == "node.kubernetes.io/unreachable") == 1

    pdb_name = naming.child_name(MIRROR)

    def budget_allows_one() -> bool:
        status = cluster.kubectl_json("get", "pdb", pdb_name, "-n", namespace).get("status", {})
        return bool(status.get("disruptionsAllowed") == 1 and status.get("currentHealthy") == replicas)

    cluster.wait_until(budget_allows_one, timeout=60, what="the budget to allow one disruption")
    first, second = pods[0]["metadata"]["name"], pods[1]["metadata"]["name"]
    # A drain cordons first; on kwok an uncordoned node would run the evicted replica's
    # replacement at once, and the budget would rightly allow the next eviction.
    for node in nodes:
        cluster.kubectl("cordon", node)
    try:
        assert evict(cluster, namespace, first) == 201, "a drain may take one replica"
        assert evict(cluster, namespace, second) == 429, "but not a second one while the first is gone"
    finally:
        for node in nodes:
            cluster.kubectl("uncordon", node)


@pytest.mark.parametrize(
    ("storage", "extra", "message"),
    [
        ({"ephemeral": True, "s3": {"bucket": "mirrors"}}, {}, "choose one back-end"),
        ({"storageClassName": "fast", "s3": {"bucket": "mirrors"}}, {}, "storageClassName is for a PersistentVolumeClaim"),
        ({"s3": {"bucket": "mirrors"}}, {"cache": {"maxSize": "5Gi"}}, "cache.maxSize cannot be enforced on storage.s3"),
        ({}, {"replicas": 2}, "more than one replica needs storage.s3"),
    ],
)
def test_the_api_server_refuses_what_s3_storage_cannot_honour(
    cluster: LocalCluster, storage: dict[str, Any], extra: dict[str, Any], message: str
) -> None:
    install_crd_and_namespaces(cluster)
    body = {
        "apiVersion": "regmirror.dev/v1alpha1",
        "kind": "RegistryMirror",
        "metadata": {"name": "ha-rejected"},
        "spec": {"upstream": {"url": "https://quay.io"}, "storage": storage, **extra},
    }
    result = cluster.kubectl("create", "--dry-run=server", "-f", "-", input=body, check=False)
    assert result.returncode != 0, f"accepted: {json.dumps(body)}"
    assert message in result.stderr, result.stderr


def test_the_api_server_accepts_replicas_on_a_bucket(cluster: LocalCluster) -> None:
    install_crd_and_namespaces(cluster)
    body = {
        "apiVersion": "regmirror.dev/v1alpha1",
        "kind": "RegistryMirror",
        "metadata": {"name": "ha-accepted"},
        "spec": {
            "upstream": {"url": "https://quay.io"},
            "replicas": 3,
            "storage": {"s3": {"bucket": "mirrors", "credentialsSecretRef": {"name": "k"}}},
        },
    }
    result = cluster.kubectl("create", "--dry-run=server", "-o", "json", "-f", "-", input=body, check=False)
    assert result.returncode == 0, result.stderr
    stored = json.loads(result.stdout)["spec"]["storage"]["s3"]
    assert stored["region"] == "us-east-1" and stored["forcePathStyle"] is True
    assert stored["credentialsSecretRef"] == {"name": "k", "accessKeyKey": "accessKey", "secretKeyKey": "secretKey"}
