"""Two mirror replicas on one S3 bucket: real distribution 3, real Varnish, the real sidecar, real containerd.

A real S3-compatible server (versitygw, posix back-end; tests/harness/s3.py)
holds the bucket. Each replica is the mirror pod exactly as the operator
renders it for `storage.s3` with `replicas: 2` (harness/cachepath.py: every
container a process on loopback), with the bucket's key given through the
Secret-backed env vars the Deployment names. Nodes are `regmirror agent
--once` plus a containerd of their own; where the test needs the one address
nodes really use (the Service's ClusterIP), `LoopbackService` spreads
connections over the replicas' fronts like kube-proxy and drops an endpoint
the way an EndpointSlice update does.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _dataplane import (
    AgentNode,
    Containerd,
    ContainerdBinaries,
    LoopbackMap,
    Registry,
    build_containerd,
    free_port,
    map_to_loopback,
    served_requests,
    wait_for,
)
from _images import BuiltImage, multi_layer_image

from harness.cachepath import CLUSTER_IP, CachePod, configured_node, iptables_works
from harness.s3 import S3Server, versitygw_binary
from harness.service import KernelService, LoopbackService, blackholed
from regmirror.models import RegistryMirrorSpec
from regmirror.nodeplan import build_node_plan, mirror_entry
from regmirror.render.mirror import render_mirror_children

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="runs containerd, varnishd, registries and an S3 server as daemons: needs root")

BUCKET = "mirrors"
MIRROR = "hub"
KEY_SECRET = "bucket-key"
LAYERS = (384 << 10, 96 << 10)
# A loopback address no other test uses: the emulated ClusterIP's DNAT rules match only it.
VIRTUAL_IP = "127.0.0.77"


@pytest.fixture(scope="module")
def s3_binary() -> str:
    binary, why = versitygw_binary()
    if binary is None:
        pytest.skip(why)
    return binary


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, BuiltImage]:
    root = tmp_path_factory.mktemp("ha-images")
    return {f"img{i}": multi_layer_image(root / f"img{i}", name=f"library/ha{i}", layer_sizes=LAYERS) for i in range(4)}


@pytest.fixture(scope="module")
def upstream(binaries: ContainerdBinaries, images: dict[str, BuiltImage], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    with Registry.start(tmp_path_factory.mktemp("ha-upstream")) as registry:
        for image in images.values():
            image.push(registry.address)
        yield registry


@pytest.fixture
def s3(s3_binary: str, tmp_path: Path) -> Iterator[S3Server]:
    with S3Server.start(tmp_path / "s3", s3_binary, BUCKET) as server:
        yield server


def ha_spec(upstream: Registry, s3: S3Server) -> RegistryMirrorSpec:
    return RegistryMirrorSpec.model_validate(
        {
            "upstream": {"url": upstream.url, "hosts": [upstream.address]},
            "replicas": 2,
            "storage": {"size": "1Gi", "s3": {"endpoint": s3.endpoint, "bucket": BUCKET, "credentialsSecretRef": {"name": KEY_SECRET}}},
        }
    )


@contextlib.contextmanager
def replicas(spec: RegistryMirrorSpec, s3: S3Server, root: Path, registry_binary: str, count: int = 2) -> Iterator[list[CachePod]]:
    """`count` replicas of one mirror, each the full rendered pod, sharing the bucket."""
    secrets = {KEY_SECRET: {"accessKey": s3.access_key, "secretKey": s3.secret_key}}
    with contextlib.ExitStack() as stack:
        yield [
            stack.enter_context(CachePod.run(spec, root / f"replica{i}", registry_binary, name=MIRROR, secrets=secrets))
            for i in range(count)
        ]


def ref(upstream: Registry, image: BuiltImage, *, by_digest: bool = False) -> str:
    base = f"{upstream.address}/{image.name}"
    return f"{base}@{image.top.digest}" if by_digest else f"{base}:{image.tag}"


def node_behind(binaries: ContainerdBinaries, root: Path, spec: RegistryMirrorSpec, address: str) -> AgentNode:
    """A node whose agent wrote the plan of this mirror with the ClusterIP mapped to `address`."""
    node = AgentNode(root.name, root, {}, runtime_version=f"containerd://{binaries.version}.0")
    node.write_containerd_config()
    node.certs_dir.mkdir(parents=True, exist_ok=True)
    plan = build_node_plan([mirror_entry(MIRROR, spec, CLUSTER_IP)]).to_json()
    mapped = map_to_loopback(json.loads(plan), LoopbackMap({f"{CLUSTER_IP}:{spec.service.port}": address}, {}))
    rc, events = node.agent_once(json.dumps(mapped))
    assert rc == 0, events
    return node


def pull(binaries: ContainerdBinaries, node: AgentNode, reference: str, timeout: float = 120) -> float:
    """Pull on a fresh containerd of this node; returns the seconds it took. Fails the test with ctr's output."""
    with Containerd.start(binaries, str(node.certs_dir)) as daemon:
        started = time.monotonic()
        result = daemon.pull(reference, hosts_dir=str(node.certs_dir), timeout=timeout)
        took = time.monotonic() - started
        assert result.returncode == 0, f"pull {reference} failed:\n{result.stderr[-1500:]}"
    return took


