"""PURE: one node's registry files from the node plan.

The agent on every node calls `render_node_files` with the plan, its node's
labels and the mirrors its probes found dead, and gets back `{host path:
content}`. Everything a runtime will read is decided here, so the unit tests
can pin the exact bytes and the agent only has to write them.

containerd (1.6, 1.7, 2.x) reads `<config_path>/<host dir>/hosts.toml`: the
`[host."..."]` entries are tried in file order, then `server`. When `server`
is absent containerd falls back to the registry host itself, so a host that
must never reach its upstream (NeverContactUpstream) gets a mirror as its
`server` too. CRI-O reads a `registries.conf.d` drop-in (containers-registries.conf(5),
v2 syntax): `[[registry.mirror]]` entries are tried in order, then `location`;
for a strict host `location` is a mirror as well.

The plan is typed structurally (`PlanLike`), so the pydantic `NodePlan` and the
agent's lean reader of the same JSON both fit; the agent avoids pydantic to
keep its memory small.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

from regmirror import constants as c

NEVER_CONTACT_UPSTREAM = "NeverContactUpstream"
RUNTIME_CONTAINERD = "containerd"
RUNTIME_CRIO = "crio"
HOSTS_TOML = "hosts.toml"


class SelectorLike(Protocol):
    def matches(self, labels: dict[str, str]) -> bool: ...


class MirrorLike(Protocol):
    """What rendering needs of a plan entry (regmirror.nodeplan.MirrorEntry fits)."""

    @property
    def name(self) -> str: ...
    @property
    def hosts(self) -> Sequence[str]: ...
    @property
    def servers(self) -> Mapping[str, str]: ...
    @property
    def url(self) -> str: ...
    @property
    def priority(self) -> int: ...
    @property
    def capabilities(self) -> Sequence[str]: ...
    @property
    def fallback(self) -> str: ...
    @property
    def runtimes(self) -> Sequence[str]: ...
    @property
    def node_selector(self) -> SelectorLike: ...
    @property
    def ca_pem(self) -> str | None: ...


class PlanLike(Protocol):
    """What rendering needs of the plan (regmirror.nodeplan.NodePlan fits)."""

    @property
    def mirrors(self) -> Sequence[MirrorLike]: ...


@dataclass(frozen=True)
class HostRoute:
    """The mirrors one runtime uses for one registry host on this node, in try order."""

    host: str
    server: str
    mirrors: tuple[MirrorLike, ...]
    strict: bool


def _str(value: Any) -> str:
    """An enum member's value or a plain string (both plan readers are accepted)."""
    return str(getattr(value, "value", value))


def _toml_string(value: str) -> str:
    # A JSON string literal is a valid TOML basic string (same escapes, \\uXXXX included).
    return json.dumps(value)


def _toml_list(values: Iterable[str]) -> str:
    return "[" + ", ".join(_toml_string(v) for v in values) + "]"


def _order(mirror: MirrorLike) -> tuple[int, str]:
    return (-mirror.priority, mirror.name)


def is_strict(mirror: MirrorLike) -> bool:
    """Whether this mirror forbids nodes to contact the upstream."""
    return _str(mirror.fallback) == NEVER_CONTACT_UPSTREAM


def selected_mirrors(plan: PlanLike, node_labels: Mapping[str, str]) -> list[MirrorLike]:
    """Mirrors whose node selector matches this node, in the order nodes try them."""
    labels = dict(node_labels)
    return sorted((m for m in plan.mirrors if m.node_selector.matches(labels)), key=_order)


