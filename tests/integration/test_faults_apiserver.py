"""Faults between the operator and the API server: restarts, a long outage, a network partition.

Promises checked (issue 11, "After some API disruptions the operator is alive but blind"):
- the watches recover from any outage: children deleted right after the API server is
  back (while the operator's watches may still be reconnecting) come back within
  ``RECREATE_SECONDS``, whether the API server restarted during convergence, in a quiet
  period, or was down for minutes; and so do children deleted during a partition (with
  or without an API server restart meanwhile) once it heals;
- no write storm after recovery: at most ``WRITE_BUDGET_BASE`` + 2 per mirror operator writes in the minute
  after it (re-creating what was deleted costs a handful; a retry storm costs hundreds);
- status never keeps claiming Ready=True for a mirror whose Deployment vanished;
- the operator's liveness endpoint reports failure while it cannot watch, and health again after.

Each test collects every broken promise before failing, so one run shows them all.
"""

from __future__ import annotations

import random
import time

import pytest

from harness import LocalCluster, audit
from harness.children import child, ownership_problems
from harness.faults import Faults
from harness.operator import OPERATOR_NS, OPERATOR_USER, OperatorProcess, condition, get_mirror, mirror_body, wait_settled
from harness.waiting import WaitTimeout, wait_for
from regmirror.naming import child_name

RECREATE_SECONDS = 30
#: How long the operator may take to notice it cannot watch, and to be healthy again.
LIVENESS_SECONDS = 60
OUTAGE_SECONDS = 180
#: A partition long enough for the operator to notice it cannot watch (a silent watch is
#: only suspect after a while: the API server sends a bookmark about once a minute; the
#: tests' operator then fails liveness 20 s later, REGMIRROR_LIVENESS_STALE), and for
#: failed requests to have exhausted their retries.
PARTITION_SECONDS = 130
#: The window after recovery in which the operator's writes are counted.
STORM_WINDOW_SECONDS = 60
#: Writes that window may hold: re-creating the deleted children (3), a new node plan
#: (ConfigMap and DaemonSet), the two damaged mirrors' status flips and their Events, and,
#: per mirror in the cluster, the progress of the new plan's rollout: written at most once
#: per status_progress_interval (60 s), so twice in a window of that length (CI found 27
#: writes with ten mirrors: 2 progress writes each for six of them). A storm is hundreds.
WRITE_BUDGET_BASE = 16
WRITE_BUDGET_PER_MIRROR = 2


def delete_children(cluster: LocalCluster, mirror: str, kinds: tuple[str, ...]) -> dict[str, str]:
    """Delete some of a mirror's children as an admin would; returns their old uids by kind."""
    uids = {}
    for kind in kinds:
        body = child(cluster, kind, mirror)
        assert body is not None, f"{mirror} has no {kind} to delete"
        uids[kind] = body["metadata"]["uid"]
        cluster.kubectl("delete", kind, child_name(mirror), "-n", OPERATOR_NS, "--wait=false")
    return uids


def recreated(cluster: LocalCluster, mirror: str, old_uids: dict[str, str]) -> list[str]:
    """The deleted children that did not come back (as new objects) within RECREATE_SECONDS."""

    def missing() -> list[str]:
        return [
            kind for kind, uid in old_uids.items() if ((child(cluster, kind, mirror) or {}).get("metadata") or {}).get("uid") in (None, uid)
        ]

    try:
        wait_for(lambda: not missing(), RECREATE_SECONDS, f"{mirror}'s {sorted(old_uids)} to be re-created", interval=0.5)
    except WaitTimeout:
        return [f"{mirror}: {kind} deleted and not re-created within {RECREATE_SECONDS}s" for kind in missing()]
    return []


def write_storm(cluster: LocalCluster, since: str, since_at: float, mirrors: int) -> list[str]:
    """Wait for the end of the window after ``since`` and report a write storm in it, if any (`mirrors`: how many exist)."""
    time.sleep(max(0.0, since_at + STORM_WINDOW_SECONDS - time.monotonic()))  # the measurement window
    writes = audit.writes(cluster, OPERATOR_USER, since)
    budget = WRITE_BUDGET_BASE + WRITE_BUDGET_PER_MIRROR * mirrors
    if len(writes) <= budget:
        return []
    return [f"{len(writes)} operator writes in the {STORM_WINDOW_SECONDS}s after recovery (budget {budget}):", *audit.summary(writes)]


def recovers(cluster: LocalCluster, mirrors: list[str]) -> list[str]:
    """Right after the API server is back (the watches may still be reconnecting), delete
    children of two mirrors; the problems if they do not come back or the operator storms."""
    since, since_at = audit.now(), time.monotonic()
    lost = {
        mirrors[0]: delete_children(cluster, mirrors[0], ("service",)),
        mirrors[1]: delete_children(cluster, mirrors[1], ("configmap", "deployment")),
    }
    problems = [p for mirror, uids in lost.items() for p in recreated(cluster, mirror, uids)]
    return problems + write_storm(cluster, since, since_at, len(mirrors))


