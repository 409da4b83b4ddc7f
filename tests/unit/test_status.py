"""Status rules (pure): conditions, transition times, phase, drift detection."""

from __future__ import annotations

from typing import Any

from regmirror.conditions import condition, merge_conditions, set_condition
from regmirror.drift import drifted, status_changed
from regmirror.models import RegistryMirrorSpec
from regmirror.observe import Observation, RepairError, evaluate
from regmirror.rollout import NodeRollout

SPEC = RegistryMirrorSpec.model_validate({"upstream": {"url": "https://registry-1.docker.io"}})


def deployment(ready: int = 1, generation: int = 1, observed: int = 1, available: bool = True) -> dict[str, Any]:
    return {
        "metadata": {"generation": generation},
        "status": {
            "observedGeneration": observed,
            "replicas": 1,
            "updatedReplicas": 1,
            "readyReplicas": ready,
            "conditions": [{"type": "Available", "status": "True" if available else "False"}],
        },
    }


SERVICE = {"metadata": {"name": "regmirror-hub"}, "spec": {"clusterIP": "10.96.0.42"}}
PVC = {"status": {"phase": "Bound", "capacity": {"storage": "10Gi"}}}
ALL_NODES = NodeRollout(enabled=True, desired=3, updated=3, ready=3)


def observe(**overrides: Any) -> Observation:
    fields: dict[str, Any] = {
        "name": "hub",
        "generation": 2,
        "spec": SPEC,
        "namespace": "regmirror-system",
        "deployment": deployment(),
        "service": SERVICE,
        "pvc": PVC,
        "nodes": ALL_NODES,
        "host_routes": {"docker.io": (1, ["hub"])},
    }
    fields.update(overrides)
    return Observation(**fields)


def cond(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == type_)


def test_ready_when_every_child_reports_ready() -> None:
    status = evaluate(observe(), [], now="2026-01-01T00:00:00Z")
    assert cond(status, "Ready")["status"] == "True"
    assert status["phase"] == "Ready"
    assert status["endpoint"] == "10.96.0.42:5000"
    assert status["url"] == "http://10.96.0.42:5000"
    assert status["serviceDNS"] == "regmirror-hub.regmirror-system.svc"
    assert status["observedGeneration"] == 2
    assert status["nodesRatio"] == "3/3"
    assert status["storage"] == {"phase": "Bound", "capacity": "10Gi"}
    assert status["hosts"] == [{"host": "docker.io", "position": 1, "mirrors": ["hub"]}]
    assert all(c["observedGeneration"] == 2 for c in status["conditions"])


def test_not_ready_while_nodes_roll_out_and_names_them() -> None:
    rollout = NodeRollout(enabled=True, desired=3, updated=1, ready=1, not_ready=("n2", "n3"))
    status = evaluate(observe(nodes=rollout), [])
    ready = cond(status, "Ready")
    assert ready["status"] == "False" and ready["reason"] == "RolloutInProgress"
    assert "n2, n3" in ready["message"]
    assert cond(status, "Reconciling")["status"] == "True"
    assert status["nodes"]["notReady"] == ["n2", "n3"]
    assert status["phase"] == "Progressing"


def test_stalled_on_config_error_keeps_available() -> None:
    status = evaluate(observe(error_reason="CredentialsSecretMissing", error_message="Secret x/y does not exist"), [])
    assert cond(status, "Ready")["reason"] == "CredentialsSecretMissing"
    assert cond(status, "Stalled")["status"] == "True"
    assert cond(status, "Available")["status"] == "True"
    assert cond(status, "Reconciling")["status"] == "False"
    assert status["phase"] == "Failed"


def test_deployment_behind_its_generation_is_reconciling() -> None:
    status = evaluate(observe(deployment=deployment(generation=3, observed=2)), [])
    assert cond(status, "Ready")["status"] == "False"
    assert cond(status, "Reconciling")["status"] == "True"


