"""The node agent: `regmirror agent`.

It runs on every node (one DaemonSet), renders that node's registry files from
the node plan, writes them atomically, withdraws mirrors that stop answering,
checks that the runtime will read the files, and reports readiness.

Importing this package stays light (no kopf, kubernetes or pydantic), which
keeps the agent's resident memory small on every node.
"""

from __future__ import annotations

import argparse
import re
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from regmirror import constants as c


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="regmirror agent", description="Roll node registry configuration out from the node plan.")
    p.add_argument(
        "--plan", type=Path, default=Path("/etc/regmirror/plan") / c.NODE_CONFIG_KEY, help="the node plan JSON (the mounted ConfigMap)"
    )
    p.add_argument("--host-root", type=Path, default=Path("/"), help="where the host's filesystem is mounted (default /)")
    p.add_argument("--containerd-config-path", default=c.CONTAINERD_CONFIG_PATH, help="containerd's config_path on the host")
    p.add_argument(
        "--containerd-config", default="/etc/containerd/config.toml", help="containerd's config.toml on the host (read by the preflight)"
    )
    p.add_argument("--crio-dropin-dir", default=c.CRIO_DROPIN_DIR, help="CRI-O's registries.conf.d on the host")
    p.add_argument("--node-name", default=None, help="this node's name (default: $NODE_NAME)")
    p.add_argument(
        "--node-labels-file", type=Path, default=None, help="JSON labels (or a Node object) instead of reading the Node from the API"
    )
    p.add_argument(
        "--health-port",
        type=int,
        default=c.AGENT_HEALTH_PORT,
        help="port of /healthz, /readyz and /report; 0 disables (default %(default)s)",
    )
    p.add_argument("--health-address", default="0.0.0.0", help="address of the health server")
    p.add_argument("--once", action="store_true", help="apply once and exit: 0 ok, 1 preflight failed, conflicts or errors")
    p.add_argument("--interval", type=_seconds(0.1, 3600), default=2.0, help="seconds between full reconciles")
    p.add_argument("--probe-interval", type=_seconds(0.1, 3600), default=2.0, help="seconds between a mirror's probes (jittered by +-25%%)")
    p.add_argument("--probe-timeout", type=_seconds(0.02, 60), default=0.5, help="seconds before a mirror probe counts as failed")
    p.add_argument(
        "--dial-timeout",
        type=_duration,
        default="100ms",
        help="containerd's dial_timeout for the mirrors, on containerd 2.0.7+/2.1+ (a Go duration such as 100ms; 0 never writes it)",
    )
    p.add_argument(
        "--guard-connections",
        action="store_true",
        help="abort the node's connections to dead mirrors so pulls under way fall back at once "
        "(needs the host's network namespace and CAP_NET_ADMIN)",
    )
    p.add_argument(
        "--guard-interval",
        type=_seconds(0.02, 10),
        default=0.25,
        help="seconds between two looks at the node's connections to the mirrors while none is open (0.1 s while one is)",
    )
    p.add_argument(
        "--stall-after", type=_seconds(0.02, 30), default=0.15, help="seconds a request may wait for a reply before its mirror is probed"
    )
    p.add_argument(
        "--connect-timeout", type=_seconds(0.02, 30), default=0.1, help="seconds a connect to a mirror may take before the guard aborts it"
    )
    p.add_argument(
        "--suspect-probe-timeout",
        type=_seconds(0.02, 30),
        default=0.3,
        help="seconds the probe of a mirror with a stalled request may take before the mirror is withdrawn",
    )
    p.add_argument("--no-watch-endpoints", action="store_true", help="do not watch the mirrors' EndpointSlices (probes alone decide)")
    p.add_argument("--docker-daemon-json", default="/etc/docker/daemon.json", help="Docker Engine's daemon.json on the host")
    p.add_argument("--docker-pidfile", default="/var/run/docker.pid", help="dockerd's pidfile on the host (to send it SIGHUP)")
    p.add_argument(
        "--docker-reload",
        choices=("signal", "report"),
        default="signal",
        help="after changing daemon.json: SIGHUP dockerd (needs the host's PID namespace), or only report that a reload is needed",
    )
    p.add_argument("--proc", type=Path, default=Path("/proc"), help="the host's /proc as the agent sees it")
    p.add_argument(
        "--auth-dir",
        type=Path,
        default=Path("/etc/regmirror/node-auth"),
        help="the mounted regmirror-agent-credentials Secret (mirror credentials)",
    )
    return p


def _seconds(low: float, high: float) -> Callable[[str], float]:
    """An argparse type: seconds within [low, high] (a zero or negative pace would spin the agent or never act)."""

    def parse(value: str) -> float:
        try:
            seconds = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds") from None
        if not low <= seconds <= high:  # also refuses nan
            raise argparse.ArgumentTypeError(f"{value} s is out of range: between {low:g} and {high:g} s")
        return seconds

    return parse


def _duration(value: str) -> str | None:
    """A Go duration of milliseconds or seconds for hosts.toml, or None for 0."""
    if value.strip() in ("0", "0s", "0ms", "off"):
        return None
    if not re.fullmatch(r"[1-9][0-9]{0,5}(ms|s)", value):
        raise argparse.ArgumentTypeError(f"{value!r} is not a duration like 200ms or 1s")
    return value


def main(argv: list[str] | None = None) -> int:
    """Run the agent; returns the process exit code."""
    from regmirror.agent.loop import Agent, AgentConfig, default_node_name, log, serve_health
    from regmirror.agent.nodeapi import InClusterClient, in_cluster

    args = _parser().parse_args(argv)
    config = AgentConfig(
        plan_path=args.plan,
        host_root=args.host_root,
        containerd_config_path=args.containerd_config_path,
        crio_dropin_dir=args.crio_dropin_dir,
        containerd_config_file=args.containerd_config,
        node_name=args.node_name or default_node_name(),
        node_labels_file=args.node_labels_file,
        health_port=args.health_port,
        health_address=args.health_address,
        once=args.once,
        interval=args.interval,
        probe_timeout=args.probe_timeout,
        probe_interval=args.probe_interval,
        dial_timeout=args.dial_timeout,
        watch_endpoints=not args.no_watch_endpoints,
        guard_connections=args.guard_connections,
        guard_interval=args.guard_interval,
        stall_after=args.stall_after,
        connect_timeout=args.connect_timeout,
        stall_probe_timeout=args.suspect_probe_timeout,
        docker_daemon_json=args.docker_daemon_json,
        docker_pidfile=args.docker_pidfile,
        docker_reload=args.docker_reload == "signal",
        proc_dir=args.proc,
        auth_dir=args.auth_dir,
    )
    if not config.node_name and config.node_labels_file is None:
        log("agent.misconfigured", "error", error="--node-name or $NODE_NAME is required (or --node-labels-file)")
        return 2
    api = None
    if in_cluster():
        try:
            api = InClusterClient()
        except OSError as exc:
            log("api.unavailable", "warning", error=str(exc))
    agent = Agent(config, api=api)
    log("agent.started", node=config.node_name, plan=str(config.plan_path), host_root=str(config.host_root), in_cluster=api is not None)
    if config.once:
        return 0 if agent.step().ready else 1

    stop = threading.Event()

    def _stop(signum: int, _frame: FrameType | None) -> None:
        log("agent.stopping", signal=signal.Signals(signum).name)
        stop.set()
        agent.wake()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    server = serve_health(agent.readiness, config.health_address, config.health_port) if config.health_port else None
    try:
        return agent.run(stop)
    finally:
        if server is not None:
            server.shutdown()
