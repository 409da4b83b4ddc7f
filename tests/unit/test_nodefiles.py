"""What each node's containerd and CRI-O files say, for the plans users will write."""

from __future__ import annotations

import tomllib

import pytest
from _agentkit import ca_cert

from regmirror import constants as c
from regmirror.agent.plan import parse_plan
from regmirror.models import Capability, FallbackPolicy, LabelSelector, LabelSelectorRequirement, Runtime
from regmirror.nodeplan import MirrorEntry, NodePlan, build_node_plan
from regmirror.render.nodefiles import (
    containerd_host_dir,
    containerd_host_dir_aliases,
    render_docker_daemon_json,
    render_node_files,
)

CERTS = c.CONTAINERD_CONFIG_PATH
CRIO = f"{c.CRIO_DROPIN_DIR}/{c.CRIO_DROPIN_FILE}"
CA_PEM = ca_cert()[0]
DOCKER_HUB_DIRS = {f"{CERTS}/{name}/hosts.toml" for name in ("docker.io", "index.docker.io", "registry-1.docker.io")}


def mirror(
    name: str,
    ip: str,
    *,
    hosts: list[str] | None = None,
    servers: dict[str, str] | None = None,
    priority: int = 100,
    fallback: FallbackPolicy = FallbackPolicy.ALLOW_UPSTREAM,
    runtimes: list[Runtime] | None = None,
    selector: LabelSelector | None = None,
    capabilities: list[Capability] | None = None,
    ca_pem: str | None = None,
    port: int = 5000,
) -> MirrorEntry:
    hosts = hosts or ["docker.io"]
    return MirrorEntry(
        name=name,
        hosts=hosts,
        servers=servers or {h: (c.DOCKER_HUB_SERVER if h == "docker.io" else f"https://{h}") for h in hosts},
        url=f"{'https' if ca_pem else 'http'}://{ip}:{port}",
        priority=priority,
        capabilities=capabilities or [Capability.PULL, Capability.RESOLVE],
        fallback=fallback,
        runtimes=runtimes or [Runtime.CONTAINERD],
        node_selector=selector or LabelSelector(),
        ca_pem=ca_pem,
    )


def plan(*entries: MirrorEntry) -> NodePlan:
    return build_node_plan(list(entries))


def hosts_toml(files: dict[str, str], host: str) -> dict[str, object]:
    return tomllib.loads(files[f"{CERTS}/{containerd_host_dir(host)}/hosts.toml"])


def routes(parsed: dict[str, object]) -> list[str]:
    """The URLs containerd tries, in order: [host] entries in file order, then server."""
    hosts = parsed.get("host", {})
    assert isinstance(hosts, dict)
    return [*hosts.keys(), str(parsed["server"])]


def code_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_docker_hub_goes_to_the_mirror_then_registry_1() -> None:
    files = render_node_files(plan(mirror("hub", "10.96.0.20")), {})
    text = files[f"{CERTS}/docker.io/hosts.toml"]
    assert text.splitlines()[0] == c.OWNERSHIP_MARKER
    assert 'server = "https://registry-1.docker.io"' in text
    assert '[host."http://10.96.0.20:5000"]' in text
    parsed = tomllib.loads(text)
    assert parsed["host"] == {"http://10.96.0.20:5000": {"capabilities": ["pull", "resolve"]}}
    assert "skip_verify" not in text
    # registry-1.docker.io/... and (for ctr) index.docker.io/... are looked up
    # under their own names: each gets the same file.
    assert set(files) == DOCKER_HUB_DIRS
    assert {files[p] for p in DOCKER_HUB_DIRS} == {text}


def test_a_host_with_a_port_lands_in_the_directory_containerd_tries_first() -> None:
    files = render_node_files(plan(mirror("corp", "10.96.0.30", hosts=["registry.corp:5443"])), {})
    assert set(files) == {f"{CERTS}/registry.corp_5443_/hosts.toml"}
    assert hosts_toml(files, "registry.corp:5443")["server"] == "https://registry.corp:5443"
    # containerd 1.6, 1.7 and 2.x all try host_port_ first, then host:port.
    assert containerd_host_dir_aliases("registry.corp:5443") == ["registry.corp_5443_", "registry.corp:5443"]
    assert containerd_host_dir_aliases("quay.io") == ["quay.io"]


