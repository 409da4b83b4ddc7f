"""PURE: what the children report -> the RegistryMirror's status.

Gather (reconcile) -> evaluate (here) -> write (reconcile): nothing here does
I/O, so every status rule is unit-testable and the status of a mirror is a
function of its observation alone (which is what makes "no write when nothing
changed" easy to honour).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from regmirror import conditions as cond
from regmirror.models import RegistryMirrorSpec, RegistryMirrorStatus

MAX_NOT_READY_NAMES = 10


def drifted(desired: Any, live: Any) -> bool:
    """Whether `live` lacks or differs in any field that `desired` sets.

    Fields the server or other managers add are ignored; lists compare element
    by element (a list of a different length has drifted). This is the test that
    decides whether an apply is needed, so an unchanged cluster costs no write.
    """
    if isinstance(desired, dict):
        if not isinstance(live, dict):
            return True
        return any(drifted(value, live.get(key)) for key, value in desired.items())
    if isinstance(desired, list):
        if not isinstance(live, list) or len(live) != len(desired):
            return True
        return any(drifted(d, item) for d, item in zip(desired, live, strict=True))
    return bool(desired != live)


@dataclass(frozen=True)
class NodeRollout:
    """Where a mirror's node configuration stands."""

    enabled: bool
    desired: int = 0
    updated: int = 0
    ready: int = 0
    not_ready: tuple[str, ...] = ()
    problems: tuple[str, ...] = ()  # e.g. preflight failures reported by agents
    removing: bool = False


@dataclass(frozen=True)
class Observation:
    """Everything the status of one mirror is derived from."""

    name: str
    generation: int | None
    spec: RegistryMirrorSpec
    namespace: str
    deployment: dict[str, Any] | None
    service: dict[str, Any] | None
    pvc: dict[str, Any] | None
    nodes: NodeRollout
    deleting: bool = False
    error_reason: str | None = None  # a configuration problem that stops the reconcile
    error_message: str = ""
    host_order: dict[str, list[str]] = field(default_factory=dict)
    # (ok, reason, message) of the upstream credentials check; None when no credentials are set.
    upstream_auth: tuple[bool | None, str, str] | None = None


def deployment_available(dep: dict[str, Any] | None, replicas: int) -> tuple[bool, str, str]:
    """(available, reason, message) of the registry Deployment."""
    if dep is None:
        return False, "DeploymentMissing", "the registry Deployment does not exist yet"
    status = dep.get("status") or {}
    ready = status.get("readyReplicas") or 0
    if replicas == 0:
        return False, "ScaledToZero", "spec.replicas is 0: the cache is stopped"
    available = cond.is_true(status.get("conditions"), "Available")
    if available and ready >= 1:
        return True, "MinimumReplicasAvailable", f"{ready}/{replicas} registry pods ready"
    return False, "NoReadyReplicas", f"{ready}/{replicas} registry pods ready"


def deployment_rolled_out(dep: dict[str, Any] | None, replicas: int) -> bool:
    """Whether the Deployment's controller has caught up with its newest spec."""
    if dep is None:
        return False
    status = dep.get("status") or {}
    meta = dep.get("metadata") or {}
    if (status.get("observedGeneration") or 0) < (meta.get("generation") or 0):
        return False
    return (status.get("updatedReplicas") or 0) >= replicas and (status.get("replicas") or 0) <= replicas


def storage_status(spec: RegistryMirrorSpec, pvc: dict[str, Any] | None) -> tuple[bool, str, str, dict[str, Any]]:
    """(bound, reason, message, status.storage) of the cache volume."""
    if spec.storage.ephemeral:
        return True, "Ephemeral", "the cache lives in an emptyDir", {"phase": "Ephemeral", "capacity": spec.storage.size}
    if pvc is None:
        return False, "ClaimMissing", "the PersistentVolumeClaim does not exist yet", {"phase": "Missing"}
    phase = (pvc.get("status") or {}).get("phase") or "Pending"
    capacity = ((pvc.get("status") or {}).get("capacity") or {}).get("storage")
    out = {"phase": phase, "capacity": capacity} if capacity else {"phase": phase}
    if phase == "Bound":
        return True, "Bound", f"bound, capacity {capacity}", out
    return False, f"Claim{phase}", f"the PersistentVolumeClaim is {phase}", out


def nodes_condition(rollout: NodeRollout) -> tuple[bool, str, str]:
    """(configured, reason, message) of the node rollout."""
    if not rollout.enabled:
        return True, "Disabled", "spec.nodeConfig.enabled is false: no node is configured"
    if rollout.problems:
        return False, "AgentNotReady", "; ".join(rollout.problems)[:900]
    if rollout.desired == 0:
        return True, "NoNodesSelected", "the node selector matches no node"
    # Ready counts nodes whose files carry this mirror's current entry; "updated" only says
    # which agent pod version runs there (another mirror's rollout changes that, not this).
    if rollout.ready >= rollout.desired:
        return True, "AllNodesConfigured", f"{rollout.ready}/{rollout.desired} nodes configured"
    waiting = ", ".join(rollout.not_ready)
    return False, "RolloutInProgress", f"{rollout.ready}/{rollout.desired} nodes configured; waiting for: {waiting}"


