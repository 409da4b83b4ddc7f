"""Property tests: generated plans, hostile and valid, through the real agent on a temporary node.

Plans are drawn from a mixture: valid entries, Docker Hub's aliases and case
variants, ports, duplicate hosts and endpoints, strict and non-strict mirrors
of one host, CA bytes of every kind (PEM, PEM with a non-ASCII comment, DER,
garbage), and hostile values (`/`, `..`, newlines, quotes, unicode, very long
strings, unknown selector operators, wrong JSON types). Whatever comes out:

- the agent never crashes and never writes outside its two directories;
- every file it writes parses (tomllib) and starts with the ownership marker;
- each host routes as the plan says, by an oracle written here from the
  documented semantics (not from the renderer): mirrors in (priority desc,
  name) order, one per endpoint, withdrawn when unhealthy unless strict, then
  the host's real registry;
- a strict host (any entry for it that is NeverContactUpstream or of an
  unknown policy, whether usable or not) never has an endpoint that can pull
  or resolve from anything but its mirrors;
- good mirrors are applied even when bad ones share the plan.

A second family builds valid specs through the pydantic models and the
operator's plan path (models -> nodeplan.mirror_entry -> build_node_plan ->
render) and checks the same properties. A few plans go through the real
`regmirror agent --once` process. Failures found while writing these are kept
as @example cases.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from _agentkit import CERTS, CRIO_FILE, ca_cert, containerd_endpoints, endpoint_capabilities, node_root, tree
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from regmirror import constants as c
from regmirror.agent.loop import Agent, AgentConfig
from regmirror.agent.probe import HealthTracker
from regmirror.lowlevel import CAError, canonical_registry_host, default_registry_server, parse_ca_bundle, parse_endpoint
from regmirror.models import RegistryMirrorSpec
from regmirror.nodeplan import build_node_plan, mirror_entry
from regmirror.render.nodefiles import containerd_host_dir, plan_node_files

OPERATOR_SRC = str(Path(__file__).resolve().parents[2] / "operator")
PEM, DER = ca_cert()
DOCKER_HUB_NAMES = ("docker.io", "index.docker.io", "registry-1.docker.io")
STRICT = "NeverContactUpstream"
ALLOW = "AllowUpstream"
NAME_RE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")

# ------------------------------------------------------------------ strategies

hostile_text = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["..", "../../etc", "a/b", "a\nb", 'a"b', "a'b", "[host]", '"]\n[host."x"]\n', "\x00", "é.io", "a" * 300, " ", ""]),
)
canonical_hosts = st.sampled_from(
    ["docker.io", "quay.io", "ghcr.io", "reg.local:5000", "10.0.0.7:8443", "[fd00::7]:5000", "registry.k8s.io"]
)


@st.composite
def spelled_host(draw: st.DrawFn) -> str:
    """A registry host in some spelling: an alias, a case variant, or the canonical name."""
    host = draw(st.one_of(canonical_hosts, st.sampled_from(DOCKER_HUB_NAMES)))
    if draw(st.booleans()):
        host = "".join(ch.upper() if draw(st.booleans()) else ch for ch in host)
    return host


valid_urls = st.one_of(
    st.builds(
        lambda n, p, s: f"{s}://10.96.0.{n}:{p}", st.integers(1, 4), st.sampled_from([5000, 443]), st.sampled_from(["http", "https"])
    ),
    st.sampled_from(
        ["HTTP://10.96.0.1:5000/", "http://[fd00::1]:5000", "https://registry-1.docker.io", "http://quay.io", "http://reg.local:5000"]
    ),
)
bad_urls = st.one_of(
    st.sampled_from(
        ["ftp://10.96.0.1", "http://10.96.0.1:99999", "http://u:p@10.96.0.1", "http://10.96.0.1/../..", "http://a\n", "http://"]
    ),
    hostile_text,
)
valid_names = st.sampled_from(["a", "b", "hub", "m-1", "x.y", "vault"])
ca_values = st.one_of(
    st.none(),
    st.just(PEM),
    st.just(f"# Zertifikat für Spiegel ✓\n{PEM}trailing junk ✗\n"),
    st.just(DER.decode(errors="replace")),
    st.just("-----BEGIN CERTIFICATE-----\nMIIBfake\n-----END CERTIFICATE-----\n"),
    st.text(max_size=30),
)
good_requirement = st.one_of(
    st.fixed_dictionaries(
        {
            "key": st.sampled_from(["pool", "zone"]),
            "operator": st.sampled_from(["In", "NotIn"]),
            "values": st.lists(st.sampled_from(["a", "b"]), min_size=1, max_size=2),
        }
    ),
    st.fixed_dictionaries({"key": st.sampled_from(["pool", "zone"]), "operator": st.sampled_from(["Exists", "DoesNotExist"])}),
)
bad_requirement = st.fixed_dictionaries(
    {
        "key": st.sampled_from(["pool", "zone"]),
        "operator": st.one_of(st.sampled_from(["Gt", "in", "", "Exists ", "In"]), st.text(max_size=5)),
        "values": st.lists(st.sampled_from(["a", "b"]), max_size=1),
    }
)
good_selectors = st.one_of(
    st.none(),
    st.fixed_dictionaries(
        {
            "matchLabels": st.dictionaries(st.sampled_from(["pool", "zone"]), st.sampled_from(["a", "b"]), max_size=1),
            "matchExpressions": st.lists(good_requirement, max_size=2),
        }
    ),
)
bad_selectors = st.one_of(
    st.fixed_dictionaries({"matchExpressions": st.lists(bad_requirement, min_size=1, max_size=2)}),
    st.sampled_from(["not a selector", {"matchLabels": {"pool": 1}}, {"matchExpressions": {"key": "pool"}}]),
)
json_junk = st.one_of(st.none(), st.integers(), st.text(max_size=5), st.lists(st.integers(), max_size=2))
CORRUPTIONS: dict[str, st.SearchStrategy[Any]] = {
    "name": hostile_text,
    "url": bad_urls,
    "priority": st.one_of(st.sampled_from([True, 2**40, -(2**31) - 1, 1.5]), st.text(max_size=3)),
    "capabilities": st.one_of(
        st.just([]),
        st.lists(st.sampled_from(["push", "Pull", "x", "pull"]), min_size=1, max_size=3).filter(lambda x: not set(x) <= {"pull"}),
    ),
    "fallback": st.one_of(st.sampled_from(["neverContactUpstream", "", "Strict"]), hostile_text),
    "nodeSelector": bad_selectors,
    "hosts": st.one_of(st.lists(hostile_text, max_size=2), json_junk),
    "servers": json_junk,
    "runtimes": st.one_of(st.just("containerd"), st.lists(st.integers(), min_size=1, max_size=1)),
}


@st.composite
def plan_entry(draw: st.DrawFn) -> Any:
    """Mostly well-formed entries (so routing is exercised), a third with one or two corrupted fields, a few not objects at all."""
    if draw(st.integers(0, 30)) == 0:
        return draw(json_junk)
    hosts = draw(st.lists(st.one_of(spelled_host(), spelled_host(), spelled_host(), hostile_text), min_size=1, max_size=3))
    entry: dict[str, Any] = {
        "name": draw(valid_names),
        "hosts": hosts,
        "servers": {
            h: draw(
                st.sampled_from(
                    [default_registry_server(_canon(h) or "x"), f"http://{_canon(h) or 'x'}", "ftp://nope", "https://elsewhere.io"]
                )
            )
            for h in hosts
            if isinstance(h, str)
        },
        "url": draw(valid_urls),
        "priority": draw(st.integers(0, 3)),
        "capabilities": draw(st.sampled_from([["pull", "resolve"], ["pull"], ["resolve"], ["resolve", "pull", "pull"]])),
        "fallback": draw(st.sampled_from([ALLOW, STRICT])),
        "runtimes": draw(st.sampled_from([["containerd"], ["containerd"], ["crio"], ["containerd", "crio"], ["containerd", "docker"], []])),
        "nodeSelector": draw(good_selectors),
        "caPem": draw(ca_values),
    }
    if draw(st.booleans()):
        entry["upstreamHost"] = draw(st.one_of(spelled_host(), spelled_host(), hostile_text))
    if draw(st.integers(0, 2)) == 0:
        for key in draw(st.lists(st.sampled_from(sorted(CORRUPTIONS)), min_size=1, max_size=2, unique=True)):
            entry[key] = draw(CORRUPTIONS[key])
    return entry


labels_strategy = st.fixed_dictionaries({}, optional={"pool": st.sampled_from(["a", "b"]), "zone": st.sampled_from(["a", "b"])})

# ------------------------------------------------------------------ the oracle


def _canon(host: Any) -> str | None:
    try:
        return canonical_registry_host(host)
    except (ValueError, TypeError):
        return None


def _endpoint(url: Any) -> str | None:
    try:
        return parse_endpoint(url).url
    except (ValueError, TypeError):
        return None


def _is_strs(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def selector_well_formed(raw: Any) -> bool:
    """A selector the agent can evaluate: the right JSON types, known operators, values exactly where they belong."""
    if raw is None:
        return True
    if not isinstance(raw, dict):
        return False
    match_labels, exprs = raw.get("matchLabels") or {}, raw.get("matchExpressions") or []
    if not isinstance(match_labels, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in match_labels.items()):
        return False
    if not isinstance(exprs, list):
        return False
    for e in exprs:
        if not isinstance(e, dict) or not isinstance(e.get("key"), str) or not isinstance(e.get("operator"), str):
            return False
        values = [] if e.get("values") is None else e["values"]
        if not _is_strs(values) or e["operator"] not in ("In", "NotIn", "Exists", "DoesNotExist"):
            return False
        if (e["operator"] in ("In", "NotIn")) != bool(values):
            return False
    return True


def selector_verdict(raw: Any, labels: Mapping[str, str]) -> bool:
    """Kubernetes label-selector semantics; anything that is not a well-formed selector selects nothing."""
    if not selector_well_formed(raw):
        return False
    if raw is None:
        return True
    ok = all(labels.get(k) == v for k, v in (raw.get("matchLabels") or {}).items())
    for e in raw.get("matchExpressions") or []:
        key, op, values = e["key"], e["operator"], e.get("values") or []
        ok = (
            ok
            and {
                "In": labels.get(key) in values,
                "NotIn": key not in labels or labels[key] not in values,
                "Exists": key in labels,
                "DoesNotExist": key not in labels,
            }[op]
        )
    return ok


def usable(entry: Any) -> bool:
    """Whether a plan entry is one the agent may route to (every field well-formed)."""
    if not isinstance(entry, dict):
        return False
    name, prio = entry.get("name"), entry.get("priority")
    caps, runtimes = entry.get("capabilities"), entry.get("runtimes")
    servers, ca = entry.get("servers"), entry.get("caPem")
    return (
        isinstance(name, str)
        and len(name) <= 253
        and NAME_RE.fullmatch(name) is not None
        and _endpoint(entry.get("url")) is not None
        and isinstance(prio, int)
        and not isinstance(prio, bool)
        and -(2**31) <= prio < 2**31
        and _is_strs(caps)
        and bool(caps)
        and set(caps) <= {"pull", "resolve"}
        and entry.get("fallback") in (ALLOW, STRICT)
        and (runtimes is None or _is_strs(runtimes))
        and _is_strs(entry.get("hosts"))
        and any(_canon(h) for h in entry["hosts"])
        and isinstance(servers, dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in servers.items())
        and (ca is None or isinstance(ca, str))
        and (entry.get("upstreamHost") is None or isinstance(entry.get("upstreamHost"), str))
        and selector_well_formed(entry.get("nodeSelector"))
    )


def entry_hosts(entry: dict[str, Any]) -> list[str]:
    hosts = entry.get("hosts")
    return list(dict.fromkeys(h for h in (_canon(x) for x in (hosts if isinstance(hosts, list) else [])) if h))


def runs(entry: dict[str, Any], runtime: str) -> bool:
    """A usable entry runs where it says; an unusable strict one claims its runtimes, or every runtime if it names none we know."""
    runtimes = entry.get("runtimes")
    known = [r for r in runtimes if r in ("containerd", "crio")] if isinstance(runtimes, list) else []
    if usable(entry):
        return runtime in known
    return runtime in known or not known


def strict_claims(entries: list[Any], labels: Mapping[str, str], runtime: str) -> set[str]:
    """Hosts that must never reach their upstream on this node: any entry for them that is not AllowUpstream."""
    hosts: set[str] = set()
    for e in entries:
        if not isinstance(e, dict) or e.get("fallback") == ALLOW or not runs(e, runtime):
            continue
        if selector_verdict(e.get("nodeSelector"), labels):  # an unevaluable selector selects nothing, strict or not
            hosts.update(entry_hosts(e))
    return hosts


def host_server(entries: list[dict[str, Any]], host: str) -> str:
    """The host's real registry: declared by a mirror whose upstream names it (https first, then smallest), else the default."""
    declared = set()
    for e in entries:
        upstream = _canon(e["upstreamHost"]) if isinstance(e.get("upstreamHost"), str) else None
        # The entry's first valid declaration for the host counts (its servers may spell the host twice).
        server = next((_endpoint(v) for k, v in e["servers"].items() if _canon(k) == host and _endpoint(v)), None)
        if server is None or host not in entry_hosts(e):
            continue
        if upstream == host if upstream is not None else server != default_registry_server(host):
            declared.add(server)
    return sorted(declared, key=lambda s: (not s.startswith("https://"), s))[0] if declared else default_registry_server(host)


