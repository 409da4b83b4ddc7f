"""PURE: which nodes carry which mirror's configuration, from the agent pods' plan digests.

Every node plan version has a digest that the agent DaemonSet's pod template
carries, so an agent pod says which plan it runs, and a Ready agent pod says
it applied that plan (the agent is Ready only once the plan's files are in
place and the runtime will read them; kwok makes pods Ready the same way, so
the benchmark sees the same signal). `PlanHistory` remembers, for recent plan
digests, each mirror's entry digest, so "does node N run mirror M's current
configuration" is a dictionary lookup.

Nodes are grouped by (newest pod's digest, last applied digest, agent failing):
500 mirrors on 1,000 nodes cost a few lookups per mirror, not 1,000.
"""

from __future__ import annotations

import enum
import hashlib
import heapq
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from regmirror import constants as c
from regmirror.conditions import is_true
from regmirror.models import LabelSelector
from regmirror.nodeplan import MirrorEntry, NodePlan

PLAN_HISTORY = 8
# A starting agent is not Ready for a moment in every rollout (longer on a loaded cluster):
# only one that stays unready this long counts as a problem.
AGENT_READY_GRACE_SECONDS = 120.0
MAX_NAMES = 10


class Carried(enum.Enum):
    """What a plan says about a mirror when the plan is not in the history."""

    UNKNOWN_PLAN = "unknown plan"
    # The mirror has no entry in the current plan yet: no node can carry it.
    NOT_IN_PLAN = "not in the plan yet"


def entry_digest(entry: MirrorEntry) -> str:
    """Short hash of one mirror's entry: equal entries configure a node equally."""
    return hashlib.sha256(entry.model_dump_json(by_alias=True).encode()).hexdigest()[:16]


@dataclass
class PlanHistory:
    """Recent plan digests -> {mirror: entry digest}, oldest first, bounded."""

    plans: OrderedDict[str, dict[str, str]] = field(default_factory=OrderedDict)
    limit: int = PLAN_HISTORY

    def remember(self, plan: NodePlan, digest: str | None = None) -> str:
        """Record a plan (as the newest; `digest` if the caller has it); returns its digest."""
        digest = digest or plan.digest()
        self.plans[digest] = {e.name: entry_digest(e) for e in plan.mirrors}
        self.plans.move_to_end(digest)
        while len(self.plans) > self.limit:
            self.plans.popitem(last=False)
        return digest

    def seed(self, known: Mapping[str, Mapping[str, str]]) -> None:
        """After a restart: plans the node ConfigMap remembered (newer knowledge wins)."""
        for digest, entries in known.items():
            if digest not in self.plans:
                self.plans[digest] = dict(entries)
                self.plans.move_to_end(digest, last=False)

    def carries(self, plan_digest: str, mirror: str) -> str | Carried | None:
        """The entry digest of `mirror` in that plan; None if the plan lacks it; UNKNOWN_PLAN if the plan is unknown."""
        known = self.plans.get(plan_digest)
        if known is None:
            return Carried.UNKNOWN_PLAN
        return known.get(mirror)

    def as_dict(self) -> dict[str, dict[str, str]]:
        """For the node ConfigMap, so a restarted operator knows what older agent pods carry."""
        return {k: dict(v) for k, v in self.plans.items()}


# ------------------------------------------------------------------ agent pods


def slim_agent_pod(pod: dict[str, Any]) -> dict[str, Any] | None:
    """Only what rollout accounting reads of an agent pod (there is one per node)."""
    meta = pod.get("metadata") or {}
    status = pod.get("status") or {}
    node = (pod.get("spec") or {}).get("nodeName")
    if not node:
        return None
    started = None
    container_ready = None
    for cs in status.get("containerStatuses") or []:
        running = (cs.get("state") or {}).get("running")
        container_ready = bool(cs.get("ready"))
        started = (running or {}).get("startedAt") if running else None
    return {
        "name": meta.get("name"),
        "node": node,
        "created": meta.get("creationTimestamp") or "",
        "deleting": bool(meta.get("deletionTimestamp")),
        "digest": (meta.get("annotations") or {}).get(c.ANNOTATION_NODE_CONFIG_HASH),
        "ready": is_true(status.get("conditions"), "Ready"),
        "running_since": started,
        "container_ready": container_ready,
    }


