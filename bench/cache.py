"""The cache's targets (issue 13), with the mirror pod as rendered: distribution 3 behind Varnish, and the sidecar.

- fan-in: N containerd nodes pull one multi-layer image at the same moment
  through a cold mirror. Upstream GETs per blob and per manifest, and the
  slowest pull against a single direct pull in the same run (and against N
  direct pulls at once, which pay the same CPU contention on this machine).
  The same N nodes through bare distribution 3 (no front) for comparison;
- warm pull through the front / direct;
- prewarm: a cold node's pull of a prewarmed image / a warm pull, and the
  upstream requests it made;
- cap: a stream of distinct images totalling 3x the cap, disk sampled every
  0.1 s by the benchmark itself; the pinned image intact; an evicted image
  pulls again;
- outage: with the upstream stopped, then blackholed, then answering 429, past
  the TTL: the share of previously pulled images in use that still pull.

A scenario that fails is recorded as ``{"error": ...}`` under its own key, and
the others still run: one broken scenario costs its figures only.
"""

from __future__ import annotations

import contextlib
import statistics
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from harness.cachepath import CachePod, configured_node, iptables_works, upstream_fault
from harness.dataplane import Containerd, ContainerdBinaries, LoopbackMirror, Registry, blob_gets, served_requests
from harness.dataplane.images import BuiltImage, multi_layer_image
from regmirror.models import RegistryMirrorSpec

PULL_TIMEOUT = 180.0


def _log(msg: str) -> None:
    import sys

    print(f"[bench {time.strftime('%H:%M:%S')}] cache: {msg}", file=sys.stderr, flush=True)


def _spec(upstream: Registry, **extra: Any) -> RegistryMirrorSpec:
    body: dict[str, Any] = {"upstream": {"url": upstream.url, "hosts": [upstream.address]}, "storage": {"ephemeral": True, "size": "4Gi"}}
    body.update(extra)
    return RegistryMirrorSpec.model_validate(body)


def _ref(upstream: Registry, image: BuiltImage) -> str:
    return f"{upstream.address}/{image.name}:{image.tag}"


def _bytes(image: BuiltImage) -> int:
    blobs = image.layout / "blobs" / "sha256"
    return sum((blobs / d.removeprefix("sha256:")).stat().st_size for d in image.blobs_for_host) + len(image.top.data)


class Bench:
    """Shared pieces: the work dir, the containerd binaries, the upstream, distribution 3."""

    def __init__(self, work: Path, binaries: ContainerdBinaries, upstream: Registry, registry_binary: str) -> None:
        self.work, self.binaries, self.upstream, self.registry_binary = work, binaries, upstream, registry_binary
        self._seq = 0

    def dir(self, prefix: str) -> Path:
        self._seq += 1
        return self.work / f"{prefix}{self._seq}"

    @contextlib.contextmanager
    def daemons(self, pod: CachePod | LoopbackMirror | None, count: int) -> Iterator[list[tuple[Any, Containerd]]]:
        """`count` configured nodes with their containerd already running (start-up is not timed)."""
        with contextlib.ExitStack() as stack:
            out = []
            for _ in range(count):
                if isinstance(pod, LoopbackMirror):
                    from harness.dataplane import AgentNode, map_plan
                    from regmirror.nodeplan import build_node_plan, mirror_entry

                    root = self.dir("node")
                    node = AgentNode(root.name, root, {}, runtime_version=f"containerd://{self.binaries.version}.0")
                    node.write_containerd_config()
                    node.certs_dir.mkdir(parents=True, exist_ok=True)
                    spec = _spec(self.upstream)
                    plan = build_node_plan([mirror_entry(pod.objects.name, spec, pod.objects.cluster_ip)]).to_json()
                    rc, events = node.agent_once(map_plan(plan, [pod]))
                    if rc != 0:
                        raise RuntimeError(f"agent failed: {events}")
                else:
                    node = configured_node(self.binaries, self.dir("node"), pod)
                out.append((node, stack.enter_context(Containerd.start(self.binaries, str(node.certs_dir)))))
            yield out

    def pull_all(self, fleet: list[tuple[Any, Containerd]], image: BuiltImage) -> list[tuple[float, int]]:
        """Every node pulls at the same moment (a barrier); (seconds, exit code) each."""
        results: list[tuple[float, int]] = []
        barrier = threading.Barrier(len(fleet))
        lock = threading.Lock()

        def go(node: Any, daemon: Containerd) -> None:
            barrier.wait(60)
            started = time.monotonic()
            rc = daemon.pull(_ref(self.upstream, image), hosts_dir=str(node.certs_dir), timeout=PULL_TIMEOUT).returncode
            with lock:
                results.append((time.monotonic() - started, rc))

        threads = [threading.Thread(target=go, args=pair) for pair in fleet]
        for t in threads:
            t.start()
        for t in threads:
            t.join(PULL_TIMEOUT + 60)
        return results

    def one_pull(self, pod: CachePod | None, image: BuiltImage) -> float:
        with self.daemons(pod, 1) as fleet:
            [(seconds, rc)] = self.pull_all(fleet, image)
        if rc != 0:
            raise RuntimeError(f"pull of {image.name} failed")
        return seconds

    def pod(self, spec: RegistryMirrorSpec, pins: list[str] | None = None) -> Any:
        return CachePod.run(spec, self.dir("pod"), self.registry_binary, pins=pins)


