"""The cache itself, end to end: real distribution 3, real Varnish, the real sidecar, real containerd.

Each test runs the mirror pod exactly as `render_mirror_children` renders it
(what the operator applies), every container as a process on loopback
(harness/cachepath.py), in front of a real upstream registry (Debian's
docker-registry, access log on) seeded with small images built here. Nodes are
`regmirror agent --once` on a temporary host root plus a containerd of their
own pulling through the hosts.toml the agent wrote.

These tests feed the sidecar's mirror ConfigMap files directly, as the kubelet
would mount what the operator renders, and read the figures from the sidecar's
/stats. The operator's side (pins from running pods, the poll, status.cache) is
tests/integration/test_cache_pins.py and tests/e2e/test_status_cache_e2e.py.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _dataplane import (
    Containerd,
    ContainerdBinaries,
    Registry,
    served_requests,
    wait_for,
)
from _images import BuiltImage, multi_layer_image

from harness.cachepath import CachePod, configured_node, iptables_works, upstream_fault
from regmirror.models import RegistryMirrorSpec

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="runs containerd, varnishd and registries as daemons: needs root")

SMALL = (256 << 10, 64 << 10)  # two layers: pulls stay quick on a shared 2-core machine


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, BuiltImage]:
    root = tmp_path_factory.mktemp("cache-images")
    named = {f"img{i}": multi_layer_image(root / f"img{i}", name=f"library/cache{i}", layer_sizes=SMALL) for i in range(8)}
    named["moving-old"] = multi_layer_image(root / "moving-old", name="library/moving", tag="v1", layer_sizes=SMALL)
    named["moving-new"] = multi_layer_image(root / "moving-new", name="library/moving-next", tag="v1", layer_sizes=SMALL)
    return named


@pytest.fixture(scope="module")
def upstream(binaries: ContainerdBinaries, images: dict[str, BuiltImage], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    with Registry.start(tmp_path_factory.mktemp("cache-upstream")) as registry:
        for key, image in images.items():
            if key != "moving-new":
                image.push(registry.address)
        yield registry


def mirror_spec(upstream: Registry, **extra: Any) -> RegistryMirrorSpec:
    body: dict[str, Any] = {"upstream": {"url": upstream.url, "hosts": [upstream.address]}, "storage": {"ephemeral": True, "size": "1Gi"}}
    body.update(extra)
    return RegistryMirrorSpec.model_validate(body)


def ref(upstream: Registry, image: BuiltImage) -> str:
    return f"{upstream.address}/{image.name}:{image.tag}"


@contextlib.contextmanager
def nodes(binaries: ContainerdBinaries, root: Path, pod: CachePod | None, count: int) -> Iterator[list[tuple[Any, Containerd]]]:
    """`count` configured nodes, each with its own containerd."""
    with contextlib.ExitStack() as stack:
        out = []
        for i in range(count):
            node = configured_node(binaries, root / f"n{i}", pod)
            out.append((node, stack.enter_context(Containerd.start(binaries, str(node.certs_dir)))))
        yield out


def pull(node: Any, daemon: Containerd, reference: str, timeout: float = 120) -> str:
    """Pull; returns the digest the node resolved the reference to. Fails the test with ctr's output."""
    result = daemon.pull(reference, hosts_dir=str(node.certs_dir), timeout=timeout)
    assert result.returncode == 0, f"pull {reference} failed:\n{result.stderr[-1500:]}"
    for line in daemon.ctr("images", "ls").stdout.splitlines():
        fields = line.split()
        if fields and fields[0] == reference:
            return next(f for f in fields if f.startswith("sha256:"))
    raise AssertionError(f"{reference} not listed after the pull")


def fresh_pull(binaries: ContainerdBinaries, root: Path, pod: CachePod, reference: str, timeout: float = 120) -> str:
    with nodes(binaries, root, pod, 1) as [(node, daemon)]:
        return pull(node, daemon, reference, timeout)


def upstream_data_requests(upstream: Registry, since: int) -> list[Any]:
    """Manifest and blob requests the upstream answered after log offset `since` (pings excluded)."""
    return [r for r in served_requests(upstream.requests_log()[since:]) if "/manifests/" in r.uri or "/blobs/" in r.uri]


# ------------------------------------------------------------------ upstream once, and the figures