def newest_pods(pods: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per node, the agent pod to track: the newest that is not being deleted (during a rollout, the successor)."""
    out: dict[str, dict[str, Any]] = {}
    for pod in pods:
        current = out.get(pod["node"])
        if current is None or _recency(pod) > _recency(current):
            out[pod["node"]] = pod
    return out


def _recency(pod: dict[str, Any]) -> tuple[bool, str, str]:
    return (not pod["deleting"], pod["created"], pod["name"])


def _epoch(timestamp: str | None) -> float | None:
    if not timestamp:
        return None
    try:
        return datetime.strptime(timestamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()
    except ValueError:
        return None


def agent_not_ready_reason(pod: dict[str, Any], now: float) -> tuple[str | None, float | None]:
    """Why a running agent is not Ready (or None), and when to look again if it is still in its grace period.

    The agent's readiness is false only when its preflight failed (containerd will
    not read the files) or a foreign file blocks a host; it says which in an Event
    on the Node. A freshly started agent is not Ready for a moment during every
    rollout, so only one that stays unready past a grace period counts.
    """
    if pod["ready"] or pod["deleting"] or pod["container_ready"] is not False:
        return None, None
    started = _epoch(pod["running_since"])
    if started is None:
        return None, None
    if now - started < AGENT_READY_GRACE_SECONDS:
        return None, started + AGENT_READY_GRACE_SECONDS
    return "the agent runs but is not Ready (preflight failed or a foreign file blocks a host; see the Node's Events)", None


@dataclass(frozen=True)
class NodeIndex:
    """Nodes grouped by (newest agent pod's plan digest, last applied digest, agent failing)."""

    labels: dict[str, dict[str, str]]
    groups: dict[tuple[str | None, str | None, bool], list[str]]
    problems: dict[str, str]
    recheck_at: float | None = None  # wall time when a grace period ends and the index should be rebuilt

    @classmethod
    def build(
        cls, nodes: Mapping[str, dict[str, str]], pods: Mapping[str, dict[str, Any]], applied: Mapping[str, str | None], now: float
    ) -> NodeIndex:
        """Group `nodes` (name -> labels) by what their agents run (`pods`: node -> newest pod) and applied."""
        groups: dict[tuple[str | None, str | None, bool], list[str]] = {}
        problems: dict[str, str] = {}
        recheck: float | None = None
        for node in sorted(nodes):
            pod = pods.get(node)
            reason, again = agent_not_ready_reason(pod, now) if pod is not None else (None, None)
            if again is not None:
                recheck = again if recheck is None else min(recheck, again)
            if reason:
                problems[node] = reason
            key = (pod["digest"] if pod is not None else None, applied.get(node), reason is not None)
            groups.setdefault(key, []).append(node)
        return cls(labels=dict(nodes), groups=groups, problems=problems, recheck_at=recheck)


@dataclass(frozen=True)
class NodeRollout:
    """Where a mirror's node configuration stands."""

    enabled: bool
    desired: int = 0
    updated: int = 0
    ready: int = 0
    not_ready: tuple[str, ...] = ()
    problems: tuple[str, ...] = ()  # e.g. preflight failures reported by agents
    removing: bool = False

    @property
    def configured(self) -> bool:
        """Every selected node applied the mirror's current configuration (or nothing is to be configured)."""
        return not self.enabled or (not self.problems and self.ready >= self.desired)


def node_rollout(
    index: NodeIndex,
    history: PlanHistory,
    want: str | Carried | None,
    mirror: str,
    selector: LabelSelector | None,
    *,
    removing: bool = False,
) -> NodeRollout:
    """Desired/updated/ready nodes for one mirror.

    `want` is the digest of the mirror's current entry (None while it is being
    removed: a plan without it is what nodes must reach; NOT_IN_PLAN before its
    first entry, which no node carries). updated: the node's
    newest agent pod carries `want`. ready: the last agent pod that was Ready on
    the node applied it, so the files are in place. Another mirror's rollout
    replaces every agent pod, but the old pod's files stay until the new one is
    Ready: that must not flap this mirror's status.
    """
    if selector is None:
        return NodeRollout(enabled=False)
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
        # Between an old agent pod's deletion and its successor's creation the node still runs what the old one applied.
        carried = newest if newest is not None else applied
        if carried is not None and history.carries(carried, mirror) == want:
            updated += len(members)
        if failing:
            # A preflight failure means containerd ignores the files, whatever they say.
            problems += [f"{n}: {index.problems[n]}" for n in members[:5]]
        elif applied is not None and history.carries(applied, mirror) == want:
            ready += len(members)
            continue
        waiting += members[:MAX_NAMES]
    return NodeRollout(
        enabled=True,
        desired=desired,
        updated=updated,
        ready=ready,
        not_ready=tuple(heapq.nsmallest(MAX_NAMES, waiting)),
        problems=tuple(sorted(problems)[:5]),
        removing=removing,
    )
