"""PURE: one node's registry files from the node plan, checked before anyone writes them.

The agent on every node calls `plan_node_files` with the checked plan, its
node's labels, the mirrors its probes found dead and what it found of other
people's files, and gets back `{host path: content}` plus the findings it must
report. Everything a runtime will read is decided here, so the unit tests can
pin the exact bytes and the agent only has to write them.

The plan is untrusted input (a ConfigMap anyone with write access can edit,
read by a root process on every node), so every entry goes through
`check_mirror` first: names, hosts, URLs, capabilities and CA bytes are
validated, and a defect costs only that mirror (or only that host, or only
its CA), never the plan. Hosts are canonical (`lowlevel.canonical_registry_host`:
lower case, Docker Hub's names folded), so one registry gets one route however
many spellings the mirrors list.

containerd (1.6, 1.7, 2.x) reads `<config_path>/<host dir>/hosts.toml`: the
`[host."..."]` entries are tried in file order, then `server`. When `server`
is absent containerd falls back to the registry host itself, so a host that
must never reach its upstream (NeverContactUpstream) gets a mirror as its
`server` too. A hosts.toml containerd cannot decode (a table declared twice,
an unknown capability) is ignored as a whole, and containerd goes straight
to the upstream: which is why `render/nodecheck.py` parses every file back
and compares it with the route before it leaves this module. CRI-O reads a
`registries.conf.d` drop-in (containers-registries.conf(5), v2 syntax):
`[[registry.mirror]]` entries are tried in order, then `location`; for a
strict host `location` is a mirror as well.

The plan is typed structurally (`PlanLike`), so the pydantic `NodePlan` and the
agent's lean reader of the same JSON both fit; the agent avoids pydantic to
keep its memory small.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from regmirror import constants as c
from regmirror.lowlevel import (
    DOCKER_HUB,
    CAError,
    canonical_registry_host,
    default_registry_server,
    parse_ca_bundle,
    parse_endpoint,
    registry_host_spellings,
)
from regmirror.render import nodecheck

NEVER_CONTACT_UPSTREAM: Final = "NeverContactUpstream"
ALLOW_UPSTREAM: Final = "AllowUpstream"
RUNTIME_CONTAINERD: Final = "containerd"
RUNTIME_CRIO: Final = "crio"
RUNTIMES: Final = frozenset({RUNTIME_CONTAINERD, RUNTIME_CRIO})
CAPABILITIES: Final = ("pull", "resolve")
HOSTS_TOML: Final = "hosts.toml"
# A strict host whose mirrors all failed their checks still gets a file: one
# that routes nothing anywhere (no endpoint may pull or resolve, and the only
# endpoint is a reserved name that never resolves, RFC 6761). Without it,
# containerd would use its default: the upstream.
BLOCKED_ENDPOINT: Final = "https://never-contact-upstream.invalid"
BLOCKED_CAPABILITIES: Final = ("push",)

_NAME_RE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


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
    def priority(self) -> Any: ...
    @property
    def capabilities(self) -> Sequence[Any]: ...
    @property
    def fallback(self) -> Any: ...
    @property
    def runtimes(self) -> Sequence[Any]: ...
    @property
    def node_selector(self) -> SelectorLike: ...
    @property
    def ca_pem(self) -> str | None: ...


class PlanLike(Protocol):
    """What rendering needs of the plan (regmirror.nodeplan.NodePlan fits)."""

    @property
    def mirrors(self) -> Sequence[MirrorLike]: ...


# ---------------------------------------------------------------- findings


@dataclass(frozen=True)
class Finding:
    """Something the node could not do as the plan asked, for one mirror or one host.

    `reason` is a stable CamelCase word (docs/troubleshooting.md lists them);
    `message` is for people. A finding never stops the other mirrors.
    """

    reason: str
    message: str
    mirror: str | None = None
    host: str | None = None
    # False: the node's files are as good as they can be (reported, no action
    # needed on the node). True: the node could not apply what it should, and
    # its readiness says so.
    blocks_node: bool = False


def shown(value: object, limit: int = 64) -> str:
    """A value from the plan as it may appear in a message or a comment: one line, printable ASCII, bounded."""
    text = value if isinstance(value, str) else repr(value)
    text = "".join(ch if 32 <= ord(ch) < 127 else "?" for ch in text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------- checked plan


@dataclass(frozen=True)
class Mirror:
    """A plan entry that passed every check: the only thing rendering trusts."""

    name: str
    hosts: tuple[str, ...]  # canonical, each once
    servers: Mapping[str, str]  # canonical host -> endpoint URL, only valid ones
    url: str  # canonical endpoint URL
    priority: int
    capabilities: tuple[str, ...]
    strict: bool
    runtimes: frozenset[str]
    node_selector: SelectorLike
    ca_pem: str | None  # canonical PEM of the certificates that load
    upstream_host: str | None  # the host the mirror's upstream URL names (None: an older plan)


@dataclass(frozen=True)
class StrictClaim:
    """A NeverContactUpstream entry that cannot be used: its hosts still never reach the upstream."""

    name: str
    hosts: tuple[str, ...]
    runtimes: frozenset[str]
    node_selector: SelectorLike


@dataclass(frozen=True)
class CheckedPlan:
    """The plan after `check_plan`: usable mirrors, strict claims of unusable ones, and what was wrong."""

    mirrors: tuple[Mirror, ...] = ()
    claims: tuple[StrictClaim, ...] = ()
    findings: tuple[Finding, ...] = ()
    # Each host's fallback server, decided over the whole plan (not per node,
    # not by mirror order): a property of the host.
    servers: Mapping[str, str] = field(default_factory=dict)


def _str(value: Any) -> str:
    """An enum member's value or a plain string (both plan readers are accepted)."""
    return str(getattr(value, "value", value))