def test_concurrent_pulls_fetch_each_blob_and_the_manifest_once_and_the_figures_add_up(
    binaries: ContainerdBinaries, registry_binary: str, upstream: Registry, images: dict[str, BuiltImage], tmp_path: Path
) -> None:
    image = images["img0"]
    count = 4
    before = len(upstream.requests_log())
    with CachePod.run(mirror_spec(upstream), tmp_path / "pod", registry_binary) as pod, nodes(binaries, tmp_path, pod, count) as fleet:
        errors: list[BaseException] = []
        barrier = threading.Barrier(count)

        def go(node: Any, daemon: Containerd) -> None:
            try:
                barrier.wait(30)
                pull(node, daemon, ref(upstream, image))
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=go, args=pair) for pair in fleet]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        assert not errors, errors
        per_blob = upstream.blob_gets_logged(image.blobs_for_host, 1, since=before)
        log = upstream.requests_log()[before:]
        manifest_gets = [r for r in served_requests(log) if r.method == "GET" and "/manifests/" in r.uri and r.status == 200]
        print(f"\nupstream GETs per blob with {count} nodes at once: {per_blob}; manifest GETs: {len(manifest_gets)}")
        assert per_blob == dict.fromkeys(image.blobs_for_host, 1), "each blob came from the upstream once"
        assert len(manifest_gets) == 1, "the manifest came from the upstream once"

        manifest_size = len(image.top.data)
        want_from_upstream = image.bytes_for_host + manifest_size
        requests_per_pull = len(image.blobs_for_host) + 1  # the manifest and each blob
        figures = pod.wait_janitor(
            lambda s: s["bytesFromUpstream"] == want_from_upstream and s["hits"] + s["misses"] >= count * requests_per_pull,
            timeout=30,
            what="the sidecar's figures",
        )
        print(f"sidecar /stats: {figures}")
        assert figures["misses"] == requests_per_pull, "one miss per blob and manifest"
        # The tag HEAD each node sends is a hit too (answered from the front or the volume).
        assert figures["hits"] + figures["misses"] >= count * requests_per_pull
        served = count * want_from_upstream
        assert served <= figures["bytesServed"] <= served + 64 * count, "bytes sent to nodes: each node got the image once"
        assert figures["diskUsed"] == pod.disk_bytes() == want_from_upstream


# ------------------------------------------------------------------ bounded disk, pins


def test_a_stream_of_images_stays_under_the_cap_keeps_the_pinned_image_and_an_evicted_one_pulls_again(
    binaries: ContainerdBinaries, registry_binary: str, upstream: Registry, images: dict[str, BuiltImage], tmp_path: Path
) -> None:
    stream = [images[f"img{i}"] for i in range(1, 8)]
    one = stream[0].bytes_for_host + len(stream[0].top.data)
    cap = 3 * one  # the stream is ~2.3x the cap
    spec = mirror_spec(upstream, cache={"maxSize": str(cap), "highWatermarkPercent": 90, "lowWatermarkPercent": 60})
    pinned_image = stream[0]
    with CachePod.run(spec, tmp_path / "pod", registry_binary, pins=[pinned_image.top.digest]) as pod:
        peak = 0
        for i, image in enumerate(stream):
            fresh_pull(binaries, tmp_path / f"s{i}", pod, ref(upstream, image))
            # Wait for the janitor to see this pull (it wakes on the registry's notification).
            stats = pod.wait_janitor(lambda s: s["diskUsed"] == pod.disk_bytes(), timeout=30, what="the janitor's pass")
            peak = max(peak, pod.disk_bytes())
            assert pod.disk_bytes() <= cap * 1.05, f"after image {i}: {pod.disk_bytes()} bytes on a cap of {cap}"
            assert all(pod.blob_present(d) for d in [*pinned_image.blobs_for_host, pinned_image.top.digest]), "the pinned image stays whole"
        print(f"\ncap {cap} B, peak on disk {peak} B, last eviction {stats['lastEviction']}")
        assert stats["lastEviction"] and stats["lastEviction"]["reason"] == "SizeCap"
        assert stats["pinnedImages"] == 1
        evicted = stream[1]
        assert not any(pod.blob_present(d) for d in evicted.blobs_for_host), "the least recently pulled unpinned image went first"
        since = len(upstream.requests_log())
        fresh_pull(binaries, tmp_path / "again", pod, ref(upstream, evicted))
        again = upstream.blob_gets_logged(evicted.blobs_for_host, 1, since=since)
        assert again == dict.fromkeys(evicted.blobs_for_host, 1), "an evicted image is fetched again, once"


# ------------------------------------------------------------------ outages, past the TTL


FAULTS = ["stopped", "blackholed", "429", "503"]


