"""Rendered children of a mirror and the node agent: what a user and the cluster would see."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

import pytest
import yaml

from regmirror import constants as c
from regmirror import naming
from regmirror.models import RegistryMirrorSpec
from regmirror.nodeplan import build_node_plan, mirror_entry
from regmirror.offline import dump_yaml
from regmirror.render.agent import render_agent_daemonset, render_node_config_map
from regmirror.render.mirror import config_hash, render_mirror_children, render_registry_config

UID = "11111111-2222-3333-4444-555555555555"
NS = "regmirror-system"
PLANTED_PASSWORD = "s3cr3t-Planted-P4ssw0rd"


def make_spec(**overrides: Any) -> RegistryMirrorSpec:
    return RegistryMirrorSpec.model_validate({"upstream": {"url": "https://quay.io"}, **overrides})


def children(spec: RegistryMirrorSpec, **kw: Any) -> dict[str, dict[str, Any]]:
    """By kind (one ConfigMap: the registry's and the front's configuration, the cache sidecar's live inputs)."""
    out: dict[str, dict[str, Any]] = {}
    for obj in render_mirror_children("quay", UID, spec, NS, **kw):
        out[obj["kind"]] = obj
    return out


def container(objs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = objs["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    return result


def env_of(objs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container(objs)["env"]}


def registry_config(objs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(objs["ConfigMap"]["data"]["config.yml"])
    return config


def test_children_in_apply_order_with_common_metadata() -> None:
    objs = render_mirror_children("quay", UID, make_spec(), NS)
    assert [o["kind"] for o in objs] == ["ConfigMap", "PersistentVolumeClaim", "Service", "Deployment"]
    for obj in objs:
        meta = obj["metadata"]
        assert meta["name"] == naming.child_name("quay")
        assert meta["namespace"] == NS
        assert meta["labels"] == naming.labels("quay")
        assert meta["ownerReferences"] == [
            {"apiVersion": c.API_VERSION, "kind": c.KIND, "name": "quay", "uid": UID, "controller": True, "blockOwnerDeletion": True}
        ]


def test_rendering_is_deterministic() -> None:
    spec = make_spec(proxy={"httpProxy": "http://p:3128"})
    assert dump_yaml(render_mirror_children("quay", UID, spec, NS)) == dump_yaml(render_mirror_children("quay", UID, spec, NS))


def test_registry_config_proxy_mode() -> None:
    config = registry_config(children(make_spec(cache={"ttl": "24h"})))
    assert config["version"] == "0.1"
    # distribution's own TTL scheduler is off: it would delete what running pods use. The
    # sidecar enforces cache.ttl (with pins) from the live ConfigMap instead.
    assert config["proxy"] == {"remoteurl": "https://quay.io", "ttl": "0"}
    assert json.loads(children(make_spec(cache={"ttl": "24h"}))["ConfigMap"]["data"]["cache.json"])["ttlSeconds"] == 86400
    assert "cache" not in config["storage"], "no blobdescriptor cache: evicted blobs must read as unknown"
    assert config["storage"]["filesystem"]["rootdirectory"] == c.REGISTRY_STORAGE_PATH
    assert config["storage"]["delete"] == {"enabled": True}
    assert config["http"]["addr"] == "127.0.0.1:5002", "behind the cache front, on the pod's loopback only"
    assert config["http"]["debug"] == {"addr": ":5001", "prometheus": {"enabled": True, "path": "/metrics"}}
    assert config["log"]["formatter"] == "json"
    assert config["health"]["storagedriver"]["enabled"] is True
    assert "tls" not in config["http"]


def test_ttl_zero_stays_a_string_for_go_durations() -> None:
    assert "ttl: '0'" in render_registry_config(make_spec(cache={"ttl": "0"}))


def test_proxy_env_reaches_the_container_in_both_cases() -> None:
    env = env_of(children(make_spec(proxy={"httpProxy": "http://p:3128", "httpsProxy": "http://p:3129", "noProxy": "10.0.0.0/8,.svc"})))
    assert env["HTTP_PROXY"]["value"] == env["http_proxy"]["value"] == "http://p:3128"
    assert env["HTTPS_PROXY"]["value"] == env["https_proxy"]["value"] == "http://p:3129"
    assert env["NO_PROXY"]["value"] == env["no_proxy"]["value"] == "10.0.0.0/8,.svc"


def test_no_proxy_env_without_proxy() -> None:
    env = env_of(children(make_spec()))
    assert not {"HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "REGISTRY_PROXY_USERNAME", "REGISTRY_PROXY_PASSWORD"} & env.keys()


def test_credentials_only_through_secret_key_refs() -> None:
    spec = make_spec(
        upstream={"url": "https://quay.io", "credentialsSecretRef": {"name": "quay-creds", "usernameKey": "user", "passwordKey": "token"}}
    )
    objs = children(spec, credentials_hash="abc")
    env = env_of(objs)
    assert env["REGISTRY_PROXY_USERNAME"] == {
        "name": "REGISTRY_PROXY_USERNAME",
        "valueFrom": {"secretKeyRef": {"name": "quay-creds", "key": "user"}},
    }
    assert env["REGISTRY_PROXY_PASSWORD"] == {
        "name": "REGISTRY_PROXY_PASSWORD",
        "valueFrom": {"secretKeyRef": {"name": "quay-creds", "key": "token"}},
    }
    config = registry_config(objs)
    assert "username" not in config["proxy"] and "password" not in config["proxy"]


PLANTED_S3_SECRET_KEY = "wJalrXUtnFEMI/Planted/S3+Secret"


@pytest.mark.parametrize("bucket", [False, True], ids=["volume", "s3"])
def test_planted_credential_never_appears_in_any_rendered_object(bucket: bool) -> None:
    storage = {"s3": {"bucket": "mirrors", "credentialsSecretRef": {"name": "bucket-key"}}} if bucket else {}
    spec = make_spec(upstream={"url": "https://quay.io", "credentialsSecretRef": {"name": "quay-creds"}}, storage=storage)
    # What the operator derives from the Secrets: a hash, never the values.
    creds_hash = hashlib.sha256((PLANTED_PASSWORD + PLANTED_S3_SECRET_KEY).encode()).hexdigest()[:16]
    objs = render_mirror_children("quay", UID, spec, NS, credentials_hash=creds_hash)
    plan = build_node_plan([mirror_entry("quay", spec, "10.96.0.20")])
    objs += [render_node_config_map(plan, c.AGENT_NAMESPACE), render_agent_daemonset(plan, c.AGENT_NAMESPACE, "img")]
    text = dump_yaml(objs) + json.dumps(objs)
    for planted in (PLANTED_PASSWORD, PLANTED_S3_SECRET_KEY):
        for form in (planted, base64.b64encode(planted.encode()).decode()):
            assert form not in text
    assert all(obj["kind"] != "Secret" for obj in objs)
    # No ConfigMap even names a credential: distribution gets them from Secret-backed env vars only.
    for cm in (o for o in objs if o["kind"] == "ConfigMap"):
        data = json.dumps(cm["data"]).lower()
        assert not any(word in data for word in ("password", "accesskey", "secretkey")), cm["metadata"]["name"]


def test_credentials_hash_changes_the_pod_template() -> None:
    spec = make_spec(upstream={"url": "https://quay.io", "credentialsSecretRef": {"name": "quay-creds"}})
    a = children(spec, credentials_hash="aaaa")["Deployment"]["spec"]["template"]
    b = children(spec, credentials_hash="bbbb")["Deployment"]["spec"]["template"]
    assert a != b
    assert b["metadata"]["annotations"][c.ANNOTATION_CREDENTIALS_HASH] == "bbbb"
    none = children(spec)["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert c.ANNOTATION_CREDENTIALS_HASH not in none


def test_config_hash_follows_the_config() -> None:
    def template_hash(objs: dict[str, dict[str, Any]]) -> str:
        return str(objs["Deployment"]["spec"]["template"]["metadata"]["annotations"][c.ANNOTATION_CONFIG_HASH])

    a, b = children(make_spec(cache={"tagFreshness": "0"})), children(make_spec(cache={"tagFreshness": "10m"}))
    assert template_hash(a) != template_hash(b), "the front's VCL changed: the pod rolls"
    assert template_hash(a) == config_hash(a["ConfigMap"]["data"]["config.yml"] + a["ConfigMap"]["data"]["front.vcl"])
    assert len(template_hash(a)) == 16
    # The sidecar's live inputs (cap, TTL, prewarm) change without restarting the cache.
    live = children(make_spec(cache={"ttl": "1h", "maxSize": "5Gi"}, prewarm=[{"image": "org/app:v1"}]))
    assert template_hash(live) == template_hash(a)
    pinned = children(make_spec(cache={"tagFreshness": "0"}), pins=["sha256:" + "1" * 64], invalidations={"org/app:v1": "r1"})
    assert pinned["ConfigMap"]["data"]["pins.json"] != a["ConfigMap"]["data"]["pins.json"]
    assert pinned["Deployment"]["spec"]["template"] == a["Deployment"]["spec"]["template"], "pins and invalidations restart nothing"


def test_pvc_follows_storage_spec() -> None:
    pvc = children(make_spec(storage={"size": "20Gi", "storageClassName": "fast"}))["PersistentVolumeClaim"]
    assert pvc["spec"]["resources"] == {"requests": {"storage": "20Gi"}}
    assert pvc["spec"]["storageClassName"] == "fast"
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert pvc["metadata"]["labels"][c.LABEL_MIRROR] == "quay"
    assert "storageClassName" not in children(make_spec())["PersistentVolumeClaim"]["spec"]


def test_retained_pvc_has_no_owner_reference() -> None:
    objs = children(make_spec(storage={"deletionPolicy": "Retain"}))
    assert "ownerReferences" not in objs["PersistentVolumeClaim"]["metadata"]
    assert all("ownerReferences" in o["metadata"] for k, o in objs.items() if k != "PersistentVolumeClaim")


def test_ephemeral_storage_uses_an_empty_dir() -> None:
    objs = children(make_spec(storage={"ephemeral": True, "size": "5Gi"}, replicas=2))
    assert "PersistentVolumeClaim" not in objs
    volumes = {v["name"]: v for v in objs["Deployment"]["spec"]["template"]["spec"]["volumes"]}
    assert volumes["storage"] == {"name": "storage", "emptyDir": {"sizeLimit": "5Gi"}}
    assert objs["Deployment"]["spec"]["strategy"]["type"] == "RollingUpdate"
    assert objs["Deployment"]["spec"]["replicas"] == 2


@pytest.mark.parametrize(
    ("modes", "strategy"), [(["ReadWriteOnce"], "Recreate"), (["ReadWriteOncePod"], "Recreate"), (["ReadWriteMany"], "RollingUpdate")]
)
def test_strategy_follows_access_mode(modes: list[str], strategy: str) -> None:
    deployment = children(make_spec(storage={"accessModes": modes}))["Deployment"]
    assert deployment["spec"]["strategy"]["type"] == strategy
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["storage"]["persistentVolumeClaim"] == {"claimName": naming.child_name("quay")}


def test_tls_serves_https() -> None:
    objs = children(make_spec(service={"tls": {"secretName": "mirror-tls"}, "clusterIP": "10.96.0.50"}))
    assert registry_config(objs)["http"]["tls"] == {"certificate": "/etc/regmirror/tls/tls.crt", "key": "/etc/regmirror/tls/tls.key"}
    ctr = container(objs)
    # Readiness reads distribution's health on the debug port: /v2/ answers 401 under Restricted.
    assert ctr["readinessProbe"]["httpGet"] == {"path": "/debug/health", "port": 5001, "scheme": "HTTP"}
    assert ctr["livenessProbe"]["httpGet"] == {"path": "/debug/health", "port": 5001, "scheme": "HTTP"}
    volumes = {v["name"]: v for v in objs["Deployment"]["spec"]["template"]["spec"]["volumes"]}
    assert volumes["tls"]["secret"]["secretName"] == "mirror-tls"
    assert {"name": "tls", "mountPath": "/etc/regmirror/tls", "readOnly": True} in ctr["volumeMounts"]


def test_upstream_ca_is_added_to_the_system_roots() -> None:
    objs = children(make_spec(upstream={"url": "https://reg.corp", "tls": {"caSecretRef": {"name": "corp-ca", "key": "ca.pem"}}}))
    assert env_of(objs)["SSL_CERT_DIR"]["value"] == "/etc/ssl/certs:/etc/regmirror/upstream-ca"
    volumes = {v["name"]: v for v in objs["Deployment"]["spec"]["template"]["spec"]["volumes"]}
    assert volumes["upstream-ca"]["secret"] == {"secretName": "corp-ca", "items": [{"key": "ca.pem", "path": "ca.crt"}]}


def test_service_ports_and_fixed_cluster_ip() -> None:
    svc = children(make_spec(service={"port": 80}))["Service"]
    assert svc["spec"]["type"] == "ClusterIP"
    assert "clusterIP" not in svc["spec"]
    assert svc["spec"]["selector"] == naming.selector_labels("quay")
    assert [(p["name"], p["port"], p["targetPort"]) for p in svc["spec"]["ports"]] == [
        ("registry", 80, "registry"),
        ("metrics", 5001, "metrics"),
        ("cache", 5003, "cache"),
    ]
    spec = make_spec().model_copy(update={"service": make_spec().service.model_copy(update={"cluster_ip": "10.96.0.50"})})
    assert children(spec)["Service"]["spec"]["clusterIP"] == "10.96.0.50"


def test_deployment_pod_is_restricted() -> None:
    objs = children(make_spec())
    deployment = objs["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    assert deployment["spec"]["selector"] == {"matchLabels": naming.selector_labels("quay")}
    assert deployment["spec"]["template"]["metadata"]["labels"] == naming.labels("quay")
    assert pod["enableServiceLinks"] is False
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == pod["securityContext"]["fsGroup"] == 65532
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    ctr = container(objs)
    assert ctr["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
    }
    assert {"name": "tmp", "mountPath": "/tmp"} in ctr["volumeMounts"]
    assert ctr["args"] == ["serve", "/etc/distribution/config.yml"]
    assert {"name": "config", "mountPath": "/etc/distribution", "readOnly": True} in ctr["volumeMounts"]


def test_scheduling_fields_come_from_the_spec() -> None:
    affinity = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": [{"key": "k", "operator": "Exists"}]}]
            }
        }
    }
    objs = children(
        make_spec(
            nodeSelector={"pool": "infra"},
            tolerations=[{"key": "dedicated", "operator": "Equal", "value": "infra", "effect": "NoSchedule"}],
            affinity=affinity,
            priorityClassName="high",
            resources={"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "1Gi"}},
            image="registry.example/registry:2.8.3",
        )
    )
    pod = objs["Deployment"]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"pool": "infra"}
    # The user's tolerations first; the short node-failure ones follow (tests/unit/test_render_ha.py).
    assert pod["tolerations"][0] == {"key": "dedicated", "operator": "Equal", "value": "infra", "effect": "NoSchedule"}
    assert pod["affinity"] == affinity
    assert pod["priorityClassName"] == "high"
    assert container(objs)["resources"] == {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "1Gi"}}
    assert container(objs)["image"] == "registry.example/registry:2.8.3"


# ------------------------------------------------------------------ agent


def plan_for(*specs: tuple[str, RegistryMirrorSpec]) -> Any:
    return build_node_plan([mirror_entry(name, spec, f"10.96.0.{i + 10}") for i, (name, spec) in enumerate(specs)])


def test_node_config_map_holds_the_plan() -> None:
    plan = plan_for(("quay", make_spec()))
    cm = render_node_config_map(plan, c.AGENT_NAMESPACE)
    assert cm["metadata"]["name"] == c.NODE_CONFIG_NAME
    assert cm["data"] == {c.NODE_CONFIG_KEY: plan.to_json()}


def test_daemonset_hash_changes_with_the_plan() -> None:
    one = plan_for(("quay", make_spec()))
    two = plan_for(("quay", make_spec(nodeConfig={"priority": 5})))
    ds_one = render_agent_daemonset(one, c.AGENT_NAMESPACE, "img")
    ds_two = render_agent_daemonset(two, c.AGENT_NAMESPACE, "img")
    annotation_one = ds_one["spec"]["template"]["metadata"]["annotations"][c.ANNOTATION_NODE_CONFIG_HASH]
    assert annotation_one == one.digest()
    assert annotation_one != ds_two["spec"]["template"]["metadata"]["annotations"][c.ANNOTATION_NODE_CONFIG_HASH]
    assert ds_one == render_agent_daemonset(plan_for(("quay", make_spec())), c.AGENT_NAMESPACE, "img")


def test_daemonset_shape() -> None:
    ds = render_agent_daemonset(plan_for(("quay", make_spec())), "regmirror-node", "img:1", max_unavailable="25%")
    assert ds["metadata"]["name"] == c.AGENT_NAME
    assert ds["metadata"]["labels"] == naming.labels(None, component="agent")
    assert ds["spec"]["selector"] == {"matchLabels": naming.agent_selector_labels()}
    assert ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"] == "25%"
    pod = ds["spec"]["template"]["spec"]
    assert pod["tolerations"] == [{"operator": "Exists"}]
    assert pod["priorityClassName"] == "system-node-critical"
    assert pod["serviceAccountName"] == "regmirror-agent"
    ctr = pod["containers"][0]
    assert ctr["args"][:3] == ["agent", "--plan", "/etc/regmirror/plan/mirrors.json"]
    assert ctr["securityContext"]["privileged"] is False
    assert ctr["securityContext"]["runAsUser"] == 0
    # The connection guard (the default): the node's network namespace and NET_ADMIN, nothing more.
    assert ctr["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN"]}
    assert pod["hostNetwork"] is True and pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert "--guard-connections" in ctr["args"]
    assert ctr["securityContext"]["readOnlyRootFilesystem"] is True
    assert ctr["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert ctr["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert ctr["env"][0]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}


def test_daemonset_without_the_guard_has_no_capability_and_its_own_network() -> None:
    ds = render_agent_daemonset(plan_for(("quay", make_spec())), "regmirror-node", "img:1", guard_connections=False)
    pod = ds["spec"]["template"]["spec"]
    ctr = pod["containers"][0]
    assert ctr["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert "hostNetwork" not in pod and "dnsPolicy" not in pod
    assert "--guard-connections" not in ctr["args"]
    # The agent's own flags parse (the one place they are spelled out is the one the DaemonSet runs).
    from regmirror.agent import _parser

    assert _parser().parse_args(ds["spec"]["template"]["spec"]["containers"][0]["args"][1:]).guard_connections is False
    guarded = render_agent_daemonset(plan_for(("quay", make_spec())), "regmirror-node", "img:1")
    assert _parser().parse_args(guarded["spec"]["template"]["spec"]["containers"][0]["args"][1:]).guard_connections is True


def host_paths(ds: dict[str, Any]) -> dict[str, dict[str, Any]]:
    pod = ds["spec"]["template"]["spec"]
    mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
    return {v["hostPath"]["path"]: mounts[v["name"]] for v in pod["volumes"] if "hostPath" in v}


def test_daemonset_host_paths_only_for_what_it_touches() -> None:
    paths = host_paths(render_agent_daemonset(plan_for(("quay", make_spec())), "ns", "img"))
    assert paths.keys() == {"/etc/containerd", "/etc/containerd/certs.d"}
    assert paths["/etc/containerd"]["readOnly"] is True
    assert paths["/etc/containerd"]["mountPath"] == "/host/etc/containerd"
    assert "readOnly" not in paths["/etc/containerd/certs.d"]
    assert paths["/etc/containerd/certs.d"]["mountPath"] == "/host/etc/containerd/certs.d"


def test_daemonset_mounts_crio_dropins_only_when_a_mirror_uses_crio() -> None:
    crio_spec = make_spec(nodeConfig={"runtimes": ["containerd", "crio"]})
    paths = host_paths(render_agent_daemonset(plan_for(("quay", make_spec()), ("q2", crio_spec)), "ns", "img"))
    assert c.CRIO_DROPIN_DIR in paths
    assert paths[c.CRIO_DROPIN_DIR]["mountPath"] == f"/host{c.CRIO_DROPIN_DIR}"
    # Where CRI-O reads the Restricted mirrors' credentials (written by the agent), and its config (read only).
    assert paths["/run/containers"]["mountPath"] == "/host/run/containers" and "readOnly" not in paths["/run/containers"]
    assert paths["/etc/crio"]["readOnly"] is True


def test_daemonset_custom_containerd_config_path() -> None:
    ds = render_agent_daemonset(plan_for(), "ns", "img", containerd_config_path="/etc/containerd/registries")
    assert "/etc/containerd/registries" in host_paths(ds)
    args = ds["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--containerd-config-path") + 1] == "/etc/containerd/registries"


def test_tls_without_a_fixed_cluster_ip_is_rejected() -> None:
    """Nodes dial the ClusterIP, so a certificate can only be valid for a fixed one."""
    import pytest
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=r"service\.tls needs a fixed service\.clusterIP"):
        make_spec(service={"tls": {"secretName": "mirror-tls"}})


def test_the_cache_front_and_sidecar_join_the_registry_in_the_pod() -> None:
    objs = children(make_spec(storage={"size": "20Gi"}, cache={"maxSize": "15Gi", "tagFreshness": "5m"}))
    pod = objs["Deployment"]["spec"]["template"]["spec"]
    names = [ctr["name"] for ctr in pod["containers"]]
    assert names == ["registry", "front", "front-stats", "cache"]
    for ctr in pod["containers"]:
        assert ctr["securityContext"]["readOnlyRootFilesystem"] is True
        assert ctr["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    front = pod["containers"][1]
    assert front["ports"] == [{"name": "registry", "containerPort": 5000, "protocol": "TCP"}], "the Service's target is the front"
    vcl = objs["ConfigMap"]["data"]["front.vcl"]
    assert "set beresp.ttl = 300s;" in vcl, "a tag is kept for cache.tagFreshness"
    assert '.port = "5002"' in vcl and '.port = "5003"' in vcl
    policy = json.loads(objs["ConfigMap"]["data"]["cache.json"])
    assert policy["capBytes"] == 15 << 30 and policy["upstream"] == "https://quay.io"
    sidecar = pod["containers"][3]
    assert sidecar["args"][:2] == ["cache", "serve"]
    assert {m["name"] for m in sidecar["volumeMounts"]} >= {"storage", "cache-control"}
    # The sidecar sees only its own keys of the mirror's one ConfigMap, the registry only config.yml.
    volumes = {v["name"]: v for v in pod["volumes"]}
    control = volumes["cache-control"]["configMap"]
    assert control["name"] == objs["ConfigMap"]["metadata"]["name"]
    assert sorted(i["key"] for i in control["items"]) == ["cache.json", "invalidate.json", "pins.json"]
    assert [i["key"] for i in volumes["config"]["configMap"]["items"]] == ["config.yml"]


def test_an_https_mirror_is_served_by_distribution_itself_without_a_front() -> None:
    spec = make_spec(service={"tls": {"secretName": "mirror-tls"}, "clusterIP": "10.96.0.9"})
    objs = children(spec)
    names = [ctr["name"] for ctr in objs["Deployment"]["spec"]["template"]["spec"]["containers"]]
    assert names == ["registry", "cache"], "Varnish speaks no TLS"
    assert registry_config(objs)["http"]["addr"] == ":5000"
    assert "front.vcl" not in objs["ConfigMap"]["data"]


def test_cache_cap_must_fit_the_volume_and_watermarks_be_ordered() -> None:
    with pytest.raises(ValueError, match=r"cache\.maxSize must not exceed storage\.size"):
        make_spec(storage={"size": "10Gi"}, cache={"maxSize": "11Gi"})
    with pytest.raises(ValueError, match="lowWatermarkPercent must be below"):
        make_spec(cache={"lowWatermarkPercent": 90, "highWatermarkPercent": 80})
