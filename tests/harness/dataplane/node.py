"""A simulated node: a temporary host root, its Node labels, and ``regmirror agent`` on it."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.cluster import REPO_ROOT
from harness.dataplane.containerd import config_path_toml
from harness.processes import stop_process
from harness.waiting import wait_for

CONTAINERD_NODE_CONFIG = "/etc/containerd/config.toml"
CONTAINERD_NODE_CERTS = "/etc/containerd/certs.d"
CRIO_NODE_DROPINS = "/etc/containers/registries.conf.d"
OPERATOR_SRC = str(REPO_ROOT / "operator")


@dataclass
class AgentNode:
    """A node for `regmirror agent`: a temporary host root, its labels, and the plan the agent reads."""

    name: str
    root: Path
    labels: dict[str, str]
    runtime_version: str = "containerd://1.6.0"
    # The mounted regmirror-agent-credentials Secret; by default the node's own (empty) directory, never the host's /etc.
    auth_dir: Path | None = None
    # What that Secret holds (mirror name -> entry), as the operator wrote it; empty: nothing mounted.
    credentials: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.auth_dir is None:
            self.auth_dir = self.root / "etc" / "regmirror" / "node-auth"
        self.auth_dir.mkdir(parents=True, exist_ok=True)
        for key, value in self.credentials.items():
            # As the kubelet projects regmirror-agent-credentials: one file per key, replaced atomically.
            tmp = self.auth_dir / f".{key}.tmp"
            tmp.write_text(value)
            os.replace(tmp, self.auth_dir / key)
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "etc" / "regmirror").mkdir(parents=True, exist_ok=True)
        self.node_file.write_text(
            json.dumps(
                {
                    "metadata": {
                        "name": self.name,
                        "uid": f"uid-{self.name}",
                        "labels": {"kubernetes.io/hostname": self.name, **self.labels},
                    },
                    "status": {"nodeInfo": {"containerRuntimeVersion": self.runtime_version}},
                }
            )
        )

    @property
    def node_file(self) -> Path:
        return self.root / "etc" / "regmirror" / "node.json"

    @property
    def plan_file(self) -> Path:
        return self.root / "etc" / "regmirror" / "mirrors.json"

    @property
    def certs_dir(self) -> Path:
        """containerd's config_path as the real daemon sees it (the node's /etc/containerd/certs.d)."""
        return self.root / CONTAINERD_NODE_CERTS.lstrip("/")

    @property
    def crio_dir(self) -> Path:
        return self.root / CRIO_NODE_DROPINS.lstrip("/")

    def write_containerd_config(self, config_path: str = CONTAINERD_NODE_CERTS) -> None:
        """The node's own config.toml (read by the agent's preflight): config_path set, as documented."""
        path = self.root / CONTAINERD_NODE_CONFIG.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"version = 2\n{config_path_toml(2, config_path)}")

    def agent_argv(self, *, once: bool, interval: float = 2.0, extra: Sequence[str] = ()) -> list[str]:
        argv = [
            sys.executable,
            "-m",
            "regmirror",
            "agent",
            "--plan",
            str(self.plan_file),
            "--host-root",
            str(self.root),
            "--node-labels-file",
            str(self.node_file),
            "--health-port",
            "0",
            "--interval",
            str(interval),
            "--probe-timeout",
            "0.5",
            "--auth-dir",
            str(self.auth_dir),
        ]
        return [*argv, *extra, "--once"] if once else [*argv, *extra]

    def agent_once(self, plan_json: str) -> tuple[int, list[dict[str, Any]]]:
        """`regmirror agent --once` with this plan; returns its exit code and JSON events."""
        self.plan_file.write_text(plan_json)
        proc = subprocess.run(
            self.agent_argv(once=True),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env={**os.environ, "PYTHONPATH": OPERATOR_SRC},
        )
        if proc.returncode not in (0, 1):
            raise RuntimeError(f"agent failed ({proc.returncode}): {proc.stderr[-2000:]}")
        return proc.returncode, [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]

    @contextlib.contextmanager
    def agent_loop(self, plan_json: str, interval: float = 0.5, extra: Sequence[str] = ()) -> Iterator[AgentLoop]:
        """The agent as it runs in its DaemonSet (a loop, `extra` arguments appended), stopped with SIGTERM on exit."""
        self.plan_file.write_text(plan_json)
        out = (self.root / "agent.log").open("wb")
        proc = subprocess.Popen(
            self.agent_argv(once=False, interval=interval, extra=extra),
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": OPERATOR_SRC},
        )
        loop = AgentLoop(proc, self.root / "agent.log")
        try:
            yield loop
        finally:
            stop_process(proc, 10)
            out.close()


@dataclass
class AgentLoop:
    proc: subprocess.Popen[bytes]
    log_path: Path

    def events(self) -> list[dict[str, Any]]:
        text = self.log_path.read_text(errors="replace")
        return [json.loads(line) for line in text.splitlines() if line.startswith("{")]

    def wait_event(self, event: str, timeout: float = 20, **fields: str) -> dict[str, Any]:
        found: list[dict[str, Any]] = []

        def seen() -> bool:
            found[:] = [e for e in self.events() if e.get("event") == event and all(e.get(k) == v for k, v in fields.items())]
            return bool(found)

        wait_for(seen, timeout, f"agent event {event} {fields}")
        return found[0]
