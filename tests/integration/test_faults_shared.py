"""Other hands on the operator's objects: deleted, forced, extended, relabelled, a claim lost in use.

Promises checked (issue 11):
- the node plan ConfigMap and the agent DaemonSet, deleted by hand, are restored;
- a field we own, forced again and again by another field manager, is won back without
  fighting forever: at most ``MAX_CONTESTED_WRITES`` operator writes while it is forced
  every ``INTRUSION_EVERY`` seconds for ``INTRUSION_SECONDS``, and ours once it stops;
- fields another manager adds and we do not own (an env var, a Service port, annotations)
  cost no operator write, and stay;
- a child that lost its managed-by label is still the operator's: scaled to 0, it is repaired;
- a claim deleted while in use (Terminating, held by pvc-protection) is not reported
  Bound, and the mirror not Ready.
"""

from __future__ import annotations

import json
import time
from typing import Any

from harness import LocalCluster, audit
from harness.children import child
from harness.faults import Faults
from harness.operator import AGENT_NS, OPERATOR_NS, OPERATOR_USER, condition, get_mirror, wait_settled
from harness.waiting import wait_for
from harness.watch import MirrorWatch
from regmirror import constants as c
from regmirror.naming import child_name

RESTORE_SECONDS = 30
#: How long a claim held by pvc-protection is watched: the status must not call it Bound again.
LOST_CLAIM_SECONDS = 45
INTRUSION_SECONDS = 60
INTRUSION_EVERY = 3.0
#: An operator that backs off a contested field writes a handful of times a minute, not once per intrusion.
MAX_CONTESTED_WRITES = 10
#: How long after the last foreign edit the operator's (absent) reaction is looked for.
REACTION_SECONDS = 15
CHILD_RESOURCES = ("deployments", "services", "configmaps", "persistentvolumeclaims", "daemonsets")


def uid(body: dict[str, Any] | None) -> str | None:
    return ((body or {}).get("metadata") or {}).get("uid")


def get(cluster: LocalCluster, kind: str, name: str, namespace: str) -> dict[str, Any] | None:
    result = cluster.kubectl("get", kind, name, "-n", namespace, "-o", "json", "--show-managed-fields", check=False)
    return dict(json.loads(result.stdout)) if result.returncode == 0 else None


def server_side_apply(cluster: LocalCluster, manager: str, body: dict[str, Any], *, force: bool = False) -> None:
    """Apply ``body`` as field manager ``manager`` (``force``: take fields others own)."""
    flags = ["--force-conflicts"] if force else []
    cluster.kubectl("apply", "--server-side", f"--field-manager={manager}", *flags, "-f", "-", input=body)


def owns(body: dict[str, Any], manager: str, *path: str) -> bool:
    """Whether ``manager`` owns the field at ``path`` (e.g. "spec", "replicas") of ``body``."""
    for entry in body["metadata"].get("managedFields") or []:
        fields = entry.get("fieldsV1") or {}
        for key in path:
            fields = fields.get(f"f:{key}") if isinstance(fields, dict) else None
        if entry.get("manager") == manager and fields is not None:
            return True
    return False


def test_node_plan_and_agent_daemonset_deleted_by_hand_are_restored(faults: Faults) -> None:
    cluster = faults.cluster
    name = faults.mirrors.create("handmade")
    wait_settled(cluster, [name])

    old_cm = uid(get(cluster, "configmap", c.NODE_CONFIG_NAME, AGENT_NS))
    cluster.kubectl("delete", "configmap", c.NODE_CONFIG_NAME, "-n", AGENT_NS, "--wait=false")

    def plan_restored() -> bool:
        cm = get(cluster, "configmap", c.NODE_CONFIG_NAME, AGENT_NS)
        return uid(cm) not in (None, old_cm) and name in (cm or {}).get("data", {}).get(c.NODE_CONFIG_KEY, "")

    wait_for(
        plan_restored, RESTORE_SECONDS, "the node plan ConfigMap to be restored with the mirror in it", diagnose=faults.operator.log_tail
    )

    old_ds = uid(get(cluster, "daemonset", c.AGENT_NAME, AGENT_NS))
    cluster.kubectl("delete", "daemonset", c.AGENT_NAME, "-n", AGENT_NS, "--wait=false")
    wait_for(
        lambda: uid(get(cluster, "daemonset", c.AGENT_NAME, AGENT_NS)) not in (None, old_ds),
        RESTORE_SECONDS,
        "the agent DaemonSet to be restored",
        diagnose=faults.operator.log_tail,
    )
    wait_settled(cluster, [name])


def test_a_field_we_own_forced_by_another_manager_is_won_back_without_fighting_forever(faults: Faults) -> None:
    cluster = faults.cluster
    name = faults.mirrors.create("contested")
    wait_settled(cluster, [name])
    deployment = child_name(name)
    intruder = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": deployment, "namespace": OPERATOR_NS}}
    since = audit.now()
    intrusions = 0
    ends = time.monotonic() + INTRUSION_SECONDS
    while time.monotonic() < ends:
        server_side_apply(cluster, "intruder", {**intruder, "spec": {"replicas": 3 + intrusions % 2}}, force=True)
        intrusions += 1
        time.sleep(INTRUSION_EVERY)  # the intruder's pace
    until = audit.now()
    ours = audit.writes(cluster, OPERATOR_USER, since, until, resource="deployments", name=deployment)
    # The intruder gave up: the operator's value and ownership come back.
    wait_for(
        lambda: (
            (d := child(cluster, "deployment", name)) is not None
            and d["spec"]["replicas"] == 1
            and owns(d, c.FIELD_MANAGER, "spec", "replicas")
        ),
        90,
        "the operator to win spec.replicas back",
        diagnose=faults.operator.log_tail,
    )
    assert len(ours) <= MAX_CONTESTED_WRITES, (
        f"{len(ours)} operator writes to {deployment} while another manager forced spec.replicas {intrusions} times "
        f"in {INTRUSION_SECONDS}s (at most {MAX_CONTESTED_WRITES}: back off, do not fight forever): {audit.summary(ours)}"
    )