def test_two_mirrors_of_one_host_in_priority_order_then_name() -> None:
    files = render_node_files(
        plan(
            mirror("c-low", "10.96.0.3", priority=100),
            mirror("a-low", "10.96.0.1", priority=100),
            mirror("z-high", "10.96.0.9", priority=500),
        ),
        {},
    )
    assert routes(hosts_toml(files, "docker.io")) == [
        "http://10.96.0.9:5000",
        "http://10.96.0.1:5000",
        "http://10.96.0.3:5000",
        "https://registry-1.docker.io",
    ]


def test_never_contact_upstream_leaves_no_path_to_the_upstream() -> None:
    strict = mirror("vault", "10.96.0.40", fallback=FallbackPolicy.NEVER_CONTACT_UPSTREAM)
    second = mirror("backup", "10.96.0.41", priority=50, fallback=FallbackPolicy.NEVER_CONTACT_UPSTREAM)
    files = render_node_files(plan(strict, second), {})
    text = files[f"{CERTS}/docker.io/hosts.toml"]
    parsed = tomllib.loads(text)
    mirrors = {"http://10.96.0.40:5000", "http://10.96.0.41:5000"}
    assert set(routes(parsed)) == mirrors, "every endpoint containerd may try is a mirror"
    assert routes(parsed)[0] == "http://10.96.0.40:5000"
    assert parsed["server"] == "http://10.96.0.40:5000"
    assert not [line for line in code_lines(text) if "docker.io" in line]
    # containerd 1.6 needs at least one [host] table, or it falls back to the upstream.
    assert parsed["host"]


def test_one_strict_mirror_makes_its_host_strict_and_is_kept_when_down() -> None:
    files = render_node_files(
        plan(
            mirror("open", "10.96.0.50", priority=900),
            mirror("closed", "10.96.0.51", fallback=FallbackPolicy.NEVER_CONTACT_UPSTREAM),
        ),
        {},
        unhealthy=frozenset({"open", "closed"}),
    )
    parsed = hosts_toml(files, "docker.io")
    assert routes(parsed) == ["http://10.96.0.51:5000", "http://10.96.0.51:5000"]


def test_unhealthy_mirrors_are_withdrawn_and_a_host_without_mirrors_gets_no_file() -> None:
    p = plan(mirror("one", "10.96.0.1"), mirror("two", "10.96.0.2", priority=10), mirror("q", "10.96.0.3", hosts=["quay.io"]))
    files = render_node_files(p, {}, unhealthy=frozenset({"one", "q"}))
    assert routes(hosts_toml(files, "docker.io")) == ["http://10.96.0.2:5000", "https://registry-1.docker.io"]
    assert f"{CERTS}/quay.io/hosts.toml" not in files
    assert render_node_files(p, {}, unhealthy=frozenset({"one", "two", "q"})) == {}


def test_node_selector_picks_the_nodes() -> None:
    gpu = LabelSelector(match_labels={"pool": "gpu"})
    not_edge = LabelSelector(match_expressions=[LabelSelectorRequirement(key="zone", operator="NotIn", values=["edge"])])
    p = plan(mirror("gpu", "10.96.0.1", selector=gpu), mirror("core", "10.96.0.2", hosts=["quay.io"], selector=not_edge))
    assert set(render_node_files(p, {"pool": "gpu", "zone": "a"})) == {*DOCKER_HUB_DIRS, f"{CERTS}/quay.io/hosts.toml"}
    assert set(render_node_files(p, {"pool": "cpu", "zone": "a"})) == {f"{CERTS}/quay.io/hosts.toml"}
    assert render_node_files(p, {"pool": "cpu", "zone": "edge"}) == {}


def test_a_tls_mirror_gets_its_ca_as_an_owned_file_and_no_skip_verify() -> None:
    files = render_node_files(plan(mirror("tls", "10.96.0.7", ca_pem=CA_PEM)), {})
    ca_path = f"{CERTS}/docker.io/tls-ca.crt"
    parsed = hosts_toml(files, "docker.io")
    assert parsed["host"] == {"https://10.96.0.7:5000": {"capabilities": ["pull", "resolve"], "ca": ca_path}}
    assert files[ca_path].splitlines()[0] == c.OWNERSHIP_MARKER
    assert files[ca_path] == f"{c.OWNERSHIP_MARKER}\n{CA_PEM.strip()}\n"
    assert all("skip_verify" not in text for text in files.values())


