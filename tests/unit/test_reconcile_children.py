"""The children reconciler against the fake client: what it writes, when it does not, and how it fails."""

from __future__ import annotations

import base64
from typing import Any

from controller_kit import NS, Kit, mirror
from fakekube import api_error

from regmirror import constants as c
from regmirror import naming
from regmirror.controller.state import Done, RequeueAfter, Terminal, Transient


def child(kit: Kit, kind: str, name: str) -> dict[str, Any] | None:
    return kit.kube.obj(kind, NS, f"regmirror-{name}")


async def new_mirror(kit: Kit, name: str = "hub", **spec: Any) -> None:
    kit.kube.put(mirror(name, **spec))
    await kit.sync()


async def test_creates_the_service_first_then_the_rest_and_the_finalizer() -> None:
    kit = Kit()
    await new_mirror(kit)
    assert await kit.run("children", "hub") == Done()
    writes = [w[1] for w in kit.kube.writes()]
    # The finalizer and every child the pods need go out together; the Deployment only after them. One
    # ConfigMap holds the registry's config and the cache sidecar's inputs: one write, not two.
    assert sorted(writes[:4]) == sorted([c.KIND, "Service", "ConfigMap", "PersistentVolumeClaim"])
    assert writes[4:] == ["Deployment"]
    assert kit.kube.obj(c.KIND, None, "hub")["metadata"]["finalizers"] == [c.FINALIZER]  # type: ignore[index]
    assert ("plan", "") in kit.queued(), "a new ClusterIP queues the node plan"
    owners = child(kit, "Deployment", "hub")["metadata"]["ownerReferences"]  # type: ignore[index]
    assert owners[0]["name"] == "hub"


async def test_an_unchanged_cluster_costs_no_request() -> None:
    kit = Kit()
    await new_mirror(kit)
    await kit.run("children", "hub")
    await kit.run("children", "hub")
    kit.kube.calls.clear()
    assert await kit.run("children", "hub") == Done()
    assert kit.kube.writes() == []


async def test_the_cache_configmap_of_an_earlier_version_is_deleted_once_its_keys_moved() -> None:
    kit = Kit()
    await new_mirror(kit)
    await kit.run("children", "hub")
    uid = kit.kube.obj(c.KIND, None, "hub")["metadata"]["uid"]  # type: ignore[index]
    legacy = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": "regmirror-hub.cache",
            "namespace": NS,
            "labels": naming.labels("hub"),
            "ownerReferences": [{"apiVersion": c.API_VERSION, "kind": c.KIND, "name": "hub", "uid": uid, "controller": True}],
        },
        "data": {"pins.json": "[]"},
    }
    kit.kube.put(legacy)
    await kit.sync()
    kit.kube.calls.clear()
    assert await kit.run("children", "hub") == Done()
    assert kit.kube.obj("ConfigMap", NS, "regmirror-hub.cache") is None
    assert [w[:2] for w in kit.kube.writes()] == [("delete", "ConfigMap")]
    cm = child(kit, "ConfigMap", "hub")
    assert cm is not None and {"config.yml", "cache.json", "pins.json", "invalidate.json"} <= set(cm["data"])
    volumes = child(kit, "Deployment", "hub")["spec"]["template"]["spec"]["volumes"]  # type: ignore[index]
    assert all((v.get("configMap") or {}).get("name") in (None, "regmirror-hub") for v in volumes)
    await kit.sync()
    kit.kube.calls.clear()
    assert await kit.run("children", "hub") == Done()
    assert kit.kube.writes() == [], "nothing left to delete"


