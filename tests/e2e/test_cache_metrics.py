"""The cache sidecar's metrics the dashboard and alerts read, from the real mirror pod.

Hits the Varnish front serves never reach distribution, so the dashboard's hit
ratio and bytes saved come from the sidecar's regmirror_cache_* (port `cache`,
/metrics), not from distribution's registry_proxy_*. This test runs the mirror
pod exactly as the operator renders it (harness/cachepath.py: distribution 3,
Debian's varnishd with the rendered VCL, the front-stats loop, the real
`regmirror cache serve`) in front of a real upstream registry on loopback,
sends a miss then a hit through the front, and reads the sidecar's /metrics
the way Prometheus would. Needs root (varnishd and registries as daemons).
"""

from __future__ import annotations

import os
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from _dataplane import Registry, tiny_image, wait_for
from prometheus_client.parser import text_string_to_metric_families

from harness.cachepath import CachePod
from monitoring import queries
from regmirror.models import RegistryMirrorSpec

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="runs varnishd and registries as daemons: needs root")

MANIFEST_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
PULLED, PREWARMED = ("library/hello", "v1", "pulled through the front\n"), ("library/warm", "v1", "prewarmed\n")
# What the front sends besides the blob: the harness's readiness GET of /v2/ ("{}"), nothing else.
OTHER_BODY_BYTES = 64

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A plain registry (Debian's) holding two tiny images, standing in for Docker Hub."""
    with Registry.start(tmp_path_factory.mktemp("metrics-upstream")) as registry:
        for repo, tag, text in (PULLED, PREWARMED):
            registry.push_image(repo, tag, text)
        yield registry


def _spec(upstream: Registry, **extra: Any) -> RegistryMirrorSpec:
    body: dict[str, Any] = {"upstream": {"url": upstream.url, "hosts": [upstream.address]}, "storage": {"ephemeral": True, "size": "1Gi"}}
    return RegistryMirrorSpec.model_validate({**body, **extra})


def _get(url: str, accept: str | None = None) -> bytes:
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(request, timeout=30) as response:
        return bytes(response.read())


def _scrape(pod: CachePod) -> Samples:
    """The sidecar's /metrics as Prometheus parses it: (name, labels) -> value."""
    text = _get(f"{pod.sidecar_url}/metrics").decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for family in text_string_to_metric_families(text) for s in family.samples}


def _value(samples: Samples, name: str, **labels: str) -> float:
    return sum(v for (n, sample_labels), v in samples.items() if n == name and labels.items() <= dict(sample_labels).items())


def _names(samples: Samples) -> set[str]:
    return {name for name, _ in samples}


def _scrape_until(pod: CachePod, predicate: Callable[[Samples], bool], timeout: float, what: str) -> Samples:
    """Scrape until `predicate` holds for a scrape; that scrape."""
    return wait_for(lambda: s if predicate(s := _scrape(pod)) else None, timeout, what, diagnose=lambda: pod.log("cache")[-1500:])


def test_the_sidecar_counts_front_hits_and_exports_every_cache_metric_the_dashboard_and_alerts_read(
    registry_binary: str, upstream: Registry, tmp_path: Path
) -> None:
    layer, _config, manifest = tiny_image(PULLED[2])
    repo = PULLED[0]
    # The pulled image's manifest is pinned (as if a pod ran it): it counts once it is on the volume.
    with CachePod.run(_spec(upstream), tmp_path / "pod", registry_binary, name="metrics", pins=[manifest.digest]) as pod:
        assert pod.has_front, "a plain-HTTP mirror is served by the Varnish front"
        at_start = _scrape(pod)
        assert _value(at_start, "regmirror_cache_hits_total") == 0
        assert _value(at_start, "regmirror_cache_misses_total") == 0

        # A miss (the front asks distribution, which fetches from the upstream), then a hit the front answers alone.
        for _ in range(2):
            assert _get(f"{pod.url}/v2/{repo}/blobs/{layer.digest}") == layer.data
        # The sidecar reads the front's counters from the file front-stats rewrites every few seconds.
        after = _scrape_until(pod, lambda s: _value(s, "regmirror_cache_hits_total") >= 1, 30, "the sidecar to count the front's hit")
        hits = _value(after, "regmirror_cache_hits_total")
        misses = _value(after, "regmirror_cache_misses_total")
        served = _value(after, "regmirror_cache_served_bytes_total")
        fetched = _value(after, "regmirror_cache_upstream_bytes_total")
        print(
            f"\nsidecar after a miss and a hit: hits {hits:.0f}, misses {misses:.0f}, served {served:.0f} B, from upstream {fetched:.0f} B"
        )
        assert (hits, misses) == (1, 1), "the hit was the front's; distribution saw one request, a miss"
        # The dashboard's formulas over these counters (increase() of counters that started at 0).
        assert hits / (hits + misses) == 0.5, "hit ratio"
        assert fetched == len(layer.data), "the upstream sent the blob once"
        assert 2 * len(layer.data) <= served <= 2 * len(layer.data) + OTHER_BODY_BYTES, "the front sent the blob twice"
        saved = served - fetched
        assert len(layer.data) <= saved <= len(layer.data) + OTHER_BODY_BYTES, "bytes saved: the blob the hit did not fetch"
        # distribution itself never saw the hit: why the dashboard no longer reads registry_proxy_*.
        registry_text = _get(f"http://127.0.0.1:{pod.ports['debug']}/metrics").decode()
        registry_samples = [s for f in text_string_to_metric_families(registry_text) for s in f.samples]
        assert sum(s.value for s in registry_samples if s.name == "registry_proxy_hits_total") == 0

        # The gauges: the cap from spec (90% of 1Gi), the blob on disk once the janitor scanned,
        # the upstream reachable, the pinned manifest once pulled.
        _get(f"{pod.url}/v2/{repo}/manifests/{manifest.digest}", MANIFEST_TYPE)
        gauges = _scrape_until(
            pod,
            lambda s: _value(s, "regmirror_cache_disk_used_bytes") >= len(layer.data) and _value(s, "regmirror_cache_pinned_images") == 1,
            30,
            "the janitor to count the blob and the pinned image",
        )
        assert _value(gauges, "regmirror_cache_disk_cap_bytes") == (1 << 30) * 90 // 100
        assert _value(gauges, "regmirror_cache_disk_used_bytes") < _value(gauges, "regmirror_cache_disk_cap_bytes")
        assert _value(gauges, "regmirror_cache_upstream_up") == 1

        # Prewarm state appears once spec.prewarm lists an image (the operator's ConfigMap, swapped as the kubelet does).
        pod.spec = _spec(upstream, prewarm=[{"image": f"{upstream.address}/{PREWARMED[0]}:{PREWARMED[1]}"}])
        pod.write_control(pins=[manifest.digest])
        final = _scrape_until(
            pod, lambda s: _value(s, "regmirror_cache_prewarm_images", state="ready") == 1, 60, "the prewarm of one image"
        )
        assert _value(final, "regmirror_cache_prewarm_images", state="pending") == 0

    needed = queries.read_from("sidecar")
    assert needed, "the dashboard and alerts read no cache sidecar metric"
    assert needed <= _names(final), f"the cache sidecar does not export {sorted(needed - _names(final))}"
    assert queries.variable_metrics() <= _names(at_start), "the dashboard's mirror variable needs a series from the first scrape"
    # Counters only grow (Prometheus' increase() reads a drop as a restart).
    for name in (n for n in _names(final) if n.endswith("_total")):
        assert _value(at_start, name) <= _value(after, name) <= _value(final, name), name
