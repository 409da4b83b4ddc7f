"""The agent's trust failures of issue 11, one class per test, each run through the real agent on a temporary node.

Every test here failed on main at d267c23 (checked with the agent code of that
commit) and names the class it pins down, not only the example that found it:
- host aliases and spellings of one registry (and two mirrors with one
  endpoint) gave hosts.toml one table twice: containerd refused the file and
  went to the upstream, even under NeverContactUpstream;
- CA bytes Python's ssl refuses (DER, a non-ASCII comment) crashed every step,
  taking every mirror off the node;
- the fallback `server` of a host followed whichever mirror sorted first;
- an admin's Docker-style certificates were shadowed by our hosts.toml;
- hostile plan values (`..`, newlines, unknown selector operators) were
  trusted by the writer and the selector.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import ssl
import threading
import tomllib
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from _agentkit import (
    CERTS,
    ca_cert,
    client_pair,
    containerd_endpoints,
    endpoint_capabilities,
    node_root,
    plan_json,
    tls_material,
    tree,
    wire_entry,
)
from test_agent_probe import Registry401

from regmirror.agent.files import apply_files
from regmirror.agent.loop import Agent, AgentConfig, StepResult
from regmirror.agent.nodeapi import InClusterClient, NodeInfo
from regmirror.agent.plan import SelectorRequirement
from regmirror.agent.probe import HealthTracker, http_probe
from regmirror.lowlevel import selector_matches
from regmirror.models import RegistryMirrorSpec
from regmirror.nodeplan import build_node_plan, mirror_entry
from regmirror.render.nodefiles import render_node_files

STRICT = "NeverContactUpstream"
DOCKER_HUB_UPSTREAM = "https://registry-1.docker.io"


def healthy(_url: str, _timeout: float, _ca: str | None) -> str | None:
    return None


def run_agent(tmp: Path, plan_text: str, *, labels: dict[str, str] | None = None, probe: Any = healthy) -> tuple[StepResult, Path, Agent]:
    """One real agent step on a temporary node; returns its result, the host root and the agent."""
    root = tmp / "host" if (tmp / "host").exists() else node_root(tmp)
    (tmp / "plan.json").write_text(plan_text)
    (tmp / "labels.json").write_text(json.dumps(labels or {}))
    config = AgentConfig(
        plan_path=tmp / "plan.json", host_root=root, node_labels_file=tmp / "labels.json", health_port=0, probe_timeout=0.2
    )
    tracker = HealthTracker(probe=probe, timeout=0.2) if probe is not None else None
    agent = Agent(config, tracker=tracker)
    return agent.step(), root, agent


def hosts_toml(root: Path, dir_name: str) -> str:
    return (root / CERTS.lstrip("/") / dir_name / "hosts.toml").read_text()


# ------------------------------------------------------------------ one registry, many spellings


@pytest.mark.parametrize(
    "hosts",
    [
        ["registry-1.docker.io", "docker.io"],
        ["docker.io", "index.docker.io"],
        ["docker.io", "docker.io"],  # what main's operator wrote for either list above
        ["registry-1.docker.io", "docker.io", "DOCKER.IO", "Index.Docker.Io"],
    ],
)
def test_a_strict_mirror_listed_under_docker_hubs_aliases_never_routes_to_the_upstream(tmp_path: Path, hosts: list[str]) -> None:
    outcome, root, _ = run_agent(tmp_path, plan_json(wire_entry("vault", "http://10.96.0.9:5000", hosts, fallback=STRICT)))
    assert outcome.ready, outcome.message
    for name in ("docker.io", "registry-1.docker.io", "index.docker.io"):
        text = hosts_toml(root, name)  # a table declared twice would raise here, as containerd refuses it
        assert containerd_endpoints(text) == ["http://10.96.0.9:5000", "http://10.96.0.9:5000"], name
        assert DOCKER_HUB_UPSTREAM not in containerd_endpoints(text)


def test_case_variants_of_one_host_are_one_route(tmp_path: Path) -> None:
    outcome, root, _ = run_agent(
        tmp_path, plan_json(wire_entry("q", "http://10.96.0.9:5000", ["Quay.IO", "quay.io", "QUAY.IO"], fallback=STRICT))
    )
    assert outcome.ready, outcome.message
    dirs = sorted(p.name for p in (root / CERTS.lstrip("/")).iterdir())
    assert dirs == ["quay.io"]
    assert containerd_endpoints(hosts_toml(root, "quay.io")) == ["http://10.96.0.9:5000", "http://10.96.0.9:5000"]


def test_two_mirrors_with_one_endpoint_give_one_table(tmp_path: Path) -> None:
    outcome, root, _ = run_agent(
        tmp_path,
        plan_json(
            wire_entry("a", "http://10.96.0.9:5000", ["quay.io"], fallback=STRICT, priority=200),
            wire_entry("b", "HTTP://10.96.0.9:5000/", ["quay.io"], fallback=STRICT),
        ),
    )
    assert outcome.ready, outcome.message
    assert containerd_endpoints(hosts_toml(root, "quay.io")) == ["http://10.96.0.9:5000", "http://10.96.0.9:5000"]
    assert outcome.files is not None and any(f.reason == "DuplicateEndpoint" and f.mirror == "b" for f in outcome.files.findings)


def test_the_operators_plan_path_folds_aliases_too() -> None:
    spec = RegistryMirrorSpec.model_validate(
        {"upstream": {"url": "https://registry-1.docker.io", "hosts": ["registry-1.docker.io", "docker.io", "index.docker.io"]}}
    )
    entry = mirror_entry("hub", spec, "10.96.0.9")
    assert entry.hosts == ["docker.io"]
    assert entry.upstream_host == "docker.io"
    files = render_node_files(build_node_plan([entry]), {})
    text = files[f"{CERTS}/docker.io/hosts.toml"]
    assert containerd_endpoints(text) == ["http://10.96.0.9:5000", DOCKER_HUB_UPSTREAM]


# ------------------------------------------------------------------ one bad CA


def refused(_url: str, _timeout: float, _ca: str | None) -> str | None:
    return "ConnectionRefusedError"


@pytest.mark.parametrize(
    ("label", "ca"),
    [
        ("DER, as the operator decoded it", ca_cert()[1].decode(errors="replace")),
        ("garbage", "not a certificate"),
        ("a PEM block that is not base64", "-----BEGIN CERTIFICATE-----\n%%%%\n-----END CERTIFICATE-----\n"),
    ],
)
def test_an_unusable_ca_costs_only_its_own_mirror_and_the_real_probe_does_not_crash(tmp_path: Path, label: str, ca: str) -> None:
    # The real HTTP probe (probe=None) is what crashed: it built its TLS context outside its error handling.
    outcome, root, _ = run_agent(
        tmp_path,
        plan_json(
            wire_entry("tls", "https://127.0.0.1:9", ["quay.io"], ca_pem=ca, fallback=STRICT),
            wire_entry("plain", "http://127.0.0.1:9", ["ghcr.io"], fallback=STRICT),
        ),
        probe=None,
    )
    assert outcome.ready, outcome.message
    assert containerd_endpoints(hosts_toml(root, "ghcr.io")) == ["http://127.0.0.1:9", "http://127.0.0.1:9"], "the other mirror is applied"
    # The TLS mirror stays (strict), without the unusable CA: containerd would fail every pull of the host on it.
    quay = tomllib.loads(hosts_toml(root, "quay.io"))
    assert quay["server"] == "https://127.0.0.1:9" and "ca" not in quay
    assert not list((root / CERTS.lstrip("/") / "quay.io").glob("*.crt"))
    assert outcome.files is not None
    assert [f.mirror for f in outcome.files.findings if f.reason == "CAUnusable"] == ["tls"], label


def test_a_ca_bundle_with_a_non_ascii_comment_is_used_without_the_comment(tmp_path: Path) -> None:
    pem = ca_cert()[0]
    outcome, root, _ = run_agent(
        tmp_path,
        plan_json(wire_entry("tls", "https://127.0.0.1:9", ["quay.io"], ca_pem=f"# Zertifikat für die Spiegel\n{pem}", fallback=STRICT)),
        probe=None,
    )
    assert outcome.ready, outcome.message
    ca_file = root / CERTS.lstrip("/") / "quay.io" / "tls-ca.crt"
    assert tomllib.loads(hosts_toml(root, "quay.io"))["host"]["https://127.0.0.1:9"]["ca"] == f"{CERTS}/quay.io/tls-ca.crt"
    assert pem.strip() in ca_file.read_text() and "für" not in ca_file.read_text()


# ------------------------------------------------------------------ the fallback server is the host's


def test_a_plain_http_upstream_keeps_its_http_fallback_whatever_else_routes_its_host(tmp_path: Path) -> None:
    own = wire_entry(
        "own",
        "http://10.96.0.1:5000",
        ["reg.local:5000"],
        servers={"reg.local:5000": "http://reg.local:5000"},
        upstream_host="reg.local:5000",
    )
    other = wire_entry("other", "http://10.96.0.2:5000", ["reg.local:5000", "quay.io"], priority=900, upstream_host="quay.io")
    for entries in ([own, other], [other, own]):
        outcome, root, _ = run_agent(tmp_path, plan_json(*entries))
        assert outcome.ready, outcome.message
        assert containerd_endpoints(hosts_toml(root, "reg.local_5000_")) == [
            "http://10.96.0.2:5000",
            "http://10.96.0.1:5000",
            "http://reg.local:5000",
        ]


def test_the_same_holds_for_plans_the_operator_builds_from_specs() -> None:
    own = RegistryMirrorSpec.model_validate({"upstream": {"url": "http://reg.local:5000"}})
    other = RegistryMirrorSpec.model_validate(
        {"upstream": {"url": "https://quay.io", "hosts": ["quay.io", "reg.local:5000"]}, "nodeConfig": {"priority": 900}}
    )
    plan = build_node_plan([mirror_entry("own", own, "10.96.0.1"), mirror_entry("other", other, "10.96.0.2")])
    text = render_node_files(plan, {})[f"{CERTS}/reg.local_5000_/hosts.toml"]
    assert containerd_endpoints(text)[-1] == "http://reg.local:5000"


# ------------------------------------------------------------------ an admin's certificates


def docker_style_certs(root: Path, dir_name: str, *, ca: str | None = None, client: bool = True) -> Path:
    directory = root / CERTS.lstrip("/") / dir_name
    directory.mkdir(parents=True)
    (directory / "ca.crt").write_text(ca if ca is not None else ca_cert("admin CA")[0])
    if client:
        cert, key = client_pair()
        (directory / "client.cert").write_text(cert)
        (directory / "client.key").write_text(key)
    return directory


def test_an_admins_docker_style_certificates_are_carried_into_our_hosts_toml(tmp_path: Path) -> None:
    root = node_root(tmp_path)
    # Docker names the directory host:port; containerd tries host_port_ first, where ours goes.
    admin = docker_style_certs(root, "reg.example.com:5000")
    before = tree(admin)
    outcome, root, _ = run_agent(tmp_path, plan_json(wire_entry("m", "http://10.96.0.1:5000", ["reg.example.com:5000"])))
    assert outcome.ready, outcome.message
    parsed = tomllib.loads(hosts_toml(root, "reg.example.com_5000_"))
    theirs = f"{CERTS}/reg.example.com:5000"
    assert parsed["server"] == "https://reg.example.com:5000"
    assert parsed["ca"] == [f"{theirs}/ca.crt"]
    assert parsed["client"] == [[f"{theirs}/client.cert", f"{theirs}/client.key"]]
    assert tree(admin) == before, "their files are referenced, never copied, moved or changed"
    assert outcome.files is not None and [f.reason for f in outcome.files.findings] == ["ForeignCertsCarried"]


def test_certificates_in_the_hosts_own_directory_are_carried_too(tmp_path: Path) -> None:
    root = node_root(tmp_path)
    docker_style_certs(root, "quay.io", client=False)
    outcome, root, _ = run_agent(tmp_path, plan_json(wire_entry("m", "http://10.96.0.1:5000", ["quay.io"])))
    assert outcome.ready, outcome.message
    assert tomllib.loads(hosts_toml(root, "quay.io"))["ca"] == [f"{CERTS}/quay.io/ca.crt"]


def test_an_admins_certificate_containerd_cannot_load_refuses_the_host_and_says_so(tmp_path: Path) -> None:
    root = node_root(tmp_path)
    admin = docker_style_certs(root, "quay.io", ca="not a certificate\n", client=False)
    outcome, root, _ = run_agent(
        tmp_path, plan_json(wire_entry("m", "http://10.96.0.1:5000", ["quay.io"]), wire_entry("g", "http://10.96.0.2:5000", ["ghcr.io"]))
    )
    assert not outcome.ready and outcome.reason == "ForeignFileSkipped"
    assert "quay.io/ca.crt" in outcome.message
    assert not (admin / "hosts.toml").exists()
    assert containerd_endpoints(hosts_toml(root, "ghcr.io"))[0] == "http://10.96.0.2:5000", "other hosts are applied"


def test_a_strict_host_does_not_need_the_upstreams_certificates_but_says_it_ignores_them(tmp_path: Path) -> None:
    root = node_root(tmp_path)
    docker_style_certs(root, "quay.io")
    outcome, root, _ = run_agent(tmp_path, plan_json(wire_entry("m", "http://10.96.0.1:5000", ["quay.io"], fallback=STRICT)))
    assert outcome.ready, outcome.message
    parsed = tomllib.loads(hosts_toml(root, "quay.io"))
    assert "client" not in parsed and "ca" not in parsed
    assert outcome.files is not None and [f.reason for f in outcome.files.findings] == ["ForeignCertsIgnored"]


# ------------------------------------------------------------------ hostile plans


def test_a_name_with_a_newline_cannot_inject_a_table(tmp_path: Path) -> None:
    evil = wire_entry('evil\n[host."http://attacker:1"]\ncapabilities = ["pull"]', "http://10.96.0.1:5000", ["quay.io"])
    good = wire_entry("good", "http://10.96.0.2:5000", ["quay.io"])
    outcome, root, _ = run_agent(tmp_path, plan_json(evil, good))
    assert outcome.ready, outcome.message
    text = hosts_toml(root, "quay.io")
    assert containerd_endpoints(text) == ["http://10.96.0.2:5000", "https://quay.io"]
    assert "attacker" not in text


@pytest.mark.parametrize(
    "entry",
    [
        wire_entry("../../../../tmp/escape", "https://10.96.0.1:5000", ["quay.io"], ca_pem=ca_cert()[0], fallback=STRICT),
        wire_entry("m", "http://10.96.0.1:5000", ["../../../../tmp/escape", "..", "a/../../b"], fallback=STRICT),
        wire_entry("m", "http://10.96.0.1:5000/../../x", ["quay.io"], fallback=STRICT),
    ],
)
def test_paths_from_the_plan_never_leave_the_managed_directories(tmp_path: Path, entry: dict[str, Any]) -> None:
    root = node_root(tmp_path)
    before = tree(tmp_path)
    run_agent(tmp_path, plan_json(entry))
    after = tree(tmp_path)
    changed = {p for p in set(after) | set(before) if after.get(p) != before.get(p)} - {"plan.json", "labels.json"}
    assert all(p.startswith(f"host{CERTS}/") for p in changed), sorted(changed)
    assert not (tmp_path / "escape").exists() and not (root / "tmp").exists()


def test_the_writer_refuses_paths_that_climb_out_even_if_asked(tmp_path: Path) -> None:
    marker = "# managed-by: regmirror-agent (do not edit; changes are overwritten)\n"
    result = apply_files(
        {f"{CERTS}/../../escape/x": marker, f"{CERTS}/a/./b": marker, f"{CERTS}//c": marker},
        host_root=tmp_path,
        managed_dirs=[CERTS],
    )
    assert len(result.errors) == 3 and not result.written
    assert not (tmp_path / "etc" / "escape").exists()


def test_the_writer_does_not_write_through_a_symlinked_directory(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    certs = tmp_path / CERTS.lstrip("/")
    certs.mkdir(parents=True)
    (certs / "quay.io").symlink_to(outside)
    marker = "# managed-by: regmirror-agent (do not edit; changes are overwritten)\n"
    result = apply_files({f"{CERTS}/quay.io/hosts.toml": marker}, host_root=tmp_path, managed_dirs=[CERTS])
    assert result.conflicts and not result.written
    assert list(outside.iterdir()) == []


@pytest.mark.parametrize("operator", ["Gt", "in", "", "Exists ", "NotIn\n"])
def test_an_unknown_selector_operator_selects_no_node(tmp_path: Path, operator: str) -> None:
    selector = {"matchLabels": {}, "matchExpressions": [{"key": "pool", "operator": operator, "values": ["a"]}]}
    outcome, root, _ = run_agent(
        tmp_path, plan_json(wire_entry("m", "http://10.96.0.1:5000", ["quay.io"], selector=selector)), labels={"pool": "a"}
    )
    assert not (root / CERTS.lstrip("/") / "quay.io").exists()
    assert outcome.files is not None and [f.reason for f in outcome.files.findings] == ["MirrorRejected"]


def test_a_strict_mirror_that_cannot_be_used_blocks_its_hosts_instead_of_opening_them(tmp_path: Path) -> None:
    outcome, root, _ = run_agent(tmp_path, plan_json(wire_entry("vault", "ftp://10.96.0.1:21", ["quay.io"], fallback=STRICT)))
    assert outcome.ready, outcome.message
    text = hosts_toml(root, "quay.io")
    caps = endpoint_capabilities(text)
    assert all(not {"pull", "resolve"} & set(c) for c in caps.values()), caps
    assert not [e for e in caps if "quay.io" in e]


@pytest.mark.parametrize("operator", ["Gt", "Lt", "in", "", "Exists "])
def test_the_shared_selector_matcher_fails_closed_on_an_operator_it_does_not_know(operator: str) -> None:
    requirement = SelectorRequirement(key="pool", operator=operator, values=("a",))
    assert not selector_matches({}, [requirement], {"pool": "a"})
    assert not selector_matches({}, [requirement], {})
    assert selector_matches({}, [SelectorRequirement(key="pool", operator="NotIn", values=("b",))], {"pool": "a"})


# ------------------------------------------------------------------ the probe over TLS, for real


@contextlib.contextmanager
def tls_registry(tmp: Path) -> Iterator[tuple[str, str]]:
    """An https server on 127.0.0.1 answering /v2/ with 401, its certificate signed by a private CA: (url, CA PEM)."""
    ca, cert, key = tls_material(tmp, "127.0.0.1")
    server = ThreadingHTTPServer(("127.0.0.1", 0), Registry401)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(cert), str(key))
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}", ca.read_text()
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_the_probe_verifies_a_tls_mirror_against_its_bundle_and_never_raises(tmp_path: Path) -> None:
    with tls_registry(tmp_path) as (url, ca):
        assert http_probe(url, 2, ca) is None
        assert http_probe(url, 2, f"# Zertifikat für den Spiegel\n{ca}") is None, "comments are not certificates, and do not matter"
        other = ca_cert("another CA")[0]
        assert "CERTIFICATE_VERIFY_FAILED" in str(http_probe(url, 2, other))
        assert "CAError" in str(http_probe(url, 2, ca_cert()[1].decode(errors="replace")))
        assert http_probe(url, 2, None) is not None, "a private CA is not a system root"


# ------------------------------------------------------------------ what the agent tells people


class RecordingApi:
    """Stands in for the API server: records the Events the agent posts (the wire body, as nodeapi builds it)."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def get_node(self, name: str) -> NodeInfo:
        return NodeInfo(name, "uid-1", {}, "containerd://1.7.0")

    def post_event(self, node: NodeInfo, reason: str, message: str, *, warning: bool, mirror: str | None = None) -> None:
        client = InClusterClient.__new__(InClusterClient)
        client.namespace = "default"
        client._request = lambda method, path, body=None: self.events.append(body) or {}  # type: ignore[method-assign]
        InClusterClient.post_event(client, node, reason, message, warning=warning, mirror=mirror)


