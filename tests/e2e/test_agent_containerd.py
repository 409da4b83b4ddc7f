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

import json
import os
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

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="runs containerd: needs root")

VERSIONS = ["1.6", "1.7", "2.4"]
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
                    "status": {"nodeInfo": {"containerRuntimeVersion": f"containerd://{daemon.binaries.version}.0"}},
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
        assert written == sorted(["docker.io/hosts.toml", f"127.0.0.2_{upstream.port}_/hosts.toml"])

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


def preflight_cases(major: int) -> list[tuple[str, int, str]]:
    """(case, config version, registry TOML with {certs} for the agent's directory)."""
    own = 3 if major >= 2 else 2
    other_table = CRI_V1_REGISTRY if own == 3 else CRI_V2_REGISTRY
    mirrors_table = (CRI_V2_REGISTRY if own == 3 else CRI_V1_REGISTRY)[:-1] + '.mirrors."{host}"]'
    cases = [
        ("config_path set", own, config_path_toml(own, "{certs}")),
        ("config_path unset", own, ""),
        ("config_path in the other version's table", own, f'{other_table}\n  config_path = "{{certs}}"\n'),
        ("config_path elsewhere", own, config_path_toml(own, "/nonexistent/certs.d")),
        ("deprecated mirrors only", own, f'{mirrors_table}\n  endpoint = ["http://{{host}}"]\n'),
        ("mirrors and config_path", own, config_path_toml(own, "{certs}") + f'{mirrors_table}\n  endpoint = ["http://{{host}}"]\n'),
    ]
    if major >= 2:
        cases.append(("a version 2 config on containerd 2.x", 2, config_path_toml(2, "{certs}")))
    return cases


@pytest.mark.parametrize("version", VERSIONS)
def test_preflight_says_ok_exactly_when_containerd_reads_the_agents_files(
    containerds: dict[str, ContainerdBinaries | str], version: str, mirror: Registry, upstream: ConnectionRecorder, tmp_path: Path
) -> None:
    binaries = binaries_for(containerds, version)
    verdicts = []
    for i, (case, config_version, registry_toml) in enumerate(preflight_cases(binaries.major)):
        work = tmp_path / f"case{i}"
        work.mkdir()
        toml = registry_toml.replace("{certs}", str(work / "certs.d")).replace("{host}", upstream.address)
        with Containerd.start(binaries, registry_toml=toml, config_version=config_version) as daemon:
            node = Node(work, daemon)
            rc, events = node.agent_once(entry("team", mirror.url, [upstream.address]))
            failed = [e for e in events if e["event"] == "preflight.failed"]
            ref = f"{upstream.address}/team/app:v1"
            through_mirror = pulled(daemon.cri_pull(ref, timeout=20))
            verdicts.append((case, rc == 0, through_mirror, failed[0]["reason"] if failed else "Ok"))
            daemon.remove_image(ref)
    print(f"containerd {version}: (case, preflight ok, pulled through the agent files, reason)", *verdicts, sep="\n  ")
    mismatched = [v for v in verdicts if v[1] != v[2]]
    assert not mismatched, f"preflight (ok?) vs containerd (pulled through the mirror?): {verdicts}"
    assert verdicts[0][1:3] == (True, True), verdicts