def test_crio_drop_in_lists_the_mirrors_for_crio_nodes_only() -> None:
    p = plan(
        mirror("both", "10.96.0.1", runtimes=[Runtime.CONTAINERD, Runtime.CRIO]),
        mirror("ctrd-only", "10.96.0.2", hosts=["quay.io"]),
        mirror("digest", "10.96.0.3", hosts=["ghcr.io"], runtimes=[Runtime.CRIO], capabilities=[Capability.PULL]),
    )
    files = render_node_files(p, {})
    text = files[CRIO]
    assert text.splitlines()[0] == c.OWNERSHIP_MARKER
    registries = {r["prefix"]: r for r in tomllib.loads(text)["registry"]}
    # registry-1.docker.io/... is a different prefix to containers/image.
    assert set(registries) == {"docker.io", "registry-1.docker.io", "ghcr.io"}
    assert registries["registry-1.docker.io"]["location"] == "registry-1.docker.io"
    assert registries["registry-1.docker.io"]["mirror"] == registries["docker.io"]["mirror"]
    assert registries["docker.io"]["location"] == "docker.io"
    assert registries["docker.io"]["mirror"] == [{"location": "10.96.0.1:5000", "insecure": True, "pull-from-mirror": "all"}]
    assert registries["ghcr.io"]["mirror"][0]["pull-from-mirror"] == "digest-only"
    assert f"{CERTS}/ghcr.io/hosts.toml" not in files


def test_crio_strict_host_uses_a_mirror_as_its_location() -> None:
    p = plan(
        mirror("a", "10.96.0.1", fallback=FallbackPolicy.NEVER_CONTACT_UPSTREAM, runtimes=[Runtime.CRIO]),
        mirror("b", "10.96.0.2", priority=10, fallback=FallbackPolicy.NEVER_CONTACT_UPSTREAM, runtimes=[Runtime.CRIO]),
    )
    regs = tomllib.loads(render_node_files(p, {})[CRIO])["registry"]
    assert [reg["prefix"] for reg in regs] == ["docker.io", "registry-1.docker.io"]
    for reg in regs:
        endpoints = [m["location"] for m in reg["mirror"]] + [reg["location"]]
        assert endpoints == ["10.96.0.1:5000", "10.96.0.2:5000"]
        assert reg["insecure"] is True
        assert "blocked" not in reg


def test_every_file_is_marked_and_parses() -> None:
    p = plan(
        mirror("hub", "10.96.0.1", runtimes=[Runtime.CONTAINERD, Runtime.CRIO]),
        mirror("corp", "10.96.0.2", hosts=["registry.corp:5443", "quay.io"], fallback=FallbackPolicy.NEVER_CONTACT_UPSTREAM, ca_pem=CA_PEM),
    )
    for path, text in render_node_files(p, {}).items():
        assert text.startswith(c.OWNERSHIP_MARKER + "\n"), path
        if path.endswith((".toml", ".conf")):
            tomllib.loads(text)


@pytest.mark.parametrize("unhealthy", [frozenset(), frozenset({"hub"}), frozenset({"corp", "sel"})])
def test_the_agents_lean_plan_reader_renders_the_same_files(unhealthy: frozenset[str]) -> None:
    p = plan(
        mirror("hub", "10.96.0.1", runtimes=[Runtime.CONTAINERD, Runtime.CRIO]),
        mirror("corp", "10.96.0.2", hosts=["registry.corp:5443"], fallback=FallbackPolicy.NEVER_CONTACT_UPSTREAM, ca_pem=CA_PEM),
        mirror(
            "sel",
            "10.96.0.3",
            hosts=["quay.io"],
            capabilities=[Capability.RESOLVE],
            selector=LabelSelector(
                match_labels={"a": "1"},
                match_expressions=[
                    LabelSelectorRequirement(key="b", operator="In", values=["x", "y"]),
                    LabelSelectorRequirement(key="c", operator="DoesNotExist"),
                    LabelSelectorRequirement(key="d", operator="Exists"),
                ],
            ),
        ),
    )
    lean = parse_plan(p.to_json())
    for labels in ({}, {"a": "1", "b": "x", "d": ""}, {"a": "1", "b": "x", "c": "", "d": ""}, {"a": "1", "b": "z", "d": ""}):
        assert render_node_files(lean, labels, unhealthy=unhealthy) == render_node_files(p, labels, unhealthy=unhealthy)
    assert render_docker_daemon_json(lean, {}) == render_docker_daemon_json(p, {})


