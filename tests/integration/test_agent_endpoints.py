"""The agent watches its mirrors' EndpointSlices on the real API server: a mirror whose pods are gone is withdrawn at once.

A Deployment and a Service stand in for a mirror (kwok runs the pod, the real
EndpointSlice controller publishes its endpoint); the mirror URL in the plan
is a local server that keeps answering, so only the EndpointSlices can tell
the agent that the mirror's pods left. The agent runs its loop with its own
ServiceAccount's bound token and only the rights manifests/rbac grants.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from harness import LocalCluster
from harness.operator import AGENT_NS, OPERATOR_NS, OperatorProcess, wait_for
from integration.test_node_taint import AGENT_SA, AGENT_USER, CONFIG_OK, agent_pod, mirror_answering, token

SERVICE = "endpoints-probe"
LABELS = {"app": SERVICE}


def deployment(replicas: int) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": SERVICE, "namespace": OPERATOR_NS},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": LABELS},
            "template": {
                "metadata": {"labels": LABELS},
                "spec": {
                    "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "seccompProfile": {"type": "RuntimeDefault"}},
                    "containers": [
                        {
                            "name": "registry",
                            "image": "example.invalid/registry:test",
                            "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
                        }
                    ],
                },
            },
        },
    }


def ready_endpoints(cluster: LocalCluster) -> int:
    slices = cluster.api(
        "GET", f"/apis/discovery.k8s.io/v1/namespaces/{OPERATOR_NS}/endpointslices?labelSelector=kubernetes.io/service-name={SERVICE}"
    )
    return sum(1 for s in slices["items"] for e in s.get("endpoints") or [] if (e.get("conditions") or {}).get("ready") is not False)


def start_agent(
    cluster: LocalCluster, tmp_path: Path, node: str, pod: dict[str, Any], url: str, service: str, probe_interval: float = 2.0
) -> tuple[subprocess.Popen[bytes], Path, Path]:
    """The agent's loop as its ServiceAccount (token bound to `pod` on `node`): (process, its log, the docker.io hosts.toml)."""
    root = tmp_path / f"root-{node}"
    (root / "etc/containerd").mkdir(parents=True)
    (root / "etc/containerd/config.toml").write_text(CONFIG_OK)
    sa = tmp_path / f"sa-{node}"
    sa.mkdir()
    (sa / "token").write_text(token(cluster, AGENT_NS, AGENT_SA, pod))
    (sa / "ca.crt").write_bytes(cluster.ca_cert.read_bytes())
    plan = tmp_path / f"plan-{node}.json"
    entry = {
        "name": "hub",
        "hosts": ["docker.io"],
        "servers": {"docker.io": "https://registry-1.docker.io"},
        "url": url,
        "priority": 100,
        "capabilities": ["pull", "resolve"],
        "fallback": "AllowUpstream",
        "runtimes": ["containerd"],
        "nodeSelector": {},
        "service": service,
    }
    plan.write_text(json.dumps({"mirrors": [entry]}))
    env = {
        **os.environ,
        **cluster.env(),
        "KUBERNETES_SERVICE_HOST": "127.0.0.1",
        "KUBERNETES_SERVICE_PORT": str(cluster.port),
        "REGMIRROR_SERVICEACCOUNT_DIR": str(sa),
        "NODE_NAME": node,
    }
    log_path = tmp_path / f"agent-{node}.log"
    argv = [sys.executable, "-m", "regmirror", "agent", "--plan", str(plan), "--host-root", str(root), "--health-port", "0"]
    argv += ["--probe-interval", str(probe_interval)]
    with log_path.open("wb") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
    return proc, log_path, root / "etc/containerd/certs.d/docker.io/hosts.toml"


