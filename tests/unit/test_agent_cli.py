"""`regmirror agent` as a process: --once exit codes, /healthz and /readyz, SIGTERM, memory."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from regmirror import constants as c
from regmirror.agent import main
from regmirror.models import Capability, FallbackPolicy, Runtime
from regmirror.nodeplan import MirrorEntry, build_node_plan

OPERATOR_SRC = str(Path(__file__).resolve().parents[2] / "operator")
RSS_BUDGET_MIB = 30


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def setup_node(tmp_path: Path, config_toml: str, *, strict: bool = True) -> list[str]:
    """A plan (one strict mirror, so no probe can withdraw it), labels and a containerd config; returns the args."""
    entry = MirrorEntry(
        name="hub",
        hosts=["docker.io"],
        servers={"docker.io": c.DOCKER_HUB_SERVER},
        url=f"http://127.0.0.1:{free_port()}",
        priority=100,
        capabilities=[Capability.PULL, Capability.RESOLVE],
        fallback=FallbackPolicy.NEVER_CONTACT_UPSTREAM if strict else FallbackPolicy.ALLOW_UPSTREAM,
        runtimes=[Runtime.CONTAINERD],
    )
    (tmp_path / "mirrors.json").write_text(build_node_plan([entry]).to_json())
    (tmp_path / "labels.json").write_text(json.dumps({"kubernetes.io/hostname": "n1"}))
    cfg = tmp_path / "host" / "etc" / "containerd" / "config.toml"
    cfg.parent.mkdir(parents=True)
    cfg.write_text(config_toml)
    return [
        "--plan",
        str(tmp_path / "mirrors.json"),
        "--host-root",
        str(tmp_path / "host"),
        "--node-labels-file",
        str(tmp_path / "labels.json"),
        "--probe-timeout",
        "0.2",
    ]


GOOD = 'version = 2\n[plugins."io.containerd.grpc.v1.cri".registry]\n  config_path = "/etc/containerd/certs.d"\n'
UNSET = "version = 2\n"


def hosts_toml(tmp_path: Path) -> Path:
    return tmp_path / "host" / "etc" / "containerd" / "certs.d" / "docker.io" / "hosts.toml"


def test_once_applies_and_exits_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*setup_node(tmp_path, GOOD), "--once"]) == 0
    assert hosts_toml(tmp_path).read_text().startswith(c.OWNERSHIP_MARKER)
    events = [json.loads(line)["event"] for line in capsys.readouterr().out.splitlines()]
    assert "files.applied" in events


def test_once_exits_1_when_containerd_would_not_read_the_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*setup_node(tmp_path, UNSET), "--once"]) == 1
    failed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if '"preflight.failed"' in line]
    assert failed and failed[0]["reason"] == "ConfigPathUnset"
    assert "config_path" in failed[0]["message"]


def test_once_exits_1_on_a_foreign_file(tmp_path: Path) -> None:
    args = setup_node(tmp_path, GOOD)
    hosts_toml(tmp_path).parent.mkdir(parents=True)
    hosts_toml(tmp_path).write_text('server = "https://mine.example"\n')
    assert main([*args, "--once"]) == 1
    assert hosts_toml(tmp_path).read_text() == 'server = "https://mine.example"\n'


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def start_agent(args: list[str], port: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "regmirror.agent", *args, "--health-port", str(port), "--health-address", "127.0.0.1", "--interval", "0.2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": OPERATOR_SRC},
    )


def wait_http(url: str, want: int, timeout: float = 15) -> str:
    deadline = time.monotonic() + timeout
    last: tuple[int, str] = (0, "")
    while time.monotonic() < deadline:
        try:
            last = get(url)
        except OSError:
            last = (0, "")
        if last[0] == want:
            return last[1]
        time.sleep(0.1)
    raise AssertionError(f"{url}: wanted {want}, last {last}")


def test_ready_when_applied_and_sigterm_leaves_the_files(tmp_path: Path) -> None:
    port = free_port()
    proc = start_agent(setup_node(tmp_path, GOOD), port)
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", 200)
        assert "ok" in wait_http(f"http://127.0.0.1:{port}/readyz", 200)
        assert hosts_toml(tmp_path).exists()
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert hosts_toml(tmp_path).exists(), "a rolling update must not drop the node's config"
    events = [json.loads(line) for line in out.splitlines()]
    assert events[-1]["event"] == "agent.stopped"
    assert all(set(e) >= {"time", "level", "event"} for e in events)


def test_report_names_each_mirrors_state_over_http(tmp_path: Path) -> None:
    port = free_port()
    args = setup_node(tmp_path, GOOD)
    plan = json.loads((tmp_path / "mirrors.json").read_text())
    plan["mirrors"].append({**plan["mirrors"][0], "name": "evil\n[host]", "hosts": ["../etc"]})
    (tmp_path / "mirrors.json").write_text(json.dumps(plan))
    proc = start_agent(args, port)
    try:
        assert "evil?[host]: Rejected" in wait_http(f"http://127.0.0.1:{port}/readyz", 200)
        report = json.loads(wait_http(f"http://127.0.0.1:{port}/report", 200))
        # hub is strict and its URL answers nothing: kept in the files, reported Unreachable.
        assert {name: m["state"] for name, m in report["mirrors"].items()} == {"hub": "Unreachable", "evil?[host]": "Rejected"}
        assert report["ready"] is True and report["hosts"]["containerd/docker.io"]["mirrors"] == ["hub"]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=10)


def test_not_ready_with_the_reason_when_preflight_fails(tmp_path: Path) -> None:
    port = free_port()
    proc = start_agent(setup_node(tmp_path, UNSET), port)
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", 200)
        # 503 "Starting" comes first, until the first reconcile has run the preflight.
        deadline = time.monotonic() + 10
        body = wait_http(f"http://127.0.0.1:{port}/readyz", 503)
        while body.startswith("Starting") and time.monotonic() < deadline:
            time.sleep(0.1)
            body = wait_http(f"http://127.0.0.1:{port}/readyz", 503)
        assert body.startswith("PreflightFailed:") and "config_path" in body
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=10)


HWM = """
import sys
def _hwm():
    # VmHWM: this process image's peak resident memory (ru_maxrss would include pytest's, inherited across fork).
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            print("hwm_kib:", line.split()[1], file=sys.stderr)
"""


def _max_rss_mib(script: str, args: list[str]) -> tuple[int, float, str]:
    proc = subprocess.run(
        [sys.executable, "-c", HWM + script, *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": OPERATOR_SRC},
        check=False,
    )
    kib = [int(line.split()[1]) for line in proc.stderr.splitlines() if line.startswith("hwm_kib:")]
    assert kib, proc.stderr
    return proc.returncode, kib[0] / 1024, proc.stderr


# The agent's own modules: what the agent costs when nothing else drags pydantic in.
AGENT_ONLY = """
import sys
from regmirror.agent import main
code = main(sys.argv[1:])
heavy = sorted(m for m in ("pydantic", "kopf", "kubernetes", "yaml") if m in sys.modules)
print("heavy:", heavy, file=sys.stderr)
_hwm()
sys.exit(code)
"""

ENTRY_POINT = """
import runpy
sys.argv = ["regmirror", *sys.argv[1:]]
try:
    runpy.run_module("regmirror", run_name="__main__")