def ca_file_name(name: str) -> str:
    """The mirror's CA file in a host directory; long names are cut and hashed to stay under NAME_MAX."""
    if len(name) <= 200:
        return f"{name}-ca.crt"
    return f"{name[:180]}-{hashlib.sha256(name.encode()).hexdigest()[:16]}-ca.crt"


def valid_name(raw: object) -> str | None:
    """The entry's name if it is a DNS subdomain (what files are named after), else None."""
    return raw if isinstance(raw, str) and len(raw) <= 253 and _NAME_RE.fullmatch(raw) else None


def mirror_label(raw: object) -> str:
    """How a plan entry is named in findings and reports: its name, or a safe rendering of whatever is there."""
    return valid_name(raw) or shown(raw)


def check_mirror(entry: MirrorLike) -> tuple[Mirror | None, StrictClaim | None, list[Finding]]:
    """Validate one plan entry: a usable Mirror, or a strict claim of its hosts, and the findings.

    Defects that make the entry unusable: its name, URL, capabilities,
    priority, fallback, no valid host, or what the plan reader found
    (`defects`). Defects that cost less: an invalid host (that host is
    dropped), an unknown runtime (ignored), CA bytes with no certificate (the
    CA is dropped: TLS then verifies against the system roots only, which can
    only refuse more, and the probe decides whether the mirror is usable),
    an invalid `servers` value (the host's default is used instead).
    """
    findings: list[Finding] = []
    raw_name = getattr(entry, "name", "")
    name = valid_name(raw_name)
    label = mirror_label(raw_name)
    fatal: list[str] = [str(d) for d in getattr(entry, "defects", ())]

    def note(reason: str, message: str, host: str | None = None) -> None:
        findings.append(Finding(reason, f"mirror {label}: {message}", mirror=label, host=host))

    if name is None:
        fatal.append(f"name {shown(raw_name)} is not a DNS subdomain (lower case, digits, '-', '.', at most 253)")
    hosts: list[str] = []
    raw_hosts = getattr(entry, "hosts", ())
    for raw in raw_hosts if isinstance(raw_hosts, (list, tuple)) else ():
        try:
            host = canonical_registry_host(raw)
        except ValueError as exc:
            note("HostRejected", f"host skipped: {shown(str(exc), 160)}")
            continue
        if host not in hosts:
            hosts.append(host)
    if not hosts:
        fatal.append("no valid registry host")
    url = ""
    try:
        url = parse_endpoint(entry.url).url
    except (ValueError, TypeError) as exc:
        fatal.append(f"url: {shown(str(exc), 160)}")
    capabilities: list[str] = []
    raw_caps = getattr(entry, "capabilities", ())
    for cap in raw_caps if isinstance(raw_caps, (list, tuple)) else ():
        if _str(cap) not in CAPABILITIES:
            fatal.append(f"unknown capability {shown(_str(cap))} (pull and resolve are known)")
        elif _str(cap) not in capabilities:
            capabilities.append(_str(cap))
    if not capabilities:
        fatal.append("no capability (pull, resolve)")
    priority = getattr(entry, "priority", None)
    if not isinstance(priority, int) or isinstance(priority, bool) or not -(2**31) <= priority < 2**31:
        fatal.append(f"priority {shown(priority)} is not a 32-bit integer")
        priority = 0
    fallback = _str(getattr(entry, "fallback", ""))
    if fallback not in (ALLOW_UPSTREAM, NEVER_CONTACT_UPSTREAM):
        # An unknown policy is treated as the strict one: fail closed.
        fatal.append(f"unknown fallback {shown(fallback)}")
    strict = fallback != ALLOW_UPSTREAM
    runtimes: set[str] = set()
    raw_runtimes = getattr(entry, "runtimes", ())
    for runtime in raw_runtimes if isinstance(raw_runtimes, (list, tuple)) else ():
        if _str(runtime) in RUNTIMES:
            runtimes.add(_str(runtime))
        else:
            note("RuntimeIgnored", f"runtime {shown(_str(runtime))} is not known to this agent; ignored")
    selector = entry.node_selector

    if fatal:
        message = "; ".join(fatal)
        if strict and hosts:
            note("MirrorRejected", f"{message}; NeverContactUpstream: its hosts ({', '.join(hosts)}) are blocked rather than sent upstream")
            return None, StrictClaim(label, tuple(hosts), frozenset(runtimes or RUNTIMES), selector), findings
        note("MirrorRejected", f"{message}; the mirror is not used (its hosts go to the other mirrors or the upstream)")
        return None, None, findings

    assert name is not None
    servers: dict[str, str] = {}
    raw_servers = getattr(entry, "servers", {})
    for raw_host, raw_server in raw_servers.items() if isinstance(raw_servers, Mapping) else ():
        try:
            host = canonical_registry_host(raw_host)
        except ValueError:
            continue  # a host the entry does not route; reported above if it was listed
        if host not in hosts or host in servers:
            continue
        try:
            servers[host] = parse_endpoint(raw_server).url
        except (ValueError, TypeError) as exc:
            note("ServerRejected", f"server for {host} ignored ({shown(str(exc), 120)}); the host's default is used", host=host)
    ca_pem = None
    raw_ca = getattr(entry, "ca_pem", None)
    if raw_ca:
        try:
            bundle = parse_ca_bundle(raw_ca) if isinstance(raw_ca, (str, bytes)) else None
        except CAError as exc:
            bundle = None
            note("CAUnusable", f"{exc}; the CA is left out, so only certificates the system trusts are accepted")
        if bundle is not None:
            ca_pem = bundle.pem
            if bundle.skipped:
                note("CAPartlyUnusable", f"{bundle.skipped} PEM block(s) of the CA bundle do not load and are left out")
    raw_upstream = getattr(entry, "upstream_host", None)
    upstream_host = None
    if raw_upstream is not None:
        try:
            upstream_host = canonical_registry_host(raw_upstream)
        except ValueError:
            note("ServerRejected", f"upstreamHost {shown(raw_upstream)} is not a registry host; ignored")
    mirror = Mirror(
        name=name,
        hosts=tuple(hosts),
        servers=servers,
        url=url,
        priority=priority,
        capabilities=tuple(cap for cap in CAPABILITIES if cap in capabilities),
        strict=strict,
        runtimes=frozenset(runtimes),
        node_selector=selector,
        ca_pem=ca_pem,
        upstream_host=upstream_host,
    )
    return mirror, None, findings


