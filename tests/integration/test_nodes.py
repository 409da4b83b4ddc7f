"""Node configuration rollout on 50 kwok nodes: the DaemonSet rolls, status counts nodes, deletion waits.

kwok fakes the agent pods (they become Ready without running), so what a node
would write is checked by running the agent's own renderer, and the real
`regmirror agent --once`, on the plan the operator put in the ConfigMap with the
labels of the real Node objects.

The 50 nodes exist for this module only: its teardown deletes the nodes it added, so
every later test rolls the agent out to the session's usual few nodes, as it does alone.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from harness import LocalCluster
from harness.objects import MirrorFactory
from harness.operator import AGENT_NS, OperatorProcess, mirror_body, wait_condition
from harness.waiting import wait_for
from harness.watch import MirrorWatch
from regmirror.nodeplan import NodePlan
from regmirror.render.nodefiles import render_node_files

TOTAL_NODES = 50
POOL_LABEL = "regmirror.dev/test-pool"
#: A rollout to (or a removal from) 50 nodes goes 10% of them at a time.
FLEET_TIMEOUT = 180.0


@pytest.fixture(scope="module")
def fifty_nodes(cluster: LocalCluster, operator: OperatorProcess) -> Iterator[list[dict[str, Any]]]:
    """Grow the session's cluster to 50 nodes (every other added node in pool a) for this module."""
    existing = len(cluster.fake_nodes())
    missing = TOTAL_NODES - existing
    added: list[str] = []
    try:
        if missing > 0:
            half = missing // 2
            added += cluster.add_nodes(half, prefix="pool-a-", labels={POOL_LABEL: "a"})
            added += cluster.add_nodes(missing - half, prefix="pool-b-", labels={POOL_LABEL: "b"})
        nodes = cluster.fake_nodes()
        assert len(nodes) >= TOTAL_NODES
        yield nodes
    finally:
        cluster.delete_nodes(added)


@dataclass(frozen=True)
class Fleet:
    """The mirror "fleet" (every node), and the agent DaemonSet as it was before it."""

    name: str
    daemonset_before: dict[str, Any] | None


@pytest.fixture(scope="module")
def fleet(cluster: LocalCluster, fifty_nodes: list[dict[str, Any]]) -> Iterator[Fleet]:
    """A mirror selecting every one of the 50 nodes, deleted (if a test has not) when the module ends."""
    exists = cluster.kubectl("get", "ds", "regmirror-agent", "-n", AGENT_NS, check=False).returncode == 0
    before = agent_daemonset(cluster) if exists else None
    factory = MirrorFactory(cluster)
    try:
        factory.apply(mirror_body("fleet"))
        yield Fleet("fleet", before)
    finally:
        factory.cleanup(timeout=FLEET_TIMEOUT)


def node_plan(cluster: LocalCluster) -> NodePlan:
    cm = cluster.kubectl_json("get", "configmap", "regmirror-node-config", "-n", AGENT_NS)
    return NodePlan.from_json(cm["data"]["mirrors.json"])


def agent_daemonset(cluster: LocalCluster) -> dict[str, Any]:
    return dict(cluster.kubectl_json("get", "daemonset", "regmirror-agent", "-n", AGENT_NS))


def test_a_mirror_rolls_out_to_all_fifty_nodes(cluster: LocalCluster, fifty_nodes: list[dict[str, Any]], fleet: Fleet) -> None:
    before = fleet.daemonset_before
    body = wait_condition(cluster, fleet.name, "Ready", "True", timeout=FLEET_TIMEOUT)
    nodes = body["status"]["nodes"]
    assert (nodes["desired"], nodes["updated"], nodes["ready"]) == (len(fifty_nodes),) * 3
    assert body["status"]["nodesRatio"] == f"{len(fifty_nodes)}/{len(fifty_nodes)}"
    configured = next(c for c in body["status"]["conditions"] if c["type"] == "NodesConfigured")
    assert configured["status"] == "True"
    # The rollout went through the DaemonSet: a new plan hash on the pod template, every pod carries it.
    ds = agent_daemonset(cluster)
    digest = ds["spec"]["template"]["metadata"]["annotations"]["regmirror.dev/node-config-hash"]
    assert digest == node_plan(cluster).digest()
    if before is not None:
        assert before["spec"]["template"]["metadata"]["annotations"]["regmirror.dev/node-config-hash"] != digest
    assert ds["spec"]["updateStrategy"]["type"] == "RollingUpdate"
    pods = cluster.kubectl_json("get", "pods", "-n", AGENT_NS, "-l", "app.kubernetes.io/component=agent")["items"]
    current = [p for p in pods if p["metadata"]["annotations"].get("regmirror.dev/node-config-hash") == digest]
    assert {p["spec"]["nodeName"] for p in current} == {n["metadata"]["name"] for n in fifty_nodes}


