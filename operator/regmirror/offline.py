"""Offline output of the CLI: the CRD and `render -f`, as deterministic YAML.

Kept out of `__main__` so `regmirror agent` (a long-running process on every
node) never loads pydantic, the models or the renderers it does not use.
"""

from __future__ import annotations

import ipaddress
import sys
from collections.abc import Iterable
from typing import Any

import yaml
from pydantic import ValidationError

from regmirror import constants as c
from regmirror import crd
from regmirror.models import RegistryMirror
from regmirror.nodeplan import build_node_plan, mirror_entry
from regmirror.render.agent import render_agent_daemonset, render_node_config_map
from regmirror.render.mirror import render_mirror_children

PLACEHOLDER_UID = "00000000-0000-0000-0000-000000000000"
MAX_NAME_LENGTH = 48


class _BlockDumper(yaml.SafeDumper):
    """Block style, multi-line strings (config.yml) as `|` literals, and no anchors or aliases."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    if "\n" in value:
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|")
    return dumper.represent_scalar("tag:yaml.org,2002:str", value)


_BlockDumper.add_representer(str, _represent_str)


def dump_yaml(objects: Iterable[Any]) -> str:
    """A deterministic YAML stream (insertion order kept, block style)."""
    return yaml.dump_all(list(objects), Dumper=_BlockDumper, sort_keys=False, default_flow_style=False, explicit_start=True, width=4096)


def print_crd() -> int:
    sys.stdout.write(dump_yaml([crd.render_crd()]))
    return 0


def load_mirrors(path: str) -> list[RegistryMirror]:
    """Every RegistryMirror in a YAML stream (other kinds, e.g. a Secret, are skipped, never printed)."""
    with open(path, encoding="utf-8") as fh:
        docs = [d for d in yaml.safe_load_all(fh) if isinstance(d, dict)]
    mirrors = []
    for doc in docs:
        if doc.get("kind") != c.KIND:
            continue
        if doc.get("apiVersion") != c.API_VERSION:
            raise ValueError(f"apiVersion: expected {c.API_VERSION}, got {doc.get('apiVersion')!r}")
        name = str((doc.get("metadata") or {}).get("name", ""))
        if not name:
            raise ValueError("metadata.name is required")
        if len(name) > MAX_NAME_LENGTH:
            raise ValueError(f"metadata.name must be at most {MAX_NAME_LENGTH} characters (child object names add a prefix)")
        mirrors.append(RegistryMirror.model_validate(doc))
    if not mirrors:
        raise ValueError(f"no {c.KIND} ({c.API_VERSION}) in {path}")
    return mirrors


def render_file(path: str, namespace: str, agent_namespace: str, cluster_ip: str, image: str) -> int:
    """Everything the operator would create for the mirrors in a file, offline."""
    try:
        mirrors = load_mirrors(path)
    except (ValidationError, ValueError) as exc:
        print(f"regmirror render: {path}: invalid {c.KIND}: {exc}", file=sys.stderr)
        return 1
    except (OSError, yaml.YAMLError) as exc:
        print(f"regmirror render: {path}: {exc}", file=sys.stderr)
        return 1
    objects: list[dict[str, Any]] = []
    entries = []
    next_ip = ipaddress.ip_address(cluster_ip)
    for mirror in mirrors:
        objects += render_mirror_children(mirror.name, PLACEHOLDER_UID, mirror.spec, namespace)
        # Each mirror without a fixed clusterIP gets the next address, as a Service would get its own.
        ip = mirror.spec.service.cluster_ip or str(next_ip)
        if not mirror.spec.service.cluster_ip:
            next_ip += 1
        if mirror.spec.node_config.enabled:
            entries.append(mirror_entry(mirror.name, mirror.spec, ip))
    plan = build_node_plan(entries)
    objects.append(render_node_config_map(plan, agent_namespace))
    objects.append(render_agent_daemonset(plan, agent_namespace, image))
    sys.stdout.write(dump_yaml(objects))
    return 0
