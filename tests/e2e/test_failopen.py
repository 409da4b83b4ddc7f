"""A dead mirror against real containerd 1.6, 1.7, 2.0, 2.1, 2.2 and 2.4: what a pull pays, and what the agent does.

The failure modes, each on loopback: refused (the mirror's process is gone),
blackholed (its packets are dropped: a node that died behind a still-listed
endpoint), hanging (it accepts connections and never answers: a wedged
registry). The upstream is a real registry holding the image, so a pull that
falls back succeeds, and its access log shows who served it.

- A pull that starts the moment the mirror fails, with the mirror still in
  hosts.toml (before any agent could react): refused costs nothing anywhere;
  blackholed costs one `dial_timeout` per request on the releases that read
  it (2.0.7+, 2.1+; the agent writes it only there), and containerd's default
  30 s per request elsewhere (not run here: minutes per pull; the bench
  measures it).
- Releases that do not know `dial_timeout` ignore it (the file is still read:
  the pull goes through the mirror, no decode error).
- The agent's loop withdraws the mirror: a pull started after that goes to the
  upstream at once, for every failure mode and every release.

Timing assertions are loose on purpose ("well under containerd's 30 s default
dial timeout"); the figures are in `make bench` (bench/dataplane.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from _dataplane import (
    AgentNode,
    Containerd,
    ContainerdBinaries,
    Registry,
    build_containerd,
    dead_mirror,
    ensure_binaries,
    free_port,
    iptables_usable,
    system_containerd,
)

from regmirror.agent.preflight import dial_timeout_supported

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="runs containerd and iptables: needs root")

KINDS = ["refused", "blackholed", "hanging"]
CONTAINERD_DEFAULT_DIAL = 30.0


@pytest.fixture(scope="module")
def releases() -> dict[str, ContainerdBinaries]:
    """Every containerd release available here, by release ("1.6.20", "2.0.5", ...), with crictl."""
    reason = ensure_binaries()
    if reason:
        pytest.skip(reason)
    built, why = build_containerd()
    if why:
        pytest.skip(why)
    crictl = next((b.crictl for b in built if b.crictl), None)
    found = {b.release: b for b in built if b.crictl}
    system = system_containerd(crictl)
    if system is not None and crictl:
        found[system.release] = system
    return found


def release_params() -> list[str]:
    """The releases the tests are parametrized over; missing ones skip with a reason."""
    return ["1.6", "1.7", "2.0.5", "2.1", "2.2", "2.4"]


def binaries_for(releases: dict[str, ContainerdBinaries], wanted: str) -> ContainerdBinaries:
    matches = [b for r, b in sorted(releases.items()) if r == wanted or r.startswith(wanted + ".")]
    if not matches:
        pytest.skip(f"containerd {wanted} is not built here (REGMIRROR_CONTAINERD_VERSIONS for tests/e2e/build-containerd.sh)")
    return matches[-1]


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory, releases: object) -> Iterator[Registry]:
    with Registry.start(tmp_path_factory.mktemp("upstream"), "127.0.0.2") as registry:
        registry.push_image("team/app", "v1", "from the upstream\n")
        yield registry


@pytest.fixture
def mirror(tmp_path: Path) -> Iterator[Registry]:
    with Registry.start(tmp_path / "mirror", "127.0.0.3") as registry:
        registry.push_image("team/app", "v1", "from the upstream\n")  # what a warm cache holds
        yield registry


def plan(mirror: Registry | str, upstream: Registry) -> str:
    """The node plan (wire form) routing the upstream's host to the mirror (or a mirror URL), AllowUpstream."""
    host = upstream.address
    return json.dumps(
        {
            "mirrors": [
                {
                    "name": "cache",
                    "hosts": [host],
                    "servers": {host: upstream.url},
                    "upstreamHost": host,
                    "url": mirror if isinstance(mirror, str) else mirror.url,
                    "priority": 100,
                    "capabilities": ["pull", "resolve"],
                    "fallback": "AllowUpstream",
                    "runtimes": ["containerd"],
                    "nodeSelector": {},
                }
            ]
        }
    )


