"""The operator as a real process on the real control plane.

Create, update, drift, credentials, quiet period, restart and delete: each test
acts as an admin would (kubectl) and checks what an admin would see. Each test's
mirrors and Secrets come from the ``mirrors`` fixture, which deletes them in
teardown (waiting for their finalizers), so no test sees another's leftovers.
"""

from __future__ import annotations

import base64
import datetime
import json
import signal
import time
from typing import Any

from harness import LocalCluster, audit
from harness.children import child
from harness.objects import MirrorFactory
from harness.operator import (
    OPERATOR_NS,
    OPERATOR_USER,
    OperatorProcess,
    condition,
    get_mirror,
    mirror_body,
    wait_condition,
    wait_settled,
)
from harness.waiting import wait_for
from harness.watch import MirrorWatch, ResourceWatch, ready_of
from regmirror.naming import child_name
from regmirror.settings import Settings

#: The "0 writes in a quiet period" measurement: this long with nothing to do.
QUIET_SECONDS = 60


def registry_env(deployment: dict[str, Any]) -> dict[str, Any]:
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def config_yml(cluster: LocalCluster, name: str) -> str:
    cm = child(cluster, "configmap", name)
    assert cm is not None
    return str(next(iter(cm["data"].values())))


def test_mirror_becomes_ready_with_owned_children(cluster: LocalCluster, operator: OperatorProcess, mirrors: MirrorFactory) -> None:
    mirrors.create("hub")
    # kubectl wait is what admins and pipelines use.
    cluster.kubectl("wait", "--for=condition=Ready", "registrymirror/hub", "--timeout=120s", timeout=150)
    body = get_mirror(cluster, "hub")
    status = body["status"]
    assert status["observedGeneration"] == body["metadata"]["generation"]
    assert status["phase"] == "Ready"
    svc = child(cluster, "service", "hub")
    assert svc is not None
    assert status["endpoint"] == f"{svc['spec']['clusterIP']}:5000"
    assert status["serviceDNS"] == f"{child_name('hub')}.{OPERATOR_NS}.svc"
    assert status["storage"]["phase"] == "Bound"
    assert status["readyReplicas"] == 1
    for type_ in ("Ready", "Available", "StorageBound", "NodesConfigured"):
        cond = condition(body, type_)
        assert cond is not None and cond["status"] == "True", (type_, cond)
        assert cond["observedGeneration"] == body["metadata"]["generation"]
    assert condition(body, "Stalled")["status"] == "False"  # type: ignore[index]
    assert condition(body, "Reconciling")["status"] == "False"  # type: ignore[index]

    uid = body["metadata"]["uid"]
    for kind in ("deployment", "service", "configmap", "persistentvolumeclaim"):
        obj = child(cluster, kind, "hub")
        assert obj is not None, kind
        owners = obj["metadata"].get("ownerReferences", [])
        assert [o["uid"] for o in owners] == [uid], kind
        managers = {m["manager"] for m in obj["metadata"]["managedFields"]}
        assert "regmirror-operator" in managers, (kind, managers)

    table = cluster.kubectl("get", "registrymirrors").stdout
    row = next(line for line in table.splitlines() if line.startswith("hub "))
    nodes = len(cluster.fake_nodes())
    assert "https://registry-1.docker.io" in row and "True" in row and f"{nodes}/{nodes}" in row and status["endpoint"] in row


def test_a_mirror_on_object_storage_becomes_ready_with_two_spread_replicas(
    cluster: LocalCluster, operator: OperatorProcess, mirrors: MirrorFactory
) -> None:
    mirrors.secret("bucket-key", accessKey="AKIAEXAMPLE", secretKey="not-a-real-secret")
    s3 = {"endpoint": "http://s3.invalid:9000", "bucket": "mirrors", "credentialsSecretRef": {"name": "bucket-key"}}
    mirrors.create("shared", replicas=2, storage={"s3": s3})
    cluster.kubectl("wait", "--for=condition=Ready", "registrymirror/shared", "--timeout=120s", timeout=150)
    body = get_mirror(cluster, "shared")
    assert body["status"]["storage"] == {"phase": "ObjectStorage"}
    assert condition(body, "StorageBound")["reason"] == "ObjectStorage"  # type: ignore[index]
    assert body["status"]["readyReplicas"] == 2
    assert child(cluster, "persistentvolumeclaim", "shared") is None, "no claim: the replicas share the bucket"
    assert child(cluster, "poddisruptionbudget", "shared") is not None
    assert "not-a-real-secret" not in json.dumps(body)