@pytest.mark.parametrize("fault", FAULTS)
def test_upstream_outage_past_the_ttl_the_image_in_use_still_pulls(
    fault: str, binaries: ContainerdBinaries, registry_binary: str, upstream: Registry, images: dict[str, BuiltImage], tmp_path: Path
) -> None:
    if fault == "blackholed" and not iptables_works():
        pytest.skip("iptables cannot add OUTPUT rules here, so the upstream cannot be blackholed")
    in_use, idle = images["img1"], images["img2"]
    spec = mirror_spec(upstream, cache={"ttl": "3s"})
    with CachePod.run(spec, tmp_path / "pod", registry_binary, pins=[in_use.top.digest]) as pod:
        for i, image in enumerate((in_use, idle)):
            fresh_pull(binaries, tmp_path / f"warm{i}", pod, ref(upstream, image))
        # The sidecar records the eviction once its files are gone: wait for both, not for one then the other.
        stats = pod.wait_janitor(
            lambda s: s.get("lastEviction") is not None and not any(pod.blob_present(d) for d in idle.blobs_for_host),
            timeout=30,
            what="the TTL to evict the idle image",
        )
        assert stats["lastEviction"]["reason"] == "TTL"
        assert all(pod.blob_present(d) for d in in_use.blobs_for_host), "the image in use outlives the TTL"
        with upstream_fault(upstream, fault):
            pod.wait_upstream_verdict(False)
            pod.front_sees_upstream(healthy=False)
            digest = fresh_pull(binaries, tmp_path / "cold", pod, ref(upstream, in_use), timeout=90)
            assert digest == in_use.top.digest
            # Once more on another cold node: the steady state of an outage, not a lucky first try.
            assert fresh_pull(binaries, tmp_path / "cold2", pod, ref(upstream, in_use), timeout=90) == in_use.top.digest
        pod.wait_upstream_verdict(True)


# ------------------------------------------------------------------ tag freshness and invalidation


def test_a_fresh_tag_is_served_for_its_window_until_an_admin_invalidates_it(
    binaries: ContainerdBinaries, registry_binary: str, upstream: Registry, images: dict[str, BuiltImage], tmp_path: Path
) -> None:
    old, new = images["moving-old"], images["moving-new"]
    spec = mirror_spec(upstream, cache={"tagFreshness": "1h"})
    reference = ref(upstream, old)  # library/moving:v1
    with CachePod.run(spec, tmp_path / "pod", registry_binary) as pod:
        assert fresh_pull(binaries, tmp_path / "a", pod, reference) == old.top.digest
        # The tag moves upstream: the new image's content pushed under the old name and tag.
        moved = BuiltImage(old.name, old.tag, new.layout, new.top, new.blobs_for_host)
        moved.push(upstream.address)
        since = len(upstream.requests_log())
        assert fresh_pull(binaries, tmp_path / "b", pod, reference) == old.top.digest, "within the window the cached tag is served"
        assert upstream_data_requests(upstream, since) == [], "and the upstream is not asked"
        pod.write_control(invalidations={f"{old.name}:{old.tag}": "request-1"})
        wait_for(lambda: '"tag.invalidated"' in pod.log("cache"), 30, "the sidecar to ban the tag")
        assert fresh_pull(binaries, tmp_path / "c", pod, reference) == new.top.digest, "after invalidation the tag is checked again"


# ------------------------------------------------------------------ prewarm


def test_a_prewarmed_image_pulls_on_a_cold_node_without_asking_the_upstream(
    binaries: ContainerdBinaries, registry_binary: str, upstream: Registry, images: dict[str, BuiltImage], tmp_path: Path
) -> None:
    image = images["img3"]
    spec = mirror_spec(upstream, cache={"tagFreshness": "10m"}, prewarm=[{"image": f"{upstream.address}/{image.name}:{image.tag}"}])
    with CachePod.run(spec, tmp_path / "pod", registry_binary) as pod:
        stats = pod.wait_janitor(lambda s: (s.get("prewarm") or {}).get("ready") == 1, timeout=60, what="prewarm to finish")
        print(f"\nprewarm: {stats['prewarm']}")
        assert all(pod.blob_present(d) for d in image.blobs_for_host)
        since = len(upstream.requests_log())
        assert fresh_pull(binaries, tmp_path / "cold", pod, ref(upstream, image)) == image.top.digest
        assert served_requests(upstream.requests_log()[since:]) == [], "the cold node's pull made no upstream request"
