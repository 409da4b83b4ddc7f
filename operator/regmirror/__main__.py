"""The `regmirror` command: run | agent | crd | render | version. Thin: each verb delegates."""

from __future__ import annotations

import argparse
import importlib
import ipaddress
import os
import sys
from collections.abc import Iterable, Sequence
from typing import Any

import yaml
from pydantic import ValidationError

import regmirror
from regmirror import constants as c
from regmirror import crd, render
from regmirror.models import RegistryMirror
from regmirror.nodeplan import build_node_plan, mirror_entry

PLACEHOLDER_UID = "00000000-0000-0000-0000-000000000000"
DEFAULT_RENDER_CLUSTER_IP = "10.96.0.10"
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


# ------------------------------------------------------------------ verbs


def _run(extra: list[str]) -> int:
    """The operator: Kopf with our handlers; extra arguments go to `kopf run` as they are."""
    from kopf.cli import main as kopf_main

    args = ["run", "-m", "regmirror.handlers"]
    scoped = any(a in ("-A", "--all-namespaces", "-n") or a.startswith("--namespace") for a in extra)
    if not scoped:
        # RegistryMirror and Node are cluster-scoped (Kopf watches them cluster-wide regardless);
        # everything namespaced lives in the operator's and the agent's namespaces, so only
        # those are watched and the operator's RBAC can stay namespaced.
        for namespace in (
            os.environ.get("REGMIRROR_NAMESPACE", c.DEFAULT_NAMESPACE),
            os.environ.get("REGMIRROR_AGENT_NAMESPACE", c.AGENT_NAMESPACE),
        ):
            args += ["--namespace", namespace]
    if not any(a.startswith("--log-format") for a in extra):
        args.append("--log-format=json")
    kopf_main(args=[*args, *extra], prog_name="regmirror")
    return 0


def _agent(argv: list[str]) -> int:
    """The node agent, in its own package (imported only here, so the operator never loads it)."""
    try:
        module = importlib.import_module("regmirror.agent")
    except ImportError as exc:
        print(f"regmirror agent: the agent is not available: {exc}", file=sys.stderr)
        return 2
    agent_main = getattr(module, "main", None)
    if agent_main is None:
        print("regmirror agent: the agent is not available (regmirror.agent.main is missing)", file=sys.stderr)
        return 2
    result = agent_main(argv)
    return int(result or 0)


def _crd() -> int:
    sys.stdout.write(dump_yaml([crd.render_crd()]))
    return 0


def _load_mirrors(path: str) -> list[RegistryMirror]:
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


def _render(path: str, namespace: str, agent_namespace: str, cluster_ip: str, image: str) -> int:
    """Everything the operator would create for the mirrors in a file, offline."""
    try:
        mirrors = _load_mirrors(path)
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
        objects += render.render_mirror_children(mirror.name, PLACEHOLDER_UID, mirror.spec, namespace)
        # Each mirror without a fixed clusterIP gets the next address, as a Service would get its own.
        ip = mirror.spec.service.cluster_ip or str(next_ip)
        if not mirror.spec.service.cluster_ip:
            next_ip += 1
        if mirror.spec.node_config.enabled:
            entries.append(mirror_entry(mirror.name, mirror.spec, ip))
    plan = build_node_plan(entries)
    objects.append(render.render_node_config_map(plan, agent_namespace))
    objects.append(render.render_agent_daemonset(plan, agent_namespace, image))
    sys.stdout.write(dump_yaml(objects))
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="regmirror", description="Pull-through registry mirrors for Kubernetes.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("run", help="run the operator (further arguments go to `kopf run`)", add_help=False)
    sub.add_parser("agent", help="run the node agent (see `regmirror agent --help`)", add_help=False)
    sub.add_parser("crd", help="print the RegistryMirror CustomResourceDefinition as YAML")
    rnd = sub.add_parser("render", help="print, offline, every object the operator would create for a RegistryMirror file")
    rnd.add_argument("-f", "--filename", required=True, help="YAML file with one or more RegistryMirrors")
    rnd.add_argument("--namespace", default=c.DEFAULT_NAMESPACE, help="the operator's namespace (default: %(default)s)")
    rnd.add_argument("--agent-namespace", default=c.AGENT_NAMESPACE, help="the node agent's namespace (default: %(default)s)")
    rnd.add_argument(
        "--cluster-ip", default=DEFAULT_RENDER_CLUSTER_IP, help="ClusterIP assumed for the first mirror's Service (default: %(default)s)"
    )
    rnd.add_argument("--agent-image", default=c.DEFAULT_OPERATOR_IMAGE, help="image of the node agent (default: %(default)s)")
    sub.add_parser("version", help="print the version")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `regmirror` console script."""
    args_in = list(sys.argv[1:] if argv is None else argv)
    # run and agent take their own options, untouched by this parser.
    if args_in[:1] == ["run"]:
        return _run(args_in[1:])
    if args_in[:1] == ["agent"]:
        return _agent(args_in[1:])
    parser = _parser()
    args = parser.parse_args(args_in)
    if args.command == "crd":
        return _crd()
    if args.command == "render":
        try:
            ipaddress.ip_address(args.cluster_ip)
        except ValueError:
            parser.error(f"--cluster-ip: not an IP address: {args.cluster_ip}")
        return _render(args.filename, args.namespace, args.agent_namespace, args.cluster_ip, args.agent_image)
    if args.command == "version":
        print(f"regmirror {regmirror.__version__}")
        return 0
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
