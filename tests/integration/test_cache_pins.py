"""The cache's inputs from the cluster, with the real operator on the real control plane.

A kwok pod stands in for a workload: kwok runs it (Running, a pod IP), and the test
then reports the imageID a kubelet would (kwok reports none), through the status
subresource as a kubelet does. The operator must pin that digest in the mirror's
mirror ConfigMap (the sidecar never evicts it), only for the mirror of that image's
registry, in one write, and unpin it when the pod is gone. The invalidate annotation
must reach the same ConfigMap.

Not here: status.cache. kwok pods run no container, so no `regmirror cache serve`
answers at their IPs; tests/e2e/test_status_cache_e2e.py runs a real mirror pod on
loopback and reports it as a kubelet would.
"""

from __future__ import annotations

import datetime
import json
from typing import Any

from harness import LocalCluster
from harness.objects import MirrorFactory
from harness.operator import OPERATOR_NS, OPERATOR_USER, OperatorProcess
from harness.waiting import wait_for
from regmirror import constants as c
from regmirror.naming import child_name

WORKLOAD_NS = "default"
HUB_DIGEST = "sha256:" + "1" * 64
QUAY_DIGEST = "sha256:" + "2" * 64


def control_data(cluster: LocalCluster, mirror: str) -> dict[str, Any] | None:
    result = cluster.kubectl("get", "configmap", child_name(mirror), "-n", OPERATOR_NS, "-o", "json", check=False)
    if result.returncode != 0:
        return None
    return dict(json.loads(result.stdout).get("data") or {})


def pins(cluster: LocalCluster, mirror: str) -> list[str]:
    data = control_data(cluster, mirror) or {}
    return list(json.loads(data.get("pins.json", "[]")))


def workload(cluster: LocalCluster, mirrors: MirrorFactory, name: str) -> dict[str, Any]:
    """A pod on a kwok node, running two images: one from docker.io, one from quay.io."""
    node = cluster.fake_nodes()[0]["metadata"]["name"]
    body = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": WORKLOAD_NS},
        "spec": {
            "nodeName": node,
            "tolerations": [{"operator": "Exists"}],
            "containers": [{"name": "web", "image": "docker.io/library/nginx:1.27"}, {"name": "side", "image": "quay.io/org/app:1"}],
        },
    }
    mirrors.track("pod", name, WORKLOAD_NS)
    cluster.api("POST", f"/api/v1/namespaces/{WORKLOAD_NS}/pods", body)
    return dict(wait_for(lambda: running(cluster, name), 60, f"kwok to run pod {name}"))


def running(cluster: LocalCluster, name: str) -> dict[str, Any] | None:
    pod = cluster.api("GET", f"/api/v1/namespaces/{WORKLOAD_NS}/pods/{name}")
    return dict(pod) if (pod.get("status") or {}).get("phase") == "Running" else None


def report_image_ids(cluster: LocalCluster, pod: dict[str, Any]) -> None:
    """What a kubelet reports once the images are pulled: each container's imageID (repo@digest)."""
    ids = {"web": f"docker.io/library/nginx@{HUB_DIGEST}", "side": f"quay.io/org/app@{QUAY_DIGEST}"}
    statuses = []
    for cs in pod["status"]["containerStatuses"]:
        statuses.append({**cs, "imageID": ids[cs["name"]]})
    patch = {"status": {"containerStatuses": statuses}}
    cluster.kubectl(
        "patch", "pod", pod["metadata"]["name"], "-n", WORKLOAD_NS, "--subresource=status", "--type=merge", "-p", json.dumps(patch)
    )


def test_a_running_pods_image_is_pinned_by_its_mirror_until_the_pod_is_gone(
    cluster: LocalCluster, operator: OperatorProcess, mirrors: MirrorFactory
) -> None:
    mirrors.create("pins-hub")  # docker.io
    wait_for(lambda: control_data(cluster, "pins-hub"), 60, "the mirror's ConfigMap")
    assert pins(cluster, "pins-hub") == []
    pod = workload(cluster, mirrors, "pins-workload")
    since = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    report_image_ids(cluster, pod)
    wait_for(
        lambda: pins(cluster, "pins-hub") == [HUB_DIGEST] or None,
        60,
        "the docker.io digest pinned",
        diagnose=lambda: json.dumps([(running(cluster, "pins-workload") or {}).get("status"), control_data(cluster, "pins-hub")])[:3000],
    )
    assert QUAY_DIGEST not in pins(cluster, "pins-hub"), "an image of another registry is not this mirror's to keep"
    writes = [
        w
        for w in cluster.write_events(OPERATOR_USER, since=since)
        if (w.get("objectRef") or {}).get("resource") == "configmaps" and w["objectRef"].get("name") == child_name("pins-hub")
    ]
    assert len(writes) == 1, f"one ConfigMap write for one pin: {[w['verb'] for w in writes]}"

    cluster.kubectl("delete", "pod", "pins-workload", "-n", WORKLOAD_NS, "--wait=false")
    wait_for(lambda: pins(cluster, "pins-hub") == [] or None, 120, "the digest unpinned once the pod is gone")


def test_the_invalidate_annotation_reaches_the_cache_configmap(
    cluster: LocalCluster, operator: OperatorProcess, mirrors: MirrorFactory
) -> None:
    mirrors.create("inval-hub")
    wait_for(lambda: control_data(cluster, "inval-hub"), 60, "the mirror's ConfigMap")
    request = {"library/nginx:1.27": "1764490000.000"}
    # What `regmirror cache invalidate` does, with the admin's kubectl.
    cluster.kubectl("annotate", "--overwrite", c.SINGULAR, "inval-hub", f"{c.ANNOTATION_INVALIDATE}={json.dumps(request)}")

    def applied() -> bool | None:
        data = control_data(cluster, "inval-hub") or {}
        return json.loads(data.get("invalidate.json", "{}")) == request or None

    wait_for(applied, 30, "the invalidation in the mirror's ConfigMap")
