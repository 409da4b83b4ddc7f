"""The Secrets of who may pull (regmirror/access.py), as objects to apply, with no I/O.

- `regmirror-<mirror>-auth` (the operator's namespace, owned by the mirror):
  the access state and the two files the mirror's pods mount, `access.vcl`
  (the front) and `htpasswd` (an HTTPS registry);
- `regmirror-<mirror>.client-<client>` (same namespace, owned by the mirror):
  one access client's credential, for `regmirror render --client`;
- `regmirror-agent-credentials` (the agent's namespace, one key per mirror): the
  nodes' credentials, mounted into the agent's pods (`agent_auth_volume`);
  the node plan names only a revision, never a value.

Values go in `data` (base64), so a rendering compares equal to what the API
server stores and an unchanged Secret is never written again.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any

from regmirror import naming
from regmirror.access import NODE_SECRET_NAME, auth_secret_name, client_secret_name
from regmirror.render.mirror import owner_reference

#: Where the agent's pods see regmirror-agent-credentials (root-only files).
NODE_AUTH_DIR = "/etc/regmirror/node-auth"
NODE_AUTH_VOLUME = "node-auth"
LABEL_ACCESS = "regmirror.dev/access"


def _data(values: Mapping[str, str]) -> dict[str, str]:
    return {k: base64.b64encode(v.encode()).decode() for k, v in sorted(values.items())}


def decode_data(secret: Mapping[str, Any] | None) -> dict[str, str]:
    """A Secret's data as strings; keys that do not decode are left out (the reader then treats them as missing)."""
    out: dict[str, str] = {}
    for key, value in ((secret or {}).get("data") or {}).items():
        try:
            out[str(key)] = base64.b64decode(value, validate=True).decode()
        except (ValueError, TypeError, UnicodeDecodeError):
            continue
    return out


def _secret(name: str, namespace: str, labels: dict[str, str], data: Mapping[str, str], owner: dict[str, Any] | None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "labels": labels}
    if owner is not None:
        meta["ownerReferences"] = [owner]
    return {"apiVersion": "v1", "kind": "Secret", "metadata": meta, "type": "Opaque", "data": _data(data)}


def render_auth_secret(mirror: str, uid: str, namespace: str, data: Mapping[str, str]) -> dict[str, Any]:
    """The mirror's access Secret (`AccessDecision.auth_data`)."""
    labels = {**naming.labels(mirror, component="access"), LABEL_ACCESS: "state"}
    return _secret(auth_secret_name(mirror), namespace, labels, data, owner_reference(mirror, uid))


def render_client_secret(mirror: str, uid: str, namespace: str, client: str, data: Mapping[str, str]) -> dict[str, Any]:
    """One access client's Secret (`AccessDecision.client_data[client]`)."""
    labels = {**naming.labels(mirror, component="access"), LABEL_ACCESS: "client", f"{LABEL_ACCESS}-client": client}
    return _secret(client_secret_name(mirror, client), namespace, labels, data, owner_reference(mirror, uid))


def render_node_auth_secret(entries: Mapping[str, str], agent_namespace: str) -> dict[str, Any]:
    """The agent's Secret: mirror name -> `access.node_entry` of every mirror in the node plan."""
    labels = {**naming.labels(None, component="agent"), LABEL_ACCESS: "nodes"}
    return _secret(NODE_SECRET_NAME, agent_namespace, labels, entries, None)


def agent_auth_volume() -> tuple[dict[str, Any], dict[str, Any]]:
    """(volume, mount) of regmirror-agent-credentials for the agent's DaemonSet: root-only files, optional.

    Optional so that an agent starts before the operator created it (a plan
    naming a revision the agent cannot find keeps that mirror's files as
    they are and reports it; see agent/nodeauth.py).
    """
    volume = {"name": NODE_AUTH_VOLUME, "secret": {"secretName": NODE_SECRET_NAME, "defaultMode": 0o400, "optional": True}}
    mount = {"name": NODE_AUTH_VOLUME, "mountPath": NODE_AUTH_DIR, "readOnly": True}
    return volume, mount