def node_for(tmp_path: Path, binaries: ContainerdBinaries) -> AgentNode:
    node = AgentNode("n1", tmp_path / "node", {}, runtime_version=binaries.runtime_version)
    node.write_containerd_config()
    return node


def timed_cri_pull(daemon: Containerd, ref: str, timeout: float = 120) -> tuple[bool, float]:
    started = time.monotonic()
    result = daemon.cri_pull(ref, timeout=timeout)
    return result.returncode == 0, time.monotonic() - started


def served(registry: Registry, ref_path: str) -> int:
    return registry.requests_log().count(ref_path)


@pytest.mark.parametrize("wanted", release_params())
def test_dial_timeout_is_written_only_where_containerd_reads_it_and_ignored_elsewhere(
    releases: dict[str, ContainerdBinaries], wanted: str, mirror: Registry, upstream: Registry, tmp_path: Path
) -> None:
    binaries = binaries_for(releases, wanted)
    node = node_for(tmp_path, binaries)
    with Containerd.start(binaries, str(node.certs_dir)) as daemon:
        rc, events = node.agent_once(plan(mirror, upstream))
        assert rc == 0, events
        written = (node.certs_dir / f"127.0.0.2_{upstream.port}_" / "hosts.toml").read_text()
        assert ('dial_timeout = "100ms"' in written) is dial_timeout_supported(binaries.runtime_version), written
        if "dial_timeout" not in written:
            # What an agent that ignored the release would write: containerd must still read the file.
            (node.certs_dir / f"127.0.0.2_{upstream.port}_" / "hosts.toml").write_text(
                written.replace("  capabilities", '  dial_timeout = "200ms"\n  capabilities')
            )
        ref = f"{upstream.address}/team/app:v1"
        before = served(upstream, "/v2/team/app/manifests/v1")
        assert daemon.cri_pull(ref).returncode == 0, daemon.log()[-2000:]
        assert "failed to decode hosts.toml" not in daemon.log()
        assert served(mirror, "/v2/team/app/manifests/v1") >= 1, "the file was read: the pull went through the mirror"
        assert served(upstream, "/v2/team/app/manifests/v1") == before


def dead_mirror_cases() -> list[tuple[str, str]]:
    """(release, how the mirror dies): blackholed only where containerd reads dial_timeout.

    Elsewhere each request to a blackholed mirror waits containerd's 30 s default dial timeout
    until the agent withdraws the mirror: a known cost, measured by `make bench` (bench/nodesafety.py),
    not a case to run here for minutes.
    """
    full = {w: w if w.count(".") == 2 else f"{w}.0" for w in release_params()}
    return [
        (w, kind)
        for w in release_params()
        for kind in ("refused", "blackholed")
        if kind == "refused" or dial_timeout_supported(f"containerd://{full[w]}")
    ]


@pytest.mark.parametrize(("wanted", "kind"), dead_mirror_cases())
def test_a_pull_started_the_moment_the_mirror_dies_falls_back_at_once_where_dial_timeout_is_read(
    releases: dict[str, ContainerdBinaries], wanted: str, kind: str, mirror: Registry, upstream: Registry, tmp_path: Path
) -> None:
    """The mirror dies while its entry is still in hosts.toml: nothing has withdrawn it yet."""
    binaries = binaries_for(releases, wanted)
    if kind == "blackholed" and not iptables_usable():
        pytest.skip("iptables is not usable here")
    assert kind == "refused" or dial_timeout_supported(binaries.runtime_version), binaries.release
    node = node_for(tmp_path, binaries)
    with Containerd.start(binaries, str(node.certs_dir)) as daemon:
        rc, events = node.agent_once(plan(mirror, upstream))
        assert rc == 0, events
        before = served(upstream, "/v2/team/app/manifests/v1")
        with dead_mirror(kind, mirror):
            ok, seconds = timed_cri_pull(daemon, f"{upstream.address}/team/app:v1")
        print(f"containerd {binaries.release}, mirror {kind}, still in hosts.toml: pull {'ok' if ok else 'FAILED'} in {seconds:.2f}s")
        assert ok, daemon.log()[-2000:]
        assert served(upstream, "/v2/team/app/manifests/v1") > before, "the upstream served it"
        assert seconds < CONTAINERD_DEFAULT_DIAL / 3, "no request waited for containerd's default dial timeout"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("wanted", ["1.6", "2.4"])
