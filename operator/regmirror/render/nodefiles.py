"""PURE: one node's registry files from the checked node plan, proven before anyone writes them.

The agent on every node calls `plan_node_files` with the plan (checked by
`render/nodeinput.py`), its node's labels, the mirrors its probes found dead
and what it found of other people's files, and gets back `{host path:
content}` plus the findings it must report. Everything a runtime will read is
decided here, so the unit tests can pin the exact bytes and the agent only has
to write them.

containerd (1.6, 1.7, 2.x) reads `<config_path>/<host dir>/hosts.toml`: the
`[host."..."]` entries are tried in file order, then `server`. When `server`
is absent containerd falls back to the registry host itself, so a host that
must never reach its upstream (NeverContactUpstream) gets a mirror as its
`server` too. A hosts.toml containerd cannot decode (a table declared twice,
an unknown capability) is ignored as a whole, and containerd goes straight
to the upstream: which is why `render/nodecheck.py` parses every file back
and compares it with its route before it leaves this module. CRI-O reads a
`registries.conf.d` drop-in (containers-registries.conf(5), v2 syntax):
`[[registry.mirror]]` entries are tried in order, then `location`; for a
strict host `location` is a mirror as well.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from regmirror import constants as c
from regmirror.lowlevel import DOCKER_HUB, default_registry_server, registry_host_spellings
from regmirror.render import nodecheck
from regmirror.render.nodeinput import (
    RUNTIME_CONTAINERD,
    RUNTIME_CRIO,
    RUNTIME_DOCKER,
    CheckedPlan,
    Finding,
    Mirror,
    MirrorLike,
    PlanLike,
    as_checked,
    ca_file_name,
    selected,
    selected_mirrors,
    shown,
)

HOSTS_TOML: Final = "hosts.toml"
# A strict host whose mirrors all failed their checks still gets a file: one
# that routes nothing anywhere (no endpoint may pull or resolve, and the only
# endpoint is a reserved name that never resolves, RFC 6761). Without it,
# containerd would use its default: the upstream.
BLOCKED_ENDPOINT: Final = "https://never-contact-upstream.invalid"
BLOCKED_CAPABILITIES: Final = ("push",)


# ---------------------------------------------------------------- routes


@dataclass(frozen=True)
class HostRoute:
    """The mirrors one runtime uses for one registry host on this node, in try order."""

    host: str  # canonical
    server: str  # the host's real registry (its fallback)
    mirrors: tuple[Mirror, ...]  # usable, one per endpoint
    strict: bool
    # containerd's per-host `dial_timeout` for the mirrors (a Go duration), or
    # None where the node's containerd does not know the field (before 2.0.7 / 2.1.0).
    dial_timeout: str | None = None

    @property
    def blocked(self) -> bool:
        """Strict, and no mirror can be used: nothing may be contacted at all."""
        return self.strict and not self.mirrors


def _endpoint_host(url: str) -> str:
    return url.split("://", 1)[1]


def _reaches_upstream(mirror: Mirror, host: str, server: str) -> bool:
    """Whether this 'mirror' is the host's upstream itself (a strict host must not list it)."""
    target = _endpoint_host(mirror.url)
    return target == _endpoint_host(server) or target in registry_host_spellings(host)


