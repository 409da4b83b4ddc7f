"""PURE: the node plan as untrusted input, checked entry by entry before anything is rendered.

The plan is a ConfigMap anyone with write access can edit, read by a root
process on every node. So every entry goes through `check_mirror`: names,
hosts, URLs, capabilities and CA bytes are validated, and a defect costs only
that mirror (or only that host, or only its CA), never the plan. Hosts come
out canonical (`lowlevel.canonical_registry_host`: lower case, Docker Hub's
names folded), so one registry gets one route however many spellings the
mirrors list. What is wrong is returned as `Finding`s for the agent to report.

The plan is typed structurally (`PlanLike`), so the pydantic `NodePlan` and the
agent's lean reader of the same JSON both fit; the agent avoids pydantic to
keep its memory small.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from regmirror.lowlevel import (
    CAError,
    canonical_registry_host,
    default_registry_server,
    mirror_order_key,
    parse_ca_bundle,
    parse_endpoint,
)

NEVER_CONTACT_UPSTREAM: Final = "NeverContactUpstream"
ALLOW_UPSTREAM: Final = "AllowUpstream"
RUNTIME_CONTAINERD: Final = "containerd"
RUNTIME_CRIO: Final = "crio"
RUNTIME_DOCKER: Final = "docker"
RUNTIMES: Final = frozenset({RUNTIME_CONTAINERD, RUNTIME_CRIO, RUNTIME_DOCKER})
CAPABILITIES: Final = ("pull", "resolve")

_NAME_RE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_LABEL_RE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


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
    service: tuple[str, str] | None = None  # (namespace, name) of its Service, whose EndpointSlices the agent watches


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
    # The cluster's node settings, canonical and checked.
    search_registries: tuple[str, ...] = ()
    blocked: tuple[str, ...] = ()


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


def service_ref(raw: object) -> tuple[str, str] | None:
    """`<namespace>/<name>` of a Service (both DNS labels), else None."""
    if not isinstance(raw, str) or raw.count("/") != 1:
        return None
    namespace, name = raw.split("/")
    return (namespace, name) if _LABEL_RE.fullmatch(namespace) and _LABEL_RE.fullmatch(name) else None


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
    raw_service = getattr(entry, "service", None)
    service = service_ref(raw_service)
    if raw_service is not None and service is None:
        note("ServiceRejected", f"service {shown(raw_service)} is not <namespace>/<name>; its endpoints are not watched (probes only)")
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
        service=service,
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


def _registries(raw: Any, what: str, findings: list[Finding]) -> tuple[str, ...]:
    """Canonical registry hosts of a settings list, each once; the rest reported and left out."""
    hosts: list[str] = []
    for value in raw if isinstance(raw, (list, tuple)) else ():
        try:
            host = canonical_registry_host(value)
        except ValueError as exc:
            findings.append(Finding("SettingRejected", f"settings.{what}: {shown(str(exc), 160)}; left out"))
            continue
        if host not in hosts:
            hosts.append(host)
    return tuple(hosts)


def check_plan(plan: PlanLike) -> CheckedPlan:
    """Check every entry on its own; one bad entry never costs another one anything."""
    mirrors: list[Mirror] = []
    claims: list[StrictClaim] = []
    findings: list[Finding] = []
    names: set[str] = set()
    settings = getattr(plan, "settings", None)
    search = _registries(getattr(settings, "unqualified_search_registries", ()), "unqualifiedSearchRegistries", findings)
    blocked = _registries(getattr(settings, "blocked_registries", ()), "blockedRegistries", findings)
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
    mirrors.sort(key=lambda m: mirror_order_key(m.priority, m.name))
    return CheckedPlan(tuple(mirrors), tuple(claims), tuple(findings + conflicts), servers, search, blocked)


def as_checked(plan: PlanLike | CheckedPlan) -> CheckedPlan:
    """A checked plan, checking it now if it was not yet."""
    return plan if isinstance(plan, CheckedPlan) else check_plan(plan)


def selected(selector: SelectorLike, labels: dict[str, str]) -> bool:
    """Whether the selector picks this node; one that cannot be evaluated picks none (fail closed)."""
    try:
        return bool(selector.matches(labels))
    except Exception:  # a selector we cannot evaluate selects nothing (fail closed)
        return False


def selected_mirrors(plan: PlanLike | CheckedPlan, node_labels: Mapping[str, str]) -> list[Mirror]:
    """Usable mirrors whose node selector matches this node, in the order nodes try them."""
    labels = dict(node_labels)
    return [m for m in as_checked(plan).mirrors if selected(m.node_selector, labels)]
