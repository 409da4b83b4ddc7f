"""Run the operator as a real process against a LocalCluster, and read RegistryMirrors back."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness.cluster import LocalCluster

REPO = Path(__file__).resolve().parents[2]
CRD_FILE = REPO / "crds" / "registrymirrors.regmirror.dev.yaml"
OPERATOR_NS = "regmirror-system"
AGENT_NS = "regmirror-node"
OPERATOR_SA = "regmirror-operator"
OPERATOR_USER = f"system:serviceaccount:{OPERATOR_NS}:{OPERATOR_SA}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class OperatorProcess:
    """`regmirror run` as a subprocess with its own ServiceAccount's token."""

    def __init__(self, cluster: LocalCluster, kubeconfig: Path, log_path: Path) -> None:
        self.cluster = cluster
        self.kubeconfig = kubeconfig
        self.log_path = log_path
        self.metrics_port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {
            **self.cluster.env(),
            "KUBECONFIG": str(self.kubeconfig),
            "REGMIRROR_NAMESPACE": OPERATOR_NS,
            "REGMIRROR_AGENT_NAMESPACE": AGENT_NS,
            "REGMIRROR_AGENT_IMAGE": "regmirror:test",
            "REGMIRROR_METRICS_PORT": str(self.metrics_port),
        }
        log = open(self.log_path, "ab")  # noqa: SIM115 - the process owns it
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "regmirror", "run", "--standalone"], env=env, stdout=log, stderr=subprocess.STDOUT
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

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metrics(self) -> str:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as rsp:
            return str(rsp.read().decode())


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
    return next((c for c in (body.get("status") or {}).get("conditions") or [] if c["type"] == type_), None)


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
        raise


def wait_for(predicate: Callable[[], Any], timeout: float = 60.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.2)


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


class MirrorWatch:
    """Every status a RegistryMirror shows, from `kubectl get --watch` (no update is missed, unlike polling).

    Use as a context manager; `seen` holds (phase, Ready status, Ready reason) per update.
    """

    def __init__(self, cluster: LocalCluster, name: str) -> None:
        self.cluster = cluster
        self.name = name
        self.seen: list[tuple[str, str | None, str | None]] = []
        self._proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> MirrorWatch:
        import threading

        self._proc = subprocess.Popen(
            [str(self.cluster.kubectl_path), "get", "registrymirror", self.name, "--watch", "-o", "json", "--output-watch-events"],
            env=self.cluster.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        threading.Thread(target=self._read, daemon=True).start()
        return self

    def _read(self) -> None:
        decoder = json.JSONDecoder()
        buffer = ""
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            buffer += line
            try:
                event, _ = decoder.raw_decode(buffer.strip())
            except ValueError:
                continue
            buffer = ""
            status = event.get("object", {}).get("status") or {}
            ready = next((c for c in status.get("conditions", []) if c["type"] == "Ready"), {})
            self.seen.append((status.get("phase", ""), ready.get("status"), ready.get("reason")))

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=10)