def host_routes(
    plan: PlanLike | CheckedPlan,
    node_labels: Mapping[str, str],
    runtime: str,
    unhealthy: frozenset[str] = frozenset(),
    findings: list[Finding] | None = None,
    dial_timeout: str | None = None,
    blocked: Iterable[str] = (),
) -> list[HostRoute]:
    """Per registry host: the mirrors `runtime` should use on this node.

    A host is strict when any of its mirrors (or strict claims) is
    NeverContactUpstream. Unhealthy AllowUpstream mirrors are withdrawn;
    strict mirrors are kept even when down (the runtime must fail rather than
    reach the upstream). Two mirrors with one endpoint give one entry (the
    first one's settings). A host left with no mirror is omitted, so the
    runtime's default (straight to the upstream) applies, unless it is
    strict: then it is blocked. A `blocked` host (settings.blockedRegistries)
    is blocked whatever mirrors it has. Findings are appended to `findings`.
    """
    checked = as_checked(plan)
    labels = dict(node_labels)
    sink = findings if findings is not None else []
    by_host: dict[str, list[Mirror]] = {}
    strict_hosts: set[str] = set()
    for mirror in checked.mirrors:
        if runtime not in mirror.runtimes or not selected(mirror.node_selector, labels):
            continue
        for host in mirror.hosts:
            by_host.setdefault(host, []).append(mirror)
            if mirror.strict:
                strict_hosts.add(host)
    for claim in checked.claims:
        if runtime in claim.runtimes and selected(claim.node_selector, labels):
            strict_hosts.update(claim.hosts)
            for host in claim.hosts:
                by_host.setdefault(host, [])
    for host in sorted(set(blocked)):
        for mirror in by_host.get(host, []):
            sink.append(
                Finding(
                    "MirrorOfBlockedRegistry",
                    f"mirror {mirror.name}: {host} is a blocked registry (settings.blockedRegistries); its mirrors are not used either",
                    mirror.name,
                    host,
                )
            )
        by_host[host] = []
        strict_hosts.add(host)
    routes = []
    for host in sorted(by_host):
        strict = host in strict_hosts
        server = checked.servers.get(host) or default_registry_server(host)
        usable: list[Mirror] = []
        endpoints: dict[str, str] = {}
        for mirror in by_host[host]:
            if not mirror.strict and mirror.name in unhealthy:
                continue
            if strict and _reaches_upstream(mirror, host, server):
                sink.append(
                    Finding(
                        "MirrorIsUpstream",
                        f"mirror {mirror.name}: its endpoint {mirror.url} is the upstream of {host}, which is NeverContactUpstream; not used there",
                        mirror.name,
                        host,
                    )
                )
                continue
            if mirror.url in endpoints:
                sink.append(
                    Finding(
                        "DuplicateEndpoint",
                        f"mirror {mirror.name}: same endpoint {mirror.url} as mirror {endpoints[mirror.url]} for {host}; listed once, with {endpoints[mirror.url]}'s settings",
                        mirror.name,
                        host,
                    )
                )
                continue
            endpoints[mirror.url] = mirror.name
            usable.append(mirror)
        if usable or strict:
            timeout = dial_timeout if runtime == RUNTIME_CONTAINERD and usable else None
            routes.append(HostRoute(host=host, server=server, mirrors=tuple(usable), strict=strict, dial_timeout=timeout))
    return routes


# ---------------------------------------------------------------- containerd


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


def containerd_route_dirs(host: str) -> list[str]:
    """The directories a route for canonical `host` is written to: one per spelling a runtime looks up.

    For Docker Hub that is docker.io (every normalised reference,
    index.docker.io/... included), registry-1.docker.io (a different name to
    the reference grammar) and index.docker.io (clients that do not
    normalise, such as ctr). Without the other two, a reference spelled
    registry-1.docker.io/library/alpine would bypass a strict mirror.
    """
    return [containerd_host_dir(spelling) for spelling in registry_host_spellings(host)]


@dataclass(frozen=True)
class ForeignCerts:
    """Docker-style certificate files someone else put where containerd looks for a host.

    Without a hosts.toml, containerd loads every *.crt of the host directory
    as a CA and every *.cert (with its *.key) as a client certificate for the
    registry itself. Once a hosts.toml exists it reads only what that file
    names, so ours must name these files (by path, never copied) or the admin
    silently loses them.
    """

    directory: str  # host path of the directory containerd read them from
    # A hosts.toml (or a symlinked directory) that is not ours, where ours
    # would replace or shadow it: the host's directory is left to it.
    hosts_toml: str | None = None
    ca: tuple[str, ...] = ()  # host paths of CA files that load
    client: tuple[tuple[str, str | None], ...] = ()  # (certificate, key or None: the key is in the certificate file)
    unusable: tuple[str, ...] = ()  # files containerd would fail on, with why


def _toml_string(value: str) -> str:
    # A JSON string literal is a valid TOML basic string (same escapes, \\uXXXX included).
    return json.dumps(value)


def _toml_list(values: Iterable[str]) -> str:
    return "[" + ", ".join(_toml_string(v) for v in values) + "]"


