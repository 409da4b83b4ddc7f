"""status.cache end to end: what nodes pulled through a real mirror pod, written by the real operator on the resource.

The mirror pod runs on loopback as the operator rendered it (harness/cachepath.py:
distribution 3, Varnish, the `regmirror cache` sidecar), in front of a real upstream
registry, and real containerd pulls through it. Its sidecar listens on a loopback
address of its own at the port the operator polls (CACHE_SIDECAR_PORT). No kubelet
runs here, so the test reports that pod to the API server as a kubelet would: a Pod in
the operator's namespace with the mirror's pod labels (all but `app.kubernetes.io/name`,
so the mirror's ReplicaSet does not adopt and delete it), then Running and Ready at that
address through the status subresource. The mirror's own Deployment asks for a node
label no node has, so no kwok pod with an unreachable IP joins the figures.

The operator (restarted for this module with a 1 s poll; the session's operator does not poll, see
harness/operator.py) must find the pod, poll it and write status.cache: the figures of
what containerd pulled, the pin it rendered from a workload's imageID once the sidecar
reads it, and a pod that stops answering as a stale replica with its last figures kept;
and status.nodes: the node whose address the pulls came from counts as pulling, the
others are named.
"""

from __future__ import annotations

import json
import os
import random
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _dataplane import Containerd, ContainerdBinaries, Registry, wait_for
from _images import BuiltImage, multi_layer_image

from harness import LocalCluster
from harness.cachepath import CachePod, configured_node
from harness.objects import MirrorFactory
from harness.operator import OPERATOR_NS, OperatorProcess, get_mirror
from regmirror import constants as c
from regmirror.models import RegistryMirrorSpec
from regmirror.naming import child_name
from regmirror.render.front import CACHE_SIDECAR_PORT

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="runs containerd, varnishd and registries as daemons: needs root")

MIRROR = "cs-hub"
WORKLOAD_NS = "default"
NO_NODE = {"e2e.regmirror.dev/no-such-node": "true"}  # the mirror's own pods stay Pending
NOT_SCHEDULED = "e2e-no-scheduler"  # the fake pods are reported by the test, never scheduled
POLL_SECONDS = "1"


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> BuiltImage:
    return multi_layer_image(tmp_path_factory.mktemp("status-image"), name="library/status", layer_sizes=(256 << 10, 64 << 10))


@pytest.fixture(scope="module")
def upstream(binaries: ContainerdBinaries, image: BuiltImage, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    with Registry.start(tmp_path_factory.mktemp("status-upstream")) as registry:
        image.push(registry.address)
        yield registry


@pytest.fixture(scope="module")
def polling_operator(operator: OperatorProcess) -> Iterator[OperatorProcess]:
    """The session's operator, polling the mirror pods' sidecars every second for this module."""
    operator.extra_env = {"REGMIRROR_CACHE_STATS_INTERVAL": POLL_SECONDS}
    operator.restart()
    operator.wait_live()
    try:
        yield operator
    finally:
        operator.extra_env = {}
        operator.restart()
        operator.wait_live()


def pod_address() -> str:
    """A loopback address (127.0.0.0/8 is all loopback on Linux) where CACHE_SIDECAR_PORT is free."""
    for _ in range(50):
        address = f"127.0.{random.randint(1, 254)}.{random.randint(2, 254)}"
        with socket.socket() as probe:
            try:
                probe.bind((address, CACHE_SIDECAR_PORT))
            except OSError:
                continue
            return address
    raise RuntimeError(f"no loopback address with port {CACHE_SIDECAR_PORT} free")


def pull_on_a_new_node(binaries: ContainerdBinaries, root: Path, pod: CachePod, reference: str) -> None:
    node = configured_node(binaries, root, pod)
    with Containerd.start(binaries, str(node.certs_dir)) as daemon:
        result = daemon.pull(reference, hosts_dir=str(node.certs_dir), timeout=120)
        assert result.returncode == 0, f"pull {reference} failed:\n{result.stderr[-1500:]}"


def report_pod(
    cluster: LocalCluster,
    mirrors: MirrorFactory,
    name: str,
    namespace: str,
    labels: dict[str, str],
    status: dict[str, Any],
    spec: dict[str, Any] | None = None,
) -> None:
    """Create a pod nobody schedules (`spec`, by default one container) and report its status as a kubelet would."""
    spec = dict(spec or {"containers": [{"name": "main", "image": "registry.example/unused:1"}]})
    body = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {**spec, "schedulerName": NOT_SCHEDULED},
    }
    mirrors.track("pod", name, namespace)
    cluster.api("POST", f"/api/v1/namespaces/{namespace}/pods", body)
    cluster.kubectl("patch", "pod", name, "-n", namespace, "--subresource=status", "--type=merge", "-p", json.dumps({"status": status}))


