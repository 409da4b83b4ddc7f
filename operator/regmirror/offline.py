"""Offline output of the CLI: the CRD and `render -f`, as deterministic YAML.

Kept out of `__main__` so `regmirror agent` (a long-running process on every
node) never loads pydantic, the models or the renderers it does not use.
"""

from __future__ import annotations

import ipaddress
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import yaml
from pydantic import ValidationError

from regmirror import constants as c
from regmirror import crd
from regmirror.models import AdmissionError, RegistryMirror, admit_document
from regmirror.nodeplan import build_node_plan, mirror_entry
from regmirror.render.agent import render_agent_daemonset, render_node_config_map
from regmirror.render.mirror import render_mirror_children

PLACEHOLDER_UID = "00000000-0000-0000-0000-000000000000"


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


class _JsonLikeLoader(yaml.SafeLoader):
    """YAML as kubectl reads it before sending JSON: timestamps stay strings (go-yaml does not turn them into dates)."""


_JsonLikeLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def load_documents(text: str) -> list[Any]:
    """The documents of a YAML stream, parsed as kubectl would parse them (empty documents dropped)."""
    return [d for d in yaml.load_all(text, Loader=_JsonLikeLoader) if d is not None]


def load_mirrors(path: str) -> list[RegistryMirror]:
    """Every RegistryMirror in a YAML stream, admitted as the API server would (other kinds, e.g. a Secret, are skipped)."""
    with open(path, encoding="utf-8") as fh:
        docs = load_documents(fh.read())
    mirrors = []
    for doc in docs:
        if not isinstance(doc, dict) or doc.get("kind") != c.KIND:
            continue
        name = (doc.get("metadata") or {}).get("name") if isinstance(doc.get("metadata"), dict) else None
        try:
            mirrors.append(admit_document(doc))
        except (AdmissionError, ValidationError) as exc:
            raise ValueError(f"{c.KIND} {name or '(unnamed)'}: {exc}") from exc
    if not mirrors:
        raise ValueError(f"no {c.KIND} ({c.API_VERSION}) in {path}")
    return mirrors


def _load_or_report(path: str) -> list[RegistryMirror] | None:
    try:
        return load_mirrors(path)
    except (ValidationError, ValueError) as exc:
        print(f"regmirror render: {path}: invalid {c.KIND}: {exc}", file=sys.stderr)
    except (OSError, yaml.YAMLError) as exc:
        print(f"regmirror render: {path}: {exc}", file=sys.stderr)
    return None


def _cluster_ips(mirrors: list[RegistryMirror], cluster_ip: str) -> dict[str, str]:
    """Each mirror's ClusterIP: its fixed one, or the next address from `cluster_ip`, as Services would get their own."""
    out: dict[str, str] = {}
    next_ip = ipaddress.ip_address(cluster_ip)
    for mirror in mirrors:
        out[mirror.name] = mirror.spec.service.cluster_ip or str(next_ip)
        if not mirror.spec.service.cluster_ip:
            next_ip += 1
    return out


def render_file(
    path: str,
    namespace: str,
    agent_namespace: str,
    cluster_ip: str,
    image: str,
    node_cidrs: Sequence[str] = (),
    *,
    guard_connections: bool = True,
) -> int:
    """Everything the operator would create for the mirrors in a file, offline.

    Secrets are not printed: the access Secrets hold credentials the operator
    generates in the cluster (regmirror/access.py). `node_cidrs` stand for
    the nodes' addresses in the NetworkPolicies (the operator reads them from
    the Node objects).
    """
    mirrors = _load_or_report(path)
    if mirrors is None:
        return 1
    objects: list[dict[str, Any]] = []
    entries = []
    ips = _cluster_ips(mirrors, cluster_ip)
    for mirror in mirrors:
        objects += render_mirror_children(mirror.name, PLACEHOLDER_UID, mirror.spec, namespace, node_addresses=node_cidrs)
        if mirror.spec.node_config.enabled:
            entries.append(mirror_entry(mirror.name, mirror.spec, ips[mirror.name]))
    plan = build_node_plan(entries)
    objects.append(render_node_config_map(plan, agent_namespace))
    objects.append(render_agent_daemonset(plan, agent_namespace, image, guard_connections=guard_connections))
    sys.stdout.write(dump_yaml(objects))
    return 0


