"""The agent's files against real containerd 1.6, 1.7 and 2.x, a real registry as the mirror, and a fake upstream.

For each containerd release:
- the agent (`python -m regmirror.agent --once`) writes hosts.toml files, and
  both `ctr --hosts-dir` and the CRI plugin (crictl, kubelet's path) pull
  docker.io and a host with a port (`127.0.0.2:<port>`) through the mirror,
  never touching the upstream;
- NeverContactUpstream with the mirror down: the pull fails and the upstream
  sees no connection; AllowUpstream with the mirror down: the agent withdraws
  the mirror and the pull goes to the upstream at once;
- preflight's verdict matches what containerd does: ok exactly when the CRI
  plugin pulls through the agent's files.

The upstream is a TCP listener that counts connections (there is no internet
here, and a real upstream would hide a leak).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from _dataplane import (
    CRI_V1_REGISTRY,
    CRI_V2_REGISTRY,
    ConnectionRecorder,
    Containerd,
    ContainerdBinaries,
    Registry,
    build_containerd,
    config_path_toml,
    ensure_binaries,
    free_port,
    system_containerd,
)

from regmirror import constants as c
from unit._agentkit import tls_material

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="runs containerd: needs root")

# 2.0, 2.1 and 2.2 are built when REGMIRROR_CONTAINERD_VERSIONS lists them (the preflight's
# findings about the transfer service are about 2.1+); missing ones skip with the reason.
VERSIONS = ["1.6", "1.7", "2.0", "2.1", "2.2", "2.4"]
OPERATOR_SRC = str(Path(__file__).resolve().parents[2] / "operator")


@pytest.fixture(scope="module")
def containerds() -> dict[str, ContainerdBinaries | str]:
    """containerd release -> binaries, or the reason it is unavailable."""
    reason = ensure_binaries()
    if reason:
        pytest.skip(reason)
    built, why = build_containerd()
    crictl = next((b.crictl for b in built if b.crictl), None)
    found: dict[str, ContainerdBinaries | str] = {v: f"containerd {v} could not be built: {why}" for v in VERSIONS}
    system = system_containerd(crictl)
    for b in [*([system] if system else []), *built]:
        found[b.version] = b
    return found


def binaries_for(containerds: dict[str, ContainerdBinaries | str], version: str) -> ContainerdBinaries:
    found = containerds.get(version)
    if not isinstance(found, ContainerdBinaries):
        pytest.skip(str(found))
    if not found.crictl:
        pytest.skip("crictl could not be built")
    return found


@pytest.fixture(scope="module")
def mirror(tmp_path_factory: pytest.TempPathFactory, containerds: object) -> Iterator[Registry]:
    with Registry.start(tmp_path_factory.mktemp("mirror")) as registry:
        registry.push_image("library/hello", "v1")
        registry.push_image("team/app", "v1")
        yield registry


@pytest.fixture
def upstream() -> Iterator[ConnectionRecorder]:
    with ConnectionRecorder.start("127.0.0.2") as rec:
        yield rec


def entry(name: str, url: str, hosts: list[str], fallback: str = "AllowUpstream") -> dict[str, object]:
    """A plan entry in the wire form the operator writes (NodePlan.to_json)."""
    return {
        "name": name,
        "hosts": hosts,
        "servers": {h: (c.DOCKER_HUB_SERVER if h == "docker.io" else f"https://{h}") for h in hosts},
        "url": url,
        "priority": 100,
        "capabilities": ["pull", "resolve"],
        "fallback": fallback,
        "runtimes": ["containerd"],
        "nodeSelector": {"matchLabels": {}, "matchExpressions": []},
        "caPem": None,
    }


class Node:
    """A node's view for the agent: a plan file, a Node object, and the directories it writes."""

    def __init__(self, tmp: Path, daemon: Containerd) -> None:
        self.tmp = tmp
        self.daemon = daemon
        self.certs = str(tmp / "certs.d")
        self.plan = tmp / "mirrors.json"
        self.node = tmp / "node.json"
        self.node.write_text(
            json.dumps(
                {
                    "metadata": {"name": "n1", "uid": "u1", "labels": {"kubernetes.io/hostname": "n1"}},
                    "status": {"nodeInfo": {"containerRuntimeVersion": daemon.binaries.runtime_version}},
                }
            )
        )

    def agent_once(self, *entries: dict[str, object]) -> tuple[int, list[dict[str, object]]]:
        self.plan.write_text(json.dumps({"mirrors": list(entries)}))
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "regmirror.agent",
                "--once",
                "--plan",
                str(self.plan),
                "--host-root",
                "/",
                "--containerd-config-path",
                self.certs,
                "--containerd-config",
                str(self.daemon.config_file),
                "--crio-dropin-dir",
                str(self.tmp / "registries.conf.d"),
                "--node-labels-file",
                str(self.node),
                "--health-port",
                "0",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env={**os.environ, "PYTHONPATH": OPERATOR_SRC},
        )
        events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
        assert proc.returncode in (0, 1), proc.stderr
        return proc.returncode, events


