"""The `regmirror` command, run as a user would run it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from regmirror import constants as c

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def regmirror(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "regmirror", *args], capture_output=True, text=True, timeout=60, cwd=ROOT)


def test_examples_exist() -> None:
    names = {p.name for p in EXAMPLES}
    assert {"dockerhub.yaml", "quay-with-credentials.yaml", "airgapped.yaml", "two-mirrors-one-host.yaml"} <= names


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_render_every_example(example: Path) -> None:
    result = regmirror("render", "-f", str(example))
    assert result.returncode == 0, result.stderr
    objects = list(yaml.safe_load_all(result.stdout))
    mirrors = [d for d in yaml.safe_load_all(example.read_text()) if d and d.get("kind") == c.KIND]
    kinds = [o["kind"] for o in objects]
    # One ConfigMap per mirror (registry config and cache inputs) and the node plan.
    assert kinds.count("Deployment") == kinds.count("Service") == kinds.count("ConfigMap") - 1 == len(mirrors)
    assert kinds[-2:] == ["ConfigMap", "DaemonSet"]
    assert "Secret" not in kinds
    for mirror in mirrors:
        assert len(mirror["metadata"]["name"]) <= 48
    plan = yaml.safe_load(objects[-2]["data"][c.NODE_CONFIG_KEY])
    assert sorted(m["name"] for m in plan["mirrors"]) == sorted(m["metadata"]["name"] for m in mirrors)


def test_render_never_prints_the_secret_values() -> None:
    example = ROOT / "examples" / "quay-with-credentials.yaml"
    secrets = [d for d in yaml.safe_load_all(example.read_text()) if d and d.get("kind") == "Secret"]
    assert secrets
    result = regmirror("render", "-f", str(example))
    assert result.returncode == 0, result.stderr
    for value in secrets[0]["stringData"].values():
        assert value not in result.stdout
    assert "secretKeyRef" in result.stdout


def test_render_with_planted_credentials(tmp_path: Path) -> None:
    planted = "Planted-Password-9f8e7d"
    doc = f"""
apiVersion: v1
kind: Secret
metadata: {{name: creds, namespace: regmirror-system}}
stringData: {{username: bob, password: {planted}}}
---
apiVersion: regmirror.dev/v1alpha1
kind: RegistryMirror
metadata: {{name: private}}
spec:
  upstream: {{url: "https://registry.example", credentialsSecretRef: {{name: creds}}}}
