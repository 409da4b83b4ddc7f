"""One idempotent reconcile: desired = render(spec); apply what drifted; status = observe(children).

Kopf's watches feed a `Controller` with every event about mirrors, their
children, the agent and the nodes; the handlers only record the event and mark
the affected mirrors dirty. A single worker drains the dirty set, coalescing
bursts (500 mirrors created at once become a handful of node-plan versions, not
500), reconciles each mirror, and writes only what differs from what the
cluster already reports. An unchanged cluster therefore costs no API write.
"""

from __future__ import annotations

import base64
import hashlib
import heapq
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from regmirror import constants as c
from regmirror import kube, naming
from regmirror.conditions import condition, merge_conditions
from regmirror.models import RegistryMirrorSpec, Runtime
from regmirror.nodeplan import MirrorEntry, NodePlan, build_node_plan, mirror_entry, mirror_order_key
from regmirror.observe import NodeRollout, Observation, drifted, evaluate, status_changed, typed_status
from regmirror.render.agent import render_agent_daemonset, render_node_config_map
from regmirror.render.mirror import render_mirror_children
from regmirror.upstream import UpstreamCheck, check_upstream

log = logging.getLogger("regmirror.reconcile")

MAX_BACKOFF_SECONDS = 60.0
# A failed or inconclusive upstream credentials check is repeated this often;
# a good one only when the credentials change.
UPSTREAM_RECHECK_SECONDS = 60.0
PLAN_HISTORY = 8


@dataclass
class Settings:
    """Operator settings (from the environment, so the manifest sets them)."""

    namespace: str = field(default_factory=lambda: os.environ.get("REGMIRROR_NAMESPACE", c.DEFAULT_NAMESPACE))
    agent_namespace: str = field(default_factory=lambda: os.environ.get("REGMIRROR_AGENT_NAMESPACE", c.AGENT_NAMESPACE))
    agent_image: str = field(default_factory=lambda: os.environ.get("REGMIRROR_AGENT_IMAGE", c.DEFAULT_OPERATOR_IMAGE))
    containerd_config_path: str = field(
        default_factory=lambda: os.environ.get("REGMIRROR_CONTAINERD_CONFIG_PATH", c.CONTAINERD_CONFIG_PATH)
    )
    workers: int = field(default_factory=lambda: int(os.environ.get("REGMIRROR_WORKERS", "4")))
    # How long the worker waits for more events before acting on a burst.
    coalesce_seconds: float = field(default_factory=lambda: float(os.environ.get("REGMIRROR_COALESCE_SECONDS", "0.2")))
    # Minimum time between two node-plan versions: every version restarts the agents'
    # rolling update, so a burst of new mirrors should become one rollout, not dozens.
    plan_interval_seconds: float = field(default_factory=lambda: float(os.environ.get("REGMIRROR_PLAN_INTERVAL_SECONDS", "1.0")))


class ConfigError(Exception):
    """A problem with the user's configuration: reported as Stalled, retried with backoff."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def _secret_fingerprint(body: dict[str, Any]) -> dict[str, str]:
    """Per-key hashes of a Secret's data: enough to detect rotation, never the values."""
    data = body.get("data") or {}
    return {key: hashlib.sha256(str(value).encode()).hexdigest() for key, value in data.items()}


def _pod_ready(pod: dict[str, Any]) -> bool:
    return any(cond.get("type") == "Ready" and cond.get("status") == "True" for cond in (pod.get("status") or {}).get("conditions") or [])


def _entry_digest(entry: MirrorEntry) -> str:
    return hashlib.sha256(entry.model_dump_json(by_alias=True).encode()).hexdigest()[:16]


class Metrics:
    """Hooks for Prometheus counters (set by handlers; no-ops in tests)."""

    def __init__(self) -> None:
        self.on_reconcile: Callable[[str, float, bool], None] = lambda _outcome, _seconds, _wrote: None
        self.on_ready_count: Callable[[int, int], None] = lambda _ready, _total: None


