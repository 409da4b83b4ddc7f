"""The cache wired into the controller (controller/cache.py): pins, invalidations and status.cache.

Pins and invalidations run on the fake client through the real reconcilers. The
status.cache poll talks HTTP to the real sidecar's handler (`regmirror cache serve`'s
Cache + make_handler, cache/server.py) on loopback, fed distribution's own
Prometheus counters, so the figures the operator writes are the ones a sidecar serves.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from controller_kit import NS, Kit, mirror
from hypothesis import example, given, settings
from hypothesis import strategies as st

from regmirror import constants as c
from regmirror import naming
from regmirror.cache import server
from regmirror.cachestatus import MAX_INVALIDATIONS, invalidation_requests, merge_reports
from regmirror.controller.state import RequeueAfter
from regmirror.kube import RESOURCES
from regmirror.render.cache import INVALIDATE_KEY, PINS_KEY

D1, D2, D3, D4 = ("sha256:" + x * 64 for x in "abcd")
QUAY = {"upstream": {"url": "https://quay.io"}}


def pod(namespace: str, name: str, *image_ids: str, phase: str = "Running", labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels or {}},
        "status": {"phase": phase, "containerStatuses": [{"name": f"c{i}", "imageID": x} for i, x in enumerate(image_ids)]},
    }


def control(kit: Kit, name: str) -> dict[str, Any]:
    cm = kit.kube.obj("ConfigMap", NS, naming.child_name(name))
    assert cm is not None
    return cm


def pins(kit: Kit, name: str) -> list[str]:
    return list(json.loads(control(kit, name)["data"][PINS_KEY]))


def cm_writes(kit: Kit, name: str) -> list[tuple[str, str, str]]:
    return [w for w in kit.kube.writes() if w == ("apply", "ConfigMap", naming.child_name(name))]


async def started(kit: Kit) -> None:
    """Past the first lists: the store reports changes as the watches would."""
    await kit.sync()
    kit.manager._started = True


# ------------------------------------------------------------------ pins


async def test_pins_are_the_running_pods_digests_of_the_mirrors_hosts_across_namespaces() -> None:
    kit = Kit()
    kit.kube.put(mirror("hub"))
    kit.kube.put(mirror("q", **QUAY))
    kit.kube.put(pod("a", "web", f"docker.io/library/nginx@{D1}"))
    kit.kube.put(pod("b", "web", f"quay.io/org/app@{D2}", f"docker.io/library/redis@{D3}"))  # same name, other namespace
    kit.kube.put(pod("c", "job", f"docker.io/library/done@{D4}", phase="Succeeded"))
    await kit.run("children", "hub")
    await kit.run("children", "q")
    assert pins(kit, "hub") == [D1, D3]
    assert pins(kit, "q") == [D2]


async def test_a_pod_change_recomputes_pins_once_and_rewrites_only_the_affected_mirror() -> None:
    kit = Kit(cache_pins_debounce=5.0)
    kit.kube.put(mirror("hub"))
    kit.kube.put(mirror("q", **QUAY))
    await kit.run("children", "hub")
    await kit.run("children", "q")
    await started(kit)
    kit.kube.calls.clear()
    for i in range(20):  # a burst of pods starting
        kit.kube.put(pod("apps", f"web-{i}", f"docker.io/library/nginx@{D1}"))
    await kit.sync()
    assert ("pins", "") in kit.queued()
    assert kit.manager.queue._due[("pins", "")] == pytest.approx(kit.clock() + 5.0), "debounced, not at once"
    await kit.run("pins")
    assert ("children", "hub") in kit.queued()
    assert ("children", "q") not in kit.queued(), "quay.io's pins did not change"
    await kit.run("children", "hub")
    assert pins(kit, "hub") == [D1]
    assert len(cm_writes(kit, "hub")) == 1, "twenty pods, one ConfigMap write"
    assert cm_writes(kit, "q") == []


async def test_pod_events_that_change_no_digest_cost_nothing_and_a_deleted_pod_unpins() -> None:
    kit = Kit()
    kit.kube.put(mirror("hub"))
    kit.kube.put(pod("apps", "web", f"docker.io/library/nginx@{D1}"))
    await kit.run("children", "hub")
    assert pins(kit, "hub") == [D1]
    await started(kit)
    ready = pod("apps", "web", f"docker.io/library/nginx@{D1}")
    ready["status"]["conditions"] = [{"type": "Ready", "status": "True"}]
    kit.kube.put(ready)
    await kit.sync()
    assert ("pins", "") not in kit.queued(), "readiness is not an image change"
    kit.kube.remove("Pod", "apps", "web")
    await kit.sync()
    await kit.run("pins")
    await kit.run("children", "hub")
    assert pins(kit, "hub") == []


async def test_a_restart_renders_the_same_pins_and_writes_nothing() -> None:
    kit = Kit()
    kit.kube.put(mirror("hub"))
    kit.kube.put(pod("apps", "web", f"docker.io/library/nginx@{D1}"))
    await kit.run("children", "hub")
    await kit.run("children", "hub")
    again = Kit(kube=kit.kube)
    kit.kube.calls.clear()
    await again.run("children", "hub")
    assert kit.kube.writes() == [], "the first render after a start already carries the pins"


# ------------------------------------------------------------------ invalidations


async def test_the_invalidate_annotation_reaches_the_cache_configmap() -> None:
    kit = Kit()
    body = mirror("hub")
    body["metadata"]["annotations"] = {c.ANNOTATION_INVALIDATE: json.dumps({"library/nginx:1.27": "1700000000.000"})}
    kit.kube.put(body)
    await kit.run("children", "hub")
    assert json.loads(control(kit, "hub")["data"][INVALIDATE_KEY]) == {"library/nginx:1.27": "1700000000.000"}
    await started(kit)
    kit.manager.queue._ready[1].clear()
    body["metadata"]["annotations"][c.ANNOTATION_INVALIDATE] = json.dumps({"library/nginx:1.27": "1700000100.000"})
    kit.kube.put(body)  # `regmirror cache invalidate` again: a new request id
    await kit.sync()
    assert ("children", "hub") in kit.queued(), "an annotation change queues the mirror at once"
    await kit.run("children", "hub")
    assert json.loads(control(kit, "hub")["data"][INVALIDATE_KEY]) == {"library/nginx:1.27": "1700000100.000"}


async def test_a_malformed_annotation_invalidates_nothing_and_breaks_nothing() -> None:
    kit = Kit()
    body = mirror("hub")
    body["metadata"]["annotations"] = {c.ANNOTATION_INVALIDATE: "{not json"}
    kit.kube.put(body)
    await kit.run("children", "hub")
    assert json.loads(control(kit, "hub")["data"][INVALIDATE_KEY]) == {}
    assert kit.kube.obj("Deployment", NS, "regmirror-hub") is not None


@settings(deadline=None)
@given(st.one_of(st.none(), st.text(max_size=50), st.dictionaries(st.text(max_size=400), st.one_of(st.text(max_size=400), st.integers()))))
@example({f"r{i}:t": f"{i:05d}" for i in range(300)})
def test_invalidation_requests_are_bounded_strings(raw: Any) -> None:
    annotation = raw if raw is None or isinstance(raw, str) else json.dumps(raw)
    out = invalidation_requests(annotation)
    assert len(out) <= MAX_INVALIDATIONS
    assert all(isinstance(k, str) and isinstance(v, str) and 0 < len(k) <= 300 and 0 < len(v) <= 300 for k, v in out.items())
    valid = isinstance(raw, dict) and all(isinstance(v, str) and 0 < len(v) <= 300 and 0 < len(k) <= 300 for k, v in raw.items())
    if valid and len(raw) > MAX_INVALIDATIONS:
        assert min(out.values()) >= sorted(raw.values())[-MAX_INVALIDATIONS], "the most recent requests are kept"


# ------------------------------------------------------------------ merging replicas


@settings(deadline=None)
@example([{"hits": 0, "upstreamReachable": 0}])  # 0 == False: an integer is no verdict
@given(
    st.lists(
        st.one_of(
            st.dictionaries(st.sampled_from(["hits", "misses", "diskUsed", "upstreamReachable", "lastEviction"]), st.integers(-5, 50)),
            st.fixed_dictionaries({"hits": st.integers(0, 100), "upstreamReachable": st.booleans()}),
            st.text(),
            st.none(),
        ),
        max_size=5,
    )
)
def test_merging_replicas_sums_counters_and_never_raises(reports: list[Any]) -> None:
    merged = merge_reports(reports, len(reports), 0)
    docs = [r for r in reports if isinstance(r, dict)]
    good = [r.get("hits") for r in docs if isinstance(r.get("hits"), int) and not isinstance(r.get("hits"), bool) and r["hits"] >= 0]
    assert merged["hits"] == sum(good)
    verdicts = [r.get("upstreamReachable") for r in docs]
    if any(v is False for v in verdicts):
        assert merged["upstreamReachable"] is False, "one replica that cannot reach the upstream is reported"
    elif docs and all(v is True for v in verdicts):
        assert merged["upstreamReachable"] is True


# ------------------------------------------------------------------ status.cache from real sidecars

# distribution's own proxy counters (what its /metrics serves in proxy mode).
METRICS = """# TYPE registry_proxy_hits_total counter
registry_proxy_hits_total{{type="blob"}} {hits}
registry_proxy_misses_total{{type="blob"}} {misses}
registry_proxy_pulled_bytes_total{{type="blob"}} {pulled}
registry_proxy_pushed_bytes_total{{type="blob"}} {pushed}
"""


class Sidecar:
    """`regmirror cache serve`'s HTTP API on a loopback address, its counters in a file the test edits."""

    def __init__(self, root: Path, ip: str) -> None:
        root.mkdir(parents=True)
        self.metrics = root / "metrics.txt"
        self.set(hits=0, misses=0, pulled=0, pushed=0)
        control_dir = root / "control"
        control_dir.mkdir(parents=True)
        (control_dir / "cache.json").write_text(json.dumps({"capBytes": 1000, "ttlSeconds": 0, "upstream": "", "hosts": [], "prewarm": []}))
        args = argparse.Namespace(
            storage=str(root / "storage"),
            control_dir=str(control_dir),
            front="http://127.0.0.1:9",
            registry_metrics=self.metrics.as_uri(),
            front_stats=None,
            front_clients=str(root / "clients.txt"),
            eviction="on",
        )
        self.cache = server.Cache(args)
        self.server = ThreadingHTTPServer((ip, 0), server.make_handler(self.cache))
        self.url = f"http://{ip}:{self.server.server_address[1]}/stats"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def set(self, **counters: int) -> None:
        self.metrics.write_text(METRICS.format(**counters))

    def pulled_from(self, *addresses: str) -> None:
        """Pulls from these client addresses, as the front-stats container lists them from Varnish's log."""
        assert self.cache.front_clients is not None
        previous = self.cache.front_clients.read_text() if self.cache.front_clients.exists() else ""
        self.cache.front_clients.write_text(previous + "".join(f"{a}\n" for a in addresses))
        self.cache._clients_mtime = None  # the same second's write is still news
        self.cache.clients_pass(time.time())

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def sidecars(tmp_path: Path) -> Iterator[dict[str, Sidecar]]:
    """Two sidecars, as the two replicas of one mirror (127.0.0.1 and 127.0.0.2)."""
    made = {ip: Sidecar(tmp_path / ip, ip) for ip in ("127.0.0.1", "127.0.0.2")}
    yield made
    for sidecar in made.values():
        if sidecar.thread.is_alive():
            sidecar.stop()


