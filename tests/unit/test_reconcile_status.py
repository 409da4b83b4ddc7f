"""The status reconciler against the fake client: what is written, when, and which Events are posted."""

from __future__ import annotations

import itertools
import json
from typing import Any

from controller_kit import NS, Kit, make_serving, mirror, ready, status_of
from fakekube import api_error

from regmirror import constants as c
from regmirror.conditions import get_condition
from regmirror.controller.state import Done, RequeueAfter, Terminal, Transient
from regmirror.models import UNWRITTEN_STATUS, CacheStatus
from regmirror.observe import RepairError


async def serving_mirror(kit: Kit, name: str = "hub", **spec: Any) -> None:
    kit.kube.put(mirror(name, nodeConfig={"enabled": False}, **spec))
    await kit.converge(name)
    make_serving(kit, name)


async def test_a_ready_mirror_is_written_at_once_and_only_once() -> None:
    kit = Kit()
    await serving_mirror(kit)
    kit.kube.calls.clear()
    assert await kit.run("status", "hub") == Done()
    assert ready(status_of(kit)) == ("True", "MirrorReady")
    assert status_of(kit)["observedGeneration"] == 1
    assert [w[0] for w in kit.kube.writes()] == ["apply_status"], "no Event for a first Ready"
    kit.kube.calls.clear()
    assert await kit.run("status", "hub") == Done()
    assert kit.kube.writes() == []


async def test_a_new_mirror_progressing_normally_waits_before_its_first_status() -> None:
    kit = Kit()
    kit.kube.put(mirror("hub", nodeConfig={"enabled": False}))
    await kit.converge("hub")
    result = await kit.run("status", "hub")
    assert isinstance(result, RequeueAfter) and 0 < result.seconds <= 60
    assert status_of(kit) == {}
    kit.clock.advance(result.seconds)
    assert await kit.run("status", "hub") == Done()
    assert status_of(kit)["phase"] in ("Progressing", "Pending")


async def test_progress_is_written_at_a_bounded_rate_but_problems_at_once() -> None:
    kit = Kit()
    await serving_mirror(kit)
    await kit.run("status", "hub")
    dep = kit.kube.obj("Deployment", NS, "regmirror-hub")
    assert dep is not None
    dep["status"]["readyReplicas"] = 2  # a count changed: progress only
    dep["status"]["replicas"] = 1
    kit.kube.put(dep)
    kit.kube.calls.clear()
    result = await kit.run("status", "hub")
    assert isinstance(result, RequeueAfter) and kit.kube.writes() == []
    kit.kube.remove("Service", NS, "regmirror-hub")  # the endpoint is gone: a reader must know now
    assert await kit.run("status", "hub") == Done()
    assert len(kit.kube.writes()) == 1 and ready(status_of(kit))[0] == "False"


async def test_a_missing_secret_is_stalled_with_a_warning_event() -> None:
    kit = Kit()
    kit.kube.put(mirror("hub", upstream={"url": "https://quay.io", "credentialsSecretRef": {"name": "nope"}}))
    await kit.run("children", "hub")
    assert await kit.run("status", "hub") == Done()
    assert ready(status_of(kit)) == ("False", "CredentialsSecretMissing")
    assert get_condition(status_of(kit)["conditions"], "Stalled")["status"] == "True"  # type: ignore[index]
    assert [(e["reason"], e["type"]) for e in kit.kube.events] == [("CredentialsSecretMissing", "Warning")]


async def test_a_transient_failure_is_hidden_during_the_grace_period_then_shown_without_touching_ready() -> None:
    kit = Kit()
    await serving_mirror(kit)
    await kit.run("status", "hub")
    rec = kit.ctx.records["hub"]
    rec.repair.failed(RepairError(True, "APIUnavailable", "503 ServiceUnavailable: etcd leader changed"), kit.clock())
    kit.kube.calls.clear()
    await kit.run("status", "hub")
    assert kit.kube.writes() == [], "retried before anyone is told"
    kit.clock.advance(31)
    await kit.run("status", "hub")
    status = status_of(kit)
    assert ready(status) == ("True", "MirrorReady"), "the pods serve: Ready stays True"
    reconciling = get_condition(status["conditions"], "Reconciling")
    assert reconciling is not None and reconciling["status"] == "True" and "etcd leader changed" in reconciling["message"]