def test_a_broken_mirror_is_named_in_one_event_and_the_report_while_the_node_stays_ready(tmp_path: Path) -> None:
    root = node_root(tmp_path)
    plan = plan_json(
        wire_entry("broken", "https://10.96.0.1:5000", ["quay.io"], ca_pem="not a certificate", fallback=STRICT),
        wire_entry("fine", "http://10.96.0.2:5000", ["ghcr.io"], fallback=STRICT),
        wire_entry("bad-selector", "http://10.96.0.3:5000", ["gcr.io"], selector={"matchExpressions": [{"key": "a", "operator": "Gt"}]}),
    )
    (tmp_path / "plan.json").write_text(plan)
    api = RecordingApi()
    config = AgentConfig(plan_path=tmp_path / "plan.json", host_root=root, node_name="n1", health_port=0)
    agent = Agent(config, api=api, tracker=HealthTracker(probe=healthy))  # type: ignore[arg-type]
    for _ in range(3):
        outcome = agent.step()
    assert outcome.ready and "broken: Degraded" in outcome.message and "bad-selector: Rejected" in outcome.message
    posted = {(e["reason"], e.get("related", {}).get("name")): e for e in api.events}
    assert set(posted) == {("CAUnusable", "broken"), ("MirrorRejected", "bad-selector")}, "each finding once, not once per step"
    event = posted[("CAUnusable", "broken")]
    assert event["involvedObject"]["kind"] == "Node" and event["type"] == "Warning"
    assert event["related"] == {"apiVersion": "regmirror.dev/v1alpha1", "kind": "RegistryMirror", "name": "broken"}
    report = agent.readiness.get_report()
    assert report["plan"] == hashlib.sha256(plan.encode()).hexdigest()[:16]
    assert {n: m["state"] for n, m in report["mirrors"].items()} == {"broken": "Degraded", "fine": "Applied", "bad-selector": "Rejected"}
    assert report["mirrors"]["broken"]["findings"][0]["reason"] == "CAUnusable"
    assert report["hosts"]["containerd/ghcr.io"] == {"state": "Routed", "strict": True, "server": "https://ghcr.io", "mirrors": ["fine"]}

    # Fixed, then broken again: the second breakage is news again.
    (tmp_path / "plan.json").write_text(plan.replace('"not a certificate"', "null"))
    agent.step()
    (tmp_path / "plan.json").write_text(plan)
    agent.step()
    assert [e["reason"] for e in api.events].count("CAUnusable") == 2
