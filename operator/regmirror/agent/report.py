"""What one agent step tells people: a per-mirror report, readiness, and which findings are new.

Readiness is per node and drives the DaemonSet rollout, so it goes false only
for what stops this node from applying the plan (its runtime will not read
the files, a write failed, a foreign file holds one of the registry's own
directories). A defect of one mirror's data (bad CA bytes, a rejected entry,
an unreachable endpoint) is that mirror's, not the node's: the node stays
Ready with the other mirrors applied, and the mirror is named in an Event on
the Node and in this report, whose JSON shape (served at /report) is:

    {"node": str, "plan": str,               # sha256[:16] of the plan text = NodePlan.digest()
     "ready": bool, "reason": str, "message": str,
     "mirrors": {name: {"state": MirrorState, "findings": [{"reason": str, "message": str}]}},
     "hosts": {"<runtime>/<host>": {"state": "Routed" | "Blocked", "strict": bool,
                                    "server": str, "mirrors": [name, ...]}},
     "findings": [{"reason": str, "message": str, "host": str | null}],  # not about one mirror
     "dialTimeout": str | null,               # what hosts.toml gives the mirrors (null: containerd has none)
     "docker": {"present": bool, "reloadPending": bool} | null,
     "startupTaint": str | null}              # why the taint is held, "removed", or null (never seen)

MirrorState: Applied (in this node's files), Degraded (in the files, with
findings: e.g. its CA was left out or one of its hosts rejected), Withdrawn
(AllowUpstream, not answering: pulls go upstream), Unreachable
(NeverContactUpstream, not answering: kept, pulls fail), Rejected (its entry
failed its checks: not used; a strict one blocks its hosts), NotSelected
(its node selector does not match this node).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from regmirror.render.nodefiles import NodeFiles
from regmirror.render.nodeinput import CheckedPlan, Finding, selected_mirrors

MAX_NAMED = 10  # mirrors named in the readiness message; /report has them all


@dataclass(frozen=True)
class Verdict:
    """The node's readiness after a step."""

    ready: bool
    reason: str
    message: str


def plan_digest(text: str) -> str:
    """The digest the operator puts on the agent's pod template (NodePlan.digest() of the same JSON)."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def mirror_states(
    plan: CheckedPlan,
    plan_names: Iterable[str],
    labels: Mapping[str, str],
    node_files: NodeFiles,
    unhealthy: frozenset[str],
) -> dict[str, dict[str, Any]]:
    """Each mirror of the plan (by the name it was listed under) and what this node made of it."""
    selected = {m.name for m in selected_mirrors(plan, labels)}
    usable = {m.name: m for m in plan.mirrors}
    by_mirror: dict[str, list[Finding]] = {}
    for finding in node_files.findings:
        if finding.mirror is not None:
            by_mirror.setdefault(finding.mirror, []).append(finding)
    routed_hosts = {host for (host, _runtime), route in node_files.routes.items() if route.mirrors}
    report: dict[str, dict[str, Any]] = {}
    for name in plan_names:
        mirror = usable.get(name)
        found = by_mirror.get(name, [])
        if mirror is None:
            state = "Rejected"
        elif name not in selected:
            state = "NotSelected"
        elif name in unhealthy:
            state = "Unreachable" if mirror.strict else "Withdrawn"
        elif found or not set(mirror.hosts) & routed_hosts:
            state = "Degraded"
        else:
            state = "Applied"
        report[name] = {"state": state, "findings": [{"reason": f.reason, "message": f.message} for f in found]}
    return report


def host_states(node_files: NodeFiles) -> dict[str, dict[str, Any]]:
    """Each routed host per runtime: where it goes."""
    return {
        f"{runtime}/{host}": {
            "state": "Blocked" if route.blocked else "Routed",
            "strict": route.strict,
            "server": route.server,
            "mirrors": [m.name for m in route.mirrors],
        }
        for (host, runtime), route in sorted(node_files.routes.items())
    }


def verdict(
    *,
    errors: list[str],
    preflight_ok: bool,
    preflight_message: str,
    blocking: list[str],
    files: int,
    mirrors: int,
    degraded: list[str],
) -> Verdict:
    """Readiness: node-level problems first; a mirror's own defects never make the node unready."""
    if errors:
        return Verdict(False, "ApplyFailed", "; ".join(errors))
    if not preflight_ok:
        return Verdict(False, "PreflightFailed", preflight_message)
    if blocking:
        return Verdict(False, "ForeignFileSkipped", "; ".join(blocking))
    message = f"{files} file(s) for {mirrors} mirror(s)"
    if degraded:
        shown = degraded[:MAX_NAMED] + ([f"{len(degraded) - MAX_NAMED} more (see /report)"] if len(degraded) > MAX_NAMED else [])
        message += "; not as planned: " + "; ".join(shown)
    return Verdict(True, "Applied", message)


def finding_key(finding: Finding) -> tuple[str, str]:
    """What makes a finding the same one next step (so its Event is posted once, not every 2 s)."""
    return (finding.reason, finding.message)
