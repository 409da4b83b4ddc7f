"""The startup taint on the real API server: the agent lifts its own Node's, the operator lifts an overdue one, nothing else passes.

Both run with their own ServiceAccount's tokens and only the rights
manifests/rbac grants (RBAC plus the ValidatingAdmissionPolicy
`regmirror-node-startup-taint`). The agent's token is bound to a pod on its
node, as the kubelet mounts it, so the API server knows which node it runs on.
Every attempt to do more (another node, another taint, a label, cordoning,
a token bound to no node) must be refused, and the audit log must show it.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from harness import LocalCluster
from harness.operator import AGENT_NS, OPERATOR_NS, OperatorProcess, wait_for
from regmirror import nodetaint

AGENT_SA = "regmirror-agent"
AGENT_USER = f"system:serviceaccount:{AGENT_NS}:{AGENT_SA}"
OPERATOR_USER = f"system:serviceaccount:{OPERATOR_NS}:regmirror-operator"
TAINT = {"key": nodetaint.TAINT_KEY, "effect": "NoSchedule"}
OTHER = {"key": "example.com/dedicated", "value": "gpu", "effect": "NoSchedule"}
CONFIG_OK = 'version = 2\n[plugins."io.containerd.grpc.v1.cri".registry]\n  config_path = "/etc/containerd/certs.d"\n'
NODE_NAME_EXTRA = "authentication.kubernetes.io/node-name"
# The requests this module makes to be refused carry this User-Agent, so the
# tests that require "never a 403" of the operator and the agent skip them.
DENIED_AGENT = "regmirror-tests/deliberately-denied"


def attempt(
    cluster: LocalCluster, method: str, path: str, bearer: str, body: Any = None, content_type: str = "application/json-patch+json"
) -> int:
    """One request that should be refused, as `bearer`: its HTTP status."""
    conn = http.client.HTTPSConnection(
        "127.0.0.1", cluster.port, context=ssl.create_default_context(cafile=str(cluster.ca_cert)), timeout=30
    )
    try:
        headers = {"Authorization": f"Bearer {bearer}", "User-Agent": DENIED_AGENT, "Content-Type": content_type}
        conn.request(method, path, body=json.dumps(body).encode() if body is not None else None, headers=headers)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


class Registry401(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(401 if self.path == "/v2/" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        return


@contextlib.contextmanager
def mirror_answering() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Registry401)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def set_taints(cluster: LocalCluster, node: str, taints: list[dict[str, Any]]) -> None:
    cluster.api("PATCH", f"/api/v1/nodes/{node}", {"spec": {"taints": taints}}, content_type="application/merge-patch+json")


def taints_of(cluster: LocalCluster, node: str) -> list[dict[str, Any]]:
    return cluster.api("GET", f"/api/v1/nodes/{node}")["spec"].get("taints") or []


def agent_pod(cluster: LocalCluster, node: str) -> dict[str, Any]:
    """A pod of the agent's ServiceAccount on `node` (what the DaemonSet would run there)."""
    body = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": f"taint-agent-{node}", "namespace": AGENT_NS},
        "spec": {
            "nodeName": node,
            "serviceAccountName": AGENT_SA,
            "tolerations": [{"operator": "Exists"}],
            "containers": [{"name": "agent", "image": "example.invalid/regmirror:test"}],
        },
    }
    return cluster.api("POST", f"/api/v1/namespaces/{AGENT_NS}/pods", body)  # type: ignore[no-any-return]


def token(cluster: LocalCluster, namespace: str, sa: str, pod: dict[str, Any] | None = None) -> str:
    spec: dict[str, Any] = {"expirationSeconds": 3600}
    if pod is not None:
        spec["boundObjectRef"] = {"apiVersion": "v1", "kind": "Pod", "name": pod["metadata"]["name"], "uid": pod["metadata"]["uid"]}
    body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec}
    return str(cluster.api("POST", f"/api/v1/namespaces/{namespace}/serviceaccounts/{sa}/token", body)["status"]["token"])


def user_info(cluster: LocalCluster, bearer: str) -> dict[str, Any]:
    review = {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}
    return cluster.api("POST", "/apis/authentication.k8s.io/v1/selfsubjectreviews", review, token=bearer)["status"]["userInfo"]  # type: ignore[no-any-return]