def mirror_pod(name: str, ip: str, *, ready: bool = True) -> dict[str, Any]:
    body = pod(NS, name, labels=naming.selector_labels("hub"))
    body["status"] |= {"podIP": ip, "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}
    return body


async def poll(kit: Kit, sidecars: dict[str, Sidecar]) -> None:
    kit.manager.queue._ready[1].clear()
    kit.manager.queue._due.clear()
    kit.manager.cache_poller.url_of = lambda ip: sidecars[ip].url if ip in sidecars else f"http://{ip}:9/stats"
    await kit.sync()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        await kit.manager.cache_poller.poll_once(session)


def status_cache(kit: Kit) -> dict[str, Any] | None:
    body = kit.kube.obj(c.KIND, None, "hub")
    assert body is not None
    cache: dict[str, Any] | None = (body.get("status") or {}).get("cache")
    return cache


async def write_status(kit: Kit) -> None:
    """The status reconciler, once the per-mirror progress interval since its last write is over.

    (A mirror that is not Ready waits longer after each progress write: the clock goes as far as it asks.)
    """
    kit.clock.advance(61)
    result = await kit.run("status", "hub")
    if isinstance(result, RequeueAfter):
        kit.clock.advance(result.seconds)
        await kit.run("status", "hub")


async def converged(kit: Kit) -> None:
    kit.kube.put(mirror("hub"))
    await kit.converge("hub")
    await kit.run("status", "hub")
    kit.clock.advance(120)
    await kit.run("status", "hub")


async def test_status_cache_sums_the_replicas_figures(sidecars: dict[str, Sidecar]) -> None:
    kit = Kit()
    await converged(kit)
    sidecars["127.0.0.1"].set(hits=90, misses=10, pulled=1000, pushed=5000)
    sidecars["127.0.0.2"].set(hits=9, misses=1, pulled=100, pushed=500)
    kit.kube.put(mirror_pod("regmirror-hub-a", "127.0.0.1"))
    kit.kube.put(mirror_pod("regmirror-hub-b", "127.0.0.2"))
    kit.kube.put(mirror_pod("regmirror-hub-c", "127.0.0.3", ready=False))  # not ready: not polled, not counted
    await poll(kit, sidecars)
    assert ("status", "hub") in kit.queued()
    await write_status(kit)
    cache = status_cache(kit)
    assert cache is not None
    assert (cache["hits"], cache["misses"], cache["hitRatio"]) == (99, 11, "0.900")
    assert (cache["bytesServed"], cache["bytesFromUpstream"]) == (5500, 1100)
    assert (cache["diskCap"], cache["replicas"], cache["staleReplicas"]) == (2000, 2, 0)


async def test_a_quiet_cache_costs_no_write_and_a_restart_none_either(sidecars: dict[str, Sidecar]) -> None:
    kit = Kit()
    await converged(kit)
    sidecars["127.0.0.1"].set(hits=5, misses=1, pulled=10, pushed=60)
    kit.kube.put(mirror_pod("regmirror-hub-a", "127.0.0.1"))
    await poll(kit, sidecars)
    await write_status(kit)
    assert status_cache(kit) is not None
    kit.kube.calls.clear()
    for _ in range(3):
        kit.clock.advance(300)
        await poll(kit, sidecars)  # new observedAt each time, same figures
        assert ("status", "hub") not in kit.queued()
        await kit.run("status", "hub")
    assert kit.kube.writes() == []
    again = Kit(kube=kit.kube)  # the operator restarts: it seeds from the live status.cache
    await again.converge("hub")
    await write_status(again)
    kit.kube.calls.clear()
    await poll(again, sidecars)
    # The status is computed again (who pulled is learned anew after a restart), and equals the live one.
    await write_status(again)
    assert kit.kube.writes() == []


async def test_counters_are_written_at_a_bounded_rate(sidecars: dict[str, Sidecar]) -> None:
    kit = Kit()
    await converged(kit)
    kit.kube.put(mirror_pod("regmirror-hub-a", "127.0.0.1"))
    await poll(kit, sidecars)
    await write_status(kit)
    sidecars["127.0.0.1"].set(hits=1, misses=0, pulled=0, pushed=10)
    await poll(kit, sidecars)
    assert ("status", "hub") in kit.queued(), "a minute after the last figures, new counters are written"
    sidecars["127.0.0.1"].set(hits=2, misses=0, pulled=0, pushed=20)
    kit.clock.advance(10)
    await poll(kit, sidecars)
    assert ("status", "hub") not in kit.queued(), "a counter change within a minute waits"
    kit.clock.advance(60)
    await poll(kit, sidecars)
    assert ("status", "hub") in kit.queued()
    await write_status(kit)
    assert status_cache(kit)["hits"] == 2  # type: ignore[index]


async def test_an_unreachable_sidecar_keeps_its_figures_and_says_so(sidecars: dict[str, Sidecar]) -> None:
    kit = Kit()
    await converged(kit)
    sidecars["127.0.0.1"].set(hits=40, misses=10, pulled=0, pushed=0)
    sidecars["127.0.0.2"].set(hits=10, misses=0, pulled=0, pushed=0)
    kit.kube.put(mirror_pod("regmirror-hub-a", "127.0.0.1"))
    kit.kube.put(mirror_pod("regmirror-hub-b", "127.0.0.2"))
    await poll(kit, sidecars)
    await write_status(kit)
    sidecars["127.0.0.2"].stop()
    kit.clock.advance(120)
    await poll(kit, sidecars)
    assert ("status", "hub") in kit.queued(), "a replica that stops answering is news at once"
    await write_status(kit)
    cache = status_cache(kit)
    assert cache is not None
    assert (cache["hits"], cache["replicas"], cache["staleReplicas"]) == (50, 2, 1), "the silent pod's last figures are kept"


async def test_no_answer_ever_means_no_status_cache_and_no_write() -> None:
    kit = Kit()
    await converged(kit)
    kit.kube.put(mirror_pod("regmirror-hub-a", "127.0.0.9"))  # nothing listens there
    kit.kube.calls.clear()
    await poll(kit, {})
    assert ("status", "hub") not in kit.queued()
    await kit.run("status", "hub")
    assert status_cache(kit) is None
    assert kit.kube.writes() == []


def kube_node(name: str, internal: str, *, pod_cidr: str | None = None, pool: str = "a") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {"pool": pool}},
        "spec": {"podCIDRs": [pod_cidr]} if pod_cidr else {},
        "status": {"addresses": [{"type": "InternalIP", "address": internal}, {"type": "Hostname", "address": name}]},
    }