def test_a_mirror_selecting_half_the_nodes_configures_only_those(
    cluster: LocalCluster, fifty_nodes: list[dict[str, Any]], fleet: Fleet, mirrors: MirrorFactory, tmp_path: Path
) -> None:
    mirrors.create("half", upstream={"url": "https://quay.io"}, nodeConfig={"nodeSelector": {"matchLabels": {POOL_LABEL: "a"}}})
    body = wait_condition(cluster, "half", "Ready", "True", timeout=FLEET_TIMEOUT)
    pool_a = {n["metadata"]["name"] for n in fifty_nodes if n["metadata"]["labels"].get(POOL_LABEL) == "a"}
    assert 0 < len(pool_a) < len(fifty_nodes)
    assert body["status"]["nodes"]["desired"] == len(pool_a)
    assert body["status"]["nodes"]["ready"] == len(pool_a)

    # What each node's agent writes for quay.io, from the operator's plan and the node's real labels.
    plan = node_plan(cluster)
    with_quay = set()
    for node in cluster.fake_nodes():
        files = render_node_files(plan, node["metadata"]["labels"])
        if any("/quay.io/" in path for path in files):
            with_quay.add(node["metadata"]["name"])
    assert with_quay == pool_a

    # And the real agent, for one node of each pool, against a temporary root.
    (tmp_path / "plan.json").write_text(plan.to_json())
    for pool, expect in (("a", True), ("b", False)):
        node = next(n for n in fifty_nodes if n["metadata"]["labels"].get(POOL_LABEL) == pool)
        root = tmp_path / pool
        (root / "etc/containerd").mkdir(parents=True)
        (root / "etc/containerd/config.toml").write_text(
            'version = 2\n[plugins."io.containerd.grpc.v1.cri".registry]\n  config_path = "/etc/containerd/certs.d"\n'
        )
        # The Node as the API has it, plus the runtime a real kubelet would report (kwok reports none).
        labels = tmp_path / f"{pool}-node.json"
        node_info = {**node["status"].get("nodeInfo", {}), "containerRuntimeVersion": "containerd://1.7.20"}
        labels.write_text(json.dumps({**node, "status": {**node["status"], "nodeInfo": node_info}}))
        subprocess.run(
            [
                sys.executable,
                "-m",
                "regmirror",
                "agent",
                "--once",
                "--plan",
                str(tmp_path / "plan.json"),
                "--host-root",
                str(root),
                "--node-name",
                node["metadata"]["name"],
                "--node-labels-file",
                str(labels),
                "--health-port",
                "0",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        assert (root / "etc/containerd/certs.d/quay.io/hosts.toml").exists() is expect, pool
        assert (root / "etc/containerd/certs.d/docker.io/hosts.toml").exists()  # "fleet" selects every node


def test_deletion_waits_for_the_removal_rollout(
    cluster: LocalCluster, fifty_nodes: list[dict[str, Any]], fleet: Fleet, mirrors: MirrorFactory
) -> None:
    wait_condition(cluster, fleet.name, "Ready", "True", timeout=FLEET_TIMEOUT)
    with MirrorWatch(cluster, fleet.name) as watch:
        mirrors.delete(fleet.name, timeout=FLEET_TIMEOUT)
        # When the finalizer let go, the plan no longer listed it and every node ran that plan.
        plan = node_plan(cluster)
        assert "fleet" not in [m.name for m in plan.mirrors]
        assert agent_daemonset(cluster)["spec"]["template"]["metadata"]["annotations"]["regmirror.dev/node-config-hash"] == plan.digest()
        pods = cluster.kubectl_json("get", "pods", "-n", AGENT_NS, "-l", "app.kubernetes.io/component=agent")["items"]
        on_new_plan = {
            p["spec"]["nodeName"]
            for p in pods
            if p["metadata"]["annotations"].get("regmirror.dev/node-config-hash") == plan.digest()
            and not p["metadata"].get("deletionTimestamp")
        }
        assert on_new_plan == {n["metadata"]["name"] for n in fifty_nodes}
        # Meanwhile the status said so.
        wait_for(
            lambda: ("Terminating", "Terminating") in [(phase, reason) for phase, _, reason in watch.statuses],
            timeout=5,
            what="a Terminating status while nodes dropped the files",
        )
