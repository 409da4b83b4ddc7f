"""PURE: proof that a rendered node file says what its route says, before anyone writes it.

Each check parses the text back the way a runtime will (tomllib: TOML 1.0,
as containerd's go-toml and CRI-O's BurntSushi/toml; a table declared twice
is an error in all three) and compares what it finds with the route it was
rendered from, key by key. It returns the problems; an empty list is the
proof. The checks know nothing of how the renderer builds its text, so a
renderer bug, a hostile plan value that slipped through, or a future
refactoring cannot produce a file that routes a host anywhere else.

The rules that matter most, for a strict (NeverContactUpstream) host: every
endpoint in the file (each [host] table and `server`) is one of its mirrors,
and none of them is the upstream; for a blocked strict host, no endpoint may
pull or resolve at all.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from regmirror import constants as c
from regmirror.lowlevel import CAError, parse_ca_bundle, parse_endpoint, registry_host_spellings

if TYPE_CHECKING:
    from regmirror.render.nodefiles import ForeignCerts, HostRoute

HOSTS_TOP_KEYS = frozenset({"server", "capabilities", "ca", "client", "host", "dial_timeout"})
HOST_TABLE_KEYS = frozenset({"capabilities", "ca", "dial_timeout"})
KNOWN_CAPABILITIES = frozenset({"pull", "resolve", "push"})
ROUTING_CAPABILITIES = frozenset({"pull", "resolve"})
CRIO_REGISTRY_KEYS = frozenset({"prefix", "location", "insecure", "blocked", "mirror"})
CRIO_MIRROR_KEYS = frozenset({"location", "insecure", "pull-from-mirror"})


def _host_of(endpoint: str) -> str:
    return endpoint.split("://", 1)[-1]


def _is_upstream(endpoint: str, route: HostRoute) -> bool:
    """Whether an endpoint is the route's upstream (its server, or the registry under any of its names)."""
    host = _host_of(endpoint)
    return host == _host_of(route.server) or host in registry_host_spellings(route.host)


def _capabilities(table: Mapping[str, Any], where: str, problems: list[str]) -> list[str] | None:
    caps = table.get("capabilities")
    if caps is None:
        return None  # containerd: every capability
    if not isinstance(caps, list) or not caps or not all(isinstance(x, str) and x in KNOWN_CAPABILITIES for x in caps):
        # An empty list means "every capability" to containerd, an unknown one makes it drop the file.
        problems.append(f"{where}: capabilities {caps!r} are not a non-empty list of {sorted(KNOWN_CAPABILITIES)}")
        return None
    return list(caps)


def _ca_paths(table: Mapping[str, Any], where: str, problems: list[str]) -> list[str]:
    ca = table.get("ca")
    if ca is None:
        return []
    paths = [ca] if isinstance(ca, str) else ca
    if not isinstance(paths, list) or not all(isinstance(p, str) and p.startswith("/") for p in paths):
        problems.append(f"{where}: ca {ca!r} is not an absolute path or a list of them")
        return []
    return list(paths)


def _check_own_ca(path: str, files: Mapping[str, str], dir_path: str, where: str, problems: list[str]) -> None:
    if path.rpartition("/")[0] != dir_path or path not in files:
        problems.append(f"{where}: ca {path} is not a file written with it in {dir_path}")
        return
    text = files[path]
    if not text.startswith(c.OWNERSHIP_MARKER + "\n"):
        problems.append(f"{path}: lacks the ownership marker")
    try:
        parse_ca_bundle(text)
    except CAError as exc:
        # containerd would fail every pull of the host: "unable to load CA cert".
        problems.append(f"{path}: {exc}")