def _host_block(mirror: Mirror, host_dir_path: str, dial_timeout: str | None) -> list[str]:
    lines = [f"capabilities = {_toml_list(mirror.capabilities)}"]
    if mirror.ca_pem:
        lines.append(f"ca = {_toml_string(host_dir_path + '/' + ca_file_name(mirror.name))}")
    if dial_timeout:
        # A mirror that does not accept the connection in time is skipped for
        # the next endpoint (containerd 2.0.7+/2.1+), instead of the default 30 s.
        lines.append(f"dial_timeout = {_toml_string(dial_timeout)}")
    return lines


def _carried_block(carried: ForeignCerts) -> list[str]:
    lines = []
    if carried.ca:
        lines.append(f"ca = {_toml_list(carried.ca)}")
    if carried.client:
        pairs = ", ".join(_toml_list([cert, key]) if key else _toml_string(cert) for cert, key in carried.client)
        lines.append(f"client = [{pairs}]")
    return lines


def render_hosts_toml(route: HostRoute, host_dir_path: str, carried: ForeignCerts | None = None) -> str:
    """containerd's hosts.toml for one registry host (valid for containerd 1.6, 1.7 and 2.x)."""
    lines = [c.OWNERSHIP_MARKER]
    names = ", ".join(m.name for m in route.mirrors)
    if route.blocked:
        # No endpoint may pull or resolve, so containerd fails the pull
        # without a connection. containerd 1.6 needs a [host] table, or it
        # rejects the file and falls back to its default: the upstream.
        block = f"capabilities = {_toml_list(BLOCKED_CAPABILITIES)}"
        return (
            "\n".join(
                [
                    *lines,
                    f"# {route.host}: NeverContactUpstream, but no mirror can be used here: pulls fail rather than reach {route.server}.",
                    f"server = {_toml_string(BLOCKED_ENDPOINT)}",
                    block,
                    "",
                    f"[host.{_toml_string(BLOCKED_ENDPOINT)}]",
                    "  " + block,
                ]
            )
            + "\n"
        )
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
            *_host_block(route.mirrors[0], host_dir_path, route.dial_timeout),
        ]
    else:
        lines += [f"# {route.host}: mirrors ({names}) first, then the upstream.", f"server = {_toml_string(route.server)}"]
        if carried is not None and (carried.ca or carried.client):
            lines += [f"# TLS files found in {carried.directory} (not ours), kept for the upstream by path:", *_carried_block(carried)]
    for mirror in route.mirrors:
        lines += [
            "",
            f"[host.{_toml_string(mirror.url)}]",
            *("  " + line for line in _host_block(mirror, host_dir_path, route.dial_timeout)),
        ]
    return "\n".join(lines) + "\n"


def render_ca_file(mirror: Mirror | MirrorLike) -> str:
    """The mirror's CA bundle as an owned file (PEM parsers skip the marker line)."""
    pem = (mirror.ca_pem or "").strip()
    return f"{c.OWNERSHIP_MARKER}\n{pem}\n"


# ---------------------------------------------------------------- CRI-O


def crio_prefixes(host: str) -> list[str]:
    """The registries.conf prefixes for a canonical host (containers/image folds index.docker.io itself)."""
    return [DOCKER_HUB, "registry-1.docker.io"] if host == DOCKER_HUB else [host]


def _pull_from_mirror(mirror: Mirror) -> str:
    caps = set(mirror.capabilities)
    if caps >= {"pull", "resolve"}:
        return "all"
    return "digest-only" if "pull" in caps else "tag-only"


def _crio_block(route: HostRoute, prefix: str) -> list[str]:
    if route.blocked:
        return [
            "",
            f"# {route.host}: NeverContactUpstream, but no mirror can be used here: blocked.",
            "[[registry]]",
            f"prefix = {_toml_string(prefix)}",
            f"location = {_toml_string(prefix)}",
            "blocked = true",
        ]
    if route.strict:
        # `blocked` would also block the mirrors, so the primary location
        # itself is a mirror: no entry leads to the upstream.
        *mirrors, last = route.mirrors
        location, insecure = _endpoint_host(last.url), last.url.startswith("http://")
        comment = f"# {route.host}: NeverContactUpstream. Only mirrors are used, never {route.server}."
    else:
        mirrors = list(route.mirrors)
        location = prefix if prefix == DOCKER_HUB else _endpoint_host(route.server)
        insecure = route.server.startswith("http://")
        comment = f"# {route.host}: mirrors first, then the upstream."
    lines = ["", comment, "[[registry]]", f"prefix = {_toml_string(prefix)}", f"location = {_toml_string(location)}"]
    if insecure:
        lines.append("insecure = true")
    for mirror in mirrors:
        lines += [
            "",
            "[[registry.mirror]]",
            f"location = {_toml_string(_endpoint_host(mirror.url))}",
            f"insecure = {'true' if mirror.url.startswith('http://') else 'false'}",
            f"pull-from-mirror = {_toml_string(_pull_from_mirror(mirror))}",
        ]
    return lines