def data_requests(upstream: Registry, since: int) -> list[Any]:
    """Manifest and blob requests the upstream answered after log offset `since` (pings excluded)."""
    return [r for r in served_requests(upstream.requests_log()[since:]) if "/manifests/" in r.uri or "/blobs/" in r.uri]


def blob_keys(s3: S3Server, image: BuiltImage) -> list[str]:
    return [f"regmirror/{MIRROR}/docker/registry/v2/blobs/sha256/{d[7:9]}/{d[7:]}/data" for d in image.blobs_for_host]


def from_mirror(request: Any) -> bool:
    """Whether a request the upstream served came from a replica (distribution) rather than containerd's fallback."""
    return "containerd" not in request.agent


def mirror_blob_gets(upstream: Registry, image: BuiltImage) -> dict[str, int]:
    """How many times the replicas (not containerd's fallback) fetched each blob of `image` from the upstream."""
    counts = dict.fromkeys(image.blobs_for_host, 0)
    for r in served_requests(upstream.requests_log()):
        if r.method == "GET" and r.status == 200 and from_mirror(r) and "/blobs/" in r.uri:
            digest = r.uri.split("/blobs/", 1)[1].split("?", 1)[0]
            if digest in counts:
                counts[digest] += 1
    return counts


def kill(pod: CachePod) -> None:
    """The replica dies at once (SIGKILL to every container): its port refuses from now on."""
    for proc in pod.procs.values():
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()


# ------------------------------------------------------------------ one cache for every replica


def test_an_image_pulled_through_one_replica_is_warm_through_the_other(
    binaries: ContainerdBinaries, registry_binary: str, s3: S3Server, upstream: Registry, images: dict[str, BuiltImage], tmp_path: Path
) -> None:
    image = images["img0"]
    spec = ha_spec(upstream, s3)
    with replicas(spec, s3, tmp_path, registry_binary) as (a, b):
        assert a.stats()["eviction"] == b.stats()["eviction"] == "off", "no sidecar evicts from the shared bucket"
        before = len(upstream.requests_log())
        cold = pull(binaries, configured_node(binaries, tmp_path / "n-a", a), ref(upstream, image))
        fetched = upstream.blob_gets_logged(image.blobs_for_host, 1, since=before)
        assert fetched == dict.fromkeys(image.blobs_for_host, 1), "replica A fetched each blob once"
        stored = s3.client.list_keys(BUCKET, f"regmirror/{MIRROR}/")
        assert all(key in stored for key in blob_keys(s3, image)), "the blobs are in the bucket under the mirror's prefix"
        assert all(stored[k] > 0 for k in blob_keys(s3, image))

        # Through B, by digest (what kubelet pulls once a Deployment's image is resolved): nothing upstream.
        since = len(upstream.requests_log())
        warm = pull(binaries, configured_node(binaries, tmp_path / "n-b1", b), ref(upstream, image, by_digest=True))
        assert data_requests(upstream, since) == [], "a warm pull through the other replica asks the upstream nothing"

        # Through B, by tag: the tag is checked upstream (cache.tagFreshness 0: every pull), no content moves.
        since = len(upstream.requests_log())
        by_tag = pull(binaries, configured_node(binaries, tmp_path / "n-b2", b), ref(upstream, image))
        asked = data_requests(upstream, since)
        assert [(r.method, "/manifests/" in r.uri) for r in asked] == [("HEAD", True)], f"only the tag check: {asked}"
        print(f"\npull through A (cold) {cold:.2f}s; through B by digest {warm:.2f}s (0 upstream requests), by tag {by_tag:.2f}s (1 HEAD)")


