"""The node-plan reconciler against the fake client: one rollout per burst, no write when unchanged, restores."""

from __future__ import annotations

from typing import Any

import pytest
from controller_kit import AGENT_NS, Kit, mirror
from fakekube import api_error

from regmirror import constants as c
from regmirror.controller import plan as plan_module
from regmirror.controller.state import Done, RequeueAfter, Transient
from regmirror.nodeplan import NodePlan


def live_plan(kit: Kit) -> NodePlan:
    cm = kit.kube.obj("ConfigMap", AGENT_NS, c.NODE_CONFIG_NAME)
    assert cm is not None
    return NodePlan.from_json(cm["data"][c.NODE_CONFIG_KEY])


async def test_a_burst_waits_for_its_services_and_becomes_one_plan() -> None:
    kit = Kit()
    for name in ("a", "b", "c"):
        kit.kube.put(mirror(name))
    await kit.admit("a")  # only a's Service exists so far
    result = await kit.run("plan")
    assert isinstance(result, RequeueAfter), "b and c will be in the plan: wait for their ClusterIPs"
    assert kit.kube.obj("ConfigMap", AGENT_NS, c.NODE_CONFIG_NAME) is None
    for name in ("b", "c"):
        await kit.admit(name)
    kit.clock.advance(1)
    assert await kit.run("plan") == Done()
    assert [m.name for m in live_plan(kit).mirrors] == ["a", "b", "c"]
    ds = kit.kube.obj("DaemonSet", AGENT_NS, c.AGENT_NAME)
    assert ds is not None
    assert ds["spec"]["template"]["metadata"]["annotations"][c.ANNOTATION_NODE_CONFIG_HASH] == live_plan(kit).digest()


async def test_the_wait_for_services_lasts_while_they_keep_coming_and_is_bounded() -> None:
    kit = Kit(plan_wait_for_services=20)
    for name in ("a", "b", "c", "d"):
        kit.kube.put(mirror(name))
    await kit.admit("a")
    assert isinstance(await kit.run("plan"), RequeueAfter)
    kit.clock.advance(2.5)
    await kit.admit("b")  # progress: keep waiting past the stall time
    assert isinstance(await kit.run("plan"), RequeueAfter)
    kit.clock.advance(2.5)
    assert isinstance(await kit.run("plan"), RequeueAfter)
    kit.clock.advance(1)  # c and d never come: 3 s without progress end the wait
    assert await kit.run("plan") == Done()
    assert [m.name for m in live_plan(kit).mirrors] == ["a", "b"]


async def test_the_wait_sleeps_until_it_would_end_and_services_wake_it() -> None:
    """No polling while waiting: the timer is set to when the wait ends (3 s without a new ClusterIP), and each
    Service that appears queues the pass itself (the 0.2 s poll recomputed 500 mirrors' plan 5 times a second)."""
    kit = Kit(plan_wait_for_services=20)
    for name in ("a", "b", "c"):
        kit.kube.put(mirror(name))
    await kit.admit("a")
    first = await kit.run("plan")
    assert isinstance(first, RequeueAfter) and first.seconds == 3.0
    kit.clock.advance(1)
    await kit.admit("b")
    assert ("plan", "") in kit.manager.queue._queued or ("plan", "") in kit.manager.queue._due, "the Service queued the pass"
    again = await kit.run("plan")
    assert isinstance(again, RequeueAfter) and again.seconds == 3.0, "progress: the stall timer starts over"
    kit.clock.advance(2)
    late = await kit.run("plan")
    assert isinstance(late, RequeueAfter) and abs(late.seconds - 1.0) < 1e-9


async def worker_took(kit: Kit, key: tuple[str, str]) -> None:
    """A worker took `key` from the queue and finished it (keys ahead of it too)."""
    queue = kit.manager.queue
    while (taken := await queue.get()) != key:
        queue.done(taken)
    queue.done(key)
    queue.forget(key)


async def test_the_wait_lasts_while_the_operator_still_has_passes_to_run_for_the_mirrors_waited_for() -> None:
    """On a busy operator the Services of a burst come late because their children passes are still queued: that
    is progress still to come, not a stall. A mirror whose pass fails (backing off) is not waited for past 3 s."""
    kit = Kit(plan_wait_for_services=20)
    for name in ("a", "b", "c"):
        kit.kube.put(mirror(name))
    await kit.admit("a")
    kit.ctx.enqueue("children", "b")  # b's first children pass has not run yet
    kit.manager.queue.add_rate_limited(("children", "c"))  # c's failed: it backs off
    assert isinstance(await kit.run("plan"), RequeueAfter)
    for _ in range(3):
        kit.clock.advance(3.5)
        assert isinstance(await kit.run("plan"), RequeueAfter), "b's pass is still to run: keep waiting"
    assert kit.kube.obj("ConfigMap", AGENT_NS, c.NODE_CONFIG_NAME) is None
    await kit.admit("b")
    await worker_took(kit, ("children", "b"))
    kit.clock.advance(0.5)
    assert isinstance(await kit.run("plan"), RequeueAfter), "b came: progress"
    kit.clock.advance(3.5)
    assert await kit.run("plan") == Done(), "only c is left, and its pass is failing: 3 s without progress end the wait"
    assert [m.name for m in live_plan(kit).mirrors] == ["a", "b"]