def test_update_changes_deployment_and_config(cluster: LocalCluster, operator: OperatorProcess, mirrors: MirrorFactory) -> None:
    name = "upd"
    mirrors.create(name, storage={"ephemeral": True, "size": "2Gi"})
    wait_condition(cluster, name, "Ready", "True")
    mirrors.apply(
        mirror_body(
            name,
            storage={"ephemeral": True, "size": "2Gi"},
            replicas=2,
            cache={"ttl": "72h"},
            proxy={"httpsProxy": "http://proxy.corp:3128", "noProxy": "10.0.0.0/8,.svc"},
        ),
    )
    body = wait_for(
        lambda: (b := get_mirror(cluster, name))["status"].get("observedGeneration") == b["metadata"]["generation"] and b,
        what="observedGeneration to follow generation",
    )
    assert body["metadata"]["generation"] >= 2
    dep = wait_for(lambda: (d := child(cluster, "deployment", name)) and d["spec"]["replicas"] == 2 and d, what="replicas 2")
    env = registry_env(dep)
    assert env["HTTPS_PROXY"] == "http://proxy.corp:3128"
    assert env["NO_PROXY"] == "10.0.0.0/8,.svc"
    # The TTL is enforced by the cache sidecar (distribution's own blind TTL is off), so it lives in its policy.
    control = cluster.kubectl_json("get", "configmap", child_name(name), "-n", OPERATOR_NS)
    assert json.loads(control["data"]["cache.json"])["ttlSeconds"] == 72 * 3600
    wait_condition(cluster, name, "Ready", "True")
    assert get_mirror(cluster, name)["status"]["readyReplicas"] == 2


def test_drift_is_undone(cluster: LocalCluster, operator: OperatorProcess, mirrors: MirrorFactory) -> None:
    name = "drift"
    mirrors.create(name)
    wait_condition(cluster, name, "Ready", "True")
    old_svc = child(cluster, "service", name)
    assert old_svc is not None
    cluster.kubectl("delete", "service", child_name(name), "-n", OPERATOR_NS)
    cluster.kubectl("scale", "deployment", child_name(name), "-n", OPERATOR_NS, "--replicas=0")
    cluster.kubectl("patch", "configmap", child_name(name), "-n", OPERATOR_NS, "--type=merge", "-p", '{"data":{"config.yml":"hacked"}}')
    wait_for(
        lambda: (s := child(cluster, "service", name)) and s["metadata"]["uid"] != old_svc["metadata"]["uid"],
        timeout=15,
        what="the Service to be re-created",
    )
    wait_for(lambda: (d := child(cluster, "deployment", name)) and d["spec"]["replicas"] == 1, timeout=15, what="replicas restored")
    wait_for(lambda: "hacked" not in config_yml(cluster, name), timeout=15, what="config.yml restored")
    wait_condition(cluster, name, "Ready", "True")