finally:
    _hwm()
"""


def test_the_agents_own_modules_stay_light(tmp_path: Path) -> None:
    args = [*setup_node(tmp_path, GOOD), "--once", "--health-port", "0"]
    code, rss, err = _max_rss_mib(AGENT_ONLY, args)
    assert code == 0, err
    assert "heavy: []" in err, err
    assert rss < RSS_BUDGET_MIB - 4, f"{rss:.1f} MiB"


def test_regmirror_agent_once_stays_under_budget(tmp_path: Path) -> None:
    args = [*setup_node(tmp_path, GOOD), "--once", "--health-port", "0"]
    code, rss, err = _max_rss_mib(ENTRY_POINT, ["agent", *args])
    assert code == 0, err
    assert rss < RSS_BUDGET_MIB, f"`regmirror agent --once` peaked at {rss:.1f} MiB"


def test_a_foreign_file_under_the_other_spelling_of_a_host_is_respected(tmp_path: Path) -> None:
    """containerd reads `host_port_` before `host:port`: ours would silently override an admin's `host:port` file."""
    args = setup_node(tmp_path, GOOD)
    plan = json.loads((tmp_path / "mirrors.json").read_text())
    plan["mirrors"][0]["hosts"] = ["registry.corp:5443"]
    plan["mirrors"][0]["servers"] = {"registry.corp:5443": "https://registry.corp:5443"}
    (tmp_path / "mirrors.json").write_text(json.dumps(plan))
    certs = tmp_path / "host" / "etc" / "containerd" / "certs.d"
    (certs / "registry.corp:5443").mkdir(parents=True)
    (certs / "registry.corp:5443" / "hosts.toml").write_text('server = "https://registry.corp:5443"\n')
    assert main([*args, "--once"]) == 1
    assert not (certs / "registry.corp_5443_").exists()
    assert (certs / "registry.corp:5443" / "hosts.toml").read_text() == 'server = "https://registry.corp:5443"\n'


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--guard-interval", "0"),
        ("--guard-interval", "-1"),
        ("--stall-after", "nan"),
        ("--connect-timeout", "100"),
        ("--suspect-probe-timeout", "0"),
        ("--interval", "0"),
        ("--probe-interval", "inf"),
        ("--probe-timeout", "soon"),
    ],
)
def test_a_pace_or_timeout_out_of_range_is_refused_naming_the_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str, value: str
) -> None:
    args = setup_node(tmp_path, GOOD)
    with pytest.raises(SystemExit) as exc:
        main([*args, "--once", flag, value])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and ("out of range" in err or "not a number" in err), err
    assert not hosts_toml(tmp_path).exists(), "refused before anything is written"
