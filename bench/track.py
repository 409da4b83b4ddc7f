"""What the watches saw, reduced to first times: a mirror Ready, a Deployment Available, a
PVC Bound, every node running a Ready agent pod whose plan includes a mirror."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import Counter
from collections.abc import Iterable
from typing import Any

MIRROR_LABEL = "regmirror.dev/mirror"


def _conditions(obj: dict[str, Any]) -> dict[str, str]:
    return {c.get("type", ""): c.get("status", "") for c in (obj.get("status") or {}).get("conditions") or []}


class FirstTimes:
    """name -> the first monotonic time a predicate held for it (thread-safe)."""

    def __init__(self) -> None:
        self.at: dict[str, float] = {}
        self._lock = threading.Lock()

    def mark(self, name: str, t: float) -> None:
        with self._lock:
            self.at.setdefault(name, t)

    def done(self, names: Iterable[str]) -> bool:
        with self._lock:
            return all(n in self.at for n in names)

    def count(self, names: Iterable[str]) -> int:
        with self._lock:
            return sum(1 for n in names if n in self.at)


class MirrorReady:
    """RegistryMirrors: when each first reported Ready=True."""

    def __init__(self) -> None:
        self.ready = FirstTimes()
        self.last_status: dict[str, dict[str, Any]] = {}

    def on_event(self, type_: str, obj: dict[str, Any], t: float) -> None:
        name = obj["metadata"]["name"]
        if type_ == "DELETED":
            return
        self.last_status[name] = obj.get("status") or {}
        if _conditions(obj).get("Ready") == "True":
            self.ready.mark(name, t)


class ChildReady:
    """A mirror's Deployment (Available with a ready replica) and PVC (Bound), by the mirror label."""

    def __init__(self) -> None:
        self.deployment = FirstTimes()
        self.pvc = FirstTimes()

    def on_deployment(self, type_: str, obj: dict[str, Any], t: float) -> None:
        mirror = (obj["metadata"].get("labels") or {}).get(MIRROR_LABEL)
        if mirror and type_ != "DELETED":
            status = obj.get("status") or {}
            if _conditions(obj).get("Available") == "True" and (status.get("readyReplicas") or 0) >= 1:
                self.deployment.mark(mirror, t)

    def on_pvc(self, type_: str, obj: dict[str, Any], t: float) -> None:
        mirror = (obj["metadata"].get("labels") or {}).get(MIRROR_LABEL)
        if mirror and type_ != "DELETED" and (obj.get("status") or {}).get("phase") == "Bound":
            self.pvc.mark(mirror, t)


class NodePlans:
    """The node plan ConfigMap's versions: plan digest -> names of the mirrors it lists.

    The digest is the one the operator stamps on the agent pod template:
    sha256 of the plan's canonical JSON, which is exactly the ConfigMap's text.
    """

    def __init__(self, key: str = "mirrors.json") -> None:
        self.key = key
        self.mirrors_by_digest: dict[str, frozenset[str]] = {}
        self.versions: list[tuple[float, str, int]] = []  # (time, digest, number of mirrors)
        self._lock = threading.Lock()

    def on_event(self, type_: str, obj: dict[str, Any], t: float) -> None:
        text = (obj.get("data") or {}).get(self.key)
        if type_ == "DELETED" or text is None:
            return
        digest = hashlib.sha256(text.encode()).hexdigest()[:16]
        names = frozenset(m["name"] for m in json.loads(text).get("mirrors", []))
        with self._lock:
            if digest not in self.mirrors_by_digest:
                self.versions.append((t, digest, len(names)))
            self.mirrors_by_digest[digest] = names

    def digests_with(self) -> dict[str, frozenset[str]]:
        with self._lock:
            return dict(self.mirrors_by_digest)


class DaemonSetPods:
    """Per node, the current pod of a DaemonSet: the value of one template annotation, and Ready."""

    def __init__(self, annotation: str) -> None:
        self.annotation = annotation
        self._pods: dict[str, dict[str, tuple[str, str, bool]]] = {}  # node -> pod name -> (created, value, ready)
        self._lock = threading.Lock()

    def on_event(self, type_: str, obj: dict[str, Any], t: float) -> None:
        meta = obj["metadata"]
        node = (obj.get("spec") or {}).get("nodeName")
        if not node:
            return
        with self._lock:
            pods = self._pods.setdefault(node, {})
            if type_ == "DELETED" or meta.get("deletionTimestamp"):
                pods.pop(meta["name"], None)
                return
            value = (meta.get("annotations") or {}).get(self.annotation, "")
            pods[meta["name"]] = (meta.get("creationTimestamp", ""), value, _conditions(obj).get("Ready") == "True")

    def ready_by_value(self) -> Counter[str]:
        """How many nodes run a Ready current pod, by annotation value."""
        counts: Counter[str] = Counter()
        with self._lock:
            for pods in self._pods.values():
                if pods:
                    _, value, ready = max(pods.values())
                    if ready:
                        counts[value] += 1
        return counts


class Sampler(threading.Thread):
    """Every ``interval`` s, marks the first time all ``nodes`` run a Ready agent pod whose
    plan includes each pending mirror (or whose annotation is in a wanted set)."""

    def __init__(self, pods: DaemonSetPods, nodes: int, plans: NodePlans | None = None, interval: float = 0.05) -> None:
        super().__init__(name="rollout sampler", daemon=True)
        self.pods = pods
        self.nodes = nodes
        self.plans = plans
        self.interval = interval
        self.rolled = FirstTimes()  # mirror (or wanted value) -> all nodes carry it
        self.pending: set[str] = set()
        self.wanted_values: dict[str, set[str]] = {}  # label -> annotation values that count
        self._lock = threading.Lock()
        self._halt = threading.Event()

    def want_mirrors(self, names: Iterable[str]) -> None:
        with self._lock:
            self.pending |= set(names)

    def want_value(self, label: str, values: set[str]) -> None:
        with self._lock:
            self.wanted_values[label] = set(values)

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            self.check(time.monotonic())

    def check(self, now: float) -> None:
        counts = self.pods.ready_by_value()
        with self._lock:
            pending = set(self.pending)
            wanted = dict(self.wanted_values)
        for label, values in wanted.items():
            if sum(counts[v] for v in values) >= self.nodes:
                self.rolled.mark(label, now)
                with self._lock:
                    self.wanted_values.pop(label, None)
        if not pending or self.plans is None:
            return
        digests = self.plans.digests_with()
        per_mirror: Counter[str] = Counter()
        for digest, n in counts.items():
            for name in digests.get(digest, ()):
                per_mirror[name] += n
        done = {m for m in pending if per_mirror[m] >= self.nodes}
        for m in done:
            self.rolled.mark(m, now)
        with self._lock:
            self.pending -= done

    def stop(self) -> None:
        self._halt.set()
