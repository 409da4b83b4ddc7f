"""The nodes' credentials in the node's files: a header per mirror in hosts.toml, root-only, never anything else changed.

The agent runs for real (`Agent.step` on a temporary host root, the plan and
the mounted Secret as files); what containerd would read is parsed back with
the tests' own reader (_agentkit), independent of the renderer.
"""

from __future__ import annotations

import json
import stat
import tomllib
from pathlib import Path
from typing import Any

from _agentkit import CERTS, containerd_endpoints, node_root, wire_entry
from hypothesis import given, settings
from hypothesis import strategies as st

from regmirror import access as acc
from regmirror.agent.loop import Agent, AgentConfig
from regmirror.agent.probe import HealthTracker
from regmirror.render import nodeauth, nodefiles

HUB = "http://10.96.0.10:5000"
QUAY = "http://10.96.0.11:5000"


def creds(revision: int) -> acc.Credential:
    return acc.Credential(acc.node_username(revision), f"{'p' * 40}{revision:03d}")


def node_secret(tmp: Path, entries: dict[str, dict[int, acc.Credential]]) -> Path:
    """regmirror-agent-credentials as the kubelet mounts it: one file per mirror."""
    auth = tmp / "node-auth"
    auth.mkdir(exist_ok=True)
    for name, by_rev in entries.items():
        (auth / name).write_text(
            json.dumps({"revision": max(by_rev), "authorizations": {str(r): c.authorization for r, c in by_rev.items()}})
        )
    return auth


def agent(tmp: Path, plan: dict[str, Any], auth_dir: Path | None) -> Agent:
    (tmp / "mirrors.json").write_text(json.dumps(plan))
    (tmp / "labels.json").write_text("{}")
    config = AgentConfig(
        plan_path=tmp / "mirrors.json",
        host_root=node_root(tmp),
        node_labels_file=tmp / "labels.json",
        health_port=0,
        auth_dir=auth_dir,
    )
    # Every mirror answers: the probe is not what this test is about.
    return Agent(config, tracker=HealthTracker(probe=lambda url, timeout, ca: None))


def with_auth(entry: dict[str, Any], revision: int, *, required: bool = True) -> dict[str, Any]:
    """The entry of a mirror whose nodes carry credential `revision`; `required`: the mirror is Restricted (authRequired)."""
    return {**entry, "authRevision": revision, "authRequired": required}


def hosts_toml(root: Path, host: str) -> Path:
    return root / CERTS.lstrip("/") / host / "hosts.toml"


def test_each_mirror_gets_its_header_root_only_and_nothing_else_changes(tmp_path: Path) -> None:
    plan = {"mirrors": [with_auth(wire_entry("hub", HUB, ["docker.io"]), 4), wire_entry("quay", QUAY, ["quay.io"])]}
    a = agent(tmp_path, plan, node_secret(tmp_path, {"hub": {4: creds(4), 5: creds(5)}}))
    assert a.step().ready
    root = a.config.host_root
    hub = hosts_toml(root, "docker.io")
    parsed = tomllib.loads(hub.read_text())
    assert parsed["host"][HUB]["header"] == {"Authorization": creds(4).authorization}
    assert containerd_endpoints(hub.read_text()) == [HUB, "https://registry-1.docker.io"], "routing unchanged"
    assert stat.S_IMODE(hub.stat().st_mode) == 0o600, "a file with a credential is root's only"
    quay = hosts_toml(root, "quay.io")
    assert "header" not in quay.read_text() and stat.S_IMODE(quay.stat().st_mode) == 0o644
    # Docker Hub's other spellings carry it too, each root-only.
    for alias in ("index.docker.io", "registry-1.docker.io"):
        path = hosts_toml(root, alias)
        assert tomllib.loads(path.read_text())["host"][HUB]["header"]["Authorization"] == creds(4).authorization
        assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_strict_host_sends_it_to_the_mirror_that_is_its_server_too(tmp_path: Path) -> None:
    plan = {"mirrors": [with_auth(wire_entry("hub", HUB, ["docker.io"], fallback="NeverContactUpstream"), 1)]}
    a = agent(tmp_path, plan, node_secret(tmp_path, {"hub": {1: creds(1)}}))
    assert a.step().ready
    parsed = tomllib.loads(hosts_toml(a.config.host_root, "docker.io").read_text())
    assert parsed["server"] == HUB and parsed["header"] == {"Authorization": creds(1).authorization}
    assert parsed["host"][HUB]["header"] == {"Authorization": creds(1).authorization}


