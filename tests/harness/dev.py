"""``make dev``: a local cluster with fake nodes, the CRD and an example, and the operator.

Run as ``PYTHONPATH=tests python -m harness.dev [-- extra operator args]``. The operator
runs in the foreground against the cluster's admin kubeconfig; Ctrl-C stops it and then
the whole cluster. ``REGMIRROR_DEV_NODES`` (default 3) sets the number of fake nodes,
``REGMIRROR_KEEP_CLUSTER=1`` keeps the logs afterwards.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

from harness.cluster import REPO_ROOT, ControlPlaneError, KubectlError, LocalCluster
from harness.operator import AGENT_NS, CRD_FILE, OPERATOR_NS, OPERATOR_SA, install_crd_and_namespaces

EXAMPLE_FILE = REPO_ROOT / "examples" / "dockerhub.yaml"
RBAC_DIR = REPO_ROOT / "manifests" / "rbac"


def _say(message: str) -> None:
    print(f"dev: {message}", file=sys.stderr, flush=True)


def _install_manifests(cluster: LocalCluster) -> Path | None:
    """CRD, namespaces, RBAC and the example; returns a kubeconfig for the operator's
    own ServiceAccount when the RBAC manifests exist (None: run it as admin)."""
    operator_kubeconfig = None
    if CRD_FILE.exists():
        # The CRD and namespaces (with their pod-security levels) exactly as the tests have them.
        install_crd_and_namespaces(cluster)
        _say(f"installed {CRD_FILE.relative_to(REPO_ROOT)}, namespaces {OPERATOR_NS} and {AGENT_NS}")
        if (RBAC_DIR / "kustomization.yaml").exists():
            # ServiceAccounts (the agent DaemonSet needs its own) and least-privilege RBAC;
            # the operator then runs with only those rights, as in a real cluster.
            cluster.kubectl("apply", "--server-side", "-k", str(RBAC_DIR))
            operator_kubeconfig = cluster.service_account_kubeconfig(OPERATOR_NS, OPERATOR_SA)
            _say(f"applied {RBAC_DIR.relative_to(REPO_ROOT)}")
    else:
        _say(f"no {CRD_FILE.relative_to(REPO_ROOT)} yet; skipping the CRD")
    if EXAMPLE_FILE.exists():
        try:
            cluster.kubectl("apply", "-f", str(EXAMPLE_FILE))
            _say(f"applied {EXAMPLE_FILE.relative_to(REPO_ROOT)}")
        except KubectlError as exc:
            # A stale example must not keep the cluster from coming up.
            _say(f"could not apply {EXAMPLE_FILE.relative_to(REPO_ROOT)}: {exc.stderr.strip()}")
    return operator_kubeconfig


def _operator_command(extra: list[str]) -> list[str] | None:
    """``python -m regmirror run [--standalone] ...``, or None if there is no such
    command yet."""
    if importlib.util.find_spec("regmirror") is None:
        return None
    probe = subprocess.run(
        [sys.executable, "-m", "regmirror", "run", "--help"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    if probe.returncode != 0:
        return None
    command = [sys.executable, "-m", "regmirror", "run"]
    if "--standalone" in probe.stdout:
        command.append("--standalone")  # one local process: no peering objects needed
    return command + extra


def _raise_keyboard_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _wait_forever(cluster: LocalCluster) -> None:
    while True:
        cluster.check_alive()
        time.sleep(1)


def _run_operator(cluster: LocalCluster, command: list[str], kubeconfig: Path | None) -> int:
    identity = f"ServiceAccount {OPERATOR_NS}/{OPERATOR_SA}" if kubeconfig else "admin"
    _say(f"starting the operator as {identity}: " + " ".join(command))
    # Same process group as us: a terminal's Ctrl-C reaches the operator directly and
    # it shuts down the way it would in a pod.
    env = {**cluster.env(), "REGMIRROR_NAMESPACE": OPERATOR_NS, "REGMIRROR_AGENT_NAMESPACE": AGENT_NS}
    if kubeconfig is not None:
        env["KUBECONFIG"] = str(kubeconfig)
    operator = subprocess.Popen(command, env=env, cwd=REPO_ROOT)
    try:
        code = operator.wait()
    except KeyboardInterrupt:
        try:
            code = operator.wait(timeout=15)
        except subprocess.TimeoutExpired:
            operator.terminate()
            code = operator.wait()
        return code
    _say(f"the operator exited with code {code}; the cluster keeps running (Ctrl-C stops it)")
    _wait_forever(cluster)
    return code


def main(argv: list[str] | None = None) -> int:
    extra = list(sys.argv[1:] if argv is None else argv)
    if extra[:1] == ["--"]:
        extra = extra[1:]
    nodes = int(os.environ.get("REGMIRROR_DEV_NODES", "3"))
    # `kill <pid>` shuts down as cleanly as Ctrl-C.
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        with LocalCluster(nodes=nodes) as cluster:
            _say(f"cluster up in {cluster.startup_seconds:.1f}s with {nodes} fake node(s)")
            operator_kubeconfig = _install_manifests(cluster)
            print(f"kubeconfig: {cluster.kubeconfig}", flush=True)
            print(f"logs:       {cluster.log_dir}", flush=True)
            print(
                f"export KUBECONFIG={cluster.kubeconfig} PATH={cluster.bin_dir}:$PATH",
                flush=True,
            )
            command = _operator_command(extra)
            if command is None:
                _say("operator not available yet; cluster is running (Ctrl-C stops it)")
                _wait_forever(cluster)
                return 0
            return _run_operator(cluster, command, operator_kubeconfig)
    except KeyboardInterrupt:
        _say("stopped")
        return 130
    except ControlPlaneError as exc:
        _say(f"control plane failed: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
