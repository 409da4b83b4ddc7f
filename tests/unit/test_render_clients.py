"""`regmirror render --client` and `--node-config`: each output parses and routes every host as the nodes' own files do.

The client scripts run for real (sh, with $ROOT a temporary directory and a
stub `kubectl` that answers from a Secret made here), and what they wrote is
read back with the tests' own readers (_agentkit): TOML and JSON parsers and
the order containerd tries endpoints in. The reference is what the agent
writes on a node for the same mirror (render/nodefiles.py), with the
endpoint mapped.
"""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from _agentkit import containerd_endpoints
from hypothesis import given, settings
from hypothesis import strategies as st

from regmirror import access as acc
from regmirror.models import RegistryMirror
from regmirror.nodeplan import build_node_plan, mirror_entry
from regmirror.offline import load_documents
from regmirror.render import clients, nodefiles, platforms

ENDPOINT = "203.0.113.7:30500"
CLIENT = acc.Credential("client-ci", "c" * 43)


def mirror(name: str = "hub", **spec: Any) -> RegistryMirror:
    body: dict[str, Any] = {"upstream": {"url": "https://registry-1.docker.io"}, **spec}
    return RegistryMirror.model_validate({"metadata": {"name": name}, "spec": body})


def stub_bin(tmp: Path, secret: acc.Credential = CLIENT) -> Path:
    """kubectl answering for the client Secret and the Service; podman/docker recording their login."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir(exist_ok=True)
    data = {k: base64.b64encode(v.encode()).decode() for k, v in acc.client_secret_data(secret).items()}
    kubectl = [
        "#!/bin/sh",
        'case "$*" in',
        *(f'  *"{{.data.{k}}}"*) printf %s {v} ;;' for k, v in data.items()),
        "  *loadBalancer*) printf %s 203.0.113.7 ;;",
        "  *nodePort*) printf %s 30500 ;;",
        "  *InternalIP*) printf %s 198.51.100.4 ;;",
        "  *clusterIP*) printf %s 10.96.0.10 ;;",
        '  *) echo "stub kubectl: $*" >&2; exit 1 ;;',
        "esac",
    ]
    (bin_dir / "kubectl").write_text("\n".join(kubectl) + "\n")
    for tool in ("podman", "docker"):
        (bin_dir / tool).write_text(f'#!/bin/sh\necho "$*" > "$ROOT/{tool}.args"\ncat > "$ROOT/{tool}.stdin"\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    return bin_dir


def run_script(tmp: Path, script: str, **env: str) -> Path:
    root = tmp / "root"
    root.mkdir(exist_ok=True)
    bin_dir = stub_bin(tmp)
    proc = subprocess.run(
        ["sh", "-c", script],
        env={"PATH": f"{bin_dir}:/usr/bin:/bin", "ROOT": str(root), **env},
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return root


def node_hosts_toml(m: RegistryMirror, url: str) -> dict[str, str]:
    """What the agent writes on a node for this mirror alone, with its endpoint at `url`: dir -> hosts.toml."""
    entry = mirror_entry(m.name, m.spec, "10.96.0.10").model_copy(update={"url": url, "node_selector": m.spec.node_config.node_selector})
    files = nodefiles.plan_node_files(build_node_plan([entry]), {}).files
    return {path.split("/")[-2]: text for path, text in files.items() if path.endswith("/hosts.toml")}


@pytest.mark.parametrize(
    "spec",
    [
        {},  # Open Docker Hub, no credential needed
        {"access": {"policy": "Restricted", "clients": [{"name": "ci"}]}, "service": {"type": "LoadBalancer"}},
        {
            "upstream": {"url": "https://quay.io", "hosts": ["quay.io", "ghcr.io:8443"], "credentialsSecretRef": {"name": "q"}},
            "access": {"clients": [{"name": "ci"}]},
            "nodeConfig": {"fallback": "NeverContactUpstream"},
            "image": "registry.corp.example/registry:3",
            "service": {"type": "NodePort", "nodePort": 30500},
        },
    ],
    ids=["open-hub", "restricted-hub-lb", "strict-quay-nodeport"],
)
def test_containerd_client_routes_like_a_node_and_carries_only_its_own_credential(tmp_path: Path, spec: dict[str, Any]) -> None:
    m = mirror(**spec)
    script = clients.render_script(clients.client_config(m, "containerd"))
    assert CLIENT.password not in script and CLIENT.basic not in script, "the script reads the credential, never holds it"
    root = run_script(tmp_path, script, ENDPOINT=ENDPOINT)
    expected = node_hosts_toml(m, f"http://{ENDPOINT}")
    written = {p.parent.name: p for p in (root / "etc/containerd/certs.d").glob("*/hosts.toml")}
    assert set(written) == set(expected), "the same host directories as on a node"
    restricted = m.spec.effective_access_policy().value == "Restricted"
    for name, path in written.items():
        text = path.read_text()
        assert containerd_endpoints(text) == containerd_endpoints(expected[name]), "same mirrors, same order, same fallback"
        parsed = tomllib.loads(text)
        assert parsed.get("server") == tomllib.loads(expected[name]).get("server"), "strict stays strict"
        headers = {url: t.get("header") for url, t in parsed.get("host", {}).items()}
        if restricted:
            assert headers == {f"http://{ENDPOINT}": {"Authorization": CLIENT.authorization}}
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
        else:
            assert headers == {f"http://{ENDPOINT}": None}


def test_the_endpoint_comes_from_the_service_when_not_given(tmp_path: Path) -> None:
    m = mirror(service={"type": "NodePort"}, access={"policy": "Restricted", "clients": [{"name": "ci"}]})
    root = run_script(tmp_path, clients.render_script(clients.client_config(m, "containerd")))
    text = (root / "etc/containerd/certs.d/docker.io/hosts.toml").read_text()
    assert containerd_endpoints(text)[0] == "http://198.51.100.4:30500"


def test_podman_gets_the_nodes_registries_conf_and_logs_in_with_the_clients_password(tmp_path: Path) -> None:
    m = mirror(access={"policy": "Restricted", "clients": [{"name": "ci"}]}, upstream={"url": "https://quay.io"})
    root = run_script(tmp_path, clients.render_script(clients.client_config(m, "podman")), ENDPOINT=ENDPOINT)
    dropin = root / "etc/containers/registries.conf.d/50-regmirror-hub.conf"
    parsed = tomllib.loads(dropin.read_text())
    entry = mirror_entry(m.name, m.spec, "10.96.0.10").model_copy(update={"url": f"http://{ENDPOINT}", "runtimes": ["crio"]})
    plan = nodefiles.host_routes(build_node_plan([entry]), {}, "crio")
    assert parsed == tomllib.loads(nodefiles.render_crio_dropin(plan)), "exactly what a CRI-O node gets"
    assert (root / "podman.args").read_text().split() == [
        "login",
        "--tls-verify=false",
        "--username",
        "client-ci",
        "--password-stdin",
        ENDPOINT,
    ]
    assert (root / "podman.stdin").read_text() == CLIENT.password


@pytest.mark.parametrize("restricted", [False, True])
def test_docker_mirrors_docker_hub_only_when_open_and_never_overwrites_daemon_json(tmp_path: Path, restricted: bool) -> None:
    spec: dict[str, Any] = {"access": {"policy": "Restricted", "clients": [{"name": "ci"}]}} if restricted else {}
    script = clients.render_script(clients.client_config(mirror(**spec), "docker"))
    root = run_script(tmp_path, script, ENDPOINT=ENDPOINT)
    daemon = json.loads((root / "etc/docker/daemon.json").read_text())
    assert daemon["insecure-registries"] == [ENDPOINT]
    if restricted:
        assert "registry-mirrors" not in daemon, "dockerd would send mirrors the Docker Hub credential"
        assert (root / "docker.args").read_text().split() == ["login", "--username", "client-ci", "--password-stdin", ENDPOINT]
        assert (root / "docker.stdin").read_text() == CLIENT.password
    else:
        assert daemon["registry-mirrors"] == [f"http://{ENDPOINT}"]
    # Someone's daemon.json stays as it is; ours goes beside it.
    (root / "etc/docker/daemon.json").write_text('{"log-driver": "journald"}\n')
    run_script(tmp_path, script, ENDPOINT=ENDPOINT)
    assert json.loads((root / "etc/docker/daemon.json").read_text()) == {"log-driver": "journald"}
    assert json.loads((root / "etc/docker/daemon.json.regmirror").read_text()) == daemon


def test_a_restricted_mirror_without_a_client_says_what_to_add() -> None:
    with pytest.raises(clients.ClientError, match=r"spec\.access\.clients"):
        clients.client_config(mirror(access={"policy": "Restricted"}), "containerd")
    with pytest.raises(clients.ClientError, match="no access client 'x'"):
        clients.client_config(mirror(access={"clients": [{"name": "ci"}]}), "containerd", client="x")


def test_the_cli_prints_the_script_and_refuses_an_unknown_mirror(tmp_path: Path) -> None:
    cr = tmp_path / "m.yaml"
    cr.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "regmirror.dev/v1alpha1",
                "kind": "RegistryMirror",
                "metadata": {"name": "hub"},
                "spec": {"upstream": {"url": "https://registry-1.docker.io"}},
            }
        )
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "operator")}
    ok = subprocess.run(
        ["python3", "-m", "regmirror", "render", "-f", str(cr), "--client", "containerd"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert ok.returncode == 0 and ok.stdout.startswith("#!/bin/sh")
    bad = subprocess.run(
        ["python3", "-m", "regmirror", "render", "-f", str(cr), "--client", "docker", "--mirror", "nope"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert bad.returncode == 1 and "no RegistryMirror named 'nope'" in bad.stderr


# ---------------------------------------------------------------- platforms: the same routes, each in its own format


def node_routes(mirrors: list[RegistryMirror], labels: dict[str, str]) -> dict[str, tuple[list[str], bool]]:
    """host -> (mirror endpoints in try order, strict) as the agent's hosts.toml on such a node says."""
    entries = [mirror_entry(m.name, m.spec, f"10.96.0.{10 + i}") for i, m in enumerate(mirrors)]
    files = nodefiles.plan_node_files(build_node_plan(entries), labels).files
    out = {}
    for path, text in files.items():
        if not path.endswith("/hosts.toml"):
            continue
        parsed = tomllib.loads(text)
        endpoints = containerd_endpoints(text)
        strict = parsed["server"] == endpoints[0] if endpoints[:-1] else False
        host = path.split("/")[-2]
        out[host] = ([e for e in endpoints[:-1]], strict)
    return out