def test_a_mirror_whose_pods_leave_the_service_is_withdrawn_without_waiting_for_a_probe(
    cluster: LocalCluster, operator: OperatorProcess, tmp_path: Path
) -> None:
    (node,) = cluster.add_nodes(1, prefix="endpoints-")
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": SERVICE, "namespace": OPERATOR_NS},
        "spec": {"selector": LABELS, "ports": [{"port": 5000, "targetPort": 5000}]},
    }
    cluster.api("POST", f"/api/v1/namespaces/{OPERATOR_NS}/services", service)
    cluster.api("POST", f"/apis/apps/v1/namespaces/{OPERATOR_NS}/deployments", deployment(1))
    pod = agent_pod(cluster, node)
    proc = None
    try:
        wait_for(lambda: ready_endpoints(cluster) == 1, timeout=60, what="the mirror's endpoint")
        with mirror_answering() as url:
            proc, log_path, hosts_toml = start_agent(cluster, tmp_path, node, pod, url, f"{OPERATOR_NS}/{SERVICE}", probe_interval=60)

            def events() -> list[dict[str, Any]]:
                return [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]

            wait_for(hosts_toml.exists, timeout=30, what="the agent's files")
            wait_for(
                lambda: not [e for e in events() if e["event"] == "endpoints.unavailable"] and len(events()) > 3,
                timeout=10,
                what="a quiet agent",
            )

            scaled = time.monotonic()
            cluster.api(
                "PATCH",
                f"/apis/apps/v1/namespaces/{OPERATOR_NS}/deployments/{SERVICE}",
                {"spec": {"replicas": 0}},
                content_type="application/merge-patch+json",
            )
            wait_for(lambda: not hosts_toml.exists(), timeout=30, what="the mirror withdrawn from the node's files")
            withdrawn_after = time.monotonic() - scaled
            (withdrawn,) = [e for e in events() if e["event"] == "mirror.withdrawn"]
            assert "no ready endpoint" in withdrawn["error"], withdrawn

            cluster.api(
                "PATCH",
                f"/apis/apps/v1/namespaces/{OPERATOR_NS}/deployments/{SERVICE}",
                {"spec": {"replicas": 1}},
                content_type="application/merge-patch+json",
            )
            wait_for(hosts_toml.exists, timeout=60, what="the mirror restored when its pod is back")
            assert [e["event"] for e in events() if e["event"].startswith("mirror.")] == ["mirror.withdrawn", "mirror.restored"]
        print(f"withdrawn {withdrawn_after:.2f}s after the Deployment was scaled to 0 (includes the pod's deletion)")
        assert withdrawn_after < 10, "well before the 60 s probe interval"
        watches = [
            (e["verb"], e["responseStatus"]["code"])
            for e in cluster.audit_events(user=AGENT_USER)
            if (e.get("objectRef") or {}).get("resource") == "endpointslices" and e.get("stage") == "ResponseComplete"
        ]
        assert ("list", 200) in watches and all(code == 200 for _, code in watches), watches
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(10)
        cluster.api("DELETE", f"/apis/apps/v1/namespaces/{OPERATOR_NS}/deployments/{SERVICE}")
        cluster.api("DELETE", f"/api/v1/namespaces/{OPERATOR_NS}/services/{SERVICE}")
        cluster.api("DELETE", f"/api/v1/namespaces/{AGENT_NS}/pods/{pod['metadata']['name']}?gracePeriodSeconds=0")
        cluster.api("DELETE", f"/api/v1/nodes/{node}")