def test_storage_pending_blocks_ready() -> None:
    status = evaluate(observe(pvc={"status": {"phase": "Pending"}}), [])
    assert cond(status, "StorageBound")["status"] == "False"
    assert cond(status, "Ready")["reason"] == "ClaimPending"


def test_terminating() -> None:
    status = evaluate(observe(deleting=True), [])
    assert status["phase"] == "Terminating"
    assert cond(status, "Ready")["reason"] == "Terminating"


def test_transition_time_moves_only_when_status_flips() -> None:
    first = set_condition([], condition("Ready", True, "A"), generation=1, now="t1")
    same = set_condition(first, condition("Ready", True, "B", "other message"), generation=2, now="t2")
    assert same[0]["lastTransitionTime"] == "t1" and same[0]["reason"] == "B" and same[0]["observedGeneration"] == 2
    flipped = set_condition(same, condition("Ready", False, "C"), generation=2, now="t3")
    assert flipped[0]["lastTransitionTime"] == "t3"


def test_merge_conditions_keeps_order_and_times() -> None:
    old = merge_conditions([], [condition("Ready", True, "A"), condition("Stalled", False, "B")], generation=1, now="t1")
    new = merge_conditions(old, [condition("Ready", True, "A"), condition("Stalled", True, "X")], generation=1, now="t2")
    assert [c["type"] for c in new] == ["Ready", "Stalled"]
    assert new[0]["lastTransitionTime"] == "t1" and new[1]["lastTransitionTime"] == "t2"


def test_equal_observation_means_no_status_write() -> None:
    first = evaluate(observe(), [], now="t1")
    again = evaluate(observe(), first["conditions"], now="t2")
    assert not status_changed(first, again)
    changed = evaluate(observe(nodes=NodeRollout(enabled=True, desired=4, updated=3, ready=3)), first["conditions"], now="t2")
    assert status_changed(first, changed)


def test_drift_ignores_server_defaults_but_not_changes() -> None:
    desired = {"spec": {"replicas": 1, "template": {"spec": {"containers": [{"name": "r", "image": "x"}]}}}}
    live = {
        "spec": {
            "replicas": 1,
            "revisionHistoryLimit": 10,
            "template": {"spec": {"containers": [{"name": "r", "image": "x", "imagePullPolicy": "IfNotPresent"}]}},
        }
    }
    assert not drifted(desired, live)
    assert drifted(desired, {"spec": {"replicas": 0, "template": live["spec"]["template"]}})
    assert drifted(desired, {"spec": {"replicas": 1, "template": {"spec": {"containers": []}}}})
    assert drifted(desired, None)


def test_rejected_upstream_credentials_are_a_clear_failure() -> None:
    status = evaluate(observe(upstream_auth=(False, "CredentialsRejected", "the token service refused robot")), [])
    assert cond(status, "UpstreamAuthenticated")["status"] == "False"
    assert cond(status, "Ready")["reason"] == "UpstreamCredentialsRejected"
    assert cond(status, "Stalled")["status"] == "True"
    assert status["phase"] == "Failed"


def test_unreachable_upstream_does_not_block_ready() -> None:
    status = evaluate(observe(upstream_auth=(None, "Unreachable", "connection refused")), [])
    assert cond(status, "UpstreamAuthenticated")["status"] == "Unknown"
    assert cond(status, "Ready")["status"] == "True"


def test_no_credentials_no_upstream_condition() -> None:
    assert all(c["type"] != "UpstreamAuthenticated" for c in evaluate(observe(), [])["conditions"])


def test_status_round_trips_through_the_model_unchanged() -> None:
    """The operator compares the raw status and validates only before writing: both must agree."""
    from regmirror.observe import typed_status

    for obs in (
        observe(),
        observe(nodes=NodeRollout(enabled=True, desired=3, updated=1, ready=0, not_ready=("a", "b"))),
        observe(error_reason="CredentialsSecretMissing", error_message="x"),
        observe(upstream_auth=(None, "Unreachable", "refused"), pvc=None, service=None, deployment=None),
        observe(nodes=NodeRollout(enabled=False)),
    ):
        raw = evaluate(obs, [], now="2026-01-01T00:00:00Z")
        assert typed_status(raw) == raw