def _pick(mirrors: list[RegistryMirror], name: str | None, path: str) -> RegistryMirror | None:
    if name is not None:
        found = [m for m in mirrors if m.name == name]
        if not found:
            print(f"regmirror render: {path}: no {c.KIND} named {name!r}", file=sys.stderr)
            return None
        return found[0]
    if len(mirrors) > 1:
        names = ", ".join(m.name for m in mirrors)
        print(f"regmirror render: {path} holds several mirrors ({names}): choose one with --mirror", file=sys.stderr)
        return None
    return mirrors[0]


def render_client(path: str, kind: str, *, mirror_name: str | None, client: str | None, endpoint: str | None, namespace: str) -> int:
    """`render --client`: the shell script a host outside the cluster runs to use a mirror (render/clients.py)."""
    from regmirror.render.clients import ClientError, client_config, render_script

    mirrors = _load_or_report(path)
    mirror = _pick(mirrors, mirror_name, path) if mirrors is not None else None
    if mirror is None:
        return 1
    try:
        config = client_config(mirror, kind, client=client, endpoint=endpoint, namespace=namespace)
    except ClientError as exc:
        print(f"regmirror render --client {kind}: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(render_script(config))
    return 0


def parse_labels(text: str) -> dict[str, str]:
    """k=v,k2=v2 (what --node-labels takes); ValueError for anything else."""
    labels: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{item!r} is not key=value")
        labels[key] = value
    return labels


def render_node_config(path: str, platform: str, *, cluster_ip: str, node_labels: Mapping[str, str], client: str | None = None) -> int:
    """`render --node-config`: the platform's native registry configuration for the mirrors in a file (render/platforms.py)."""
    from regmirror.render.platforms import RENDERERS

    mirrors = _load_or_report(path)
    if mirrors is None:
        return 1
    ips = _cluster_ips(mirrors, cluster_ip)
    # Every mirror of the file, nodeConfig.enabled or not: those the agent must not configure are exactly these.
    entries = [mirror_entry(m.name, m.spec, ips[m.name]) for m in mirrors]
    config = RENDERERS[platform](entries, {m.name: m for m in mirrors}, node_labels, client)
    enabled = [m.name for m in mirrors if m.spec.node_config.enabled]
    notes = list(config.notes)
    if enabled:
        notes.append(f"Set nodeConfig.enabled: false on {', '.join(enabled)}: otherwise the agent writes these nodes' files as well.")
    unfixed = [m.name for m in mirrors if not m.spec.service.cluster_ip]
    if unfixed:
        notes.append(
            f"{', '.join(unfixed)}: no fixed spec.service.clusterIP, so the address above is a guess (--cluster-ip); "
            "use kubectl get rmir -o wide (ENDPOINT) or fix the ClusterIP so node configuration outlives the Service."
        )
    sys.stdout.write(type(config)(config.platform, config.document, tuple(notes), config.not_strict).render())
    return 0


API_REFERENCE_START = "<!-- api-reference:start (generated by `make docs` from the models; a unit test keeps it in sync) -->"
API_REFERENCE_END = "<!-- api-reference:end -->"


def with_api_reference(readme: str) -> str:
    """The README text with its API reference table regenerated from the models."""
    head, rest = readme.split(API_REFERENCE_START, 1)
    _, tail = rest.split(API_REFERENCE_END, 1)
    return f"{head}{API_REFERENCE_START}\n{crd.api_reference_markdown()}{API_REFERENCE_END}{tail}"