async def test_drift_of_a_field_we_own_is_undone() -> None:
    kit = Kit()
    await new_mirror(kit)
    await kit.run("children", "hub")
    await kit.run("children", "hub")
    dep = child(kit, "Deployment", "hub")
    assert dep is not None
    dep["spec"]["replicas"] = 0
    dep["metadata"]["labels"].pop(c.LABEL_MANAGED_BY)  # a child that lost its label is still ours
    kit.kube.put(dep)
    kit.kube.remove("Service", NS, "regmirror-hub")
    await kit.run("children", "hub")
    await kit.run("children", "hub")
    assert child(kit, "Service", "hub") is not None
    assert child(kit, "Deployment", "hub")["spec"]["replicas"] == 1  # type: ignore[index]


async def test_fields_another_manager_adds_cost_no_write() -> None:
    kit = Kit()
    await new_mirror(kit)
    await kit.run("children", "hub")
    await kit.run("children", "hub")
    dep = child(kit, "Deployment", "hub")
    assert dep is not None
    dep["spec"]["template"]["spec"]["containers"][0]["env"].append({"name": "INJECTED_BY_WEBHOOK", "value": "1"})
    dep["spec"]["template"]["metadata"].setdefault("annotations", {})["mesh/inject"] = "true"
    kit.kube.put(dep)
    svc = child(kit, "Service", "hub")
    assert svc is not None
    svc["spec"]["ports"].append({"name": "admin-extra", "port": 9999, "protocol": "TCP"})
    kit.kube.put(svc)
    kit.kube.calls.clear()
    for _ in range(3):
        assert await kit.run("children", "hub") == Done()
    assert kit.kube.writes() == []


async def test_a_field_fight_is_won_back_with_growing_pauses() -> None:
    kit = Kit()
    await new_mirror(kit)
    await kit.run("children", "hub")
    await kit.run("children", "hub")
    repairs = []
    for _ in range(6):
        dep = child(kit, "Deployment", "hub")
        assert dep is not None
        dep["spec"]["replicas"] = 3  # another manager forces the field, again and again
        kit.kube.put(dep)
        kit.kube.calls.clear()
        result = await kit.run("children", "hub")
        repairs.append((len(kit.kube.writes()), result))
    # The first repair at once; then each waits (1 s, 2 s, 4 s...) instead of answering every event.
    assert repairs[0][0] == 1
    assert repairs[1][0] == 0 and isinstance(repairs[1][1], RequeueAfter)
    kit.clock.advance(repairs[1][1].seconds)  # type: ignore[union-attr]
    kit.kube.calls.clear()
    await kit.run("children", "hub")
    assert len(kit.kube.writes()) == 1
    assert child(kit, "Deployment", "hub")["spec"]["replicas"] == 1  # type: ignore[index]


async def test_seeing_our_own_repair_does_not_restart_the_fight() -> None:
    """A co-owner forces a field every 3 s; between its writes other events make us look at the object and see our value."""
    kit = Kit()
    await new_mirror(kit)
    await kit.run("children", "hub")
    await kit.run("children", "hub")
    writes = 0
    for _ in range(20):  # 60 s of intrusions
        dep = child(kit, "Deployment", "hub")
        assert dep is not None
        dep["spec"]["replicas"] = 3
        kit.kube.put(dep)
        for _event in ("the intruder's", "another of the mirror's"):  # the second may find the object ours again
            kit.kube.calls.clear()
            await kit.run("children", "hub")
            writes += len(kit.kube.writes())
            kit.clock.advance(1.5)
    assert writes <= 8, f"{writes} repairs against 20 intrusions in 60 s: the pauses must grow, not restart"
    # Left alone long enough, the fight is forgotten: the next drift is repaired at once.
    kit.clock.advance(3600)
    for _ in range(2):
        kit.kube.calls.clear()
        await kit.run("children", "hub")
    dep = child(kit, "Deployment", "hub")
    assert dep is not None and dep["spec"]["replicas"] == 1
    kit.clock.advance(3600)
    await kit.run("children", "hub")  # sees our value after the quiet hour: forgets
    dep["spec"]["replicas"] = 3
    kit.kube.put(dep)
    kit.kube.calls.clear()
    await kit.run("children", "hub")
    assert len(kit.kube.writes()) == 1, "a new fight starts with an immediate repair"