def test_fields_another_manager_adds_cost_no_write(faults: Faults) -> None:
    cluster = faults.cluster
    name = faults.mirrors.create("shared")
    wait_settled(cluster, [name])
    target = child_name(name)
    container = child(cluster, "deployment", name)["spec"]["template"]["spec"]["containers"][0]["name"]  # type: ignore[index]
    since = audit.now()
    # A mesh adds an env var to the registry container and a port to the Service...
    deployment_patch = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": target, "namespace": OPERATOR_NS},
        "spec": {"template": {"spec": {"containers": [{"name": container, "env": [{"name": "MESH_SIDECAR", "value": "on"}]}]}}},
    }
    server_side_apply(cluster, "mesh", deployment_patch)
    service_patch = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": target, "namespace": OPERATOR_NS},
        "spec": {"ports": [{"name": "mesh-metrics", "port": 15090, "protocol": "TCP", "targetPort": 15090}]},
    }
    server_side_apply(cluster, "mesh", service_patch)
    # ...and an admin annotates the children, ten times: twelve edits of fields we do not own.
    for edit in range(10):
        kind = ("deployment", "service", "configmap")[edit % 3]
        cluster.kubectl("annotate", "--overwrite", kind, target, "-n", OPERATOR_NS, f"example.com/edit={edit}")
    time.sleep(REACTION_SECONDS)  # the measurement: the operator's (absent) reaction to the last edit
    ours = [w for w in audit.writes(cluster, OPERATOR_USER, since) if (w.get("objectRef") or {}).get("resource") in CHILD_RESOURCES]
    assert ours == [], f"{len(ours)} operator writes for 12 edits of fields it does not own: {audit.summary(ours)}"
    env = child(cluster, "deployment", name)["spec"]["template"]["spec"]["containers"][0].get("env", [])  # type: ignore[index]
    assert {"name": "MESH_SIDECAR", "value": "on"} in env, "the other manager's env var was removed"
    ports = {p["name"] for p in child(cluster, "service", name)["spec"]["ports"]}  # type: ignore[index]
    assert "mesh-metrics" in ports, "the other manager's Service port was removed"


def test_a_child_that_lost_its_managed_by_label_is_still_repaired(faults: Faults) -> None:
    cluster = faults.cluster
    name = faults.mirrors.create("unlabelled")
    wait_settled(cluster, [name])
    target = child_name(name)
    cluster.kubectl("label", "deployment", target, "-n", OPERATOR_NS, f"{c.LABEL_MANAGED_BY}-")
    cluster.kubectl("scale", "deployment", target, "-n", OPERATOR_NS, "--replicas=0")
    wait_for(
        lambda: (
            (d := child(cluster, "deployment", name)) is not None
            and d["spec"]["replicas"] == 1
            and d["metadata"].get("labels", {}).get(c.LABEL_MANAGED_BY) == c.MANAGED_BY
        ),
        RESTORE_SECONDS,
        "the unlabelled Deployment to be repaired (1 replica, label back)",
        diagnose=faults.operator.log_tail,
    )
    wait_settled(cluster, [name])


def test_a_claim_deleted_while_in_use_is_not_reported_bound(faults: Faults) -> None:
    cluster = faults.cluster
    name = faults.mirrors.create("lostclaim")
    wait_settled(cluster, [name])
    claim = child_name(name)
    with MirrorWatch(cluster, name) as watch:
        cluster.kubectl("delete", "pvc", claim, "-n", OPERATOR_NS, "--wait=false")
        pvc = child(cluster, "persistentvolumeclaim", name)
        assert pvc is not None and pvc["metadata"].get("deletionTimestamp"), "the claim in use should be held by pvc-protection"
        wait_for(
            lambda: not claims_bound(get_mirror(cluster, name)),
            RESTORE_SECONDS,
            f"{name}'s status to stop saying Bound/Ready while its claim is Terminating",
            diagnose=lambda: json.dumps(get_mirror(cluster, name).get("status"), indent=1)[:3000],
        )
        honest_since = time.monotonic()
        time.sleep(LOST_CLAIM_SECONDS)  # the measurement: the claim stays Terminating all along
        still_terminating = child(cluster, "persistentvolumeclaim", name)
    assert still_terminating is not None and still_terminating["metadata"].get("deletionTimestamp")
    lies = [s.body.get("status") for s in watch.versions(name) if s.at >= honest_since and claims_bound(s.body)]
    assert not lies, f"{len(lies)} status version(s) said Bound or Ready again while the claim was Terminating: {lies[-1]}"


def claims_bound(body: dict[str, Any]) -> bool:
    """Whether a mirror's status says its storage is Bound or the mirror Ready."""
    storage = (body.get("status") or {}).get("storage") or {}
    bound = condition(body, "StorageBound") or {}
    ready = condition(body, "Ready") or {}
    return storage.get("phase") == "Bound" or bound.get("status") == "True" or ready.get("status") == "True"