def host_routes(
    plan: PlanLike,
    node_labels: Mapping[str, str],
    runtime: str,
    unhealthy: frozenset[str] = frozenset(),
) -> list[HostRoute]:
    """Per registry host: the mirrors `runtime` should use on this node.

    A host is strict when any of its mirrors is NeverContactUpstream. Unhealthy
    AllowUpstream mirrors are withdrawn; strict mirrors are kept even when down
    (the runtime must fail rather than reach the upstream). A host left with no
    mirror is omitted, so the runtime's default (straight to the upstream) applies.
    """
    by_host: dict[str, list[MirrorLike]] = {}
    for mirror in selected_mirrors(plan, node_labels):
        if runtime not in {_str(r) for r in mirror.runtimes}:
            continue
        for host in mirror.hosts:
            by_host.setdefault(host, []).append(mirror)
    routes = []
    for host in sorted(by_host):
        candidates = by_host[host]
        strict = any(is_strict(m) for m in candidates)
        usable = tuple(m for m in candidates if is_strict(m) or m.name not in unhealthy)
        if not usable:
            continue
        server = candidates[0].servers.get(host) or default_server(host)
        routes.append(HostRoute(host=host, server=server, mirrors=usable, strict=strict))
    return routes


def default_server(host: str) -> str:
    """The registry containerd would contact for `host` without any configuration."""
    return c.DOCKER_HUB_SERVER if host == c.DOCKER_HUB_NAME else f"https://{host}"


def containerd_host_dir(host: str) -> str:
    """The directory name under config_path that containerd looks up first for `host`.

    containerd's hostPaths (remotes/docker/config) tries `host_port_` before
    `host:port` for a host with a port, in 1.6, 1.7 and 2.x alike (verified
    against the real daemons in tests/e2e/test_agent_containerd.py). Writing the
    first one means no other spelling can shadow ours.
    """
    idx = host.rfind(":")
    if idx > 0:
        return f"{host[:idx]}_{host[idx + 1 :]}_"
    return host


def containerd_host_dir_aliases(host: str) -> list[str]:
    """Every directory name containerd tries for `host` before `_default`, in lookup order."""
    first = containerd_host_dir(host)
    return [first] if first == host else [first, host]


def _ca_file_name(mirror: MirrorLike) -> str:
    return f"{mirror.name}-ca.crt"


def _host_block(mirror: MirrorLike, host_dir_path: str) -> list[str]:
    lines = [f"capabilities = {_toml_list(_str(cap) for cap in mirror.capabilities)}"]
    if mirror.ca_pem:
        lines.append(f"ca = {_toml_string(host_dir_path + '/' + _ca_file_name(mirror))}")
    return lines


def render_hosts_toml(route: HostRoute, host_dir_path: str) -> str:
    """containerd's hosts.toml for one registry host (valid for containerd 1.6, 1.7 and 2.x)."""
    lines = [c.OWNERSHIP_MARKER]
    names = ", ".join(m.name for m in route.mirrors)
    if route.strict:
        # containerd tries every [host] entry, then `server`, and without
        # `server` the registry itself: so `server` is a mirror too and nothing
        # in this file leads to the upstream. The mirrors stay [host] entries
        # as well, because containerd 1.6 rejects a hosts.toml without any
        # [host] table ("invalid `host` tree") and then silently falls back
        # to the upstream.
        lines += [
            f"# {route.host}: NeverContactUpstream. Only the mirrors ({names}) are used, never {route.server}.",
            f"server = {_toml_string(route.mirrors[0].url)}",
            *_host_block(route.mirrors[0], host_dir_path),
        ]
    else:
        lines += [
            f"# {route.host}: mirrors ({names}) first, then the upstream.",
            f"server = {_toml_string(route.server)}",
        ]
    for mirror in route.mirrors:
        lines += ["", f"[host.{_toml_string(mirror.url)}]", *("  " + line for line in _host_block(mirror, host_dir_path))]
    return "\n".join(lines) + "\n"


def render_ca_file(mirror: MirrorLike) -> str:
    """The mirror's CA bundle as an owned file (PEM parsers skip the marker line)."""
    pem = (mirror.ca_pem or "").strip()
    return f"{c.OWNERSHIP_MARKER}\n{pem}\n"


def _registry_location(url_or_host: str) -> str:
    """host[:port] as registries.conf writes locations (no scheme)."""
    return urlsplit(url_or_host).netloc if "://" in url_or_host else url_or_host