def render_crio_dropin(routes: Sequence[HostRoute], search: Sequence[str] = ()) -> str:
    """A registries.conf.d drop-in (containers-registries.conf(5), v2) for these routes and the short-name search order."""
    lines = [c.OWNERSHIP_MARKER, "# Registry mirrors rolled out by the regmirror agent."]
    if search:
        lines += [
            "# The cluster's short-name search order (settings.unqualifiedSearchRegistries).",
            f"unqualified-search-registries = {_toml_list(search)}",
        ]
    for route in routes:
        for prefix in crio_prefixes(route.host):
            lines += _crio_block(route, prefix)
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- the node's files


@dataclass
class NodeFiles:
    """What one node should hold, proven: files to write, directories to leave alone, and what to report."""

    files: dict[str, str] = field(default_factory=dict)
    # Directories whose files (ours) stay exactly as they are: their new
    # rendering failed its check, so the old one is better than none.
    keep: set[str] = field(default_factory=set)
    findings: list[Finding] = field(default_factory=list)
    # (canonical host, runtime) -> the route, as rendered
    routes: dict[tuple[str, str], HostRoute] = field(default_factory=dict)


def _containerd_files(route: HostRoute, root: str, foreign: Mapping[str, ForeignCerts], out: NodeFiles) -> None:
    for index, dir_name in enumerate(containerd_route_dirs(route.host)):
        dir_path = f"{root}/{dir_name}"
        carried = foreign.get(dir_path)
        effective = route
        if carried is not None and carried.hosts_toml:
            # Only the registry's own name blocks the node; Docker Hub's other
            # names are extra directories, and an admin's file there wins.
            out.findings.append(
                Finding(
                    "ForeignFileSkipped",
                    f"host {route.host}: {carried.hosts_toml} is not ours and configures {dir_name}; left untouched, "
                    "so the mirrors are not used for this name",
                    host=route.host,
                    blocks_node=index == 0,
                )
            )
            continue
        if carried is not None and (carried.ca or carried.client or carried.unusable):
            if route.strict:
                out.findings.append(
                    Finding(
                        "ForeignCertsIgnored",
                        f"host {route.host}: TLS files in {carried.directory} are for the upstream, which NeverContactUpstream never contacts; not used",
                        host=route.host,
                    )
                )
                carried = None
            elif carried.unusable:
                out.findings.append(
                    Finding(
                        "ForeignCertsUnusable",
                        f"host {route.host}: {'; '.join(carried.unusable)}: containerd would fail on them; fix or remove them, "
                        f"until then {dir_path} is left to them and the mirrors are not used for this host",
                        host=route.host,
                        blocks_node=True,
                    )
                )
                continue
        files = {f"{dir_path}/{HOSTS_TOML}": render_hosts_toml(effective, dir_path, carried)}
        for mirror in effective.mirrors:
            if mirror.ca_pem:
                files[f"{dir_path}/{ca_file_name(mirror.name)}"] = render_ca_file(mirror)
        problems = nodecheck.check_hosts_toml(files, effective, dir_path, carried)
        if problems and route.strict and not route.blocked:
            blocked = HostRoute(route.host, route.server, (), True)
            files = {f"{dir_path}/{HOSTS_TOML}": render_hosts_toml(blocked, dir_path)}
            still = nodecheck.check_hosts_toml(files, blocked, dir_path, None)
            out.findings.append(
                Finding(
                    "FileNotVerified",
                    f"host {route.host}: {dir_path}/{HOSTS_TOML} failed its check ({'; '.join(problems)}); "
                    + ("the host is blocked instead (NeverContactUpstream)" if not still else "nothing written"),
                    host=route.host,
                )
            )
            problems = still
        elif problems:
            out.findings.append(
                Finding(
                    "FileNotVerified",
                    f"host {route.host}: {dir_path}/{HOSTS_TOML} failed its check ({'; '.join(problems)}); the file already there is kept",
                    host=route.host,
                    blocks_node=True,
                )
            )
        if problems:
            out.keep.add(dir_path)
            continue
        if carried is not None and (carried.ca or carried.client):
            out.findings.append(
                Finding(
                    "ForeignCertsCarried",
                    f"host {route.host}: {len(carried.ca)} CA and {len(carried.client)} client certificate file(s) in {carried.directory} "
                    "are not ours; hosts.toml names them for the upstream, so containerd keeps using them",
                    host=route.host,
                )
            )
        out.files.update(files)