def platform_doc(name: str, mirrors: list[RegistryMirror], labels: dict[str, str]) -> dict[str, Any]:
    entries = [mirror_entry(m.name, m.spec, f"10.96.0.{10 + i}") for i, m in enumerate(mirrors)]
    text = platforms.RENDERERS[name](entries, {m.name: m for m in mirrors}, labels).render()
    docs = load_documents(text)
    assert len(docs) == 1 and "*id" not in text and "&id" not in text, "plain YAML, no anchors"
    return dict(docs[0])


def platform_routes(name: str, doc: dict[str, Any]) -> dict[str, tuple[list[str], bool | None]]:
    """host -> (endpoints in order, strict or None where the format cannot say)."""
    if name == "k3s":
        return {h: (v["endpoint"], None) for h, v in doc["mirrors"].items()}
    if name == "talos":
        return {h: (v["endpoints"], bool(v.get("skipFallback"))) for h, v in doc["machine"]["registries"]["mirrors"].items()}
    return {e["server"]: ([h["host"] for h in e["hosts"]], None) for e in doc["registryHosts"]}


hosts_st = st.lists(st.sampled_from(["docker.io", "quay.io", "ghcr.io", "registry.example:5443"]), min_size=1, max_size=2, unique=True)
mirror_st = st.builds(
    lambda i, hosts, prio, strict, restricted, sel: mirror(
        f"m{i}",
        upstream={"url": "https://upstream.example", "hosts": hosts},
        nodeConfig={"priority": prio, "fallback": "NeverContactUpstream" if strict else "AllowUpstream", "nodeSelector": sel},
        access={"policy": "Restricted" if restricted else "Open", "clients": [{"name": "nodes"}]},
        image="registry.corp.example/registry:3",
    ),
    st.integers(0, 9),
    hosts_st,
    st.integers(0, 3),
    st.booleans(),
    st.booleans(),
    st.sampled_from([{}, {"matchLabels": {"pool": "a"}}]),
)