def test_a_rotation_rewrites_the_header_and_a_file_put_back_to_0644_is_made_private_again(tmp_path: Path) -> None:
    auth = node_secret(tmp_path, {"hub": {1: creds(1), 2: creds(2)}})
    a = agent(tmp_path, {"mirrors": [with_auth(wire_entry("hub", HUB, ["docker.io"]), 1)]}, auth)
    assert a.step().ready
    hub = hosts_toml(a.config.host_root, "docker.io")
    hub.chmod(0o644)
    assert a.step().ready
    assert stat.S_IMODE(hub.stat().st_mode) == 0o600
    (tmp_path / "mirrors.json").write_text(json.dumps({"mirrors": [with_auth(wire_entry("hub", HUB, ["docker.io"]), 2)]}))
    assert a.step().ready
    assert creds(2).authorization in hub.read_text() and creds(1).authorization not in hub.read_text()


def test_a_revision_the_node_lacks_keeps_the_old_file_and_the_node_not_ready(tmp_path: Path) -> None:
    auth = node_secret(tmp_path, {"hub": {1: creds(1)}})
    a = agent(tmp_path, {"mirrors": [with_auth(wire_entry("hub", HUB, ["docker.io"]), 1)]}, auth)
    assert a.step().ready
    hub = hosts_toml(a.config.host_root, "docker.io")
    before = hub.read_bytes()
    (tmp_path / "mirrors.json").write_text(json.dumps({"mirrors": [with_auth(wire_entry("hub", HUB, ["docker.io"]), 2)]}))
    result = a.step()
    assert not result.ready and "does not hold the credential" in result.message
    assert hub.read_bytes() == before, "the old credential is still accepted: keep it"
    node_secret(tmp_path, {"hub": {1: creds(1), 2: creds(2)}})  # the kubelet catches up
    assert a.step().ready and creds(2).authorization in hub.read_text()


def test_no_file_yet_and_no_credential_writes_the_route_without_one(tmp_path: Path) -> None:
    a = agent(tmp_path, {"mirrors": [with_auth(wire_entry("hub", HUB, ["docker.io"]), 3)]}, None)
    result = a.step()
    assert not result.ready
    text = hosts_toml(a.config.host_root, "docker.io").read_text()
    assert containerd_endpoints(text) == [HUB, "https://registry-1.docker.io"] and "header" not in text


def test_a_mounted_value_that_is_not_a_basic_credential_never_reaches_a_file(tmp_path: Path) -> None:
    auth = tmp_path / "node-auth"
    auth.mkdir()
    hostile = 'Basic x"\n[host."http://evil:1"]\n'
    (auth / "hub").write_text(json.dumps({"revision": 1, "authorizations": {"1": hostile}}))
    a = agent(tmp_path, {"mirrors": [with_auth(wire_entry("hub", HUB, ["docker.io"]), 1)]}, auth)
    assert not a.step().ready
    text = hosts_toml(a.config.host_root, "docker.io").read_text()
    assert "evil" not in text and containerd_endpoints(text) == [HUB, "https://registry-1.docker.io"]


# ---------------------------------------------------------------- searched: headers never change a route

mirror_names = st.sampled_from(["a", "b", "c"])
entries = st.builds(
    lambda name, port, hosts, strict, prio: wire_entry(
        name, f"http://10.96.0.{port}:5000", hosts, fallback="NeverContactUpstream" if strict else "AllowUpstream", priority=prio
    ),
    mirror_names,
    st.integers(1, 3),
    st.lists(st.sampled_from(["docker.io", "quay.io", "registry.k8s.io", "ghcr.io:8443"]), min_size=1, max_size=2, unique=True),
    st.booleans(),
    st.integers(0, 2),
)