async def test_a_rejected_child_reports_the_api_servers_field_error_and_stops_until_the_spec_changes() -> None:
    kit = Kit()
    await new_mirror(kit, replicas=1)
    field_error = (
        "spec.template.spec.containers[0].resources.requests",
        'Invalid value: "64Gi": must be less than or equal to memory limit of 4Gi',
    )
    kit.kube.fail("apply", api_error(422, 'Deployment.apps "regmirror-hub" is invalid', causes=[field_error]), kind="Deployment")
    result = await kit.run("children", "hub")
    assert isinstance(result, Terminal)
    err = kit.ctx.records["hub"].config_error
    assert err is not None and err.reason == "ApplyRejected"
    assert 'spec.template.spec.containers[0].resources.requests: Invalid value: "64Gi"' in err.message
    assert ("status", "hub") in kit.queued()
    kit.kube.calls.clear()
    for _ in range(3):  # events about other children do not start a retry loop
        assert isinstance(await kit.run("children", "hub"), Terminal)
    assert kit.kube.writes() == []
    body = kit.kube.obj(c.KIND, None, "hub")
    assert body is not None
    body["spec"]["cache"] = {"ttl": "1h"}
    body["metadata"]["generation"] = 2
    kit.kube.put(body)
    assert await kit.run("children", "hub") == Done(), "a new generation is tried again"
    assert kit.ctx.records["hub"].config_error is None


async def test_transient_failures_are_retried_and_not_reported_at_first() -> None:
    kit = Kit()
    await new_mirror(kit)
    for error in (api_error(500), api_error(429, retry_after=2), api_error(0, "no answer within the request timeout"), api_error(409)):
        kit.kube.fail("apply", error, kind="Service")
        result = await kit.run("children", "hub")
        assert isinstance(result, Transient), error
        rec = kit.ctx.records["hub"]
        assert rec.config_error is None, "an API hiccup is not a configuration fault"
        assert rec.repair.error is not None and rec.repair.error.transient
    assert await kit.run("children", "hub") == Done()
    assert kit.ctx.records["hub"].repair.error is None, "success clears it"


async def test_a_failing_child_of_the_first_wave_keeps_the_deployment_back_and_keeps_what_did_go_out() -> None:
    kit = Kit()
    await new_mirror(kit, access={"networkPolicy": {"enabled": True}})
    kit.kube.fail("apply", api_error(500), kind="NetworkPolicy")
    assert isinstance(await kit.run("children", "hub"), Transient)
    assert child(kit, "Deployment", "hub") is None, "no pod may start before the policy that guards it"
    assert child(kit, "Service", "hub") is not None and child(kit, "PersistentVolumeClaim", "hub") is not None
    kit.kube.calls.clear()
    assert await kit.run("children", "hub") == Done()
    assert [w[1] for w in kit.kube.writes()] == ["NetworkPolicy", "Deployment"], "the rest was recorded: only the missing ones"

    kit = Kit()
    await new_mirror(kit)
    kit.kube.fail("apply", api_error(500), kind="Service")
    kit.kube.fail(
        "apply",
        api_error(422, 'PersistentVolumeClaim "regmirror-hub" is invalid', causes=[("spec.resources", "bad")]),
        kind="PersistentVolumeClaim",
    )
    result = await kit.run("children", "hub")
    assert isinstance(result, Terminal), "a rejection is the user's to fix, whatever else failed beside it"
    err = kit.ctx.records["hub"].config_error
    assert err is not None and "PersistentVolumeClaim" in err.message and "spec.resources: bad" in err.message