def test_fields_another_manager_adds_to_named_lists_are_not_drift() -> None:
    desired = {"spec": {"containers": [{"name": "r", "env": [{"name": "A", "value": "1"}]}]}}
    added = {
        "spec": {"containers": [{"name": "r", "env": [{"name": "A", "value": "1"}, {"name": "MESH", "value": "x"}]}, {"name": "sidecar"}]}
    }
    assert not drifted(desired, added)
    changed = {"spec": {"containers": [{"name": "r", "env": [{"name": "A", "value": "2"}]}]}}
    assert drifted(desired, changed)
    assert drifted(desired, {"spec": {"containers": [{"name": "r", "env": []}]}})
    # Lists without a merge key are owned whole (atomic in the API).
    assert drifted({"args": ["a", "b"]}, {"args": ["a", "b", "c"]})


def test_a_transient_repair_keeps_a_serving_mirror_ready() -> None:
    status = evaluate(observe(repair=RepairError(True, "APIUnavailable", "503 the API server did not take a write")), [])
    assert cond(status, "Ready")["status"] == "True"
    assert cond(status, "Reconciling")["status"] == "True" and cond(status, "Reconciling")["reason"] == "Retrying"
    assert "503" in cond(status, "Reconciling")["message"]
    assert cond(status, "Stalled")["status"] == "False"


def test_a_forbidden_repair_is_stalled_but_the_mirror_still_serves() -> None:
    status = evaluate(observe(repair=RepairError(False, "ApplyForbidden", "403 forbidden")), [])
    assert cond(status, "Ready")["status"] == "True"
    assert cond(status, "Stalled")["status"] == "True" and cond(status, "Stalled")["reason"] == "ApplyForbidden"


def test_a_deleted_claim_still_in_use_is_not_bound() -> None:
    terminating = {"metadata": {"deletionTimestamp": "2026-01-01T00:00:00Z"}, "status": {"phase": "Bound", "capacity": {"storage": "1Gi"}}}
    status = evaluate(observe(pvc=terminating), [])
    assert cond(status, "StorageBound")["status"] == "False"
    assert cond(status, "StorageBound")["reason"] == "ClaimTerminating"
    assert cond(status, "Ready")["status"] == "False" and cond(status, "Ready")["reason"] == "ClaimTerminating"


def test_a_rejected_apply_names_the_field() -> None:
    message = 'the API server rejected Service regmirror-system/regmirror-hub: spec.clusterIP: Invalid value: "10.0.0.1": not in range'
    status = evaluate(observe(error_reason="ApplyRejected", error_message=message), [])
    assert cond(status, "Ready")["reason"] == "ApplyRejected" and "spec.clusterIP" in cond(status, "Ready")["message"]
    assert cond(status, "Stalled")["status"] == "True"


def test_a_mirror_on_object_storage_needs_no_claim_to_be_ready() -> None:
    s3 = RegistryMirrorSpec.model_validate(
        {"upstream": {"url": "https://registry-1.docker.io"}, "replicas": 2, "storage": {"s3": {"bucket": "cache", "region": "eu-west-1"}}}
    )
    two = deployment(ready=2)
    two["status"].update(replicas=2, updatedReplicas=2)
    status = evaluate(observe(spec=s3, pvc=None, deployment=two), [], now="2026-01-01T00:00:00Z")
    assert (cond(status, "StorageBound")["status"], cond(status, "StorageBound")["reason"]) == ("True", "ObjectStorage")
    assert "bucket cache" in cond(status, "StorageBound")["message"]
    assert status["storage"] == {"phase": "ObjectStorage"}
    assert cond(status, "Ready")["status"] == "True", "an S3 mirror has no claim to wait for"
    unavailable = evaluate(observe(spec=s3, pvc=None, deployment=deployment(ready=0, available=False)), [], now="2026-01-01T00:00:00Z")
    assert cond(unavailable, "Ready")["status"] == "False", "a bucket that fails the registry's health check takes its pods out"