def endpoint_of(service: dict[str, Any] | None, port: int) -> str | None:
    """ClusterIP:port of the mirror's Service, once it has one."""
    ip = ((service or {}).get("spec") or {}).get("clusterIP")
    if not ip or ip == "None":
        return None
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def evaluate(obs: Observation, existing_conditions: list[dict[str, Any]], now: str | None = None) -> dict[str, Any]:
    """The full status of a mirror (conditions keep their transition times)."""
    spec = obs.spec
    available, a_reason, a_msg = deployment_available(obs.deployment, spec.replicas)
    bound, s_reason, s_msg, storage = storage_status(spec, obs.pvc)
    configured, n_reason, n_msg = nodes_condition(obs.nodes)
    rolled_out = deployment_rolled_out(obs.deployment, spec.replicas)
    endpoint = endpoint_of(obs.service, spec.service.port)
    auth_rejected = obs.upstream_auth is not None and obs.upstream_auth[0] is False
    stalled = obs.error_reason is not None or auth_rejected
    error_reason = obs.error_reason or (f"Upstream{obs.upstream_auth[1]}" if auth_rejected and obs.upstream_auth else None)
    error_message = obs.error_message if obs.error_reason else (obs.upstream_auth[2] if auth_rejected and obs.upstream_auth else "")

    reconciling_reasons = []
    if not rolled_out:
        reconciling_reasons.append("the registry Deployment is rolling out")
    if obs.nodes.enabled and not configured and not obs.nodes.problems:
        reconciling_reasons.append("node configuration is rolling out")
    if not endpoint:
        reconciling_reasons.append("the Service has no ClusterIP yet")
    if obs.deleting:
        reconciling_reasons = ["removing node configuration before deletion"]
    reconciling = bool(reconciling_reasons) and not stalled

    if obs.deleting:
        ready, r_reason, r_msg = False, "Terminating", "waiting for every node to drop this mirror's configuration"
    elif stalled:
        ready, r_reason, r_msg = False, error_reason or "Error", error_message
    elif not available:
        ready, r_reason, r_msg = False, a_reason, a_msg
    elif not bound:
        ready, r_reason, r_msg = False, s_reason, s_msg
    elif not configured:
        ready, r_reason, r_msg = False, n_reason, n_msg
    elif reconciling:
        ready, r_reason, r_msg = False, "Reconciling", "; ".join(reconciling_reasons)
    else:
        ready, r_reason, r_msg = True, "MirrorReady", f"serving at {endpoint}; {n_msg}"

    new_conditions = [
        cond.condition("Ready", ready, r_reason, r_msg),
        cond.condition("Available", available, a_reason, a_msg),
        cond.condition("StorageBound", bound, s_reason, s_msg),
        cond.condition("NodesConfigured", configured, n_reason, n_msg),
        cond.condition(
            "Reconciling", reconciling, "Progressing" if reconciling else "Idle", "; ".join(reconciling_reasons) if reconciling else ""
        ),
        cond.condition("Stalled", stalled, error_reason or "NoError", error_message if stalled else ""),
    ]
    if obs.upstream_auth is not None:
        ok, reason, message = obs.upstream_auth
        new_conditions.append(cond.condition("UpstreamAuthenticated", cond.UNKNOWN if ok is None else ok, reason, message))

    if obs.deleting:
        phase = "Terminating"
    elif stalled:
        phase = "Failed"
    elif ready:
        phase = "Ready"
    elif available and not configured and not reconciling:
        phase = "Degraded"
    elif reconciling:
        phase = "Progressing"
    else:
        phase = "Pending"

    dep_status = (obs.deployment or {}).get("status") or {}
    rollout = obs.nodes
    status: dict[str, Any] = {
        "observedGeneration": obs.generation,
        "phase": phase,
        "endpoint": endpoint,
        "url": f"{'https' if spec.service.tls else 'http'}://{endpoint}" if endpoint else None,
        "serviceDNS": f"{(obs.service or {}).get('metadata', {}).get('name', '')}.{obs.namespace}.svc" if obs.service else None,
        "replicas": spec.replicas,
        "readyReplicas": dep_status.get("readyReplicas") or 0,
        "storage": storage,
        "nodes": {
            "desired": rollout.desired,
            "updated": rollout.updated,
            "ready": rollout.ready,
            "notReady": list(rollout.not_ready[:MAX_NOT_READY_NAMES]),
        },
        "nodesRatio": f"{rollout.ready}/{rollout.desired}" if rollout.enabled else "disabled",
        "hosts": [
            {"host": host, "position": order.index(obs.name) + 1, "mirrors": order}
            for host, order in sorted(obs.host_order.items())
            if obs.name in order
        ],
        "conditions": cond.merge_conditions(existing_conditions, new_conditions, generation=obs.generation, now=now),
    }
    return {k: v for k, v in status.items() if v is not None}


def typed_status(status: dict[str, Any]) -> dict[str, Any]:
    """The status through the pydantic model: a key the CRD does not declare fails here, not in the API server.

    Done only before a write (not on every evaluation: at 500 mirrors that cost
    dominated the operator's CPU); the unit tests check the round trip is lossless.
    """
    typed = RegistryMirrorStatus.model_validate(status)
    return typed.model_dump(mode="json", by_alias=True, exclude_none=True)


def status_changed(old: dict[str, Any] | None, new: dict[str, Any]) -> bool:
    """Whether writing `new` would change anything a reader sees."""
    return drifted(new, old or {}) or drifted(old or {}, new)
