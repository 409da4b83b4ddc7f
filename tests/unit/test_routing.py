"""Which keys a RegistryMirror's change queues (the manager's routing): what each reconciler reads, no more."""

from __future__ import annotations

import base64
import copy
from typing import Any

from controller_kit import NS, Kit, mirror

from regmirror import constants as c
from regmirror.access import STATE_KEY, auth_secret_name
from regmirror.controller.store import slim_agent_object, slim_mirror, slim_secret


def routed(old: dict[str, Any] | None, new: dict[str, Any] | None) -> set[tuple[str, str]]:
    kit = Kit()
    kit.manager._started = True  # the first lists are done: events route
    kit.manager.on_change(c.KIND, "hub", old and slim_mirror(old), new and slim_mirror(new))
    return kit.queued()


def test_a_finalizer_echo_costs_one_children_pass_and_nothing_else() -> None:
    old = mirror("hub")
    new = copy.deepcopy(old)
    new["metadata"]["finalizers"] = [c.FINALIZER]
    new["metadata"]["resourceVersion"] = "2"
    assert routed(old, new) == {("children", "hub")}
    assert routed(new, old) == {("children", "hub")}, "someone removed ours: the children pass puts it back"


def test_a_spec_or_annotation_change_reaches_every_reconciler_that_reads_it() -> None:
    old = mirror("hub")
    for change in (
        lambda m: m["spec"].update(replicas=2),
        lambda m: m["metadata"].setdefault("annotations", {}).update({c.ANNOTATION_INVALIDATE: '{"a:1": "r1"}'}),
        lambda m: m["metadata"].update(deletionTimestamp="2026-11-30T00:00:00Z"),
    ):
        new = copy.deepcopy(old)
        change(new)
        new["metadata"]["finalizers"] = [c.FINALIZER]  # a finalizer change beside it does not narrow the routing
        assert routed(old, new) >= {("access", "hub"), ("children", "hub"), ("status", "hub"), ("plan", ""), ("hosts", "")}


def test_a_status_echo_queues_nothing() -> None:
    old = mirror("hub")
    new = copy.deepcopy(old)
    new["status"] = {"conditions": [{"type": "Ready", "status": "True"}]}
    assert routed(old, new) == set()


async def access_secret_event(change: str) -> set[tuple[str, str]]:
    """What a watch event about the access Secret the reconciler just applied queues."""
    kit = Kit()
    kit.kube.put(mirror("hub"))
    await kit.run("access", "hub")
    kit.manager._started = True
    name = auth_secret_name("hub")
    written = kit.kube.obj("Secret", NS, name)
    assert written is not None
    assert ("access", "hub") not in kit.queued()
    if change == "echo":
        kit.manager.on_change("Secret", name, None, slim_secret(written))
    elif change == "edit":
        edited = copy.deepcopy(written)
        edited["data"][STATE_KEY] = base64.b64encode(b"{}").decode()
        kit.manager.on_change("Secret", name, slim_secret(written), slim_secret(edited))
    else:
        kit.manager.on_change("Secret", name, slim_secret(written), None)
    return kit.queued()


async def test_our_own_access_secret_echoed_back_costs_no_pass_but_a_hand_edit_or_deletion_does() -> None:
    assert ("access", "hub") not in await access_secret_event("echo")
    assert ("access", "hub") in await access_secret_event("edit"), "edited by hand: the access reconciler restores it"
    assert ("access", "hub") in await access_secret_event("delete"), "deleted: restored"


def test_an_agent_daemonset_status_update_queues_no_plan_pass_but_an_edit_does() -> None:
    """A rollout to 1,000 nodes updates the DaemonSet's status hundreds of times; the plan pass compares none of it."""
    ds = {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {"name": c.AGENT_NAME, "namespace": "regmirror-node", "resourceVersion": "5", "generation": 2},
        "spec": {"template": {"spec": {"containers": [{"name": "agent", "image": "agent:1"}]}}},
        "status": {"numberReady": 10},
    }
    later = copy.deepcopy(ds)
    later["metadata"]["resourceVersion"] = "6"
    later["status"]["numberReady"] = 11
    edited = copy.deepcopy(later)
    edited["metadata"]["resourceVersion"], edited["metadata"]["generation"] = "7", 3
    edited["spec"]["template"]["spec"]["containers"][0]["image"] = "elsewhere:1"

    def route(old: dict[str, Any] | None, new: dict[str, Any] | None) -> set[tuple[str, str]]:
        kit = Kit()
        kit.manager._started = True
        kit.manager.on_change("DaemonSet", c.AGENT_NAME, old and slim_agent_object(old), new and slim_agent_object(new))
        return kit.queued()

    assert route(ds, later) == set()
    assert route(later, edited) == {("plan", "")}
    assert route(later, None) == {("plan", "")}, "deleted: the plan pass puts it back"