def _crio_files(routes: list[HostRoute], path: str, out: NodeFiles, search: Sequence[str] = ()) -> None:
    good = []
    for route in routes:
        problems = nodecheck.check_crio_dropin(render_crio_dropin([route]), [route])
        if problems and route.strict and not route.blocked:
            out.findings.append(
                Finding(
                    "FileNotVerified",
                    f"host {route.host}: CRI-O entry failed its check ({'; '.join(problems)}); blocked instead",
                    host=route.host,
                )
            )
            route = HostRoute(route.host, route.server, (), True)
            problems = nodecheck.check_crio_dropin(render_crio_dropin([route]), [route])
        if problems:
            out.findings.append(
                Finding(
                    "FileNotVerified", f"host {route.host}: CRI-O entry failed its check ({'; '.join(problems)}); left out", host=route.host
                )
            )
            continue
        good.append(route)
    if not good and not search:
        return
    text = render_crio_dropin(good, search)
    problems = nodecheck.check_crio_dropin(text, good, search)
    if problems:
        out.findings.append(
            Finding("FileNotVerified", f"{path} failed its check ({'; '.join(problems)}); the file already there is kept", blocks_node=True)
        )
        out.keep.add(path.rpartition("/")[0])
        return
    out.files[path] = text


def plan_node_files(
    plan: PlanLike | CheckedPlan,
    node_labels: Mapping[str, str],
    *,
    unhealthy: frozenset[str] = frozenset(),
    containerd_config_path: str = c.CONTAINERD_CONFIG_PATH,
    crio_dropin_dir: str = c.CRIO_DROPIN_DIR,
    foreign: Mapping[str, ForeignCerts] | None = None,
    dial_timeout: str | None = None,
    crio_node: bool = False,
) -> NodeFiles:
    """Every file this node should have, each parsed back and compared with its route before it is returned.

    Paths are host paths (what containerd and CRI-O read), not prefixed with
    the agent's host root. Each file starts with the ownership marker. A file
    that fails its check is not returned: a strict host gets a blocking file
    instead, any other host keeps the file it has (`keep`). `dial_timeout` is
    written for the mirrors only when given: the caller knows whether the
    node's containerd reads it (agent/preflight.py `dial_timeout_supported`).
    The cluster's settings (blocked registries, the short-name search order)
    reach CRI-O through the drop-in, which is written where a mirror asks for
    CRI-O or the node runs it (`crio_node`); blocked registries reach
    containerd as blocking hosts.toml files on every node.
    """
    checked = as_checked(plan)
    out = NodeFiles(findings=list(checked.findings))
    root = containerd_config_path.rstrip("/")
    for route in host_routes(checked, node_labels, RUNTIME_CONTAINERD, unhealthy, out.findings, dial_timeout, checked.blocked):
        out.routes[(route.host, RUNTIME_CONTAINERD)] = route
        try:
            _containerd_files(route, root, foreign or {}, out)
        except Exception as exc:  # one host's rendering must never cost the others theirs
            out.keep.update(f"{root}/{d}" for d in containerd_route_dirs(route.host))
            out.findings.append(
                Finding(
                    "FileNotVerified",
                    f"host {route.host}: rendering failed ({type(exc).__name__}: {shown(str(exc), 200)}); files kept",
                    host=route.host,
                    blocks_node=True,
                )
            )
    # CRI-O gets a drop-in where a mirror asks for CRI-O on this node, or the node runs CRI-O; then the
    # cluster's settings go into it too. (The blocked registries' findings came with containerd's routes.)
    crio_wanted = crio_node or bool(host_routes(checked, node_labels, RUNTIME_CRIO, unhealthy))
    crio_routes = host_routes(checked, node_labels, RUNTIME_CRIO, unhealthy, out.findings, None, checked.blocked) if crio_wanted else []
    out.findings = list(dict.fromkeys(out.findings))
    for route in crio_routes:
        out.routes[(route.host, RUNTIME_CRIO)] = route
    search = checked.search_registries if crio_wanted else ()
    if crio_routes or search:
        path = f"{crio_dropin_dir.rstrip('/')}/{c.CRIO_DROPIN_FILE}"
        try:
            _crio_files(crio_routes, path, out, search)
        except Exception as exc:  # the drop-in's failure must not cost the containerd files theirs
            out.keep.add(crio_dropin_dir.rstrip("/"))
            out.findings.append(
                Finding(
                    "FileNotVerified",
                    f"{path}: rendering failed ({type(exc).__name__}: {shown(str(exc), 200)}); file kept",
                    blocks_node=True,
                )
            )
    return out


