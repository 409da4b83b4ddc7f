"""What the watches report, reduced to the fields the reconcilers read.

One informer per collection fills one dict. The transforms below are the
memory budget: managedFields (often the largest part of an object) are never
kept, a Secret is kept as hashes of its values (plus the public certificate
nodes need to trust a TLS mirror), a Node as its labels, an agent pod as the
few fields rollout accounting reads.

Children are recognised by owner reference or by name, not by label, so a
child whose labels were edited away is still watched and repaired.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import partial
from typing import Any

from regmirror import constants as c
from regmirror import naming
from regmirror.access import ANNOTATION_ROTATE, NODE_SECRET_NAME
from regmirror.cachestatus import pod_image_ids
from regmirror.controller.informer import Informer, Source
from regmirror.nodeusage import pod_cidrs
from regmirror.rollout import slim_agent_pod

# Pods that may run: a finished pod's images are no longer in use.
ACTIVE_PODS = "status.phase!=Succeeded,status.phase!=Failed"
CHILD_KINDS = ("Deployment", "Service", "PersistentVolumeClaim", "ConfigMap", "PodDisruptionBudget", "NetworkPolicy")
# Secret keys whose values are public certificates (nodes trust a TLS mirror's CA).
PUBLIC_SECRET_KEYS = ("ca.crt", "tls.crt")
# The spec fields of a child that the status and node plan passes read (kept decoded; see PackedChild.view).
VIEW_SPEC = {"Service": ("clusterIP",)}


def _meta(obj: dict[str, Any], *keep: str) -> dict[str, Any]:
    meta = obj.get("metadata") or {}
    return {k: meta[k] for k in keep if k in meta}


def slim_mirror(obj: dict[str, Any]) -> dict[str, Any]:
    """A RegistryMirror: identity, generation, deletion, finalizers, spec and status."""
    meta = _meta(obj, "name", "uid", "generation", "deletionTimestamp", "finalizers", "resourceVersion")
    annotations = (obj.get("metadata") or {}).get("annotations") or {}
    kept = {k: annotations[k] for k in (ANNOTATION_ROTATE, c.ANNOTATION_INVALIDATE) if k in annotations}
    if kept:
        meta["annotations"] = kept
    return {
        "apiVersion": obj.get("apiVersion", c.API_VERSION),
        "kind": c.KIND,
        "metadata": meta,
        "spec": obj.get("spec") or {},
        "status": obj.get("status") or {},
    }


def mirror_of_child(obj: dict[str, Any]) -> str | None:
    """The mirror a namespaced object belongs to: its RegistryMirror owner, else a child name's suffix."""
    meta = obj.get("metadata") or {}
    for ref in meta.get("ownerReferences") or []:
        if ref.get("kind") == c.KIND and str(ref.get("apiVersion", "")).startswith(c.GROUP + "/"):
            return str(ref.get("name"))
    return naming.mirror_of_child_name(str(meta.get("name", "")))


@dataclass(frozen=True, slots=True, eq=True)
class PackedChild:
    """A mirror's child as the store keeps it: metadata and status decoded, the rest compact JSON.

    A Deployment as the API server returns it (every default filled in) is about
    36 KB of Python objects and 8 KB of JSON; at 500 mirrors the decoded children
    and renderings were the largest part of the operator's memory while they
    converged. What is read often (metadata, status) stays decoded; the spec or
    data, read only by a children pass's drift check, is decoded when asked for
    (`Store.child`), about 50 us for a Deployment. The status and node plan passes
    read `view()`, which decodes nothing: at 500 mirrors, decoding whole
    Deployments for them was 12% of the operator's CPU while it converged.
    """

    mirror: str
    metadata: dict[str, Any]
    status: dict[str, Any] | None
    rest: str  # JSON of every other top-level field (apiVersion, kind, spec or data ...)
    spec_view: dict[str, Any] | None = None  # the VIEW_SPEC fields of the spec

    def view(self) -> dict[str, Any]:
        """Metadata, status and the VIEW_SPEC fields of the spec, as an object-shaped dict (shared: do not change it)."""
        obj: dict[str, Any] = {"metadata": self.metadata, "spec": self.spec_view or {}}
        if self.status is not None:
            obj["status"] = self.status
        return obj

    def unpack(self) -> dict[str, Any]:
        """The object as a new dict (metadata and status are shared with the store: read them, do not change them)."""
        obj: dict[str, Any] = json.loads(self.rest)
        obj["metadata"] = self.metadata
        if self.status is not None:
            obj["status"] = self.status
        return obj

    def same_but_status(self, other: PackedChild | None) -> bool:
        """Whether only the status (or resourceVersion) differs: such an event needs no children pass."""
        if other is None or self.rest != other.rest:
            return False
        ignore = ("resourceVersion",)
        return {k: v for k, v in self.metadata.items() if k not in ignore} == {k: v for k, v in other.metadata.items() if k not in ignore}