def expected_routes(
    entries: list[Any], labels: Mapping[str, str], unhealthy: set[str], runtime: str
) -> dict[str, tuple[bool, list[str], str]]:
    """host -> (strict, mirror endpoints in try order, server) for hosts that get a file."""
    good = [e for e in entries if usable(e)]
    seen_names: set[str] = set()
    unique = []
    for e in good:
        if e["name"] not in seen_names:
            seen_names.add(e["name"])
            unique.append(e)
    good = sorted(unique, key=lambda e: (-e["priority"], e["name"]))
    strict_hosts = strict_claims(entries, labels, runtime)
    routes = {}
    hosts = {h for e in good if runs(e, runtime) and selector_verdict(e.get("nodeSelector"), labels) for h in entry_hosts(e)} | strict_hosts
    for host in sorted(hosts):
        strict = host in strict_hosts
        server = host_server(good, host)
        endpoints: list[str] = []
        for e in good:
            url = _endpoint(e["url"])
            assert url is not None
            if host not in entry_hosts(e) or not runs(e, runtime) or not selector_verdict(e.get("nodeSelector"), labels):
                continue
            if e["fallback"] == ALLOW and url in unhealthy:
                continue
            target = url.split("://", 1)[1]
            if strict and (target == server.split("://", 1)[1] or target in _spellings(host)):
                continue
            if url not in endpoints:
                endpoints.append(url)
        if endpoints or strict:
            routes[host] = (strict, endpoints, server)
    return routes