def test_the_agent_withdraws_a_dead_mirror_and_the_next_pull_goes_upstream_at_once(
    releases: dict[str, ContainerdBinaries], wanted: str, kind: str, mirror: Registry, upstream: Registry, tmp_path: Path
) -> None:
    """The agent's loop (default probe interval and timeout) notices each failure mode and rewrites the file."""
    binaries = binaries_for(releases, wanted)
    if kind == "blackholed" and not iptables_usable():
        pytest.skip("iptables is not usable here")
    node = node_for(tmp_path, binaries)
    hosts_toml = node.certs_dir / f"127.0.0.2_{upstream.port}_" / "hosts.toml"
    with Containerd.start(binaries, str(node.certs_dir)) as daemon, node.agent_loop(plan(mirror, upstream), interval=2.0) as agent:
        agent.wait_event("files.applied")
        assert hosts_toml.exists()
        with dead_mirror(kind, mirror):
            failed_at = time.monotonic()
            withdrawn = agent.wait_event("mirror.withdrawn", timeout=20)
            noticed = time.monotonic() - failed_at
            deadline = time.monotonic() + 5
            while hosts_toml.exists() and time.monotonic() < deadline:
                time.sleep(0.02)
            assert not hosts_toml.exists(), "the withdrawn mirror's file is gone: containerd goes straight upstream"
            ok, seconds = timed_cri_pull(daemon, f"{upstream.address}/team/app:v1", timeout=30)
        print(
            f"containerd {binaries.release}, mirror {kind}: withdrawn after {noticed:.2f}s ({withdrawn['error']}); next pull {seconds:.2f}s"
        )
        assert ok, daemon.log()[-2000:]
        # Probes every 2 s (+-25 %), a failure confirmed 0.25 s later, 0.5 s probe timeout: a few seconds at most.
        assert noticed < 6


@contextlib.contextmanager
def two_replicas(tmp_path: Path) -> Iterator[tuple[Registry, str]]:
    """Two warm replicas behind a kernel DNAT ClusterIP (as kube-proxy's iptables mode): the first one and the Service URL."""
    from harness.service import KernelService

    if not iptables_usable():
        pytest.skip("iptables is not usable here")
    with (
        Registry.start(tmp_path / "a", "127.0.0.3") as a,
        Registry.start(tmp_path / "b", "127.0.0.4") as b,
        KernelService.run("127.0.0.77", free_port("127.0.0.1"), [(a.host, a.port), (b.host, b.port)]) as service,
    ):
        for replica in (a, b):
            replica.push_image("team/app", "v1", "from the upstream\n")
        yield a, f"http://{service.address}:{service.port}"


