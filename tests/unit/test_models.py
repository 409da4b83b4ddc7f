"""The RegistryMirror spec: what is rejected (with the field named) and how hosts are derived."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from regmirror.models import RegistryMirrorSpec, normalize_registry_host, registry_host_from_url


def spec(**overrides: Any) -> RegistryMirrorSpec:
    body: dict[str, Any] = {"upstream": {"url": "https://registry-1.docker.io"}, **overrides}
    return RegistryMirrorSpec.model_validate(body)


def rejected(**overrides: Any) -> str:
    with pytest.raises(ValidationError) as info:
        spec(**overrides)
    return str(info.value)


def test_defaults_are_valid() -> None:
    s = spec()
    assert s.replicas == 1
    assert s.storage.size == "10Gi"
    assert s.cache.ttl == "168h"


@pytest.mark.parametrize("url", ["ftp://quay.io", "quay.io", "https://", "https://bad host", ""])
def test_bad_upstream_url_names_the_field(url: str) -> None:
    assert "upstream.url" in rejected(upstream={"url": url})


@pytest.mark.parametrize("size", ["0", "0Gi", "-1Gi", "ten", "1.5.2Gi"])
def test_non_positive_or_malformed_size_names_the_field(size: str) -> None:
    assert "storage" in rejected(storage={"size": size})


@pytest.mark.parametrize("ttl", ["7d", "1 hour", "-1h", "h", "168"])
def test_bad_ttl_names_the_field(ttl: str) -> None:
    assert "cache.ttl" in rejected(cache={"ttl": ttl})


@pytest.mark.parametrize("ttl", ["0", "168h", "1h30m", "90s"])
def test_good_ttls(ttl: str) -> None:
    assert spec(cache={"ttl": ttl}).cache.ttl == ttl


def test_replicas_above_one_need_shared_storage() -> None:
    assert "replicas" in rejected(replicas=2)
    assert "replicas" in rejected(replicas=2, storage={"accessModes": ["ReadWriteOncePod"]})
    assert spec(replicas=2, storage={"accessModes": ["ReadWriteMany"]}).replicas == 2
    assert spec(replicas=3, storage={"ephemeral": True}).replicas == 3


def test_unknown_fields_are_rejected_by_name() -> None:
    assert "upstreem" in rejected(upstreem={})


def test_never_contact_upstream_with_zero_replicas_is_rejected() -> None:
    assert "replicas" in rejected(replicas=0, nodeConfig={"fallback": "NeverContactUpstream"})


@pytest.mark.parametrize(
    ("url", "host"),
    [
        ("https://registry-1.docker.io", "docker.io"),
        ("https://index.docker.io", "docker.io"),
        ("https://REGISTRY-1.docker.io/", "docker.io"),
        ("https://quay.io", "quay.io"),
        ("https://ghcr.io:443", "ghcr.io"),
        ("http://registry.local:5000", "registry.local:5000"),
    ],
)
def test_default_host_is_derived_from_the_url(url: str, host: str) -> None:
    assert registry_host_from_url(url) == host
    assert spec(upstream={"url": url}).upstream.effective_hosts() == [host]


def test_explicit_hosts_are_honoured_and_docker_hub_aliases_folded() -> None:
    s = spec(upstream={"url": "https://mirror.gcr.io", "hosts": ["index.docker.io", "Registry.K8s.io", "gcr.io"]})
    assert s.upstream.effective_hosts() == ["docker.io", "registry.k8s.io", "gcr.io"]
    assert normalize_registry_host("docker.io") == "docker.io"


def test_url_trailing_slash_is_dropped() -> None:
    assert spec(upstream={"url": "https://quay.io/"}).upstream.url == "https://quay.io"