def _spellings(host: str) -> tuple[str, ...]:
    return DOCKER_HUB_NAMES if host == "docker.io" else (host,)


def _dirs(host: str) -> list[str]:
    return [containerd_host_dir(s) for s in _spellings(host)]


# ------------------------------------------------------------------ checking a node


def check_containerd_files(files: Mapping[str, str], entries: list[Any], labels: Mapping[str, str], unhealthy: set[str]) -> None:
    """Every hosts.toml parses, is ours, and routes its host as the oracle says; strict hosts never reach the upstream."""
    expected = expected_routes(entries, labels, unhealthy, "containerd")
    want_dirs = {d: host for host in expected for d in _dirs(host)}
    written = {path.rsplit("/", 2)[1]: text for path, text in files.items() if path.endswith("/hosts.toml")}
    assert set(written) == set(want_dirs), (sorted(written), sorted(want_dirs))
    for dir_name, text in written.items():
        host = want_dirs[dir_name]
        strict, endpoints, server = expected[host]
        assert text.startswith(c.OWNERSHIP_MARKER + "\n")
        got = containerd_endpoints(text)  # raises on invalid TOML, such as a table declared twice
        caps = endpoint_capabilities(text)
        routing = [e for e in got if {"pull", "resolve"} & set(caps[e])]
        if strict and not endpoints:
            assert routing == [], f"{host}: blocked strict host, yet {routing} may pull"
        elif strict:
            assert got == [*endpoints, endpoints[0]], (host, got, endpoints)
        else:
            assert got == [*endpoints, server], (host, got, endpoints, server)
        if strict:
            upstream = {server.split("://", 1)[1], *_spellings(host)}
            assert not [e for e in routing if e.split("://", 1)[1] in upstream], f"{host}: a strict host reaches its upstream"
        for table in tomllib.loads(text).get("host", {}).values():
            if "ca" in table:
                parse_ca_bundle(files[table["ca"]])  # the CA containerd is told to load does load


