"""Issue #3: the local control plane behaves like a real cluster, on kwok's fake nodes.

These run the real etcd, kube-apiserver, kube-controller-manager and kube-scheduler
(``harness.LocalCluster``); kwok plays every kubelet. Each test works in its own
namespace and asserts on what ``kubectl`` shows a user.
"""

from __future__ import annotations

import ipaddress
import uuid
from typing import Any

import pytest

from harness import LocalCluster
from harness.cluster import KWOK_STORAGE_CLASS, read_versions

WAIT = "--timeout=60s"
IMAGE = "registry.invalid/pause:1"  # kwok never pulls, so the image need not exist


def fake_node_names(cluster: LocalCluster) -> set[str]:
    return {node["metadata"]["name"] for node in cluster.fake_nodes()}


def condition(obj: dict[str, Any], type_: str) -> str | None:
    for cond in obj.get("status", {}).get("conditions") or []:
        if cond["type"] == type_:
            return str(cond["status"])
    return None


def test_server_and_kubectl_run_the_pinned_kubernetes_version(cluster: LocalCluster) -> None:
    pinned = read_versions()["KUBERNETES_VERSION"]
    assert pinned == "v1.37.2"

    versions = cluster.kubectl_json("version")

    assert versions["serverVersion"]["gitVersion"] == pinned
    assert versions["clientVersion"]["gitVersion"] == pinned


def test_deployment_becomes_available_on_fake_nodes(cluster: LocalCluster, namespace: str) -> None:
    cluster.kubectl("-n", namespace, "create", "deployment", "web", f"--image={IMAGE}", "--replicas=3")

    cluster.kubectl("-n", namespace, "rollout", "status", "deployment/web", WAIT)
    cluster.kubectl("-n", namespace, "wait", "deployment/web", "--for=condition=Available", WAIT)

    deployment = cluster.kubectl_json("-n", namespace, "get", "deployment", "web")
    assert deployment["status"]["availableReplicas"] == 3
    pods = cluster.kubectl_json("-n", namespace, "get", "pods", "-l", "app=web")["items"]
    assert len(pods) == 3
    fake_nodes = fake_node_names(cluster)
    for pod in pods:
        assert pod["spec"]["nodeName"] in fake_nodes
        assert pod["status"]["phase"] == "Running"
        assert condition(pod, "Ready") == "True"
    pod_ips = [pod["status"]["podIP"] for pod in pods]
    assert len(set(pod_ips)) == len(pod_ips)
    assert all(ipaddress.ip_address(ip) for ip in pod_ips)


def test_daemonset_is_ready_on_every_fake_node(cluster: LocalCluster, namespace: str) -> None:
    labels = {"app": "node-agent"}
    daemonset = {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {"name": "node-agent", "namespace": namespace},
        "spec": {
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [{"name": "agent", "image": IMAGE}]},
            },
        },
    }
    fake_nodes = fake_node_names(cluster)
    assert fake_nodes, "the cluster fixture should have fake nodes"

    cluster.kubectl("apply", "-f", "-", input=daemonset)

    cluster.kubectl(
        "-n",
        namespace,
        "wait",
        "daemonset/node-agent",
        f"--for=jsonpath={{.status.numberReady}}={len(fake_nodes)}",
        WAIT,
    )
    cluster.kubectl("-n", namespace, "rollout", "status", "daemonset/node-agent", WAIT)
    status = cluster.kubectl_json("-n", namespace, "get", "daemonset", "node-agent")["status"]
    assert status["desiredNumberScheduled"] == status["numberReady"] == len(fake_nodes)
    pods = cluster.kubectl_json("-n", namespace, "get", "pods", "-l", "app=node-agent")["items"]
    assert {pod["spec"]["nodeName"] for pod in pods} == fake_nodes


@pytest.mark.parametrize("owner_scope", ["namespaced", "cluster-scoped"])
def test_deleting_an_owner_garbage_collects_its_child(cluster: LocalCluster, namespace: str, owner_scope: str) -> None:
    # The operator's children live in its namespace and are owned by a cluster-scoped
    # RegistryMirror; both shapes of ownership must be collected.
    if owner_scope == "namespaced":
        owner = cluster.kubectl_json("-n", namespace, "create", "configmap", "owner", "--from-literal=role=owner")
        delete_owner = ["-n", namespace, "delete", "configmap", "owner"]
    else:
        name = f"owner-{uuid.uuid4().hex[:8]}"
        owner = cluster.kubectl_json("create", "clusterrole", name, "--verb=get", "--resource=pods")
        delete_owner = ["delete", "clusterrole", name]
    child = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": "child",
            "namespace": namespace,
            "ownerReferences": [
                {
                    "apiVersion": owner["apiVersion"],
                    "kind": owner["kind"],
                    "name": owner["metadata"]["name"],
                    "uid": owner["metadata"]["uid"],
                }
            ],
        },
        "data": {"role": "child"},
    }
    cluster.kubectl("apply", "-f", "-", input=child)
    assert cluster.kubectl("-n", namespace, "get", "configmap", "child").returncode == 0

    cluster.kubectl(*delete_owner)

    cluster.kubectl("-n", namespace, "wait", "--for=delete", "configmap/child", WAIT)
    gone = cluster.kubectl("-n", namespace, "get", "configmap", "child", check=False)
    assert gone.returncode != 0 and "NotFound" in gone.stderr