async def test_a_restarted_operator_announces_nothing_new() -> None:
    kit = Kit()
    await serving_mirror(kit)
    await kit.run("status", "hub")
    restarted = Kit(kit.kube)  # same cluster, fresh controller
    await restarted.converge("hub")
    restarted.kube.calls.clear()
    await restarted.run("status", "hub")
    assert restarted.kube.writes() == []
    assert restarted.kube.events == []


async def test_a_restarted_operator_whose_status_pass_comes_before_its_access_pass_keeps_status_access() -> None:
    kit = Kit()
    await serving_mirror(kit)
    await kit.run("access", "hub")
    await kit.run("status", "hub")
    access = status_of(kit).get("access")
    assert access and access["policy"] == "Open"
    restarted = Kit(kit.kube)  # same cluster, fresh controller: no access pass yet
    for _ in range(4):
        await restarted.run("children", "hub")
    await restarted.run("plan")
    await restarted.run("rollout")
    restarted.kube.calls.clear()
    await restarted.run("status", "hub")
    assert restarted.kube.writes() == [], "status.access is kept until the access pass says otherwise, not dropped"
    await restarted.run("access", "hub")
    await restarted.run("status", "hub")
    assert restarted.kube.writes() == []
    assert status_of(restarted).get("access") == access


async def test_recovery_from_a_problem_is_announced() -> None:
    kit = Kit()
    await serving_mirror(kit)
    await kit.run("status", "hub")
    pvc = kit.kube.obj("PersistentVolumeClaim", NS, "regmirror-hub")
    assert pvc is not None
    pvc["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"  # deleted, held by pvc-protection
    kit.kube.put(pvc)
    await kit.run("status", "hub")
    assert ready(status_of(kit)) == ("False", "ClaimTerminating")
    kit.kube.remove("PersistentVolumeClaim", NS, "regmirror-hub")
    await kit.run("children", "hub")  # a new claim
    make_serving(kit)
    await kit.run("status", "hub")
    assert ready(status_of(kit)) == ("True", "MirrorReady")
    assert [(e["reason"], e["type"]) for e in kit.kube.events] == [("ClaimTerminating", "Warning"), ("MirrorReady", "Normal")]


async def test_a_failed_status_write_backs_off_and_a_rejected_one_stops() -> None:
    kit = Kit()
    await serving_mirror(kit)
    kit.kube.fail("apply_status", api_error(500))
    assert isinstance(await kit.run("status", "hub"), Transient)
    kit.kube.fail("apply_status", api_error(422, "status.phase: Invalid value"))
    assert isinstance(await kit.run("status", "hub"), Terminal)
    assert await kit.run("status", "hub") == Done()
    assert ready(status_of(kit)) == ("True", "MirrorReady")


async def test_hosts_show_the_position_and_the_head_of_the_order_only() -> None:
    kit = Kit()
    for i in range(12):
        kit.kube.put(mirror(f"m{i:02d}", nodeConfig={"enabled": True, "priority": 100}))
    await kit.run("hosts")
    routes = kit.ctx.routes["docker.io"]
    assert routes["m11"] == (12, [f"m{i:02d}" for i in range(10)])
    assert routes["m00"][0] == 1
    kit.manager.queue._due.clear()
    kit.kube.put(mirror("zz-last", nodeConfig={"enabled": True, "priority": 100}))
    await kit.run("hosts")
    assert {k for k in kit.queued() if k[0] == "status"} == {("status", "zz-last")}, (
        "a mirror added behind the head rewrites no other status"
    )


def test_the_progress_budget_bounds_writes_of_all_mirrors_together() -> None:
    from regmirror.controller.state import TokenBucket

    bucket = TokenBucket(rate=5.0, burst=5.0)
    assert [bucket.reserve(0.0) for _ in range(5)] == [0.0] * 5
    assert [round(bucket.reserve(0.0), 3) for _ in range(3)] == [0.2, 0.4, 0.6], "later callers get later places"
    assert round(bucket.reserve(0.5), 3) == 0.3, "the next free place is at 0.8 s"
    assert bucket.reserve(10.0) == 0.0, "the debt is paid, and the bucket refilled up to its burst"


async def test_mirrors_waiting_for_the_progress_budget_each_get_one_place_and_one_pass_for_it() -> None:
    """A burst of mirrors whose first status falls due at once: each reserves a place and is handed out again
    when it comes. (Told only "no token, try in 0.2 s", every waiting mirror woke for each token: about 170
    status passes per mirror while 500 mirrors converged.)"""
    kit = Kit(status_progress_rate=5.0)
    names = [f"m{i:02d}" for i in range(20)]
    for name in names:
        kit.kube.put(mirror(name, nodeConfig={"enabled": False}))
        assert isinstance(await kit.run("status", name), RequeueAfter), "no news: the first status waits"
    kit.clock.advance(61)
    start = kit.clock()
    turns: dict[str, float] = {}
    for name in names:
        result = await kit.run("status", name)
        if isinstance(result, RequeueAfter):
            turns[name] = kit.clock() + result.seconds
    assert len(turns) == 15, "five went out at once (the burst)"
    assert sorted(round(t - start, 3) for t in turns.values()) == [round(0.2 * k, 3) for k in range(1, 16)]
    # An event hands a waiting mirror out early: its place stays where it was.
    early = names[-1]
    result = await kit.run("status", early)
    assert isinstance(result, RequeueAfter) and abs(kit.clock() + result.seconds - turns[early]) < 1e-9
    passes = 0
    for name, turn in sorted(turns.items(), key=lambda item: item[1]):
        kit.clock.now = turn
        kit.kube.calls.clear()
        passes += 1
        assert await kit.run("status", name) == Done() and len(kit.kube.writes()) == 1, name
    assert passes == 15
    assert all(status_of(kit, name).get("observedGeneration") == 1 for name in names)


async def test_a_new_mirror_whose_children_are_still_missing_is_not_a_problem() -> None:
    kit = Kit()
    kit.kube.put(mirror("hub", nodeConfig={"enabled": False}))
    assert isinstance(await kit.run("status", "hub"), RequeueAfter), "no status yet: it is progressing normally"
    kit.clock.advance(61)  # past the first-status delay: progress, not a Warning
    assert await kit.run("status", "hub") == Done()
    assert ready(status_of(kit)) == ("False", "DeploymentMissing")
    assert kit.kube.events == []


async def test_a_mirror_whose_image_a_strict_mirror_holds_says_so_and_stops_saying_it() -> None:
    kit = Kit()
    # quay's pods come from docker.io (the default image); hub makes docker.io strict on the nodes.
    await serving_mirror(kit, "quay", upstream={"url": "https://quay.io"})
    strict = {"enabled": True, "fallback": "NeverContactUpstream"}
    kit.kube.put(mirror("hub", nodeConfig=strict, image="registry.corp.example/registry:3.0.0"))
    await kit.converge("hub")
    make_serving(kit, "hub")
    await kit.run("hosts")
    assert ("status", "quay") in kit.queued(), "the dependent mirror's status follows the strict mirror's arrival"
    await kit.run("status", "quay")
    cond = get_condition(status_of(kit, "quay").get("conditions"), "ImageIndependent")
    assert cond is not None and (cond["status"], cond["reason"]) == ("False", "ImageBehindStrictMirror"), cond
    assert "hub" in cond["message"] and "AllowUpstream" in cond["message"]
    assert ready(status_of(kit, "quay")) == ("True", "MirrorReady"), "a warning: the mirror serves now"
    assert get_condition(status_of(kit, "hub").get("conditions"), "ImageIndependent") is None, "hub's image is elsewhere"
    # The strict mirror relaxes: the dependency and its condition go.
    relaxed = mirror("hub", nodeConfig={"enabled": True, "fallback": "AllowUpstream"}, image="registry.corp.example/registry:3.0.0")
    relaxed["metadata"]["generation"] = 2  # as the API server counts a spec change
    kit.kube.put(relaxed)
    await kit.converge("hub")
    await kit.run("hosts")
    await kit.run("status", "quay")
    assert get_condition(status_of(kit, "quay").get("conditions"), "ImageIndependent") is None


async def test_cache_counters_are_progress_but_a_cache_state_change_is_written_at_once() -> None:
    kit = Kit()
    await serving_mirror(kit)
    await kit.run("status", "hub")
    rec = kit.ctx.records["hub"]
    rec.cache_status = CacheStatus(hits=1, misses=3, bytes_served=10, replicas=1, upstream_reachable=True)
    kit.kube.calls.clear()
    assert await kit.run("status", "hub") == Done(), "the cache's first figures are news"
    assert status_of(kit)["cache"]["misses"] == 3
    rec.cache_status = rec.cache_status.model_copy(update={"hits": 9, "bytes_served": 90})
    kit.kube.calls.clear()
    result = await kit.run("status", "hub")
    assert isinstance(result, RequeueAfter) and kit.kube.writes() == [], "more hits: progress, held back"
    rec.cache_status = rec.cache_status.model_copy(update={"stale_replicas": 1})
    assert await kit.run("status", "hub") == Done(), "a replica stopped answering: news"
    assert len(kit.kube.writes()) == 1
    assert (status_of(kit)["cache"]["staleReplicas"], status_of(kit)["cache"]["hits"]) == (1, 9)


async def test_a_new_mirror_whose_pods_report_cache_figures_is_written_at_once() -> None:
    kit = Kit()
    kit.kube.put(mirror("hub", nodeConfig={"enabled": False}))
    await kit.converge("hub")
    kit.ctx.record("hub").cache_status = CacheStatus(misses=2, replicas=1)
    assert await kit.run("status", "hub") == Done()
    assert status_of(kit)["cache"]["misses"] == 2


async def test_progress_of_a_converging_mirror_is_written_less_and_less_often_until_news() -> None:
    """A long rollout costs log2(duration) progress writes; Ready (news) is written at once and starts over."""
    kit = Kit()
    kit.kube.put(mirror("hub", nodeConfig={"enabled": False}))
    await kit.converge("hub")
    rec = kit.ctx.records["hub"]
    rec.cache_status = CacheStatus(hits=0, misses=1, replicas=1)
    assert await kit.run("status", "hub") == Done(), "the cache's first figures are news"
    assert ready(status_of(kit))[0] == "False"
    written = [kit.clock()]
    for hits in range(1, 8):
        rec.cache_status = rec.cache_status.model_copy(update={"hits": hits})  # progress only
        kit.kube.calls.clear()
        result = await kit.run("status", "hub")
        assert isinstance(result, RequeueAfter) and kit.kube.writes() == [], "progress waits"
        kit.clock.advance(result.seconds)
        assert await kit.run("status", "hub") == Done()
        assert len(kit.kube.writes()) == 1 and status_of(kit)["cache"]["hits"] == hits
        written.append(kit.clock())
    gaps = [round(b - a) for a, b in itertools.pairwise(written)]
    assert gaps == [60, 120, 240, 480, 960, 960, 960], gaps
    # Ready is news: written at once, and the spacing starts over.
    make_serving(kit)
    kit.kube.calls.clear()
    assert await kit.run("status", "hub") == Done() and len(kit.kube.writes()) == 1
    assert ready(status_of(kit)) == ("True", "MirrorReady")
    rec.cache_status = rec.cache_status.model_copy(update={"hits": 100})
    result = await kit.run("status", "hub")
    assert isinstance(result, RequeueAfter) and result.seconds <= 60
    kit.clock.advance(result.seconds)
    assert await kit.run("status", "hub") == Done() and status_of(kit)["cache"]["hits"] == 100
    # A Ready mirror's progress (cache counters, node counts) keeps the plain interval.
    for hits in (101, 102):
        rec.cache_status = rec.cache_status.model_copy(update={"hits": hits})
        result = await kit.run("status", "hub")
        assert isinstance(result, RequeueAfter) and result.seconds <= 60
        kit.clock.advance(result.seconds)
        assert await kit.run("status", "hub") == Done()


async def test_the_crds_default_status_counts_as_no_status_yet() -> None:
    """The API server shows a new mirror `status.observedGeneration: 0` (the CRD's default, so kstatus says in
    progress); the operator still treats it as a mirror without status: its first write waits as usual."""
    kit = Kit()
    body = mirror("hub", nodeConfig={"enabled": False})
    body["status"] = {**UNWRITTEN_STATUS, "conditions": [], "hosts": []}  # as the API server shows it, nested defaults too
    kit.kube.put(body)
    await kit.converge("hub")
    kit.kube.calls.clear()
    result = await kit.run("status", "hub")
    assert isinstance(result, RequeueAfter) and kit.kube.writes() == [], "no news: the first status waits"
    make_serving(kit)
    assert await kit.run("status", "hub") == Done()
    assert status_of(kit)["observedGeneration"] == 1 and ready(status_of(kit)) == ("True", "MirrorReady")


async def test_a_status_read_back_from_the_api_server_is_compared_by_value_not_by_key_order() -> None:
    """The API server returns a custom resource's maps with their keys sorted (Go's JSON encoder); a
    progress-only change must still wait. (Compared by repr, status.hosts never equalled its own
    rendering, so every progress change was written at once: 5.5 statuses per mirror at 500 mirrors.)"""
    kit = Kit()
    kit.kube.put(mirror("hub"))  # node configuration on, no nodes: Ready, with a host route
    await kit.converge("hub")
    make_serving(kit)
    assert await kit.run("status", "hub") == Done()
    assert status_of(kit)["hosts"] and ready(status_of(kit))[0] == "True"
    body = kit.kube.obj(c.KIND, None, "hub")
    assert body is not None
    body["status"] = json.loads(json.dumps(body["status"], sort_keys=True))
    kit.kube.put(body)
    dep = kit.kube.obj("Deployment", NS, "regmirror-hub")
    assert dep is not None
    dep["status"]["readyReplicas"] = 2  # a count changed: progress only
    kit.kube.put(dep)
    kit.kube.calls.clear()
    result = await kit.run("status", "hub")
    assert isinstance(result, RequeueAfter) and kit.kube.writes() == [], "progress waits, whatever the key order"


async def test_when_a_rollout_completes_the_statuses_that_can_flip_ready_go_before_the_backlog() -> None:
    """At 500 mirrors the last agent pod of a rollout makes a hundred mirrors Ready at once, while its pod
    events have queued progress passes of every other mirror: the flips are handed out first."""
    kit = Kit()
    kit.kube.put({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1", "labels": {}}, "status": {}})
    for name in ("a", "b", "c", "d"):
        kit.kube.put(mirror(name))
        await kit.admit(name)
        if name != "d":
            make_serving(kit, name)  # d's claim is not bound yet: its nodes' flip cannot make it Ready
    await kit.run("hosts")
    await kit.run("plan")
    await kit.run("rollout")  # the first accounting: no node configured yet
    for name in ("a", "b", "c", "d"):
        assert ready(status_of(kit, name)) == ("None", "None") and isinstance(await kit.run("status", name), RequeueAfter)
    queue = kit.manager.queue
    while len(queue):  # what the passes above queued; a worker took them
        queue.done(await queue.get())
    backlog = [("children", "c"), ("status", "b"), ("access", "c")]
    for key in backlog:
        queue.add(key)
    digest = kit.ctx.plan.digest
    assert digest
    labels = {c.LABEL_NAME: c.APP_NAME, c.LABEL_COMPONENT: "agent"}
    kit.kube.put(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": "agent-n1",
                "namespace": kit.settings.agent_namespace,
                "labels": labels,
                "annotations": {c.ANNOTATION_NODE_CONFIG_HASH: digest},
                "creationTimestamp": "2026-01-01T00:00:00Z",
            },
            "spec": {"nodeName": "n1"},
            "status": {
                "conditions": [{"type": "Ready", "status": "True"}],
                "containerStatuses": [{"ready": True, "state": {"running": {}}}],
            },
        }
    )
    await kit.sync()
    for pod in kit.manager.store.agent_pods().values():
        kit.ctx.nodes.applied[pod["node"]] = pod["digest"]  # what the pod watch's callback records
    assert await kit.run("rollout") == Done()
    kit.clock.advance(kit.settings.status_coalesce)
    order = [await queue.get() for _ in range(6)]
    assert order[:3] == [("status", "b"), ("status", "a"), ("status", "c")], "b's waiting key moved up, not added twice"
    assert order[3:] == [("children", "c"), ("access", "c"), ("status", "d")], "then the backlog, and d in its turn"
    for name in ("a", "b", "c"):
        assert await kit.run("status", name) == Done()
        assert ready(status_of(kit, name)) == ("True", "MirrorReady")