def check_crio_file(files: Mapping[str, str], entries: list[Any], labels: Mapping[str, str], unhealthy: set[str]) -> None:
    expected = expected_routes(entries, labels, unhealthy, "crio")
    text = files.get(CRIO_FILE)
    if not expected:
        assert text is None
        return
    assert text is not None and text.startswith(c.OWNERSHIP_MARKER + "\n")
    regs = tomllib.loads(text)["registry"]
    prefixes = [r["prefix"] for r in regs]
    assert len(prefixes) == len(set(prefixes)), "a prefix declared twice makes CRI-O refuse its configuration"
    assert set(prefixes) == {p for host in expected for p in ((host, "registry-1.docker.io") if host == "docker.io" else (host,))}
    for reg in regs:
        host = "docker.io" if reg["prefix"] == "registry-1.docker.io" else reg["prefix"]
        strict, endpoints, server = expected[host]
        tried = [m["location"] for m in reg.get("mirror", [])] + ([] if reg.get("blocked") else [reg["location"]])
        mirrors = [e.split("://", 1)[1] for e in endpoints]
        if strict:
            assert tried == mirrors, (host, tried, mirrors)
            assert reg.get("blocked") is (True if not endpoints else None)
        else:
            location = "docker.io" if reg["prefix"] == "docker.io" else server.split("://", 1)[1]
            assert tried == [*mirrors, location], (reg["prefix"], tried, mirrors, location)


