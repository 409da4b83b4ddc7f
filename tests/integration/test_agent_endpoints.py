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
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

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
        root = tmp_path / "root"
        (root / "etc/containerd").mkdir(parents=True)
        (root / "etc/containerd/config.toml").write_text(CONFIG_OK)
        sa = tmp_path / "sa"
        sa.mkdir()
        (sa / "token").write_text(token(cluster, AGENT_NS, AGENT_SA, pod))
        (sa / "ca.crt").write_bytes(cluster.ca_cert.read_bytes())
        with mirror_answering() as url:
            plan = tmp_path / "plan.json"
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
                "service": f"{OPERATOR_NS}/{SERVICE}",
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
            log_path = tmp_path / "agent.log"
            argv = [sys.executable, "-m", "regmirror", "agent", "--plan", str(plan), "--host-root", str(root), "--health-port", "0"]
            # A long probe interval: whatever withdraws the mirror within seconds is the EndpointSlice watch.
            argv += ["--probe-interval", "60"]
            with log_path.open("wb") as out:
                proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
            hosts_toml = root / "etc/containerd/certs.d/docker.io/hosts.toml"

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