"""
    path = tmp_path / "cr.yaml"
    path.write_text(doc)
    result = regmirror("render", "-f", str(path), "--namespace", "elsewhere", "--cluster-ip", "10.0.0.7")
    assert result.returncode == 0, result.stderr
    assert planted not in result.stdout and planted not in result.stderr
    assert "namespace: elsewhere" in result.stdout
    assert "http://10.0.0.7:5000" in result.stdout


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ("upstream: {url: 'ftp://x'}", "upstream.url"),
        ("upstream: {url: 'https://x'}\n  storage: {size: '0'}", "storage"),
        ("upstream: {url: 'https://x'}\n  cache: {ttl: 7d}", "cache.ttl"),
        ("upstream: {url: 'https://x'}\n  replicas: 3", "replicas"),
        ("{}", "upstream"),
    ],
)
def test_invalid_file_exits_non_zero_naming_the_field(tmp_path: Path, spec: str, field: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(f"apiVersion: regmirror.dev/v1alpha1\nkind: RegistryMirror\nmetadata: {{name: bad}}\nspec:\n  {spec}\n")
    result = regmirror("render", "-f", str(path))
    assert result.returncode == 1
    assert field in result.stderr
    assert result.stdout == ""


# Each class the issue found admitted although the cluster could never apply it: `regmirror render`
# refuses it with exit 1, names the field, and prints nothing on stdout.
BROKEN_ON_MAIN = [
    ("name with a dot", "hub.example", "upstream: {url: 'https://registry-1.docker.io'}", "metadata.name"),
    ("upper-case name", "Hub", "upstream: {url: 'https://registry-1.docker.io'}", "metadata.name"),
    ("underscore in name", "hub_1", "upstream: {url: 'https://registry-1.docker.io'}", "metadata.name"),
    ("leading dash", "-hub", "upstream: {url: 'https://registry-1.docker.io'}", "metadata.name"),
    (
        "request above the default limit",
        "hub",
        "upstream: {url: 'https://q.example'}\n  resources: {requests: {memory: 1Gi}}",
        "resources.requests",
    ),
    (
        "tolerationSeconds on NoSchedule",
        "hub",
        "upstream: {url: 'https://q.example'}\n  tolerations: [{key: k, effect: NoSchedule, tolerationSeconds: 5}]",
        "tolerationSeconds",
    ),
    ("impossible clusterIP", "hub", "upstream: {url: 'https://q.example'}\n  service: {clusterIP: 999.1.1.1}", "service.clusterIP"),
    ("IPv6 shape that is no address", "hub", "upstream: {url: 'https://q.example'}\n  service: {clusterIP: '1:2:3'}", "service.clusterIP"),
    ("URL port 99999", "hub", "upstream: {url: 'https://registry.example:99999'}", "upstream.url"),
    ("host port 99999", "hub", "upstream: {url: 'https://r.example', hosts: ['r.example:99999']}", "upstream.hosts"),
    (
        "docker.io listed twice",
        "hub",
        "upstream: {url: 'https://mirror.gcr.io', hosts: [registry-1.docker.io, docker.io]}",
        "upstream.hosts",
    ),
    ("one host in two cases", "hub", "upstream: {url: 'https://quay.io', hosts: [Quay.io, quay.io]}", "upstream.hosts"),
    (
        "bootstrap deadlock",
        "hub",
        "upstream: {url: 'https://registry-1.docker.io'}\n  nodeConfig: {fallback: NeverContactUpstream}",
        "image",
    ),
    (
        "bootstrap deadlock, short image name",
        "hub",
        "upstream: {url: 'https://m.example', hosts: [docker.io]}\n  image: 'registry:3'\n  nodeConfig: {fallback: NeverContactUpstream}",
        "image",
    ),
]


@pytest.mark.parametrize(("what", "name", "spec", "field"), BROKEN_ON_MAIN, ids=[b[0] for b in BROKEN_ON_MAIN])
def test_render_refuses_what_the_cluster_could_never_apply(tmp_path: Path, what: str, name: str, spec: str, field: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(f"apiVersion: regmirror.dev/v1alpha1\nkind: RegistryMirror\nmetadata: {{name: '{name}'}}\nspec:\n  {spec}\n")
    result = regmirror("render", "-f", str(path))
    assert result.returncode == 1, f"{what}: admitted"
    assert field in result.stderr, result.stderr
    assert result.stdout == ""


def test_render_names_the_way_out_of_the_bootstrap_deadlock(tmp_path: Path) -> None:
    path = tmp_path / "strict.yaml"
    path.write_text(
        "apiVersion: regmirror.dev/v1alpha1\nkind: RegistryMirror\nmetadata: {name: hub}\n"
        "spec: {upstream: {url: 'https://registry-1.docker.io'}, nodeConfig: {fallback: NeverContactUpstream}}\n"
    )
    result = regmirror("render", "-f", str(path))
    assert result.returncode == 1
    assert "digest" in result.stderr and "AllowUpstream" in result.stderr and "pre-load" in result.stderr
    pinned = path.read_text().replace("spec: {", "spec: {image: 'registry.corp.example/registry:3.0.0', ")
    path.write_text(pinned)
    assert regmirror("render", "-f", str(path)).returncode == 0


def test_render_reads_yaml_as_kubectl_does(tmp_path: Path) -> None:
    # An unquoted date stays a string (go-yaml does not make dates): a valid StorageClass name.
    path = tmp_path / "date.yaml"
    path.write_text(
        "apiVersion: regmirror.dev/v1alpha1\nkind: RegistryMirror\nmetadata: {name: hub}\n"
        "spec: {upstream: {url: 'https://q.example'}, storage: {storageClassName: 2024-01-01}, replicas: 1.0}\n"
    )
    result = regmirror("render", "-f", str(path))
    assert result.returncode == 0, result.stderr
    assert "storageClassName: '2024-01-01'" in result.stdout


def test_render_never_echoes_a_credential_in_an_error(tmp_path: Path) -> None:
    path = tmp_path / "userinfo.yaml"
    path.write_text(
        "apiVersion: regmirror.dev/v1alpha1\nkind: RegistryMirror\nmetadata: {name: hub}\n"
        "spec: {upstream: {url: 'https://bob:Planted-Secret-2@quay.io'}}\n"
    )
    result = regmirror("render", "-f", str(path))
    assert result.returncode == 1 and "upstream.url" in result.stderr
    assert "Planted-Secret-2" not in result.stderr + result.stdout


def test_long_name_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "long.yaml"
    path.write_text(
        f"apiVersion: regmirror.dev/v1alpha1\nkind: RegistryMirror\nmetadata: {{name: {'a' * 49}}}\nspec: {{upstream: {{url: 'https://x'}}}}\n"
    )
    result = regmirror("render", "-f", str(path))
    assert result.returncode == 1
    assert "metadata.name" in result.stderr


def test_file_without_a_mirror_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "none.yaml"
    path.write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n")
    assert regmirror("render", "-f", str(path)).returncode == 1


def test_crd_command_prints_the_committed_crd() -> None:
    result = regmirror("crd")
    assert result.returncode == 0, result.stderr
    assert result.stdout == (ROOT / "crds" / f"{c.CRD_NAME}.yaml").read_text()


def test_version() -> None:
    result = regmirror("version")
    assert result.returncode == 0
    assert result.stdout.startswith("regmirror ")


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "regmirror"
    result = subprocess.run([str(script), "version"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