def test_docker_daemon_json_covers_docker_hub_only() -> None:
    p = plan(mirror("hub", "10.96.0.1"), mirror("hub2", "10.96.0.2", priority=10), mirror("q", "10.96.0.3", hosts=["quay.io"]))
    assert render_docker_daemon_json(p, {}, frozenset({"hub2"})) == {
        "registry-mirrors": ["http://10.96.0.1:5000"],
        "insecure-registries": ["10.96.0.1:5000"],
    }


def test_an_empty_plan_renders_nothing() -> None:
    assert render_node_files(NodePlan(), {"any": "label"}) == {}


def test_dial_timeout_is_written_for_the_mirrors_only_when_asked() -> None:
    from regmirror.render.nodefiles import plan_node_files

    p = plan(mirror("hub", "10.96.0.20"), mirror("vault", "10.96.0.21", hosts=["quay.io"], fallback=FallbackPolicy.NEVER_CONTACT_UPSTREAM))
    without = plan_node_files(p, {})
    assert without.findings == [] and "dial_timeout" not in "".join(without.files.values())
    node = plan_node_files(p, {}, dial_timeout="200ms")
    assert node.findings == []
    hub = hosts_toml(node.files, "docker.io")
    assert hub["host"] == {"http://10.96.0.20:5000": {"capabilities": ["pull", "resolve"], "dial_timeout": "200ms"}}
    assert "dial_timeout" not in hub, "the upstream keeps containerd's default"
    vault = hosts_toml(node.files, "quay.io")
    # A strict host's server is a mirror too: it fails as fast as the [host] entry.
    assert vault["dial_timeout"] == "200ms" and vault["host"]["http://10.96.0.21:5000"]["dial_timeout"] == "200ms"
    # A blocked host has no mirror to dial.
    blocked = plan_node_files(plan(mirror("vault", "bad ip!", fallback=FallbackPolicy.NEVER_CONTACT_UPSTREAM)), {}, dial_timeout="200ms")
    assert blocked.files and "dial_timeout" not in "".join(blocked.files.values())


def test_the_check_refuses_a_dial_timeout_that_is_not_the_routes() -> None:
    from regmirror.render import nodecheck
    from regmirror.render.nodefiles import HostRoute, host_routes, render_hosts_toml

    (route,) = host_routes(plan(mirror("hub", "10.96.0.20")).model_copy(), {}, "containerd", dial_timeout="200ms")
    path = f"{CERTS}/docker.io"
    good = render_hosts_toml(route, path)
    assert nodecheck.check_hosts_toml({f"{path}/hosts.toml": good}, route, path) == []
    other = HostRoute(route.host, route.server, route.mirrors, route.strict, dial_timeout="30s")
    assert nodecheck.check_hosts_toml({f"{path}/hosts.toml": good}, other, path)
    upstream_too = good.replace('server = "https://registry-1.docker.io"', 'server = "https://registry-1.docker.io"\ndial_timeout = "1ms"')
    assert nodecheck.check_hosts_toml({f"{path}/hosts.toml": upstream_too}, route, path)


def test_the_plan_names_the_mirrors_service_for_the_endpoint_watch() -> None:
    from regmirror.models import RegistryMirrorSpec
    from regmirror.naming import child_name
    from regmirror.nodeplan import mirror_entry
    from regmirror.render.nodeinput import check_plan

    spec = RegistryMirrorSpec.model_validate({"upstream": {"url": "https://registry-1.docker.io"}})
    entry = mirror_entry("hub", spec, "10.96.0.10", service=f"regmirror-system/{child_name('hub')}")
    assert entry.service == "regmirror-system/regmirror-hub"
    for reader in (build_node_plan([entry]), parse_plan(build_node_plan([entry]).to_json())):
        (checked,) = check_plan(reader).mirrors
        assert checked.service == ("regmirror-system", "regmirror-hub")
    bad = parse_plan(build_node_plan([entry.model_copy(update={"service": "../x"})]).to_json())
    checked_bad = check_plan(bad)
    assert checked_bad.mirrors[0].service is None
    assert [f.reason for f in checked_bad.findings] == ["ServiceRejected"]