@pytest.mark.parametrize("wanted", ["2.1", "2.4"])
def test_one_replica_gone_dark_behind_the_cluster_ip_costs_a_dial_timeout_per_request_that_meets_it(
    releases: dict[str, ContainerdBinaries], wanted: str, upstream: Registry, tmp_path: Path
) -> None:
    """Its node died: kube-proxy still sends new connections to it (until the node is NotReady, 40 s and more).

    Two replicas behind a kernel DNAT ClusterIP (as kube-proxy's iptables mode), one blackholed.
    Each request whose connection lands on the dead one waits one dial_timeout, then goes on
    to the next host (here the upstream); the pull succeeds. (containerd 1.x waits 30 s per such
    connection instead: tests/e2e/test_ha_s3.py measures it, make bench too.)
    """
    binaries = binaries_for(releases, wanted)
    from harness.service import blackholed

    with two_replicas(tmp_path) as (a, service_url):
        node = node_for(tmp_path, binaries)
        with Containerd.start(binaries, str(node.certs_dir)) as daemon:
            rc, events = node.agent_once(plan(service_url, upstream))
            assert rc == 0, events
            with blackholed((a.host, a.port)):
                timings = []
                for _ in range(3):
                    daemon.remove_image(f"{upstream.address}/team/app:v1")
                    ok, seconds = timed_cri_pull(daemon, f"{upstream.address}/team/app:v1")
                    assert ok, daemon.log()[-2000:]
                    timings.append(seconds)
        print(
            f"containerd {binaries.release}, one of two replicas blackholed behind the ClusterIP: pulls {[round(t, 2) for t in timings]}s"
        )
        assert max(timings) < CONTAINERD_DEFAULT_DIAL / 3


GUARD = ["--guard-connections"]


@pytest.mark.parametrize("kind", ["blackholed", "hanging"])
@pytest.mark.parametrize("wanted", release_params())
def test_with_the_connection_guard_a_pull_already_waiting_on_a_dead_mirror_lets_go_at_once(
    releases: dict[str, ContainerdBinaries], wanted: str, kind: str, mirror: Registry, upstream: Registry, tmp_path: Path
) -> None:
    """The pull starts the moment the mirror dies, with the mirror still in hosts.toml: the worst moment.

    Without the guard it waits 30 s per request (blackholed, before dial_timeout) or until
    containerd gives up on the response (hanging: 30 s per request on 2.3+, minutes before).
    The guard (the agent shares this network namespace, as its DaemonSet shares the node's)
    sees the request waiting, probes the mirror, withdraws it and aborts its connections: each
    request fails over to the upstream, on every release.
    """
    binaries = binaries_for(releases, wanted)
    if kind == "blackholed" and not iptables_usable():
        pytest.skip("iptables is not usable here")
    node = node_for(tmp_path, binaries)
    hosts_toml = node.certs_dir / f"127.0.0.2_{upstream.port}_" / "hosts.toml"
    ref = f"{upstream.address}/team/app:v1"
    with Containerd.start(binaries, str(node.certs_dir)) as daemon, node.agent_loop(plan(mirror, upstream), 2.0, GUARD) as agent:
        agent.wait_event("files.applied")
        assert hosts_toml.exists()
        ok, direct = timed_cri_pull(daemon, ref)
        assert ok, daemon.log()[-2000:]
        daemon.remove_image(ref)
        before = served(upstream, "/v2/team/app/manifests/v1")
        with dead_mirror(kind, mirror):
            ok, seconds = timed_cri_pull(daemon, ref, timeout=60)
            withdrawn = agent.wait_event("mirror.withdrawn", timeout=10)
        aborted = sum(e["count"] for e in agent.events() if e.get("event") == "connections.aborted")
        print(
            f"containerd {binaries.release}, mirror {kind} with the guard: pull {seconds:.2f}s "
            f"(through the healthy mirror {direct:.2f}s), {aborted} connections aborted; withdrawn: {withdrawn['error']}"
        )
        assert ok, daemon.log()[-2000:]
        assert served(upstream, "/v2/team/app/manifests/v1") > before, "the upstream served it"
        if kind == "hanging" or not dial_timeout_supported(binaries.runtime_version):
            assert aborted >= 1, agent.events()[-20:]  # where containerd reads dial_timeout, it lets go of a blackhole itself
        # A few seconds at most on a loaded machine; without the guard: 30 s per request, or never.
        assert seconds < CONTAINERD_DEFAULT_DIAL / 6, agent.events()[-20:]