def test_without_dial_timeout_a_dark_endpoint_among_live_ones_withdraws_the_mirror_until_it_leaves(
    cluster: LocalCluster, operator: OperatorProcess, tmp_path: Path
) -> None:
    """A node whose containerd has no dial_timeout (here: the Node reports no runtime version) probes each endpoint.

    Two replicas answer on 127.0.0.3 and 127.0.0.4, listed in one EndpointSlice (written by hand
    for a Service without a selector) as pod addresses 10.250.0.3 and 10.250.0.4 (the API server
    refuses loopback endpoints), which kernel DNAT rules for this test's port alone lead to them,
    as a pod network would; the ClusterIP stand-in keeps answering: only the probe of the dead
    replica's own address can tell the agent, and the slice losing it brings the mirror back.
    """
    from http.server import ThreadingHTTPServer

    from integration.test_node_taint import Registry401

    if os.geteuid() != 0 or shutil.which("iptables") is None:
        pytest.skip("needs root and iptables (DNAT from the pod addresses to loopback)")

    (node,) = cluster.add_nodes(1, prefix="endpoints-dark-")
    service_name = "endpoints-dark"
    port = free_loopback_port()
    servers = []
    for host in ("127.0.0.3", "127.0.0.4"):
        server = ThreadingHTTPServer((host, port), Registry401)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": service_name, "namespace": OPERATOR_NS},
        "spec": {"ports": [{"name": "registry", "port": 5000, "targetPort": port}]},
    }
    cluster.api("POST", f"/api/v1/namespaces/{OPERATOR_NS}/services", service)

    def endpoint_slice(hosts: list[str]) -> dict[str, Any]:
        return {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": service_name,
                "namespace": OPERATOR_NS,
                "labels": {"kubernetes.io/service-name": service_name, "endpointslice.kubernetes.io/managed-by": "regmirror-tests"},
            },
            "addressType": "IPv4",
            "ports": [{"name": "registry", "port": port, "protocol": "TCP"}],
            "endpoints": [{"addresses": [h], "conditions": {"ready": True}} for h in hosts],
        }

    slices = f"/apis/discovery.k8s.io/v1/namespaces/{OPERATOR_NS}/endpointslices"
    rules = [
        ["OUTPUT", "-d", pod_ip, "-p", "tcp", "--dport", str(port), "-j", "DNAT", "--to-destination", f"{local}:{port}"]
        for pod_ip, local in (("10.250.0.3", "127.0.0.3"), ("10.250.0.4", "127.0.0.4"))
    ]
    for rule in rules:
        subprocess.run(["iptables", "-t", "nat", "-A", *rule], check=True, capture_output=True)
    cluster.api("POST", slices, endpoint_slice(["10.250.0.3", "10.250.0.4"]))
    pod = agent_pod(cluster, node)
    proc = None
    try:
        with mirror_answering() as url:
            proc, log_path, hosts_toml = start_agent(cluster, tmp_path, node, pod, url, f"{OPERATOR_NS}/{service_name}")

            def events() -> list[dict[str, Any]]:
                return [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]

            wait_for(hosts_toml.exists, timeout=30, what="the agent's files with both replicas answering")
            servers[1].shutdown()
            servers[1].server_close()
            wait_for(lambda: not hosts_toml.exists(), timeout=15, what="the mirror withdrawn: one replica is dark")
            (withdrawn,) = [e for e in events() if e["event"] == "mirror.withdrawn"]
            assert f"endpoint http://10.250.0.4:{port}" in withdrawn["error"], withdrawn
            cluster.api("PUT", f"{slices}/{service_name}", endpoint_slice(["10.250.0.3"]))  # its pod left the Service
            wait_for(hosts_toml.exists, timeout=10, what="the mirror restored once the dark endpoint left")
    finally:
        for rule in rules:
            subprocess.run(["iptables", "-t", "nat", "-D", *rule], check=False, capture_output=True)
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(10)
        servers[0].shutdown()
        for path in (f"{slices}/{service_name}", f"/api/v1/namespaces/{OPERATOR_NS}/services/{service_name}"):
            cluster.api("DELETE", path)
        cluster.api("DELETE", f"/api/v1/namespaces/{AGENT_NS}/pods/{pod['metadata']['name']}?gracePeriodSeconds=0")
        cluster.api("DELETE", f"/api/v1/nodes/{node}")


def free_loopback_port() -> int:
    """A port free on both 127.0.0.3 and 127.0.0.4 (an EndpointSlice gives all its endpoints one port)."""
    import socket

    for _ in range(20):
        with socket.socket() as a, socket.socket() as b:
            a.bind(("127.0.0.3", 0))
            port: int = a.getsockname()[1]
            try:
                b.bind(("127.0.0.4", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no port free on both addresses")