@settings(max_examples=300, deadline=None)
@given(
    plan=st.lists(entries, min_size=1, max_size=4),
    held=st.dictionaries(mirror_names, st.integers(1, 3)),
    existing=st.booleans(),
)
def test_credentials_add_headers_and_never_change_where_a_host_goes(
    plan: list[dict[str, Any]], held: dict[str, int], existing: bool
) -> None:
    from regmirror.agent.plan import parse_plan

    checked = parse_plan(json.dumps({"mirrors": plan}))
    before = nodefiles.plan_node_files(checked, {})
    after = nodefiles.plan_node_files(checked, {})
    values = {name: creds(rev).authorization for name, rev in held.items()}
    pending = {e["name"] for e in plan} - set(values)
    paths = set(after.files) if existing else set()
    result = nodeauth.add_credentials(after, values, pending, containerd_config_path=CERTS, existing=paths)
    for path, text in after.files.items():
        original = before.files[path]
        if text == original:
            continue
        assert path in result.private
        assert containerd_endpoints(text) == containerd_endpoints(original)
        parsed = tomllib.loads(text)
        for url, table in parsed.get("host", {}).items():
            # Two entries with one endpoint are listed once (nodefiles' DuplicateEndpoint): one of their credentials.
            owners = {values[e["name"]] for e in plan if e["url"] == url and e["name"] in values}
            if "header" in table:
                assert set(table["header"]) == {"Authorization"} and table["header"]["Authorization"] in owners
    # A kept file is never rewritten; a pending mirror is reported, and only then is the node not ready.
    assert {f.mirror for f in result.findings if f.reason == "CredentialPending"} <= pending
    for path in set(before.files) - set(after.files):
        assert path.rsplit("/", 1)[0] in after.keep


# ---------------------------------------------------------------- CRI-O: the auth file it reads on every pull

CRIO_AUTH = "run/containers/0/auth.json"


def crio_entry(name: str, url: str, hosts: list[str], **kw: Any) -> dict[str, Any]:
    return wire_entry(name, url, hosts, runtimes=["crio"], **kw)


def crio_auth(root: Path) -> dict[str, Any]:
    parsed: dict[str, Any] = json.loads((root / CRIO_AUTH).read_text())
    return parsed


def decoded(entry: dict[str, str]) -> str:
    import base64

    return base64.b64decode(entry["auth"]).decode()


def crio_agent(tmp: Path, plan: dict[str, Any], auth_dir: Path | None) -> Agent:
    """The agent on a node whose /run/containers is mounted (the DaemonSet's hostPath for CRI-O)."""
    a = agent(tmp, plan, auth_dir)
    (a.config.host_root / "run/containers").mkdir(parents=True)
    return a


def test_crio_gets_each_restricted_mirror_in_its_auth_file_root_only(tmp_path: Path) -> None:
    plan = {"mirrors": [with_auth(crio_entry("hub", HUB, ["docker.io"]), 4), crio_entry("quay", QUAY, ["quay.io"])]}
    a = crio_agent(tmp_path, plan, node_secret(tmp_path, {"hub": {4: creds(4), 5: creds(5)}}))
    assert a.step().ready
    root = a.config.host_root
    auths = crio_auth(root)["auths"]
    assert set(auths) == {"10.96.0.10:5000"}, "the Open mirror gets no entry"
    assert decoded(auths["10.96.0.10:5000"]) == f"{creds(4).username}:{creds(4).password}"
    assert stat.S_IMODE((root / CRIO_AUTH).stat().st_mode) == 0o600
    assert a.readiness.get_report()["mirrors"]["hub"]["state"] == "Applied"


def test_crio_a_foreign_auth_file_is_left_alone_and_the_mirror_reported(tmp_path: Path) -> None:
    plan = {"mirrors": [with_auth(crio_entry("hub", HUB, ["docker.io"]), 1)]}
    a = crio_agent(tmp_path, plan, node_secret(tmp_path, {"hub": {1: creds(1)}}))
    foreign = a.config.host_root / CRIO_AUTH
    foreign.parent.mkdir()
    theirs = '{"auths": {"quay.io": {"auth": "dXNlcjpwYXNz"}}}\n'
    foreign.write_text(theirs)
    result = a.step()
    assert not result.ready and "cannot get its credential" in result.message
    assert foreign.read_text() == theirs, "podman login's file is never overwritten"
    hub = a.readiness.get_report()["mirrors"]["hub"]
    assert hub["state"] == "Degraded" and [f["reason"] for f in hub["findings"]] == ["CredentialUnsupported"]
    assert creds(1).password not in json.dumps(a.readiness.get_report())
    foreign.unlink()  # the admin moves their login elsewhere
    assert a.step().ready and set(crio_auth(a.config.host_root)["auths"]) == {"10.96.0.10:5000"}


