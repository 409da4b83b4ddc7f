"""The generated CRD on a real API server: it installs, explains, and rejects bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from harness import LocalCluster
from harness.cluster import KubectlError
from harness.objects import MirrorFactory

CRD_FILE = Path(__file__).resolve().parents[2] / "crds" / "registrymirrors.regmirror.dev.yaml"


def mirror(name: str, **spec: object) -> dict[str, object]:
    body: dict[str, object] = {"upstream": {"url": "https://registry-1.docker.io"}}
    body.update(spec)
    return {"apiVersion": "regmirror.dev/v1alpha1", "kind": "RegistryMirror", "metadata": {"name": name}, "spec": body}


@pytest.fixture(scope="module")
def crd(cluster: LocalCluster) -> LocalCluster:
    cluster.kubectl("apply", "--server-side", "-f", str(CRD_FILE))
    cluster.kubectl("wait", "--for=condition=Established", "crd/registrymirrors.regmirror.dev", "--timeout=60s")
    return cluster


def rejected(cluster: LocalCluster, body: dict[str, object], *verb: str) -> str:
    with pytest.raises(KubectlError) as info:
        cluster.kubectl(*(verb or ("create",)), "-f", "-", input=body)
    return str(info.value)


def test_explain_reads_the_field_descriptions(crd: LocalCluster) -> None:
    # The API server publishes a new CRD's OpenAPI a moment after it is Established.
    out = crd.wait_until(
        lambda: (r := crd.kubectl("explain", "registrymirror.spec", check=False)).returncode == 0 and r.stdout,
        timeout=30,
        what="kubectl explain to know RegistryMirror",
    )
    assert "Desired state of a pull-through cache" in out or "Desired state" in out
    assert "upstream" in out and "nodeConfig" in out
    fallback = crd.kubectl("explain", "registrymirror.spec.nodeConfig.fallback").stdout
    assert "NeverContactUpstream" in fallback and "fail-open" in fallback


def test_defaults_are_applied_by_the_api_server(crd: LocalCluster, mirrors: MirrorFactory) -> None:
    mirrors.track_mirror("crd-defaults")
    crd.kubectl("create", "-f", "-", input=mirror("crd-defaults"))
    spec = crd.kubectl_json("get", "registrymirror", "crd-defaults")["spec"]
    assert spec["storage"]["size"] == "10Gi"
    assert spec["cache"]["ttl"] == "168h"
    assert spec["nodeConfig"]["fallback"] == "AllowUpstream"
    assert spec["service"]["port"] == 5000


def test_short_name_and_category(crd: LocalCluster) -> None:
    assert crd.kubectl("get", "rmir").returncode == 0
    assert crd.kubectl("get", "regmirror").returncode == 0


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"upstream": {"url": "ftp://registry.example.com"}}, "spec.upstream.url"),
        ({"upstream": {"url": "not a url"}}, "spec.upstream.url"),
        ({"storage": {"size": "-5Gi"}}, "spec.storage.size"),
        ({"storage": {"size": "0"}}, "storage.size must be a positive quantity"),
        ({"cache": {"ttl": "a week"}}, "spec.cache.ttl"),
        ({"replicas": 3}, "more than one replica needs storage.ephemeral or the ReadWriteMany access mode"),
        ({"nodeConfig": {"fallback": "Sometimes"}}, "spec.nodeConfig.fallback"),
        ({"service": {"tls": {"secretName": "mirror-tls"}}}, "service.tls needs a fixed service.clusterIP"),
        ({"service": {"port": 5001}}, "service.port 5001 is reserved"),
    ],
)
def test_invalid_mirror_is_rejected_with_the_schema_message(
    crd: LocalCluster, mirrors: MirrorFactory, spec: dict[str, object], message: str
) -> None:
    mirrors.track_mirror("crd-invalid")  # should it ever be admitted, it is not left behind
    body = mirror("crd-invalid")
    body["spec"].update(spec)  # type: ignore[attr-defined]
    assert message in rejected(crd, body)


def test_immutable_fields_cannot_change(crd: LocalCluster, mirrors: MirrorFactory) -> None:
    body = mirror("crd-immutable", service={"clusterIP": "10.96.100.10"}, storage={"size": "5Gi", "storageClassName": "fast"})
    mirrors.track_mirror("crd-immutable")
    crd.kubectl("create", "-f", "-", input=body)
    changed = mirror("crd-immutable", service={"clusterIP": "10.96.100.11"}, storage={"size": "5Gi", "storageClassName": "fast"})
    # --force-conflicts: the fields were set by `kubectl create`; the point is the CEL verdict.
    apply = ("apply", "--server-side", "--force-conflicts")
    assert "service.clusterIP is immutable" in rejected(crd, changed, *apply)
    other_class = mirror("crd-immutable", service={"clusterIP": "10.96.100.10"}, storage={"size": "5Gi", "storageClassName": "slow"})
    assert "storage.storageClassName is immutable" in rejected(crd, other_class, *apply)
    shrunk = mirror("crd-immutable", service={"clusterIP": "10.96.100.10"}, storage={"size": "1Gi", "storageClassName": "fast"})
    assert "cannot shrink" in rejected(crd, shrunk, *apply)
    grown = mirror("crd-immutable", service={"clusterIP": "10.96.100.10"}, storage={"size": "20Gi", "storageClassName": "fast"})
    crd.kubectl(*apply, "-f", "-", input=grown)
    assert crd.kubectl_json("get", "registrymirror", "crd-immutable")["spec"]["storage"]["size"] == "20Gi"


def test_examples_are_accepted_by_the_api_server(crd: LocalCluster) -> None:
    examples = sorted((CRD_FILE.parents[1] / "examples").glob("*.yaml"))
    assert examples, "examples/ is empty"
    for path in examples:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d and d.get("kind") == "RegistryMirror"]
        for doc in docs:
            crd.kubectl("create", "--dry-run=server", "-f", "-", input=doc)