def host_servers(mirrors: Iterable[Mirror]) -> tuple[dict[str, str], list[Finding]]:
    """Each host's fallback server: a property of the host, never of mirror order.

    The server a mirror declares for the host its own upstream URL names is
    authoritative (a plain-http upstream stays http however many other
    mirrors route its host); every other host falls back to its default
    registry. Conflicting authoritative declarations are resolved the same
    way on every node (https first, then the smallest URL) and reported.
    Plans from before `upstreamHost` existed: a declaration other than the
    host's default can only have come from the mirror's upstream URL.
    """
    declared: dict[str, dict[str, list[str]]] = {}
    for mirror in mirrors:
        for host, server in mirror.servers.items():
            authoritative = mirror.upstream_host == host if mirror.upstream_host is not None else server != default_registry_server(host)
            if authoritative:
                declared.setdefault(host, {}).setdefault(server, []).append(mirror.name)
    servers: dict[str, str] = {}
    findings = []
    for host, by_server in declared.items():
        ranked = sorted(by_server, key=lambda s: (not s.startswith("https://"), s))
        servers[host] = ranked[0]
        if len(ranked) > 1:
            claims = "; ".join(f"{s} ({', '.join(sorted(by_server[s]))})" for s in ranked)
            findings.append(
                Finding("ServerConflict", f"host {host}: mirrors disagree on its upstream: {claims}; {ranked[0]} is used", host=host)
            )
    return servers, findings