def run_step(root: Path, plan: str, labels: Mapping[str, str], unhealthy: set[str]) -> Any:
    (root.parent / "plan.json").write_text(plan)
    (root.parent / "labels.json").write_text(json.dumps(dict(labels)))

    def probe(url: str, _timeout: float, _ca: str | None) -> str | None:
        return "refused" if url in unhealthy else None

    config = AgentConfig(plan_path=root.parent / "plan.json", host_root=root, node_labels_file=root.parent / "labels.json", health_port=0)
    return Agent(config, tracker=HealthTracker(probe=probe)).step()


def assert_confined(before: dict[str, bytes], after: dict[str, bytes]) -> None:
    changed = {p for p in set(before) | set(after) if before.get(p) != after.get(p)} - {"plan.json", "labels.json"}
    allowed = (f"host{CERTS}/", f"host{c.CRIO_DROPIN_DIR}/")
    # Docker Engine nodes (a plan entry with runtime docker): daemon.json and the agent's record of its own keys, nothing else there.
    docker = {"host/etc/docker/daemon.json", "host/etc/docker/.regmirror-daemon.json"}
    stray = sorted(p for p in changed if not p.startswith(allowed) and p not in docker)
    assert not stray, stray


def node_files(root: Path) -> dict[str, str]:
    out = {}
    for base in (CERTS, c.CRIO_DROPIN_DIR):
        for path in (root / base.lstrip("/")).rglob("*"):
            if path.is_file() and not path.name.startswith(".regmirror"):
                out["/" + path.relative_to(root).as_posix()] = path.read_text()
    return out


# ------------------------------------------------------------------ the properties

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

