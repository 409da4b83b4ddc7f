"""The only module that talks to the Kubernetes API.

Writes are server-side apply under one field manager (`constants.FIELD_MANAGER`):
the API server merges our fields with everyone else's, so there is no
read-modify-write race and no fight with GitOps tools that own other fields.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from dataclasses import dataclass
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from regmirror import constants as c
from regmirror.conditions import now_rfc3339

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResourceType:
    """Where a kind lives in the REST API."""

    api_version: str
    plural: str
    namespaced: bool

    def base(self, namespace: str | None) -> str:
        prefix = "/api/v1" if self.api_version == "v1" else f"/apis/{self.api_version}"
        if self.namespaced:
            return f"{prefix}/namespaces/{namespace}/{self.plural}"
        return f"{prefix}/{self.plural}"


RESOURCES: dict[str, ResourceType] = {
    "ConfigMap": ResourceType("v1", "configmaps", True),
    "Secret": ResourceType("v1", "secrets", True),
    "Service": ResourceType("v1", "services", True),
    "PersistentVolumeClaim": ResourceType("v1", "persistentvolumeclaims", True),
    "Pod": ResourceType("v1", "pods", True),
    "Event": ResourceType("v1", "events", True),
    "Node": ResourceType("v1", "nodes", False),
    "Deployment": ResourceType("apps/v1", "deployments", True),
    "DaemonSet": ResourceType("apps/v1", "daemonsets", True),
    "PodDisruptionBudget": ResourceType("policy/v1", "poddisruptionbudgets", True),
    c.KIND: ResourceType(c.API_VERSION, c.PLURAL, False),
}

_client_lock = threading.Lock()
_api: client.ApiClient | None = None


def api_client() -> client.ApiClient:
    """A shared ApiClient: in-cluster config when in a pod, else the kubeconfig."""
    global _api
    with _client_lock:
        if _api is None:
            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
            _api = client.ApiClient()
        return _api


class NotFound(Exception):
    """The object does not exist."""


def _call(method: str, path: str, *, body: Any = None, content_type: str | None = None, query: list[tuple[str, str]] | None = None) -> Any:
    """One REST call through the client's auth and TLS settings; JSON in, JSON out."""
    api = api_client()
    headers = {"Accept": "application/json"}
    if content_type:
        headers["Content-Type"] = content_type
    method, url, headers, serialized, _ = api.param_serialize(  # type: ignore[attr-defined]  # stubs predate v37
        method=method, resource_path=path, query_params=query or [], header_params=headers, body=body, auth_settings=["BearerToken"]
    )
    response = api.call_api(method, url, header_params=headers, body=serialized, _request_timeout=30)  # type: ignore[attr-defined]
    data = response.read()
    if response.status == 404:
        raise NotFound(path)
    if not 200 <= response.status < 300:
        raise ApiException(http_resp=response)
    return json.loads(data) if data else None


def _path(kind: str, namespace: str | None, name: str | None = None, subresource: str | None = None) -> str:
    path = RESOURCES[kind].base(namespace)
    if name:
        path += f"/{name}"
    if subresource:
        path += f"/{subresource}"
    return path


def apply(obj: dict[str, Any], *, subresource: str | None = None) -> dict[str, Any]:
    """Server-side apply `obj` (force: we own the fields we render)."""
    meta = obj["metadata"]
    path = _path(obj["kind"], meta.get("namespace"), meta["name"], subresource)
    result: dict[str, Any] = _call(
        "PATCH",
        path,
        body=obj,
        content_type="application/apply-patch+yaml",
        query=[("fieldManager", c.FIELD_MANAGER), ("force", "true")],
    )
    return result


def get(kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
    """The object, or None when it does not exist."""
    try:
        result: dict[str, Any] = _call("GET", _path(kind, namespace, name))
        return result
    except NotFound:
        return None


def list_objects(kind: str, namespace: str | None = None, label_selector: str | None = None) -> list[dict[str, Any]]:
    """All objects of a kind (optionally filtered by labels)."""
    query = [("labelSelector", label_selector)] if label_selector else []
    result = _call("GET", _path(kind, namespace), query=query)
    items: list[dict[str, Any]] = result.get("items", [])
    return items


def delete(kind: str, namespace: str | None, name: str) -> None:
    """Delete an object; absent is fine."""
    with contextlib.suppress(NotFound):
        _call("DELETE", _path(kind, namespace, name), query=[("propagationPolicy", "Background")])


def merge_patch(kind: str, namespace: str | None, name: str, patch: dict[str, Any], subresource: str | None = None) -> dict[str, Any]:
    """A JSON merge patch (used to drop our finalizer)."""
    result: dict[str, Any] = _call(
        "PATCH", _path(kind, namespace, name, subresource), body=patch, content_type="application/merge-patch+json"
    )
    return result


def create_event(involved: dict[str, Any], *, reason: str, message: str, type_: str = "Normal") -> None:
    """Record an Event about an object (best effort: a failed Event never fails a reconcile).

    The API server requires an Event about a cluster-scoped object (a RegistryMirror)
    to live in the `default` namespace; a namespaced object's Event lives beside it.
    """
    meta = involved.get("metadata", {})
    namespace = meta.get("namespace") or "default"
    body = {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": f"{meta.get('name', 'regmirror')}.", "namespace": namespace},
        "involvedObject": {
            "apiVersion": involved.get("apiVersion"),
            "kind": involved.get("kind"),
            "name": meta.get("name"),
            "namespace": meta.get("namespace"),
            "uid": meta.get("uid"),
            "resourceVersion": meta.get("resourceVersion"),
        },
        "reason": reason,
        "message": message[:1000],
        "type": type_,
        "source": {"component": c.FIELD_MANAGER},
        "reportingComponent": c.FIELD_MANAGER,
        "firstTimestamp": now_rfc3339(),
        "lastTimestamp": now_rfc3339(),
        "count": 1,
    }
    try:
        _call("POST", _path("Event", namespace), body=body, content_type="application/json")
    except Exception as exc:  # an Event is advisory
        log.warning("could not record event %s: %s %s", reason, type(exc).__name__, getattr(exc, "status", ""))
