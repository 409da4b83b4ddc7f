"""Faults of the operator process: SIGKILL at random points, deletions while it is down, restarts.

Promises checked (issue 11, "Faults on the real control plane"):
- killed at any point while mirrors converge, the operator converges after it returns,
  with no duplicate or orphaned children and no mirror's Ready going True -> False;
- mirrors deleted while it is down are released (finalizer dropped) once it returns;
- a restart posts no new Event about a steady mirror, and a normal delete logs no error.

The kill points are random; the seed is printed (``REGMIRROR_FAULT_SEED=<n>`` replays one),
and seeds that once found a failure are kept in ``REGRESSION_SEEDS``.
"""

from __future__ import annotations

import os
import random
import signal
import time

import pytest

from harness import LocalCluster
from harness.children import ownership_problems
from harness.faults import Faults
from harness.objects import present
from harness.operator import mirror_body, wait_settled
from harness.waiting import wait_for
from harness.watch import MirrorWatch
from regmirror import constants as c
from regmirror.nodeplan import NodePlan

CONVERGING_MIRRORS = 20
KILLS = 4
#: Seeds whose kill points once exposed a failure; each runs as its own case.
REGRESSION_SEEDS: list[int] = []


def _seeds() -> list[int]:
    chosen = os.environ.get("REGMIRROR_FAULT_SEED")
    return [*REGRESSION_SEEDS, int(chosen) if chosen else random.SystemRandom().randrange(2**32)]


def node_plan_mirrors(cluster: LocalCluster) -> list[str]:
    """Names of the mirrors in the node plan ConfigMap."""
    cm = cluster.kubectl_json("get", "configmap", c.NODE_CONFIG_NAME, "-n", "regmirror-node")
    return [m.name for m in NodePlan.from_json(cm["data"][c.NODE_CONFIG_KEY]).mirrors]


def events_about(cluster: LocalCluster, mirror: str) -> int:
    """How many Events (counting repeats of one Event) name this mirror as their object."""
    items = cluster.kubectl_json("get", "events", "-n", "default", "--field-selector", f"involvedObject.name={mirror}")["items"]
    return sum(max(int(e.get("count") or 0), int((e.get("series") or {}).get("count") or 0), 1) for e in items)


@pytest.mark.parametrize("seed", _seeds())
def test_sigkill_at_random_points_while_twenty_mirrors_converge(faults: Faults, seed: int) -> None:
    cluster, operator = faults.cluster, faults.operator
    rng = random.Random(seed)
    print(f"\nkill points from seed {seed} (REGMIRROR_FAULT_SEED={seed} replays them)")
    names = [f"kill-{i:02d}" for i in range(CONVERGING_MIRRORS)]
    with MirrorWatch(cluster) as watch:
        faults.mirrors.apply_all([mirror_body(name) for name in names])
        for kill in range(KILLS):
            pause = rng.uniform(0.2, 3.0)
            time.sleep(pause)  # the fault's timing: a random point of the convergence
            print(f"SIGKILL {kill + 1}/{KILLS} {pause:.2f}s after the last (re)start")
            operator.stop(signal.SIGKILL)
            operator.start()
        wait_settled(cluster, names, timeout=240)
    problems = ownership_problems(cluster, names)
    assert problems == [], "\n".join(problems)
    assert sorted(set(node_plan_mirrors(cluster)) & set(names)) == names
    assert watch.readiness_drops() == {}, f"Ready went from True to something else (seed {seed}): {watch.readiness_drops()}"


def test_mirrors_deleted_while_the_operator_is_down_are_released_when_it_returns(faults: Faults) -> None:
    cluster, operator = faults.cluster, faults.operator
    names = faults.mirrors.apply_all([mirror_body(f"down-{x}") for x in "abc"])
    wait_settled(cluster, names)
    operator.stop(signal.SIGKILL)
    cluster.kubectl("delete", c.SINGULAR, *names, "--wait=false")
    # Nobody releases the finalizer while the operator is down: the mirrors stay, Terminating.
    assert present(cluster, c.SINGULAR, names) == names
    operator.start()
    wait_for(lambda: not present(cluster, c.SINGULAR, names), 90, f"{names} to be released", diagnose=operator.log_tail)
    assert not set(node_plan_mirrors(cluster)) & set(names)
    # The garbage collector removes the children after their owners: no orphan stays.
    wait_for(lambda: not ownership_problems(cluster, []), 60, "no child of a deleted mirror to remain", interval=1.0)


def test_a_restart_posts_no_event_about_a_steady_mirror(faults: Faults) -> None:
    cluster, operator = faults.cluster, faults.operator
    names = faults.mirrors.apply_all([mirror_body(f"calm-{x}") for x in "ab"])
    wait_settled(cluster, names)
    before = {name: events_about(cluster, name) for name in names}
    operator.restart()
    operator.wait_live()
    # A mirror made after the restart is Ready: the new process has been through its startup.
    marker = faults.mirrors.create("calm-marker")
    wait_settled(cluster, [*names, marker])
    after = {name: events_about(cluster, name) for name in names}
    assert after == before, f"Events about steady mirrors after a restart: before {before}, after {after}"


def test_a_normal_delete_logs_no_error(faults: Faults) -> None:
    cluster, operator = faults.cluster, faults.operator
    name = faults.mirrors.create("plain-delete")
    wait_settled(cluster, [name])
    offset = operator.log_size()
    faults.mirrors.delete(name)
    errors = operator.error_lines(offset)
    assert errors == [], f"a normal delete logged {len(errors)} line(s) at error level:\n" + "\n".join(errors[:5])