def nodes_status(kit: Kit) -> dict[str, Any]:
    body = kit.kube.obj(c.KIND, None, "hub")
    assert body is not None
    nodes: dict[str, Any] = (body.get("status") or {}).get("nodes") or {}
    return nodes


async def test_status_names_the_selected_nodes_that_did_not_pull_through_the_mirror(sidecars: dict[str, Sidecar]) -> None:
    kit = Kit()
    for i in range(1, 5):
        kit.kube.put(kube_node(f"node-{i}", f"192.168.0.{i}", pod_cidr=f"10.244.{i}.0/24", pool="b" if i == 4 else "a"))
    kit.kube.put(mirror("hub", nodeConfig={"nodeSelector": {"matchLabels": {"pool": "a"}}}))
    await kit.converge("hub")
    await kit.run("status", "hub")
    kit.clock.advance(120)
    await kit.run("status", "hub")
    kit.kube.put(mirror_pod("regmirror-hub-a", "127.0.0.1"))
    kit.kube.put(mirror_pod("regmirror-hub-b", "127.0.0.2"))
    await poll(kit, sidecars)
    await write_status(kit)
    before = nodes_status(kit)
    assert (before["pulledRecently"], before["notPulledRecently"]) == (0, ["node-1", "node-2", "node-3"]), "a front that saw no pull"
    # node-1 pulled through replica a; node-2's pull reached replica b on its own node (kube-proxy
    # masquerades it to node-2's pod-network gateway); node-4 is not selected; node-3 never pulled.
    sidecars["127.0.0.1"].pulled_from("192.168.0.1", "192.168.0.4", "203.0.113.9")
    sidecars["127.0.0.2"].pulled_from("10.244.2.1")
    await poll(kit, sidecars)
    assert ("status", "hub") in kit.queued(), "who pulled changed: the status is computed again"
    await write_status(kit)
    assert nodes_status(kit) | {"desired": 3} == nodes_status(kit)
    assert (nodes_status(kit)["pulledRecently"], nodes_status(kit)["notPulledRecently"]) == (2, ["node-3"])
    # The same answers again: nothing changed, nothing written.
    kit.kube.calls.clear()
    await poll(kit, sidecars)
    await write_status(kit)
    assert kit.kube.writes() == []
    # A node joins the pool: it is named until it pulls.
    kit.kube.put(kube_node("node-4", "192.168.0.4", pod_cidr="10.244.4.0/24", pool="a"))
    kit.kube.put(kube_node("node-5", "192.168.0.5", pool="a"))
    await kit.run("rollout")
    await write_status(kit)
    assert (nodes_status(kit)["pulledRecently"], nodes_status(kit)["notPulledRecently"]) == (3, ["node-3", "node-5"])
    # One replica goes away: what only it saw goes with it.
    kit.kube.remove("Pod", NS, "regmirror-hub-b")
    await poll(kit, sidecars)
    await write_status(kit)
    assert (nodes_status(kit)["pulledRecently"], nodes_status(kit)["notPulledRecently"]) == (2, ["node-2", "node-3", "node-5"])
    # The operator restarts: before its first poll it keeps what the status says, after it finds the same.
    again = Kit(kube=kit.kube)
    await again.converge("hub")
    kit.kube.calls.clear()
    await write_status(again)
    await poll(again, sidecars)
    await write_status(again)
    assert kit.kube.writes() == [], "a restart rewrites nothing"
    # Anyone may write a status: a malformed one is not kept, and does not stop the operator's own.
    body = kit.kube.obj(c.KIND, None, "hub")
    assert body is not None
    body["status"]["nodes"] |= {"pulledRecently": "lots", "notPulledRecently": [1, 2]}
    kit.kube.put(body)
    third = Kit(kube=kit.kube)
    await third.converge("hub")
    await write_status(third)
    assert "pulledRecently" not in nodes_status(kit)
    await poll(third, sidecars)
    await write_status(third)
    assert (nodes_status(kit)["pulledRecently"], nodes_status(kit)["notPulledRecently"]) == (2, ["node-2", "node-3", "node-5"])


