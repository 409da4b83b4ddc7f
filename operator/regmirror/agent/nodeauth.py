"""The agent's side of the nodes' credentials: read them from the mounted Secret, put them in the node's files.

The operator mounts regmirror-agent-credentials (one key per mirror, root-only) into
the agent's pods; the node plan names the revision each mirror's nodes must
send. This module reads, for each mirror the plan gives a revision, the
matching Authorization value, and hands the pure part
(render/nodeauth.py) the node's hosts.toml files to add it to. Nothing read
here is ever logged: findings name mirrors and revisions only.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from regmirror.agent.files import on_host
from regmirror.render import nodeauth
from regmirror.render.nodefiles import HOSTS_TOML, NodeFiles, containerd_route_dirs
from regmirror.render.nodeinput import RUNTIME_CONTAINERD

DEFAULT_AUTH_DIR = Path("/etc/regmirror/node-auth")
MAX_ENTRY_BYTES = 64 * 1024
_KEY_RE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


@dataclass(frozen=True)
class NodeCredentials:
    """For the plan's revisions: the values this node holds, and the mirrors it cannot serve a credential yet."""

    values: Mapping[str, str]
    pending: frozenset[str]


def read_credentials(auth_dir: Path | None, revisions: Mapping[str, int]) -> NodeCredentials:
    """Each mirror's Authorization for the revision the plan names, from the mounted Secret."""
    values: dict[str, str] = {}
    pending: set[str] = set()
    for name, revision in sorted(revisions.items()):
        value = None
        if auth_dir is not None and _KEY_RE.fullmatch(name):
            try:
                path = auth_dir / name
                if path.stat().st_size <= MAX_ENTRY_BYTES:
                    raw = json.loads(path.read_text())
                    candidate = raw.get("authorizations", {}).get(str(revision)) if isinstance(raw, dict) else None
                    value = candidate if nodeauth.is_authorization(candidate) else None
            except (OSError, ValueError, AttributeError, RecursionError):
                value = None
        if value is None:
            pending.add(name)
        else:
            values[name] = value
    return NodeCredentials(values, frozenset(pending))


def add_to_files(
    node_files: NodeFiles,
    plan_text: str,
    auth_dir: Path | None,
    *,
    host_root: Path,
    containerd_config_path: str,
) -> nodeauth.CredentialResult:
    """Put the plan's credentials into `node_files` (in place); returns the private paths and the findings."""
    revisions = nodeauth.plan_auth_revisions(plan_text)
    if not revisions:
        return nodeauth.CredentialResult()
    creds = read_credentials(auth_dir, revisions)
    root = containerd_config_path.rstrip("/")
    existing = {
        f"{root}/{d}/{HOSTS_TOML}"
        for (host, runtime) in node_files.routes
        if runtime == RUNTIME_CONTAINERD
        for d in containerd_route_dirs(host)
        if on_host(host_root, f"{root}/{d}/{HOSTS_TOML}").is_file()
    }
    routed = {m.name for route in node_files.routes.values() for m in route.mirrors}
    return nodeauth.add_credentials(
        node_files,
        {n: v for n, v in creds.values.items() if n in routed},
        creds.pending & routed,
        containerd_config_path=containerd_config_path,
        existing=existing,
    )