def run_agent_once(cluster: LocalCluster, tmp_path: Path, node: str, bearer: str, mirror_url: str) -> subprocess.CompletedProcess[str]:
    root = tmp_path / f"root-{node}"
    (root / "etc/containerd").mkdir(parents=True)
    (root / "etc/containerd/config.toml").write_text(CONFIG_OK)
    sa = tmp_path / f"sa-{node}"
    sa.mkdir()
    (sa / "token").write_text(bearer)
    (sa / "ca.crt").write_bytes(cluster.ca_cert.read_bytes())
    plan = tmp_path / f"plan-{node}.json"
    entry = {
        "name": "hub",
        "hosts": ["docker.io"],
        "servers": {"docker.io": "https://registry-1.docker.io"},
        "url": mirror_url,
        "priority": 100,
        "capabilities": ["pull", "resolve"],
        "fallback": "AllowUpstream",
        "runtimes": ["containerd"],
        "nodeSelector": {},
    }
    plan.write_text(json.dumps({"mirrors": [entry]}))
    env = {
        **cluster.env(),
        "KUBERNETES_SERVICE_HOST": "127.0.0.1",
        "KUBERNETES_SERVICE_PORT": str(cluster.port),
        "REGMIRROR_SERVICEACCOUNT_DIR": str(sa),
        "NODE_NAME": node,
    }
    argv = [sys.executable, "-m", "regmirror", "agent", "--once", "--plan", str(plan), "--host-root", str(root), "--health-port", "0"]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, check=False)


def json_patch(cluster: LocalCluster, node: str, patch: list[dict[str, Any]], bearer: str) -> Any:
    return cluster.api("PATCH", f"/api/v1/nodes/{node}", patch, content_type="application/json-patch+json", token=bearer)


def test_the_agent_lifts_its_own_nodes_taint_once_configured_and_can_do_nothing_else(
    cluster: LocalCluster, operator: OperatorProcess, tmp_path: Path
) -> None:
    mine, other = cluster.add_nodes(2, prefix="taint-agent-")
    for node in (mine, other):
        set_taints(cluster, node, [OTHER, TAINT])
    pod = agent_pod(cluster, mine)
    try:
        bound = token(cluster, AGENT_NS, AGENT_SA, pod)
        info = user_info(cluster, bound)
        assert info["username"] == AGENT_USER
        assert info.get("extra", {}).get(NODE_NAME_EXTRA) == [mine], "the API server binds the agent's token to its node"
        since = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())

        with mirror_answering() as url:
            result = run_agent_once(cluster, tmp_path, mine, bound, url)
        assert result.returncode == 0, result.stdout + result.stderr
        events = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
        order = [e["event"] for e in events if e["event"] in ("files.applied", "taint.removed")]
        assert order == ["files.applied", "taint.removed"], events
        assert taints_of(cluster, mine) == [OTHER], "only the startup taint is gone, the other one kept"
        assert taints_of(cluster, other) == [OTHER, TAINT]
        wait_for(
            lambda: cluster.kubectl(
                "get",
                "events",
                "-n",
                "default",
                "--field-selector",
                f"reason={nodetaint.LIFTED_REASON},involvedObject.name={mine}",
                "-o",
                "name",
            ).stdout.strip(),
            timeout=10,
            what="a RegistryConfigured Event on the node",
        )

        # What a compromised agent might try with the same token: every one is refused.
        remove = nodetaint.removal_patch([OTHER, TAINT])
        assert attempt(cluster, "PATCH", f"/api/v1/nodes/{other}", bound, remove) == 403
        set_taints(cluster, mine, [OTHER, TAINT])
        for patch in (
            [{"op": "replace", "path": "/spec/taints", "value": [TAINT]}],  # another taint
            [{"op": "add", "path": "/metadata/labels/evil", "value": "1"}],  # a label
            [{"op": "add", "path": "/spec/unschedulable", "value": True}],  # cordon
        ):
            assert attempt(cluster, "PATCH", f"/api/v1/nodes/{mine}", bound, patch) == 403, patch
        assert attempt(cluster, "DELETE", f"/api/v1/nodes/{mine}", bound) == 403
        # A token of the agent's ServiceAccount that is bound to no pod (no node) removes nothing anywhere.
        unbound = token(cluster, AGENT_NS, AGENT_SA)
        assert attempt(cluster, "PATCH", f"/api/v1/nodes/{mine}", unbound, remove) == 403
        assert taints_of(cluster, mine) == [OTHER, TAINT]
        denial = [e for e in cluster.audit_events(user=AGENT_USER, since=since) if (e.get("objectRef") or {}).get("name") == other]
        assert any("only change the Node its pod runs on" in json.dumps(e.get("responseStatus")) for e in denial), denial

        audit = [
            e
            for e in cluster.audit_events(user=AGENT_USER, since=since)
            if e.get("stage") == "ResponseComplete" and (e.get("objectRef") or {}).get("resource") == "nodes" and e["verb"] != "get"
        ]
        summary = [(e["verb"], e["objectRef"].get("name"), e["responseStatus"]["code"]) for e in audit]
        print("agent's node writes:", *summary, sep="\n  ")
        assert summary[0] == ("patch", mine, 200), summary
        assert sorted(summary[1:]) == sorted(
            [
                ("patch", other, 403),
                ("patch", mine, 403),
                ("patch", mine, 403),
                ("patch", mine, 403),
                ("delete", mine, 403),
                ("patch", mine, 403),
            ]
        )
    finally:
        cluster.api("DELETE", f"/api/v1/namespaces/{AGENT_NS}/pods/{pod['metadata']['name']}?gracePeriodSeconds=0")
        for node in (mine, other):
            cluster.api("DELETE", f"/api/v1/nodes/{node}")


