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
    assert kinds.count("Deployment") == kinds.count("Service") == (kinds.count("ConfigMap") - 1) // 2 == len(mirrors)
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
