"""The agent's control loop: plan + node + health -> files, preflight, readiness.

One step reads the plan (only re-parsed when its text changes), refreshes the
node's labels now and then, probes the mirrors, renders this node's files,
applies them and runs the preflight. Readiness (/readyz) is true only when
the current plan is fully applied and the runtime will read it, so the
DaemonSet's rollout status is the node configuration's rollout status.

What the loop never does: remove files because something is missing. A plan
that cannot be read, or a node whose labels cannot be fetched, leaves the
files as they are (a rolling update or an API hiccup must not drop config).
Files go away only when a readable plan no longer lists them.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from regmirror import constants as c
from regmirror.agent import files as agentfiles
from regmirror.agent.nodeapi import ApiError, InClusterClient, NodeInfo
from regmirror.agent.plan import Plan, PlanError, parse_plan
from regmirror.agent.preflight import CONTAINERD_CONFIG, PreflightReport, run_preflight
from regmirror.agent.probe import HealthTracker, Target
from regmirror.render import nodefiles

NODE_REFRESH_SECONDS = 30.0


def log(event: str, level: str = "info", **fields: Any) -> None:
    """One JSON object per line on stdout."""
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "level": level, "event": event, **fields}
    sys.stdout.write(json.dumps(record, default=str, sort_keys=False) + "\n")
    sys.stdout.flush()


@dataclass
class AgentConfig:
    plan_path: Path
    host_root: Path = Path("/")
    containerd_config_path: str = c.CONTAINERD_CONFIG_PATH
    crio_dropin_dir: str = c.CRIO_DROPIN_DIR
    containerd_config_file: str = CONTAINERD_CONFIG
    node_name: str = ""
    node_labels_file: Path | None = None
    health_port: int = 8081
    health_address: str = "0.0.0.0"
    once: bool = False
    interval: float = 2.0
    probe_timeout: float = 1.0


@dataclass
class Readiness:
    """What /readyz reports; written by the loop, read by the HTTP thread."""

    ready: bool = False
    reason: str = "Starting"
    message: str = "the agent has not applied a plan yet"
    lock: threading.Lock = field(default_factory=threading.Lock)

    def set(self, ready: bool, reason: str, message: str) -> None:
        with self.lock:
            self.ready, self.reason, self.message = ready, reason, message

    def get(self) -> tuple[bool, str, str]:
        with self.lock:
            return self.ready, self.reason, self.message


@dataclass
class StepResult:
    ready: bool
    reason: str
    message: str
    apply: agentfiles.ApplyResult | None = None
    preflight: PreflightReport | None = None


class Agent:
    """The node agent; `step()` is one reconcile, `run()` loops until stopped."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        api: InClusterClient | None = None,
        tracker: HealthTracker | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.api = api
        self.tracker = tracker or HealthTracker(timeout=config.probe_timeout, interval=config.interval)
        self.readiness = Readiness()
        self._clock = clock
        self._plan_text: str | None = None
        self._plan: Plan | None = None
        self._node: NodeInfo | None = None
        self._node_fetched_at = float("-inf")
        self._reported: set[tuple[str, str]] = set()

    # ------------------------------------------------------------ inputs

    def _load_plan(self) -> Plan | None:
        try:
            text = self.config.plan_path.read_text()
        except OSError as exc:
            if self._plan is None:
                log("plan.unreadable", "warning", path=str(self.config.plan_path), error=str(exc))
            return self._plan
        if text != self._plan_text:
            try:
                plan = parse_plan(text)
            except PlanError as exc:
                log("plan.invalid", "error", path=str(self.config.plan_path), error=str(exc))
                return self._plan
            self._plan_text, self._plan = text, plan
            log("plan.loaded", mirrors=[m.name for m in plan.mirrors])
        return self._plan

    def _load_node(self) -> NodeInfo | None:
        now = self._clock()
        if self._node is not None and now - self._node_fetched_at < NODE_REFRESH_SECONDS:
            return self._node
        try:
            if self.config.node_labels_file is not None:
                raw = json.loads(self.config.node_labels_file.read_text())
                node = (
                    NodeInfo.from_object(raw)
                    if isinstance(raw, dict) and "metadata" in raw
                    else NodeInfo(self.config.node_name, "", {str(k): str(v) for k, v in raw.items()}, None)
                )
            elif self.api is not None:
                node = self.api.get_node(self.config.node_name)
            else:
                node = NodeInfo(self.config.node_name, "", {}, None)
        except (OSError, ValueError, AttributeError, ApiError) as exc:
            log("node.unreadable", "warning", node=self.config.node_name, error=str(exc))
            return self._node
        if self._node is None or node.labels != self._node.labels:
            log("node.loaded", node=node.name, labels=len(node.labels), runtime=node.runtime_version)
        self._node, self._node_fetched_at = node, now
        return node

    # ------------------------------------------------------------ outputs

    def _event(self, reason: str, message: str, *, warning: bool, once_key: str | None = None) -> None:
        """Post an Event on the Node (best effort), at most once per key until the key is cleared."""
        key = (reason, once_key if once_key is not None else message)
        if key in self._reported:
            return
        self._reported.add(key)
        if self.api is None or self._node is None:
            return
        try:
            self.api.post_event(self._node, reason, message, warning=warning)
        except (ApiError, OSError) as exc:
            log("event.failed", "warning", reason=reason, error=str(exc))

    def _forget(self, reason: str) -> None:
        self._reported = {k for k in self._reported if k[0] != reason}

    def _shadowing_conflicts(self, desired: dict[str, str]) -> list[agentfiles.Conflict]:
        """A foreign hosts.toml under another name containerd tries for the same host."""
        conflicts = []
        root = self.config.containerd_config_path.rstrip("/")
        for path in list(desired):
            parent, _, name = path.rpartition("/")
            if name != nodefiles.HOSTS_TOML or parent.rpartition("/")[0] != root:
                continue
            ours = parent.rpartition("/")[2]
            for alias in self._aliases(ours):
                other = agentfiles.on_host(self.config.host_root, f"{root}/{alias}/{nodefiles.HOSTS_TOML}")
                if other.exists() and not agentfiles.is_owned(other):
                    conflicts.append(
                        agentfiles.Conflict(path, f"a foreign {root}/{alias}/hosts.toml configures the same host; left untouched")
                    )
                    for p in [p for p in desired if p.startswith(parent + "/")]:
                        del desired[p]
                    break
        return conflicts

    @staticmethod
    def _aliases(host_dir: str) -> list[str]:
        # host_port_ <-> host:port, the two spellings containerd accepts.
        if host_dir.endswith("_") and "_" in host_dir[:-1]:
            head, _, port = host_dir[:-1].rpartition("_")
            if port.isdigit():
                return [f"{head}:{port}"]
        return []

    # ------------------------------------------------------------ one step

    def step(self) -> StepResult:
        """Reconcile once; updates readiness and returns what happened."""
        plan = self._load_plan()
        if plan is None:
            return self._finish(StepResult(False, "PlanUnavailable", f"cannot read a valid plan at {self.config.plan_path}"))
        node = self._load_node()
        if node is None:
            return self._finish(StepResult(False, "NodeUnknown", f"cannot read node {self.config.node_name!r}"))

        selected = nodefiles.selected_mirrors(plan, node.labels)
        strict = {m.name for m in selected if nodefiles.is_strict(m)}
        for t in self.tracker.update({m.name: Target(m.url, m.ca_pem) for m in selected}):
            if t.healthy:
                log("mirror.restored", mirror=t.name, url=t.url)
                self._forget("MirrorWithdrawn")
                self._forget("MirrorUnreachable")
                self._event(
                    "MirrorRestored",
                    f"mirror {t.name} ({t.url}) answers again; it is back in this node's registry configuration",
                    warning=False,
                )
            elif t.name in strict:
                log("mirror.unreachable", "warning", mirror=t.name, url=t.url, error=t.error, fallback="NeverContactUpstream")
                self._forget("MirrorRestored")
                self._event(
                    "MirrorUnreachable",
                    f"mirror {t.name} ({t.url}) does not answer ({t.error}); NeverContactUpstream keeps it, so pulls of its hosts fail",
                    warning=True,
                    once_key=t.name,
                )
            else:
                log("mirror.withdrawn", "warning", mirror=t.name, url=t.url, error=t.error)
                self._forget("MirrorRestored")
                self._event(
                    "MirrorWithdrawn",
                    f"mirror {t.name} ({t.url}) does not answer ({t.error}); pulls go to the upstream until it does",
                    warning=True,
                    once_key=t.name,
                )

        desired = nodefiles.render_node_files(
            plan,
            node.labels,
            unhealthy=self.tracker.unhealthy(),
            containerd_config_path=self.config.containerd_config_path,
            crio_dropin_dir=self.config.crio_dropin_dir,
        )
        shadowed = self._shadowing_conflicts(desired)
        result = agentfiles.apply_files(
            desired,
            host_root=self.config.host_root,
            managed_dirs=[self.config.containerd_config_path, self.config.crio_dropin_dir],
        )
        result.conflicts[:0] = shadowed
        if result.changed:
            log("files.applied", written=result.written, removed=result.removed)
        for conflict in result.conflicts:
            log("files.conflict", "warning", path=conflict.path, reason=conflict.reason)
            self._event("ForeignFileSkipped", f"{conflict.path}: {conflict.reason}", warning=True)
        for error in result.errors:
            log("files.error", "error", error=error)

        runtimes = set()
        if any(p.endswith("/" + nodefiles.HOSTS_TOML) for p in desired) or shadowed:
            runtimes.add(nodefiles.RUNTIME_CONTAINERD)
        if any(p.endswith("/" + c.CRIO_DROPIN_FILE) for p in desired):
            runtimes.add(nodefiles.RUNTIME_CRIO)
        report = run_preflight(
            self.config.host_root,
            containerd_config_path=self.config.containerd_config_path,
            containerd_config_file=self.config.containerd_config_file,
            runtimes=sorted(runtimes),
            runtime_version=node.runtime_version,
        )
        if not report.ok:
            log("preflight.failed", "error", reason=report.reason, message=report.message)
            self._event("PreflightFailed", report.message, warning=True)
        elif any(k[0] == "PreflightFailed" for k in self._reported):
            log("preflight.ok", message=report.message)
            self._forget("PreflightFailed")

        if result.errors:
            outcome = StepResult(False, "ApplyFailed", "; ".join(result.errors), result, report)
        elif not report.ok:
            outcome = StepResult(False, "PreflightFailed", report.message, result, report)
        elif result.conflicts:
            msg = "; ".join(f"{x.path}: {x.reason}" for x in result.conflicts)
            outcome = StepResult(False, "ForeignFileSkipped", msg, result, report)
        else:
            outcome = StepResult(True, "Applied", f"{len(desired)} file(s) for {len(selected)} mirror(s)", result, report)
        return self._finish(outcome)

    def _finish(self, outcome: StepResult) -> StepResult:
        previous = self.readiness.get()
        self.readiness.set(outcome.ready, outcome.reason, outcome.message)
        if previous[:2] != (outcome.ready, outcome.reason):
            log("readiness", "info" if outcome.ready else "warning", ready=outcome.ready, reason=outcome.reason, message=outcome.message)
        return outcome

    # ------------------------------------------------------------ running

    def run(self, stop: threading.Event) -> int:
        """Loop until `stop` is set (SIGTERM). Files are left in place on exit."""
        while not stop.is_set():
            started = self._clock()
            try:
                self.step()
            except Exception as exc:  # the loop must survive anything one step throws
                log("step.crashed", "error", error=f"{type(exc).__name__}: {exc}")
                self.readiness.set(False, "StepFailed", str(exc))
            stop.wait(max(0.1, self.config.interval - (self._clock() - started)))
        log("agent.stopped", note="files left in place")
        return 0


def serve_health(readiness: Readiness, address: str, port: int) -> ThreadingHTTPServer:
    """/healthz (alive) and /readyz (plan applied and preflight ok) on a daemon thread."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/healthz":
                code, body = 200, "ok\n"
            elif self.path == "/readyz":
                ready, reason, message = readiness.get()
                code, body = (200, f"ok: {message}\n") if ready else (503, f"{reason}: {message}\n")
            else:
                code, body = 404, "not found\n"
            data = body.encode()
            self.send_response(code)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:  # probes every few seconds: keep the log quiet
            return

    server = ThreadingHTTPServer((address, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="health", daemon=True).start()
    return server


def default_node_name() -> str:
    return os.environ.get("NODE_NAME", "")
