"""Counting what a user wrote, from the API server's audit log.

Timestamps are the audit log's own (``requestReceivedTimestamp``, RFC 3339 with
microseconds, UTC), so a window is "every request the API server received from
``since`` on", independent of when a test looked.
"""

from __future__ import annotations

import datetime
from collections import Counter
from typing import Any

from harness.cluster import LocalCluster


def now() -> str:
    """The current time in the audit log's format, to open a counting window."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def writes(
    cluster: LocalCluster,
    user: str,
    since: str,
    until: str | None = None,
    *,
    resource: str | None = None,
    name: str | None = None,
    leases: bool = False,
) -> list[dict[str, Any]]:
    """Completed writes by ``user`` received in [since, until), optionally on one resource or object name.

    The leader's Lease renewals (one every retry period, 2 s: leader election's heartbeat,
    not reconciling work) are left out unless ``leases`` or ``resource="leases"``.
    """
    found = []
    for event in cluster.write_events(user, since=since):
        ref = event.get("objectRef") or {}
        if until is not None and event.get("requestReceivedTimestamp", "") >= until:
            continue
        if ref.get("resource") == "leases" and not leases and resource != "leases":
            continue
        if resource is not None and ref.get("resource") != resource:
            continue
        if name is not None and ref.get("name") != name:
            continue
        found.append(event)
    return found


def summary(events: list[dict[str, Any]]) -> list[str]:
    """``verb resource[/subresource] namespace/name -> code`` lines with counts, for failure messages;
    a mirror's status write also says what its conditions were (the policy logs those bodies)."""
    counts: Counter[str] = Counter()
    for event in events:
        ref = event.get("objectRef") or {}
        resource = ref.get("resource", "") + (f"/{ref['subresource']}" if ref.get("subresource") else "")
        code = (event.get("responseStatus") or {}).get("code")
        line = f"{event.get('verb')} {resource} {ref.get('namespace', '')}/{ref.get('name', '')} -> {code}"
        counts[line + conditions_written(event)] += 1
    return [f"{count}x {line}" for line, count in sorted(counts.items())]


def conditions_written(event: dict[str, Any]) -> str:
    """`` [Ready=True/AllNodesConfigured, ...]`` for a status write logged with its body, else ``""``."""
    status = (event.get("requestObject") or {}).get("status")
    if not isinstance(status, dict):
        return ""
    conditions = [cd for cd in status.get("conditions") or [] if isinstance(cd, dict)]
    return " [" + ", ".join(f"{cd.get('type')}={cd.get('status')}/{cd.get('reason')}" for cd in conditions) + "]"
