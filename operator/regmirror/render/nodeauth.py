"""PURE: the nodes' credentials in the node's own files, proven before anyone writes them.

The node plan names, per mirror, only the revision of the credential nodes
must send (`authRevision`); the values are in the agent's Secret
(regmirror-agent-credentials, mounted root-only; see regmirror/access.py). After
`render.nodefiles.plan_node_files` has rendered and checked a node's files,
`add_credentials` adds to each containerd hosts.toml, for each mirror whose
credential the node holds, its Authorization header:

    [host."http://10.96.0.10:5000".header]
      Authorization = "Basic ..."

and, for a NeverContactUpstream host whose `server` is a mirror, the same
header as the top-level `[header]` table (containerd sends a host's headers
with every request to it, `server` included). TOML lets a sub-table be
declared after others, so the headers are appended and the rest of the file
stays byte for byte what nodefiles proved; the result is parsed back and
compared with the original plus exactly the expected headers. Files that
carry a credential are listed in `private`: the agent writes them mode 0600.

A mirror whose revision the node cannot find (the Secret not mounted yet, an
older Secret): its hosts' files already on the node stay as they are (they
carry the previous credential, which the front accepts until every node has
the new one) and the node reports `CredentialPending`, so the rollout does not
count it. Where no file exists yet, the route is written without the header:
an Open mirror serves it, a Restricted one answers 401 (containerd then goes
to the next host; a strict host fails, but never reaches the upstream).

CRI-O cannot carry a header in its registries.conf. It reads credentials
from containers-auth.json, on every pull, and looks them up by the location
a request goes to, a mirror's included (containers/image
pkg/docker/config/config.go getCredentialsWithHomeDir; docker/docker_image_src.go
newImageSourceAttempt). With CRI-O's default `global_auth_file = ""` the file
is /run/containers/0/auth.json (CRI-O unsets XDG_RUNTIME_DIR when it runs as
root). `plan_crio_auth` decides its entries, one per mirror endpoint,
`render_crio_auth` renders it with an ownership key (JSON has no comment
line), and `read_owned_crio_auth` tells ours from anyone else's; the agent
(agent/nodeauth.py) writes it, or reports why CRI-O cannot get it.
"""

from __future__ import annotations

import base64
import json
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from regmirror import constants as c
from regmirror.render.nodefiles import HOSTS_TOML, HostRoute, NodeFiles, containerd_route_dirs
from regmirror.render.nodeinput import RUNTIME_CONTAINERD, RUNTIME_CRIO, Finding

HEADER: Final = "Authorization"
_AUTHORIZATION_RE = re.compile(r"Basic [A-Za-z0-9+/]{4,400}={0,2}")


def is_authorization(value: object) -> bool:
    """Whether a value may go into a node file as an Authorization header (Basic, base64 characters only)."""
    return isinstance(value, str) and _AUTHORIZATION_RE.fullmatch(value) is not None


@dataclass
class CredentialResult:
    """What `add_credentials` did: paths that now carry a credential, and what to report."""

    private: set[str] = field(default_factory=set)
    findings: list[Finding] = field(default_factory=list)
    #: Mirrors whose credential went into at least one file.
    applied: set[str] = field(default_factory=set)


def _toml_string(value: str) -> str:
    return json.dumps(value)


def _header_block(table: str, authorization: str) -> list[str]:
    return ["", f"[{table}]", f"  {HEADER} = {_toml_string(authorization)}"]


def _expected_headers(route: HostRoute, credentials: Mapping[str, str]) -> tuple[dict[str, str], str | None]:
    per_host = {m.url: credentials[m.name] for m in route.mirrors if m.name in credentials}
    server = credentials.get(route.mirrors[0].name) if route.strict and route.mirrors else None
    return per_host, server


def _check(original: str, text: str, per_host: Mapping[str, str], server: str | None) -> list[str]:
    """Problems of `text`: it must parse, and differ from `original` by exactly the expected headers."""
    try:
        before, after = tomllib.loads(original), tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        return [f"does not parse: {exc}"]
    problems = []
    if server is not None:
        if after.pop("header", None) != {HEADER: server}:
            problems.append("the top-level header is not the strict server's credential")
    elif "header" in after:
        problems.append("a top-level header where none belongs")
    hosts_after = after.get("host", {})
    for url, table in hosts_after.items():
        header = table.pop("header", None) if isinstance(table, dict) else None
        if header != ({HEADER: per_host[url]} if url in per_host else None):
            problems.append(f"[host.{url!r}] carries the wrong header")
    if after != before:
        problems.append("something besides the headers changed")
    return problems


