"""Admission as `regmirror render` and the operator judge it: every class of spec the API server
would admit but the cluster could never apply is refused, naming the field.

The same rules run on the API server as CEL (tests/integration/test_admission_property.py holds
both sides to the same verdict on generated specs); here each class is checked on the Python side,
fast, with the field the message must name.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from pydantic import ValidationError

from regmirror import crd, grammar
from regmirror.models import (
    RESERVED_NAMES,
    BootstrapConflict,
    RegistryMirrorSpec,
    Rule,
    admission_verdict,
    bootstrap_conflicts,
    iter_rules,
)

STRICT = {"fallback": "NeverContactUpstream"}


def document(name: str = "hub", **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"upstream": {"url": "https://registry-1.docker.io"}}
    body.update(spec)
    return {"apiVersion": "regmirror.dev/v1alpha1", "kind": "RegistryMirror", "metadata": {"name": name}, "spec": body}


def refused(doc: dict[str, Any]) -> str:
    verdict = admission_verdict(doc)
    assert verdict is not None, f"admitted: {doc}"
    return verdict


# (what, document, text the refusal must contain: the field and the rule)
REFUSED: list[tuple[str, dict[str, Any], tuple[str, ...]]] = [
    # 1. names that cannot become child names or label values
    ("name with a dot", document("hub.example"), ("metadata.name", "DNS label")),
    ("upper-case name", document("Hub"), ("metadata.name",)),
    ("underscore in name", document("hub_1"), ("metadata.name",)),
    ("leading dash", document("-hub"), ("metadata.name",)),
    ("trailing dash", document("hub-"), ("metadata.name",)),
    ("49 characters", document("a" * 49), ("metadata.name", "48")),
    ("unicode name", document("hüb"), ("metadata.name",)),
    ("missing name", {**document(), "metadata": {}}, ("metadata.name",)),
    ("name of the operator's Deployment", document("operator"), ("metadata.name", "operator's own objects")),
    ("name of the operator's metrics Service", document("operator-metrics"), ("metadata.name",)),
    ("name of the node plan ConfigMap", document("node-config"), ("metadata.name",)),
    # 1. resources
    ("request above the default limit", document(resources={"requests": {"memory": "1Gi"}}), ("resources.requests", "512Mi")),
    ("request above its limit", document(resources={"requests": {"cpu": "2"}, "limits": {"cpu": "1"}}), ("resources.requests",)),
    ("unknown resource", document(resources={"requests": {"gpu": "1"}}), ("resources", "cpu, memory, ephemeral-storage")),
    ("hugepages", document(resources={"limits": {"hugepages-2Mi": "1Gi"}}), ("resources",)),
    ("bad quantity", document(resources={"limits": {"memory": "1 Gi"}}), ("resources",)),
    ("negative quantity", document(resources={"limits": {"memory": "-1Gi"}}), ("resources",)),
    # 1. tolerations as a Pod spec validates them
    (
        "tolerationSeconds on NoSchedule",
        document(tolerations=[{"key": "k", "effect": "NoSchedule", "tolerationSeconds": 5}]),
        ("tolerations", "tolerationSeconds", "NoExecute"),
    ),
    ("tolerationSeconds without effect", document(tolerations=[{"key": "k", "tolerationSeconds": 5}]), ("tolerationSeconds",)),
    ("empty key with Equal", document(tolerations=[{"value": "v"}]), ("tolerations", "operator must be Exists")),
    ("Exists with a value", document(tolerations=[{"key": "k", "operator": "Exists", "value": "v"}]), ("tolerations", "value")),
    ("bad toleration key", document(tolerations=[{"key": "a b", "operator": "Exists"}]), ("tolerations", "key")),
    ("bad toleration value", document(tolerations=[{"key": "k", "value": "a b"}]), ("tolerations", "value")),
    ("unknown effect", document(tolerations=[{"key": "k", "operator": "Exists", "effect": "NoAdmit"}]), ("tolerations", "effect")),
    # 1. clusterIP
    ("impossible IPv4", document(service={"clusterIP": "999.1.1.1"}), ("service.clusterIP",)),
    ("IPv6 shape that is no address", document(service={"clusterIP": "1:2:3"}), ("service.clusterIP",)),
    ("too many IPv6 groups", document(service={"clusterIP": "1:2:3:4:5:6:7:8:9"}), ("service.clusterIP",)),
    ("leading zeros", document(service={"clusterIP": "010.96.0.1"}), ("service.clusterIP",)),
    ("IPv4-mapped IPv6", document(service={"clusterIP": "::ffff:10.96.0.1"}), ("service.clusterIP",)),
    ("zone", document(service={"clusterIP": "fe80::1%eth0"}), ("service.clusterIP",)),
    ("loopback", document(service={"clusterIP": "127.0.0.1"}), ("service.clusterIP",)),
    ("unspecified", document(service={"clusterIP": "0.0.0.0"}), ("service.clusterIP",)),
    ("headless", document(service={"clusterIP": "None"}), ("service.clusterIP",)),
    ("metrics port", document(service={"port": 5001}), ("service.port", "5001")),
    # 2. ports 1-65535 everywhere
    ("URL port 99999", document(upstream={"url": "https://registry.example:99999"}), ("upstream.url", "1-65535")),
    ("URL port 0", document(upstream={"url": "https://registry.example:0"}), ("upstream.url",)),
    ("URL port 65536", document(upstream={"url": "https://registry.example:65536"}), ("upstream.url",)),
    ("URL port with leading zero", document(upstream={"url": "https://registry.example:0443"}), ("upstream.url",)),
    ("host entry port 99999", document(upstream={"url": "https://r.example", "hosts": ["r.example:99999"]}), ("upstream.hosts",)),
    ("proxy port 70000", document(proxy={"httpsProxy": "http://proxy.example:70000"}), ("proxy.httpsProxy",)),
    # other URL shapes
    ("userinfo in URL", document(upstream={"url": "https://bob:secret@quay.io"}), ("upstream.url", "credentialsSecretRef")),
    ("query in URL", document(upstream={"url": "https://quay.io/?x=1"}), ("upstream.url",)),
    ("unicode host", document(upstream={"url": "https://quäy.io"}), ("upstream.url",)),
    ("no-break space in path", document(upstream={"url": "https://quay.io/v2\u00a0"}), ("upstream.url",)),
    ("line separator", document(upstream={"url": "https://quay.io\u2028"}), ("upstream.url",)),
    ("trailing newline", document(upstream={"url": "https://quay.io\n"}), ("upstream.url",)),
    ("IPv6 upstream", document(upstream={"url": "https://[fd00::1]:5000"}), ("upstream.url",)),
    ("label longer than 63", document(upstream={"url": f"https://{'a' * 64}.example"}), ("upstream.url",)),
    ("host longer than 253", document(upstream={"url": "https://" + ".".join(["a" * 63] * 4) + ":5000"}), ("upstream.url", "253")),
    ("ftp", document(upstream={"url": "ftp://quay.io"}), ("upstream.url",)),
    # 3. the same registry twice
    (
        "registry-1.docker.io and docker.io",
        document(upstream={"url": "https://mirror.gcr.io", "hosts": ["registry-1.docker.io", "docker.io"]}),
        ("upstream.hosts", "same registry twice"),
    ),
    (
        "index.docker.io and docker.io",
        document(upstream={"url": "https://m.example", "hosts": ["index.docker.io", "docker.io"]}),
        ("upstream.hosts",),
    ),
    ("two cases", document(upstream={"url": "https://quay.io", "hosts": ["Quay.io", "quay.io"]}), ("upstream.hosts",)),
    (
        "alias in upper case",
        document(upstream={"url": "https://m.example", "hosts": ["docker.io", "INDEX.DOCKER.IO"]}),
        ("upstream.hosts",),
    ),
    ("exact duplicate", document(upstream={"url": "https://quay.io", "hosts": ["quay.io", "quay.io"]}), ("upstream.hosts",)),
    ("scheme in a host entry", document(upstream={"url": "https://quay.io", "hosts": ["https://quay.io"]}), ("upstream.hosts",)),
    # 5. bootstrap deadlock, self-case
    ("strict docker.io, default image", document(nodeConfig=STRICT), ("image", "NeverContactUpstream", "AllowUpstream", "digest")),
    (
        "strict docker.io, short image name",
        document(upstream={"url": "https://mirror.gcr.io", "hosts": ["docker.io"]}, nodeConfig=STRICT, image="registry:3"),
        ("image", "bootstrap"),
    ),
    (
        "strict docker.io, index.docker.io image",
        document(nodeConfig=STRICT, image="index.docker.io/library/registry:3"),
        ("image", "bootstrap"),
    ),
    (
        "strict private registry, image from it",
        document(upstream={"url": "https://Registry.Corp.example:443"}, nodeConfig=STRICT, image="registry.corp.example/registry:3"),
        ("image", "bootstrap"),
    ),
    # image, priorityClassName, proxy, secrets, storage, ttl, selectors, affinity
    ("image with a space", document(image="registry:3 "), ("image",)),
    ("image in upper case", document(image="Registry:3"), ("image",)),
    ("image port 99999", document(image="r.example:99999/registry:3"), ("image",)),
    ("dotted first path element", document(image="a.b_c/registry:3"), ("image",)),
    ("bad digest", document(image="registry@sha256:abc"), ("image",)),
    ("image id", document(image="a" * 64), ("image",)),
    ("image too long", document(image="r.example/" + "a" * 240), ("image",)),
    ("priorityClassName in upper case", document(priorityClassName="High"), ("priorityClassName",)),
    ("proxy with credentials", document(proxy={"httpProxy": "http://bob:pw@proxy.example:3128"}), ("proxy.httpProxy",)),
    ("proxy without scheme", document(proxy={"httpProxy": "proxy.example:3128"}), ("proxy.httpProxy",)),
    ("noProxy with a tab", document(proxy={"noProxy": ".cluster.local,\t10.0.0.0/8"}), ("proxy.noProxy",)),
    ("noProxy with an empty entry", document(proxy={"noProxy": "a.example,,b.example"}), ("proxy.noProxy",)),
    (
        "Secret key with a slash",
        document(upstream={"url": "https://q.example", "credentialsSecretRef": {"name": "c", "passwordKey": "a/b"}}),
        ("passwordKey",),
    ),
    ("Secret key '..x'", document(upstream={"url": "https://q.example", "tls": {"caSecretRef": {"name": "c", "key": "..ca"}}}), ("key",)),
    ("Secret name in upper case", document(upstream={"url": "https://q.example", "credentialsSecretRef": {"name": "Creds"}}), ("name",)),
    ("TLS Secret name", document(service={"clusterIP": "10.96.0.9", "tls": {"secretName": "a_b"}}), ("secretName",)),
    ("storage class name", document(storage={"storageClassName": "Fast SSD"}), ("storageClassName",)),
    (
        "ReadWriteOncePod with another mode",
        document(storage={"accessModes": ["ReadWriteOncePod", "ReadWriteOnce"]}),
        ("storage.accessModes",),
    ),
    ("zero size", document(storage={"size": "0Gi"}), ("storage.size",)),
    ("ttl that overflows Go", document(cache={"ttl": "9999999999999h"}), ("cache.ttl",)),
    ("ttl above ten years", document(cache={"ttl": "87601h"}), ("cache.ttl",)),
    ("ttl in days", document(cache={"ttl": "7d"}), ("cache.ttl",)),
    ("cache cap above the volume", document(storage={"size": "10Gi"}, cache={"maxSize": "11Gi"}), ("cache.maxSize", "storage.size")),
    ("cache cap of zero", document(cache={"maxSize": "0"}), ("cache.maxSize",)),
    ("watermarks reversed", document(cache={"lowWatermarkPercent": 95, "highWatermarkPercent": 90}), ("lowWatermarkPercent",)),
    ("tag freshness that overflows Go", document(cache={"tagFreshness": "9999999999999h"}), ("cache.tagFreshness",)),
    ("prewarm image port 99999", document(prewarm=[{"image": "r.example:99999/library/nginx:1"}]), ("prewarm",)),
    ("prewarm image in upper case", document(prewarm=[{"image": "Library/nginx"}]), ("prewarm",)),
    ("s3 and ephemeral", document(storage={"ephemeral": True, "s3": {"bucket": "cache"}}), ("one back-end",)),
    ("s3 with a storage class", document(storage={"storageClassName": "fast", "s3": {"bucket": "cache"}}), ("storageClassName",)),
    ("s3 with a cache cap", document(storage={"s3": {"bucket": "cache"}}, cache={"maxSize": "1Gi"}), ("cache.maxSize",)),
    ("s3 bucket in upper case", document(storage={"s3": {"bucket": "Cache"}}), ("storage.s3.bucket",)),
    ("s3 endpoint port 99999", document(storage={"s3": {"bucket": "cache", "endpoint": "https://minio.example:99999"}}), ("endpoint",)),
    (
        "s3 endpoint with credentials",
        document(storage={"s3": {"bucket": "cache", "endpoint": "https://ak:sk@minio.example"}}),
        ("endpoint",),
    ),
    (
        "s3 access key with a slash",
        document(storage={"s3": {"bucket": "cache", "credentialsSecretRef": {"name": "s3", "accessKeyKey": "a/b"}}}),
        ("accessKeyKey",),
    ),
    ("prewarm platform twice", document(prewarm=[{"image": "library/nginx", "platforms": ["linux/amd64", "linux/amd64"]}]), ("platforms",)),
    ("nodeSelector value", document(nodeSelector={"pool": "a b"}), ("nodeSelector",)),
    ("nodeSelector key", document(nodeSelector={"-pool": "a"}), ("nodeSelector",)),
    (
        "node config selector: In without values",
        document(nodeConfig={"nodeSelector": {"matchExpressions": [{"key": "k", "operator": "In"}]}}),
        ("values",),
    ),
    (
        "node config selector: Exists with values",
        document(nodeConfig={"nodeSelector": {"matchExpressions": [{"key": "k", "operator": "Exists", "values": ["a"]}]}}),
        ("values",),
    ),
    ("node config selector: bad key", document(nodeConfig={"nodeSelector": {"matchLabels": {"a/b/c": "x"}}}), ("matchLabels",)),
    ("capabilities empty", document(nodeConfig={"capabilities": []}), ("capabilities",)),
    ("runtimes empty", document(nodeConfig={"runtimes": []}), ("runtimes",)),
    ("unknown runtime", document(nodeConfig={"runtimes": ["podman"]}), ("runtimes",)),
    (
        "docker cannot be strict",
        document(nodeConfig={"runtimes": ["docker"], "fallback": "NeverContactUpstream"}),
        ("runtimes", "Docker Hub", "NeverContactUpstream"),
    ),
    (
        "affinity without terms",
        document(affinity={"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": []}}}),
        ("nodeSelectorTerms",),
    ),
    (
        "affinity weight 0",
        document(
            affinity={
                "podAntiAffinity": {
                    "preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 0, "podAffinityTerm": {"topologyKey": "zone"}}]
                }
            }
        ),
        ("weight",),
    ),
    (
        "affinity without topologyKey",
        document(affinity={"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [{"labelSelector": {}}]}}),
        ("topologyKey",),
    ),
    (
        "affinity Gt with a word",
        document(
            affinity={
                "nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [{"matchExpressions": [{"key": "cores", "operator": "Gt", "values": ["many"]}]}]
                    }
                }
            }
        ),
        ("values",),
    ),
    (
        "affinity matchFields key",
        document(
            affinity={
                "nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [{"matchFields": [{"key": "metadata.labels", "operator": "In", "values": ["n"]}]}]
                    }
                }
            }
        ),
        ("key",),
    ),
    ("affinity unknown field", document(affinity={"nodeAffinity": {"requiredDuringSchedulingRequiredDuringExecution": {}}}), ("affinity",)),
    (
        "affinity namespace",
        document(
            affinity={
                "podAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [{"topologyKey": "zone", "namespaces": ["Kube_System"]}]}
            }
        ),
        ("namespaces",),
    ),
    # 4. types as the API server reads them (YAML "1", "yes")
    ("replicas as a string", document(replicas="1"), ("replicas", "integer")),
    ("replicas as a bool", document(replicas=True), ("replicas",)),
    ("port as a string", document(service={"port": "5000"}), ("service.port",)),
    ("ephemeral as yes", document(storage={"ephemeral": "yes"}), ("storage.ephemeral",)),
    ("unknown spec field", document(upstreem={}), ("upstreem",)),
    ("unknown root field", {**document(), "specs": {}}, ("specs",)),
    ("unknown metadata field", {**document(), "metadata": {"name": "hub", "nmae": "x"}}, ("nmae",)),
    ("bad label on the mirror", {**document(), "metadata": {"name": "hub", "labels": {"team": "a b"}}}, ("metadata.labels",)),
    ("wrong apiVersion", {**document(), "apiVersion": "regmirror.dev/v1"}, ("apiVersion",)),
]


@pytest.mark.parametrize(("what", "doc", "expected"), REFUSED, ids=[r[0] for r in REFUSED])
def test_refused_naming_the_field(what: str, doc: dict[str, Any], expected: tuple[str, ...]) -> None:
    message = refused(doc)
    for text in expected:
        assert text in message, f"{what}: {text!r} not in {message!r}"


ADMITTED: list[tuple[str, dict[str, Any]]] = [
    ("defaults", document()),
    ("48-character name", document("a" * 48)),
    ("digits-only name", document("123")),
    ("request within the default limit", document(resources={"requests": {"memory": "512Mi"}})),
    ("request rounds to its limit", document(resources={"requests": {"cpu": "0.0000000002"}, "limits": {"cpu": "0.0000000001"}})),
    ("no limits at all", document(resources={"requests": {"memory": "4Gi"}, "limits": {}})),
    ("NoExecute toleration with seconds", document(tolerations=[{"key": "k", "effect": "NoExecute", "tolerationSeconds": 30}])),
    ("tolerate everything", document(tolerations=[{"operator": "Exists"}])),
    ("IPv6 clusterIP", document(service={"clusterIP": "fd00:10:96::53"})),
    ("non-canonical IPv6 clusterIP", document(service={"clusterIP": "FD00:0:0:0:0:0:0:53"})),
    ("port 65535 everywhere", document(upstream={"url": "https://r.example:65535/v2", "hosts": ["r.example:65535", "docker.io"]})),
    ("URL with a path", document(upstream={"url": "https://mirror.example/path/to%20x/"})),
    (
        "hosts of distinct registries",
        document(upstream={"url": "https://mirror.gcr.io", "hosts": ["docker.io", "quay.io", "registry.k8s.io:443"]}),
    ),
    ("strict with a digest-pinned image elsewhere", document(nodeConfig=STRICT, image=f"registry.corp.example/registry@sha256:{'a' * 64}")),
    ("strict with a tag and digest", document(nodeConfig=STRICT, image=f"localhost:5000/registry:3.0.0@sha256:{'b' * 64}")),
    ("strict but node config disabled", document(nodeConfig={**STRICT, "enabled": False})),
    ("not strict, default image", document(nodeConfig={"fallback": "AllowUpstream"})),
    ("strict for quay.io, image from docker.io", document(upstream={"url": "https://quay.io"}, nodeConfig=STRICT)),
    ("image with an upper-case registry", document(image="Registry.Example:5000/team/registry:v3")),
    ("image with a dotted single name", document(image="foo.bar:1")),
    (
        "proxies",
        document(
            proxy={
                "httpProxy": "http://proxy.example:3128",
                "httpsProxy": "socks5://10.0.0.1:1080/",
                "noProxy": "*, .cluster.local, *.corp.example,10.0.0.0/8,fd00::/8,[fd00::1]:5000,localhost:8080",
            }
        ),
    ),
    ("ttl at the limit", document(cache={"ttl": "87600h"})),
    ("ttl with fractions", document(cache={"ttl": "1.5h0.25s"})),
    ("ttl forever", document(cache={"ttl": "0"})),
    ("cache cap equal to the volume", document(storage={"size": "10Gi"}, cache={"maxSize": "10240Mi", "tagFreshness": "10m"})),
    (
        "two replicas on a bucket",
        document(
            replicas=2, storage={"s3": {"bucket": "cache", "endpoint": "http://minio.storage.svc:9000", "rootDirectory": "/mirrors/hub"}}
        ),
    ),
    ("prewarm", document(prewarm=[{"image": "library/nginx:1.27", "platforms": ["linux/amd64", "linux/arm64/v8"]}])),
    ("RWOP alone", document(storage={"accessModes": ["ReadWriteOncePod"]})),
    ("empty storage class means the default", document(storage={"storageClassName": ""})),
    (
        "nulls are dropped as the API server drops them",
        document(replicas=None, image=None, upstream={"url": "https://quay.io", "hosts": None}),
    ),
    ("an integral float is an integer to the API server", document(replicas=1.0)),
    (
        "Secret names with dots",
        document(upstream={"url": "https://q.example", "credentialsSecretRef": {"name": "quay.creds", "usernameKey": "user.name"}}),
    ),
    (
        "full affinity",
        document(
            affinity={
                "nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [
                            {"matchExpressions": [{"key": "cores", "operator": "Gt", "values": ["4"]}]},
                            {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["node-1"]}]},
                        ]
                    },
                    "preferredDuringSchedulingIgnoredDuringExecution": [
                        {"weight": 100, "preference": {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["infra"]}]}}
                    ],
                },
                "podAntiAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": [
                        {
                            "topologyKey": "kubernetes.io/hostname",
                            "labelSelector": {"matchLabels": {"app.kubernetes.io/name": "regmirror"}},
                            "namespaces": ["regmirror-system"],
                        }
                    ]
                },
            }
        ),
    ),
]


@pytest.mark.parametrize(("what", "doc"), ADMITTED, ids=[a[0] for a in ADMITTED])
def test_admitted(what: str, doc: dict[str, Any]) -> None:
    assert admission_verdict(doc) is None


def test_a_refusal_never_echoes_the_value() -> None:
    message = refused(document(upstream={"url": "https://bob:Planted-Secret-1@quay.io"}))
    assert "Planted-Secret-1" not in message


CHILD_KINDS = {"ConfigMap", "PersistentVolumeClaim", "Service", "Deployment", "Secret"}


def _shipped_child_kind_names() -> set[str]:
    """`regmirror-*` names of ConfigMaps, Services, Deployments... that manifests/ and the Helm chart install.

    Read as text: the chart's templates are not YAML until Helm renders them.
    """
    root = Path(__file__).resolve().parents[2] / "manifests"
    names: set[str] = set()
    for path in root.rglob("*.yaml"):
        text = path.read_text()
        for chunk in re.split(r"^---", text, flags=re.M):
            kind = re.search(r"^kind: *(\w+)", chunk, flags=re.M)
            if kind and kind.group(1) in CHILD_KINDS:
                names.update(re.findall(r"^  name: *(regmirror-[a-z0-9-]+) *$", chunk, flags=re.M))
        if path.name == "kustomization.yaml":  # configMapGenerator / secretGenerator
            names.update(re.findall(r"^- name: *(regmirror-[a-z0-9-]+) *$", text, flags=re.M))
    return names


def test_reserved_names_cover_every_operator_object_a_child_could_collide_with() -> None:
    from regmirror import constants
    from regmirror.naming import child_name

    shipped = _shipped_child_kind_names()
    assert {"regmirror-operator", "regmirror-operator-metrics"} <= shipped, shipped
    assert shipped <= set(constants.OPERATOR_OWN_OBJECT_NAMES), shipped - set(constants.OPERATOR_OWN_OBJECT_NAMES)
    for name in RESERVED_NAMES:
        assert child_name(name) in constants.OPERATOR_OWN_OBJECT_NAMES
        refused(document(name))


# ------------------------------------------------------------------ bootstrap dependencies across mirrors


def spec(**body: Any) -> RegistryMirrorSpec:
    return RegistryMirrorSpec.model_validate({"upstream": {"url": "https://registry-1.docker.io"}, **body})


def test_cross_mirror_bootstrap_dependency_is_reported() -> None:
    specs = {
        "strict-hub": spec(nodeConfig=STRICT, image="registry.corp.example/registry:3.0.0"),
        "quay": spec(upstream={"url": "https://quay.io"}),  # default image: docker.io
        "corp": spec(upstream={"url": "https://registry.corp.example"}, image="quay.io/team/registry:3"),
    }
    conflicts = bootstrap_conflicts(specs)
    assert conflicts == [BootstrapConflict("quay", "docker.io/library/registry:3.0.0", "docker.io", ("strict-hub",))]
    assert not conflicts[0].is_self
    message = conflicts[0].message()
    assert "strict-hub" in message and "docker.io" in message and "AllowUpstream" in message


def test_mutual_strict_mirrors_each_depend_on_the_other() -> None:
    specs = {
        "hub": spec(nodeConfig=STRICT, image="quay.io/mirror/registry:3"),
        "quay": spec(upstream={"url": "https://quay.io"}, nodeConfig=STRICT, image="docker.io/library/registry:3"),
    }
    assert [(c.mirror, c.strict_mirrors) for c in bootstrap_conflicts(specs)] == [("hub", ("quay",)), ("quay", ("hub",))]


def test_self_case_stored_before_the_rule_is_reported_too() -> None:
    # Admission refuses it; an object stored under an older CRD is still read by the operator
    # (no admission context), which reports it instead of dropping a serving mirror.
    assert "bootstrap" in refused(document(nodeConfig=STRICT))
    stored = spec(nodeConfig=STRICT)
    [conflict] = bootstrap_conflicts({"hub": stored})
    assert conflict.is_self and "never start" in conflict.message()


def test_the_operator_still_reads_stored_objects_that_admission_now_refuses_safely() -> None:
    aliases = {"url": "https://mirror.gcr.io", "hosts": ["registry-1.docker.io", "docker.io", "Index.Docker.io"]}
    assert "same registry twice" in refused(document(upstream=aliases))
    assert spec(upstream=aliases).upstream.effective_hosts() == ["docker.io"] * 3  # the node plan folds them
    # Everything else stays refused on both paths: those specs could never be applied at all.
    with pytest.raises(ValidationError):
        spec(upstream={"url": "https://registry.example:99999"})


def test_no_conflict_without_strict_mirrors_or_with_node_config_off() -> None:
    assert bootstrap_conflicts({"hub": spec(), "quay": spec(upstream={"url": "https://quay.io"})}) == []
    off = spec(nodeConfig={**STRICT, "enabled": False}, image="quay.io/x:1")
    assert bootstrap_conflicts({"off": off, "quay": spec(upstream={"url": "https://quay.io"})}) == []


# ------------------------------------------------------------------ one source of truth


def _validations(node: Any) -> list[dict[str, str]]:
    found: list[dict[str, str]] = []
    if isinstance(node, dict):
        found += node.get("x-kubernetes-validations", [])
        for value in node.values():
            found += _validations(value)
    elif isinstance(node, list):
        for value in node:
            found += _validations(value)
    return found


def test_every_cel_rule_in_the_crd_has_its_python_twin() -> None:
    from regmirror.models import RegistryMirror

    rules: list[Rule] = [*iter_rules(RegistryMirror), *RegistryMirror.ROOT_RULES]
    by_cel = {r.cel: r for r in rules}
    in_crd = _validations(crd.render_crd())
    assert in_crd
    for entry in in_crd:
        rule = by_cel.get(entry["rule"])
        assert rule is not None, f"CEL rule without a Rule object: {entry['rule']}"
        if "oldSelf" in rule.cel:
            assert rule.holds is None  # a transition rule: only the API server has the stored object
        else:
            assert rule.holds is not None, f"no Python twin: {rule.cel}"
    assert "pattern" not in str(crd.render_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"])


_PATTERNS = {name: value for name, value in vars(grammar).items() if name.endswith("_PATTERN")}


@pytest.mark.parametrize("name", sorted(_PATTERNS))
def test_patterns_stay_in_the_subset_where_re2_and_python_agree(name: str) -> None:
    pattern = _PATTERNS[name]
    assert pattern.startswith("^") and pattern.endswith("$")
    assert not re.search(r"\\[sdwbSDWBAZz]", pattern), "class escapes differ: RE2's are ASCII, Python's unicode"
    assert "[^" not in pattern and "(?" not in pattern, "negated classes, lookaround and flags are out"
    unescaped = re.sub(r"\\.", "", pattern)
    outside_classes = re.sub(r"\[[^\]]*\]", "", unescaped)
    assert "." not in outside_classes, "a bare . matches any unicode character"
    assert pattern.isascii()


# ------------------------------------------------------------------ the Go semantics behind the CEL functions

MAX_NS = 2**63 - 1


@pytest.mark.parametrize(
    ("text", "nanos"),
    [
        ("0", 0),
        ("1ns", 1),
        ("1.5h", 5400 * 10**9),
        ("1h30m", 5400 * 10**9),
        ("0.1s", 10**8),
        ("1.0000000001s", 10**9),  # Go truncates below the nanosecond
        ("9223372036854775807ns", MAX_NS),
        ("2562047h47m16.854775807s", MAX_NS),
        ("9223372036854775808ns", None),
        ("2562047h47m16.854775808s", None),
        ("9999999999999h", None),
        ("1.99999999999999999999999999s", 2 * 10**9),  # float64 rounding and ignored digits, as in Go
        ("0.333333333333333333333h", 1200 * 10**9),
        ("2562047.78h", 9223372008000000000),
        ("5124094.5h", None),
        ("7d", None),
        ("", None),
        (".s", None),
        ("1", None),
    ],
)
def test_duration_parsing_follows_go(text: str, nanos: int | None) -> None:
    # Expected values as printed by Go's time.ParseDuration (go1.2x), which CEL's duration() calls.
    assert grammar.parse_go_duration(text) == nanos


@pytest.mark.parametrize(
    ("a", "b", "cmp"),
    [
        ("1Gi", "1024Mi", 0),
        ("1G", "1Gi", -1),
        ("0.5", "500m", 0),
        ("0.0000000002", "0.0000000001", 0),  # both round up to 1n
        ("0.0000000011", "0.000000002", 0),
        ("99999999999999999999Ei", "99999999999999999999999Ei", 0),  # binary amounts cap at int64
        ("99999999999999999999E", "99999999999999999999999E", -1),  # decimal ones do not
        ("1m", "0.001", 0),
    ],
)
def test_quantity_comparison_follows_the_api_server(a: str, b: str, cmp: int) -> None:
    qa, qb = grammar.parse_quantity(a), grammar.parse_quantity(b)
    assert qa is not None and qb is not None
    assert (qa > qb) - (qa < qb) == cmp


@given(st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=20))
@example("١٢٣")  # Arabic-Indic digits: Python's \d would take them
@example("1\u00a0")
def test_patterns_refuse_anything_outside_ascii(text: str) -> None:
    if not text.isascii():
        for name, pattern in _PATTERNS.items():
            assert not grammar.matches(pattern, text), name


def test_stored_objects_are_not_mutated_by_admission() -> None:
    doc = document(replicas=None, upstream={"url": "https://quay.io/", "hosts": None})
    before = copy.deepcopy(doc)
    assert admission_verdict(doc) is None
    assert doc == before