async def test_an_unchanged_plan_costs_no_write_and_a_deleted_one_is_restored() -> None:
    kit = Kit()
    kit.kube.put(mirror("a"))
    await kit.converge("a")
    kit.kube.calls.clear()
    kit.clock.advance(5)
    assert await kit.run("plan") == Done()
    assert kit.kube.writes() == []
    kit.kube.remove("DaemonSet", AGENT_NS, c.AGENT_NAME)
    kit.kube.remove("ConfigMap", AGENT_NS, c.NODE_CONFIG_NAME)
    assert await kit.run("plan") == Done()
    assert {w[1] for w in kit.kube.writes()} == {"ConfigMap", "DaemonSet"}


async def test_an_edited_agent_daemonset_is_restored_though_the_plan_did_not_change() -> None:
    """The pass skips rendering while neither object changed since it matched: an edit of the spec (the API server
    bumps the generation), of a label, or of the ConfigMap is still seen and undone."""
    kit = Kit()
    kit.kube.put(mirror("a"))
    await kit.converge("a")
    rendered = kit.kube.obj("DaemonSet", AGENT_NS, c.AGENT_NAME)
    assert rendered is not None
    for edit in ("image", "label", "configmap"):
        kit.kube.calls.clear()
        if edit == "configmap":
            cm = kit.kube.obj("ConfigMap", AGENT_NS, c.NODE_CONFIG_NAME)
            assert cm is not None
            cm["data"][c.NODE_CONFIG_KEY] = '{"mirrors":[]}'
            kit.kube.put(cm)
        else:
            ds = kit.kube.obj("DaemonSet", AGENT_NS, c.AGENT_NAME)
            assert ds is not None
            if edit == "image":
                ds["spec"]["template"]["spec"]["containers"][0]["image"] = "example.com/not-the-agent:1"
                ds["metadata"]["generation"] += 1
            else:
                ds["metadata"].setdefault("labels", {})["app.kubernetes.io/name"] = "edited"
            kit.kube.put(ds)
        assert await kit.run("plan") == Done()
        assert [w[1] for w in kit.kube.writes()] == ["ConfigMap" if edit == "configmap" else "DaemonSet"], edit
        live = kit.kube.obj("DaemonSet", AGENT_NS, c.AGENT_NAME)
        assert live is not None and live["spec"] == rendered["spec"], edit
        assert [m.name for m in live_plan(kit).mirrors] == ["a"], edit
    kit.kube.calls.clear()
    assert await kit.run("plan") == Done()
    assert kit.kube.writes() == [], "nothing changed since: nothing rendered, nothing written"


async def test_a_broken_spec_keeps_the_entry_nodes_have() -> None:
    kit = Kit()
    kit.kube.put(mirror("a"))
    await kit.converge("a")
    before = live_plan(kit).mirrors[0]
    body = kit.kube.obj(c.KIND, None, "a")
    assert body is not None
    body["spec"]["replicas"] = -1
    body["metadata"]["generation"] = 2
    kit.kube.put(body)
    kit.clock.advance(5)
    await kit.run("children", "a")
    await kit.run("plan")
    assert live_plan(kit).mirrors == [before]


async def test_a_restarted_controller_reuses_the_live_plan() -> None:
    kit = Kit()
    kit.kube.put(mirror("a"))
    await kit.converge("a")
    again = Kit(kit.kube)
    again.kube.calls.clear()
    await again.converge("a")
    assert again.kube.writes() == []


async def test_a_failing_plan_write_backs_off() -> None:
    kit = Kit()
    kit.kube.put(mirror("a"))
    await kit.admit("a")
    kit.kube.fail("apply", api_error(503), kind="ConfigMap")
    assert isinstance(await kit.run("plan"), Transient)
    kit.kube.fail("apply", api_error(422, "ConfigMap is too long"), kind="ConfigMap")
    assert isinstance(await kit.run("plan"), Transient), "even a rejection is retried with backoff: the plan is ours"
    assert await kit.run("plan") == Done()


async def test_no_agent_is_deployed_before_the_first_mirror() -> None:
    kit = Kit()
    assert await kit.run("plan") == Done()
    assert kit.kube.writes() == []
    kit.kube.put(mirror("a"))
    await kit.converge("a")
    assert kit.kube.obj("DaemonSet", AGENT_NS, c.AGENT_NAME) is not None
    body = kit.kube.obj(c.KIND, None, "a")
    assert body is not None
    kit.kube.remove(c.KIND, None, "a")
    kit.clock.advance(5)
    assert await kit.run("plan") == Done()
    assert live_plan(kit).mirrors == [], "once deployed, an empty plan is written so agents remove their files"


async def test_a_pass_over_an_unchanged_plan_renders_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every Service event queues the plan pass; once the plan and the live objects match, it renders nothing."""
    kit = Kit()
    for name in ("a", "b"):
        kit.kube.put(mirror(name))
        await kit.converge(name)
    rendered: list[str] = []
    original = plan_module.render_node_config_map

    def counting(*args: Any, **kwargs: Any) -> dict[str, Any]:
        rendered.append("ConfigMap")
        return original(*args, **kwargs)

    monkeypatch.setattr(plan_module, "render_node_config_map", counting)
    kit.clock.advance(2)  # past the interval between two plan versions
    assert await kit.run("plan") == Done()  # b's entry goes out; what matched is recorded
    rendered.clear()
    for _ in range(3):
        assert await kit.run("plan") == Done()
    assert rendered == []
    kit.kube.put(mirror("c"))
    await kit.converge("c")
    kit.clock.advance(2)
    assert await kit.run("plan") == Done()
    assert rendered, "a new mirror changes the plan: rendered and applied"
    assert [m.name for m in live_plan(kit).mirrors] == ["a", "b", "c"]
