"""The agent's side of the nodes' credentials: read them from the mounted Secret, put them in the node's files.

The operator mounts regmirror-agent-credentials (one key per mirror, root-only) into
the agent's pods; the node plan names the revision each mirror's nodes must
send. This module reads, for each mirror the plan gives a revision, the
matching Authorization value, and hands the pure part
(render/nodeauth.py) the node's hosts.toml files to add it to. For CRI-O it
writes the containers-auth.json CRI-O reads on every pull (`apply_crio_auth`),
or reports, per mirror, why CRI-O cannot get the credential
(CredentialUnsupported). Nothing read here is ever logged: findings name
mirrors, endpoints and paths only.
"""

from __future__ import annotations

import json
import posixpath
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from regmirror.agent.files import PRIVATE_MODE, atomic_write, on_host, symlink_on_the_way
from regmirror.agent.preflight import CRIO_CONFIG, crio_image_settings
from regmirror.render import nodeauth
from regmirror.render.nodefiles import HOSTS_TOML, NodeFiles, containerd_route_dirs
from regmirror.render.nodeinput import RUNTIME_CONTAINERD, RUNTIME_CRIO, Finding

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


@dataclass
class CrioAuthResult:
    """What `apply_crio_auth` did on the node."""

    findings: list[Finding] = field(default_factory=list)
    written: bool = False
    removed: bool = False
    error: str | None = None


def _unsupported(names: set[str], why: str) -> list[Finding]:
    return [
        Finding(
            "CredentialUnsupported", f"mirror {name}: CRI-O on this node cannot get its credential: {why}", mirror=name, blocks_node=True
        )
        for name in sorted(names)
    ]


def held_only_by_restricted(findings: list[Finding], plan_text: str) -> list[Finding]:
    """Credential findings as they count for the node: an Open mirror serves a node without its credential, so its
    findings are reported and do not hold the node back; a Restricted one (`authRequired`) answers 401 without it."""
    required = nodeauth.plan_auth_required(plan_text)
    return [f if f.mirror is None or f.mirror in required else replace(f, blocks_node=False) for f in findings]


def apply_crio_auth(
    node_files: NodeFiles,
    plan_text: str,
    auth_dir: Path | None,
    *,
    host_root: Path,
    auth_file: str = nodeauth.CRIO_AUTH_FILE,
) -> CrioAuthResult:
    """Write (or remove) the CRI-O auth file with the plan's mirrors' credentials; report what stops CRI-O from reading it.

    CRI-O reads `auth_file` only while its global_auth_file is empty (the
    default) or names that file; another value, or a file there that is not
    ours, is a per-mirror CredentialUnsupported finding and nothing is
    written (never an admin's file, never a file CRI-O does not read).
    """
    result = CrioAuthResult()
    target = on_host(host_root, auth_file)
    routes = [route for (_host, runtime), route in sorted(node_files.routes.items()) if runtime == RUNTIME_CRIO]
    revisions = nodeauth.plan_auth_revisions(plan_text)
    crio_mirrors = {m.name for route in routes for m in route.mirrors if RUNTIME_CRIO in m.runtimes}
    revisions = {name: rev for name, rev in revisions.items() if name in crio_mirrors}

    foreign_why: str | None = None
    previous: dict[str, str] = {}
    try:
        blocker = symlink_on_the_way(target, host_root)
        if blocker is not None or target.is_symlink() or (target.exists() and not target.is_file()):
            foreign_why = f"{blocker or auth_file} is a symlink or not a regular file; nothing is written through it"
        elif target.exists():
            owned = nodeauth.read_owned_crio_auth(target.read_text(errors="replace"))
            if owned is None:
                foreign_why = f"{auth_file} exists and is not the agent's (`podman login` as root writes it); it is left untouched"
            else:
                previous = owned
    except OSError as exc:
        foreign_why = f"{auth_file} cannot be read ({exc.strerror or exc})"

    if not revisions:
        if foreign_why is None and target.is_file():
            result.removed = _remove(target, result)
        return result

    creds = read_credentials(auth_dir, revisions)
    decision = nodeauth.plan_crio_auth(routes, creds.values, creds.pending, previous)
    result.findings += decision.findings
    configured = (crio_image_settings(host_root) or {}).get("global_auth_file", "")
    if configured not in ("", auth_file):
        why = (
            f"its global_auth_file ({CRIO_CONFIG} or crio.conf.d) is {configured!r}, so it reads credentials only from that file, "
            f"which the agent does not write; unset global_auth_file (CRI-O then reads {auth_file}) and restart CRI-O"
        )
        result.findings += _unsupported(decision.needed, why)
        return result
    if foreign_why is not None:
        result.findings += _unsupported(decision.needed, foreign_why + f"; move its entries elsewhere and remove {auth_file}")
        return result
    if not decision.auths:
        if target.is_file():
            result.removed = _remove(target, result)
        return result
    if not target.parent.parent.is_dir():
        # /run/containers is the DaemonSet's hostPath: without it a file here would land in the agent's own
        # filesystem, where CRI-O never looks.
        why = f"{posixpath.dirname(posixpath.dirname(auth_file))} is not mounted into the agent, so CRI-O would never see the file"
        result.findings += _unsupported(decision.needed, why)
        return result
    text = nodeauth.render_crio_auth(decision.auths)
    try:
        if target.is_file() and target.read_text() == text and (target.stat().st_mode & 0o777) == PRIVATE_MODE:
            return result
        target.parent.mkdir(mode=0o700, exist_ok=True)
        atomic_write(target, text, PRIVATE_MODE)
        result.written = True
    except OSError as exc:
        result.error = f"{auth_file}: {exc.strerror or exc}"
        result.findings += _unsupported(decision.needed, f"{auth_file} cannot be written ({exc.strerror or exc})")
    return result


def _remove(target: Path, result: CrioAuthResult) -> bool:
    try:
        target.unlink()
    except FileNotFoundError:
        return False
    except OSError as exc:
        result.error = f"{target}: cannot remove: {exc.strerror or exc}"
        return False
    return True
