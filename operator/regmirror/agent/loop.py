"""The agent's control loop: plan + node + health -> files, preflight, readiness.

One step reads the plan (only re-parsed and re-checked when its text
changes), refreshes the node's labels now and then, probes the mirrors, looks
for other people's files where ours would go, renders this node's files
(each parsed back and compared with its route), applies them and runs the
preflight. Readiness (/readyz) is true only when the current plan is applied
as far as its mirrors' data allows and the runtime will read it, so the
DaemonSet's rollout status is the node configuration's rollout status; what
one mirror's data prevents is reported for that mirror (Node Events, /report),
never by taking the node or the other mirrors down (see agent/report.py).

What the loop never does: remove files because something is missing. A plan
that cannot be read, or a node whose labels cannot be fetched, leaves the
files as they are (a rolling update or an API hiccup must not drop config).
Files go away only when a readable plan no longer lists them.

Timing: a full step runs every `interval`; between steps the loop wakes for
each probe that is due (probe.py: jittered interval, a quick second probe to
confirm a failure) and for every change of a mirror's ready endpoints
(endpoints.py), and a mirror that changes state rewrites the node's files at
once. So a dead mirror leaves the files about a second after it stops
answering, and at once when its pods leave the Service. With the connection
guard (agent/guard.py, on in the DaemonSet) the loop also wakes for each of
the guard's looks at the node's connections: a request stalled on a mirror
gets that mirror probed at once, and the connections of a withdrawn mirror
are aborted, so pulls already under way fall back too.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from regmirror import constants as c
from regmirror import nodetaint
from regmirror.agent import docker, foreign, nodeauth, report
from regmirror.agent import files as agentfiles
from regmirror.agent.endpoints import EndpointWatcher
from regmirror.agent.guard import DEFAULT_CONNECT_TIMEOUT, DEFAULT_STALL_AFTER, ConnectionGuard, Guarded, ScanResult, mirror_destination
from regmirror.agent.nodeapi import ApiError, InClusterClient, NodeInfo
from regmirror.agent.plan import PlanError, parse_plan
from regmirror.agent.preflight import CONTAINERD_CONFIG, PreflightReport, dial_timeout_supported, run_preflight
from regmirror.agent.probe import DEFAULT_INTERVAL, DEFAULT_TIMEOUT, HealthTracker, Target, Transition
from regmirror.agent.sockdiag import Destination
from regmirror.lowlevel import registry_host_spellings
from regmirror.render import nodefiles, nodeinput
from regmirror.render.nodeauth import CRIO_AUTH_FILE

NODE_REFRESH_SECONDS = 30.0
# containerd's dial timeout for the mirrors (where it reads one): a ClusterIP
# on the node's own network answers a SYN in well under a millisecond, and a
# pull makes a handful of sequential requests, each paying this once while a
# dead mirror is still in the file.
DEFAULT_DIAL_TIMEOUT = "100ms"
# How long the guard keeps watching a mirror pod's address after its EndpointSlices last listed it as ready.
ENDPOINT_MEMORY = 600.0
# Findings that need no action (posted as Normal Events).
INFORMATIONAL = frozenset({"ForeignCertsCarried", "RuntimeIgnored"})


def log(event: str, level: str = "info", **fields: Any) -> None:
    """One JSON object per line on stdout."""
    now = time.time()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"
    record = {"time": stamp, "level": level, "event": event, **fields}
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
    health_port: int = c.AGENT_HEALTH_PORT
    health_address: str = "0.0.0.0"
    once: bool = False
    interval: float = 2.0
    probe_timeout: float = DEFAULT_TIMEOUT
    probe_interval: float = DEFAULT_INTERVAL
    # None: never write dial_timeout.
    dial_timeout: str | None = DEFAULT_DIAL_TIMEOUT
    # Watch the mirrors' EndpointSlices (needs the API and RBAC to list/watch them).
    watch_endpoints: bool = True
    # The connection guard (agent/guard.py): abort the node's connections to dead mirrors. Needs the host's
    # network namespace and CAP_NET_ADMIN (the DaemonSet gives both); off, withdrawing alone helps later pulls only.
    guard_connections: bool = False
    guard_interval: float = 0.25
    stall_after: float = DEFAULT_STALL_AFTER
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    # The probe a stalled request triggers: a registry answers /v2/ in milliseconds, so this can be short.
    stall_probe_timeout: float = 0.3
    docker_daemon_json: str = docker.DAEMON_JSON
    docker_pidfile: str = docker.PIDFILE
    # Signal dockerd to reload daemon.json (False: only report that it must be reloaded).
    docker_reload: bool = True
    # The host's /proc as the agent sees it (the pod shares the host's PID namespace when it configures Docker).
    proc_dir: Path = Path("/proc")
    auth_dir: Path | None = nodeauth.DEFAULT_AUTH_DIR
    # The containers-auth.json CRI-O reads when its global_auth_file is empty (agent/nodeauth.py).
    crio_auth_file: str = CRIO_AUTH_FILE


@dataclass
class Readiness:
    """What /readyz reports; written by the loop, read by the HTTP thread."""

    ready: bool = False
    reason: str = "Starting"
    message: str = "the agent has not applied a plan yet"
    report: dict[str, Any] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def set(self, ready: bool, reason: str, message: str) -> None:
        with self.lock:
            self.ready, self.reason, self.message = ready, reason, message

    def get(self) -> tuple[bool, str, str]:
        with self.lock:
            return self.ready, self.reason, self.message

    def set_report(self, value: dict[str, Any]) -> None:
        with self.lock:
            self.report = value

    def get_report(self) -> dict[str, Any]:
        with self.lock:
            return self.report


@dataclass(frozen=True)
class LoadedPlan:
    """A plan as read and checked, kept until its text changes."""

    text: str
    digest: str
    names: tuple[str, ...]  # every entry's name as listed (shown safely), rejected ones included
    checked: nodeinput.CheckedPlan


@dataclass
class StepResult:
    ready: bool
    reason: str
    message: str
    apply: agentfiles.ApplyResult | None = None
    preflight: PreflightReport | None = None
    files: nodefiles.NodeFiles | None = None


class Agent:
    """The node agent; `step()` is one reconcile, `run()` loops until stopped."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        api: InClusterClient | None = None,
        tracker: HealthTracker | None = None,
        guard: ConnectionGuard | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.api = api
        self.tracker = tracker or HealthTracker(timeout=config.probe_timeout, interval=config.probe_interval)
        self.guard = (
            guard
            if guard is not None
            else ConnectionGuard(
                clock=clock, interval=config.guard_interval, stall_after=config.stall_after, connect_timeout=config.connect_timeout
            )
            if config.guard_connections and not config.once
            else None
        )
        self.readiness = Readiness()
        self._clock = clock
        self._plan: LoadedPlan | None = None
        self._node: NodeInfo | None = None
        self._node_fetched_at = float("-inf")
        self._reported: set[tuple[str, str]] = set()
        self._findings_posted: set[tuple[str, str]] = set()
        # Set by the endpoint watchers (and SIGTERM): the loop wakes up at once.
        self.wake_event = threading.Event()
        self._watchers: dict[str, EndpointWatcher] = {}
        # The last step's selected mirrors, so a probe-only wake-up needs no plan work.
        self._selected: list[nodeinput.Mirror] = []
        self._taint_note: str | None = None
        # The dial_timeout the node's containerd reads (None: it has none, or none is written).
        self._dial_timeout: str | None = None
        # Per mirror, its pods' addresses and when its EndpointSlices last listed each as ready (for the guard).
        self._endpoints_seen: dict[str, dict[Destination, float]] = {}
        # A suspect probe under way (agent/guard.py): its targets, reasons, names and future.
        self._suspect_probe: tuple[dict[str, Target], dict[str, str], list[str], Future[list[str | None]]] | None = None
        self._suspect_pool: ThreadPoolExecutor | None = None
        # Scheduled probes under way on the probe thread (with the guard): their targets, names and future.
        self._scheduled_probe: tuple[dict[str, Target], list[str], Future[list[str | None]]] | None = None

    # ------------------------------------------------------------ inputs

    def _load_plan(self) -> LoadedPlan | None:
        try:
            text = self.config.plan_path.read_text(errors="replace")
        except OSError as exc:
            if self._plan is None:
                log("plan.unreadable", "warning", path=str(self.config.plan_path), error=str(exc))
            return self._plan
        if self._plan is None or text != self._plan.text:
            try:
                plan = parse_plan(text)
            except PlanError as exc:
                log("plan.invalid", "error", path=str(self.config.plan_path), error=str(exc))
                return self._plan
            checked = nodeinput.check_plan(plan)
            names = tuple(dict.fromkeys(nodeinput.mirror_label(m.name) for m in plan.mirrors))
            self._plan = LoadedPlan(text=text, digest=report.plan_digest(text), names=names, checked=checked)
            log("plan.loaded", mirrors=[m.name for m in checked.mirrors], rejected=len(names) - len(checked.mirrors))
        return self._plan

    def _load_node(self, *, fresh: bool = False) -> NodeInfo | None:
        now = self._clock()
        if self._node is not None and not fresh and now - self._node_fetched_at < NODE_REFRESH_SECONDS:
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

    def _event(self, reason: str, message: str, *, warning: bool, once_key: str | None = None, mirror: str | None = None) -> None:
        """Post an Event on the Node (best effort), at most once per key until the key is cleared."""
        key = (reason, once_key if once_key is not None else message)
        if key in self._reported:
            return
        self._reported.add(key)
        if self.api is None or self._node is None:
            return
        try:
            self.api.post_event(self._node, reason, message, warning=warning, mirror=mirror)
        except (ApiError, OSError, ValueError) as exc:
            log("event.failed", "warning", reason=reason, error=str(exc))

    def _forget(self, reason: str) -> None:
        self._reported = {k for k in self._reported if k[0] != reason}

    def _post_findings(self, findings: list[nodeinput.Finding]) -> None:
        """Log and post each finding once while it lasts; one that goes away may be posted again later."""
        current = {report.finding_key(f): f for f in findings}
        for key, finding in current.items():
            if key in self._findings_posted:
                continue
            level = "info" if finding.reason in INFORMATIONAL else "warning"
            log("finding", level, reason=finding.reason, mirror=finding.mirror, host=finding.host, message=finding.message)
            self._event(finding.reason, finding.message, warning=level != "info", mirror=finding.mirror)
        # A finding that went away may come back; then it is news again.
        self._reported -= self._findings_posted - set(current)
        self._findings_posted = set(current)

    def _scan_foreign(self, checked: nodeinput.CheckedPlan, labels: dict[str, str]) -> dict[str, nodefiles.ForeignCerts]:
        """Other people's files where our routes' directories go (I/O, so here and not in the renderer)."""
        hosts = {h for m in nodeinput.selected_mirrors(checked, labels) if nodeinput.RUNTIME_CONTAINERD in m.runtimes for h in m.hosts}
        hosts |= {h for claim in checked.claims for h in claim.hosts}
        found = {}
        for host in sorted(hosts):
            try:
                found.update(foreign.scan(self.config.host_root, self.config.containerd_config_path, [host]))
            except OSError as exc:  # a directory we cannot read: leave it alone rather than shadow it
                for dir_name in nodefiles.containerd_route_dirs(host):
                    path = f"{self.config.containerd_config_path.rstrip('/')}/{dir_name}"
                    found[path] = nodefiles.ForeignCerts(directory=path, hosts_toml=f"{path} (unreadable: {exc.strerror or exc})")
        return found

    # ------------------------------------------------------------ mirror health

    def wake(self) -> None:
        """Make the loop run now (an endpoint count changed, or the agent is stopping)."""
        self.wake_event.set()

    def _ready_endpoints(self, mirror: nodeinput.Mirror) -> int | None:
        """The mirror's ready endpoints from its EndpointSlices; None when not watched (or not yet in sync)."""
        if mirror.service is None or self.api is None or not self.config.watch_endpoints or self.config.once:
            return None
        namespace, service = mirror.service
        watcher = self._watchers.get(namespace)
        if watcher is None:
            watcher = self._watchers[namespace] = EndpointWatcher(self.api, namespace, self.wake, log).start()
        return watcher.ready(service)

    def _endpoint_urls(self, mirror: nodeinput.Mirror) -> tuple[str, ...]:
        """The mirror's ready endpoints to probe one by one: only where containerd has no dial_timeout, for plain http, with two or more."""
        if self._dial_timeout is not None or mirror.service is None or not mirror.url.startswith("http://"):
            return ()
        watcher = self._watchers.get(mirror.service[0])
        found = watcher.ready_addresses(mirror.service[1]) if watcher is not None else ()
        return tuple(f"http://{address}" for address in found) if len(found) > 1 else ()

    def _probe(self) -> bool:
        """Probe what is due among the last step's mirrors; True when one changed state.

        With the connection guard, scheduled probes run on a thread of their
        own and their outcome is applied at a later tick: a probe waiting on a
        dead mirror must not stop the guard from letting go of the pulls
        waiting on it. A mirror's first probe still decides before any file
        is written.
        """
        targets = {m.name: Target(m.url, m.ca_pem, self._ready_endpoints(m), self._endpoint_urls(m)) for m in self._selected}
        strict = {m.name for m in self._selected if m.strict}
        transitions = self._collect_scheduled()
        if self.guard is None or self.guard.disabled is not None:
            transitions += self.tracker.update(targets)
        else:
            found, due = self.tracker.plan(targets)
            transitions += found
            if due and not self.tracker.known(due):
                transitions += self.tracker.record(targets, due, self.tracker.probe_all(due, targets))
            elif due and self._scheduled_probe is None:
                self.tracker.in_flight(due)
                self._scheduled_probe = (targets, due, self._probe_pool().submit(self.tracker.probe_all, due, targets))
        for t in transitions:
            self._report_transition(t, strict=strict)
        return bool(transitions)

    def _collect_scheduled(self) -> list[Transition]:
        """Apply the scheduled probes that finished on the probe thread."""
        if self._scheduled_probe is None or not self._scheduled_probe[2].done():
            return []
        targets, due, future = self._scheduled_probe
        self._scheduled_probe = None
        try:
            errors = future.result()
        except Exception as exc:  # the probes catch their own errors; this would be a bug
            log("probe.failed", "error", error=f"{type(exc).__name__}: {exc}")
            errors = [f"probe failed: {type(exc).__name__}: {exc}"] * len(due)
        return self.tracker.record(targets, due, errors)

    def _guarded(self) -> list[Guarded]:
        """The selected mirrors the guard watches: those that fall back to the upstream, by their ClusterIP and port and their pods'."""
        unhealthy = self.tracker.unhealthy()
        now = self._clock()
        out = []
        for m in self._selected:
            destination = mirror_destination(m.url)
            if destination is None or m.strict:
                continue
            out.append(Guarded(m.name, destination, withdrawn=m.name in unhealthy, endpoints=self._recent_endpoints(m, now)))
        return out

    def _recent_endpoints(self, mirror: nodeinput.Mirror, now: float) -> frozenset[Destination]:
        """The mirror's pod addresses seen ready in its EndpointSlices within ENDPOINT_MEMORY (a pod that stopped
        answering leaves the ready list first; the node's connections to it must still be let go)."""
        seen = self._endpoints_seen.setdefault(mirror.name, {})
        service = mirror.service
        watcher = self._watchers.get(service[0]) if service is not None else None
        addresses = watcher.ready_addresses(service[1]) if watcher is not None and service is not None else ()
        for address in addresses:
            host, _, port = address.rpartition(":")
            found = Destination.parse(host, int(port)) if port.isdigit() else None
            if found is not None:
                seen[found] = now
        for gone in [d for d, at in seen.items() if now - at > ENDPOINT_MEMORY]:
            del seen[gone]
        return frozenset(seen)

    def _note_aborts(self, result: ScanResult) -> None:
        for name, count in sorted(result.aborted.items()):
            log(
                "connections.aborted", "warning", mirror=name, count=count, total=self.guard.aborted_total.get(name) if self.guard else None
            )

    def _guard_scan(self) -> bool:
        """One scan of the node's connections to the mirrors, if due; True when a suspect was withdrawn (files must change)."""
        guard = self.guard
        if guard is None or guard.disabled is not None:
            return False
        withdrawn = self._collect_suspects()
        if not withdrawn and self._clock() < guard.next_due:
            return False
        # A suspect just withdrawn: its connections go now, before any file is written.
        result = guard.scan(self._guarded())
        self._note_aborts(result)
        if guard.disabled is not None:
            log("guard.disabled", "warning", reason=guard.disabled)
            self._event("ConnectionGuardUnavailable", guard.disabled, warning=True)
        selected = {m.name: m for m in self._selected}
        strict = {m.name for m in self._selected if m.strict}
        confirmed = [
            t for n, why in result.suspects.items() if n in selected and (t := self.tracker.stalled(n, selected[n].url, why)) is not None
        ]
        for t in confirmed:
            self._report_transition(t, strict=strict)
        if confirmed:
            self._note_aborts(guard.scan(self._guarded()))
            withdrawn = True
        names = [n for n in self.tracker.suspects_to_probe(result.suspects) if n in selected]
        if names and self._suspect_probe is None:
            # Probed on a thread of its own: the guard keeps letting go of late connects while it waits.
            targets = {n: Target(selected[n].url, selected[n].ca_pem) for n in names}
            future = self._probe_pool().submit(self.tracker.probe_suspects, targets, names, self.config.stall_probe_timeout)
            self._suspect_probe = (targets, {n: result.suspects[n] for n in names}, names, future)
            future.add_done_callback(lambda _done: self.wake())
        return withdrawn

    def _probe_pool(self) -> ThreadPoolExecutor:
        """Two threads: the scheduled probes and a suspect's probe never wait for each other."""
        if self._suspect_pool is None:
            self._suspect_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="probe")
        return self._suspect_pool

    def _collect_suspects(self) -> bool:
        """Apply a finished suspect probe; True when it withdrew a mirror (whose connections then go at once)."""
        if self._suspect_probe is None or not self._suspect_probe[3].done():
            return False
        targets, reasons, names, future = self._suspect_probe
        self._suspect_probe = None
        try:
            errors = dict(zip(names, future.result(), strict=True))
        except Exception as exc:  # the probes catch their own errors; this is a bug, and one mirror's, not the loop's
            log("guard.probe_failed", "error", error=f"{type(exc).__name__}: {exc}")
            return False
        transitions = self.tracker.confirm_suspects(targets, reasons, errors)
        strict = {m.name for m in self._selected if m.strict}
        for t in transitions:
            self._report_transition(t, strict=strict)
        return bool(transitions)

    def _guard_report(self) -> dict[str, Any] | None:
        guard = self.guard
        if guard is None:
            return None
        return {
            "enabled": guard.disabled is None,
            "disabled": guard.disabled,
            "lastError": guard.last_error,
            "aborted": dict(sorted(guard.aborted_total.items())),
        }

    # ------------------------------------------------------------ one step

    def step(self) -> StepResult:
        """Reconcile once; updates readiness and returns what happened."""
        loaded = self._load_plan()
        if loaded is None:
            return self._finish(StepResult(False, "PlanUnavailable", f"cannot read a valid plan at {self.config.plan_path}"))
        node = self._load_node()
        if node is None:
            return self._finish(StepResult(False, "NodeUnknown", f"cannot read node {self.config.node_name!r}"))
        checked = loaded.checked

        selected = nodeinput.selected_mirrors(checked, node.labels)
        self._selected = selected
        if self.guard is not None:
            self.guard.forget(m.name for m in selected)
            self._endpoints_seen = {m.name: self._endpoints_seen.get(m.name, {}) for m in selected}
        dial_timeout = self.config.dial_timeout if dial_timeout_supported(node.runtime_version) else None
        self._dial_timeout = dial_timeout
        self._probe()
        unhealthy = self.tracker.unhealthy()

        node_files = nodefiles.plan_node_files(
            checked,
            node.labels,
            unhealthy=unhealthy,
            containerd_config_path=self.config.containerd_config_path,
            crio_dropin_dir=self.config.crio_dropin_dir,
            foreign=self._scan_foreign(checked, node.labels),
            dial_timeout=dial_timeout,
            crio_node=bool(node.runtime_version and node.runtime_version.startswith("cri-o://")),
        )
        # The mirrors' credentials (the plan names revisions, the mounted Secret holds the values).
        creds = nodeauth.add_to_files(
            node_files,
            loaded.text,
            self.config.auth_dir,
            host_root=self.config.host_root,
            containerd_config_path=self.config.containerd_config_path,
        )
        result = agentfiles.apply_files(
            node_files.files,
            host_root=self.config.host_root,
            managed_dirs=[self.config.containerd_config_path, self.config.crio_dropin_dir],
            keep=node_files.keep,
            private=creds.private,
        )
        crio_auth = nodeauth.apply_crio_auth(
            node_files, loaded.text, self.config.auth_dir, host_root=self.config.host_root, auth_file=self.config.crio_auth_file
        )
        result.written += [self.config.crio_auth_file] if crio_auth.written else []
        result.removed += [self.config.crio_auth_file] if crio_auth.removed else []
        if crio_auth.error:
            result.errors.append(crio_auth.error)
        # Per-mirror credential findings count against that mirror in the report (not only the node's readiness).
        node_files.findings += nodeauth.held_only_by_restricted(creds.findings + crio_auth.findings, loaded.text)
        if result.changed:
            log("files.applied", written=result.written, removed=result.removed)
        findings = list(node_files.findings)
        for conflict in result.conflicts:
            findings.append(nodeinput.Finding("ForeignFileSkipped", f"{conflict.path}: {conflict.reason}", blocks_node=True))
        docker_result = self._apply_docker(checked, node, unhealthy)
        findings += docker_result.findings
        result.errors += docker_result.errors
        for error in result.errors:
            log("files.error", "error", error=error)
        self._post_findings(findings)

        runtimes = {runtime for (_host, runtime) in node_files.routes}
        preflight = run_preflight(
            self.config.host_root,
            containerd_config_path=self.config.containerd_config_path,
            containerd_config_file=self.config.containerd_config_file,
            runtimes=sorted(runtimes),
            runtime_version=node.runtime_version,
            host_dirs=[
                [d for spelling in registry_host_spellings(host) for d in nodefiles.containerd_host_dir_aliases(spelling)]
                for (host, runtime) in sorted(node_files.routes)
                if runtime == nodeinput.RUNTIME_CONTAINERD
            ],
        )
        if not preflight.ok:
            log("preflight.failed", "error", reason=preflight.reason, message=preflight.message)
            self._event("PreflightFailed", preflight.message, warning=True)
        elif any(k[0] == "PreflightFailed" for k in self._reported):
            log("preflight.ok", message=preflight.message)
            self._forget("PreflightFailed")

        mirrors = report.mirror_states(checked, loaded.names, node.labels, node_files, unhealthy)
        degraded = [f"{name}: {entry['state']}" for name, entry in mirrors.items() if entry["state"] in ("Rejected", "Degraded")]
        outcome = report.verdict(
            errors=result.errors,
            preflight_ok=preflight.ok,
            preflight_message=preflight.message,
            blocking=[f.message for f in findings if f.blocks_node],
            files=len(node_files.files),
            mirrors=len(selected),
            degraded=degraded,
        )
        self._lift_startup_taint(node, outcome.ready and not docker_result.reload_pending, selected, unhealthy)
        self.readiness.set_report(
            {
                "node": node.name,
                "plan": loaded.digest,
                "ready": outcome.ready,
                "reason": outcome.reason,
                "message": outcome.message,
                "mirrors": mirrors,
                "hosts": report.host_states(node_files),
                "findings": [{"reason": f.reason, "message": f.message, "host": f.host} for f in findings if f.mirror is None],
                "dialTimeout": dial_timeout,
                "connectionGuard": self._guard_report(),
                "docker": {"present": docker_result.present, "reloadPending": docker_result.reload_pending}
                if docker_result.present
                else None,
                "startupTaint": self._taint_note,
            }
        )
        return self._finish(StepResult(outcome.ready, outcome.reason, outcome.message, result, preflight, node_files))

    def _apply_docker(self, checked: nodeinput.CheckedPlan, node: NodeInfo, unhealthy: frozenset[str]) -> docker.DockerResult:
        """daemon.json on a Docker Engine node: only when a mirror asks for docker here, or entries of ours are there to remove."""
        desired, findings = nodefiles.docker_daemon_entries(checked, node.labels, unhealthy)
        state = agentfiles.on_host(self.config.host_root, self.config.docker_daemon_json).with_name(docker.STATE_NAME)
        if not any(desired.values()) and not findings and not state.exists():
            return docker.DockerResult()
        outcome = docker.apply_docker(
            self.config.host_root,
            desired,
            daemon_json=self.config.docker_daemon_json,
            pidfile=self.config.docker_pidfile,
            runtime_version=node.runtime_version,
            reload=self.config.docker_reload,
            proc=self.config.proc_dir,
        )
        outcome.findings[:0] = findings
        if outcome.changed:
            log("docker.applied", path=self.config.docker_daemon_json, mirrors=desired["registry-mirrors"], reloaded=outcome.reloaded)
        elif outcome.reloaded:
            log("docker.reloaded", path=self.config.docker_daemon_json)
        return outcome

    def _lift_startup_taint(self, node: NodeInfo, ready: bool, selected: list[nodeinput.Mirror], unhealthy: frozenset[str]) -> None:
        """Remove the startup taint from this node once its configuration is live (nodetaint.py)."""
        if not nodetaint.has_startup_taint(node.taints):
            return
        lift, why = nodetaint.agent_may_lift(ready=ready, selected=[m.name for m in selected], unhealthy=unhealthy)
        if not lift:
            if why != self._taint_note:
                log("taint.held", key=nodetaint.TAINT_KEY, reason=why)
                self._taint_note = why
            return
        if self.api is None:
            return
        try:
            self.api.remove_startup_taint(node)
        except (ApiError, OSError, ValueError) as exc:
            log("taint.failed", "warning", key=nodetaint.TAINT_KEY, error=str(exc))
            self._taint_note = f"removal failed: {exc}"
            self._load_node(fresh=True)  # the taints changed under us, or RBAC: read again before the next try
            return
        self._node = NodeInfo(node.name, node.uid, node.labels, node.runtime_version, tuple(nodetaint.without_startup_taint(node.taints)))
        self._taint_note = "removed"
        log("taint.removed", key=nodetaint.TAINT_KEY, reason=why)
        self._event(nodetaint.LIFTED_REASON, f"{nodetaint.TAINT_KEY} removed: {why}", warning=False)

    def _report_transition(self, t: Transition, *, strict: set[str]) -> None:
        if t.healthy:
            log("mirror.restored", mirror=t.name, url=t.url)
            self._forget("MirrorWithdrawn")
            self._forget("MirrorUnreachable")
            self._event(
                "MirrorRestored",
                f"mirror {t.name} ({t.url}) answers again; it is back in this node's registry configuration",
                warning=False,
                mirror=t.name,
            )
        elif t.name in strict:
            log("mirror.unreachable", "warning", mirror=t.name, url=t.url, error=t.error, fallback="NeverContactUpstream")
            self._forget("MirrorRestored")
            self._event(
                "MirrorUnreachable",
                f"mirror {t.name} ({t.url}) does not answer ({t.error}); NeverContactUpstream keeps it, so pulls of its hosts fail",
                warning=True,
                once_key=t.name,
                mirror=t.name,
            )
        else:
            log("mirror.withdrawn", "warning", mirror=t.name, url=t.url, error=t.error)
            self._forget("MirrorRestored")
            self._event(
                "MirrorWithdrawn",
                f"mirror {t.name} ({t.url}) does not answer ({t.error}); pulls go to the upstream until it does",
                warning=True,
                once_key=t.name,
                mirror=t.name,
            )

    def _finish(self, outcome: StepResult) -> StepResult:
        previous = self.readiness.get()
        self.readiness.set(outcome.ready, outcome.reason, outcome.message)
        if previous[:2] != (outcome.ready, outcome.reason):
            log("readiness", "info" if outcome.ready else "warning", ready=outcome.ready, reason=outcome.reason, message=outcome.message)
        return outcome

    # ------------------------------------------------------------ running

    def tick(self, full: bool) -> None:
        """One wake-up: a full step, or only the probes and the guard's scan that are due (and a full step if a mirror changed state)."""
        # The guard first: a finished suspect probe that withdrew a mirror lets go of its connections
        # before any file work (a full step takes a while; the pulls waiting on the mirror matter more).
        withdrew = self._guard_scan()
        if full or withdrew or self._plan is None or self._probe():
            self.step()
            if self.guard is not None:
                self.guard.next_due = self._clock()  # a mirror may have been withdrawn: its connections go now
            if self._guard_scan():
                self.step()

    def run(self, stop: threading.Event) -> int:
        """Loop until `stop` is set (SIGTERM). Files are left in place on exit."""
        next_full = self._clock()
        while not stop.is_set():
            now = self._clock()
            full = now >= next_full or self.wake_event.is_set()
            self.wake_event.clear()
            try:
                self.tick(full)
            except Exception as exc:  # the loop must survive anything one step throws
                log("step.crashed", "error", error=f"{type(exc).__name__}: {exc}")
                self.readiness.set(False, "StepFailed", str(exc))
            if full:
                next_full = now + self.config.interval
            dues = [next_full, self.tracker.next_due()]
            if self.guard is not None and self.guard.disabled is None and self._selected:
                dues.append(self.guard.next_due)
            wake_at = min(d for d in dues if d is not None)
            self.wake_event.wait(max(0.02, wake_at - self._clock()))
        for watcher in self._watchers.values():
            watcher.stop()
        if self.guard is not None:
            self.guard.close()
        if self._suspect_pool is not None:
            self._suspect_pool.shutdown(wait=False, cancel_futures=True)
        log("agent.stopped", note="files left in place")
        return 0


def serve_health(readiness: Readiness, address: str, port: int) -> ThreadingHTTPServer:
    """/healthz (alive), /readyz (plan applied and preflight ok) and /report (per mirror, JSON) on a daemon thread."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/healthz":
                code, body = 200, "ok\n"
            elif self.path == "/readyz":
                ready, reason, message = readiness.get()
                code, body = (200, f"ok: {message}\n") if ready else (503, f"{reason}: {message}\n")
            elif self.path == "/report":
                code, body = 200, json.dumps(readiness.get_report(), sort_keys=True) + "\n"
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