async def test_forbidden_is_a_repair_that_needs_someone() -> None:
    kit = Kit()
    await new_mirror(kit)
    kit.kube.fail("apply", api_error(403, 'services "regmirror-hub" is forbidden'), kind="Service")
    assert isinstance(await kit.run("children", "hub"), Transient)
    repair = kit.ctx.records["hub"].repair.error
    assert repair is not None and not repair.transient and repair.reason == "ApplyForbidden"
    assert ("status", "hub") in kit.manager.queue._queued, "someone must act: the status pass is queued at once, not after the grace"


async def test_a_missing_secret_is_a_configuration_error_until_it_appears() -> None:
    kit = Kit()
    await new_mirror(kit, upstream={"url": "https://quay.io", "credentialsSecretRef": {"name": "creds"}})
    assert isinstance(await kit.run("children", "hub"), Terminal)
    err = kit.ctx.records["hub"].config_error
    assert err is not None and err.reason == "CredentialsSecretMissing"
    assert not any(w[1] in ("Deployment", "Service") for w in kit.kube.writes())
    data = {"username": base64.b64encode(b"robot").decode(), "password": base64.b64encode(b"pw").decode()}
    kit.kube.put({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "creds", "namespace": NS}, "data": data})
    checked = []
    kit.ctx.on_credentials = lambda name, spec, creds: checked.append((name, creds))
    kit.manager.queue._due.clear()
    await kit.run("children", "hub")
    await kit.run("children", "hub")
    assert kit.ctx.records["hub"].config_error is None
    assert ("plan", "") in kit.queued(), "the repaired mirror's node-plan entry follows"
    assert checked and checked[0][0] == "hub", "the upstream check is started off the reconcile path"
    dep = child(kit, "Deployment", "hub")
    assert dep is not None and "pw" not in str(dep) and "cm9ib3Q" not in str(dep)


async def test_an_invalid_spec_is_terminal_without_any_write() -> None:
    kit = Kit()
    await new_mirror(kit, replicas=-3)
    result = await kit.run("children", "hub")
    assert isinstance(result, Terminal) and "spec.replicas" in result.error
    assert [w[1] for w in kit.kube.writes()] == [c.KIND], "only the finalizer"


async def test_deletion_waits_for_the_nodes_then_releases_the_finalizer() -> None:
    kit = Kit()
    await new_mirror(kit)
    await kit.converge("hub")
    body = kit.kube.obj(c.KIND, None, "hub")
    assert body is not None
    body["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    kit.kube.put(body)
    result = await kit.run("children", "hub")
    assert isinstance(result, RequeueAfter), "waiting is normal: requeue, not an error"
    kit.clock.advance(5)
    await kit.run("plan")
    await kit.run("rollout")
    # No nodes in this cluster: once the plan without the mirror is out, nothing is waited for.
    assert await kit.run("children", "hub") == Done()
    assert kit.kube.obj(c.KIND, None, "hub") is None


async def test_the_rendering_is_kept_while_a_mirror_converges_and_dropped_once_it_is_ready() -> None:
    kit = Kit()
    await new_mirror(kit)
    await kit.run("children", "hub")
    assert await kit.run("children", "hub") == Done()
    assert kit.ctx.records["hub"].rendered is not None, "events keep coming while it converges: rendered once"
    body = kit.kube.obj(c.KIND, None, "hub")
    assert body is not None
    body["status"] = {"conditions": [{"type": "Ready", "status": "True", "reason": "MirrorReady"}]}
    kit.kube.put(body)
    kit.kube.calls.clear()
    assert await kit.run("children", "hub") == Done()
    assert kit.kube.writes() == []
    assert kit.ctx.records["hub"].rendered is None, "a Ready mirror with nothing to apply keeps no rendering"
    dep = child(kit, "Deployment", "hub")
    assert dep is not None
    dep["spec"]["replicas"] = 0
    kit.kube.put(dep)
    await kit.run("children", "hub")
    assert child(kit, "Deployment", "hub")["spec"]["replicas"] == 1, "drift of a Ready mirror is still undone"  # type: ignore[index]
