"""Run the operator as a real process against a LocalCluster, and read RegistryMirrors back."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness.cluster import LocalCluster
from harness.proxy import TcpRelay
from harness.waiting import free_ports, wait_for
from regmirror import constants as c
from regmirror import naming

REPO = Path(__file__).resolve().parents[2]
CRD_FILE = REPO / "crds" / "registrymirrors.regmirror.dev.yaml"
OPERATOR_NS = "regmirror-system"
AGENT_NS = "regmirror-node"
OPERATOR_SA = "regmirror-operator"
OPERATOR_USER = f"system:serviceaccount:{OPERATOR_NS}:{OPERATOR_SA}"
ERROR_LEVELS = frozenset({"error", "critical", "fatal"})
LIVENESS_STALE_SECONDS = 20


class OperatorProcess:
    """`regmirror run` as a subprocess with its own ServiceAccount's token.

    ``relay`` is the TCP relay its kubeconfig points at (the fault tests cut it to
    partition the operator from the API server); Kopf's liveness endpoint is served
    on ``liveness_port``. ``identity`` is its pod name (POD_NAME: the leader Lease's
    holderIdentity and its User-Agent's suffix); it stays across restarts, as a pod's does.
    """

    def __init__(
        self, cluster: LocalCluster, kubeconfig: Path, log_path: Path, relay: TcpRelay | None = None, identity: str = "regmirror-operator-0"
    ) -> None:
        self.cluster = cluster
        self.identity = identity
        self.kubeconfig = kubeconfig
        self.log_path = log_path
        self.relay = relay
        self.metrics_port, self.liveness_port = free_ports(2)
        self.proc: subprocess.Popen[bytes] | None = None
        # Settings a test module runs the operator with (applied at the next start or restart).
        self.extra_env: dict[str, str] = {}

    def start(self) -> None:
        env = {
            **self.cluster.env(),
            "KUBECONFIG": str(self.kubeconfig),
            "REGMIRROR_NAMESPACE": OPERATOR_NS,
            "REGMIRROR_AGENT_NAMESPACE": AGENT_NS,
            "REGMIRROR_AGENT_IMAGE": "regmirror:test",
            "REGMIRROR_METRICS_PORT": str(self.metrics_port),
            # Liveness fails once the operator has been unable to watch for this long (the
            # default is minutes); short here, so the fault tests see it within a partition.
            "REGMIRROR_LIVENESS_STALE": str(LIVENESS_STALE_SECONDS),
            # A rotation asked for waits this long after the previous one (600 s in a cluster, where a Secret
            # volume takes about a minute to reach the pods; here no pod mounts anything).
            "REGMIRROR_ACCESS_ROTATION_SPACING": "2",
            # status.cache polls each ready mirror pod's sidecar at its pod IP. kwok's pods have IPs
            # from POD_CIDR that nothing on this machine answers (the packets would leave loopback),
            # so the polls are off; tests/e2e/test_status_cache_e2e.py runs them every second
            # against a mirror pod whose sidecar really listens at its IP.
            "REGMIRROR_CACHE_STATS_INTERVAL": "0",
            "POD_NAME": self.identity,
            **self.extra_env,
        }
        log = open(self.log_path, "ab")  # noqa: SIM115 - the process owns it
        liveness = f"--liveness=http://127.0.0.1:{self.liveness_port}/healthz"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "regmirror", "run", "--standalone", liveness], env=env, stdout=log, stderr=subprocess.STDOUT
        )

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def restart(self, sig: int = signal.SIGTERM) -> None:
        self.stop(sig)
        self.start()

    @property
    def running(self) -> bool:
        """Whether the process is running."""
        return self.proc is not None and self.proc.poll() is None

    def liveness(self) -> int | None:
        """HTTP status of Kopf's liveness endpoint (200: alive), None when it does not answer."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.liveness_port}/healthz", timeout=15) as rsp:
                return int(rsp.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)
        except OSError:
            return None

    def wait_live(self, timeout: float = 60.0) -> None:
        """Wait until the liveness endpoint answers 200 (the operator has started)."""
        wait_for(lambda: self.liveness() == 200, timeout, "the operator's liveness endpoint to answer 200", diagnose=self.log_tail)

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_size(self) -> int:
        """Bytes in the log so far: an offset for ``error_lines``."""
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def error_lines(self, since: int = 0) -> list[str]:
        """Log lines at severity error or worse written after byte offset ``since``."""
        with open(self.log_path, "rb") as log:
            log.seek(since)
            text = log.read().decode(errors="replace")
        found = []
        for line in text.splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if isinstance(record, dict):
                level = str(record.get("severity") or record.get("levelname") or record.get("level") or "").lower()
                if level in ERROR_LEVELS:
                    found.append(line)
            elif re.search(r"\b(ERROR|CRITICAL|FATAL)\b", line):
                found.append(line)
        return found

    def log_tail(self, chars: int = 6000) -> str:
        """The end of the operator's log, for failure messages."""
        return f"operator log (tail):\n{self.logs()[-chars:]}"

    def metrics(self) -> str:
        """The operator's Prometheus metrics page."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as rsp:
            return str(rsp.read().decode())

    @property
    def user_agent(self) -> str:
        """The User-Agent of its requests: the audit log's way to tell replicas apart."""
        return f"{c.FIELD_MANAGER}/{self.identity}"

    def leads(self) -> bool | None:
        """Whether it reports itself the leader (regmirror_leader 1); None when its metrics do not answer."""
        try:
            text = self.metrics()
        except OSError:
            return None
        match = re.search(r"^regmirror_leader ([0-9.]+)$", text, re.M)
        return match is not None and float(match.group(1)) == 1.0


def install_crd_and_namespaces(cluster: LocalCluster) -> None:
    cluster.kubectl("apply", "--server-side", "-f", str(CRD_FILE))
    cluster.kubectl("wait", "--for=condition=Established", "crd/registrymirrors.regmirror.dev", "--timeout=60s")
    for ns, level in ((OPERATOR_NS, "restricted"), (AGENT_NS, "privileged")):
        cluster.kubectl(
            "apply",
            "--server-side",
            "-f",
            "-",
            input={
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {"name": ns, "labels": {"pod-security.kubernetes.io/enforce": level}},
            },
        )


def mirror_body(name: str, **spec: Any) -> dict[str, Any]:
    """A RegistryMirror with a local-looking upstream; keyword args override spec fields."""
    body: dict[str, Any] = {"upstream": {"url": "https://registry-1.docker.io"}, "storage": {"size": "1Gi"}}
    body.update(spec)
    return {"apiVersion": "regmirror.dev/v1alpha1", "kind": "RegistryMirror", "metadata": {"name": name}, "spec": body}


def get_mirror(cluster: LocalCluster, name: str) -> dict[str, Any]:
    return dict(cluster.kubectl_json("get", "registrymirror", name))


def condition(body: dict[str, Any], type_: str) -> dict[str, Any] | None:
    return next((cd for cd in (body.get("status") or {}).get("conditions") or [] if cd["type"] == type_), None)


def wait_condition(
    cluster: LocalCluster, name: str, type_: str, status: str, *, reason: str | None = None, timeout: float = 90.0
) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        body = get_mirror(cluster, name)
        cond = condition(body, type_)
        if cond and cond["status"] == status and (reason is None or cond["reason"] == reason):
            return body
        return None

    try:
        return dict(cluster.wait_until(check, timeout=timeout, what=f"{name} {type_}={status} {reason or ''}"))
    except Exception:
        print(json.dumps(get_mirror(cluster, name).get("status"), indent=1))
        print(_children_view(cluster, name))
        raise


def _children_view(cluster: LocalCluster, name: str) -> str:
    """What the API server says of the mirror's Deployment and pods: tells an operator that missed a change
    from pods that never became Ready (unscheduled, on a vanished node)."""
    child = naming.child_name(name)
    lines = [f"--- Deployment {child} and its pods, as the API server has them:"]
    deployment = cluster.kubectl("get", "deployment", child, "-n", OPERATOR_NS, "-o", "json", check=False)
    if deployment.returncode == 0:
        body = json.loads(deployment.stdout)
        lines.append(f"resourceVersion {body['metadata'].get('resourceVersion')}, status {json.dumps(body.get('status'))}")
    else:
        lines.append(deployment.stderr.strip())
    selector = ",".join(f"{k}={v}" for k, v in naming.selector_labels(name).items())
    pods = cluster.kubectl("get", "pods", "-n", OPERATOR_NS, "-l", selector, "-o", "wide", check=False)
    lines.append(pods.stdout.strip() or pods.stderr.strip())
    return "\n".join(lines)


def agent_rollout_complete(cluster: LocalCluster) -> bool:
    """Whether the agent DaemonSet carries the current node plan on every node, all pods Ready."""
    result = cluster.kubectl("get", "daemonset", c.AGENT_NAME, "-n", AGENT_NS, "-o", "json", check=False)
    if result.returncode != 0:
        return False
    ds = json.loads(result.stdout)
    st = ds.get("status") or {}
    desired = st.get("desiredNumberScheduled")
    return bool(
        st.get("observedGeneration") == ds["metadata"]["generation"]
        and desired
        and st.get("updatedNumberScheduled") == desired
        and st.get("numberReady") == desired
        and st.get("currentNumberScheduled") == desired
        and not st.get("numberUnavailable")
    )


def settled(cluster: LocalCluster, names: list[str]) -> bool:
    """Whether the named mirrors converged: Ready, current generation observed, every selected
    node carries them, and the agent rollout is over (nothing is left for the operator to do)."""
    for name in names:
        body = get_mirror(cluster, name)
        status = body.get("status") or {}
        nodes = status.get("nodes") or {}
        ready = condition(body, "Ready")
        if not (
            ready
            and ready["status"] == "True"
            and status.get("observedGeneration") == body["metadata"].get("generation")
            and nodes.get("ready") == nodes.get("desired") == nodes.get("updated")
        ):
            return False
    return agent_rollout_complete(cluster)


def wait_settled(cluster: LocalCluster, names: list[str], timeout: float = 120.0) -> None:
    """Wait until ``settled(cluster, names)``."""
    wait_for(lambda: settled(cluster, names), timeout, f"mirrors {names} to settle (Ready, every node, rollout over)", interval=0.5)


def apply(cluster: LocalCluster, body: dict[str, Any]) -> None:
    cluster.kubectl("apply", "--server-side", "--field-manager=test-admin", "-f", "-", input=body)


def delete_mirror(cluster: LocalCluster, name: str, timeout: float = 120.0) -> None:
    cluster.kubectl("delete", "registrymirror", name, "--wait=false", check=False)
    wait_for(
        lambda: cluster.kubectl("get", "registrymirror", name, check=False).returncode != 0,
        timeout=timeout,
        what=f"{name} to be gone",
    )


class KubeconfigCluster:
    """Any cluster reached through a kubeconfig (kind, a real cluster), with the few
    methods of LocalCluster that the helpers above use, so the same test bodies run
    against the local control plane and against kind."""

    def __init__(self, kubeconfig: Path, kubectl: str = "kubectl") -> None:
        self.kubeconfig = kubeconfig
        self.kubectl_path = kubectl

    def env(self) -> dict[str, str]:
        import os

        return {**os.environ, "KUBECONFIG": str(self.kubeconfig)}

    def kubectl(self, *args: str, check: bool = True, input: Any = None, timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
        if isinstance(input, (dict, list)):
            input = json.dumps(input)
        argv = [self.kubectl_path, *args]
        result = subprocess.run(argv, input=input, capture_output=True, text=True, env=self.env(), timeout=timeout, check=False)
        if check and result.returncode != 0:
            raise subprocess.CalledProcessError(result.returncode, argv, result.stdout, result.stderr)
        return result

    def kubectl_json(self, *args: str) -> Any:
        return json.loads(self.kubectl(*args, "-o", "json").stdout)

    def wait_until(self, predicate: Callable[[], Any], *, timeout: float = 60.0, what: str = "condition") -> Any:
        return wait_for(predicate, timeout=timeout, what=what)
