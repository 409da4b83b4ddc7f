"""Shared pieces of the agent's unit and property tests: real certificates, wire-form plans, and readers of node files.

The readers here are the tests' own account of what containerd and CRI-O do
with a file (hosts.toml: [host] tables in file order, then `server`; a
registries.conf drop-in: mirrors in order, then `location`), written from
their documentation, independent of the renderer and of render/nodecheck.py.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import tomllib
from functools import cache
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from regmirror import constants as c

CERTS = c.CONTAINERD_CONFIG_PATH
CRIO_FILE = f"{c.CRIO_DROPIN_DIR}/{c.CRIO_DROPIN_FILE}"
GOOD_CONTAINERD = 'version = 2\n[plugins."io.containerd.grpc.v1.cri".registry]\n  config_path = "/etc/containerd/certs.d"\n'
DOCKER_HUB_NAMES = ("docker.io", "index.docker.io", "registry-1.docker.io")


@cache
def ca_cert(common_name: str = "regmirror test CA") -> tuple[str, bytes]:
    """A self-signed CA certificate: (PEM text, DER bytes)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode(), cert.public_bytes(serialization.Encoding.DER)


@cache
def client_pair() -> tuple[str, str]:
    """A client certificate and its unencrypted key, PEM."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "regmirror test client")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM).decode(), key_pem.decode()


def tls_material(workdir: Path, ip: str) -> tuple[Path, Path, Path]:
    """A private CA and a server certificate for `ip` signed by it: (ca.crt, server.crt, server.key)."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "admin's private CA")])
    now = datetime.datetime.now(datetime.UTC)
    validity = (now - datetime.timedelta(days=1), now + datetime.timedelta(days=30))
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(validity[0])
        .not_valid_after(validity[1])
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    server = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ip)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(validity[0])
        .not_valid_after(validity[1])
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = (workdir / "ca.crt", workdir / "server.crt", workdir / "server.key")
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return paths


def wire_entry(
    name: str,
    url: str,
    hosts: list[str],
    *,
    fallback: str = "AllowUpstream",
    priority: int = 100,
    servers: dict[str, str] | None = None,
    upstream_host: str | None = None,
    ca_pem: str | None = None,
    runtimes: list[str] | None = None,
    selector: dict[str, Any] | None = None,
    capabilities: list[str] | None = None,
) -> dict[str, Any]:
    """A plan entry in the JSON form the operator writes (NodePlan.to_json)."""
    entry: dict[str, Any] = {
        "name": name,
        "hosts": hosts,
        "servers": servers
        if servers is not None
        else {h: (c.DOCKER_HUB_SERVER if h.lower() in DOCKER_HUB_NAMES else f"https://{h}") for h in hosts},
        "url": url,
        "priority": priority,
        "capabilities": capabilities or ["pull", "resolve"],
        "fallback": fallback,
        "runtimes": runtimes or ["containerd"],
        "nodeSelector": selector or {"matchLabels": {}, "matchExpressions": []},
        "caPem": ca_pem,
    }
    if upstream_host is not None:
        entry["upstreamHost"] = upstream_host
    return entry


def plan_json(*entries: dict[str, Any]) -> str:
    return json.dumps({"mirrors": list(entries)})


def containerd_endpoints(hosts_toml: str) -> list[str]:
    """The endpoints containerd tries for a host, in order: each [host] table in file order, then `server`."""
    parsed = tomllib.loads(hosts_toml)
    tables = parsed.get("host", {})
    return [*tables, str(parsed.get("server", ""))]


def endpoint_capabilities(hosts_toml: str) -> dict[str, list[str]]:
    """endpoint -> capabilities (containerd gives every capability to one that lists none)."""
    parsed = tomllib.loads(hosts_toml)
    every = ["pull", "resolve", "push"]
    caps = {url: table.get("capabilities") or every for url, table in parsed.get("host", {}).items()}
    caps.setdefault(str(parsed.get("server", "")), parsed.get("capabilities") or every)
    return caps


def node_root(tmp: Path, containerd_config: str = GOOD_CONTAINERD) -> Path:
    """A node's filesystem for the agent: /etc/containerd/config.toml under `tmp/host`."""
    root = tmp / "host"
    cfg = root / "etc" / "containerd" / "config.toml"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text(containerd_config)
    return root


def tree(root: Path) -> dict[str, bytes]:
    """Every regular file under `root` (relative path -> bytes), to prove what a run did and did not touch."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}
