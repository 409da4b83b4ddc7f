"""The agent's registries.conf.d drop-in against a real CRI-O (1.34, built from its Go module: bookworm has no package).

CRI-O runs with its own root, socket and registries.conf, runc and conmon from
Debian, and reads the drop-in directory the agent writes (`--registries-conf-dir`);
it re-reads it on SIGHUP (`systemctl reload crio`), which the tests send after
each agent run, as the preflight tells admins to. Pulls go through CRI (crictl).

- a host routed to a mirror pulls through it, never touching the upstream;
- NeverContactUpstream with the mirror down: the pull fails, the upstream sees nothing;
- the cluster's short-name search order (settings.unqualifiedSearchRegistries):
  `crictl pull team/app:v1` resolves to the registry listed, through its mirror;
- a blocked registry (settings.blockedRegistries) cannot be pulled from at all.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from _dataplane import HERE, OPERATOR_SRC, ConnectionRecorder, Registry, build_containerd, free_port, short_tmpdir, wait_for

from harness.processes import stop_process

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="runs CRI-O: needs root")


@pytest.fixture(scope="module")
def crio_bin() -> Path:
    # `make test` installs and builds all of this first (make setup): missing is a broken set-up, not a reason to skip.
    missing = [b for b in ("runc", "conmon", "gcc", "docker-registry") if shutil.which(b) is None]
    if missing:
        pytest.fail(f"{missing} not installed: run `make system-packages` (Debian packages runc, conmon, gcc, docker-registry)")
    proc = subprocess.run(["bash", str(HERE / "build-crio.sh")], capture_output=True, text=True, timeout=3600, check=False)
    if proc.returncode != 0:
        pytest.fail(f"CRI-O could not be built (make crio): {proc.stderr.strip()[-600:]}")
    return Path(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def crictl() -> str:
    built, why = build_containerd()
    found = next((b.crictl for b in built if b.crictl), None)
    if found is None:
        pytest.fail(f"crictl is not built (make containerd): {why}")
    return found


class Crio:
    """A CRI-O daemon reading `dropins` as its registries.conf.d."""

    def __init__(self, binaries: Path, workdir: Path, dropins: Path, crictl: str, run_containers: Path | None = None) -> None:
        self.workdir = workdir
        self.crictl_bin = crictl
        (workdir / "registries.conf").write_text("unqualified-search-registries = []\n")
        (workdir / "cni").mkdir()
        (workdir / "crio.conf").write_text(
            "[crio]\n"
            f'root = "{workdir}/root"\nrunroot = "{workdir}/runroot"\nstorage_driver = "vfs"\nlog_dir = "{workdir}/logs"\n'
            f'[crio.api]\nlisten = "{workdir}/crio.sock"\n'
            f'[crio.runtime]\ncgroup_manager = "cgroupfs"\nconmon_cgroup = "pod"\ndefault_runtime = "runc"\npinns_path = "{binaries}/pinns"\n'
            f'[crio.runtime.runtimes.runc]\nruntime_path = "{shutil.which("runc")}"\n'
            '[crio.image]\nsignature_policy = "/etc/containers/policy.json"\n'
            f'[crio.network]\nnetwork_dir = "{workdir}/cni"\nplugin_dirs = ["{workdir}/cni"]\n'
        )
        argv = [
            str(binaries / "crio"),
            "--config",
            str(workdir / "crio.conf"),
            "--config-dir",
            str(workdir / "crio.conf.d"),
            "--registries-conf",
            str(workdir / "registries.conf"),
            "--registries-conf-dir",
            str(dropins),
        ]
        if run_containers is not None:
            # CRI-O as root reads /run/containers/0/auth.json (its default auth file): in a mount namespace
            # of its own, that is the node's `run_containers` (as the agent's hostPath is), never this machine's /run.
            script = 'mount -t tmpfs tmpfs /run && mkdir /run/containers && mount --bind "$0" /run/containers && exec "$@"'
            argv = ["unshare", "--mount", "sh", "-c", script, str(run_containers), *argv]
        self.log_file = (workdir / "crio.log").open("wb")
        self.proc = subprocess.Popen(argv, stdout=self.log_file, stderr=subprocess.STDOUT)
        wait_for(lambda: self.proc.poll() is not None or self.crictl("version").returncode == 0, 60, "CRI-O")
        if self.proc.poll() is not None:
            raise RuntimeError(f"crio exited {self.proc.returncode}:\n{self.log()[-3000:]}")

    def log(self) -> str:
        return (self.workdir / "crio.log").read_text(errors="replace")

    def crictl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        endpoint = f"unix://{self.workdir}/crio.sock"
        argv = [self.crictl_bin, "--runtime-endpoint", endpoint, "--image-endpoint", endpoint, "--timeout", f"{int(timeout)}s", *args]
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 10, check=False)

    def reload(self) -> None:
        """SIGHUP: CRI-O re-reads registries.conf and registries.conf.d (what `systemctl reload crio` does)."""
        before = self.log().count("Configuration reload completed")
        self.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: self.log().count("Configuration reload completed") > before, 10, "CRI-O to reload")

    def stop(self) -> None:
        stop_process(self.proc, 20)
        self.log_file.close()
        subprocess.run(["umount", "-R", str(self.workdir)], capture_output=True, check=False)


@contextlib.contextmanager
def crio(binaries: Path, dropins: Path, crictl: str, run_containers: Path | None = None) -> Iterator[Crio]:
    workdir = short_tmpdir("rm-crio-")
    daemon = Crio(binaries, workdir, dropins, crictl, run_containers)
    try:
        yield daemon
    finally:
        daemon.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def entry(name: str, url: str, host: str, server: str, fallback: str = "AllowUpstream") -> dict[str, object]:
    return {
        "name": name,
        "hosts": [host],
        "servers": {host: server},
        "upstreamHost": host,
        "url": url,
        "priority": 100,
        "capabilities": ["pull", "resolve"],
        "fallback": fallback,
        "runtimes": ["crio"],
        "nodeSelector": {},
    }


def agent_argv(tmp_path: Path, dropins: Path, plan: dict[str, object], *extra: str) -> list[str]:
    """`regmirror agent` for a CRI-O node (its plan and Node written under tmp_path), `extra` arguments appended."""
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    node = {"metadata": {"name": "n1", "uid": "u1", "labels": {}}, "status": {"nodeInfo": {"containerRuntimeVersion": "cri-o://1.34.0"}}}
    (tmp_path / "node.json").write_text(json.dumps(node))
    return [
        sys.executable,
        "-m",
        "regmirror",
        "agent",
        "--plan",
        str(tmp_path / "plan.json"),
        "--host-root",
        "/",
        "--node-labels-file",
        str(tmp_path / "node.json"),
        "--health-port",
        "0",
        "--containerd-config-path",
        str(tmp_path / "certs.d"),
        "--containerd-config",
        str(tmp_path / "none.toml"),
        "--crio-dropin-dir",
        str(dropins),
        *extra,
    ]


def agent_once(tmp_path: Path, dropins: Path, plan: dict[str, object]) -> list[dict[str, object]]:
    argv = agent_argv(tmp_path, dropins, plan, "--once")
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False, env={**os.environ, "PYTHONPATH": OPERATOR_SRC})
    assert proc.returncode in (0, 1), proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def test_crio_pulls_through_the_drop_in_honours_strictness_search_order_and_blocking(crio_bin: Path, crictl: str, tmp_path: Path) -> None:
    dropins = tmp_path / "registries.conf.d"
    dropins.mkdir()
    with (
        Registry.start(tmp_path / "mirror", "127.0.0.3") as mirror,
        ConnectionRecorder.start("127.0.0.2") as upstream,
        ConnectionRecorder.start("127.0.0.4") as strict_upstream,
        ConnectionRecorder.start("127.0.0.5") as blocked_upstream,
        crio(crio_bin, dropins, crictl) as daemon,
    ):
        mirror.push_image("team/app", "v1")
        dead = f"http://127.0.0.6:{free_port('127.0.0.6')}"
        plan = {
            "mirrors": [
                entry("team", mirror.url, upstream.address, f"http://{upstream.address}"),
                entry("vault", dead, strict_upstream.address, f"http://{strict_upstream.address}", "NeverContactUpstream"),
            ],
            "settings": {"unqualifiedSearchRegistries": [upstream.address], "blockedRegistries": [blocked_upstream.address]},
        }
        events = agent_once(tmp_path, dropins, plan)
        assert any(e["event"] == "files.applied" for e in events), events
        daemon.reload()

        pulled = daemon.crictl("pull", f"{upstream.address}/team/app:v1")
        assert pulled.returncode == 0, pulled.stderr + daemon.log()[-2000:]
        assert "/v2/team/app/manifests/v1" in mirror.requests_log()
        assert upstream.connections == [], "the routed host never reached its upstream"

        strict = daemon.crictl("pull", f"{strict_upstream.address}/team/app:v1", timeout=30)
        assert strict.returncode != 0
        assert strict_upstream.connections == [], "NeverContactUpstream: the upstream sees nothing with the mirror down"

        daemon.crictl("rmi", f"{upstream.address}/team/app:v1")
        short = daemon.crictl("pull", "team/app:v1")
        assert short.returncode == 0, short.stderr + daemon.log()[-2000:]
        assert mirror.requests_log().count("/v2/team/app/manifests/v1") >= 2, (
            "the short name resolved to the search registry, via its mirror"
        )
        assert upstream.connections == []

        blocked = daemon.crictl("pull", f"{blocked_upstream.address}/team/app:v1", timeout=30)
        assert blocked.returncode != 0 and "blocked" in (blocked.stderr + daemon.log()[-3000:]).lower()
        assert blocked_upstream.connections == []


@contextlib.contextmanager
def agent_loop(tmp_path: Path, dropins: Path, plan: dict[str, object], *extra: str) -> Iterator[Path]:
    """The agent as its DaemonSet runs it (a loop), for CRI-O; yields its log file."""
    argv = agent_argv(tmp_path, dropins, plan, *extra)
    log = tmp_path / "agent.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": OPERATOR_SRC})
        try:
            yield log
        finally:
            stop_process(proc, 10)


def agent_events(log: Path, event: str) -> list[dict[str, object]]:
    lines = log.read_text(errors="replace").splitlines()
    return [e for e in (json.loads(line) for line in lines if line.startswith("{")) if e.get("event") == event]


def test_crio_pulls_waiting_on_a_hanging_mirror_fall_back_with_the_connection_guard(crio_bin: Path, crictl: str, tmp_path: Path) -> None:
    """CRI-O reads its drop-ins only on reload, so a hanging mirror stays in its configuration: the guard lets each pull go.

    The mirror accepts connections and never answers. Without the guard each pull would wait on
    it; with it, the first pull's request is seen waiting, the mirror is probed and withdrawn,
    and every connection to it that receives nothing is aborted, so CRI-O goes on to the upstream
    (the next pull too, although the drop-in that CRI-O still holds lists the mirror first).
    """
    from harness.dataplane.deadmirror import dead_mirror

    dropins = tmp_path / "registries.conf.d"
    dropins.mkdir()
    with (
        Registry.start(tmp_path / "mirror", "127.0.0.3") as mirror,
        Registry.start(tmp_path / "upstream", "127.0.0.2") as upstream,
        crio(crio_bin, dropins, crictl) as daemon,
    ):
        for tag in ("v1", "v2", "v3"):
            mirror.push_image("team/app", tag, f"{tag}\n")
            upstream.push_image("team/app", tag, f"{tag}\n")
        plan = {"mirrors": [entry("team", mirror.url, upstream.address, upstream.url)]}
        with agent_loop(tmp_path, dropins, plan, "--interval", "2", "--guard-connections") as log:
            wait_for(lambda: bool(agent_events(log, "files.applied")), 30, "the agent's drop-in")
            daemon.reload()
            started = time.monotonic()
            pulled = daemon.crictl("pull", f"{upstream.address}/team/app:v1")
            healthy = time.monotonic() - started
            assert pulled.returncode == 0, pulled.stderr + daemon.log()[-2000:]
            assert "/v2/team/app/manifests/v1" in mirror.requests_log(), "through the mirror while it answers"
            timings = []
            with dead_mirror("hanging", mirror):
                for tag in ("v2", "v3"):
                    started = time.monotonic()
                    pulled = daemon.crictl("pull", f"{upstream.address}/team/app:{tag}", timeout=60)
                    timings.append(time.monotonic() - started)
                    assert pulled.returncode == 0, pulled.stderr + daemon.log()[-2000:]
            aborted = sum(int(e["count"]) for e in agent_events(log, "connections.aborted"))  # type: ignore[call-overload]
            withdrawn = agent_events(log, "mirror.withdrawn")
    print(
        f"CRI-O, mirror hanging, with the guard: pulls {[round(t, 2) for t in timings]}s "
        f"(through the healthy mirror {healthy:.2f}s), {aborted} connections aborted"
    )
    assert withdrawn, "the guard's probe withdrew the mirror"
    assert aborted >= 2, "each pull's waiting request to the mirror was let go"
    assert "/v2/team/app/manifests/v3" in upstream.requests_log(), "the upstream served the pulls"
    assert max(timings) < 10, "seconds, not a hanging pull"