def _upstream_counts(log: str, image: BuiltImage) -> tuple[dict[str, int], int]:
    per_blob = blob_gets(log, image.blobs_for_host)
    manifests = sum(1 for r in served_requests(log) if r.method == "GET" and "/manifests/" in r.uri and r.status == 200)
    return per_blob, manifests


def fan_in(b: Bench, image: BuiltImage, nodes: int, repeats: int) -> dict[str, Any]:
    """N nodes at once: through the cache pod, through bare distribution 3, and direct."""
    direct_single = statistics.median(b.one_pull(None, image) for _ in range(repeats))
    with b.daemons(None, nodes) as fleet:
        direct_all = b.pull_all(fleet, image)
    out: dict[str, Any] = {"nodes": nodes, "image_bytes": _bytes(image), "direct_single": round(direct_single, 3)}
    out["direct_concurrent_slowest"] = round(max(s for s, _ in direct_all), 3)
    before = len(b.upstream.requests_log())
    with b.pod(_spec(b.upstream)) as pod, b.daemons(pod, nodes) as fleet:
        results = b.pull_all(fleet, image)
    per_blob, manifests = _upstream_counts(b.upstream.requests_log()[before:], image)
    slowest = max(s for s, _ in results)
    out["front"] = {
        "pulls_ok": sum(1 for _, rc in results if rc == 0),
        "upstream_gets_per_blob": sorted(per_blob.values()),
        "upstream_manifest_gets": manifests,
        "slowest": round(slowest, 3),
        "median": round(statistics.median(s for s, _ in results), 3),
        "slowest_over_direct_single": round(slowest / direct_single, 2),
        "slowest_over_direct_concurrent": round(slowest / out["direct_concurrent_slowest"], 2),
    }
    # Bare distribution 3, the rendering before the front (what the README's figures measured).
    from bench.dataplane import bare_mirror

    before = len(b.upstream.requests_log())
    with bare_mirror(b) as (mirror, _registry), b.daemons(mirror, nodes) as fleet:
        results = b.pull_all(fleet, image)
    per_blob, manifests = _upstream_counts(b.upstream.requests_log()[before:], image)
    out["bare_distribution"] = {
        "pulls_ok": sum(1 for _, rc in results if rc == 0),
        "upstream_gets_per_blob": sorted(per_blob.values()),
        "upstream_manifest_gets": manifests,
        "upstream_blob_bytes": sum(
            per_blob[d] * (image.layout / "blobs" / "sha256" / d.removeprefix("sha256:")).stat().st_size for d in per_blob
        ),
        "slowest": round(max(s for s, _ in results), 3),
    }
    return out


def warm_and_prewarm(b: Bench, image: BuiltImage, prewarmed: BuiltImage, repeats: int) -> dict[str, Any]:
    """Warm pull / direct; a prewarmed image's first pull on a cold node / a warm pull, and its upstream requests."""
    direct = statistics.median(b.one_pull(None, image) for _ in range(repeats))
    spec = _spec(b.upstream, cache={"tagFreshness": "10m"}, prewarm=[{"image": _ref(b.upstream, prewarmed)}])
    with b.pod(spec) as pod:
        b.one_pull(pod, image)  # fills the cache
        warm = statistics.median(b.one_pull(pod, image) for _ in range(repeats))
        started = time.monotonic()
        pod.wait_janitor(lambda s: (s.get("prewarm") or {}).get("ready") == 1, timeout=300, what="prewarm")
        prewarm_seconds = time.monotonic() - started
        before = len(b.upstream.requests_log())
        first = b.one_pull(pod, prewarmed)
        during = served_requests(b.upstream.requests_log()[before:])
        # Manifests and blobs only: the sidecar's `GET /v2/` health probe (every 5 s) is not part of a pull.
        upstream_requests = sum(1 for r in during if "/manifests/" in r.uri or "/blobs/" in r.uri)
        probes = sum(1 for r in during if r.uri == "/v2/")
        warm_prewarmed = statistics.median(b.one_pull(pod, prewarmed) for _ in range(repeats))
    return {
        "direct": round(direct, 3),
        "warm": round(warm, 3),
        "warm_ratio": round(warm / direct, 2),
        "prewarm_wait_seconds": round(prewarm_seconds, 1),
        "prewarmed_first_pull": round(first, 3),
        "prewarmed_warm_pull": round(warm_prewarmed, 3),
        "prewarmed_first_over_warm": round(first / warm_prewarmed, 2),
        "prewarmed_upstream_requests": upstream_requests,
        "upstream_pings_meanwhile": probes,
    }