def liveness_fails(operator: OperatorProcess, within: float, what: str) -> list[str]:
    """Wait until the liveness endpoint stops answering 200; a problem if it never does."""
    try:
        wait_for(lambda: operator.liveness() != 200, within, f"liveness to report failure {what}", interval=1.0)
    except WaitTimeout:
        return [f"liveness kept answering 200 for {within:g}s {what}"]
    return []


def liveness_recovers(operator: OperatorProcess) -> list[str]:
    """Wait until the liveness endpoint answers 200 again; a problem if not within LIVENESS_SECONDS."""
    try:
        wait_for(lambda: operator.liveness() == 200, LIVENESS_SECONDS, "liveness to answer 200 again", interval=1.0)
    except WaitTimeout:
        return [f"liveness did not answer 200 within {LIVENESS_SECONDS}s after recovery (last: {operator.liveness()})"]
    return []


def test_apiserver_restarted_during_convergence(faults: Faults) -> None:
    cluster = faults.cluster
    seed = random.SystemRandom().randrange(2**32)
    pause = random.Random(seed).uniform(0.2, 2.0)
    print(f"\nrestart {pause:.2f}s into the convergence (seed {seed})")
    names = faults.mirrors.apply_all([mirror_body(f"conv-{i:02d}") for i in range(10)])
    time.sleep(pause)  # the fault's timing: a point of the convergence
    cluster.restart_apiserver()
    problems = []
    try:
        wait_settled(cluster, names, timeout=180)
    except WaitTimeout as exc:
        problems.append(f"did not converge after the restart: {exc}")
    problems += ownership_problems(cluster, names)
    problems += recovers(cluster, names)
    assert not problems, "\n".join(problems)


def test_apiserver_restarted_in_a_quiet_period(faults: Faults) -> None:
    cluster = faults.cluster
    names = faults.mirrors.apply_all([mirror_body(f"quiet-{x}") for x in "ab"])
    wait_settled(cluster, names)
    cluster.restart_apiserver()
    problems = recovers(cluster, names)
    assert not problems, "\n".join(problems)


def test_apiserver_down_for_minutes_then_back(faults: Faults) -> None:
    cluster, operator = faults.cluster, faults.operator
    names = faults.mirrors.apply_all([mirror_body(f"outage-{x}") for x in "ab"])
    wait_settled(cluster, names)
    began = time.monotonic()
    cluster.stop_apiserver()
    problems = liveness_fails(operator, OUTAGE_SECONDS - 5, "while the API server is down")
    time.sleep(max(0.0, began + OUTAGE_SECONDS - time.monotonic()))  # the fault: minutes without an API server
    cluster.start_apiserver()
    problems += recovers(cluster, names)
    problems += liveness_recovers(operator)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("apiserver_restart", [False, True], ids=["partition", "partition-and-apiserver-restart"])
def test_partition_while_children_are_deleted(faults: Faults, apiserver_restart: bool) -> None:
    cluster, operator = faults.cluster, faults.operator
    service_lost, deployment_lost = faults.mirrors.apply_all([mirror_body(f"part-{x}") for x in "ab"])
    wait_settled(cluster, [service_lost, deployment_lost])
    began = time.monotonic()
    with faults.relay.partition():
        # The admin's requests do not go through the operator's relay: they reach the API server.
        lost = {
            service_lost: delete_children(cluster, service_lost, ("service",)),
            deployment_lost: delete_children(cluster, deployment_lost, ("deployment",)),
        }
        if apiserver_restart:
            cluster.restart_apiserver()
        problems = liveness_fails(
            operator, PARTITION_SECONDS - (time.monotonic() - began), "while the operator cannot reach the API server"
        )
        time.sleep(max(0.0, began + PARTITION_SECONDS - time.monotonic()))  # the fault: the partition's length
    healed, healed_at = audit.now(), time.monotonic()

    def honest() -> bool:
        body = get_mirror(cluster, deployment_lost)
        ready = condition(body, "Ready") or {}
        return child(cluster, "deployment", deployment_lost) is not None or ready.get("status") != "True"

    try:
        wait_for(honest, RECREATE_SECONDS, f"{deployment_lost}'s status to stop claiming Ready without its Deployment", interval=0.5)
    except WaitTimeout:
        problems.append(f"{deployment_lost} kept Ready=True for {RECREATE_SECONDS}s after the partition while its Deployment was gone")
    for mirror, uids in lost.items():
        problems += recreated(cluster, mirror, uids)
    problems += liveness_recovers(operator)
    problems += ownership_problems(cluster, [service_lost, deployment_lost])
    problems += write_storm(cluster, healed, healed_at, 2)
    assert not problems, "\n".join(problems)