def check_plan(plan: PlanLike) -> CheckedPlan:
    """Check every entry on its own; one bad entry never costs another one anything."""
    mirrors: list[Mirror] = []
    claims: list[StrictClaim] = []
    findings: list[Finding] = []
    names: set[str] = set()
    for defect in getattr(plan, "defects", ()):
        findings.append(Finding("MirrorRejected", f"plan: {shown(defect, 200)}"))
    for entry in plan.mirrors:
        mirror, claim, found = check_mirror(entry)
        findings += found
        if mirror is not None and mirror.name in names:
            findings.append(
                Finding("MirrorRejected", f"mirror {mirror.name}: listed twice in the plan; the first entry is used", mirror.name)
            )
            if mirror.strict:  # its strictness still binds its hosts
                claim = StrictClaim(mirror.name, mirror.hosts, mirror.runtimes, mirror.node_selector)
            mirror = None
        if mirror is not None:
            names.add(mirror.name)
            mirrors.append(mirror)
        if claim is not None:
            claims.append(claim)
    servers, conflicts = host_servers(mirrors)
    mirrors.sort(key=lambda m: (-m.priority, m.name))
    return CheckedPlan(tuple(mirrors), tuple(claims), tuple(findings + conflicts), servers)


def as_checked(plan: PlanLike | CheckedPlan) -> CheckedPlan:
    """A checked plan, checking it now if it was not yet."""
    return plan if isinstance(plan, CheckedPlan) else check_plan(plan)


# ---------------------------------------------------------------- routes


@dataclass(frozen=True)
class HostRoute:
    """The mirrors one runtime uses for one registry host on this node, in try order."""

    host: str  # canonical
    server: str  # the host's real registry (its fallback)
    mirrors: tuple[Mirror, ...]  # usable, one per endpoint
    strict: bool

    @property
    def blocked(self) -> bool:
        """Strict, and no mirror can be used: nothing may be contacted at all."""
        return self.strict and not self.mirrors


def is_strict(mirror: MirrorLike | Mirror) -> bool:
    """Whether this mirror forbids nodes to contact the upstream."""
    if isinstance(mirror, Mirror):
        return mirror.strict
    return _str(mirror.fallback) != ALLOW_UPSTREAM


def _selected(selector: SelectorLike, labels: dict[str, str]) -> bool:
    try:
        return bool(selector.matches(labels))
    except Exception:  # a selector we cannot evaluate selects nothing (fail closed)
        return False