@settings(max_examples=200, deadline=None)
@given(mirrors=st.lists(mirror_st, min_size=1, max_size=4, unique_by=lambda m: m.name), labels=st.sampled_from([{}, {"pool": "a"}]))
def test_every_platform_routes_each_host_as_our_hosts_toml_does(mirrors: list[RegistryMirror], labels: dict[str, str]) -> None:
    expected = node_routes(mirrors, labels)
    for name in platforms.PLATFORMS:
        got = platform_routes(name, platform_doc(name, mirrors, labels))
        canonical = {h.replace("_", ":").rstrip(":") if h.endswith("_") else h: v for h, v in expected.items()}
        if name != "gke":
            # k3s and Talos fold Docker Hub's spellings themselves: one entry per canonical host.
            canonical = {h: v for h, v in canonical.items() if h not in ("index.docker.io", "registry-1.docker.io")}
        assert set(got) == set(canonical), name
        for host, (endpoints, strict) in canonical.items():
            assert got[host][0] == endpoints, f"{name}: {host} in another order"
            if got[host][1] is not None:
                assert got[host][1] == strict, f"{name}: {host} strictness"


def test_strictness_the_platform_cannot_hold_is_said_and_credentials_are_placeholders() -> None:
    m = mirror(
        "q",
        upstream={"url": "https://quay.io", "credentialsSecretRef": {"name": "q"}},
        nodeConfig={"fallback": "NeverContactUpstream"},
        access={"clients": [{"name": "nodes"}]},
        image="registry.corp.example/registry:3",
    )
    entries = [mirror_entry("q", m.spec, "10.96.0.10")]
    gke = platforms.render_gke(entries, {"q": m}, {})
    assert gke.not_strict == ("quay.io",) and "cannot be expressed on GKE" in gke.render()
    k3s = platforms.render_k3s(entries, {"q": m}, {}).render()
    assert "disable-default-registry-endpoint" in k3s
    talos = yaml.safe_load(platforms.render_talos(entries, {"q": m}, {}).render())
    assert talos["machine"]["registries"]["mirrors"]["quay.io"]["skipFallback"] is True
    assert talos["machine"]["registries"]["config"]["10.96.0.10:5000"]["auth"] == {"auth": "REGMIRROR-AUTH-OF-q"}
    assert "regmirror-q.client-nodes" in platforms.render_talos(entries, {"q": m}, {}).render()
