"""Which keys a RegistryMirror's change queues (the manager's routing): what each reconciler reads, no more."""

from __future__ import annotations

import copy
from typing import Any

from controller_kit import Kit, mirror

from regmirror import constants as c
from regmirror.controller.store import slim_mirror


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
