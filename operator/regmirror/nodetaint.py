"""The startup taint: no pod lands on a node before its registry configuration is live.

Opt-in: whoever provisions the node registers it with the taint
`regmirror.dev/registry-config-pending:NoSchedule` (kubelet
`--register-with-taints`, Karpenter `startupTaints`, a cloud node group's
taints). Nothing in regmirror ever adds it.

Who removes it, and when (stdlib only: the agent imports this too):
- the node's own agent, as soon as its files for every mirror that selects the
  node are written, the runtime will read them (preflight), and those mirrors
  answer (`agent_may_lift`). It patches only its own Node, removing only this
  taint; an admission policy holds it to exactly that
  (manifests/rbac/agent-node-policy.yaml);
- the operator, when the taint has been on a node for longer than the timeout
  (`REGMIRROR_STARTUP_TAINT_TIMEOUT_SECONDS`, default 300), whatever the
  reason (no agent could start, a mirror never answered), with a Warning
  Event on the Node, so a node is never held forever (`expired`).

DaemonSets that must run before the node is configured (the agent itself,
CNI, kube-proxy) need a toleration for the taint; the agent's DaemonSet
tolerates everything.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

TAINT_KEY: Final = "regmirror.dev/registry-config-pending"
TAINT_EFFECT: Final = "NoSchedule"
DEFAULT_TIMEOUT_SECONDS: Final = 300.0
# Event reasons on the Node.
LIFTED_REASON: Final = "RegistryConfigured"
TIMED_OUT_REASON: Final = "RegistryConfigTimedOut"


def has_startup_taint(taints: Iterable[Mapping[str, Any]] | None) -> bool:
    """Whether a Node's taints include ours (any effect: the key is what is registered)."""
    return any(isinstance(t, Mapping) and t.get("key") == TAINT_KEY for t in taints or ())


def without_startup_taint(taints: Iterable[Mapping[str, Any]] | None) -> list[dict[str, Any]]:
    """The taints with ours removed, order kept."""
    return [dict(t) for t in taints or () if isinstance(t, Mapping) and t.get("key") != TAINT_KEY]


def removal_patch(taints: Iterable[Mapping[str, Any]] | None) -> list[dict[str, Any]]:
    """A JSON patch that removes our taint only if the taints are still `taints` (a concurrent change fails it)."""
    current = [dict(t) for t in taints or () if isinstance(t, Mapping)]
    return [
        {"op": "test", "path": "/spec/taints", "value": current},
        {"op": "replace", "path": "/spec/taints", "value": without_startup_taint(current)},
    ]


def agent_may_lift(*, ready: bool, selected: Iterable[str], unhealthy: Iterable[str]) -> tuple[bool, str]:
    """Whether the agent may remove the taint: its files applied and readable (`ready`), every selected mirror answering.

    A node no mirror selects is configured by definition. Returns (lift?, why not / what was done).
    """
    if not ready:
        return False, "the node's registry files are not applied yet"
    down = sorted(set(selected) & set(unhealthy))
    if down:
        return False, f"mirror(s) not answering yet: {', '.join(down[:5])}"
    return True, "the node's registry files are applied and its mirrors answer"


def _epoch(timestamp: str | None) -> float | None:
    if not timestamp:
        return None
    try:
        return datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


@dataclass(frozen=True)
class Deadline:
    """One tainted node and when the operator lifts its taint."""

    node: str
    due: float  # epoch seconds


def deadline(node: Mapping[str, Any], first_seen: float | None, timeout: float) -> Deadline | None:
    """When the operator removes the taint from `node` (None: it has none).

    The clock starts at the node's creation, or when the operator first saw
    the taint if that is later (a taint an admin added to an old node, or an
    operator that started after the node): a restarted operator may wait up
    to one more timeout, never less than one.
    """
    if not has_startup_taint(((node.get("spec") or {}).get("taints")) or ()):
        return None
    meta = node.get("metadata") or {}
    created = _epoch(meta.get("creationTimestamp"))
    starts = [t for t in (created, first_seen) if t is not None]
    return Deadline(str(meta.get("name", "")), (max(starts) if starts else 0.0) + timeout)


def expired(
    nodes: Iterable[Mapping[str, Any]], first_seen: Mapping[str, float], now: float, timeout: float
) -> tuple[list[str], float | None]:
    """(nodes whose taint is overdue, the earliest future deadline to wake up for) at `now`."""
    overdue: list[Deadline] = []
    upcoming: list[Deadline] = []
    for node in nodes:
        name = str((node.get("metadata") or {}).get("name", ""))
        found = deadline(node, first_seen.get(name), timeout)
        if found is None:
            continue
        (overdue if found.due <= now else upcoming).append(found)
    return sorted(d.node for d in overdue), min((d.due for d in upcoming), default=None)


def timed_out_message(timeout: float) -> str:
    """The Warning Event's message when the operator lifts the taint."""
    return (
        f"{TAINT_KEY} removed after {timeout:.0f}s although the node's registry configuration was not confirmed "
        "(its regmirror agent did not start, or a mirror did not answer): pods may pull without the mirror until it is"
    )


def lift_overdue(
    nodes: Iterable[Mapping[str, Any]],
    first_seen: dict[str, float],
    now: float,
    timeout: float,
    patch_node: Callable[[str, list[dict[str, Any]]], None],
    post_event: Callable[[Mapping[str, Any], str, str], None],
) -> tuple[list[str], float | None]:
    """The operator's part: remove the taint from every node that kept it past `timeout`, with a Warning Event.

    `first_seen` (node name -> when this operator first saw the taint) is
    updated in place: the caller keeps it between calls and calls again at the
    returned wake-up time (or on any node event). `patch_node(name, json_patch)`
    and `post_event(node, reason, message)` are the API calls (the caller's
    client, as the operator's ServiceAccount). A patch that fails (the taints
    changed meanwhile, HTTP 422) is left for the next call. Returns (nodes
    lifted, next wake-up).
    """
    by_name = {str((n.get("metadata") or {}).get("name", "")): n for n in nodes}
    for name, node in by_name.items():
        if has_startup_taint(((node.get("spec") or {}).get("taints")) or ()):
            first_seen.setdefault(name, now)
        else:
            first_seen.pop(name, None)
    for gone in set(first_seen) - set(by_name):
        del first_seen[gone]
    overdue, wake = expired(by_name.values(), first_seen, now, timeout)
    lifted = []
    for name in overdue:
        node = by_name[name]
        try:
            patch_node(name, removal_patch((node.get("spec") or {}).get("taints")))
        except Exception:  # the taints changed under us, or the API is away: next call
            continue
        lifted.append(name)
        first_seen.pop(name, None)
        post_event(node, TIMED_OUT_REASON, timed_out_message(timeout))
    return lifted, wake