class Controller:
    """Caches of what the watches report, and the reconcile that acts on them."""

    def __init__(self, settings: Settings | None = None, metrics: Metrics | None = None) -> None:
        self.settings = settings or Settings()
        self.metrics = metrics or Metrics()
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self.mirrors: dict[str, dict[str, Any]] = {}
        self.children: dict[tuple[str, str], dict[str, Any]] = {}
        self.secrets: dict[str, dict[str, str]] = {}
        self.nodes: dict[str, dict[str, str]] = {}
        self.agent_pods: dict[str, dict[str, Any]] = {}  # node name -> newest agent pod
        self.node_applied: dict[str, str | None] = {}  # node name -> plan digest of the last Ready agent pod
        self.agent_objects: dict[str, dict[str, Any]] = {}  # kind -> live DaemonSet / ConfigMap
        self._specs: dict[str, tuple[int | None, RegistryMirrorSpec | ConfigError]] = {}
        self._host_order: dict[str, list[str]] | None = None  # per-pass cache, reset when mirrors change
        self._node_index: _NodeIndex | None = None  # per-pass cache, reset when nodes or agent pods change
        self._last_plan_apply = 0.0
        self._primed = False
        self.status_recheck_at: float | None = None
        self.dirty: set[str] = set()
        self.status_dirty: set[str] = set()
        self.plan_dirty = False
        self.retry_at: dict[str, float] = {}
        self.backoff: dict[str, float] = {}
        self.errors: dict[str, ConfigError] = {}
        self.last_good: dict[str, MirrorEntry] = {}
        self.plan: NodePlan | None = None
        # plan digest -> {mirror: entry digest}: which mirror config each agent pod carries.
        self.plan_history: OrderedDict[str, dict[str, str]] = OrderedDict()
        self.announced: dict[str, str] = {}  # mirror -> last Ready reason an Event was posted for
        # mirror -> (credentials fingerprint, verdict, when): the upstream accepts the credentials?
        self.upstream_checks: dict[str, tuple[str, UpstreamCheck, float]] = {}
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=max(1, self.settings.workers), thread_name_prefix="reconcile")

    # ------------------------------------------------------------ event intake

    def _mark(self, names: set[str] | list[str], *, spec: bool = True) -> None:
        with self._wake:
            (self.dirty if spec else self.status_dirty).update(names)
            self._wake.notify()

    def _mark_plan(self) -> None:
        with self._wake:
            self.plan_dirty = True
            self._wake.notify()

    def on_mirror(self, event_type: str, body: dict[str, Any]) -> None:
        """A RegistryMirror was added, changed or deleted."""
        name = body["metadata"]["name"]
        with self._lock:
            self._host_order = None
            if event_type == "DELETED":
                self.mirrors.pop(name, None)
                self._specs.pop(name, None)
                self.errors.pop(name, None)
                self.last_good.pop(name, None)
                self.announced.pop(name, None)
                self.plan_dirty = True
            else:
                previous = self.mirrors.get(name)
                self.mirrors[name] = body
                if (
                    previous is None
                    or previous.get("spec") != body.get("spec")
                    or bool(previous["metadata"].get("deletionTimestamp")) != bool(body["metadata"].get("deletionTimestamp"))
                ):
                    self.plan_dirty = True
        self._mark({name} if event_type != "DELETED" else set())

    def on_child(self, event_type: str, body: dict[str, Any]) -> None:
        """A Deployment, Service, PVC or ConfigMap of a mirror changed (or was deleted by hand)."""
        meta = body["metadata"]
        key = (body.get("kind", ""), meta["name"])
        mirror = (meta.get("labels") or {}).get(c.LABEL_MIRROR)
        with self._lock:
            if event_type == "DELETED":
                self.children.pop(key, None)
            else:
                self.children[key] = _slim(body)
            if body.get("kind") == "Service":
                self.plan_dirty = True
        if mirror and mirror in self.mirrors:
            self._mark({mirror})

    def on_secret(self, event_type: str, body: dict[str, Any]) -> None:
        """A Secret in the operator's namespace changed: only its fingerprint is kept."""
        name = body["metadata"]["name"]
        with self._lock:
            if event_type == "DELETED":
                self.secrets.pop(name, None)
            else:
                self.secrets[name] = _secret_fingerprint(body)
            users = [m for m, b in self.mirrors.items() if name in self._secret_names(b)]
        if users:
            self._mark(users)

    def on_node(self, event_type: str, body: dict[str, Any]) -> None:
        """A node appeared, changed labels or went away."""
        name = body["metadata"]["name"]
        labels = body["metadata"].get("labels") or {}
        with self._lock:
            self._node_index = None
            if event_type == "DELETED":
                changed = self.nodes.pop(name, None) is not None
                self.node_applied.pop(name, None)
            else:
                changed = self.nodes.get(name) != labels
                self.nodes[name] = labels
            names = list(self.mirrors)
        if changed:
            self._mark(names, spec=False)

    def on_agent_pod(self, event_type: str, body: dict[str, Any]) -> None:
        """An agent pod changed: rollout progress for the mirrors on its node."""
        node = (body.get("spec") or {}).get("nodeName")
        if not node:
            return
        with self._lock:
            self._node_index = None
            current = self.agent_pods.get(node)
            if event_type == "DELETED":
                if current and current["metadata"]["name"] == body["metadata"]["name"]:
                    self.agent_pods.pop(node, None)
            elif _replaces(body, current):
                self.agent_pods[node] = _slim_pod(body)
            if event_type != "DELETED" and _pod_ready(body) and not body["metadata"].get("deletionTimestamp"):
                self.node_applied[node] = _plan_digest(body)
            names = list(self.mirrors)
        self._mark(names, spec=False)

    def on_agent_object(self, event_type: str, body: dict[str, Any]) -> None:
        """The agent DaemonSet or node ConfigMap changed (or was deleted by hand)."""
        with self._lock:
            if event_type == "DELETED":
                self.agent_objects.pop(body.get("kind", ""), None)
            else:
                self.agent_objects[body.get("kind", "")] = _slim(body)
            self.plan_dirty = True
            names = list(self.mirrors)
        self._mark(names, spec=False)

    @staticmethod
    def _secret_names(body: dict[str, Any]) -> set[str]:
        upstream = (body.get("spec") or {}).get("upstream") or {}
        names = set()
        if upstream.get("credentialsSecretRef"):
            names.add(upstream["credentialsSecretRef"].get("name"))
        if (upstream.get("tls") or {}).get("caSecretRef"):
            names.add(upstream["tls"]["caSecretRef"].get("name"))
        tls = ((body.get("spec") or {}).get("service") or {}).get("tls")
        if tls:
            names.add(tls.get("secretName"))
        return {n for n in names if n}

    # ------------------------------------------------------------ the worker

    def prime(self) -> None:
        """Fill the caches with one LIST per kind before the first status is computed.

        Kopf delivers the initial listing as a stream of events with no "done"
        marker; computing a status before the nodes and agent pods are known
        would report 0/N nodes and flap Ready after every operator restart.
        """
        ns, agent_ns = self.settings.namespace, self.settings.agent_namespace
        managed = f"{c.LABEL_MANAGED_BY}={c.MANAGED_BY}"
        for kind in ("Deployment", "Service", "PersistentVolumeClaim", "ConfigMap", "PodDisruptionBudget"):
            for obj in kube.list_objects(kind, ns, label_selector=managed):
                self.on_child("ADDED", {**obj, "kind": kind})
        for obj in kube.list_objects("Secret", ns):
            self.on_secret("ADDED", obj)
        for obj in kube.list_objects("Node"):
            self.on_node("ADDED", obj)
        agent = ",".join(f"{k}={v}" for k, v in naming.agent_selector_labels().items())
        for obj in kube.list_objects("Pod", agent_ns, label_selector=agent):
            self.on_agent_pod("ADDED", obj)
        for kind in ("DaemonSet", "ConfigMap"):
            for obj in kube.list_objects(kind, agent_ns, label_selector=managed):
                if kind == "DaemonSet" or obj["metadata"]["name"] == c.NODE_CONFIG_NAME:
                    self.on_agent_object("ADDED", {**obj, "kind": kind})
        for obj in kube.list_objects(c.KIND):
            self.on_mirror("ADDED", obj)
        # From here on the watches keep the caches current: an absent child is absent.
        self._primed = True

    def run(self) -> None:
        """Prime the caches, then drain dirty work until stopped. Runs in its own thread."""
        while not self._stop.is_set():
            try:
                self.prime()
                break
            except Exception as exc:  # the API may not be reachable yet
                log.warning("priming the caches failed: %s: %s", type(exc).__name__, _safe(exc))
                self._stop.wait(2.0)
        while not self._stop.is_set():
            with self._wake:
                now = time.monotonic()
                due = {n for n, t in self.retry_at.items() if t <= now}
                for n in due:
                    self.retry_at.pop(n, None)
                self.dirty |= due
                if self.status_recheck_at is not None and self.status_recheck_at <= now:
                    self.status_recheck_at = None
                    self._node_index = None
                    self.status_dirty.update(self.mirrors)
                if not (self.dirty or self.status_dirty or self.plan_dirty):
                    next_retry = min([*self.retry_at.values(), self.status_recheck_at or now + 5.0])
                    self._wake.wait(timeout=max(0.05, min(5.0, next_retry - now)))
                    continue
            # Let a burst of events settle so it is handled as one.
            time.sleep(self.settings.coalesce_seconds)
            self.step()

    def stop(self) -> None:
        """Stop the worker loop."""
        self._stop.set()
        with self._wake:
            self._wake.notify_all()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def step(self) -> None:
        """One pass: reconcile dirty mirrors, then the node plan, then statuses."""
        with self._lock:
            dirty, self.dirty = self.dirty, set()
        names = sorted(n for n in dirty if n in self.mirrors)
        list(self._pool.map(self._reconcile_mirror_safely, names))
        with self._lock:
            plan_due = time.monotonic() - self._last_plan_apply >= self.settings.plan_interval_seconds
            plan_dirty = self.plan_dirty and plan_due
            if plan_dirty:
                self.plan_dirty = False
        if plan_dirty:
            try:
                self.reconcile_node_plan()
            except Exception as exc:
                log.exception("node plan reconcile failed: %s", type(exc).__name__)
                self._mark_plan()
                time.sleep(1.0)
        with self._lock:
            status_names = set(self.status_dirty) | set(names)
            self.status_dirty = set()
        list(self._pool.map(self._write_status_safely, sorted(n for n in status_names if n in self.mirrors)))
        self._publish_ready_count()

    def _publish_ready_count(self) -> None:
        with self._lock:
            bodies = list(self.mirrors.values())
        ready = sum(
            1
            for b in bodies
            if any(cd.get("type") == "Ready" and cd.get("status") == "True" for cd in (b.get("status") or {}).get("conditions") or [])
        )
        self.metrics.on_ready_count(ready, len(bodies))

    # ------------------------------------------------------------ one mirror

    def _reconcile_mirror_safely(self, name: str) -> None:
        started = time.monotonic()
        try:
            wrote = self.reconcile_mirror(name)
            self.metrics.on_reconcile("success", time.monotonic() - started, wrote)
            with self._lock:
                self.backoff.pop(name, None)
                if self.errors.pop(name, None) is not None:
                    self.plan_dirty = True
        except ConfigError as err:
            self.metrics.on_reconcile("config_error", time.monotonic() - started, False)
            self._schedule_retry(name, err)
        except Exception as exc:  # API errors, conflicts: retry with backoff, keep serving
            self.metrics.on_reconcile("error", time.monotonic() - started, False)
            log.warning("reconcile of %s failed: %s: %s", name, type(exc).__name__, _safe(exc))
            self._schedule_retry(name, ConfigError("ApplyFailed", f"applying the children failed: {_safe(exc)}"))

    def _schedule_retry(self, name: str, err: ConfigError) -> None:
        with self._lock:
            delay = min(MAX_BACKOFF_SECONDS, self.backoff.get(name, 0.5) * 2)
            self.backoff[name] = delay
            self.retry_at[name] = time.monotonic() + delay
            self.errors[name] = err
            self.status_dirty.add(name)
        log.info("mirror %s: %s (%s); retrying in %.0fs", name, err.reason, err.message, delay)

    def spec_of(self, body: dict[str, Any]) -> RegistryMirrorSpec:
        """The typed spec, or a ConfigError naming the invalid field.

        Memoized per (name, generation): a status pass over 500 mirrors must not
        re-validate 500 specs for each of them (the profile showed exactly that).
        """
        meta = body.get("metadata") or {}
        key = (meta.get("name", ""), meta.get("generation"))
        cached = self._specs.get(key[0])
        if cached is not None and cached[0] == key[1] and key[1] is not None:
            if isinstance(cached[1], ConfigError):
                raise cached[1]
            return cached[1]
        try:
            spec: RegistryMirrorSpec | ConfigError = RegistryMirrorSpec.model_validate(body.get("spec") or {})
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            spec = ConfigError("InvalidSpec", f"spec.{where}: {first['msg']}")
        self._specs[key[0]] = (key[1], spec)
        if isinstance(spec, ConfigError):
            raise spec
        return spec

    def credentials_hash(self, spec: RegistryMirrorSpec) -> str | None:
        """Fingerprint of every Secret the mirror's pods use; ConfigError when one is unusable."""
        parts: list[str] = []
        ref = spec.upstream.credentials_secret_ref
        if ref is not None:
            parts.append(self._secret_keys(ref.name, [ref.username_key, ref.password_key], "Credentials"))
        ca = spec.upstream.tls.ca_secret_ref if spec.upstream.tls else None
        if ca is not None:
            parts.append(self._secret_keys(ca.name, [ca.key], "UpstreamCA"))
        if spec.service.tls is not None:
            parts.append(self._secret_keys(spec.service.tls.secret_name, ["tls.crt", "tls.key"], "ServiceTLS"))
        if not parts:
            return None
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]

    def _secret_keys(self, name: str, keys: list[str], what: str) -> str:
        with self._lock:
            fingerprint = self.secrets.get(name)
        if fingerprint is None:
            live = kube.get("Secret", self.settings.namespace, name)
            if live is None:
                raise ConfigError(f"{what}SecretMissing", f"Secret {self.settings.namespace}/{name} does not exist")
            fingerprint = _secret_fingerprint(live)
            with self._lock:
                self.secrets[name] = fingerprint
        missing = [k for k in keys if k not in fingerprint]
        if missing:
            raise ConfigError(f"{what}SecretMalformed", f"Secret {self.settings.namespace}/{name} lacks the key(s) {', '.join(missing)}")
        return ",".join(f"{name}/{k}={fingerprint[k]}" for k in keys)

    def check_upstream_credentials(self, name: str, spec: RegistryMirrorSpec, creds: str | None) -> None:
        """Do the registry auth handshake with the Secret's credentials (distribution never reports a rejection)."""
        ref = spec.upstream.credentials_secret_ref
        if ref is None or creds is None:
            self.upstream_checks.pop(name, None)
            return
        cached = self.upstream_checks.get(name)
        now = time.monotonic()
        if cached is not None and cached[0] == creds and (cached[1].ok or now - cached[2] < UPSTREAM_RECHECK_SECONDS):
            return
        secret = kube.get("Secret", self.settings.namespace, ref.name) or {}
        data = secret.get("data") or {}
        username = base64.b64decode(data.get(ref.username_key, "")).decode(errors="replace")
        password = base64.b64decode(data.get(ref.password_key, "")).decode(errors="replace")
        ca_pem = None
        ca_ref = spec.upstream.tls.ca_secret_ref if spec.upstream.tls else None
        if ca_ref is not None:
            ca_secret = kube.get("Secret", self.settings.namespace, ca_ref.name) or {}
            ca_pem = base64.b64decode((ca_secret.get("data") or {}).get(ca_ref.key, "")).decode(errors="replace") or None
        verdict = check_upstream(spec.upstream.url, username, password, ca_pem=ca_pem)
        self.upstream_checks[name] = (creds, verdict, now)
        if not verdict.ok:
            with self._lock:
                self.retry_at[name] = now + UPSTREAM_RECHECK_SECONDS

    def reconcile_mirror(self, name: str) -> bool:
        """Bring one mirror's children to the rendered state; True when anything was written."""
        with self._lock:
            body = self.mirrors.get(name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return False
        spec = self.spec_of(body)
        creds = self.credentials_hash(spec)
        self.check_upstream_credentials(name, spec, creds)
        uid = body["metadata"]["uid"]
        desired = render_mirror_children(name, uid, spec, self.settings.namespace, credentials_hash=creds)
        wrote = False
        for obj in desired:
            key = (obj["kind"], obj["metadata"]["name"])
            with self._lock:
                live = self.children.get(key)
            if live is not None and not drifted(obj, live):
                continue
            if live is None and not self._primed:
                # Before the caches are primed the watch may not have delivered it yet: look before writing.
                live = kube.get(obj["kind"], self.settings.namespace, obj["metadata"]["name"])
                if live is not None and not drifted(obj, live):
                    with self._lock:
                        self.children[key] = live
                    continue
            log.info("applying %s %s/%s for mirror %s", obj["kind"], self.settings.namespace, obj["metadata"]["name"], name)
            result = kube.apply(obj)
            wrote = True
            with self._lock:
                self.children[key] = _slim(result)
                if obj["kind"] == "Service":
                    self.plan_dirty = True
        return wrote

    # ------------------------------------------------------------ node plan

    def desired_plan(self) -> NodePlan:
        """Every mirror with node configuration and a ClusterIP, last good entry for broken ones."""
        entries: list[MirrorEntry] = []
        with self._lock:
            items = list(self.mirrors.items())
        for name, body in items:
            if body["metadata"].get("deletionTimestamp"):
                continue
            with self._lock:
                broken = name in self.errors
                fallback = self.last_good.get(name)
            try:
                spec = self.spec_of(body)
            except ConfigError:
                spec = None
            if broken or spec is None:
                if fallback is not None:
                    entries.append(fallback)
                continue
            if not spec.node_config.enabled:
                continue
            with self._lock:
                service = self.children.get(("Service", naming.child_name(name)))
            ip = ((service or {}).get("spec") or {}).get("clusterIP")
            if not ip or ip == "None":
                continue
            entry = mirror_entry(name, spec, ip, ca_pem=self._mirror_ca(spec))
            with self._lock:
                self.last_good[name] = entry
            entries.append(entry)
        return build_node_plan(entries)

    def _mirror_ca(self, spec: RegistryMirrorSpec) -> str | None:
        """The public CA nodes need to trust a TLS mirror: ca.crt, or tls.crt for a self-signed certificate."""
        if spec.service.tls is None:
            return None
        secret = kube.get("Secret", self.settings.namespace, spec.service.tls.secret_name) or {}
        data = secret.get("data") or {}
        encoded = data.get("ca.crt") or data.get("tls.crt")
        return base64.b64decode(encoded).decode(errors="replace") if encoded else None

    def _seed_from_live_plan(self) -> None:
        """After a restart, broken mirrors keep the entry the nodes already have."""
        live_cm = self.agent_objects.get("ConfigMap") or kube.get("ConfigMap", self.settings.agent_namespace, c.NODE_CONFIG_NAME)
        if not live_cm:
            return
        try:
            live_plan = NodePlan.from_json((live_cm.get("data") or {}).get(c.NODE_CONFIG_KEY, "{}"))
        except ValueError:
            return
        try:
            history = json.loads((live_cm.get("data") or {}).get(c.NODE_CONFIG_HISTORY_KEY, "{}"))
        except ValueError:
            history = {}
        with self._lock:
            for entry in live_plan.mirrors:
                self.last_good.setdefault(entry.name, entry)
            for digest, entries in history.items():
                self.plan_history.setdefault(digest, dict(entries))
            self._remember_plan(live_plan)

    def _remember_plan(self, plan: NodePlan) -> None:
        self.plan_history[plan.digest()] = {e.name: _entry_digest(e) for e in plan.mirrors}
        self.plan_history.move_to_end(plan.digest())
        while len(self.plan_history) > PLAN_HISTORY:
            self.plan_history.popitem(last=False)

    def reconcile_node_plan(self) -> None:
        """Apply the aggregated node plan ConfigMap and the agent DaemonSet when they drifted."""
        if self.plan is None:
            self._seed_from_live_plan()
        plan = self.desired_plan()
        uses_crio = any(Runtime.CRIO in e.runtimes for e in plan.mirrors)
        with self._lock:
            self._remember_plan(plan)
            history = dict(self.plan_history)
        objects = [
            render_node_config_map(plan, self.settings.agent_namespace, history),
            render_agent_daemonset(
                plan,
                self.settings.agent_namespace,
                self.settings.agent_image,
                containerd_config_path=self.settings.containerd_config_path,
                crio=uses_crio,
            ),
        ]
        for obj in objects:
            with self._lock:
                live = self.agent_objects.get(obj["kind"])
            if live is None:
                live = kube.get(obj["kind"], self.settings.agent_namespace, obj["metadata"]["name"])
            if live is not None and not drifted(obj, live):
                with self._lock:
                    self.agent_objects[obj["kind"]] = live
                continue
            log.info(
                "applying %s %s/%s (node plan %s, %d mirrors)",
                obj["kind"],
                self.settings.agent_namespace,
                obj["metadata"]["name"],
                plan.digest(),
                len(plan.mirrors),
            )
            result = kube.apply(obj)
            with self._lock:
                self.agent_objects[obj["kind"]] = _slim(result)
                self._last_plan_apply = time.monotonic()
        with self._lock:
            self.plan = plan
            self.status_dirty.update(self.mirrors)

    # ------------------------------------------------------------ status

    def _carries(self, digest: str | None, name: str) -> str | None:
        """The entry digest of mirror `name` in the plan with this digest (None: the plan lacks it)."""
        known = self.plan_history.get(digest or "")
        return known.get(name) if known is not None else "unknown"

    def _index(self) -> _NodeIndex:
        """Nodes grouped by what their agents carry; rebuilt only after a node or agent pod changed."""
        with self._lock:
            if self._node_index is None:
                groups: dict[tuple[str | None, str | None, bool], list[str]] = {}
                problems: dict[str, str] = {}
                wall = time.time()
                for node in sorted(self.nodes):
                    pod = self.agent_pods.get(node)
                    reason, recheck = _agent_not_ready_reason(pod, wall) if pod is not None else (None, None)
                    if recheck is not None:
                        # Look again when the grace period ends: no event will say so.
                        at = time.monotonic() + (recheck - wall)
                        self.status_recheck_at = min(self.status_recheck_at or at, at)
                    if reason:
                        problems[node] = reason
                    key = (_plan_digest(pod) if pod is not None else None, self.node_applied.get(node), reason is not None)
                    groups.setdefault(key, []).append(node)
                self._node_index = _NodeIndex(labels=dict(self.nodes), groups=groups, problems=problems)
            return self._node_index

    def node_rollout(self, name: str, spec: RegistryMirrorSpec | None, deleting: bool) -> NodeRollout:
        """Desired/updated/ready nodes for one mirror, from the agent pods' plan digests.

        updated: the node's newest agent pod carries this mirror's current entry.
        ready: the last agent pod that was Ready on the node applied it, so the files
        are in place. A rollout for another mirror replaces every agent pod, but the
        old pod's files stay until the new one is Ready: that must not flap this
        mirror's status. Nodes are counted per group of equal plan digests, so 500
        mirrors on 1,000 nodes cost a few dictionary lookups each, not 1,000.
        """
        if spec is None or not spec.node_config.enabled:
            return NodeRollout(enabled=False)
        selector = spec.node_config.node_selector
        index = self._index()
        with self._lock:
            plan = self.plan
            current = next((e for e in plan.mirrors if e.name == name), None) if plan else None
            # While deleting, "current" is absent: a plan without the mirror is what we wait for.
            want = None if deleting else (_entry_digest(current) if current else "no entry yet")
            everyone = not selector.match_labels and not selector.match_expressions
            chosen = None if everyone else {n for n, labels in index.labels.items() if selector.matches(labels)}
            desired = updated = ready = 0
            waiting: list[str] = []
            problems: list[str] = []
            for (newest, applied, failing), names in index.groups.items():
                members = names if chosen is None else [n for n in names if n in chosen]
                if not members:
                    continue
                desired += len(members)
                # Between an old agent pod's deletion and its successor's creation the
                # node still runs what the old one applied.
                carried = newest if newest is not None else applied
                if carried is not None and self._carries(carried, name) == want:
                    updated += len(members)
                if failing:
                    # A preflight failure means containerd ignores the files, whatever they say.
                    problems += [f"{n}: {index.problems[n]}" for n in members[:5]]
                elif applied is not None and self._carries(applied, name) == want:
                    ready += len(members)
                    continue
                waiting += members[:10]
        return NodeRollout(
            enabled=True,
            desired=desired,
            updated=updated,
            ready=ready,
            not_ready=tuple(heapq.nsmallest(10, waiting)),
            problems=tuple(sorted(problems)[:5]),
            removing=deleting,
        )

    def removal_complete(self, name: str) -> tuple[bool, str]:
        """During deletion: whether every node dropped the mirror's files."""
        with self._lock:
            body = self.mirrors.get(name)
        if body is None:
            return True, "gone"
        try:
            spec = self.spec_of(body)
        except ConfigError:
            spec = None
        with self._lock:
            in_plan = self.plan is not None and any(e.name == name for e in self.plan.mirrors)
        if in_plan or self.plan is None:
            return False, "the node plan still lists this mirror"
        rollout = self.node_rollout(name, spec, deleting=True)
        if not rollout.enabled:
            return True, "node configuration disabled"
        if rollout.ready >= rollout.desired:
            return True, f"{rollout.desired} nodes dropped the configuration"
        return False, f"{rollout.ready}/{rollout.desired} nodes dropped the configuration; waiting for {', '.join(rollout.not_ready)}"

    def observation(self, name: str) -> Observation | None:
        """Gather what the status of one mirror is computed from."""
        with self._lock:
            body = self.mirrors.get(name)
            if body is None:
                return None
            err = self.errors.get(name)
            checked = self.upstream_checks.get(name)
            child = naming.child_name(name)
            dep = self.children.get(("Deployment", child))
            svc = self.children.get(("Service", child))
            pvc = self.children.get(("PersistentVolumeClaim", child))
        try:
            spec = self.spec_of(body)
        except ConfigError:
            return None  # write_status reports an invalid spec on its own
        deleting = bool(body["metadata"].get("deletionTimestamp"))
        # Host order from every mirror's spec, so a mirror without a ClusterIP yet still sees its place.
        order = self._host_order_from_specs()
        return Observation(
            name=name,
            generation=body["metadata"].get("generation"),
            spec=spec,
            namespace=self.settings.namespace,
            deployment=dep,
            service=svc,
            pvc=pvc,
            nodes=self.node_rollout(name, spec, deleting),
            deleting=deleting,
            error_reason=err.reason if err else None,
            error_message=err.message if err else "",
            host_order=order,
            upstream_auth=(checked[1].ok, checked[1].reason, checked[1].message) if checked else None,
        )

    def _host_order_from_specs(self) -> dict[str, list[str]]:
        with self._lock:
            if self._host_order is not None:
                return self._host_order
            bodies = list(self.mirrors.items())
        keyed: dict[str, list[tuple[int, str]]] = {}
        for name, body in bodies:
            try:
                spec = self.spec_of(body)
            except ConfigError:
                continue
            if not spec.node_config.enabled or body["metadata"].get("deletionTimestamp"):
                continue
            for host in spec.upstream.effective_hosts():
                keyed.setdefault(host, []).append(mirror_order_key(spec.node_config.priority, name))
        order = {host: [n for _, n in sorted(items)] for host, items in keyed.items()}
        with self._lock:
            self._host_order = order
        return order

    def _write_status_safely(self, name: str) -> None:
        try:
            self.write_status(name)
        except Exception as exc:
            log.warning("status of %s not written: %s: %s", name, type(exc).__name__, _safe(exc))
            self._mark({name}, spec=False)

    def write_status(self, name: str) -> bool:
        """Compute the status and write it only when it differs; True when written."""
        obs = self.observation(name)
        if obs is None:
            with self._lock:
                err = self.errors.get(name)
                body = self.mirrors.get(name)
            if body is None or err is None:
                return False
            return self._patch_status_if_changed(name, body, _invalid_status(body, err))
        with self._lock:
            body = self.mirrors[name]
        old = body.get("status") or {}
        new = evaluate(obs, old.get("conditions") or [])
        changed = self._patch_status_if_changed(name, body, new)
        self._announce(name, body, new)
        return changed

    def _patch_status_if_changed(self, name: str, body: dict[str, Any], new: dict[str, Any]) -> bool:
        old = body.get("status") or {}
        if not status_changed(old, new):
            return False
        patch = {"apiVersion": c.API_VERSION, "kind": c.KIND, "metadata": {"name": name}, "status": typed_status(new)}
        result = kube.apply(patch, subresource="status")
        with self._lock:
            if name in self.mirrors:
                self.mirrors[name] = result
        return True

    def _announce(self, name: str, body: dict[str, Any], status: dict[str, Any]) -> None:
        """Events on transitions an admin cares about (became Ready, stalled, preflight failed)."""
        ready = next((cd for cd in status.get("conditions", []) if cd["type"] == "Ready"), None)
        if ready is None:
            return
        key = f"{ready['status']}/{ready['reason']}"
        with self._lock:
            if self.announced.get(name) == key:
                return
            first = name not in self.announced
            self.announced[name] = key
        interesting = (
            ready["status"] == "True"
            or ready["reason"].endswith(("Missing", "Malformed", "Failed", "InvalidSpec"))
            or (not first and ready["reason"] in {"NoReadyReplicas", "AgentNotReady"})
        )
        if interesting:
            kind = "Normal" if ready["status"] == "True" else "Warning"
            kube.create_event(body, reason=ready["reason"], message=ready.get("message", ""), type_=kind)


def _slim(body: dict[str, Any]) -> dict[str, Any]:
    """A cached copy without managedFields (often the largest part of an object, and never read)."""
    meta = body.get("metadata") or {}
    if "managedFields" not in meta:
        return body
    return {**body, "metadata": {k: v for k, v in meta.items() if k != "managedFields"}}


def _slim_pod(pod: dict[str, Any]) -> dict[str, Any]:
    """Only what rollout accounting reads of an agent pod (there is one per node)."""
    meta = pod.get("metadata") or {}
    status = pod.get("status") or {}
    return {
        "metadata": {
            "name": meta.get("name"),
            "creationTimestamp": meta.get("creationTimestamp"),
            "deletionTimestamp": meta.get("deletionTimestamp"),
            "annotations": {k: v for k, v in (meta.get("annotations") or {}).items() if k == c.ANNOTATION_NODE_CONFIG_HASH},
        },
        "spec": {"nodeName": (pod.get("spec") or {}).get("nodeName")},
        "status": {
            "conditions": [cd for cd in status.get("conditions") or [] if cd.get("type") == "Ready"],
            "containerStatuses": [
                {
                    "started": cs.get("started"),
                    "ready": cs.get("ready"),
                    "state": {k: {"startedAt": (v or {}).get("startedAt")} for k, v in (cs.get("state") or {}).items()},
                }
                for cs in status.get("containerStatuses") or []
            ],
        },
    }


@dataclass(frozen=True)
class _NodeIndex:
    """Nodes grouped by (newest agent pod's plan digest, last applied digest, agent failing)."""

    labels: dict[str, dict[str, str]]
    groups: dict[tuple[str | None, str | None, bool], list[str]]
    problems: dict[str, str]


def _plan_digest(pod: dict[str, Any]) -> str | None:
    digest = ((pod.get("metadata") or {}).get("annotations") or {}).get(c.ANNOTATION_NODE_CONFIG_HASH)
    return str(digest) if digest else None


def _replaces(pod: dict[str, Any], current: dict[str, Any] | None) -> bool:
    """Whether `pod` is the agent pod to track for its node (during a rollout, the newer one)."""
    if current is None or current["metadata"]["name"] == pod["metadata"]["name"]:
        return True
    if current["metadata"].get("deletionTimestamp"):
        return True
    return bool(pod["metadata"].get("creationTimestamp", "") >= current["metadata"].get("creationTimestamp", ""))


AGENT_READY_GRACE_SECONDS = 30.0


def _agent_not_ready_reason(pod: dict[str, Any], now: float) -> tuple[str | None, float | None]:
    """Why a running agent is not Ready (or None), and when to look again if it is still in its grace period.

    The agent's readiness is false only when its preflight failed (containerd will
    not read the files) or a foreign file blocks a host; it says which in an Event
    on the Node. A freshly started agent is not Ready for a moment during every
    rollout, so only one that stays unready past a grace period counts.
    """
    if _pod_ready(pod) or pod["metadata"].get("deletionTimestamp"):
        return None, None
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        running = (status.get("state") or {}).get("running")
        if running is None or status.get("ready"):
            continue
        started = _epoch(running.get("startedAt"))
        if started is None:
            continue
        if now - started < AGENT_READY_GRACE_SECONDS:
            return None, started + AGENT_READY_GRACE_SECONDS
        return "the agent runs but is not Ready (preflight failed or a foreign file blocks a host; see the Node's Events)", None
    return None, None


def _epoch(timestamp: str | None) -> float | None:
    if not timestamp:
        return None
    try:
        return datetime.strptime(timestamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()
    except ValueError:
        return None


def _invalid_status(body: dict[str, Any], err: ConfigError) -> dict[str, Any]:
    generation = body["metadata"].get("generation")
    old = (body.get("status") or {}).get("conditions") or []
    conds = merge_conditions(
        old,
        [condition("Ready", False, err.reason, err.message), condition("Stalled", True, err.reason, err.message)],
        generation=generation,
    )
    return {"observedGeneration": generation, "phase": "Failed", "conditions": conds}


def _safe(exc: BaseException) -> str:
    """An exception as text fit for logs and status: first line only, bounded (API errors can echo bodies)."""
    text = getattr(exc, "reason", None) or str(exc)
    status = getattr(exc, "status", None)
    first = str(text).splitlines()[0] if str(text) else type(exc).__name__
    return f"{status} {first}"[:300] if status else first[:300]