def test_pvc_of_the_default_class_becomes_bound_and_its_volume_goes_with_it(cluster: LocalCluster, namespace: str) -> None:
    pvc = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": "cache", "namespace": namespace},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "5Gi"}}},
    }

    cluster.kubectl("apply", "-f", "-", input=pvc)

    cluster.kubectl("-n", namespace, "wait", "pvc/cache", "--for=jsonpath={.status.phase}=Bound", WAIT)
    claim = cluster.kubectl_json("-n", namespace, "get", "pvc", "cache")
    assert claim["spec"]["storageClassName"] == KWOK_STORAGE_CLASS  # the default class
    assert claim["status"]["capacity"]["storage"] == "5Gi"
    volume_name = claim["spec"]["volumeName"]
    volume = cluster.kubectl_json("get", "pv", volume_name)
    assert volume["spec"]["claimRef"]["name"] == "cache"
    assert volume["status"]["phase"] == "Bound"

    cluster.kubectl("-n", namespace, "delete", "pvc", "cache", WAIT)

    # reclaimPolicy Delete: the provisioned volume is removed with its claim.
    cluster.kubectl("wait", "--for=delete", f"pv/{volume_name}", WAIT)


def test_deployment_mounting_a_pvc_becomes_available(cluster: LocalCluster, namespace: str) -> None:
    # What a mirror with persistent storage looks like: the scheduler must bind the
    # volume and place the pod.
    objects = {
        "apiVersion": "v1",
        "kind": "List",
        "items": [
            {
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "metadata": {"name": "data", "namespace": namespace},
                "spec": {
                    "accessModes": ["ReadWriteOnce"],
                    "resources": {"requests": {"storage": "1Gi"}},
                },
            },
            {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": {"name": "registry", "namespace": namespace},
                "spec": {
                    "replicas": 1,
                    "selector": {"matchLabels": {"app": "registry"}},
                    "template": {
                        "metadata": {"labels": {"app": "registry"}},
                        "spec": {
                            "containers": [
                                {
                                    "name": "registry",
                                    "image": IMAGE,
                                    "volumeMounts": [{"name": "data", "mountPath": "/var/lib/registry"}],
                                }
                            ],
                            "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "data"}}],
                        },
                    },
                },
            },
        ],
    }

    cluster.kubectl("apply", "-f", "-", input=objects)

    cluster.kubectl("-n", namespace, "wait", "deployment/registry", "--for=condition=Available", WAIT)
    claim = cluster.kubectl_json("-n", namespace, "get", "pvc", "data")
    assert claim["status"]["phase"] == "Bound"


def test_service_accounts_get_only_their_rbac_rights_and_are_audited(cluster: LocalCluster, namespace: str) -> None:
    cluster.kubectl("-n", namespace, "create", "serviceaccount", "limited")
    as_sa = ["--kubeconfig", str(cluster.service_account_kubeconfig(namespace, "limited"))]

    denied = cluster.kubectl(*as_sa, "-n", namespace, "create", "configmap", "x", check=False)
    assert denied.returncode != 0 and "forbidden" in denied.stderr

    cluster.kubectl(
        "-n",
        namespace,
        "create",
        "role",
        "configmaps",
        "--verb=create,get",
        "--resource=configmaps",
    )
    cluster.kubectl(
        "-n",
        namespace,
        "create",
        "rolebinding",
        "limited",
        "--role=configmaps",
        f"--serviceaccount={namespace}:limited",
    )
    cluster.kubectl(*as_sa, "-n", namespace, "create", "configmap", "x")

    user = f"system:serviceaccount:{namespace}:limited"

    def both_writes_audited() -> list[dict[str, Any]] | None:
        events = cluster.write_events(user)
        return events if len(events) >= 2 else None

    # The audit event may land a moment after kubectl has its answer.
    writes = cluster.wait_until(both_writes_audited, timeout=10, what="audit events")
    summary = [(e["verb"], e["objectRef"]["resource"], e["responseStatus"]["code"]) for e in writes]
    assert summary == [("create", "configmaps", 403), ("create", "configmaps", 201)]