async def test_an_interval_of_zero_turns_the_polls_off_and_keeps_status_cache() -> None:
    kit = Kit(cache_stats_interval=0)
    await converged(kit)
    kit.manager.cache_poller.start()
    assert not kit.manager.cache_poller.running
    on = Kit()
    on.manager.cache_poller.start()
    try:
        assert on.manager.cache_poller.running
    finally:
        await on.manager.cache_poller.stop()
    assert not on.manager.cache_poller.running


def test_the_pod_watch_covers_every_namespace() -> None:
    """A namespaced kind listed without a namespace is the cluster-wide collection (not namespace "None")."""
    assert RESOURCES["Pod"].path(None) == "/api/v1/pods"
    assert RESOURCES["Pod"].path("apps", "web") == "/api/v1/namespaces/apps/pods/web"


class Garbage(BaseHTTPRequestHandler):
    """Not a sidecar: answers /stats with what no sidecar sends."""

    def do_GET(self) -> None:
        body = b"[1, 2" if self.path == "/stats" else b"x" * (300 << 10)
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        return


async def test_a_pod_answering_garbage_counts_as_stale_and_breaks_nothing(sidecars: dict[str, Sidecar]) -> None:
    garbage = ThreadingHTTPServer(("127.0.0.3", 0), Garbage)
    thread = threading.Thread(target=garbage.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        kit = Kit()
        await converged(kit)
        sidecars["127.0.0.1"].set(hits=7, misses=0, pulled=0, pushed=0)
        kit.kube.put(mirror_pod("regmirror-hub-a", "127.0.0.1"))
        kit.kube.put(mirror_pod("regmirror-hub-b", "127.0.0.3"))
        kit.kube.put(mirror_pod("regmirror-hub-c", "127.0.0.4"))
        port = garbage.server_address[1]
        urls = {"127.0.0.3": f"http://127.0.0.3:{port}/stats", "127.0.0.4": f"http://127.0.0.3:{port}/huge"}
        kit.manager.queue._ready[1].clear()
        await kit.sync()
        kit.manager.cache_poller.url_of = lambda ip: urls.get(ip, sidecars["127.0.0.1"].url)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
            await kit.manager.cache_poller.poll_once(session)
        await write_status(kit)
        cache = status_cache(kit)
        assert cache is not None
        assert (cache["hits"], cache["replicas"], cache["staleReplicas"]) == (7, 3, 2)
        assert set(kit.ctx.records["hub"].cache_reports) == {f"{NS}/regmirror-hub-a"}, "nothing of the garbage is kept"
    finally:
        garbage.shutdown()
        garbage.server_close()
        thread.join(5)
