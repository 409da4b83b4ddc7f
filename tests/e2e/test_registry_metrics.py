"""The registry metrics the dashboard and alerts read (registry_http_*: errors, latency of misses), from distribution 3 itself.

The mirrors run `registry:3.0.0`; Debian's docker-registry is 2.8, which keeps
its proxy counters in expvar only. So this test runs distribution v3.0.0 built
from its Go module (`tests/tools/build.sh registry`) with exactly the
config.yml and arguments `regmirror render` gives a mirror (addresses and
paths moved to loopback, as tests/e2e/test_datapath.py does), pulls an image
through it twice, and reads its debug port's /metrics. Loopback only, no root.
"""

from __future__ import annotations

import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from _dataplane import LoopbackMirror, MirrorObjects, Registry, free_port, tiny_image
from prometheus_client.parser import text_string_to_metric_families

from monitoring import queries
from tools.binaries import go_tool

MANIFEST_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
REPO = "library/hello"


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A plain distribution v3 holding one tiny image, standing in for Docker Hub."""
    work = tmp_path_factory.mktemp("upstream")
    port = free_port()
    config = work / "config.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "version": "0.1",
                "log": {"level": "warn"},
                "storage": {"filesystem": {"rootdirectory": str(work / "data")}},
                "http": {"addr": f"127.0.0.1:{port}"},
            }
        )
    )
    with Registry.launch(work, [str(go_tool("registry")), "serve", str(config)], None, "127.0.0.1", port) as registry:
        registry.push_image(REPO, "v1")
        yield registry


def _rendered_mirror(upstream_url: str, work: Path) -> LoopbackMirror:
    """What the operator would run for a mirror of `upstream_url`, planned onto loopback."""
    cr = work / "mirror.yaml"
    body = {"apiVersion": "regmirror.dev/v1alpha1", "kind": "RegistryMirror", "metadata": {"name": "metrics"}}
    body["spec"] = {"upstream": {"url": upstream_url}}
    cr.write_text(yaml.safe_dump(body))
    rendered = subprocess.run(
        [sys.executable, "-m", "regmirror", "render", "-f", str(cr)], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    config_map = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "regmirror-metrics")
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    service = next(d for d in docs if d["kind"] == "Service")
    objects = MirrorObjects(
        name="metrics",
        config_yml=config_map["data"]["config.yml"],
        container=deployment["spec"]["template"]["spec"]["containers"][0],
        secrets={},
        cluster_ip="10.96.0.10",
        port=service["spec"]["ports"][0]["port"],
    )
    return LoopbackMirror.plan(objects, work)


def _get(url: str, accept: str | None = None) -> bytes:
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(request, timeout=30) as response:
        return bytes(response.read())


def test_distribution_exports_every_registry_metric_the_dashboard_and_alerts_read(
    upstream: Registry, tmp_path_factory: pytest.TempPathFactory
) -> None:
    mirror = _rendered_mirror(upstream.url, tmp_path_factory.mktemp("mirror"))
    argv, env = mirror.argv_env()
    argv[0] = str(go_tool("registry"))  # the mirror's image runs distribution 3, not Debian's 2.8
    layer, config, _manifest = tiny_image()
    with Registry.launch(mirror.workdir, argv, env, mirror.host, mirror.port) as served:
        for _ in range(2):  # a miss, then a hit
            _get(f"{served.url}/v2/{REPO}/manifests/v1", MANIFEST_TYPE)
            for blob in (config, layer):
                assert _get(f"{served.url}/v2/{REPO}/blobs/{blob.digest}") == blob.data
        exposition = mirror.metrics()

    samples = [s for family in text_string_to_metric_families(exposition) for s in family.samples]
    names = {s.name for s in samples}
    needed = queries.read_from("distribution")
    assert needed <= names, f"distribution does not export {sorted(needed - names)}"

    def value(name: str, **labels: str) -> float:
        return sum(s.value for s in samples if s.name == name and labels.items() <= s.labels.items())

    # The proxy counters as distribution keeps them. With the Varnish front, hits it serves never
    # reach distribution, so the dashboard reads hits and bytes from the cache sidecar instead
    # (regmirror_cache_*, tests/e2e/test_cache_metrics.py); the sidecar reads these for its misses.
    blob_bytes = len(layer.data) + len(config.data)
    assert value("registry_proxy_misses_total", type="blob") == 2
    assert value("registry_proxy_hits_total", type="blob") == 2
    assert value("registry_proxy_requests_total", type="blob") == 4
    assert value("registry_proxy_pulled_bytes_total", type="blob") == blob_bytes
    assert value("registry_proxy_pushed_bytes_total", type="blob") == 2 * blob_bytes
    # The labels the alerts and the latency panel group by.
    assert value("registry_http_requests_total", handler="blob", code="200") == 4
    assert value("registry_http_requests_total", handler="manifest", code="200") == 2
    assert value("registry_http_request_duration_seconds_count", handler="manifest") == 2