def test_missing_secret_then_created(cluster: LocalCluster, operator: OperatorProcess, mirrors: MirrorFactory) -> None:
    name = "private"
    secret = "private-creds"
    mirrors.track("secret", secret)
    cluster.kubectl("delete", "secret", secret, "-n", OPERATOR_NS, check=False)
    mirrors.create(name, upstream={"url": "https://quay.io", "credentialsSecretRef": {"name": secret}})
    body = wait_condition(cluster, name, "Ready", "False", reason="CredentialsSecretMissing")
    assert condition(body, "Stalled")["status"] == "True"  # type: ignore[index]
    assert body["status"]["phase"] == "Failed"
    # Events about a cluster-scoped object live in `default`; the Event follows the status write.
    wait_for(
        lambda: cluster.kubectl(
            "get",
            "events",
            "-n",
            "default",
            "--field-selector",
            f"reason=CredentialsSecretMissing,involvedObject.name={name}",
            "-o",
            "name",
        ).stdout.strip(),
        timeout=10,
        what="a Warning Event about the missing Secret",
    )

    password = "s3cr3t-value-never-shown"
    cluster.kubectl(
        "create", "secret", "generic", secret, "-n", OPERATOR_NS, "--from-literal=username=robot", f"--from-literal=password={password}"
    )
    wait_condition(cluster, name, "Ready", "True")
    dep = child(cluster, "deployment", name)
    assert dep is not None
    env = registry_env(dep)
    assert env["REGISTRY_PROXY_PASSWORD"] == {"secretKeyRef": {"name": secret, "key": "password"}}
    first_hash = dep["spec"]["template"]["metadata"]["annotations"]["regmirror.dev/credentials-hash"]

    # Rotation rolls the pods (new hash on the template).
    rotated = base64.b64encode(b"rotated-password").decode()
    cluster.kubectl("patch", "secret", secret, "-n", OPERATOR_NS, "-p", f'{{"data":{{"password":"{rotated}"}}}}')
    wait_for(
        lambda: (
            child(cluster, "deployment", name)["spec"]["template"]["metadata"]["annotations"]["regmirror.dev/credentials-hash"]  # type: ignore[index]
            != first_hash
        ),
        timeout=15,
        what="credentials hash to change",
    )
    # Secrets never leak: not in any ConfigMap, status or the operator's log.
    everything = cluster.kubectl("get", "configmaps,registrymirrors,events", "-A", "-o", "yaml").stdout
    assert password not in everything and "rotated-password" not in everything
    assert password not in operator.logs()

    # Removing the Secret again: Ready=False, but the running Deployment keeps its last good configuration.
    cluster.kubectl("delete", "secret", secret, "-n", OPERATOR_NS)
    wait_condition(cluster, name, "Ready", "False", reason="CredentialsSecretMissing")
    dep_after = child(cluster, "deployment", name)
    assert dep_after is not None and dep_after["status"].get("readyReplicas") == 1
    assert condition(get_mirror(cluster, name), "Available")["status"] == "True"  # type: ignore[index]


def test_two_mirrors_for_one_host_are_ordered(cluster: LocalCluster, operator: OperatorProcess, mirrors: MirrorFactory) -> None:
    mirrors.create("order-b", upstream={"url": "https://mirror.gcr.io", "hosts": ["docker.io"]}, nodeConfig={"priority": 50})
    mirrors.create("order-a", upstream={"url": "https://registry-1.docker.io"}, nodeConfig={"priority": 10})
    mirrors.create("order-c", upstream={"url": "https://mirror.example.com", "hosts": ["docker.io"]}, nodeConfig={"priority": 50})
    for name in ("order-a", "order-b", "order-c"):
        wait_condition(cluster, name, "Ready", "True")
    expected = ["order-b", "order-c", "order-a"]  # priority 50 first (ties by name), then 10
    positions = []
    for name in expected:
        route = next(h for h in get_mirror(cluster, name)["status"]["hosts"] if h["host"] == "docker.io")
        # Every test deletes its mirrors in teardown: these three are the only docker.io mirrors.
        assert [m for m in route["mirrors"] if m.startswith("order-")] == expected
        assert route["mirrors"] == expected
        assert route["mirrors"][route["position"] - 1] == name
        positions.append(route["position"])
    assert positions == sorted(positions) and len(set(positions)) == 3


def test_quiet_period_has_no_writes(cluster: LocalCluster, operator: OperatorProcess, mirrors: MirrorFactory) -> None:
    mirrors.create("quiet")
    wait_condition(cluster, "quiet", "Ready", "True")
    # Converged: every node carries the mirror, the agent rollout is over, the status says so.
    wait_settled(cluster, ["quiet"])
    since = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    time.sleep(QUIET_SECONDS)  # the measurement itself: a fixed window in which nothing changes
    writes = audit.writes(cluster, OPERATOR_USER, since)
    assert writes == [], [f"{w['verb']} {w['objectRef']}" for w in writes]
    # Leader election's heartbeat is the one write a quiet cluster costs: a Lease renew per retry period.
    renews = audit.writes(cluster, OPERATOR_USER, since, resource="leases")
    assert {(w["verb"], w["objectRef"]["name"]) for w in renews} <= {("update", Settings().lease_name)}
    assert len(renews) <= QUIET_SECONDS / Settings().lease_retry_period + 2, audit.summary(renews)


