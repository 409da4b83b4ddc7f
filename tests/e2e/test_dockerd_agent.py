"""The agent on a Docker Engine node: real dockerd (Debian's) reloads the daemon.json the agent merged, and pulls through the mirror.

dockerd runs with an admin's daemon.json (a log level, an insecure registry
of their own). The agent (`regmirror agent --once`, a plan whose mirror asks
for the docker runtime) merges the mirror into it, keeps every admin key and
entry, and sends dockerd SIGHUP: `docker info` then lists the mirror, without
a restart, and `docker pull` of a Docker Hub image is served by the mirror.
When the mirror leaves the plan, the admin's file comes back as it was (with
`registry-mirrors: []`: dockerd's reload ignores a key that is absent, so
removing it would keep the mirror in the running daemon), and dockerd forgets
the mirror on that reload.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from _dataplane import OPERATOR_SRC, Dockerd, Registry, docker_cli, wait_for

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="runs dockerd: needs root"),
    pytest.mark.skipif(shutil.which("dockerd") is None or docker_cli() is None, reason="dockerd (Debian docker.io) is not installed"),
    pytest.mark.skipif(shutil.which("docker-registry") is None, reason="docker-registry is not installed"),
]

ADMIN = {"log-level": "warn", "insecure-registries": ["admin.example:5000"], "max-concurrent-downloads": 2}


def plan(mirror_url: str | None) -> str:
    mirrors = []
    if mirror_url:
        mirrors.append(
            {
                "name": "hub",
                "hosts": ["docker.io"],
                "servers": {"docker.io": "https://registry-1.docker.io"},
                "upstreamHost": "docker.io",
                "url": mirror_url,
                "priority": 100,
                "capabilities": ["pull", "resolve"],
                "fallback": "AllowUpstream",
                "runtimes": ["docker"],
                "nodeSelector": {},
            }
        )
    return json.dumps({"mirrors": mirrors})


def run_agent(tmp_path: Path, dockerd: Dockerd, plan_json: str) -> list[dict[str, Any]]:
    (tmp_path / "plan.json").write_text(plan_json)
    version = subprocess.run(["dockerd", "--version"], capture_output=True, text=True, check=True).stdout.split()[2].rstrip(",")
    node = {
        "metadata": {"name": "n1", "uid": "u1", "labels": {}},
        "status": {"nodeInfo": {"containerRuntimeVersion": f"docker://{version}"}},
    }
    (tmp_path / "node.json").write_text(json.dumps(node))
    argv = [
        sys.executable,
        "-m",
        "regmirror",
        "agent",
        "--once",
        "--plan",
        str(tmp_path / "plan.json"),
        "--host-root",
        "/",
        "--node-labels-file",
        str(tmp_path / "node.json"),
        "--health-port",
        "0",
        # Nothing outside this test's directories: containerd and CRI-O files go here (none are planned).
        "--containerd-config-path",
        str(tmp_path / "certs.d"),
        "--crio-dropin-dir",
        str(tmp_path / "registries.conf.d"),
        "--containerd-config",
        str(tmp_path / "no-containerd.toml"),
        "--docker-daemon-json",
        str(dockerd.workdir / "daemon.json"),
        "--docker-pidfile",
        str(dockerd.workdir / "docker.pid"),
    ]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False, env={**os.environ, "PYTHONPATH": OPERATOR_SRC})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def registry_config(dockerd: Dockerd) -> dict[str, Any]:
    out = dockerd.docker("info", "--format", "{{json .RegistryConfig}}", timeout=30)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def test_dockerd_reloads_the_mirror_the_agent_merged_into_its_daemon_json(tmp_path: Path) -> None:
    with Registry.start(tmp_path / "mirror") as mirror, Dockerd.start(ADMIN) as dockerd:
        mirror.push_image("library/hello", "v1")
        started_pid = dockerd.proc.pid
        assert registry_config(dockerd)["Mirrors"] in (None, [])

        events = run_agent(tmp_path, dockerd, plan(mirror.url))
        applied = [e for e in events if e["event"] == "docker.applied"]
        assert applied and applied[0]["reloaded"] is True, events
        written = json.loads((dockerd.workdir / "daemon.json").read_text())
        assert written == {**ADMIN, "insecure-registries": [mirror.address, "admin.example:5000"], "registry-mirrors": [mirror.url]}

        # dockerd applies it on SIGHUP, without a restart.
        wait_for(lambda: registry_config(dockerd)["Mirrors"] == [mirror.url + "/"], 20, "dockerd to reload its mirrors")
        assert dockerd.proc.pid == started_pid and dockerd.proc.poll() is None
        index = registry_config(dockerd)["IndexConfigs"]
        assert index.get(mirror.address, {}).get("Secure") is False and index.get("admin.example:5000", {}).get("Secure") is False

        pulled = dockerd.docker("pull", "docker.io/library/hello:v1", timeout=120)
        assert pulled.returncode == 0, pulled.stderr + dockerd.log()[-2000:]
        assert "/v2/library/hello/manifests/v1" in mirror.requests_log(), "the pull went through the mirror"

        # Running again changes nothing and signals nothing.
        assert not [e for e in run_agent(tmp_path, dockerd, plan(mirror.url)) if e["event"].startswith("docker.")]

        # The mirror leaves the plan: the admin's file as it was (the key we added stays, empty: dockerd's
        # reload ignores a key that is not in the file), and dockerd forgets the mirror.
        events = run_agent(tmp_path, dockerd, plan(None))
        assert [e for e in events if e["event"] == "docker.applied"], events
        assert json.loads((dockerd.workdir / "daemon.json").read_text()) == {**ADMIN, "registry-mirrors": []}
        wait_for(lambda: registry_config(dockerd)["Mirrors"] in (None, []), 20, "dockerd to drop the mirror")
        assert dockerd.proc.pid == started_pid and dockerd.proc.poll() is None