# ------------------------------------------------------------------ one replica dies


def test_pulls_keep_working_when_one_replica_dies_and_stop_touching_the_upstream_once_its_endpoint_leaves(
    binaries: ContainerdBinaries, registry_binary: str, s3: S3Server, upstream: Registry, images: dict[str, BuiltImage], tmp_path: Path
) -> None:
    warm_image, cold_image, late_image = images["img1"], images["img2"], images["img3"]
    spec = ha_spec(upstream, s3)
    with replicas(spec, s3, tmp_path, registry_binary) as (a, b):
        fronts = [("127.0.0.1", a.ports["front"]), ("127.0.0.1", b.ports["front"])]
        with LoopbackService.run(fronts) as service:
            node = node_behind(binaries, tmp_path / "node", spec, service.address)
            first = pull(binaries, node, ref(upstream, warm_image))
            assert set(service.connections) == set(fronts), "the Service spread the pull's connections over both replicas"
            since = len(upstream.requests_log())
            both = pull(binaries, node, ref(upstream, warm_image, by_digest=True))
            assert data_requests(upstream, since) == []

            # A dies; its endpoint is still in the Service (the node controller or the readiness
            # probe has not noticed yet). Connections sent to A are reset, containerd falls back
            # to the upstream for those requests, and every pull still succeeds.
            kill(a)
            since = len(upstream.requests_log())
            dead_in_service = pull(binaries, node, ref(upstream, warm_image, by_digest=True))
            fallback = data_requests(upstream, since)
            assert service.refused.get(fronts[0], 0) > 0, "the Service still sent connections to the dead replica"
            window = len(upstream.requests_log())
            cold_in_service = pull(binaries, node, ref(upstream, cold_image))
            # Blobs containerd fetched straight from the upstream in this window never entered the cache.
            direct = {
                d for d in cold_image.blobs_for_host if any(d in r.uri and not from_mirror(r) for r in data_requests(upstream, window))
            }

            # The EndpointSlice drops A: everything goes to B, and B serves the shared cache.
            service.remove(fronts[0])
            since = len(upstream.requests_log())
            after = pull(binaries, node, ref(upstream, warm_image, by_digest=True))
            assert data_requests(upstream, since) == [], "after the endpoint left, warm pulls ask the upstream nothing"
            since = len(upstream.requests_log())
            cold_after = pull(binaries, node, ref(upstream, cold_image, by_digest=True))
            refetched = {d for d in cold_image.blobs_for_host if any(d in r.uri for r in data_requests(upstream, since))}
            assert refetched <= direct, "what the replicas fetched while A was dying is in the bucket: only the fallback's blobs are new"
            # Over the whole test, the mirror tier fetched each blob of each image at most once.
            for image in (warm_image, cold_image, late_image):
                by_mirror = mirror_blob_gets(upstream, image)
                assert all(n <= 1 for n in by_mirror.values()), f"{image.name}: {by_mirror}"
            since = len(upstream.requests_log())
            pull(binaries, node, ref(upstream, late_image))
            assert upstream.blob_gets_logged(late_image.blobs_for_host, 1, since=since) == dict.fromkeys(late_image.blobs_for_host, 1)
            print(
                f"\npulls through the Service: first {first:.2f}s; warm with 2 replicas {both:.2f}s; "
                f"warm with A dead but still an endpoint {dead_in_service:.2f}s ({len(fallback)} upstream requests "
                f"from fallback, {service.refused.get(fronts[0], 0)} connections reset); cold then {cold_in_service:.2f}s "
                f"({len(direct)} of {len(cold_image.blobs_for_host)} blobs fetched by the fallback); "
                f"warm after the endpoint left {after:.2f}s; the image fetched meanwhile, now warm {cold_after:.2f}s"
            )


# ------------------------------------------------------------------ one replica's node goes dark


@pytest.fixture(scope="module")
def releases(binaries: ContainerdBinaries) -> dict[str, ContainerdBinaries]:
    """Debian's containerd and the pinned releases tests/e2e/build-containerd.sh builds, by major.minor."""
    built, why = build_containerd()
    # This machine can build every release (`make containerd`): a missing one is a failure, not a skip.
    assert not why, why
    return {"system": binaries, **{b.version: b for b in built}}