STRICT_ALIASES = [
    {"name": "vault", "hosts": ["registry-1.docker.io", "docker.io", "DOCKER.IO"], "servers": {}, "url": "http://10.96.0.1:5000",
     "priority": 1, "capabilities": ["pull"], "fallback": STRICT, "runtimes": ["containerd", "crio"], "nodeSelector": None, "caPem": None},
]  # fmt: skip
SAME_ENDPOINT = [
    {"name": n, "hosts": ["quay.io"], "servers": {}, "url": "http://10.96.0.1:5000", "priority": 1, "capabilities": ["pull"],
     "fallback": f, "runtimes": ["containerd"], "nodeSelector": None, "caPem": None} for n, f in (("a", STRICT), ("b", ALLOW))
]  # fmt: skip
DUPLICATE_NAME_STRICT = [
    {"name": "a", "hosts": ["docker.io"], "servers": {}, "url": "http://10.96.0.1:5000", "priority": 0, "capabilities": ["pull"],
     "fallback": f, "runtimes": r, "nodeSelector": None, "caPem": None} for f, r in ((ALLOW, ["containerd"]), (STRICT, ["crio"]))
]  # fmt: skip
MIRROR_IS_UPSTREAM = [
    {"name": "up", "hosts": ["quay.io"], "servers": {}, "url": "http://quay.io", "priority": 1, "capabilities": ["pull"],
     "fallback": STRICT, "runtimes": ["containerd"], "nodeSelector": None, "caPem": None},
]  # fmt: skip


@SETTINGS
@given(entries=st.lists(plan_entry(), max_size=6), labels=labels_strategy, unhealthy_picks=st.sets(st.integers(0, 5), max_size=3))
@example(entries=STRICT_ALIASES, labels={}, unhealthy_picks=set())
@example(entries=SAME_ENDPOINT, labels={}, unhealthy_picks=set())
@example(entries=MIRROR_IS_UPSTREAM, labels={}, unhealthy_picks=set())
@example(entries=DUPLICATE_NAME_STRICT, labels={}, unhealthy_picks=set())
def test_any_plan_through_the_agent_gives_confined_parsing_files_that_route_as_planned(
    entries: list[Any], labels: dict[str, str], unhealthy_picks: set[int]
) -> None:
    urls = [u for u in (_endpoint(e.get("url")) for e in entries if isinstance(e, dict)) if u]
    unhealthy = {urls[i] for i in unhealthy_picks if i < len(urls)}
    with tempfile.TemporaryDirectory() as tmp:
        root = node_root(Path(tmp))
        before = tree(Path(tmp))
        outcome = run_step(root, json.dumps({"mirrors": entries}), labels, unhealthy)
        assert_confined(before, tree(Path(tmp)))
        files = node_files(root)
        check_containerd_files(files, entries, labels, unhealthy)
        check_crio_file(files, entries, labels, unhealthy)
        # A mirror's defects are its own: the node is Ready whenever the runtime reads the files.
        assert outcome.ready, outcome.message
        assert outcome.files is not None and not [f for f in outcome.files.findings if f.reason == "FileNotVerified"]


@SETTINGS
@given(entries=st.lists(plan_entry(), max_size=5), labels=labels_strategy, rounds=st.integers(2, 3))
def test_changing_plans_leave_only_the_last_plans_files(entries: list[Any], labels: dict[str, str], rounds: int) -> None:
    """Plans applied one after another: what stays is exactly what the last one asks (no leftovers, no losses)."""
    with tempfile.TemporaryDirectory() as tmp:
        root = node_root(Path(tmp))
        for i in range(rounds):
            current = entries[i:] if i < rounds - 1 else entries[::-1]
            run_step(root, json.dumps({"mirrors": current}), labels, set())
        check_containerd_files(node_files(root), entries[::-1], labels, set())


# ------------------------------------------------------------------ the operator's plan path

valid_hosts = st.lists(st.one_of(spelled_host(), st.sampled_from(["Quay.io", "registry-1.docker.io"])), min_size=1, max_size=4)