def test_crio_with_its_own_global_auth_file_is_reported_not_silently_skipped(tmp_path: Path) -> None:
    plan = {"mirrors": [with_auth(crio_entry("hub", HUB, ["docker.io"]), 1)]}
    a = crio_agent(tmp_path, plan, node_secret(tmp_path, {"hub": {1: creds(1)}}))
    conf = a.config.host_root / "etc/crio/crio.conf.d/10-auth.conf"
    conf.parent.mkdir(parents=True)
    conf.write_text('[crio.image]\nauto_reload_registries = true\nglobal_auth_file = "/var/lib/kubelet/config.json"\n')
    assert not a.step().ready
    assert not (a.config.host_root / CRIO_AUTH).exists(), "a file CRI-O does not read is not written"
    message = a.readiness.get_report()["mirrors"]["hub"]["findings"][0]["message"]
    assert "/var/lib/kubelet/config.json" in message and "restart" in message
    conf.write_text(
        '[crio.image]\nauto_reload_registries = true\nglobal_auth_file = "/run/containers/0/auth.json"\n'
    )  # the file we write: fine
    assert a.step().ready and (a.config.host_root / CRIO_AUTH).exists()


def test_crio_a_revision_the_node_lacks_keeps_the_old_entry_then_rotates_and_open_removes_the_file(tmp_path: Path) -> None:
    auth = node_secret(tmp_path, {"hub": {1: creds(1)}})
    a = crio_agent(tmp_path, {"mirrors": [with_auth(crio_entry("hub", HUB, ["docker.io"]), 1)]}, auth)
    assert a.step().ready
    path = a.config.host_root / CRIO_AUTH
    before = path.read_bytes()
    (tmp_path / "mirrors.json").write_text(json.dumps({"mirrors": [with_auth(crio_entry("hub", HUB, ["docker.io"]), 2)]}))
    assert not a.step().ready
    assert path.read_bytes() == before, "the old credential is still accepted: keep it"
    node_secret(tmp_path, {"hub": {1: creds(1), 2: creds(2)}})
    assert a.step().ready
    assert decoded(crio_auth(a.config.host_root)["auths"]["10.96.0.10:5000"]).endswith(creds(2).password)
    (tmp_path / "mirrors.json").write_text(json.dumps({"mirrors": [crio_entry("hub", HUB, ["docker.io"])]}))  # Open again
    assert a.step().ready and not path.exists()


crio_entries = st.builds(
    lambda name, port, hosts, strict, both: wire_entry(
        name,
        f"http://10.96.0.{port}:5000",
        hosts,
        fallback="NeverContactUpstream" if strict else "AllowUpstream",
        runtimes=["containerd", "crio"] if both else ["crio"],
    ),
    mirror_names,
    st.integers(1, 3),
    st.lists(st.sampled_from(["docker.io", "quay.io", "registry.k8s.io", "ghcr.io:8443"]), min_size=1, max_size=2, unique=True),
    st.booleans(),
    st.booleans(),
)
endpoints = st.sampled_from([f"10.96.0.{n}:5000" for n in (1, 2, 3, 9)])


