"""The operator's objects, run on loopback: only addresses and paths are mapped, nothing else."""

from __future__ import annotations

import contextlib
import json
import os
import urllib.request
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from harness.dataplane.registry import Registry
from harness.waiting import free_ports
from regmirror import constants as c
from regmirror.render import mirror as render_mirror


@dataclass(frozen=True)
class LoopbackMap:
    """The ONLY differences between what the operator wrote and what runs here: addresses and paths.

    `addresses`: cluster address -> loopback address. Keys are host:port (the
    Service's ClusterIP:port in the node plan), bare listen addresses (":5000"
    in config.yml), or whole URLs ("https://registry-1.docker.io", the server
    containerd falls back to for docker.io, which has no stand-in but our local
    upstream). `paths`: container or host path prefix -> temporary directory.
    """

    addresses: Mapping[str, str]
    paths: Mapping[str, str]


def map_to_loopback(value: Any, mapping: LoopbackMap) -> Any:
    """Map every string inside `value` (nested dicts and lists, e.g. parsed YAML or JSON).

    A string equal to a mapped address or URL is replaced; a URL whose
    host:port is mapped gets the new host:port (scheme and path kept); a path
    under a mapped prefix is moved, also inside a colon-separated path list
    (SSL_CERT_DIR). Anything else, including
    `proxy.remoteurl`, stays exactly as the operator wrote it.
    """
    if isinstance(value, dict):
        return {k: map_to_loopback(v, mapping) for k, v in value.items()}
    if isinstance(value, list):
        return [map_to_loopback(v, mapping) for v in value]
    if not isinstance(value, str):
        return value
    parts = value.split(":")
    if len(parts) > 1 and all(part.startswith("/") for part in parts):  # a path list: SSL_CERT_DIR=/etc/ssl/certs:/etc/...
        return ":".join(map_to_loopback(part, mapping) for part in parts)
    if value in mapping.addresses:
        return mapping.addresses[value]
    if "://" in value:
        scheme, rest = value.split("://", 1)
        netloc, slash, path = rest.partition("/")
        if netloc in mapping.addresses:
            return f"{scheme}://{mapping.addresses[netloc]}{slash}{path}"
        return value
    for prefix, target in mapping.paths.items():
        if value == prefix or value.startswith(prefix.rstrip("/") + "/"):
            return target.rstrip("/") + value[len(prefix.rstrip("/")) :]
    return value


@dataclass(frozen=True)
class MirrorObjects:
    """What the operator wrote for one RegistryMirror, as read back from the API server."""

    name: str
    config_yml: str  # the ConfigMap's config.yml
    container: dict[str, Any]  # the Deployment's registry container
    secrets: dict[str, dict[str, str]]  # Secrets its env and volumes refer to: name -> decoded data
    cluster_ip: str
    port: int  # the Service port nodes use
    volumes: list[dict[str, Any]] = field(default_factory=list)  # the pod's volumes (only Secret ones are materialized)

    @property
    def endpoint(self) -> str:
        return f"{self.cluster_ip}:{self.port}"

    def secret_mounts(self) -> dict[str, dict[str, str]]:
        """The registry container's Secret volumes as the kubelet fills them: mountPath -> {file name: content}."""
        by_name = {v["name"]: v["secret"] for v in self.volumes if "secret" in v}
        mounts = {}
        for mount in self.container.get("volumeMounts", []):
            source = by_name.get(mount["name"])
            if source is None:
                continue
            data = self.secrets[source["secretName"]]
            items = source.get("items") or [{"key": key, "path": key} for key in data]
            mounts[mount["mountPath"]] = {item["path"]: data[item["key"]] for item in items}
        return mounts


