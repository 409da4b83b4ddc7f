"""The only module with Kopf decorators: thin wrappers that feed the Controller.

Every watch handler records the event and returns; the Controller's worker
does the reconciling (see reconcile.py for why). Run with
`regmirror run` (= `kopf run -m regmirror.handlers --standalone
--namespace <operator ns> --namespace <agent ns> --log-format=json`).
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

import kopf
from prometheus_client import Counter, Gauge, Histogram, start_http_server

from regmirror import constants as c
from regmirror.reconcile import Controller, Metrics, Settings

RECONCILES = Counter("regmirror_reconciles_total", "Mirror reconciles by outcome.", ["outcome"])
RECONCILE_SECONDS = Histogram("regmirror_reconcile_duration_seconds", "Time to reconcile one mirror.")
RECONCILE_WRITES = Counter("regmirror_reconcile_writes_total", "Reconciles that had to write a child (drift or change).")
MIRRORS = Gauge("regmirror_mirrors", "RegistryMirrors known to the operator.")
MIRRORS_READY = Gauge("regmirror_mirrors_ready", "RegistryMirrors whose Ready condition is True.")


def _metrics() -> Metrics:
    metrics = Metrics()

    def on_reconcile(outcome: str, seconds: float, wrote: bool) -> None:
        RECONCILES.labels(outcome=outcome).inc()
        RECONCILE_SECONDS.observe(seconds)
        if wrote:
            RECONCILE_WRITES.inc()

    def on_ready_count(ready: int, total: int) -> None:
        MIRRORS_READY.set(ready)
        MIRRORS.set(total)

    metrics.on_reconcile = on_reconcile
    metrics.on_ready_count = on_ready_count
    return metrics


settings = Settings()
controller = Controller(settings, _metrics())
MANAGED = {c.LABEL_MANAGED_BY: c.MANAGED_BY}
AGENT = {c.LABEL_NAME: c.APP_NAME, c.LABEL_COMPONENT: "agent"}


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    """Our own finalizer and annotation prefixes, no Kopf-generated Events; start the worker and metrics."""
    settings.persistence.finalizer = c.FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=c.ANNOTATION_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=c.ANNOTATION_PREFIX, key="last-handled-configuration")
    # Kopf's own Events would echo handler exceptions; ours are posted deliberately (reconcile._announce).
    settings.posting.enabled = False
    # One "Handler ... succeeded" line per watch event is most of the log and a real
    # share of the CPU at scale (thousands of agent-pod events); problems stay visible.
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    port = int(os.environ.get("REGMIRROR_METRICS_PORT", "8000"))
    if port:
        start_http_server(port)
    threading.Thread(target=controller.run, name="regmirror-worker", daemon=True).start()


@kopf.on.cleanup()
def shutdown(**_: Any) -> None:
    """Stop the worker."""
    controller.stop()


@kopf.on.probe(id="mirrors")
def probe_mirrors(**_: Any) -> int:
    """Liveness detail: how many mirrors the operator tracks."""
    return len(controller.mirrors)


@kopf.on.event(c.GROUP, c.VERSION, c.PLURAL)
def mirror_event(type: str | None, body: kopf.Body, **_: Any) -> None:
    """Any change of a RegistryMirror."""
    controller.on_mirror(type or "ADDED", dict(body))


@kopf.on.delete(c.GROUP, c.VERSION, c.PLURAL)
def mirror_deleted(name: str, body: kopf.Body, **_: Any) -> None:
    """Hold the finalizer until every node dropped the mirror's files."""
    controller.on_mirror("MODIFIED", dict(body))
    done, message = controller.removal_complete(name)
    if not done:
        raise kopf.TemporaryError(message, delay=2)


def _child_handler(group: str, version: str, plural: str, kind: str) -> None:
    # List items carry no `kind`, so each handler states the kind it watches.
    @kopf.on.event(group, version, plural, labels=MANAGED, when=lambda namespace, **_: namespace == settings.namespace)
    def child_event(type: str | None, body: kopf.Body, **_: Any) -> None:
        controller.on_child(type or "ADDED", {**body, "kind": kind})


for _group, _version, _plural, _kind in (
    ("apps", "v1", "deployments", "Deployment"),
    ("", "v1", "services", "Service"),
    ("", "v1", "persistentvolumeclaims", "PersistentVolumeClaim"),
    ("", "v1", "configmaps", "ConfigMap"),
    ("policy", "v1", "poddisruptionbudgets", "PodDisruptionBudget"),
):
    _child_handler(_group, _version, _plural, _kind)


@kopf.on.event("", "v1", "secrets", when=lambda namespace, **_: namespace == settings.namespace)
def secret_event(type: str | None, body: kopf.Body, **_: Any) -> None:
    """Credentials created, rotated or removed."""
    controller.on_secret(type or "ADDED", dict(body))


@kopf.on.event("", "v1", "nodes")
def node_event(type: str | None, body: kopf.Body, **_: Any) -> None:
    """Nodes decide how many a mirror selects."""
    controller.on_node(type or "ADDED", dict(body))


@kopf.on.event("", "v1", "pods", labels=AGENT, when=lambda namespace, **_: namespace == settings.agent_namespace)
def agent_pod_event(type: str | None, body: kopf.Body, **_: Any) -> None:
    """Agent pods report each node's rollout."""
    controller.on_agent_pod(type or "ADDED", dict(body))


@kopf.on.event("apps", "v1", "daemonsets", labels=MANAGED, when=lambda namespace, **_: namespace == settings.agent_namespace)
def agent_daemonset_event(type: str | None, body: kopf.Body, **_: Any) -> None:
    """The agent DaemonSet (restored when edited or deleted by hand)."""
    controller.on_agent_object(type or "ADDED", {**body, "kind": "DaemonSet"})


@kopf.on.event("", "v1", "configmaps", labels=MANAGED, when=lambda namespace, **_: namespace == settings.agent_namespace)
def node_config_event(type: str | None, body: kopf.Body, **_: Any) -> None:
    """The node plan ConfigMap (restored when edited or deleted by hand)."""
    if body.get("metadata", {}).get("name") == c.NODE_CONFIG_NAME:
        controller.on_agent_object(type or "ADDED", {**body, "kind": "ConfigMap"})
