"""Watch the mirrors' EndpointSlices, so a mirror whose pods are gone is withdrawn at once.

A probe notices a dead mirror only when it runs; the EndpointSlices say it the
moment the control plane knows: a deleted pod, or one whose readiness probe
fails (a wedged registry), leaves the Service's ready endpoints at once. The
agent keeps, per Service, the number of ready endpoints, and the probe tracker
withdraws a mirror with none without waiting for its next probe (probe.py).

What this cannot see: a node that died. Its pods' endpoints stay ready until
the node lifecycle controller marks the node NotReady (40 s and more); the
probes and containerd's `dial_timeout` cover that window.

Cost: one watch per node on the EndpointSlices of the mirrors' namespace (the
kube-proxy on every node watches all of them, cluster-wide), answered from the
API server's watch cache. The agent keeps only counts.

Everything read here is untrusted: a slice that does not look like one counts
for nothing, and while the watch is broken the counts are unknown (None), so
the probes alone decide, as without a watch.
"""

from __future__ import annotations

import ipaddress
import threading
from collections.abc import Callable, Iterator
from typing import Any, Protocol

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
# The mirror Service's port nodes pull from (render/mirror.py PORT_NAME): its number in a slice is the pod's port.
REGISTRY_PORT_NAME = "registry"
MAX_BACKOFF = 30.0
MAX_ADDRESSES = 64  # per slice: more replicas than any mirror runs


class WatchApi(Protocol):
    """What the watcher needs of the API client (agent/nodeapi.py InClusterClient fits)."""

    def list_endpointslices(self, namespace: str) -> tuple[list[dict[str, Any]], str]: ...

    def watch_endpointslices(self, namespace: str, resource_version: str) -> Iterator[dict[str, Any]]: ...


def ready_endpoints(endpoint_slice: Any) -> tuple[str, int, tuple[str, ...]] | None:
    """(service name, ready endpoints, their `address:port` of the registry port) of one EndpointSlice, or None.

    An endpoint is ready unless its `conditions.ready` is false (the API: nil
    means ready); a terminating endpoint is not ready. The addresses are what a
    node without `dial_timeout` probes one by one (a dead pod among live ones).
    """
    if not isinstance(endpoint_slice, dict):
        return None
    labels = (endpoint_slice.get("metadata") or {}).get("labels") or {}
    service = labels.get(SERVICE_NAME_LABEL) if isinstance(labels, dict) else None
    if not isinstance(service, str) or not service:
        return None
    port = None
    for entry in endpoint_slice.get("ports") or []:
        if isinstance(entry, dict) and entry.get("name") == REGISTRY_PORT_NAME and isinstance(entry.get("port"), int):
            port = entry["port"]
    endpoints = endpoint_slice.get("endpoints") or []
    if not isinstance(endpoints, list):
        return service, 0, ()
    count = 0
    addresses: list[str] = []
    for endpoint in endpoints:
        if not isinstance(endpoint, dict) or not endpoint.get("addresses"):
            continue
        conditions = endpoint.get("conditions") or {}
        if not isinstance(conditions, dict) or conditions.get("ready") is False:
            continue
        count += 1
        first = endpoint["addresses"][0] if isinstance(endpoint["addresses"], list) else None
        if port is not None and isinstance(first, str) and len(addresses) < MAX_ADDRESSES:
            try:
                ip = ipaddress.ip_address(first)
            except ValueError:
                continue
            addresses.append(f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}")
    return service, count, tuple(sorted(addresses))


class EndpointCounts:
    """Ready endpoints per Service of one namespace, from a list and then a watch."""

    def __init__(self) -> None:
        self._slices: dict[str, tuple[str, int, tuple[str, ...]]] = {}
        self.synced = False

    def replace(self, items: list[dict[str, Any]]) -> None:
        """A fresh list: forget everything else."""
        self._slices = {}
        for item in items:
            self.apply("ADDED", item)
        self.synced = True

    def apply(self, event_type: str, obj: dict[str, Any]) -> bool:
        """One watch event; returns whether any Service's count changed."""
        name = (obj.get("metadata") or {}).get("name") if isinstance(obj, dict) else None
        if not isinstance(name, str):
            return False
        before = (self.counts(), self.addresses())
        if event_type == "DELETED":
            self._slices.pop(name, None)
        elif event_type in ("ADDED", "MODIFIED"):
            found = ready_endpoints(obj)
            if found is None:
                self._slices.pop(name, None)
            else:
                self._slices[name] = found
        return (self.counts(), self.addresses()) != before

    def counts(self) -> dict[str, int]:
        """Service name -> ready endpoints over all its slices."""
        out: dict[str, int] = {}
        for service, count, _ in self._slices.values():
            out[service] = out.get(service, 0) + count
        return out

    def addresses(self) -> dict[str, tuple[str, ...]]:
        """Service name -> the ready endpoints' `address:port` of the registry port, over all its slices."""
        out: dict[str, set[str]] = {}
        for service, _, addresses in self._slices.values():
            out.setdefault(service, set()).update(addresses)
        return {service: tuple(sorted(found)) for service, found in out.items()}


class EndpointWatcher:
    """A daemon thread keeping EndpointCounts of one namespace current; calls `on_change` when a count moves."""

    def __init__(self, api: WatchApi, namespace: str, on_change: Callable[[], None], log: Callable[..., None]) -> None:
        self.api = api
        self.namespace = namespace
        self._on_change = on_change
        self._log = log
        self._counts = EndpointCounts()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"endpoints-{namespace}", daemon=True)

    def start(self) -> EndpointWatcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def ready(self, service: str) -> int | None:
        """Ready endpoints of the Service; None while the watch is not in sync (the probes decide alone)."""
        with self._lock:
            if not self._counts.synced:
                return None
            return self._counts.counts().get(service, 0)

    def ready_addresses(self, service: str) -> tuple[str, ...]:
        """The Service's ready endpoints as `address:port` (empty while not in sync)."""
        with self._lock:
            return self._counts.addresses().get(service, ()) if self._counts.synced else ()

    def _unsync(self) -> None:
        with self._lock:
            was = self._counts.synced
            self._counts.synced = False
        if was:
            self._on_change()

    def _run(self) -> None:
        backoff = 1.0
        while not self._stop.is_set():
            try:
                items, version = self.api.list_endpointslices(self.namespace)
                with self._lock:
                    self._counts.replace(items)
                self._on_change()
                backoff = 1.0
                while not self._stop.is_set():
                    for event in self.api.watch_endpointslices(self.namespace, version):
                        kind, obj = event.get("type"), event.get("object") or {}
                        if kind == "ERROR":  # 410 Gone and friends: list again
                            raise WatchExpired(str(obj.get("message", "watch error")))
                        meta = obj.get("metadata") or {}
                        if isinstance(meta.get("resourceVersion"), str):
                            version = meta["resourceVersion"]
                        if kind == "BOOKMARK":
                            continue
                        with self._lock:
                            changed = self._counts.apply(str(kind), obj)
                        if changed:
                            self._on_change()
                        if self._stop.is_set():
                            return
                    # The server ended the watch (timeoutSeconds): resume from where it was.
            except WatchExpired:
                continue
            except Exception as exc:  # any API or parse failure: unknown until listed again
                self._log("endpoints.unavailable", "warning", namespace=self.namespace, error=f"{type(exc).__name__}: {exc}")
                self._unsync()
                self._stop.wait(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)


class WatchExpired(Exception):
    """The watch's resource version is gone: list again."""
