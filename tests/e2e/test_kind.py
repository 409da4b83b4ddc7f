"""The whole product on a real cluster: kind, the built image, `make deploy`, a pod pulling through the mirror.

The local path (tests/integration) proves the operator's API behaviour on a
simulated cluster and tests/e2e/test_datapath.py the data path piece by piece;
this test puts them together the way a user would, on kind nodes whose
containerd reads /etc/containerd/certs.d. The cluster comes from pytest-kind
(the maintained fork, pytest-kind-ng): its `KindCluster`, given the `kind`
binary that `make kind` builds from the Go module proxy, so nothing is
downloaded at test time. It needs a Docker engine that runs privileged
containers (kind nodes are privileged) and Internet access (Docker Hub is the
upstream); without such an engine it skips, saying so.

The mirror helpers are the same as on the local control plane
(harness.operator: apply, mirror_body, wait_condition, delete_mirror), driven
through a `KubeconfigCluster` instead of a `LocalCluster`.

    make image && make kind-e2e
    REGMIRROR_KIND_KEEP=1 ... keeps the cluster (`kind delete cluster --name regmirror-e2e`)
    REGMIRROR_KIND_REQUIRED=1 ... fails instead of skipping (CI's kind job)
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pytest_kind import KindCluster

from harness.operator import (
    OPERATOR_NS,
    REPO,
    KubeconfigCluster,
    apply,
    delete_mirror,
    mirror_body,
    wait_condition,
    wait_for,
)
from tools.binaries import go_tool

pytestmark = [pytest.mark.kind, pytest.mark.timeout(1800)]

CLUSTER_NAME = os.environ.get("REGMIRROR_KIND_CLUSTER", "regmirror-e2e")
IMAGE = os.environ.get("IMAGE", "ghcr.io/regmirror/regmirror:0.1.0")
# Empty: the node image of the built kind version.
NODE_IMAGE = os.environ.get("REGMIRROR_KIND_NODE_IMAGE", "")
CERTS_D = "/etc/containerd/certs.d"
# Pulled by a pod through the mirror; not preloaded on kind nodes.
PULLED_IMAGE = "docker.io/library/busybox:1.37"
# Runs `true` privileged to learn whether Docker can host kind nodes at all.
PROBE_IMAGE = PULLED_IMAGE
MIRROR = "dockerhub"

# containerd must read registry hosts from certs.d. kind has defaulted to this
# since v0.20; the patch keeps custom node images honest.
KIND_CONFIG = f"""\
kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
nodes:
- role: control-plane
- role: worker
containerdConfigPatches:
- |-
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "{CERTS_D}"
"""


def _run(
    *argv: str, timeout: float = 600, check: bool = False, cwd: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False, cwd=cwd, env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


@functools.cache
def why_kind_cannot_run() -> str | None:
    """None when Docker can host kind nodes here, else the reason (the skip message)."""
    docker = shutil.which("docker")
    if docker is None:
        return "no docker CLI on PATH: kind needs a Docker engine that runs privileged containers"
    info = _run(docker, "info", "--format", "{{.ServerVersion}}", timeout=30)
    if info.returncode != 0:
        last = (info.stderr.strip().splitlines() or [f"exit {info.returncode}"])[-1]
        return f"`docker info` failed, no Docker engine to run kind nodes: {last}"
    probe = _run(docker, "run", "--rm", "--privileged", "--network", "none", PROBE_IMAGE, "true", timeout=600)
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["?"])[-1]
        return f"this Docker engine cannot run privileged containers (kind nodes are privileged): {last}"
    return None


@dataclass
class DeployedKind:
    """A kind cluster (pytest-kind's KindCluster) with regmirror deployed by `make deploy`."""

    kind: KindCluster
    cluster: KubeconfigCluster
    nodes: list[str]


@pytest.fixture(scope="module")
def deployed_kind(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DeployedKind]:
    """A two-node kind cluster with the image loaded and `make deploy` applied; `make undeploy` afterwards."""
    reason = why_kind_cannot_run()
    if reason and os.environ.get("REGMIRROR_KIND_REQUIRED"):
        pytest.fail(f"REGMIRROR_KIND_REQUIRED is set but {reason}", pytrace=False)
    if reason:
        pytest.skip(reason)
    work = tmp_path_factory.mktemp("kind")
    config = work / "kind.yaml"
    config.write_text(KIND_CONFIG)
    kubectl = _kubectl()
    # KindCluster keeps a scratch directory under the working directory: keep it out of the repository.
    with contextlib.chdir(work):
        kind = KindCluster(
            CLUSTER_NAME, work / "kubeconfig", image=NODE_IMAGE or None, kind_path=go_tool("kind"), kubectl_path=Path(kubectl)
        )
    kind.create(config_file=config)
    try:
        if _run("docker", "image", "inspect", IMAGE, timeout=30).returncode != 0:
            _run("make", "image", f"IMAGE={IMAGE}", "DOCKER_BUILD_ARGS=--network host", check=True, timeout=1200, cwd=str(REPO))
        kind.load_docker_image(IMAGE)
        cluster = KubeconfigCluster(kind.kubeconfig_path, kubectl)
        deploy_env = {**os.environ, "KUBECONFIG": str(kind.kubeconfig_path)}
        _run("make", "deploy", f"KUBECTL={kubectl}", check=True, timeout=300, cwd=str(REPO), env=deploy_env)
        kind.kubectl("-n", OPERATOR_NS, "rollout", "status", "deployment/regmirror-operator", "--timeout=300s")
        nodes = _run(str(kind.kind_path), "get", "nodes", "--name", CLUSTER_NAME, check=True).stdout.split()
        yield DeployedKind(kind, cluster, nodes)
        # Clean uninstall, as a user would do it: mirrors first (finalizers clean the nodes), then the rest.
        _run("make", "undeploy", f"KUBECTL={kubectl}", "UNDEPLOY_TIMEOUT=5m", check=True, timeout=900, cwd=str(REPO), env=deploy_env)
    finally:
        if not os.environ.get("REGMIRROR_KIND_KEEP"):
            kind.delete()


def _kubectl() -> str:
    """$KUBECTL, else the control plane bundle's kubectl (built on first use)."""
    explicit = os.environ.get("KUBECTL")
    if explicit:
        return explicit
    from harness.cluster import find_controlplane_dir

    return str(find_controlplane_dir() / "bin" / "kubectl")


def _node_exec(node: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return _run("docker", "exec", node, *argv, timeout=120)


def test_containerd_on_kind_reads_certs_d(deployed_kind: DeployedKind) -> None:
    for node in deployed_kind.nodes:
        dump = _node_exec(node, "containerd", "config", "dump")
        assert f'config_path = "{CERTS_D}"' in dump.stdout, f"{node}: containerd does not read {CERTS_D}"


def test_pod_pulls_through_the_mirror_and_delete_cleans_the_nodes(deployed_kind: DeployedKind) -> None:
    cluster, nodes = deployed_kind.cluster, deployed_kind.nodes
    apply(cluster, mirror_body(MIRROR, storage={"size": "2Gi"}))
    body = wait_condition(cluster, MIRROR, "Ready", "True", timeout=600)
    endpoint = body["status"]["endpoint"]

    # Every node routes docker.io to the mirror's ClusterIP (containerd on the host cannot resolve cluster DNS).
    for node in nodes:
        hosts = _node_exec(node, "cat", f"{CERTS_D}/docker.io/hosts.toml")
        assert hosts.returncode == 0, f"{node}: {hosts.stderr}"
        assert endpoint in hosts.stdout and 'server = "https://registry-1.docker.io"' in hosts.stdout, hosts.stdout

    # A pod whose image is pulled through the mirror: the registry's log shows the request.
    pod = f"pull-{uuid.uuid4().hex[:6]}"
    for node in nodes:
        _node_exec(node, "crictl", "rmi", PULLED_IMAGE)  # not cached on the node: a real pull
    cluster.kubectl(
        "run", pod, "-n", "default", f"--image={PULLED_IMAGE}", "--image-pull-policy=Always", "--restart=Never", "--command", "--", "true"
    )
    wait_for(
        lambda: cluster.kubectl_json("get", "pod", pod, "-n", "default")["status"].get("phase") == "Succeeded",
        timeout=300,
        what=f"pod {pod} to pull {PULLED_IMAGE} and exit",
    )
    logs = cluster.kubectl("logs", "-n", OPERATOR_NS, f"deployment/regmirror-{MIRROR}", "--tail=-1").stdout
    assert "library/busybox" in logs, "the image was not pulled through the mirror (no request in its log)"
    cluster.kubectl("delete", "pod", pod, "-n", "default", "--wait=false")

    # Deleting the mirror: the finalizer holds it until every node dropped its files.
    delete_mirror(cluster, MIRROR, timeout=300)
    for node in nodes:
        listing = _node_exec(node, "ls", "-A", CERTS_D)
        assert "docker.io" not in listing.stdout.split(), f"{node} still has {CERTS_D}/docker.io: {listing.stdout}"


def test_kind_config_is_a_valid_document() -> None:
    """Runs everywhere (no Docker needed): the config the kind fixture writes parses and sets config_path."""
    import tomllib

    import yaml

    doc = yaml.safe_load(KIND_CONFIG)
    assert doc["kind"] == "Cluster" and [n["role"] for n in doc["nodes"]] == ["control-plane", "worker"]
    patch = tomllib.loads(doc["containerdConfigPatches"][0])
    assert patch["plugins"]["io.containerd.grpc.v1.cri"]["registry"]["config_path"] == CERTS_D
    assert Path(REPO / "manifests" / "kustomization.yaml").exists()