@settings(max_examples=300, deadline=None)
@given(
    plan=st.lists(crio_entries, min_size=1, max_size=4),
    held=st.dictionaries(mirror_names, st.integers(1, 3)),
    asked=st.sets(mirror_names),
    previous=st.dictionaries(endpoints, st.integers(1, 3).map(lambda r: creds(r).authorization[len("Basic ") :])),
)
def test_crio_auth_holds_exactly_the_routed_mirrors_that_asked(
    plan: list[dict[str, Any]], held: dict[str, int], asked: set[str], previous: dict[str, str]
) -> None:
    from regmirror.agent.plan import parse_plan

    files = nodefiles.plan_node_files(parse_plan(json.dumps({"mirrors": plan})), {}, crio_node=True)
    routes = [r for (_h, runtime), r in files.routes.items() if runtime == "crio"]
    values = {n: creds(r).authorization for n, r in held.items() if n in asked}
    pending = asked - set(values)
    decision = nodeauth.plan_crio_auth(routes, values, pending, previous)
    text = nodeauth.render_crio_auth(decision.auths)
    parsed = json.loads(text)
    assert nodeauth.read_owned_crio_auth(text) == decision.auths
    routed = {(m.name, nodeauth.crio_endpoint(m.url)) for r in routes if not r.blocked for m in r.mirrors}
    for endpoint, entry in parsed["auths"].items():
        owners = {name for name, e in routed if e == endpoint and name in asked}
        assert owners, f"{endpoint}: an entry for no mirror that asked"
        allowed = {values[n][len("Basic ") :] for n in owners if n in values} | ({previous.get(endpoint)} & {entry["auth"]})
        assert entry["auth"] in allowed
    conflicted = {f.mirror for f in decision.findings if f.reason == "CredentialConflict"}
    for name, endpoint in routed:
        if name in values and name not in conflicted:
            assert endpoint in parsed["auths"], f"{name}: held and routed, but no entry"
    assert decision.needed == {n for n, _e in routed} & asked


def test_crio_without_the_run_containers_mount_is_reported_not_written_into_the_agents_own_filesystem(tmp_path: Path) -> None:
    a = agent(tmp_path, {"mirrors": [with_auth(crio_entry("hub", HUB, ["docker.io"]), 1)]}, node_secret(tmp_path, {"hub": {1: creds(1)}}))
    assert not a.step().ready
    assert not (a.config.host_root / "run").exists()
    hub = a.readiness.get_report()["mirrors"]["hub"]
    assert hub["state"] == "Degraded" and "not mounted" in hub["findings"][0]["message"]


def test_crio_that_cannot_carry_an_open_mirrors_credential_is_reported_and_still_ready(tmp_path: Path) -> None:
    # Every mirror's entry names a credential (a switch to Restricted then needs no rollout); an Open one serves without it.
    plan = {"mirrors": [with_auth(crio_entry("hub", HUB, ["docker.io"]), 1, required=False)]}
    a = agent(tmp_path, plan, node_secret(tmp_path, {"hub": {1: creds(1)}}))  # no /run/containers mount
    assert a.step().ready, "an Open mirror does not hold the node back"
    hub = a.readiness.get_report()["mirrors"]["hub"]
    assert [f["reason"] for f in hub["findings"]] == ["CredentialUnsupported"], "but the node says it cannot carry it"
    # The same mirror made Restricted: now the node cannot be served, and says so.
    plan = {"mirrors": [with_auth(crio_entry("hub", HUB, ["docker.io"]), 1, required=True)]}
    (tmp_path / "mirrors.json").write_text(json.dumps(plan))
    assert not a.step().ready
    assert a.readiness.get_report()["mirrors"]["hub"]["state"] == "Degraded"


def test_crio_carries_an_open_mirrors_credential_where_it_can(tmp_path: Path) -> None:
    plan = {"mirrors": [with_auth(crio_entry("hub", HUB, ["docker.io"]), 2, required=False)]}
    a = crio_agent(tmp_path, plan, node_secret(tmp_path, {"hub": {2: creds(2)}}))
    assert a.step().ready
    assert decoded(crio_auth(a.config.host_root)["auths"]["10.96.0.10:5000"]) == f"{creds(2).username}:{creds(2).password}"


def test_a_node_without_an_open_mirrors_credential_is_served_and_says_so(tmp_path: Path) -> None:
    # The agent's Secret is not mounted yet: an Open mirror still serves the node, a Restricted one would answer 401.
    open_plan = {"mirrors": [with_auth(wire_entry("hub", HUB, ["docker.io"]), 3, required=False)]}
    a = agent(tmp_path, open_plan, None)
    assert a.step().ready
    assert [f["reason"] for f in a.readiness.get_report()["mirrors"]["hub"]["findings"]] == ["CredentialPending"]
    assert "Authorization" not in hosts_toml(a.config.host_root, "docker.io").read_text()
    (tmp_path / "mirrors.json").write_text(json.dumps({"mirrors": [with_auth(wire_entry("hub", HUB, ["docker.io"]), 3)]}))
    assert not a.step().ready, "Restricted: the node cannot pull through it until it holds the credential"