def add_credentials(
    node_files: NodeFiles,
    credentials: Mapping[str, str],
    pending: Iterable[str] = (),
    *,
    containerd_config_path: str,
    existing: Iterable[str] = (),
) -> CredentialResult:
    """Add each mirror's header to the node's hosts.toml files (in place), proven; see the module docstring.

    `credentials`: mirror name -> Authorization value the plan's revision
    names. `pending`: mirrors the plan gives a revision the node does not
    hold. `existing`: host paths of hosts.toml files already on the node.
    """
    result = CredentialResult()
    pending_set, existing_set = set(pending), set(existing)
    usable = {name: value for name, value in credentials.items() if is_authorization(value)}
    for name in sorted(set(credentials) - set(usable)):
        pending_set.add(name)
    root = containerd_config_path.rstrip("/")
    for (host, runtime), route in sorted(node_files.routes.items()):
        if runtime != RUNTIME_CONTAINERD or route.blocked:
            continue
        waiting = sorted(m.name for m in route.mirrors if m.name in pending_set)
        per_host, server = _expected_headers(route, usable)
        for dir_name in containerd_route_dirs(host):
            path = f"{root}/{dir_name}/{HOSTS_TOML}"
            if path not in node_files.files:
                continue  # not written (kept, or left to someone else's file): nothing to add to
            if waiting and path in existing_set:
                # Keep the file the node has: it carries the credential the front still accepts.
                del node_files.files[path]
                node_files.keep.add(f"{root}/{dir_name}")
                continue
            if not per_host and server is None:
                continue
            original = node_files.files[path]
            lines = [original.rstrip("\n")]
            if server is not None:
                lines += _header_block("header", server)
            for mirror in route.mirrors:
                if mirror.url in per_host:
                    lines += _header_block(f"host.{_toml_string(mirror.url)}.header", per_host[mirror.url])
            text = "\n".join(lines) + "\n"
            problems = _check(original, text, per_host, server)
            if problems:
                # Never a file that routes differently: the node keeps what it has for this host.
                del node_files.files[path]
                node_files.keep.add(f"{root}/{dir_name}")
                result.findings.append(
                    Finding(
                        "FileNotVerified",
                        f"host {host}: credentials in {path} failed their check ({'; '.join(problems)}); the file already there is kept",
                        host=host,
                        blocks_node=True,
                    )
                )
                continue
            node_files.files[path] = text
            result.private.add(path)
            result.applied.update(m.name for m in route.mirrors if m.url in per_host)
    for name in sorted(pending_set):
        result.findings.append(
            Finding(
                "CredentialPending",
                f"mirror {name}: this node does not hold the credential the plan names yet (the agent's Secret is not mounted or not "
                "updated yet); its hosts keep the files they have, or go without a credential where there are none",
                mirror=name,
                blocks_node=True,
            )
        )
    return result


CRIO_AUTH_FILE: Final = "/run/containers/0/auth.json"
#: A top-level key marking the auth file as ours: containers/image reads only "auths" and
#: "credHelpers" and ignores the rest, and a `podman login` that rewrites the file drops it
#: (the file is then someone else's, and the agent leaves it alone).
CRIO_AUTH_OWNER_KEY: Final = "regmirror"
_ENDPOINT_RE = re.compile(r"[A-Za-z0-9.\-\[\]:]{1,300}")


def crio_endpoint(url: str) -> str:
    """The key containers/image looks a mirror's credential up by: its location, host[:port]."""
    return url.split("://", 1)[-1]


@dataclass
class CrioAuth:
    """What `plan_crio_auth` decided: the endpoints' auth values, and what to report."""

    #: endpoint (host:port) -> base64 "user:password", exactly what containers-auth.json's "auth" holds.
    auths: dict[str, str] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)
    #: Mirrors that need a credential on this node (Restricted, routed for CRI-O).
    needed: set[str] = field(default_factory=set)


