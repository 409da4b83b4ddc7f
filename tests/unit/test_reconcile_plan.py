"""The node-plan reconciler against the fake client: one rollout per burst, no write when unchanged, restores."""

from __future__ import annotations

from controller_kit import AGENT_NS, Kit, mirror
from fakekube import api_error

from regmirror import constants as c
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
