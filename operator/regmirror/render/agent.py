"""The cluster-wide node agent: its plan ConfigMap and its DaemonSet, with no I/O.

The plan's digest sits on the pod template, so every change of the plan rolls
the DaemonSet out node by node (staged by maxUnavailable). A node counts as
configured for a mirror once an agent pod whose plan carries that mirror's
entry is Ready there: the operator reads the digests of the agent pods
(rollout.py), not the DaemonSet's status, so another mirror's rollout never
un-configures a mirror whose files are already in place.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from regmirror import constants as c
from regmirror import naming
from regmirror.models import Runtime
from regmirror.nodeplan import NodePlan
from regmirror.render.access import agent_auth_volume

HOST_ROOT = "/host"
CRIO_AUTH_MOUNT = "/run/containers"
CRIO_ETC_DIR = "/etc/crio"
PLAN_DIR = "/etc/regmirror/plan"
PLAN_PATH = f"{PLAN_DIR}/{c.NODE_CONFIG_KEY}"
CONTAINERD_ETC_DIR = "/etc/containerd"
HEALTH_PORT = c.AGENT_HEALTH_PORT
HEALTH_PORT_NAME = "health"
SERVICE_ACCOUNT = "regmirror-agent"
PRIORITY_CLASS = "system-node-critical"


def agent_args(*, containerd_config_path: str = c.CONTAINERD_CONFIG_PATH, guard_connections: bool = True) -> list[str]:
    """The agent's command line (after the `regmirror` entrypoint): the one place it is spelled out."""
    guard = ["--guard-connections"] if guard_connections else []
    return [
        "agent",
        "--plan",
        PLAN_PATH,
        "--host-root",
        HOST_ROOT,
        "--containerd-config-path",
        containerd_config_path,
        # Spelled out so the probes' port and the agent's listener cannot drift apart.
        "--health-port",
        str(HEALTH_PORT),
        *guard,
    ]


def plan_uses_crio(plan: NodePlan) -> bool:
    """Whether any mirror in the plan asks for CRI-O drop-ins."""
    return any(Runtime.CRIO in m.runtimes for m in plan.mirrors)


def render_node_config_map(plan: NodePlan, namespace: str, history: Mapping[str, Mapping[str, str]] | None = None) -> dict[str, Any]:
    """The ConfigMap every agent reads its plan from (plus, for the operator, recent plans' entry digests)."""
    data = {c.NODE_CONFIG_KEY: plan.to_json()}
    if history is not None:
        data[c.NODE_CONFIG_HISTORY_KEY] = json.dumps(history, sort_keys=True, separators=(",", ":"))
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": c.NODE_CONFIG_NAME, "namespace": namespace, "labels": naming.labels(None, component="agent")},
        "data": data,
    }