def pulled(result: subprocess.CompletedProcess[str]) -> bool:
    return result.returncode == 0


@pytest.mark.parametrize("version", VERSIONS)
def test_pulls_go_through_the_mirror_for_docker_hub_and_a_host_with_a_port(
    containerds: dict[str, ContainerdBinaries | str], version: str, mirror: Registry, upstream: ConnectionRecorder, tmp_path: Path
) -> None:
    binaries = binaries_for(containerds, version)
    host = upstream.address  # 127.0.0.2:<port>
    with Containerd.start(binaries, str(tmp_path / "certs.d")) as daemon:
        node = Node(tmp_path, daemon)
        rc, events = node.agent_once(entry("hub", mirror.url, ["docker.io"]), entry("team", mirror.url, [host]))
        assert rc == 0, events
        written = sorted(p.relative_to(node.certs).as_posix() for p in Path(node.certs).rglob("hosts.toml"))
        docker_hub = ["docker.io/hosts.toml", "index.docker.io/hosts.toml", "registry-1.docker.io/hosts.toml"]
        assert written == sorted([*docker_hub, f"127.0.0.2_{upstream.port}_/hosts.toml"])

        for ref in ("docker.io/library/hello:v1", f"{host}/team/app:v1"):
            result = daemon.pull(ref, hosts_dir=node.certs)
            assert pulled(result), f"ctr: {result.stderr[-800:]}"
            result = daemon.cri_pull(ref)
            assert pulled(result), f"CRI: {result.stderr[-800:]}"
        assert upstream.connections == []
        assert "/v2/team/app/manifests/v1" in mirror.requests_log()


@pytest.mark.parametrize("version", VERSIONS)
def test_never_contact_upstream_fails_closed_and_allow_upstream_fails_open(
    containerds: dict[str, ContainerdBinaries | str], version: str, mirror: Registry, upstream: ConnectionRecorder, tmp_path: Path
) -> None:
    binaries = binaries_for(containerds, version)
    dead_mirror = f"http://127.0.0.1:{free_port()}"
    with Containerd.start(binaries, str(tmp_path / "certs.d")) as daemon, ConnectionRecorder.start("127.0.0.3") as open_upstream:
        node = Node(tmp_path, daemon)
        rc, events = node.agent_once(
            entry("vault", dead_mirror, [upstream.address], fallback="NeverContactUpstream"),
            entry("open", dead_mirror, [open_upstream.address]),
        )
        assert rc == 0, events
        assert any(e["event"] == "mirror.withdrawn" and e["mirror"] == "open" for e in events)
        assert any(e["event"] == "mirror.unreachable" and e["mirror"] == "vault" for e in events)

        for result in (
            daemon.pull(f"{upstream.address}/team/app:v1", hosts_dir=node.certs),
            daemon.cri_pull(f"{upstream.address}/team/app:v1"),
        ):
            assert not pulled(result)
        assert upstream.connections == [], "a strict host never reaches its upstream, even with its mirror down"

        result = daemon.cri_pull(f"{open_upstream.address}/team/app:v1", timeout=20)
        assert not pulled(result)  # our stand-in upstream answers nothing
        assert open_upstream.connections, "a withdrawn mirror leaves the host to its upstream"

        # The strict mirror comes back: pulls work, still without the upstream.
        rc, events = node.agent_once(entry("vault", mirror.url, [upstream.address], fallback="NeverContactUpstream"))
        assert rc == 0, events
        assert pulled(daemon.pull(f"{upstream.address}/team/app:v1", hosts_dir=node.certs))
        assert pulled(daemon.cri_pull(f"{upstream.address}/team/app:v1"))
        assert upstream.connections == []