def check_hosts_toml(files: Mapping[str, str], route: HostRoute, dir_path: str, carried: ForeignCerts | None = None) -> list[str]:
    """Problems of `<dir_path>/hosts.toml` in `files` against `route`; empty when it is exactly right."""
    path = f"{dir_path}/hosts.toml"
    text = files.get(path)
    if text is None:
        return [f"{path} was not rendered"]
    problems: list[str] = []
    if not text.startswith(c.OWNERSHIP_MARKER + "\n"):
        problems.append("the first line is not the ownership marker")
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        return [*problems, f"not valid TOML ({exc}): containerd would ignore it and go to the upstream"]
    if set(doc) - HOSTS_TOP_KEYS:
        problems.append(f"unexpected keys {sorted(set(doc) - HOSTS_TOP_KEYS)}")
    server = doc.get("server")
    if not isinstance(server, str):
        return [*problems, "no server: containerd would fall back to the registry itself"]
    try:
        server = parse_endpoint(server).url
    except ValueError as exc:
        problems.append(f"server: {exc}")
    host_tables = doc.get("host")
    if not isinstance(host_tables, dict) or not host_tables:
        # containerd 1.6 refuses a file without [host] tables ("invalid `host` tree").
        return [*problems, "no [host] table"]
    endpoints: dict[str, dict[str, Any]] = {}
    for key, table in host_tables.items():
        if not isinstance(table, dict) or set(table) - HOST_TABLE_KEYS:
            problems.append(f"[host.{key!r}] is not a table of {sorted(HOST_TABLE_KEYS)}")
            continue
        try:
            endpoints[parse_endpoint(key).url] = table
        except ValueError as exc:
            problems.append(f"[host.{key!r}]: {exc}")
    server_caps = _capabilities(doc, "server", problems)
    for key, table in endpoints.items():
        _capabilities(table, key, problems)
        for ca in _ca_paths(table, key, problems):
            _check_own_ca(ca, files, dir_path, key, problems)

    if route.blocked:
        for key, table in [*endpoints.items(), (server, doc)]:
            caps = _capabilities(table, key, [])
            if caps is None or set(caps) & ROUTING_CAPABILITIES:
                problems.append(f"blocked host: {key} may pull or resolve")
            if _is_upstream(key, route):
                problems.append(f"blocked host: {key} is the upstream")
        return problems

    want = [m.url for m in route.mirrors]
    if list(endpoints) != want:
        problems.append(f"[host] tables {list(endpoints)} are not the mirrors {want} in order")
    for mirror in route.mirrors:
        table = endpoints.get(mirror.url)
        if table is None:
            continue
        if _capabilities(table, mirror.url, []) != list(mirror.capabilities):
            problems.append(f"{mirror.url}: capabilities {table.get('capabilities')!r}, not {list(mirror.capabilities)}")
        if bool(table.get("ca")) != bool(mirror.ca_pem):
            problems.append(f"{mirror.url}: ca {'missing' if mirror.ca_pem else 'unexpected'}")
        if table.get("dial_timeout") != route.dial_timeout:
            # containerd before 2.0.7 ignores the key; one that knows it refuses a bad duration.
            problems.append(f"{mirror.url}: dial_timeout {table.get('dial_timeout')!r}, not {route.dial_timeout!r}")
    if route.strict:
        first = route.mirrors[0]
        if server != first.url:
            problems.append(f"strict host: server {server} is not its first mirror {first.url}")
        if server_caps != list(first.capabilities):
            problems.append(f"strict host: server capabilities {server_caps!r}, not {list(first.capabilities)}")
        for own_ca in _ca_paths(doc, "server", problems):
            _check_own_ca(own_ca, files, dir_path, "server", problems)
        if doc.get("client") is not None:
            problems.append("strict host: server has client certificates")
        if doc.get("dial_timeout") != route.dial_timeout:
            problems.append(f"strict host: server dial_timeout {doc.get('dial_timeout')!r}, not {route.dial_timeout!r}")
        for endpoint in [*endpoints, server]:
            if endpoint not in want or _is_upstream(endpoint, route):
                problems.append(f"strict host: {endpoint} is not one of its mirrors")
        return problems

    if server != route.server:
        problems.append(f"server {server} is not the host's registry {route.server}")
    if server_caps is not None:
        problems.append(f"server capabilities {server_caps!r}: the upstream keeps all of them")
    if "dial_timeout" in doc:
        problems.append("server dial_timeout: the upstream keeps containerd's default")
    want_ca = list(carried.ca) if carried is not None else []
    if _ca_paths(doc, "server", problems) != want_ca:
        problems.append(f"server ca {doc.get('ca')!r} is not {want_ca}")
    want_client: list[Any] = [list(pair) if pair[1] else pair[0] for pair in carried.client] if carried is not None else []
    if (doc.get("client") or []) != want_client:
        problems.append(f"server client {doc.get('client')!r} is not {want_client}")
    return problems


def check_crio_dropin(text: str, routes: Sequence[HostRoute], search: Sequence[str] = ()) -> list[str]:
    """Problems of a registries.conf.d drop-in against its routes and search order; empty when it is exactly right."""
    from regmirror.render.nodefiles import crio_prefixes  # here: nodefiles imports this module

    problems: list[str] = []
    if not text.startswith(c.OWNERSHIP_MARKER + "\n"):
        problems.append("the first line is not the ownership marker")
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        return [*problems, f"not valid TOML ({exc}): CRI-O would refuse its whole registry configuration"]
    if set(doc) - {"registry", "unqualified-search-registries"}:
        problems.append(f"unexpected keys {sorted(set(doc) - {'registry', 'unqualified-search-registries'})}")
    if doc.get("unqualified-search-registries", []) != list(search):
        problems.append(f"unqualified-search-registries {doc.get('unqualified-search-registries')!r}, not {list(search)}")
    entries = doc.get("registry", [])
    if not isinstance(entries, list):
        return [*problems, "no [[registry]] list"]
    by_prefix: dict[str, dict[str, Any]] = {}
    for entry in entries:
        if not isinstance(entry, dict) or set(entry) - CRIO_REGISTRY_KEYS or not isinstance(entry.get("prefix"), str):
            problems.append(f"[[registry]] {entry!r} has unexpected keys or no prefix")
            continue
        if entry["prefix"] in by_prefix:
            problems.append(f"prefix {entry['prefix']} is declared twice")
        by_prefix[entry["prefix"]] = entry
    expected = {prefix: route for route in routes for prefix in crio_prefixes(route.host)}
    if set(by_prefix) != set(expected):
        problems.append(f"prefixes {sorted(by_prefix)} are not {sorted(expected)}")
    for prefix, route in expected.items():
        entry = by_prefix.get(prefix)
        if entry is None:
            continue
        mirrors = entry.get("mirror", [])
        if not isinstance(mirrors, list) or not all(isinstance(m, dict) and not set(m) - CRIO_MIRROR_KEYS for m in mirrors):
            problems.append(f"{prefix}: [[registry.mirror]] entries are malformed")
            continue
        locations = [m.get("location") for m in mirrors]
        want = [_host_of(m.url) for m in route.mirrors]
        if route.blocked:
            if entry.get("blocked") is not True or mirrors:
                problems.append(f"{prefix}: a blocked strict host must be blocked = true without mirrors")
            continue
        if entry.get("blocked"):
            problems.append(f"{prefix}: blocked, but it has mirrors to use")
        if route.strict:
            if [*locations, entry.get("location")] != want:
                problems.append(f"{prefix}: strict host tries {[*locations, entry.get('location')]}, not only its mirrors {want}")
            continue
        want_location = prefix if prefix == "docker.io" else _host_of(route.server)
        if locations != want or entry.get("location") != want_location:
            problems.append(f"{prefix}: tries {[*locations, entry.get('location')]}, not {[*want, want_location]}")
    return problems
