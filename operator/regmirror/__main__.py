"""The `regmirror` command: run | agent | cache | crd | render | version. Thin: each verb delegates."""

from __future__ import annotations

import argparse
import importlib
import ipaddress
import sys
from collections.abc import Sequence

import regmirror
from regmirror import constants as c

# ------------------------------------------------------------------ verbs


def _run(extra: list[str]) -> int:
    """The operator: Kopf runs the process (CLI, logs, liveness); extra arguments go to `kopf run` as they are."""
    from kopf.cli import main as kopf_main

    from regmirror.settings import Settings

    try:
        settings = Settings.from_env()  # validated here so a bad variable fails before anything starts
    except ValueError as exc:
        print(f"regmirror run: invalid REGMIRROR_* setting: {exc}", file=sys.stderr)
        return 2
    args = ["run", "-m", "regmirror.handlers"]
    scoped = any(a in ("-A", "--all-namespaces", "-n") or a.startswith("--namespace") for a in extra)
    if not scoped:
        # Kopf serves no resource itself (the controller watches what it needs, and Kopf's
        # scanning is disabled); naming our namespaces keeps it from assuming cluster-wide.
        for namespace in (settings.namespace, settings.agent_namespace):
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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="regmirror", description="Pull-through registry mirrors for Kubernetes.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("run", help="run the operator (further arguments go to `kopf run`)", add_help=False)
    sub.add_parser("agent", help="run the node agent (see `regmirror agent --help`)", add_help=False)
    sub.add_parser("cache", help="the cache sidecar and actions on a mirror's cache (see `regmirror cache --help`)", add_help=False)
    sub.add_parser("crd", help="print the RegistryMirror CustomResourceDefinition as YAML")
    rnd = sub.add_parser("render", help="print, offline, every object the operator would create for a RegistryMirror file")
    rnd.add_argument("-f", "--filename", required=True, help="YAML file with one or more RegistryMirrors")
    rnd.add_argument("--namespace", default=c.DEFAULT_NAMESPACE, help="the operator's namespace (default: %(default)s)")
    rnd.add_argument("--agent-namespace", default=c.AGENT_NAMESPACE, help="the node agent's namespace (default: %(default)s)")
    rnd.add_argument(
        "--cluster-ip", default=c.RENDER_CLUSTER_IP, help="ClusterIP assumed for the first mirror's Service (default: %(default)s)"
    )
    rnd.add_argument("--agent-image", default=c.DEFAULT_OPERATOR_IMAGE, help="image of the node agent (default: %(default)s)")
    rnd.add_argument(
        "--no-agent-guard-connections",
        action="store_true",
        help="render the agent without hostNetwork and NET_ADMIN, as REGMIRROR_AGENT_GUARD_CONNECTIONS=false does",
    )
    rnd.add_argument(
        "--node-cidrs", default="", help="comma-separated node addresses or CIDRs for the NetworkPolicies (the operator reads the Nodes)"
    )
    what = rnd.add_mutually_exclusive_group()
    what.add_argument(
        "--client",
        choices=("docker", "containerd", "podman"),
        help="instead: a shell script configuring a host outside the cluster to pull through the mirror (no credential is printed)",
    )
    what.add_argument(
        "--node-config",
        choices=("gke", "k3s", "talos"),
        help="instead: the platform's native registry configuration, for clusters where no DaemonSet may write node files",
    )
    rnd.add_argument("--mirror", default=None, help="with --client: the RegistryMirror of the file to use (when it holds several)")
    rnd.add_argument(
        "--name", default=None, help="with --client or --node-config: the access client (spec.access.clients) whose credential to use"
    )
    rnd.add_argument(
        "--endpoint", default=None, help="with --client: host:port outside hosts reach the mirror at (default: read from the Service)"
    )
    rnd.add_argument(
        "--node-labels", default="", help="with --node-config: labels (k=v,...) of the nodes configured; picks mirrors by nodeSelector"
    )
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
    if args_in[:1] == ["cache"]:
        from regmirror.cache.cli import main as cache_main

        return cache_main(args_in[1:])
    parser = _parser()
    args = parser.parse_args(args_in)
    if args.command == "crd":
        from regmirror.offline import print_crd

        return print_crd()
    if args.command == "render":
        try:
            ipaddress.ip_address(args.cluster_ip)
        except ValueError:
            parser.error(f"--cluster-ip: not an IP address: {args.cluster_ip}")
        from regmirror.offline import parse_labels, render_client, render_file, render_node_config

        if args.client:
            return render_client(
                args.filename, args.client, mirror_name=args.mirror, client=args.name, endpoint=args.endpoint, namespace=args.namespace
            )
        if args.node_config:
            try:
                labels = parse_labels(args.node_labels)
            except ValueError as exc:
                parser.error(f"--node-labels: {exc}")
            return render_node_config(args.filename, args.node_config, cluster_ip=args.cluster_ip, node_labels=labels, client=args.name)
        cidrs = [x.strip() for x in args.node_cidrs.split(",") if x.strip()]
        return render_file(
            args.filename,
            args.namespace,
            args.agent_namespace,
            args.cluster_ip,
            args.agent_image,
            cidrs,
            guard_connections=not args.no_agent_guard_connections,
        )
    if args.command == "version":
        print(f"regmirror {regmirror.__version__}")
        return 0
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