def selected_mirrors(plan: PlanLike | CheckedPlan, node_labels: Mapping[str, str]) -> list[Mirror]:
    """Usable mirrors whose node selector matches this node, in the order nodes try them."""
    labels = dict(node_labels)
    return [m for m in as_checked(plan).mirrors if _selected(m.node_selector, labels)]


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
) -> list[HostRoute]:
    """Per registry host: the mirrors `runtime` should use on this node.

    A host is strict when any of its mirrors (or strict claims) is
    NeverContactUpstream. Unhealthy AllowUpstream mirrors are withdrawn;
    strict mirrors are kept even when down (the runtime must fail rather than
    reach the upstream). Two mirrors with one endpoint give one entry (the
    first one's settings). A host left with no mirror is omitted, so the
    runtime's default (straight to the upstream) applies, unless it is
    strict: then it is blocked. Findings are appended to `findings`.
    """
    checked = as_checked(plan)
    labels = dict(node_labels)
    sink = findings if findings is not None else []
    by_host: dict[str, list[Mirror]] = {}
    strict_hosts: set[str] = set()
    for mirror in checked.mirrors:
        if runtime not in mirror.runtimes or not _selected(mirror.node_selector, labels):
            continue
        for host in mirror.hosts:
            by_host.setdefault(host, []).append(mirror)
            if mirror.strict:
                strict_hosts.add(host)
    for claim in checked.claims:
        if runtime in claim.runtimes and _selected(claim.node_selector, labels):
            strict_hosts.update(claim.hosts)
            for host in claim.hosts:
                by_host.setdefault(host, [])
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
            routes.append(HostRoute(host=host, server=server, mirrors=tuple(usable), strict=strict))
    return routes


def default_server(host: str) -> str:
    """The registry containerd would contact for `host` without any configuration."""
    return default_registry_server(host)


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


def _host_block(mirror: Mirror, host_dir_path: str) -> list[str]:
    lines = [f"capabilities = {_toml_list(mirror.capabilities)}"]
    if mirror.ca_pem:
        lines.append(f"ca = {_toml_string(host_dir_path + '/' + ca_file_name(mirror.name))}")
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
            *_host_block(route.mirrors[0], host_dir_path),
        ]
    else:
        lines += [f"# {route.host}: mirrors ({names}) first, then the upstream.", f"server = {_toml_string(route.server)}"]
        if carried is not None and (carried.ca or carried.client):
            lines += [f"# TLS files found in {carried.directory} (not ours), kept for the upstream by path:", *_carried_block(carried)]
    for mirror in route.mirrors:
        lines += ["", f"[host.{_toml_string(mirror.url)}]", *("  " + line for line in _host_block(mirror, host_dir_path))]
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


def render_crio_dropin(routes: Sequence[HostRoute]) -> str:
    """A registries.conf.d drop-in (containers-registries.conf(5), v2) for these routes."""
    lines = [c.OWNERSHIP_MARKER, "# Registry mirrors rolled out by the regmirror agent."]
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


def _crio_files(routes: list[HostRoute], path: str, out: NodeFiles) -> None:
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
    if not good:
        return
    text = render_crio_dropin(good)
    problems = nodecheck.check_crio_dropin(text, good)
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
) -> NodeFiles:
    """Every file this node should have, each parsed back and compared with its route before it is returned.

    Paths are host paths (what containerd and CRI-O read), not prefixed with
    the agent's host root. Each file starts with the ownership marker. A file
    that fails its check is not returned: a strict host gets a blocking file
    instead, any other host keeps the file it has (`keep`).
    """
    checked = as_checked(plan)
    out = NodeFiles(findings=list(checked.findings))
    root = containerd_config_path.rstrip("/")
    for route in host_routes(checked, node_labels, RUNTIME_CONTAINERD, unhealthy, out.findings):
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
    crio_routes = host_routes(checked, node_labels, RUNTIME_CRIO, unhealthy, out.findings)
    for route in crio_routes:
        out.routes[(route.host, RUNTIME_CRIO)] = route
    if crio_routes:
        path = f"{crio_dropin_dir.rstrip('/')}/{c.CRIO_DROPIN_FILE}"
        try:
            _crio_files(crio_routes, path, out)
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
