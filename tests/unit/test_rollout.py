"""Per-mirror node rollout accounting (Controller caches only; no API calls)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from regmirror import constants as c
from regmirror.models import RegistryMirrorSpec
from regmirror.nodeplan import build_node_plan, mirror_entry
from regmirror.observe import nodes_condition
from regmirror.reconcile import Controller, Settings

SPEC = RegistryMirrorSpec.model_validate({"upstream": {"url": "https://registry-1.docker.io"}})
OTHER = RegistryMirrorSpec.model_validate({"upstream": {"url": "https://quay.io"}})


def pod(node: str, digest: str, *, ready: bool, started_seconds_ago: float = 120, name: str | None = None) -> dict[str, Any]:
    started = (datetime.now(UTC) - timedelta(seconds=started_seconds_ago)).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "metadata": {
            "name": name or f"agent-{node}-{digest[:4]}",
            "creationTimestamp": started,
            "annotations": {c.ANNOTATION_NODE_CONFIG_HASH: digest},
        },
        "spec": {"nodeName": node},
        "status": {
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
            "containerStatuses": [{"started": True, "ready": ready, "state": {"running": {"startedAt": started}}}],
        },
    }


def controller_with_plan(*entries: Any) -> tuple[Controller, str]:
    ctl = Controller(Settings(workers=1))
    plan = build_node_plan(list(entries))
    ctl.plan = plan
    ctl._remember_plan(plan)
    for n in ("n1", "n2", "n3"):
        ctl.on_node("ADDED", {"metadata": {"name": n, "labels": {"pool": "a" if n != "n3" else "b"}}})
    return ctl, plan.digest()


def test_all_nodes_applied_means_configured() -> None:
    ctl, digest = controller_with_plan(mirror_entry("hub", SPEC, "10.96.0.10"))
    for n in ("n1", "n2", "n3"):
        ctl.on_agent_pod("ADDED", pod(n, digest, ready=True))
    rollout = ctl.node_rollout("hub", SPEC, deleting=False)
    assert (rollout.desired, rollout.updated, rollout.ready) == (3, 3, 3)
    assert nodes_condition(rollout)[0] is True


def test_another_mirrors_rollout_does_not_unconfigure_this_one() -> None:
    ctl, old = controller_with_plan(mirror_entry("hub", SPEC, "10.96.0.10"))
    for n in ("n1", "n2", "n3"):
        ctl.on_agent_pod("ADDED", pod(n, old, ready=True))
    new_plan = build_node_plan([mirror_entry("hub", SPEC, "10.96.0.10"), mirror_entry("quay", OTHER, "10.96.0.11")])
    ctl.plan = new_plan
    ctl._remember_plan(new_plan)
    # n1's old pod is gone and its successor not yet Ready; n2's successor is starting.
    ctl.on_agent_pod("DELETED", pod("n1", old, ready=True))
    ctl.on_agent_pod("ADDED", pod("n2", new_plan.digest(), ready=False, started_seconds_ago=1, name="agent-n2-new"))
    hub = ctl.node_rollout("hub", SPEC, deleting=False)
    assert (hub.ready, hub.updated) == (3, 3)
    quay = ctl.node_rollout("quay", OTHER, deleting=False)
    assert quay.ready == 0 and quay.not_ready == ("n1", "n2", "n3")


def test_a_node_whose_agent_stays_unready_is_named() -> None:
    ctl, digest = controller_with_plan(mirror_entry("hub", SPEC, "10.96.0.10"))
    ctl.on_agent_pod("ADDED", pod("n1", digest, ready=True))
    ctl.on_agent_pod("ADDED", pod("n2", digest, ready=True))
    ctl.on_agent_pod("ADDED", pod("n3", digest, ready=False, started_seconds_ago=300))
    rollout = ctl.node_rollout("hub", SPEC, deleting=False)
    configured, reason, message = nodes_condition(rollout)
    assert not configured and reason == "AgentNotReady" and "n3" in message


def test_a_starting_agent_gets_a_grace_period() -> None:
    ctl, digest = controller_with_plan(mirror_entry("hub", SPEC, "10.96.0.10"))
    ctl.on_agent_pod("ADDED", pod("n1", digest, ready=False, started_seconds_ago=2))
    rollout = ctl.node_rollout("hub", SPEC, deleting=False)
    assert rollout.problems == () and "n1" in rollout.not_ready
    assert ctl.status_recheck_at is not None, "a status re-check is scheduled for when the grace period ends"


def test_node_selector_counts_only_selected_nodes() -> None:
    spec = RegistryMirrorSpec.model_validate(
        {"upstream": {"url": "https://quay.io"}, "nodeConfig": {"nodeSelector": {"matchLabels": {"pool": "a"}}}}
    )
    ctl, digest = controller_with_plan(mirror_entry("half", spec, "10.96.0.12"))
    for n in ("n1", "n2", "n3"):
        ctl.on_agent_pod("ADDED", pod(n, digest, ready=True))
    rollout = ctl.node_rollout("half", spec, deleting=False)
    assert (rollout.desired, rollout.ready) == (2, 2)


def test_deletion_waits_until_every_node_applied_a_plan_without_the_mirror() -> None:
    ctl, with_hub = controller_with_plan(mirror_entry("hub", SPEC, "10.96.0.10"))
    for n in ("n1", "n2", "n3"):
        ctl.on_agent_pod("ADDED", pod(n, with_hub, ready=True))
    empty = build_node_plan([])
    ctl.plan = empty
    ctl._remember_plan(empty)
    ctl.on_agent_pod("ADDED", pod("n1", empty.digest(), ready=True, name="agent-n1-new"))
    assert ctl.node_rollout("hub", SPEC, deleting=True).ready == 1
    for n in ("n2", "n3"):
        ctl.on_agent_pod("ADDED", pod(n, empty.digest(), ready=True, name=f"agent-{n}-new"))
    assert ctl.node_rollout("hub", SPEC, deleting=True).ready == 3