def slim_child(obj: dict[str, Any]) -> PackedChild | None:
    """A mirror's child without managedFields, packed (None for objects that are no mirror's child)."""
    mirror = mirror_of_child(obj)
    if mirror is None:
        return None
    meta = {k: v for k, v in (obj.get("metadata") or {}).items() if k not in ("managedFields", "selfLink")}
    rest = {k: v for k, v in obj.items() if k not in ("metadata", "status")}
    status = obj.get("status")
    spec = obj.get("spec")
    view = {k: spec[k] for k in VIEW_SPEC.get(str(obj.get("kind")), ()) if k in spec} if isinstance(spec, dict) else None
    return PackedChild(mirror, meta, status if isinstance(status, dict) else None, json.dumps(rest, separators=(",", ":")), view or None)


def slim_secret(obj: dict[str, Any]) -> dict[str, Any]:
    """Per-key hashes of a Secret's data (enough to detect rotation, never the values), plus public certificates."""
    data = obj.get("data") or {}
    return {
        "fingerprint": {key: hashlib.sha256(str(value).encode()).hexdigest() for key, value in data.items()},
        "public": {key: data[key] for key in PUBLIC_SECRET_KEYS if key in data},
    }


def slim_node(obj: dict[str, Any]) -> dict[str, Any]:
    """A Node as its labels (what a mirror's node selector reads), InternalIP addresses (its NetworkPolicy
    admits them), and ExternalIP addresses and pod networks (a mirror's front may see its pulls from those)."""
    entries = [a for a in (obj.get("status") or {}).get("addresses") or [] if isinstance(a, dict) and a.get("address")]
    slim: dict[str, Any] = {
        "labels": dict((obj.get("metadata") or {}).get("labels") or {}),
        "addresses": sorted(str(a["address"]) for a in entries if a.get("type") == "InternalIP"),
    }
    external = sorted(str(a["address"]) for a in entries if a.get("type") == "ExternalIP")
    cidrs = pod_cidrs(obj.get("spec") or {})
    if external:
        slim["externalAddresses"] = external
    if cidrs:
        slim["podCIDRs"] = cidrs
    return slim


def slim_agent_object(obj: dict[str, Any]) -> dict[str, Any]:
    """The agent DaemonSet or node ConfigMap without managedFields and status."""
    meta = {k: v for k, v in (obj.get("metadata") or {}).items() if k != "managedFields"}
    return {**{k: v for k, v in obj.items() if k not in ("metadata", "status")}, "metadata": meta}


def workload_pod_key(obj: dict[str, Any]) -> str:
    """namespace/name: pods of every namespace share one dict."""
    meta = obj.get("metadata") or {}
    return f"{meta.get('namespace', '')}/{meta.get('name', '')}"


def slim_workload_pod(namespace: str, obj: dict[str, Any]) -> dict[str, Any] | None:
    """Any pod as what the cache reads: the imageIDs it runs (pins) and, for a mirror pod, its IP and
    readiness (the stats poll); None for a pod that has neither (most pods before they run)."""
    images = pod_image_ids(obj)
    meta = obj.get("metadata") or {}
    labels = meta.get("labels") or {}
    mirror = labels.get(c.LABEL_MIRROR) if labels.get(c.LABEL_COMPONENT) == "mirror" and meta.get("namespace") == namespace else None
    if not images and mirror is None:
        return None
    slim: dict[str, Any] = {"images": images}
    if mirror is not None:
        status = obj.get("status") or {}
        ready = any(cd.get("type") == "Ready" and cd.get("status") == "True" for cd in status.get("conditions") or [])
        slim |= {"mirror": str(mirror), "ip": status.get("podIP"), "ready": ready and not meta.get("deletionTimestamp")}
    return slim


def sources(namespace: str, agent_namespace: str) -> list[Source]:
    """Every collection the controller watches."""
    agent = ",".join(f"{k}={v}" for k, v in naming.agent_selector_labels().items())
    return [
        Source(c.KIND, transform=slim_mirror),
        *(Source(kind, namespace, transform=slim_child) for kind in CHILD_KINDS),
        Source("Secret", namespace, transform=slim_secret),
        Source("Node", transform=slim_node),
        Source("Pod", agent_namespace, label_selector=agent, transform=slim_agent_pod),
        Source("DaemonSet", agent_namespace, field_selector=f"metadata.name={c.AGENT_NAME}", transform=slim_agent_object),
        Source("ConfigMap", agent_namespace, field_selector=f"metadata.name={c.NODE_CONFIG_NAME}", transform=slim_agent_object),
        # The nodes' credentials (hashes only): a hand that deletes or edits it queues the plan, which puts it back.
        Source("Secret", agent_namespace, field_selector=f"metadata.name={NODE_SECRET_NAME}", transform=slim_secret),
        # Every pod, reduced to its images' digests (the caches' pins) and, for mirror pods, the stats address.
        # Finished pods pin nothing: the API server drops them from the watch.
        Source("Pod", transform=partial(slim_workload_pod, namespace), key=workload_pod_key, field_selector=ACTIVE_PODS),
    ]


