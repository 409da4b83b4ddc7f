"""The real agent as its own ServiceAccount against the real API server: reads its Node, posts Events, never Forbidden."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from harness import LocalCluster
from harness.operator import AGENT_NS, OperatorProcess
from harness.waiting import wait_for
from regmirror.models import RegistryMirrorSpec
from regmirror.nodeplan import build_node_plan, mirror_entry

AGENT_SA = "regmirror-agent"
AGENT_USER = f"system:serviceaccount:{AGENT_NS}:{AGENT_SA}"
CONFIG_OK = 'version = 2\n[plugins."io.containerd.grpc.v1.cri".registry]\n  config_path = "/etc/containerd/certs.d"\n'
CONFIG_UNSET = "version = 2\n"


def service_account_dir(cluster: LocalCluster, tmp_path: Path) -> Path:
    """What the kubelet mounts into the agent's pod: a token of its ServiceAccount and the cluster CA."""
    token = cluster.api(
        "POST",
        f"/api/v1/namespaces/{AGENT_NS}/serviceaccounts/{AGENT_SA}/token",
        {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {"expirationSeconds": 3600}},
    )["status"]["token"]
    sa = tmp_path / "serviceaccount"
    sa.mkdir()
    (sa / "token").write_text(token)
    (sa / "ca.crt").write_bytes(cluster.ca_cert.read_bytes())
    (sa / "namespace").write_text(AGENT_NS)
    return sa


def run_agent(cluster: LocalCluster, tmp_path: Path, node: str, config: str) -> subprocess.CompletedProcess[str]:
    root = tmp_path / f"root-{abs(hash(config))}"
    (root / "etc/containerd").mkdir(parents=True)
    (root / "etc/containerd/config.toml").write_text(config)
    spec = RegistryMirrorSpec.model_validate({"upstream": {"url": "https://registry-1.docker.io"}})
    plan = tmp_path / "plan.json"
    plan.write_text(build_node_plan([mirror_entry("hub", spec, "10.96.0.10")]).to_json())
    env = {
        **cluster.env(),
        "KUBERNETES_SERVICE_HOST": "127.0.0.1",
        "KUBERNETES_SERVICE_PORT": str(cluster.port),
        "REGMIRROR_SERVICEACCOUNT_DIR": str(service_account_dir(cluster, root)),
        "NODE_NAME": node,
    }
    return subprocess.run(
        [sys.executable, "-m", "regmirror", "agent", "--once", "--plan", str(plan), "--host-root", str(root), "--health-port", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_agent_reads_its_node_and_reports_preflight_failures_as_itself(
    cluster: LocalCluster, operator: OperatorProcess, tmp_path: Path
) -> None:
    node = cluster.fake_nodes()[0]["metadata"]["name"]
    since = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())  # other tests refuse the agent things on purpose

    good = run_agent(cluster, tmp_path, node, CONFIG_OK)
    assert good.returncode == 0, good.stdout + good.stderr
    assert '"in_cluster": true' in good.stdout
    assert list((tmp_path).glob("root-*/etc/containerd/certs.d/docker.io/hosts.toml")), good.stdout

    bad = run_agent(cluster, tmp_path, node, CONFIG_UNSET)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    # The Event is about the Node, in `default` (the API server's rule for cluster-scoped objects).
    wait_for(
        lambda: cluster.kubectl(
            "get", "events", "-n", "default", "--field-selector", f"reason=PreflightFailed,involvedObject.name={node}", "-o", "name"
        ).stdout.strip(),
        timeout=10,
        what="a PreflightFailed Event on the node",
    )
    forbidden = [e for e in cluster.audit_events(user=AGENT_USER, since=since) if (e.get("responseStatus") or {}).get("code") == 403]
    assert forbidden == [], [f"{e['verb']} {e['requestURI']}" for e in forbidden]
    assert cluster.audit_events(user=AGENT_USER, since=since), "the agent made no request as its ServiceAccount"