@pytest.mark.parametrize("wanted", ["1.6", "2.0.5"])
def test_with_the_connection_guard_one_dark_replica_costs_old_containerd_no_thirty_seconds(
    releases: dict[str, ContainerdBinaries], wanted: str, upstream: Registry, tmp_path: Path
) -> None:
    """Releases without dial_timeout: a connection kube-proxy sends to a dead replica is let go by the guard.

    Two replicas behind a kernel DNAT ClusterIP, one blackholed. The probes of the ClusterIP
    may well land on the live one, so the mirror stays; each connect the kernel sends to the dark
    one is aborted once it is late (the guard's connect timeout), and that request goes on to the
    next host. Without the guard each such request waits 30 s.
    """
    binaries = binaries_for(releases, wanted)
    from harness.service import blackholed

    with two_replicas(tmp_path) as (a, service_url):
        node = node_for(tmp_path, binaries)
        ref = f"{upstream.address}/team/app:v1"
        mirror_plan = plan(service_url, upstream)
        with Containerd.start(binaries, str(node.certs_dir)) as daemon, node.agent_loop(mirror_plan, 2.0, GUARD) as agent:
            agent.wait_event("files.applied")
            with blackholed((a.host, a.port)):
                timings = []
                for _ in range(4):
                    daemon.remove_image(ref)
                    ok, seconds = timed_cri_pull(daemon, ref, timeout=90)
                    assert ok, daemon.log()[-2000:]
                    timings.append(seconds)
            aborted = sum(e["count"] for e in agent.events() if e.get("event") == "connections.aborted")
        print(
            f"containerd {binaries.release}, one of two replicas blackholed, with the guard: pulls {[round(t, 2) for t in timings]}s, "
            f"{aborted} connections aborted"
        )
        assert max(timings) < CONTAINERD_DEFAULT_DIAL / 6


@pytest.mark.parametrize("wanted", ["1.6", "2.4"])
def test_with_the_connection_guard_a_many_layer_pull_on_a_hanging_mirror_pays_once_not_per_layer(
    releases: dict[str, ContainerdBinaries], wanted: str, upstream: Registry, tmp_path: Path
) -> None:
    """A cold image of ten layers: the pull pays for the mirror's death once, not once per layer.

    (CRI here sends only its resolve to the mirror and fetches the rest from the host that
    resolved the tag; any later request that still reaches the withdrawn mirror is aborted
    within ABORT_INTERVAL.)
    """
    from _images import multi_layer_image

    binaries = binaries_for(releases, wanted)
    # Images of ten layers: one pulled while the mirror is healthy, the others (nothing of them on the node) once it hangs.
    healthy, cold = (
        multi_layer_image(tmp_path / name, name=f"team/{name}", layer_sizes=tuple((32 + i) << 10 for i in range(10)))
        for name in ("warm", "cold")
    )
    with Registry.start(tmp_path / "mirror", "127.0.0.3") as mirror:
        for image in (healthy, cold):
            image.push(upstream.address)
            image.push(mirror.address)
        node = node_for(tmp_path, binaries)
        with Containerd.start(binaries, str(node.certs_dir)) as daemon, node.agent_loop(plan(mirror, upstream), 2.0, GUARD) as agent:
            agent.wait_event("files.applied")
            ok, direct = timed_cri_pull(daemon, f"{upstream.address}/{healthy.name}:{healthy.tag}")
            assert ok, daemon.log()[-2000:]
            with dead_mirror("hanging", mirror):
                ok, seconds = timed_cri_pull(daemon, f"{upstream.address}/{cold.name}:{cold.tag}", timeout=60)
            aborted = sum(e["count"] for e in agent.events() if e.get("event") == "connections.aborted")
    print(
        f"containerd {binaries.release}, 10-layer image, mirror hanging, with the guard: {seconds:.2f}s "
        f"(another through the healthy mirror {direct:.2f}s), {aborted} connections aborted"
    )
    assert ok, daemon.log()[-2000:]
    assert aborted >= 1
    assert seconds < CONTAINERD_DEFAULT_DIAL / 6