def test_the_operator_lifts_a_taint_nobody_lifted_after_the_timeout_with_a_warning(
    cluster: LocalCluster, operator: OperatorProcess, tmp_path: Path
) -> None:
    """No agent runs on the node: the operator's part (nodetaint.lift_overdue) removes the taint once it is overdue."""
    (node,) = cluster.add_nodes(1, prefix="taint-timeout-")
    set_taints(cluster, node, [TAINT, OTHER])
    bearer = token(cluster, OPERATOR_NS, "regmirror-operator")
    timeout = 3.0
    first_seen: dict[str, float] = {}

    def patch_node(name: str, patch: list[dict[str, Any]]) -> None:
        json_patch(cluster, name, patch, bearer)

    def post_event(obj: Any, reason: str, message: str) -> None:
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        meta = obj["metadata"]
        event = {
            "metadata": {"generateName": f"{meta['name']}.", "namespace": "default"},
            "involvedObject": {"apiVersion": "v1", "kind": "Node", "name": meta["name"], "uid": meta["uid"]},
            "reason": reason,
            "message": message,
            "type": "Warning",
            "source": {"component": "regmirror-operator"},
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        cluster.api("POST", "/api/v1/namespaces/default/events", event, token=bearer)

    try:
        started = time.time()
        lifted: list[str] = []
        while node not in lifted and time.time() - started < 30:
            nodes = cluster.api("GET", "/api/v1/nodes", token=bearer)["items"]
            done, wake = nodetaint.lift_overdue(nodes, first_seen, time.time(), timeout, patch_node, post_event)
            lifted += done
            if node in first_seen or not done:
                time.sleep(max(0.05, min((wake or time.time() + 0.5) - time.time(), 1.0)))
        elapsed = time.time() - started
        assert node in lifted and elapsed >= timeout - 0.5, (lifted, elapsed)
        assert taints_of(cluster, node) == [OTHER]
        events = cluster.api("GET", f"/api/v1/namespaces/default/events?fieldSelector=involvedObject.name={node}")["items"]
        events = [e for e in events if (e.get("source") or {}).get("component") == "regmirror-operator"]  # not the node controller's
        assert [e["reason"] for e in events] == [nodetaint.TIMED_OUT_REASON]
        assert events[0]["type"] == "Warning" and nodetaint.TAINT_KEY in events[0]["message"]
        # The operator's patch right is for this taint only.
        assert (
            attempt(cluster, "PATCH", f"/api/v1/nodes/{node}", bearer, [{"op": "add", "path": "/metadata/labels/evil", "value": "1"}])
            == 403
        )
        assert attempt(cluster, "PATCH", f"/api/v1/nodes/{node}", bearer, [{"op": "replace", "path": "/spec/taints", "value": []}]) == 403
        codes = [
            (e["verb"], e["responseStatus"]["code"])
            for e in cluster.audit_events(user=OPERATOR_USER, verbs=["patch"])
            if e.get("stage") == "ResponseComplete" and (e.get("objectRef") or {}).get("name") == node
        ]
        assert codes == [("patch", 200), ("patch", 403), ("patch", 403)], codes
    finally:
        cluster.api("DELETE", f"/api/v1/nodes/{node}")