@pytest.mark.parametrize("release", ["system", "1.7", "2.4"])
def test_a_blackholed_replica_still_in_the_service_costs_what_the_node_side_allows_and_nothing_once_it_leaves(
    release: str,
    releases: dict[str, ContainerdBinaries],
    registry_binary: str,
    s3: S3Server,
    upstream: Registry,
    images: dict[str, BuiltImage],
    tmp_path: Path,
) -> None:
    """The figure for issue 14: until the node controller marks the dead node NotReady (its pods not
    ready, the endpoint gone), kube-proxy still sends a share of new connections into the void.
    What a pull pays then is containerd's dial timeout per such connection (the node-side
    fail-open work lowers it); once the endpoint leaves, nothing."""
    if not iptables_works():
        pytest.skip("iptables cannot add rules here, so neither a ClusterIP nor a blackhole can be made")
    assert release in releases, f"containerd {release} is not among the releases `make containerd` builds"
    binaries = releases[release]
    image = images["img1"]
    spec = ha_spec(upstream, s3)
    with replicas(spec, s3, tmp_path, registry_binary) as (a, b):
        fronts = [("127.0.0.1", a.ports["front"]), ("127.0.0.1", b.ports["front"])]
        with KernelService.run(VIRTUAL_IP, free_port(), fronts) as service:
            node = node_behind(binaries, tmp_path / "node", spec, f"{VIRTUAL_IP}:{service.port}")
            pull(binaries, node, ref(upstream, image))
            healthy = pull(binaries, node, ref(upstream, image, by_digest=True))
            with blackholed(fronts[0]):
                since = len(upstream.requests_log())
                dark = pull(binaries, node, ref(upstream, image, by_digest=True), timeout=300)
                fallback = data_requests(upstream, since)
                service.remove(fronts[0])
                since = len(upstream.requests_log())
                gone = pull(binaries, node, ref(upstream, image, by_digest=True))
                assert data_requests(upstream, since) == [], "once the endpoint left, the surviving replica serves it all"
        print(
            f"\ncontainerd {binaries.version}: warm pull {healthy:.2f}s with both replicas; {dark:.2f}s with one blackholed "
            f"but still an endpoint ({len(fallback)} requests fell back to the upstream); {gone:.2f}s once its endpoint left"
        )


# ------------------------------------------------------------------ readiness follows the bucket


def test_a_replica_reports_not_ready_while_the_bucket_is_down_stays_alive_and_recovers(
    binaries: ContainerdBinaries, registry_binary: str, s3: S3Server, upstream: Registry, tmp_path: Path
) -> None:
    """What the kubelet's probes would see: readiness (the registry's health, the front's /v2/) fails
    once distribution's storage check has failed `threshold` times, liveness (a TCP connect to the
    debug port) holds, and both come back with the bucket."""
    spec = ha_spec(upstream, s3)
    with replicas(spec, s3, tmp_path, registry_binary, count=1) as (pod,):
        registry, front = pod.container("registry"), pod.container("front")
        # The registry's readiness reads its health on the debug port (behind the front it listens on loopback only).
        assert registry["readinessProbe"]["httpGet"]["port"] == 5001
        readiness = [
            f"http://127.0.0.1:{pod.ports['debug']}{registry['readinessProbe']['httpGet']['path']}",
            f"http://127.0.0.1:{pod.ports['front']}{front['readinessProbe']['httpGet']['path']}",
        ]
        assert registry["livenessProbe"]["tcpSocket"]["port"] == "metrics"
        assert all(http_status(url) == 200 for url in readiness)
        s3.stop()
        down = time.monotonic()
        try:
            wait_for(lambda: all(http_status(url) == 503 for url in readiness), 90, "readiness to fail with the bucket down")
            noticed = time.monotonic() - down
            assert tcp_connects(pod.ports["debug"]), "liveness holds: a restart would not bring the bucket back"
        finally:
            s3.start_process()
        up = time.monotonic()
        wait_for(lambda: all(http_status(url) == 200 for url in readiness), 90, "readiness to recover with the bucket")
        print(f"\nbucket down: /v2/ answered 503 after {noticed:.1f}s; bucket back: 200 again after {time.monotonic() - up:.1f}s")


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=3) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return 0