def running_status(ip: str | None = None, image_id: str | None = None, containers: list[str] | None = None) -> dict[str, Any]:
    """A Running, Ready pod's status as a kubelet reports it."""
    started = "2026-01-01T00:00:00Z"
    status: dict[str, Any] = {
        "phase": "Running",
        "conditions": [
            {"type": kind, "status": "True", "lastTransitionTime": started}
            for kind in ("PodScheduled", "Initialized", "ContainersReady", "Ready")
        ],
        "containerStatuses": [
            {
                "name": name,
                "ready": True,
                "started": True,
                "restartCount": 0,
                "image": "registry.example/unused:1",
                "imageID": image_id or "",
                "state": {"running": {"startedAt": started}},
            }
            for name in containers or ["main"]
        ],
    }
    if ip is not None:
        status |= {"podIP": ip, "podIPs": [{"ip": ip}]}
    return status


def cache_status(cluster: LocalCluster) -> dict[str, Any]:
    return dict((get_mirror(cluster, MIRROR).get("status") or {}).get("cache") or {})


def nodes_status(cluster: LocalCluster) -> dict[str, Any]:
    return dict((get_mirror(cluster, MIRROR).get("status") or {}).get("nodes") or {})


def control_data(cluster: LocalCluster) -> dict[str, str] | None:
    result = cluster.kubectl("get", "configmap", child_name(MIRROR), "-n", OPERATOR_NS, "-o", "json", check=False)
    return dict(json.loads(result.stdout).get("data") or {}) if result.returncode == 0 else None


STATS_FIELDS = ("hits", "misses", "bytesServed", "bytesFromUpstream", "diskUsed", "diskCap", "pinnedImages", "upstreamReachable")


