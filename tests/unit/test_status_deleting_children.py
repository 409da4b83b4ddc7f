"""A child that is being deleted (deletionTimestamp set) never counts as healthy in a mirror's status.

A PVC held by kubernetes.io/pvc-protection keeps status.phase Bound, a Deployment deleted
in the foreground keeps its Ready pods, a Service held by a finalizer keeps its ClusterIP:
each still looks healthy, and each is about to go. kubectl shows such a claim as
Terminating; status.storage.phase must say the same, and the mirror must not be Ready.
"""

from __future__ import annotations

from typing import Any

from hypothesis import example, given
from hypothesis import strategies as st
from test_status import PVC, SERVICE, cond, deployment, observe

from regmirror.observe import RepairError, evaluate

DELETED_AT = {"deletionTimestamp": "2026-01-01T00:00:00Z", "finalizers": ["kubernetes.io/pvc-protection"]}
CHILDREN = ("deployment", "service", "pvc")


def deleting(obj: dict[str, Any]) -> dict[str, Any]:
    """The same child as the API server shows it once deleted but held by a finalizer."""
    return {**obj, "metadata": {**(obj.get("metadata") or {}), **DELETED_AT}}


def healthy_children() -> dict[str, dict[str, Any]]:
    return {"deployment": deployment(), "service": SERVICE, "pvc": PVC}


def test_a_claim_in_use_after_its_deletion_says_terminating_as_kubectl_does() -> None:
    status = evaluate(observe(pvc=deleting(PVC)), [])
    assert status["storage"] == {"phase": "Terminating", "capacity": "10Gi"}
    assert cond(status, "StorageBound")["reason"] == "ClaimTerminating"
    assert cond(status, "Ready")["status"] == "False"


def test_a_deployment_being_deleted_is_not_available_though_its_pods_are_ready() -> None:
    status = evaluate(observe(deployment=deleting(deployment(ready=1))), [])
    assert cond(status, "Available")["status"] == "False"
    assert cond(status, "Available")["reason"] == "DeploymentTerminating"
    assert cond(status, "Ready")["status"] == "False" and cond(status, "Ready")["reason"] == "DeploymentTerminating"
    assert status["phase"] != "Ready"


def test_a_service_being_deleted_does_not_make_the_mirror_ready() -> None:
    status = evaluate(observe(service=deleting(SERVICE)), [])
    assert cond(status, "Ready")["status"] == "False"
    assert "the Service is being deleted" in cond(status, "Reconciling")["message"]
    assert status["phase"] != "Ready"


@given(
    doomed=st.sets(st.sampled_from(CHILDREN), min_size=1),
    claim_phase=st.sampled_from(["Bound", "Pending", "Lost", None]),
    transient_repair=st.booleans(),
)
@example(doomed={"pvc"}, claim_phase="Bound", transient_repair=False)
@example(doomed={"service"}, claim_phase="Bound", transient_repair=True)  # a transient repair keeps a serving mirror Ready
@example(doomed={"deployment"}, claim_phase="Bound", transient_repair=False)
def test_no_child_being_deleted_counts_as_healthy(doomed: set[str], claim_phase: str | None, transient_repair: bool) -> None:
    children = healthy_children()
    children["pvc"] = {"status": {"phase": claim_phase, "capacity": {"storage": "10Gi"}}} if claim_phase else {"status": {}}
    for kind in doomed:
        children[kind] = deleting(children[kind])
    repair = RepairError(True, "APIUnavailable", "503") if transient_repair else None
    status = evaluate(observe(**children, repair=repair), [])
    assert cond(status, "Ready")["status"] == "False", f"Ready with {sorted(doomed)} being deleted"
    assert status["phase"] != "Ready"
    if "pvc" in doomed:
        assert status["storage"]["phase"] == "Terminating"
        assert cond(status, "StorageBound")["status"] == "False"
    if "deployment" in doomed:
        assert cond(status, "Available")["status"] == "False"


@given(claim_phase=st.sampled_from(["Bound", "Pending", "Lost"]))
def test_a_claim_not_being_deleted_reports_its_own_phase(claim_phase: str) -> None:
    status = evaluate(observe(pvc={"status": {"phase": claim_phase}}), [])
    assert status["storage"]["phase"] == claim_phase
    assert (cond(status, "StorageBound")["status"] == "True") == (claim_phase == "Bound")