@st.composite
def valid_spec(draw: st.DrawFn) -> tuple[str, RegistryMirrorSpec, str, str | None]:
    tls = draw(st.booleans())
    raw = {
        "upstream": {
            "url": draw(
                st.sampled_from(
                    ["https://registry-1.docker.io", "https://quay.io", "http://reg.local:5000", "https://ghcr.io", "http://10.0.0.7:8443"]
                )
            ),
            **({"hosts": draw(valid_hosts)} if draw(st.booleans()) else {}),
        },
        "service": {
            "port": draw(st.sampled_from([5000, 443])),
            **({"tls": {"secretName": "tls"}, "clusterIP": "10.96.0.50"} if tls else {}),
        },
        "nodeConfig": {
            "priority": draw(st.integers(0, 1000)),
            "fallback": draw(st.sampled_from([ALLOW, STRICT])),
            "runtimes": draw(st.sampled_from([["containerd"], ["crio"], ["containerd", "crio"]])),
            "capabilities": draw(st.sampled_from([["pull"], ["pull", "resolve"], ["resolve"]])),
            "nodeSelector": draw(
                st.sampled_from(
                    [{}, {"matchLabels": {"pool": "a"}}, {"matchExpressions": [{"key": "zone", "operator": "NotIn", "values": ["b"]}]}]
                )
            ),
        },
    }
    try:
        spec = RegistryMirrorSpec.model_validate(raw)
    except ValidationError:
        spec = RegistryMirrorSpec.model_validate({"upstream": {"url": "https://quay.io"}})
    name = draw(st.sampled_from(["hub", "quay", "a", "b", "corp-1"]))
    ip = draw(st.sampled_from(["10.96.0.1", "10.96.0.2", "fd00::5"]))
    ca = draw(st.sampled_from([None, PEM, f"# café\n{PEM}", DER.decode(errors="replace")])) if tls else None
    return name, spec, ip, ca


@SETTINGS
@given(
    specs=st.lists(valid_spec(), max_size=5, unique_by=lambda s: s[0]),
    labels=labels_strategy,
    unhealthy_picks=st.sets(st.integers(0, 4), max_size=2),
)
def test_valid_specs_through_the_operators_plan_path_route_as_specified(
    specs: list[tuple[str, RegistryMirrorSpec, str, str | None]], labels: dict[str, str], unhealthy_picks: set[int]
) -> None:
    plan = build_node_plan([mirror_entry(name, spec, ip, ca_pem=ca) for name, spec, ip, ca in specs])
    entries = json.loads(plan.to_json())["mirrors"]
    for entry in entries:
        assert len(entry["hosts"]) == len({h.lower() for h in entry["hosts"]}), "hosts are canonical and each once"
    unhealthy = {e["url"] for i, e in enumerate(entries) if i in unhealthy_picks}
    names_down = frozenset(e["name"] for e in entries if e["url"] in unhealthy)
    # The pydantic plan straight into the renderer (offline `regmirror render`) ...
    rendered = plan_node_files(plan, labels, unhealthy=names_down)
    assert not [f for f in rendered.findings if f.reason in ("FileNotVerified", "MirrorRejected", "HostRejected")], rendered.findings
    check_containerd_files(rendered.files, entries, labels, unhealthy)
    check_crio_file(rendered.files, entries, labels, unhealthy)
    # ... and the same JSON through the agent.
    with tempfile.TemporaryDirectory() as tmp:
        root = node_root(Path(tmp))
        run_step(root, plan.to_json(), labels, unhealthy)
        assert {p: t for p, t in node_files(root).items()} == rendered.files


# ------------------------------------------------------------------ the real process


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(entries=st.lists(plan_entry(), min_size=1, max_size=5))
@example(entries=STRICT_ALIASES)
def test_the_agent_process_survives_any_plan(tmp_path_factory: pytest.TempPathFactory, entries: list[Any]) -> None:
    tmp = tmp_path_factory.mktemp("cli")
    root = node_root(tmp)
    (tmp / "plan.json").write_text(json.dumps({"mirrors": entries}))
    (tmp / "labels.json").write_text("{}")
    before = tree(tmp)
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "regmirror.agent", "--once", "--plan", str(tmp / "plan.json"), "--host-root", str(root)),
            *("--node-labels-file", str(tmp / "labels.json"), "--health-port", "0", "--probe-timeout", "0.1"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": OPERATOR_SRC},
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert_confined(before, tree(tmp))
    for line in proc.stdout.splitlines():
        json.loads(line)  # one JSON record per line, whatever the plan held
    files = node_files(root)
    for path, text in files.items():
        assert text.startswith(c.OWNERSHIP_MARKER + "\n"), path
        if path.endswith((".toml", ".conf")):
            tomllib.loads(text)
        else:
            try:
                parse_ca_bundle(text)
            except CAError as exc:
                raise AssertionError(f"{path}: {exc}") from None