def _pull_from_mirror(mirror: MirrorLike) -> str:
    caps = {_str(cap) for cap in mirror.capabilities}
    if caps >= {"pull", "resolve"}:
        return "all"
    return "digest-only" if "pull" in caps else "tag-only"


def render_crio_dropin(routes: Sequence[HostRoute]) -> str:
    """A registries.conf.d drop-in (containers-registries.conf(5), v2) for these routes."""
    lines = [c.OWNERSHIP_MARKER, "# Registry mirrors rolled out by the regmirror agent."]
    for route in routes:
        upstream = route.host if route.host == c.DOCKER_HUB_NAME else _registry_location(route.server)
        if route.strict:
            # `blocked` would also block the mirrors, so the primary location
            # itself is a mirror: no entry leads to the upstream.
            *mirrors, last = route.mirrors
            location, insecure = _registry_location(last.url), urlsplit(last.url).scheme == "http"
            comment = f"# {route.host}: NeverContactUpstream. Only mirrors are used, never {route.server}."
        else:
            mirrors = list(route.mirrors)
            location, insecure = upstream, urlsplit(route.server).scheme == "http"
            comment = f"# {route.host}: mirrors first, then the upstream."
        lines += ["", comment, "[[registry]]", f"prefix = {_toml_string(route.host)}", f"location = {_toml_string(location)}"]
        if insecure:
            lines.append("insecure = true")
        for mirror in mirrors:
            lines += [
                "",
                "[[registry.mirror]]",
                f"location = {_toml_string(_registry_location(mirror.url))}",
                f"insecure = {'true' if urlsplit(mirror.url).scheme == 'http' else 'false'}",
                f"pull-from-mirror = {_toml_string(_pull_from_mirror(mirror))}",
            ]
    return "\n".join(lines) + "\n"


def render_node_files(
    plan: PlanLike,
    node_labels: Mapping[str, str],
    *,
    unhealthy: frozenset[str] = frozenset(),
    containerd_config_path: str = c.CONTAINERD_CONFIG_PATH,
    crio_dropin_dir: str = c.CRIO_DROPIN_DIR,
) -> dict[str, str]:
    """Every file this node should have: absolute host path -> content.

    Paths are host paths (what containerd and CRI-O read), not prefixed with the
    agent's host root. Each file starts with the ownership marker.
    """
    files: dict[str, str] = {}
    root = containerd_config_path.rstrip("/")
    for route in host_routes(plan, node_labels, RUNTIME_CONTAINERD, unhealthy):
        host_dir_path = f"{root}/{containerd_host_dir(route.host)}"
        files[f"{host_dir_path}/{HOSTS_TOML}"] = render_hosts_toml(route, host_dir_path)
        for mirror in route.mirrors:
            if mirror.ca_pem:
                files[f"{host_dir_path}/{_ca_file_name(mirror)}"] = render_ca_file(mirror)
    crio_routes = host_routes(plan, node_labels, RUNTIME_CRIO, unhealthy)
    if crio_routes:
        files[f"{crio_dropin_dir.rstrip('/')}/{c.CRIO_DROPIN_FILE}"] = render_crio_dropin(crio_routes)
    return files


def render_docker_daemon_json(
    plan: PlanLike,
    node_labels: Mapping[str, str],
    unhealthy: frozenset[str] = frozenset(),
) -> dict[str, list[str]]:
    """The `registry-mirrors` / `insecure-registries` part of Docker's daemon.json.

    dockerd only mirrors Docker Hub and always falls back to it, so this covers
    docker.io alone and cannot express NeverContactUpstream.
    """
    mirrors = [m for m in selected_mirrors(plan, node_labels) if c.DOCKER_HUB_NAME in m.hosts and (is_strict(m) or m.name not in unhealthy)]
    return {
        "registry-mirrors": [m.url for m in mirrors],
        "insecure-registries": [_registry_location(m.url) for m in mirrors if urlsplit(m.url).scheme == "http"],
    }