def preflight_cases(major: int) -> list[tuple[str, int, str, str]]:
    """(case, config version, registry TOML, images plugin lines) with {certs} for the agent's directory,
    {other} for another directory of a config_path list, {host} for the registry host."""
    own = 3 if major >= 2 else 2
    other_table = CRI_V1_REGISTRY if own == 3 else CRI_V2_REGISTRY
    mirrors_table = (CRI_V2_REGISTRY if own == 3 else CRI_V1_REGISTRY)[:-1] + '.mirrors."{host}"]'
    cases = [
        ("config_path set", own, config_path_toml(own, "{certs}"), ""),
        ("config_path unset", own, "", ""),
        ("config_path in the other version's table", own, f'{other_table}\n  config_path = "{{certs}}"\n', ""),
        ("config_path elsewhere", own, config_path_toml(own, "/nonexistent/certs.d"), ""),
        ("deprecated mirrors only", own, f'{mirrors_table}\n  endpoint = ["http://{{host}}"]\n', ""),
        ("mirrors and config_path", own, config_path_toml(own, "{certs}") + f'{mirrors_table}\n  endpoint = ["http://{{host}}"]\n', ""),
        # containerd#12415 / #12636: 2.1+ pulls through the transfer service, which takes the list as one directory.
        ("config_path list, ours first", own, config_path_toml(own, "{certs}:{other}"), ""),
        # An earlier directory of the list that has the host (Docker's host:port layout) wins over ours.
        ("config_path list, an earlier directory has the host", own, config_path_toml(own, "{other}:{certs}"), ""),
    ]
    if major >= 2:
        cases.append(("a version 2 config on containerd 2.x", 2, config_path_toml(2, "{certs}"), ""))
        cases.append(
            ("config_path list with use_local_image_pull", own, config_path_toml(own, "{certs}:{other}"), "  use_local_image_pull = true")
        )
    return cases


@pytest.mark.parametrize("version", VERSIONS)
def test_preflight_says_ok_exactly_when_containerd_reads_the_agents_files(
    containerds: dict[str, ContainerdBinaries | str], version: str, mirror: Registry, upstream: ConnectionRecorder, tmp_path: Path
) -> None:
    binaries = binaries_for(containerds, version)
    verdicts = []
    for i, (case, config_version, registry_toml, images_toml) in enumerate(preflight_cases(binaries.major)):
        work = tmp_path / f"case{i}"
        work.mkdir()
        other = work / "docker-certs.d"
        (other / upstream.address).mkdir(parents=True)  # Docker's layout (host:port), as `docker login` leaves it
        toml = registry_toml.replace("{certs}", str(work / "certs.d")).replace("{other}", str(other)).replace("{host}", upstream.address)
        with Containerd.start(binaries, registry_toml=toml, config_version=config_version, images_toml=images_toml) as daemon:
            node = Node(work, daemon)
            rc, events = node.agent_once(entry("team", mirror.url, [upstream.address]))
            failed = [e for e in events if e["event"] == "preflight.failed"]
            ref = f"{upstream.address}/team/app:v1"
            through_mirror = pulled(daemon.cri_pull(ref, timeout=20))
            verdicts.append((case, rc == 0, through_mirror, failed[0]["reason"] if failed else "Ok"))
            daemon.remove_image(ref)
    print(f"containerd {binaries.release}: (case, preflight ok, pulled through the agent files, reason)", *verdicts, sep="\n  ")
    mismatched = [v for v in verdicts if v[1] != v[2]]
    assert not mismatched, f"preflight (ok?) vs containerd (pulled through the mirror?): {verdicts}"
    assert verdicts[0][1:3] == (True, True), verdicts
    by_case = {v[0]: v[3] for v in verdicts}
    assert by_case["config_path list, an earlier directory has the host"] in ("ConfigPathShadowed", "ConfigPathListIgnored")
    if (binaries.major, int(binaries.version.split(".")[1])) >= (2, 1):
        assert by_case["config_path list, ours first"] == "ConfigPathListIgnored", "containerd#12415/#12636 on this release"


# ------------------------------------------------------------------ issue 11: trust


def requests_to(log: str, host: str) -> list[str]:
    """containerd's own debug lines that resolve at or send a request to `host` (a mirror's ?ns= names do not count)."""
    pattern = re.compile(rf'(host|url)="?(https?://)?{re.escape(host)}[:/" ]')
    return [line for line in log.splitlines() if pattern.search(line)]


def ctr_debug_pull(daemon: Containerd, ref: str, hosts_dir: str) -> subprocess.CompletedProcess[str]:
    """`ctr --debug images pull`: the client-side resolver logs the hosts it tries to stderr."""
    return daemon.ctr("--debug", "images", "pull", "--snapshotter", "native", "--hosts-dir", hosts_dir, ref, timeout=60)