class Store:
    """The informers' dicts, by (kind, namespace), with typed look-ups."""

    def __init__(self, namespace: str, agent_namespace: str) -> None:
        self.namespace = namespace
        self.agent_namespace = agent_namespace
        self.informers: dict[tuple[str, str | None], Informer] = {}
        self._node_addresses: tuple[int, tuple[str, ...]] | None = None  # (Node informer's changes, addresses)

    def add(self, informer: Informer) -> None:
        """Register an informer (its dict becomes part of the store)."""
        self.informers[(informer.source.kind, informer.source.namespace)] = informer

    def _items(self, kind: str, namespace: str | None) -> dict[str, Any]:
        informer = self.informers.get((kind, namespace))
        return informer.items if informer is not None else {}

    def mirrors(self) -> dict[str, dict[str, Any]]:
        """name -> RegistryMirror."""
        return self._items(c.KIND, None)

    def mirror(self, name: str) -> dict[str, Any] | None:
        """One RegistryMirror."""
        return self.mirrors().get(name)

    def child(self, kind: str, mirror: str, name: str | None = None) -> dict[str, Any] | None:
        """A mirror's child of a kind, by its name (default: the mirror's main child name), as a new dict."""
        packed = self._items(kind, self.namespace).get(name or naming.child_name(mirror))
        return packed.unpack() if isinstance(packed, PackedChild) else None

    def child_view(self, kind: str, mirror: str) -> dict[str, Any] | None:
        """A mirror's main child of a kind as metadata, status and the VIEW_SPEC spec fields, nothing decoded (shared: read only)."""
        packed = self._items(kind, self.namespace).get(naming.child_name(mirror))
        return packed.view() if isinstance(packed, PackedChild) else None

    def put_child(self, obj: dict[str, Any]) -> None:
        """Record what a write returned, so the next reconcile compares against it before the watch reports it."""
        slim = slim_child(obj)
        informer = self.informers.get((obj["kind"], self.namespace))
        if slim is not None and informer is not None:
            informer.offer(obj["metadata"]["name"], slim)

    def secret(self, name: str) -> dict[str, Any] | None:
        """A Secret's fingerprint and public certificates."""
        return self._items("Secret", self.namespace).get(name)

    def nodes(self) -> dict[str, dict[str, Any]]:
        """name -> {"labels": ..., "addresses": [...]}."""
        return self._items("Node", None)

    def node_addresses(self) -> tuple[str, ...]:
        """Every node's InternalIP addresses (the nodes' sources in the mirrors' NetworkPolicies).

        Kept until a Node changes: every children pass reads it, and at 1,000 nodes gathering it
        each time was 4% of the operator's CPU while 500 mirrors converged."""
        informer = self.informers.get(("Node", None))
        version = informer.changes if informer is not None else -1
        if self._node_addresses is None or self._node_addresses[0] != version:
            addresses = tuple(sorted({a for node in self.nodes().values() for a in node.get("addresses", [])}))
            self._node_addresses = (version, addresses)
        return self._node_addresses[1]

    def node_auth_secret(self) -> dict[str, Any] | None:
        """regmirror-agent-credentials's hashes (agent namespace)."""
        return self._items("Secret", self.agent_namespace).get(NODE_SECRET_NAME)

    def agent_pods(self) -> dict[str, dict[str, Any]]:
        """pod name -> slim agent pod."""
        return self._items("Pod", self.agent_namespace)

    def workload_pods(self) -> dict[str, dict[str, Any]]:
        """namespace/name -> slim pod (slim_workload_pod) of every namespace."""
        return self._items("Pod", None)

    def agent_object(self, kind: str) -> dict[str, Any] | None:
        """The agent DaemonSet or the node ConfigMap."""
        name = c.AGENT_NAME if kind == "DaemonSet" else c.NODE_CONFIG_NAME
        return self._items(kind, self.agent_namespace).get(name)

    def put_agent_object(self, obj: dict[str, Any]) -> None:
        """Record what a write of the DaemonSet or node ConfigMap returned."""
        informer = self.informers.get((obj["kind"], self.agent_namespace))
        if informer is not None:
            informer.offer(obj["metadata"]["name"], slim_agent_object(obj))

    def synced(self) -> bool:
        """Every collection was listed at least once."""
        return bool(self.informers) and all(i.synced.is_set() for i in self.informers.values())

    def blind_for(self) -> float:
        """Seconds the longest-failing collection has been unwatchable."""
        return max((i.blind_for() for i in self.informers.values()), default=0.0)

    def api_answered(self) -> None:
        """The API server took a request (a write): every collection's outage may be over (see WatchHealth)."""
        for informer in self.informers.values():
            informer.health.answered()