def test_status_cache_shows_what_nodes_pulled_the_pins_the_operator_rendered_and_a_pod_that_stops_answering(
    binaries: ContainerdBinaries,
    registry_binary: str,
    upstream: Registry,
    image: BuiltImage,
    polling_operator: OperatorProcess,
    cluster: LocalCluster,
    tmp_path: Path,
) -> None:
    operator = polling_operator
    mirrors = MirrorFactory(cluster)
    body: dict[str, Any] = {
        "upstream": {"url": upstream.url, "hosts": [upstream.address]},
        "storage": {"ephemeral": True, "size": "1Gi"},
        "cache": {"maxSize": "256Mi"},
        "nodeSelector": NO_NODE,
    }
    added: list[str] = []
    try:
        mirrors.track_mirror(MIRROR)
        cluster.kubectl(
            "apply",
            "--server-side",
            "--field-manager=e2e-admin",
            "-f",
            "-",
            input={"apiVersion": c.API_VERSION, "kind": c.KIND, "metadata": {"name": MIRROR}, "spec": body},
        )
        deployment = wait_for(
            lambda: cluster.kubectl("get", "deployment", child_name(MIRROR), "-n", OPERATOR_NS, "-o", "json", check=False).stdout or None,
            60,
            "the mirror's Deployment",
            diagnose=operator.log_tail,
        )
        template = json.loads(deployment)["spec"]["template"]
        template_labels = dict(template["metadata"]["labels"])
        assert template_labels[c.LABEL_MIRROR] == MIRROR
        spec = RegistryMirrorSpec.model_validate(get_mirror(cluster, MIRROR)["spec"])  # with the defaults the API server applied
        address = pod_address()
        reference = f"{upstream.address}/{image.name}:{image.tag}"
        with CachePod.run(spec, tmp_path / "pod", registry_binary, name=MIRROR, sidecar_host=address) as pod:
            pull_on_a_new_node(binaries, tmp_path / "cold", pod, reference)
            pull_on_a_new_node(binaries, tmp_path / "warm", pod, reference)
            from_upstream = image.bytes_for_host + len(image.top.data)
            requests_per_pull = len(image.blobs_for_host) + 1  # the manifest and each blob
            stats = pod.wait_janitor(
                lambda s: s["bytesFromUpstream"] == from_upstream and s["hits"] + s["misses"] >= 2 * requests_per_pull,
                timeout=30,
                what="the sidecar's figures of both pulls",
            )
            assert not cache_status(cluster), "no ready mirror pod yet: nothing to say"

            # The kubelet reports the mirror pod Running and Ready at its address.
            pod_labels = {k: v for k, v in template_labels.items() if k != c.LABEL_NAME}
            mirror_pod = {k: v for k, v in template["spec"].items() if k != "nodeSelector"}  # the ReplicaSet's pod, as if scheduled
            ready = running_status(ip=address, containers=[ctr["name"] for ctr in template["spec"]["containers"]])
            report_pod(cluster, mirrors, f"{child_name(MIRROR)}-e2e", OPERATOR_NS, pod_labels, ready, mirror_pod)
            written = wait_for(
                lambda: (s := cache_status(cluster)).get("bytesFromUpstream") == from_upstream and s,
                30,
                "status.cache with the figures of the pulls",
                diagnose=lambda: json.dumps(get_mirror(cluster, MIRROR).get("status"))[:3000] + "\n" + operator.log_tail(),
            )
            print(f"\nstatus.cache after two pulls: {written}")
            stats = pod.stats()
            assert {k: written.get(k) for k in STATS_FIELDS} == {k: stats.get(k) for k in STATS_FIELDS}, (
                "status.cache is the sidecar's figures"
            )
            assert written["misses"] == requests_per_pull, "the cold pull missed each blob and the manifest once"
            assert written["hits"] >= requests_per_pull, "the warm pull was served from the cache"
            assert written["hitRatio"] == f"{written['hits'] / (written['hits'] + written['misses']):.3f}"
            assert written["diskUsed"] == pod.disk_bytes() == from_upstream
            assert written["diskCap"] == 256 << 20
            assert 2 * from_upstream <= written["bytesServed"] <= 2 * from_upstream + 128, "each node got the image once"
            assert (written["replicas"], written["staleReplicas"]) == (1, 0)
            assert written["pinnedImages"] == 0

            # Which nodes pulled (status.nodes): the front saw both pulls come from 127.0.0.1. A node
            # with that address counts; the session's kwok nodes, which pulled nothing, are named.
            kwok_nodes = sorted(n["metadata"]["name"] for n in cluster.fake_nodes())
            (puller,) = cluster.add_nodes(1, prefix="cs-puller-")
            added.append(puller)
            cluster.kubectl(
                "patch",
                "node",
                puller,
                "--subresource=status",
                "--type=json",
                "-p",
                json.dumps([{"op": "add", "path": "/status/addresses/-", "value": {"type": "ExternalIP", "address": "127.0.0.1"}}]),
            )
            usage = wait_for(
                lambda: (n := nodes_status(cluster)).get("pulledRecently") == 1 and n,
                90,  # progress, like the counters: written at most once a minute per mirror
                "status.nodes.pulledRecently = 1 (the node at 127.0.0.1)",
                diagnose=lambda: json.dumps(get_mirror(cluster, MIRROR).get("status", {}).get("nodes"))[:2000] + "\n" + operator.log_tail(),
            )
            print(f"status.nodes after the pulls: {usage}")
            assert usage["notPulledRecently"] == kwok_nodes[:5]

            # A workload runs the image: the operator pins it in the mirror's ConfigMap, the kubelet
            # mounts that, the sidecar keeps it, and status.cache says so.
            digest = image.top.digest
            report_pod(cluster, mirrors, "cs-workload", WORKLOAD_NS, {}, running_status(image_id=f"{reference.rsplit(':', 1)[0]}@{digest}"))
            control = wait_for(
                lambda: (d := control_data(cluster)) and digest in json.loads(d.get("pins.json", "[]")) and d,
                60,
                "the operator to pin the workload's image",
                diagnose=operator.log_tail,
            )
            pod.mount_control(control)
            wait_for(
                lambda: cache_status(cluster).get("pinnedImages") == 1, 30, "status.cache.pinnedImages = 1", diagnose=operator.log_tail
            )

            # The sidecar stops answering: a stale replica, its last figures kept.
            before = cache_status(cluster)
            sidecar = pod.procs["cache"]
            sidecar.terminate()
            sidecar.wait(10)
            stale = wait_for(lambda: (s := cache_status(cluster)).get("staleReplicas") == 1 and s, 30, "the pod counted stale")
            keep = ("hits", "misses", "bytesServed", "bytesFromUpstream", "diskUsed", "pinnedImages")
            assert {k: stale[k] for k in keep} == {k: before[k] for k in keep}, "a pod that does not answer keeps its last figures"
            assert stale["replicas"] == 1
    finally:
        if added:
            cluster.delete_nodes(added)
        mirrors.cleanup()