@pytest.mark.parametrize("version", VERSIONS)
def test_a_strict_mirror_listed_under_docker_hubs_aliases_takes_every_docker_hub_pull(
    containerds: dict[str, ContainerdBinaries | str], version: str, mirror: Registry, tmp_path: Path
) -> None:
    """registry-1.docker.io + docker.io + DOCKER.IO + index.docker.io: one route, three directories, no request upstream.

    On main the plan carried docker.io several times, hosts.toml declared one
    table twice, containerd logged "failed to decode hosts.toml" and went to
    registry-1.docker.io (a DNS failure here, a Docker Hub pull in real life).
    """
    binaries = binaries_for(containerds, version)
    with Containerd.start(binaries, str(tmp_path / "certs.d")) as daemon:
        node = Node(tmp_path, daemon)
        spellings = ["registry-1.docker.io", "docker.io", "DOCKER.IO", "index.docker.io"]
        # What an older operator wrote for that list (the canonical name repeated), and the raw spellings.
        for hosts in (["docker.io"] * 4, spellings):
            rc, events = node.agent_once(entry("vault", mirror.url, hosts, fallback="NeverContactUpstream"))
            assert rc == 0, events
            before = len(daemon.log())
            client_logs = []
            for ref in ("docker.io/library/hello:v1", "registry-1.docker.io/library/hello:v1", "index.docker.io/library/hello:v1"):
                daemon.remove_image(ref)
                result = ctr_debug_pull(daemon, ref, node.certs)
                assert pulled(result), f"ctr {ref} ({hosts}): {result.stderr[-800:]}"
                client_logs.append(result.stderr)
            for ref in ("docker.io/library/hello:v1", "registry-1.docker.io/library/hello:v1"):
                result = daemon.cri_pull(ref)
                assert pulled(result), f"CRI {ref} ({hosts}): {result.stderr[-800:]}\n{daemon.log()[-2000:]}"
            logs = "\n".join([*client_logs, daemon.log()[before:]])
            assert "failed to decode hosts.toml" not in logs
            assert requests_to(logs, mirror.address), "containerd's log shows the mirror it used"
            for upstream_name in ("registry-1.docker.io", "index.docker.io", "docker.io"):
                assert requests_to(logs, upstream_name) == [], f"containerd contacted {upstream_name}"
        served = mirror.requests_log()
        for ns in ("docker.io", "registry-1.docker.io", "index.docker.io"):
            assert f"/v2/library/hello/manifests/v1?ns={ns}" in served, f"the mirror served the {ns} pull"


@pytest.mark.parametrize("version", VERSIONS)
def test_a_strict_hosts_spellings_never_reach_the_loopback_upstream(
    containerds: dict[str, ContainerdBinaries | str], version: str, mirror: Registry, tmp_path: Path
) -> None:
    """localhost:<port> listed as LOCALHOST:<port> and localhost:<port>: pulls of it go to the mirror, the upstream sees nothing."""
    binaries = binaries_for(containerds, version)
    with Containerd.start(binaries, str(tmp_path / "certs.d")) as daemon, ConnectionRecorder.start("127.0.0.1") as upstream:
        node = Node(tmp_path, daemon)
        host = f"localhost:{upstream.port}"
        rc, events = node.agent_once(entry("vault", mirror.url, [host, host.upper(), host], fallback="NeverContactUpstream"))
        assert rc == 0, events
        ref = f"{host}/team/app:v1"
        daemon.pull(ref, hosts_dir=node.certs)
        daemon.cri_pull(ref, timeout=20)
        assert upstream.connections == [], "a strict host never reaches its upstream"
        assert "failed to decode hosts.toml" not in daemon.log()
        assert sorted(p.name for p in Path(node.certs).iterdir()) == [f"localhost_{upstream.port}_"]
        daemon.remove_image(ref)
        assert pulled(daemon.pull(ref, hosts_dir=node.certs))
        assert pulled(daemon.cri_pull(ref))