def _host_path(name: str, path: str, *, read_only: bool, create: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    volume = {"name": name, "hostPath": {"path": path, "type": "DirectoryOrCreate" if create else "Directory"}}
    mount: dict[str, Any] = {"name": name, "mountPath": f"{HOST_ROOT}{path}"}
    if read_only:
        # Only true is stored: the API server omits a false readOnly, and the rendering must match.
        mount["readOnly"] = True
    return volume, mount


def render_agent_daemonset(
    plan: NodePlan,
    namespace: str,
    image: str,
    *,
    containerd_config_path: str = c.CONTAINERD_CONFIG_PATH,
    crio: bool | None = None,
    max_unavailable: str = "10%",
    containerd_etc_dir: str = CONTAINERD_ETC_DIR,
    guard_connections: bool = True,
) -> dict[str, Any]:
    """The agent DaemonSet: hostPath only for what it reads or writes, no privileges.

    `guard_connections` (the default) runs the agent in the node's network
    namespace with CAP_NET_ADMIN, the one capability it keeps, so that it can
    see the node's connections to the mirrors and abort those stuck on a dead
    one (agent/guard.py); nothing else about the pod changes. Off, the pod
    has its own network namespace and no capability, and a pull already
    waiting on a dead mirror waits for containerd's own timeouts.

    `crio=None` mounts the CRI-O drop-in directory only when a mirror in the
    plan configures CRI-O. The containerd config directory is mounted
    read-only for the preflight of config.toml; the certs.d directory (usually
    nested inside it) is mounted read-write on top, at the same relative path
    under the host root.
    """
    if crio is None:
        crio = plan_uses_crio(plan)
    volumes: list[dict[str, Any]] = [{"name": "plan", "configMap": {"name": c.NODE_CONFIG_NAME}}]
    mounts: list[dict[str, Any]] = [{"name": "plan", "mountPath": PLAN_DIR, "readOnly": True}]
    # DirectoryOrCreate for the read-only mount too: certs.d creates it anyway
    # when nested, and a node without containerd must not block the pod.
    for vol_name, path, read_only in (
        ("containerd-etc", containerd_etc_dir, True),
        ("containerd-certs", containerd_config_path, False),
    ):
        volume, mount = _host_path(vol_name, path, read_only=read_only, create=True)
        volumes.append(volume)
        mounts.append(mount)
    if crio:
        # The drop-ins; the auth file CRI-O reads for Restricted mirrors (/run/containers/0/auth.json, agent/nodeauth.py);
        # CRI-O's own config, read-only, for the preflight (auto_reload_registries) and its global_auth_file.
        for vol_name, path, read_only in (
            ("crio-dropins", c.CRIO_DROPIN_DIR, False),
            ("crio-auth", CRIO_AUTH_MOUNT, False),
            ("crio-etc", CRIO_ETC_DIR, True),
        ):
            volume, mount = _host_path(vol_name, path, read_only=read_only, create=True)
            volumes.append(volume)
            mounts.append(mount)
    volumes.append({"name": "tmp", "emptyDir": {}})
    mounts.append({"name": "tmp", "mountPath": "/tmp"})
    # The mirrors' node credentials (regmirror-agent-credentials, root-only; render/access.py): the plan names revisions only.
    auth_volume, auth_mount = agent_auth_volume()
    volumes.append(auth_volume)
    mounts.append(auth_mount)

    def probe(path: str) -> dict[str, Any]:
        return {
            "httpGet": {"path": path, "port": HEALTH_PORT_NAME, "scheme": "HTTP"},
            "timeoutSeconds": 2,
            "periodSeconds": 10,
            "successThreshold": 1,
            "failureThreshold": 3,
        }

    container: dict[str, Any] = {
        "name": "agent",
        "image": image,
        "command": ["regmirror"],
        "args": agent_args(containerd_config_path=containerd_config_path, guard_connections=guard_connections),
        "ports": [{"name": HEALTH_PORT_NAME, "containerPort": HEALTH_PORT, "protocol": "TCP"}],
        "env": [{"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}],
        "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}, "limits": {"memory": "64Mi"}},
        "volumeMounts": mounts,
        "readinessProbe": probe("/readyz"),
        "livenessProbe": probe("/healthz"),
        "securityContext": {
            # Root only to write root-owned host directories; no escalation; NET_ADMIN only to abort
            # the node's connections to a dead mirror (the connection guard), else no capability.
            "runAsUser": 0,
            "runAsGroup": 0,
            "runAsNonRoot": False,
            "privileged": False,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN"]} if guard_connections else {"drop": ["ALL"]},
            "readOnlyRootFilesystem": True,
        },
    }
    pod_spec: dict[str, Any] = {
        "serviceAccountName": SERVICE_ACCOUNT,
        "priorityClassName": PRIORITY_CLASS,
        "enableServiceLinks": False,
        "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
        # An agent runs on every node, tainted control-plane nodes included.
        "tolerations": [{"operator": "Exists"}],
        "containers": [container],
        "volumes": volumes,
    }
    if guard_connections:
        # The node's own connections (containerd's, kubelet's) live in its network namespace. The agent
        # reaches the API server and the mirrors by address (KUBERNETES_SERVICE_HOST, ClusterIPs), not by name.
        pod_spec["hostNetwork"] = True
        pod_spec["dnsPolicy"] = "ClusterFirstWithHostNet"
    return {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {"name": c.AGENT_NAME, "namespace": namespace, "labels": naming.labels(None, component="agent")},
        "spec": {
            "selector": {"matchLabels": naming.agent_selector_labels()},
            "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": max_unavailable, "maxSurge": 0}},
            "revisionHistoryLimit": 3,
            "template": {
                "metadata": {
                    "labels": naming.labels(None, component="agent"),
                    "annotations": {c.ANNOTATION_NODE_CONFIG_HASH: plan.digest()},
                },
                "spec": pod_spec,
            },
        },
    }