def plan_crio_auth(
    routes: Iterable[HostRoute],
    credentials: Mapping[str, str],
    pending: Iterable[str] = (),
    previous: Mapping[str, str] | None = None,
) -> CrioAuth:
    """The CRI-O auth file's entries: one per endpoint of a mirror the node routes for CRI-O and holds a credential for.

    `credentials`: mirror -> Authorization of the revision the plan names.
    `pending`: mirrors with a revision the node does not hold yet: the entry
    our file already has for their endpoint (`previous`) stays, as the
    containerd headers do (the front accepts it until every node has the new
    one). A mirror without either gets no entry (a CredentialPending finding).
    Two mirrors on one endpoint with different credentials get none (no
    guessing which one the front takes).
    """
    previous = previous or {}
    pending_set = set(pending)
    out = CrioAuth()
    wanted: dict[str, dict[str, str]] = {}  # endpoint -> mirror -> auth value
    for route in routes:
        if route.blocked:
            continue
        for mirror in route.mirrors:
            if RUNTIME_CRIO not in mirror.runtimes or (mirror.name not in credentials and mirror.name not in pending_set):
                continue
            out.needed.add(mirror.name)
            endpoint = crio_endpoint(mirror.url)
            value = credentials.get(mirror.name)
            if value is not None and is_authorization(value):
                wanted.setdefault(endpoint, {})[mirror.name] = value[len("Basic ") :]
            elif endpoint in previous:
                wanted.setdefault(endpoint, {})[mirror.name] = previous[endpoint]
    for endpoint, by_mirror in sorted(wanted.items()):
        if len(set(by_mirror.values())) > 1:
            for name in sorted(by_mirror):
                out.findings.append(
                    Finding(
                        "CredentialConflict",
                        f"mirror {name}: endpoint {endpoint} is shared by mirrors {', '.join(sorted(by_mirror))} with different "
                        "credentials; CRI-O can send only one, so it gets none",
                        mirror=name,
                        blocks_node=True,
                    )
                )
            continue
        out.auths[endpoint] = next(iter(by_mirror.values()))
    return out


def render_crio_auth(auths: Mapping[str, str]) -> str:
    """containers-auth.json (containers-auth.json(5)) holding `auths` (endpoint -> base64 auth), marked as ours."""
    body = {CRIO_AUTH_OWNER_KEY: c.OWNERSHIP_MARKER.lstrip("# "), "auths": {k: {"auth": auths[k]} for k in sorted(auths)}}
    return json.dumps(body, indent=2) + "\n"


def read_owned_crio_auth(text: str) -> dict[str, str] | None:
    """The entries of an auth file we wrote (endpoint -> auth); None when it is not ours or not one we could have written."""
    try:
        raw: Any = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if not isinstance(raw, dict) or raw.get(CRIO_AUTH_OWNER_KEY) != c.OWNERSHIP_MARKER.lstrip("# "):
        return None
    if set(raw) != {CRIO_AUTH_OWNER_KEY, "auths"} or not isinstance(raw["auths"], dict):
        return None  # ours once, but someone added to it: theirs now
    out: dict[str, str] = {}
    for endpoint, entry in raw["auths"].items():
        value = entry.get("auth") if isinstance(entry, dict) and set(entry) == {"auth"} else None
        if not isinstance(value, str) or not _ENDPOINT_RE.fullmatch(endpoint) or not is_authorization(f"Basic {value}"):
            return None
        out[endpoint] = value
    return out


def basic_to_userpass(value: str) -> tuple[str, str]:
    """(username, password) of a Basic value; ValueError if it is not one."""
    if not is_authorization(value):
        raise ValueError("not a Basic credential")
    user, sep, password = base64.b64decode(value[len("Basic ") :], validate=True).decode().partition(":")
    if not sep:
        raise ValueError("not a Basic credential")
    return user, password


def plan_auth_required(plan_text: str) -> set[str]:
    """Mirrors whose plan entry says they refuse requests without the credential (`authRequired`, Restricted)."""
    try:
        raw: Any = json.loads(plan_text)
    except (ValueError, RecursionError):
        return set()
    mirrors = raw.get("mirrors") if isinstance(raw, dict) else None
    return {
        entry["name"]
        for entry in (mirrors if isinstance(mirrors, list) else [])
        if isinstance(entry, dict) and isinstance(entry.get("name"), str) and entry.get("authRequired") is True
    }


def plan_auth_revisions(plan_text: str) -> dict[str, int]:
    """Mirror name -> `authRevision` from the node plan's JSON (entries without one, or with a bad one, are left out)."""
    try:
        raw: Any = json.loads(plan_text)
    except (ValueError, RecursionError):
        return {}
    out: dict[str, int] = {}
    mirrors = raw.get("mirrors") if isinstance(raw, dict) else None
    for entry in mirrors if isinstance(mirrors, list) else []:
        if not isinstance(entry, dict):
            continue
        name, revision = entry.get("name"), entry.get("authRevision")
        if isinstance(name, str) and isinstance(revision, int) and not isinstance(revision, bool) and revision > 0:
            out[name] = revision
    return out
