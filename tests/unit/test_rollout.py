"""Per-mirror node rollout accounting (pure: plan history, node index, agent pods)."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

from regmirror import constants as c
from regmirror.models import LabelSelector, RegistryMirrorSpec
from regmirror.nodeplan import NodePlan, build_node_plan, mirror_entry
from regmirror.observe import nodes_condition
from regmirror.rollout import Carried, NodeIndex, NodeRollout, PlanHistory, entry_digest, newest_pods, node_rollout, slim_agent_pod

SPEC = RegistryMirrorSpec.model_validate({"upstream": {"url": "https://registry-1.docker.io"}})
OTHER = RegistryMirrorSpec.model_validate({"upstream": {"url": "https://quay.io"}})
NODES = {"n1": {"pool": "a"}, "n2": {"pool": "a"}, "n3": {"pool": "b"}}
EVERYONE = LabelSelector()


def pod(
    node: str, digest: str, *, ready: bool, started_seconds_ago: float = 120, name: str | None = None, deleting: bool = False
) -> dict[str, Any]:
    started = (datetime.now(UTC) - timedelta(seconds=started_seconds_ago)).strftime("%Y-%m-%dT%H:%M:%SZ")
    slim = slim_agent_pod(
        {
            "metadata": {
                "name": name or f"agent-{node}-{digest[:4]}",
                "creationTimestamp": started,
                "annotations": {c.ANNOTATION_NODE_CONFIG_HASH: digest},
                **({"deletionTimestamp": started} if deleting else {}),
            },
            "spec": {"nodeName": node},
            "status": {
                "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
                "containerStatuses": [{"started": True, "ready": ready, "state": {"running": {"startedAt": started}}}],
            },
        }
    )
    assert slim is not None
    return slim


class Cluster:
    """Nodes, agent pods and what each node applied, as the controller tracks them."""

    def __init__(self, *plans: NodePlan) -> None:
        self.history = PlanHistory()
        for plan in plans:
            self.history.remember(plan)
        self.plan = plans[-1]
        self.pods: dict[str, dict[str, Any]] = {}
        self.applied: dict[str, str | None] = {}

    def event(self, p: dict[str, Any], deleted: bool = False) -> None:
        if deleted:
            self.pods.pop(p["name"], None)
            return
        self.pods[p["name"]] = p
        if p["ready"] and not p["deleting"]:
            self.applied[p["node"]] = p["digest"]

    def rollout(self, name: str, selector: LabelSelector = EVERYONE, *, removing: bool = False) -> NodeRollout:
        index = NodeIndex.build(NODES, newest_pods(self.pods.values()), self.applied, time.time())
        entry = next((e for e in self.plan.mirrors if e.name == name), None)
        want = None if removing else (entry_digest(entry) if entry else Carried.NOT_IN_PLAN)
        return node_rollout(index, self.history, want, name, selector, removing=removing)


def test_all_nodes_applied_means_configured() -> None:
    plan = build_node_plan([mirror_entry("hub", SPEC, "10.96.0.10")])
    cl = Cluster(plan)
    for n in NODES:
        cl.event(pod(n, plan.digest(), ready=True))
    rollout = cl.rollout("hub")
    assert (rollout.desired, rollout.updated, rollout.ready) == (3, 3, 3)
    assert nodes_condition(rollout)[0] is True and rollout.configured


def test_another_mirrors_rollout_does_not_unconfigure_this_one() -> None:
    old = build_node_plan([mirror_entry("hub", SPEC, "10.96.0.10")])
    new = build_node_plan([mirror_entry("hub", SPEC, "10.96.0.10"), mirror_entry("quay", OTHER, "10.96.0.11")])
    cl = Cluster(old, new)
    for n in NODES:
        cl.event(pod(n, old.digest(), ready=True))
    # n1's old pod is gone and its successor not yet Ready; n2's successor is starting.
    cl.event(pod("n1", old.digest(), ready=True), deleted=True)
    cl.event(pod("n2", new.digest(), ready=False, started_seconds_ago=1, name="agent-n2-new"))
    hub = cl.rollout("hub")
    assert (hub.ready, hub.updated) == (3, 3)
    quay = cl.rollout("quay")
    assert quay.ready == 0 and quay.not_ready == ("n1", "n2", "n3")


def test_a_node_whose_agent_stays_unready_is_named() -> None:
    plan = build_node_plan([mirror_entry("hub", SPEC, "10.96.0.10")])
    cl = Cluster(plan)
    cl.event(pod("n1", plan.digest(), ready=True))
    cl.event(pod("n2", plan.digest(), ready=True))
    cl.event(pod("n3", plan.digest(), ready=False, started_seconds_ago=300))
    configured, reason, message = nodes_condition(cl.rollout("hub"))
    assert not configured and reason == "AgentNotReady" and "n3" in message


def test_a_starting_agent_gets_a_grace_period_and_a_recheck_time() -> None:
    plan = build_node_plan([mirror_entry("hub", SPEC, "10.96.0.10")])
    cl = Cluster(plan)
    cl.event(pod("n1", plan.digest(), ready=False, started_seconds_ago=2))
    rollout = cl.rollout("hub")
    assert rollout.problems == () and "n1" in rollout.not_ready
    index = NodeIndex.build(NODES, newest_pods(cl.pods.values()), cl.applied, time.time())
    assert index.recheck_at is not None and index.recheck_at > time.time(), "look again when the grace period ends"


def test_node_selector_counts_only_selected_nodes() -> None:
    spec = RegistryMirrorSpec.model_validate(
        {"upstream": {"url": "https://quay.io"}, "nodeConfig": {"nodeSelector": {"matchLabels": {"pool": "a"}}}}
    )
    plan = build_node_plan([mirror_entry("half", spec, "10.96.0.12")])
    cl = Cluster(plan)
    for n in NODES:
        cl.event(pod(n, plan.digest(), ready=True))
    rollout = cl.rollout("half", spec.node_config.node_selector)
    assert (rollout.desired, rollout.ready) == (2, 2)


def test_a_mirror_not_yet_in_the_plan_counts_no_node() -> None:
    empty = build_node_plan([])
    cl = Cluster(empty)
    for n in NODES:
        cl.event(pod(n, empty.digest(), ready=True))
    rollout = cl.rollout("newcomer")
    assert (rollout.desired, rollout.ready, rollout.updated) == (3, 0, 0) and not rollout.configured


def test_deletion_waits_until_every_node_applied_a_plan_without_the_mirror() -> None:
    with_hub = build_node_plan([mirror_entry("hub", SPEC, "10.96.0.10")])
    empty = build_node_plan([])
    cl = Cluster(with_hub, empty)
    for n in NODES:
        cl.event(pod(n, with_hub.digest(), ready=True))
    cl.event(pod("n1", empty.digest(), ready=True, name="agent-n1-new"))
    assert cl.rollout("hub", removing=True).ready == 1
    for n in ("n2", "n3"):
        cl.event(pod(n, empty.digest(), ready=True, name=f"agent-{n}-new"))
    assert cl.rollout("hub", removing=True).ready == 3


def test_history_forgets_the_oldest_and_a_seed_never_overrides_newer_knowledge() -> None:
    history = PlanHistory(limit=2)
    plans = [build_node_plan([mirror_entry(f"m{i}", SPEC, f"10.96.0.{i}")]) for i in range(3)]
    for plan in plans:
        history.remember(plan)
    assert history.carries(plans[0].digest(), "m0") is Carried.UNKNOWN_PLAN
    assert history.carries(plans[2].digest(), "m2") == entry_digest(plans[2].mirrors[0])
    history.seed({plans[2].digest(): {"m2": "stale"}})
    assert history.carries(plans[2].digest(), "m2") != "stale"