def tcp_connects(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return True
    except OSError:
        return False


# ------------------------------------------------------------------ a replica deleted mid-pull


@pytest.mark.parametrize("how", ["graceful", "killed"])
def test_a_replica_deleted_during_a_pull(
    how: str, binaries: ContainerdBinaries, registry_binary: str, s3: S3Server, upstream: Registry, tmp_path: Path
) -> None:
    """A rollout, a drain or a scale-down deletes a replica while nodes pull through it.

    graceful: what the kubelet does with the rendered pod: the endpoint leaves the Service,
    the containers' preStop sleep runs (the test waits for A's connections to close, at most
    that long, then SIGTERMs, never later than the kubelet would), then distribution drains.
    The pull in flight must finish with no fallback. killed: the same moment with SIGKILL and the
    endpoint still routed until a connection is refused there, the case the delay exists for;
    measured, and a retry (kubelet's back-off) must succeed."""
    image = multi_layer_image(tmp_path / "big", name="library/habig", layer_sizes=(6 << 20, 4 << 20, 2 << 20))
    image.push(upstream.address)
    spec = ha_spec(upstream, s3)
    pod_template = render_mirror_children(MIRROR, "uid", spec, "ns")[-1]["spec"]["template"]["spec"]
    registry_container = next(ct for ct in pod_template["containers"] if ct["name"] == "registry")
    delay = registry_container["lifecycle"]["preStop"]["sleep"]["seconds"]
    with replicas(spec, s3, tmp_path, registry_binary) as (a, b):
        pull(binaries, configured_node(binaries, tmp_path / "warm", a), ref(upstream, image))  # in the bucket
        fronts = [("127.0.0.1", a.ports["front"]), ("127.0.0.1", b.ports["front"])]
        with LoopbackService.run(fronts, rate=2 << 20) as service:
            node = node_behind(binaries, tmp_path / "node", spec, service.address)
            since = len(upstream.requests_log())
            outcome: dict[str, Any] = {}

            def go() -> None:
                with Containerd.start(binaries, str(node.certs_dir)) as daemon:
                    started = time.monotonic()
                    result = daemon.pull(ref(upstream, image, by_digest=True), hosts_dir=str(node.certs_dir), timeout=180)
                    outcome.update(rc=result.returncode, took=time.monotonic() - started, err=result.stderr[-600:])

            puller = threading.Thread(target=go)
            puller.start()
            # A blob is streaming through A: more than a manifest's worth has gone through it.
            wait_for(lambda: service.bytes_sent(fronts[0]) > (256 << 10) or "rc" in outcome, 60, "a blob streaming through replica A")
            assert "rc" not in outcome, "the pull finished before anything happened to A: slow the Service down"
            deleted = time.monotonic()
            if how == "graceful":
                service.remove(fronts[0])
                with contextlib.suppress(TimeoutError, AssertionError):
                    wait_for(lambda: service.busy(fronts[0]) == 0, delay, "A's connections to close within the preStop delay")
                a.stop()
            else:
                # Without the delay the containers die while kube-proxy still routes to them: the
                # endpoint leaves only once a connection has been refused there (or the pull ended).
                kill(a)
                with contextlib.suppress(TimeoutError):
                    wait_for(lambda: service.refused.get(fronts[0], 0) > 0 or "rc" in outcome, 30, "a connection refused by the dead A")
                service.remove(fronts[0])
            gone = time.monotonic()
            puller.join(240)
            fallback = [r for r in data_requests(upstream, since) if not from_mirror(r)]
            print(
                f"\n{how}: pull in flight rc={outcome['rc']} in {outcome['took']:.1f}s ({service.bytes_sent(fronts[0])} bytes "
                f"through A, {service.bytes_sent(fronts[1])} through B); A gone {gone - deleted:.1f}s after its deletion began; "
                f"{len(fallback)} requests fell back to the upstream"
            )
            if how == "graceful":
                assert outcome["rc"] == 0, f"the pull in flight failed:\n{outcome['err']}"
                assert fallback == [], "and it needed no fallback: the deleted replica finished its transfers"
            else:
                retry = pull(binaries, node, ref(upstream, image, by_digest=True))
                print(f"killed: the retry took {retry:.1f}s")