def render_node_files(
    plan: PlanLike | CheckedPlan,
    node_labels: Mapping[str, str],
    *,
    unhealthy: frozenset[str] = frozenset(),
    containerd_config_path: str = c.CONTAINERD_CONFIG_PATH,
    crio_dropin_dir: str = c.CRIO_DROPIN_DIR,
) -> dict[str, str]:
    """Every file this node should have: absolute host path -> content (see `plan_node_files`)."""
    return plan_node_files(
        plan, node_labels, unhealthy=unhealthy, containerd_config_path=containerd_config_path, crio_dropin_dir=crio_dropin_dir
    ).files


def render_docker_daemon_json(
    plan: PlanLike | CheckedPlan,
    node_labels: Mapping[str, str],
    unhealthy: frozenset[str] = frozenset(),
) -> dict[str, list[str]]:
    """The `registry-mirrors` / `insecure-registries` part of Docker's daemon.json.

    dockerd only mirrors Docker Hub and always falls back to it, so this covers
    docker.io alone and cannot express NeverContactUpstream.
    """
    mirrors = [m for m in selected_mirrors(plan, node_labels) if DOCKER_HUB in m.hosts and (m.strict or m.name not in unhealthy)]
    return {
        "registry-mirrors": [m.url for m in mirrors],
        "insecure-registries": [_endpoint_host(m.url) for m in mirrors if m.url.startswith("http://")],
    }


def docker_daemon_entries(
    plan: PlanLike | CheckedPlan,
    node_labels: Mapping[str, str],
    unhealthy: frozenset[str] = frozenset(),
) -> tuple[dict[str, list[str]], list[Finding]]:
    """What the agent merges into this node's daemon.json: the mirrors that ask for the docker runtime.

    Docker Engine mirrors Docker Hub only and always falls back to it, so a
    mirror is written only if it routes docker.io and is AllowUpstream (the
    CRD refuses docker with NeverContactUpstream; a plan that has it anyway is
    reported, not written). Withdrawn mirrors are left out, as in hosts.toml.
    """
    findings = []
    mirrors = []
    for mirror in selected_mirrors(plan, node_labels):
        if RUNTIME_DOCKER not in mirror.runtimes:
            continue
        if DOCKER_HUB not in mirror.hosts:
            findings.append(
                Finding(
                    "DockerHubOnly",
                    f"mirror {mirror.name}: Docker Engine mirrors Docker Hub only; it does not route docker.io",
                    mirror.name,
                )
            )
            continue
        if mirror.strict:
            findings.append(
                Finding(
                    "DockerCannotBeStrict",
                    f"mirror {mirror.name}: Docker Engine always falls back to Docker Hub, so a NeverContactUpstream mirror is not written",
                    mirror.name,
                )
            )
            continue
        if mirror.name not in unhealthy:
            mirrors.append(mirror)
    return {
        "registry-mirrors": [m.url for m in mirrors],
        "insecure-registries": [_endpoint_host(m.url) for m in mirrors if m.url.startswith("http://")],
    }, findings