@pytest.mark.parametrize("version", VERSIONS)
def test_a_strict_mirror_that_cannot_be_used_blocks_its_host_without_a_connection(
    containerds: dict[str, ContainerdBinaries | str], version: str, upstream: ConnectionRecorder, tmp_path: Path
) -> None:
    """A strict entry that fails its checks (here: a name with a newline) leaves a file in which nothing may pull or resolve.

    On main the newline broke the TOML of the comment it was written into:
    containerd refused the file and went straight to the upstream.
    """
    binaries = binaries_for(containerds, version)
    with Containerd.start(binaries, str(tmp_path / "certs.d")) as daemon:
        node = Node(tmp_path, daemon)
        hostile = entry("vault\nx", f"http://127.0.0.1:{free_port()}", [upstream.address], fallback="NeverContactUpstream")
        node.agent_once(hostile)
        ref = f"{upstream.address}/team/app:v1"
        assert not pulled(daemon.pull(ref, hosts_dir=node.certs))
        assert not pulled(daemon.cri_pull(ref, timeout=20))
        assert upstream.connections == []
        assert "failed to decode hosts.toml" not in daemon.log()
        rc, events = node.agent_once(hostile)
        assert rc == 0, events
        assert any(e["event"] == "finding" and e["reason"] == "MirrorRejected" for e in events)


@contextlib.contextmanager
def tls_upstream(workdir: Path, host: str) -> Iterator[tuple[Registry, Path]]:
    """A registry over https on `host` with an image, its certificate signed by a private CA; yields it and the CA file."""
    port = free_port(host)
    with Registry.start(workdir / "plain", host, port) as plain:
        plain.push_image("team/app", "v1")
    ca, cert, key = tls_material(workdir, host)
    config = workdir / "tls.yml"
    config.write_text(
        "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\n"
        f"storage:\n  filesystem:\n    rootdirectory: {workdir / 'plain' / 'data'}\n"
        f"http:\n  addr: {host}:{port}\n  debug:\n    addr: ''\n  tls:\n    certificate: {cert}\n    key: {key}\n"
    )
    with Registry.launch(workdir / "tls", ["docker-registry", "serve", str(config)], None, host, port) as registry:
        yield registry, ca


@pytest.mark.parametrize("version", VERSIONS)
def test_an_admins_docker_style_ca_keeps_working_under_our_hosts_toml(
    containerds: dict[str, ContainerdBinaries | str], version: str, tmp_path: Path
) -> None:
    """certs.d/<host:port>/ca.crt (no hosts.toml) trusts a private upstream; our hosts.toml must not take that away.

    The mirror answers but has not got the image, so containerd falls back to
    the upstream, over TLS with the admin's CA. On main, our hosts.toml made
    containerd ignore ca.crt and the fallback failed certificate verification.
    A control with a different CA in the admin's file shows the CA is what
    makes the pull work.
    """
    binaries = binaries_for(containerds, version)
    with (
        Registry.start(tmp_path / "empty-mirror") as empty_mirror,
        tls_upstream(tmp_path / "upstream", "127.0.0.3") as (upstream, ca),
        Containerd.start(binaries, str(tmp_path / "certs.d")) as daemon,
    ):
        node = Node(tmp_path, daemon)
        admin_dir = Path(node.certs) / upstream.address  # Docker's layout: host:port
        admin_dir.mkdir(parents=True)
        shutil.copy(ca, admin_dir / "ca.crt")
        ref = f"{upstream.address}/team/app:v1"
        # (No "before" pull: containerd skips TLS verification for a loopback host it has no hosts.toml for,
        # so on this machine the admin's CA only matters once a hosts.toml names the server.)
        rc, events = node.agent_once(entry("cache", empty_mirror.url, [upstream.address]))
        assert rc == 0, events
        ours = Path(node.certs) / f"127.0.0.3_{upstream.port}_" / "hosts.toml"
        assert ours.exists(), "the mirror is applied for the host"
        for result in (daemon.pull(ref, hosts_dir=node.certs), daemon.cri_pull(ref)):
            assert pulled(result), f"{result.stderr[-800:]}\n{daemon.log()[-1500:]}"
        assert any(e["event"] == "finding" and e["reason"] == "ForeignCertsCarried" for e in events)
        assert "/v2/team/app/manifests/v1" in empty_mirror.requests_log(), "the mirror was asked first"
        assert "/v2/team/app/manifests/v1" in upstream.requests_log(), "then the upstream, trusted through the admin's CA"
        assert (admin_dir / "ca.crt").read_bytes() == ca.read_bytes()

        # The control: with another CA in the admin's file, the same pull fails verification.
        daemon.remove_image(ref)
        (admin_dir / "ca.crt").write_bytes(tls_material(tmp_path, "127.0.0.3")[0].read_bytes())
        served = upstream.requests_log().count("/v2/team/app/manifests/v1")
        result = daemon.pull(ref, hosts_dir=node.certs)
        assert not pulled(result), result.stderr[-800:]
        assert upstream.requests_log().count("/v2/team/app/manifests/v1") == served, "TLS verification stopped it before any request"
