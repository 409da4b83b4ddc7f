"""The agent's only contact with the Kubernetes API: its Node, Events, the mirrors' EndpointSlices.

A few dozen lines of http.client instead of the `kubernetes` package, because
importing that package alone costs ~25 MiB of resident memory on every node
(measured: 43 MiB vs 18 MiB), more than the rest of the agent. The agent reads
its Node, posts Events, lists and watches the mirrors' EndpointSlices, and
removes the startup taint from its own Node, with the pod's service-account
token, which is re-read on every request because projected tokens rotate.
Nothing here logs the token.
"""

from __future__ import annotations

import http.client
import json
import os
import ssl
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from regmirror import constants as c
from regmirror import nodetaint

# Where the pod's ServiceAccount token and CA are mounted (overridable for a
# token projected elsewhere, and so tests can run the agent as its ServiceAccount).
SA_DIR = Path(os.environ.get("REGMIRROR_SERVICEACCOUNT_DIR", "/var/run/secrets/kubernetes.io/serviceaccount"))
COMPONENT = "regmirror-agent"


class ApiError(Exception):
    """The API answered with an error or could not be reached."""


@dataclass(frozen=True)
class NodeInfo:
    """What the agent needs of its Node."""

    name: str
    uid: str
    labels: dict[str, str]
    runtime_version: str | None
    # The Node's taints as the API returned them (the startup taint is looked for here).
    taints: tuple[dict[str, Any], ...] = field(default=())

    @classmethod
    def from_object(cls, obj: dict[str, Any]) -> NodeInfo:
        meta = obj.get("metadata", {})
        info = obj.get("status", {}).get("nodeInfo", {})
        taints = (obj.get("spec") or {}).get("taints") or []
        return cls(
            name=str(meta.get("name", "")),
            uid=str(meta.get("uid", "")),
            labels={str(k): str(v) for k, v in (meta.get("labels") or {}).items()},
            runtime_version=info.get("containerRuntimeVersion") or None,
            taints=tuple(t for t in taints if isinstance(t, dict)) if isinstance(taints, list) else (),
        )


def in_cluster() -> bool:
    """Whether a service-account token and the API's address are available."""
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST")) and (SA_DIR / "token").exists()


class InClusterClient:
    """Minimal in-cluster API client (GET a Node, POST an Event)."""

    def __init__(self, timeout: float = 5.0, sa_dir: Path = SA_DIR) -> None:
        self._host = os.environ.get("KUBERNETES_SERVICE_HOST", "")
        self._port = int(os.environ.get("KUBERNETES_SERVICE_PORT", "443"))
        self._sa_dir = sa_dir
        self._timeout = timeout
        self._context = ssl.create_default_context(cafile=str(sa_dir / "ca.crt"))
        # An Event about a cluster-scoped object (the Node) must live in `default`:
        # the API server rejects it anywhere else.
        self.namespace = "default"

    def _request(
        self, method: str, path: str, body: dict[str, Any] | list[Any] | None = None, content_type: str = "application/json"
    ) -> dict[str, Any]:
        token = (self._sa_dir / "token").read_text().strip()
        headers = {"Authorization": f"Bearer {token}", "Accept": "application/json", "User-Agent": COMPONENT}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = content_type
        conn = http.client.HTTPSConnection(self._host, self._port, timeout=self._timeout, context=self._context)
        try:
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            payload = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            raise ApiError(f"{method} {path}: {exc}") from None
        finally:
            conn.close()
        if resp.status >= 300:
            try:
                detail = json.loads(payload).get("message", "")
            except ValueError:
                detail = payload[:200].decode(errors="replace")
            raise ApiError(f"{method} {path}: HTTP {resp.status}: {detail}")
        result: dict[str, Any] = json.loads(payload) if payload else {}
        return result

    def get_node(self, name: str) -> NodeInfo:
        """GET /api/v1/nodes/<name>."""
        return NodeInfo.from_object(self._request("GET", f"/api/v1/nodes/{name}"))

    def post_event(self, node: NodeInfo, reason: str, message: str, *, warning: bool, mirror: str | None = None) -> None:
        """A core/v1 Event on the Node, in `default` as the API server requires (kubectl describe node shows it).

        An Event about one mirror names it in `related` (a RegistryMirror
        reference), so a reader can pick a mirror's Events without parsing
        the message.
        """
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{node.name}.regmirror-", "namespace": self.namespace},
            "involvedObject": {"apiVersion": "v1", "kind": "Node", "name": node.name, "uid": node.uid},
            "reason": reason,
            "message": message[:1000],
            "type": "Warning" if warning else "Normal",
            "source": {"component": COMPONENT, "host": node.name},
            "reportingComponent": COMPONENT,
            "reportingInstance": node.name,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        if mirror:
            event["related"] = {"apiVersion": c.API_VERSION, "kind": c.KIND, "name": mirror}
        self._request("POST", f"/api/v1/namespaces/{self.namespace}/events", event)

    def remove_startup_taint(self, node: NodeInfo) -> None:
        """Remove the startup taint from the Node, if its taints are still the ones read (JSON patch `test`).

        A concurrent change of the taints fails the `test` (HTTP 422): the
        caller reads the Node again and retries. RBAC gives the agent `patch`
        on nodes; an admission policy (manifests/rbac/agent.yaml) narrows it to
        its own Node and to removing exactly this taint.
        """
        path = f"/api/v1/nodes/{node.name}"
        self._request("PATCH", path, nodetaint.removal_patch(node.taints), content_type="application/json-patch+json")

    def list_endpointslices(self, namespace: str) -> tuple[list[dict[str, Any]], str]:
        """The namespace's EndpointSlices of Services, and the list's resourceVersion."""
        query = urllib.parse.urlencode({"labelSelector": "kubernetes.io/service-name"})
        result = self._request("GET", f"/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices?{query}")
        items = result.get("items") or []
        version = (result.get("metadata") or {}).get("resourceVersion") or ""
        return [i for i in items if isinstance(i, dict)], str(version)

    def watch_endpointslices(self, namespace: str, resource_version: str, timeout_seconds: int = 300) -> Iterator[dict[str, Any]]:
        """Watch events of the namespace's EndpointSlices from a resourceVersion, until the server ends the watch."""
        query = urllib.parse.urlencode(
            {
                "labelSelector": "kubernetes.io/service-name",
                "watch": "1",
                "resourceVersion": resource_version,
                "allowWatchBookmarks": "true",
                "timeoutSeconds": str(timeout_seconds),
            }
        )
        path = f"/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices?{query}"
        token = (self._sa_dir / "token").read_text().strip()
        headers = {"Authorization": f"Bearer {token}", "Accept": "application/json", "User-Agent": COMPONENT}
        conn = http.client.HTTPSConnection(self._host, self._port, timeout=timeout_seconds + 30, context=self._context)
        try:
            conn.request("GET", path, headers=headers)
            resp = conn.getresponse()
            if resp.status >= 300:
                raise ApiError(f"GET {path}: HTTP {resp.status}: {resp.read(200).decode(errors='replace')}")
            while True:
                line = resp.readline()
                if not line:
                    return
                if line.strip():
                    event = json.loads(line)
                    if isinstance(event, dict):
                        yield event
        except (OSError, http.client.HTTPException, ValueError) as exc:
            raise ApiError(f"watch {path}: {exc}") from None
        finally:
            conn.close()