def resolve_env(container: dict[str, Any], secrets: Mapping[str, Mapping[str, str]]) -> dict[str, str]:
    """The container's env as the kubelet would set it (value, or secretKeyRef resolved)."""
    env = {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        else:
            ref = var["valueFrom"]["secretKeyRef"]
            env[var["name"]] = secrets[ref["name"]][ref["key"]]
    return env


@dataclass
class LoopbackMirror:
    """The operator's mirror as a real docker-registry process: argv and env from the Deployment."""

    objects: MirrorObjects
    mapping: LoopbackMap
    workdir: Path
    host: str
    port: int
    debug_port: int

    @classmethod
    def plan(cls, objects: MirrorObjects, workdir: Path, *, docker_hub: str | None = None) -> LoopbackMirror:
        """Choose the loopback ports and directories and the one mapping of this mirror."""
        host = "127.0.0.1"
        port, debug_port = free_ports(2, host)
        addresses = {
            objects.endpoint: f"{host}:{port}",  # Service ClusterIP:port (node plan)
            f":{c.REGISTRY_PORT}": f"{host}:{port}",  # container listen address (config.yml)
            ":5002": f"{host}:{port}",  # the registry's listen address behind the cache front (render/front.py)
            "127.0.0.1:5002": f"{host}:{port}",  # the same, on the pod's loopback only (render/mirror.py)
            f":{c.REGISTRY_DEBUG_PORT}": f"{host}:{debug_port}",  # metrics / debug listener
        }
        if docker_hub:
            addresses[c.DOCKER_HUB_SERVER] = docker_hub
        paths = {
            c.REGISTRY_STORAGE_PATH: str(workdir / "storage"),
            render_mirror.CONFIG_DIR: str(workdir / "etc"),
        }
        for i, mount_path in enumerate(objects.secret_mounts()):  # e.g. the upstream CA (spec.upstream.tls.caSecretRef)
            paths[mount_path] = str(workdir / "secret-volumes" / str(i))
        return cls(objects, LoopbackMap(addresses, paths), workdir, host, port, debug_port)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def argv_env(self) -> tuple[list[str], dict[str, str]]:
        """Write the mapped config.yml and Secret volumes where the mapped args and env expect them; return (argv, env)."""
        config = map_to_loopback(yaml.safe_load(self.objects.config_yml), self.mapping)
        config_file = Path(map_to_loopback(render_mirror.CONFIG_PATH, self.mapping))
        config_file.parent.mkdir(parents=True, exist_ok=True)
        config_file.write_text(yaml.safe_dump(config, sort_keys=False))
        for mount_path, files in self.objects.secret_mounts().items():
            directory = Path(map_to_loopback(mount_path, self.mapping))
            directory.mkdir(parents=True, exist_ok=True)
            for file_name, content in files.items():
                (directory / file_name).write_text(content)
        args = map_to_loopback(list(self.objects.container.get("args", [])), self.mapping)
        env = map_to_loopback(resolve_env(self.objects.container, self.objects.secrets), self.mapping)
        return ["docker-registry", *args], {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env}

    @contextlib.contextmanager
    def run(self, env_override: Mapping[str, str] | None = None) -> Iterator[Registry]:
        argv, env = self.argv_env()
        env.update(env_override or {})
        with Registry.launch(self.workdir, argv, env, self.host, self.port) as registry:
            yield registry

    def holds_blob(self, digest: str) -> bool:
        """Whether the mirror has committed blob `digest` to its storage (distribution's filesystem layout)."""
        from regmirror.cache import store

        return (store.blob_dir(self.workdir / "storage", digest) / "data").is_file()

    def debug_vars(self) -> dict[str, Any]:
        """distribution's expvar counters (2.8 keeps its proxy hit/miss counters there, not in /metrics)."""
        with urllib.request.urlopen(f"http://{self.host}:{self.debug_port}/debug/vars", timeout=5) as resp:
            return dict(json.loads(resp.read()))

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://{self.host}:{self.debug_port}/metrics", timeout=5) as resp:
            return str(resp.read().decode())


def map_plan(plan_json: str, mirrors: Iterable[LoopbackMirror], keep: Iterable[str] | None = None) -> str:
    """The node plan with every mirror's addresses mapped to loopback (and only the mirrors in `keep`)."""
    plan = json.loads(plan_json)
    wanted = set(keep) if keep is not None else None
    for mirror in mirrors:
        plan = map_to_loopback(plan, mirror.mapping)
    plan["mirrors"] = [m for m in plan["mirrors"] if wanted is None or m["name"] in wanted]
    return json.dumps(plan)
