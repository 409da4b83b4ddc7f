"""High availability in the rendered children: S3 storage, spread, the disruption budget, node-failure tolerations."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from regmirror import constants as c
from regmirror import naming
from regmirror.models import RegistryMirrorSpec
from regmirror.render import mirror as render_mirror
from regmirror.render.mirror import render_mirror_children

UID = "11111111-2222-3333-4444-555555555555"
NS = "regmirror-system"

S3 = {
    "endpoint": "https://s3.storage.svc:9000",
    "bucket": "mirrors",
    "region": "eu-central-1",
    "credentialsSecretRef": {"name": "bucket-key"},
    "caSecretRef": {"name": "bucket-ca", "key": "ca.crt"},
}


def make_spec(**overrides: Any) -> RegistryMirrorSpec:
    return RegistryMirrorSpec.model_validate({"upstream": {"url": "https://quay.io"}, **overrides})


def s3_spec(replicas: int = 2, **s3: Any) -> RegistryMirrorSpec:
    return make_spec(replicas=replicas, storage={"s3": {**S3, **s3}})


def by_kind(spec: RegistryMirrorSpec, name: str = "quay") -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for obj in render_mirror_children(name, UID, spec, NS):
        out[obj["kind"]] = obj
    return out


def pod_spec(objs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = objs["Deployment"]["spec"]["template"]["spec"]
    return result


def containers(objs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {ct["name"]: ct for ct in pod_spec(objs)["containers"]}


def env(ct: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in ct.get("env", [])}


# ------------------------------------------------------------------ the API


def test_s3_allows_more_than_one_replica_without_a_shared_volume() -> None:
    assert s3_spec(replicas=3).replicas == 3
    with pytest.raises(ValidationError, match=re.escape("needs storage.s3, storage.ephemeral or the ReadWriteMany")):
        make_spec(replicas=2)


@pytest.mark.parametrize(
    ("storage", "message"),
    [
        ({"ephemeral": True, "s3": {"bucket": "mirrors"}}, "choose one back-end"),
        ({"storageClassName": "fast", "s3": {"bucket": "mirrors"}}, "storageClassName is for a PersistentVolumeClaim"),
        ({"s3": {"bucket": "Not_A_Bucket"}}, "bucket"),
        ({"s3": {"bucket": "mirrors", "endpoint": "s3.example:9000"}}, "endpoint"),
        ({"s3": {"bucket": "mirrors", "rootDirectory": "a b"}}, "root_directory|rootDirectory"),
        ({"s3": {"bucket": "mirrors", "accessKey": "inline"}}, "accessKey|extra"),
    ],
)
def test_bad_s3_storage_is_rejected_naming_the_field(storage: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        make_spec(storage=storage)


def test_a_size_cap_on_a_bucket_is_refused_rather_than_ignored() -> None:
    with pytest.raises(ValidationError, match=re.escape("cache.maxSize cannot be enforced on storage.s3")):
        make_spec(storage={"s3": {"bucket": "mirrors"}}, cache={"maxSize": "5Gi"})


def test_the_crd_carries_the_same_rules() -> None:
    from regmirror.crd import render_crd

    schema = render_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    rules = " ".join(r["rule"] for r in schema["x-kubernetes-validations"])
    assert "has(self.storage.s3)" in rules and "self.cache.maxSize" in rules
    storage = schema["properties"]["storage"]
    assert any("self.ephemeral" in r["rule"] for r in storage["x-kubernetes-validations"])
    s3 = storage["properties"]["s3"]
    assert s3["required"] == ["bucket"]
    assert set(s3["properties"]) == {
        "endpoint",
        "bucket",
        "region",
        "rootDirectory",
        "forcePathStyle",
        "credentialsSecretRef",
        "caSecretRef",
    }
    assert set(s3["properties"]["credentialsSecretRef"]["properties"]) == {"name", "accessKeyKey", "secretKeyKey"}, "no inline key field"


# ------------------------------------------------------------------ the registry's config


def test_s3_config_shares_one_prefix_per_mirror_and_serves_blobs_itself() -> None:
    config = yaml.safe_load(by_kind(s3_spec())["ConfigMap"]["data"]["config.yml"])
    storage = config["storage"]
    assert "filesystem" not in storage
    assert storage["s3"] == {
        "bucket": "mirrors",
        "region": "eu-central-1",
        "regionendpoint": "https://s3.storage.svc:9000",
        "secure": True,
        "forcepathstyle": True,
        "rootdirectory": "/regmirror/quay",
    }
    assert storage["redirect"] == {"disable": True}, "a 307 to the bucket would bypass the front and need nodes to reach S3"
    assert storage["delete"] == {"enabled": True}
    assert "cache" not in storage
    assert config["health"]["storagedriver"]["enabled"] is True


def test_s3_plain_http_endpoint_and_explicit_prefix() -> None:
    config = yaml.safe_load(
        by_kind(s3_spec(endpoint="http://127.0.0.1:7070", rootDirectory="/team-a/hub/"))["ConfigMap"]["data"]["config.yml"]
    )
    assert config["storage"]["s3"]["secure"] is False
    assert config["storage"]["s3"]["rootdirectory"] == "/team-a/hub"


def test_two_mirrors_on_one_bucket_never_share_a_prefix() -> None:
    a = yaml.safe_load(by_kind(s3_spec(), "hub")["ConfigMap"]["data"]["config.yml"])["storage"]["s3"]["rootdirectory"]
    b = yaml.safe_load(by_kind(s3_spec(), "quay")["ConfigMap"]["data"]["config.yml"])["storage"]["s3"]["rootdirectory"]
    assert a != b


def test_s3_keys_reach_only_the_registry_through_secret_key_refs_and_the_ca_is_trusted() -> None:
    objs = by_kind(s3_spec())
    cts = containers(objs)
    reg = env(cts["registry"])
    assert reg[render_mirror.ENV_S3_ACCESS_KEY]["valueFrom"] == {"secretKeyRef": {"name": "bucket-key", "key": "accessKey"}}
    assert reg[render_mirror.ENV_S3_SECRET_KEY]["valueFrom"] == {"secretKeyRef": {"name": "bucket-key", "key": "secretKey"}}
    assert reg["SSL_CERT_DIR"]["value"] == f"/etc/ssl/certs:{render_mirror.STORAGE_CA_DIR}"
    mounts = {m["name"]: m for m in cts["registry"]["volumeMounts"]}
    assert mounts["storage-ca"] == {"name": "storage-ca", "mountPath": render_mirror.STORAGE_CA_DIR, "readOnly": True}
    for name, ct in cts.items():
        if name != "registry":
            assert not {render_mirror.ENV_S3_ACCESS_KEY, render_mirror.ENV_S3_SECRET_KEY} & env(ct).keys(), f"{name} gets no bucket key"


def test_both_cas_are_trusted_together() -> None:
    spec = make_spec(
        upstream={"url": "https://quay.io", "tls": {"caSecretRef": {"name": "up-ca", "key": "ca.crt"}}},
        storage={"s3": {**S3}},
    )
    value = env(containers(by_kind(spec))["registry"])["SSL_CERT_DIR"]["value"]
    assert value == f"/etc/ssl/certs:{render_mirror.UPSTREAM_CA_DIR}:{render_mirror.STORAGE_CA_DIR}"


def test_s3_mounts_no_claim_and_rolls_with_surge() -> None:
    objs = by_kind(s3_spec())
    assert "PersistentVolumeClaim" not in objs
    volumes = {v["name"]: v for v in pod_spec(objs)["volumes"]}
    assert volumes["storage"] == {"name": "storage", "emptyDir": {"sizeLimit": render_mirror.S3_SCRATCH_SIZE}}
    assert objs["Deployment"]["spec"]["strategy"]["type"] == "RollingUpdate"


def test_s3_turns_the_sidecars_eviction_off_and_liveness_does_not_follow_the_bucket() -> None:
    objs = by_kind(s3_spec())
    cts = containers(objs)
    args = cts["cache"]["args"]
    assert args[args.index("--eviction") + 1] == "off"
    assert json.loads(objs["ConfigMap"]["data"]["cache.json"])["capBytes"] == 0
    assert cts["registry"]["livenessProbe"]["tcpSocket"] == {"port": "metrics"}
    # Readiness still follows the bucket: distribution's storage check fails /debug/health with it.
    assert cts["registry"]["readinessProbe"]["httpGet"]["path"] == render_mirror.HEALTH_PATH
    # On a volume the sidecar still evicts and liveness still reads distribution's health.
    vol = containers(by_kind(make_spec()))
    assert "--eviction" not in vol["cache"]["args"]
    assert vol["registry"]["livenessProbe"]["httpGet"]["path"] == render_mirror.HEALTH_PATH


# ------------------------------------------------------------------ surviving a node


def test_replicas_spread_over_nodes_but_never_wait_for_a_dead_one() -> None:
    spread = pod_spec(by_kind(s3_spec()))["topologySpreadConstraints"]
    assert spread == [
        {
            "maxSkew": 1,
            "topologyKey": "kubernetes.io/hostname",
            "whenUnsatisfiable": "ScheduleAnyway",
            "labelSelector": {"matchLabels": naming.selector_labels("quay")},
            "matchLabelKeys": ["pod-template-hash"],
        }
    ]


def test_scaling_does_not_change_the_pod_template() -> None:
    one = by_kind(s3_spec(replicas=1))["Deployment"]["spec"]["template"]
    three = by_kind(s3_spec(replicas=3))["Deployment"]["spec"]["template"]
    assert one == three


def test_a_disruption_budget_only_with_more_than_one_replica() -> None:
    assert "PodDisruptionBudget" not in by_kind(make_spec())
    assert "PodDisruptionBudget" not in by_kind(s3_spec(replicas=1))
    objs = by_kind(s3_spec(replicas=3))
    pdb = objs["PodDisruptionBudget"]
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["metadata"]["name"] == naming.child_name("quay")
    assert pdb["metadata"]["ownerReferences"][0]["uid"] == UID
    assert pdb["spec"] == {
        "maxUnavailable": 1,
        "selector": {"matchLabels": naming.selector_labels("quay")},
        "unhealthyPodEvictionPolicy": "AlwaysAllow",
    }
    # The budget selects exactly the Deployment's pods.
    assert pdb["spec"]["selector"] == objs["Deployment"]["spec"]["selector"]
    kinds = [o["kind"] for o in render_mirror_children("quay", UID, s3_spec(replicas=2), NS)]
    assert kinds == ["ConfigMap", "Service", "PodDisruptionBudget", "Deployment"]


def test_a_replica_on_a_dead_node_is_replaced_after_30s_not_300s() -> None:
    tolerations = pod_spec(by_kind(make_spec()))["tolerations"]
    assert {(t["key"], t["effect"], t["tolerationSeconds"]) for t in tolerations} == {
        ("node.kubernetes.io/not-ready", "NoExecute", render_mirror.NODE_FAILURE_TOLERATION_SECONDS),
        ("node.kubernetes.io/unreachable", "NoExecute", render_mirror.NODE_FAILURE_TOLERATION_SECONDS),
    }
    assert 10 <= render_mirror.NODE_FAILURE_TOLERATION_SECONDS <= 60


def test_the_users_own_toleration_for_a_failure_taint_wins() -> None:
    mine = {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 120}
    other = {"key": "dedicated", "operator": "Equal", "value": "infra", "effect": "NoSchedule"}
    tolerations = pod_spec(by_kind(make_spec(tolerations=[mine, other])))["tolerations"]
    unreachable = [t for t in tolerations if t.get("key") == "node.kubernetes.io/unreachable"]
    assert unreachable == [mine]
    assert other in tolerations
    assert next(t for t in tolerations if t.get("key") == "node.kubernetes.io/not-ready")["tolerationSeconds"] == 30


@settings(max_examples=60, deadline=None)
@given(
    replicas=st.integers(min_value=0, max_value=20),
    backend=st.sampled_from(["pvc", "rwx", "ephemeral", "s3"]),
)
def test_every_valid_storage_and_replica_count_renders_a_consistent_set(replicas: int, backend: str) -> None:
    storage: dict[str, Any] = {
        "pvc": {},
        "rwx": {"accessModes": ["ReadWriteMany"]},
        "ephemeral": {"ephemeral": True},
        "s3": {"s3": {"bucket": "mirrors"}},
    }[backend]
    try:
        spec = make_spec(replicas=replicas, storage=storage)
    except ValidationError:
        assert replicas > 1 and backend == "pvc", "only more than one replica on a ReadWriteOnce claim is refused"
        return
    objs = render_mirror_children("quay", UID, spec, NS)
    kinds = [o["kind"] for o in objs]
    assert ("PersistentVolumeClaim" in kinds) == (backend in ("pvc", "rwx"))
    assert ("PodDisruptionBudget" in kinds) == (replicas > 1)
    deployment = objs[-1]
    assert deployment["kind"] == "Deployment" and deployment["spec"]["replicas"] == replicas
    storage_volume = next(v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == "storage")
    assert ("persistentVolumeClaim" in storage_volume) == (backend in ("pvc", "rwx"))
    config = yaml.safe_load(objs[0]["data"]["config.yml"])
    assert set(config["storage"]) & {"s3", "filesystem"} == ({"s3"} if backend == "s3" else {"filesystem"})
    # A single-attach claim must never surge a second pod onto it.
    surge = deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    assert surge == (backend != "pvc")
    assert c.REGISTRY_STORAGE_PATH in json.dumps(deployment)


# ------------------------------------------------------------------ a replica being deleted


def test_a_deleted_replica_keeps_serving_while_the_service_forgets_it_then_drains() -> None:
    objs = by_kind(s3_spec())
    cts = containers(objs)
    for name in render_mirror.DELAYED_SHUTDOWN_CONTAINERS:
        assert cts[name]["lifecycle"] == {"preStop": {"sleep": {"seconds": render_mirror.SHUTDOWN_DELAY_SECONDS}}}, name
    assert "lifecycle" not in cts["front-stats"]
    config = yaml.safe_load(objs["ConfigMap"]["data"]["config.yml"])
    assert config["http"]["draintimeout"] == f"{render_mirror.DRAIN_SECONDS}s"
    grace = pod_spec(objs)["terminationGracePeriodSeconds"]
    assert grace > render_mirror.SHUTDOWN_DELAY_SECONDS + render_mirror.DRAIN_SECONDS, "the kubelet must not SIGKILL a draining registry"


def test_no_shutdown_delay_where_no_other_pod_serves_meanwhile() -> None:
    # ReadWriteOnce: Recreate. The old pod has left the Service and the new one waits for it.
    cts = containers(by_kind(make_spec()))
    assert all("lifecycle" not in ct for ct in cts.values())
    for storage in ({"ephemeral": True}, {"accessModes": ["ReadWriteMany"]}, {"s3": {"bucket": "mirrors"}}):
        assert "lifecycle" in containers(by_kind(make_spec(storage=storage)))["registry"], storage
