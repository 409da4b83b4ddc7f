"""A broken mirror in the plan, through the real agent as its ServiceAccount: the API server gets one Event naming it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from test_agent_api import AGENT_USER, CONFIG_OK, service_account_dir

from harness import LocalCluster
from harness.operator import OperatorProcess, wait_for
from regmirror import constants as c


def test_a_broken_mirror_is_named_in_an_event_the_api_server_accepts(
    cluster: LocalCluster, operator: OperatorProcess, tmp_path: Path
) -> None:
    node = cluster.fake_nodes()[0]["metadata"]["name"]
    root = tmp_path / "root"
    (root / "etc/containerd").mkdir(parents=True)
    (root / "etc/containerd/config.toml").write_text(CONFIG_OK)
    entry = {
        "name": "broken-ca",
        "hosts": ["quay.io"],
        "servers": {"quay.io": "https://quay.io"},
        "url": "https://10.96.0.77:5000",
        "priority": 100,
        "capabilities": ["pull", "resolve"],
        "fallback": "NeverContactUpstream",
        "runtimes": ["containerd"],
        "nodeSelector": {"matchLabels": {}, "matchExpressions": []},
        "caPem": "-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n",
    }
    (tmp_path / "plan.json").write_text(json.dumps({"mirrors": [entry]}))
    env = {
        **cluster.env(),
        "KUBERNETES_SERVICE_HOST": "127.0.0.1",
        "KUBERNETES_SERVICE_PORT": str(cluster.port),
        "REGMIRROR_SERVICEACCOUNT_DIR": str(service_account_dir(cluster, root)),
        "NODE_NAME": node,
    }
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "regmirror", "agent", "--once", "--plan", str(tmp_path / "plan.json")),
            *("--host-root", str(root), "--health-port", "0", "--probe-timeout", "0.2"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr  # the mirror's defect leaves the node Ready
    assert (root / c.CONTAINERD_CONFIG_PATH.lstrip("/") / "quay.io" / "hosts.toml").exists()

    def event() -> dict[str, object] | None:
        out = cluster.kubectl(
            "get", "events", "-n", "default", "--field-selector", f"reason=CAUnusable,involvedObject.name={node}", "-o", "json"
        ).stdout
        items = json.loads(out or "{}").get("items") or []
        return items[0] if items else None

    wait_for(lambda: event() is not None, timeout=10, what="a CAUnusable Event on the node")
    found = event()
    assert found is not None
    assert found["related"] == {"apiVersion": c.API_VERSION, "kind": c.KIND, "name": "broken-ca"}
    assert "mirror broken-ca:" in str(found["message"]) and found["type"] == "Warning"
    forbidden = [
        e
        for e in cluster.audit_events(user=AGENT_USER)
        if (e.get("responseStatus") or {}).get("code") == 403 and "deliberately-denied" not in e.get("userAgent", "")
    ]
    assert forbidden == [], [f"{e['verb']} {e['requestURI']}" for e in forbidden]