def cap_stream(b: Bench, stream: list[BuiltImage]) -> dict[str, Any]:
    """Distinct images totalling ~3x the cap, one after another; disk sampled by the benchmark."""
    total = sum(_bytes(i) for i in stream)
    cap = total // 3
    spec = _spec(b.upstream, cache={"maxSize": str(cap)})
    pinned = stream[0]
    peak = 0
    samples = 0
    halt = threading.Event()
    with b.pod(spec, pins=[pinned.top.digest]) as pod:

        def sample() -> None:
            nonlocal peak, samples
            while not halt.is_set():
                peak = max(peak, pod.disk_bytes())
                samples += 1
                halt.wait(0.1)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        for image in stream:
            b.one_pull(pod, image)
        pod.wait_janitor(lambda s: s["diskUsed"] == pod.disk_bytes(), timeout=30, what="the last janitor pass")
        halt.set()
        sampler.join(5)
        pinned_whole = all(pod.blob_present(d) for d in [*pinned.blobs_for_host, pinned.top.digest])
        evicted = next((i for i in stream[1:] if not any(pod.blob_present(d) for d in i.blobs_for_host)), None)
        refetched = None
        if evicted is not None:
            before = blob_gets(b.upstream.requests_log(), evicted.blobs_for_host)
            b.one_pull(pod, evicted)
            after = blob_gets(b.upstream.requests_log(), evicted.blobs_for_host)
            refetched = all(after[d] == before[d] + 1 for d in evicted.blobs_for_host)
        stats = pod.stats()
    return {
        "cap_bytes": cap,
        "stream_bytes": total,
        "images": len(stream),
        "peak_disk_bytes": peak,
        "peak_over_cap": round(peak / cap, 3),
        "disk_samples": samples,
        "pinned_image_whole": pinned_whole,
        "evicted_image_pulled_again_from_upstream": refetched,
        "last_eviction": stats.get("lastEviction"),
    }


def outage(b: Bench, images: list[BuiltImage]) -> dict[str, Any]:
    """Images in use, pulled before; TTL passed; then the upstream stopped, blackholed, answering 429."""
    kinds = ["stopped", *(["blackholed"] if iptables_works() else []), "429"]
    out: dict[str, Any] = {}
    spec = _spec(b.upstream, cache={"ttl": "3s"})
    with b.pod(spec, pins=[i.top.digest for i in images]) as pod:
        for image in images:
            b.one_pull(pod, image)
        time.sleep(4)  # past the TTL: the janitor runs every 5 s at most; the images are pinned, so nothing goes
        pod.wait_janitor(lambda s: s["pinnedImages"] == len(images), timeout=30, what="pins seen")
        for kind in kinds:
            with upstream_fault(b.upstream, kind):
                pod.wait_upstream_verdict(False)
                pod.front_sees_upstream(healthy=False)
                ok, seconds = 0, []
                for image in images:
                    try:
                        seconds.append(b.one_pull(pod, image))
                        ok += 1
                    except RuntimeError:
                        pass
            pod.wait_upstream_verdict(True)
            out[kind] = {"pulled": ok, "of": len(images), "median_seconds": round(statistics.median(seconds), 3) if seconds else None}
            _log(f"outage {kind}: {ok}/{len(images)} pulled")
    return out


def run(work: Path, binaries: ContainerdBinaries, upstream: Registry, registry_binary: str, repeats: int, fan_nodes: int) -> dict[str, Any]:
    """All cache scenarios; images pushed to `upstream` here."""
    b = Bench(work, binaries, upstream, registry_binary)
    big = multi_layer_image(work / "cache-big", name="library/cache-big", layer_sizes=(24 << 20, 8 << 20, 1 << 20))
    small = multi_layer_image(work / "cache-small", name="library/cache-small")
    pre = multi_layer_image(work / "cache-pre", name="library/cache-pre", layer_sizes=(24 << 20, 8 << 20, 1 << 20))
    stream = [multi_layer_image(work / f"cache-s{i}", name=f"library/cache-s{i}", layer_sizes=(2 << 20, 512 << 10)) for i in range(9)]
    for image in [big, small, pre, *stream]:
        image.push(upstream.address)
    scenarios: dict[str, Callable[[], dict[str, Any]]] = {
        "fan_in": lambda: fan_in(b, big, fan_nodes, repeats),
        "warm_prewarm": lambda: warm_and_prewarm(b, big, pre, repeats),
        "cap_stream": lambda: cap_stream(b, stream),
        "outage": lambda: outage(b, [small, stream[0]]),
    }
    result: dict[str, Any] = {}
    for key, scenario in scenarios.items():
        try:
            result[key] = scenario()
        except Exception as exc:
            traceback.print_exc()
            result[key] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
        _log(f"{key}: {result[key]}")
    return result