def test_restart_resumes_without_duplicates_or_flapping(cluster: LocalCluster, operator: OperatorProcess, mirrors: MirrorFactory) -> None:
    mirrors.create("steady")
    before = wait_condition(cluster, "steady", "Ready", "True")
    ready_since = condition(before, "Ready")["lastTransitionTime"]  # type: ignore[index]

    with MirrorWatch(cluster, "steady") as watch:
        operator.stop(signal.SIGKILL)
        mirrors.create("midway")  # created while the operator is down
        operator.start()
        wait_condition(cluster, "midway", "Ready", "True")
        # The restarted operator's node rollout for "midway" is over: "steady" went through all of it.
        wait_settled(cluster, ["steady", "midway"])
    after = get_mirror(cluster, "steady")
    assert all(ready == "True" for _, ready, _ in watch.statuses), watch.statuses
    assert condition(after, "Ready")["lastTransitionTime"] == ready_since  # type: ignore[index]
    deployments = cluster.kubectl_json("get", "deployments", "-n", OPERATOR_NS, "-l", "regmirror.dev/mirror=midway")["items"]
    assert len(deployments) == 1


def test_delete_removes_children_and_keeps_a_retained_claim(
    cluster: LocalCluster, operator: OperatorProcess, mirrors: MirrorFactory
) -> None:
    mirrors.create("gone")
    mirrors.create("kept", storage={"size": "1Gi", "deletionPolicy": "Retain"})
    mirrors.track("persistentvolumeclaim", child_name("kept"))  # retained: ours to delete
    wait_condition(cluster, "gone", "Ready", "True")
    wait_condition(cluster, "kept", "Ready", "True")
    mirrors.delete("gone")
    mirrors.delete("kept")
    for kind in ("deployment", "service", "configmap", "persistentvolumeclaim"):
        wait_for(lambda k=kind: child(cluster, k, "gone") is None, timeout=60, what=f"{kind} of gone to be collected")
    wait_for(lambda: child(cluster, "deployment", "kept") is None, timeout=60, what="deployment of kept to be collected")
    pvc = child(cluster, "persistentvolumeclaim", "kept")
    assert pvc is not None and pvc["status"]["phase"] == "Bound"


def test_metrics_endpoint_reports_reconciles(cluster: LocalCluster, operator: OperatorProcess, mirrors: MirrorFactory) -> None:
    mirrors.create("metrics")
    wait_condition(cluster, "metrics", "Ready", "True")
    text = operator.metrics()
    assert 'regmirror_reconciles_total{outcome="success"}' in text
    assert "regmirror_mirrors_ready" in text
    assert get_mirror(cluster, "metrics")["status"]["phase"] == "Ready"


def kstatus(body: dict[str, Any]) -> str:
    """What kstatus (Flux's health checks, kpt) computes for a resource it has no specific rules for.

    The generic rules of sigs.k8s.io/cli-utils pkg/kstatus/status (generic.go): a missing
    status.observedGeneration counts as observed; Reconciling=True is InProgress, Stalled=True
    Failed; anything else Current.
    """
    meta, status = body["metadata"], body.get("status") or {}
    if meta.get("deletionTimestamp"):
        return "Terminating"
    if status.get("observedGeneration", meta.get("generation")) != meta.get("generation"):
        return "InProgress"
    conds = {cd.get("type"): cd.get("status") for cd in status.get("conditions") or []}
    if conds.get("Reconciling") == "True":
        return "InProgress"
    if conds.get("Stalled") == "True":
        return "Failed"
    return "Current"


def test_kstatus_never_calls_a_new_mirror_current_before_it_is_ready(
    cluster: LocalCluster, operator: OperatorProcess, mirrors: MirrorFactory
) -> None:
    """Flux waits for kstatus Current: from its first version on, a new mirror is InProgress until Ready."""
    with ResourceWatch(cluster) as watch:
        mirrors.create("kstatus")
        wait_condition(cluster, "kstatus", "Ready", "True", timeout=120)
        wait_for(lambda: any(ready_of(s.body)[0] == "True" for s in watch.versions("kstatus")), 30, "the watch to see Ready")
    versions = [s.body for s in watch.versions("kstatus")]
    first = versions[0].get("status") or {}
    assert (first.get("observedGeneration"), first.get("conditions")) == (0, []), "before the operator's first status: the CRD's default"
    early = [(kstatus(b), ready_of(b)) for b in versions if ready_of(b)[0] != "True"]
    assert early and all(state == "InProgress" for state, _ in early), early
    assert kstatus(versions[-1]) == "Current"
