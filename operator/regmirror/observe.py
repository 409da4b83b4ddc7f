"""PURE: what the children report -> the RegistryMirror's status.

Gather (controller/status.py) -> evaluate (here) -> write (controller/status.py):
nothing here does I/O, so every status rule is unit-testable and the status
of a mirror is a function of its observation alone (which is what makes "no
write when nothing changed" easy to honour).

Ready says whether the mirror serves as its spec asks. A configuration the
operator cannot realise (invalid spec, missing Secret, a spec the API server
rejects, credentials the upstream rejects) makes it False and Stalled. A
failing repair (the API server unreachable, overloaded or forbidding a write)
does not: the pods still serve, so Ready follows them, and the failure shows
under Reconciling (while it is retried) or Stalled (when it needs someone).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from regmirror import conditions as cond
from regmirror.models import BootstrapConflict, RegistryMirrorSpec, RegistryMirrorStatus
from regmirror.rollout import NodeRollout

MAX_NOT_READY_NAMES = 10


@dataclass(frozen=True)
class RepairError:
    """Applying the children keeps failing for a reason that is not the user's spec."""

    transient: bool  # retried with backoff (429, 5xx, timeouts); else someone must act (e.g. 403)
    reason: str
    message: str


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
    repair: RepairError | None = None
    # host -> (1-based position among the mirrors of that host, the first few of them in order)
    host_routes: dict[str, tuple[int, list[str]]] = field(default_factory=dict)
    # (ok, reason, message) of the upstream credentials check; None when no credentials are set.
    upstream_auth: tuple[bool | None, str, str] | None = None
    # The strict mirrors this mirror's own image can only be pulled through (None: it depends on none).
    bootstrap: BootstrapConflict | None = None
    # status.nodes' pulledRecently / notPulledRecently (nodeusage.counts); None while unknown.
    usage: dict[str, Any] | None = None


def being_deleted(obj: dict[str, Any] | None) -> bool:
    """Whether a child has a deletionTimestamp: it may still look healthy, but it is going away."""
    return bool(((obj or {}).get("metadata") or {}).get("deletionTimestamp"))


def deployment_available(dep: dict[str, Any] | None, replicas: int) -> tuple[bool, str, str]:
    """(available, reason, message) of the registry Deployment."""
    if dep is None:
        return False, "DeploymentMissing", "the registry Deployment does not exist yet"
    if being_deleted(dep):
        # Its pods may still be Ready (foreground or orphan deletion), but they are on their way out.
        return False, "DeploymentTerminating", "the registry Deployment is being deleted (the operator re-creates it once it is gone)"
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
    s3 = spec.storage.s3
    if s3 is not None:
        # No claim to wait for: the bucket is checked by the registry's readiness probe (Available says whether it answers).
        where = f"bucket {s3.bucket}" + (f" at {s3.endpoint}" if s3.endpoint else f" in {s3.region}")
        return True, "ObjectStorage", f"the cache lives in {where}", {"phase": "ObjectStorage"}
    if pvc is None:
        return False, "ClaimMissing", "the PersistentVolumeClaim does not exist yet", {"phase": "Missing"}
    # A claim being deleted says Terminating whatever its status.phase, as kubectl does.
    phase = "Terminating" if being_deleted(pvc) else (pvc.get("status") or {}).get("phase") or "Pending"
    capacity = ((pvc.get("status") or {}).get("capacity") or {}).get("storage")
    out = {"phase": phase, "capacity": capacity} if capacity else {"phase": phase}
    if being_deleted(pvc):
        # Held by the pvc-protection finalizer while the pod mounts it: still Bound, but
        # the cache loses its disk as soon as the pod restarts.
        return (
            False,
            "ClaimTerminating",
            "the PersistentVolumeClaim was deleted and is kept only while the registry pod uses it; "
            "the cache loses its disk when the pod restarts (the operator creates a new claim once it is gone)",
            out,
        )
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


def cluster_ip(service: dict[str, Any] | None) -> str | None:
    """The Service's ClusterIP, or None (not allocated yet, or a headless Service)."""
    ip = ((service or {}).get("spec") or {}).get("clusterIP")
    return None if not ip or ip == "None" else str(ip)


def host_port(host: str, port: int) -> str:
    """host:port, with an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def endpoint_of(service: dict[str, Any] | None, port: int) -> str | None:
    """ClusterIP:port of the mirror's Service, once it has one."""
    ip = cluster_ip(service)
    return host_port(ip, port) if ip else None


def evaluate(obs: Observation, existing_conditions: list[dict[str, Any]], now: str | None = None) -> dict[str, Any]:
    """The full status of a mirror (conditions keep their transition times)."""
    spec = obs.spec
    available, a_reason, a_msg = deployment_available(obs.deployment, spec.replicas)
    bound, s_reason, s_msg, storage = storage_status(spec, obs.pvc)
    configured, n_reason, n_msg = nodes_condition(obs.nodes)
    rolled_out = deployment_rolled_out(obs.deployment, spec.replicas)
    endpoint = endpoint_of(obs.service, spec.service.port)
    auth_rejected = obs.upstream_auth is not None and obs.upstream_auth[0] is False
    config_error = obs.error_reason is not None or auth_rejected
    error_reason = obs.error_reason or (f"Upstream{obs.upstream_auth[1]}" if auth_rejected and obs.upstream_auth else None)
    error_message = obs.error_message if obs.error_reason else (obs.upstream_auth[2] if auth_rejected and obs.upstream_auth else "")
    repair = obs.repair
    if not config_error and repair is not None and not repair.transient:
        error_reason, error_message = repair.reason, repair.message
    stalled = config_error or (repair is not None and not repair.transient)

    reconciling_reasons = []
    if not rolled_out:
        reconciling_reasons.append("the registry Deployment is rolling out")
    if obs.nodes.enabled and not configured and not obs.nodes.problems:
        reconciling_reasons.append("node configuration is rolling out")
    if not endpoint:
        reconciling_reasons.append("the Service has no ClusterIP yet")
    elif being_deleted(obs.service):
        # Its ClusterIP still answers, but goes with it: the mirror is not Ready on it.
        reconciling_reasons.append("the Service is being deleted")
    if repair is not None and repair.transient:
        reconciling_reasons.append(f"retrying: {repair.message}")
    if obs.deleting:
        reconciling_reasons = ["removing node configuration before deletion"]
    reconciling = bool(reconciling_reasons) and not stalled
    serving = available and bound and configured and endpoint is not None and not being_deleted(obs.service)

    if obs.deleting:
        ready, r_reason, r_msg = False, "Terminating", "waiting for every node to drop this mirror's configuration"
    elif config_error:
        ready, r_reason, r_msg = False, error_reason or "Error", error_message
    elif not available:
        ready, r_reason, r_msg = False, a_reason, a_msg
    elif not bound:
        ready, r_reason, r_msg = False, s_reason, s_msg
    elif not configured:
        ready, r_reason, r_msg = False, n_reason, n_msg
    elif reconciling and not (repair is not None and serving and rolled_out):
        ready, r_reason, r_msg = False, "Reconciling", "; ".join(reconciling_reasons)
    else:
        ready, r_reason, r_msg = True, "MirrorReady", f"serving at {endpoint}; {n_msg}"

    new_conditions = [
        cond.condition("Ready", ready, r_reason, r_msg),
        cond.condition("Available", available, a_reason, a_msg),
        cond.condition("StorageBound", bound, s_reason, s_msg),
        cond.condition("NodesConfigured", configured, n_reason, n_msg),
        cond.condition(
            "Reconciling",
            reconciling,
            ("Retrying" if repair is not None else "Progressing") if reconciling else "Idle",
            "; ".join(reconciling_reasons) if reconciling else "",
        ),
        cond.condition("Stalled", stalled, error_reason or "NoError", error_message if stalled else ""),
    ]
    if obs.upstream_auth is not None:
        ok, reason, message = obs.upstream_auth
        new_conditions.append(cond.condition("UpstreamAuthenticated", cond.UNKNOWN if ok is None else ok, reason, message))
    if obs.bootstrap is not None:
        # A warning, not a failure: the mirror serves now; it is the next reschedule of its pods that may not start.
        new_conditions.append(cond.condition("ImageIndependent", False, obs.bootstrap.REASON, obs.bootstrap.message()))

    if obs.deleting:
        phase = "Terminating"
    elif config_error:
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
            **(obs.usage if obs.usage is not None and rollout.enabled else {}),
        },
        "nodesRatio": f"{rollout.ready}/{rollout.desired}" if rollout.enabled else "disabled",
        "hosts": [{"host": host, "position": position, "mirrors": head} for host, (position, head) in sorted(obs.host_routes.items())],
        "conditions": cond.merge_conditions(existing_conditions, new_conditions, generation=obs.generation, now=now),
    }
    return {k: v for k, v in status.items() if v is not None}


def invalid_status(generation: int | None, existing_conditions: list[dict[str, Any]], reason: str, message: str) -> dict[str, Any]:
    """The status of a mirror whose spec cannot even be read (nothing else can be said about it)."""
    conds = cond.merge_conditions(
        existing_conditions,
        [cond.condition("Ready", False, reason, message), cond.condition("Stalled", True, reason, message)],
        generation=generation,
    )
    return {"observedGeneration": generation, "phase": "Failed", "conditions": conds}


def typed_status(status: dict[str, Any]) -> dict[str, Any]:
    """The status through the pydantic model: a key the CRD does not declare fails here, not in the API server.

    Done only before a write (not on every evaluation); the unit tests check the round trip is lossless.
    """
    typed = RegistryMirrorStatus.model_validate(status)
    return typed.model_dump(mode="json", by_alias=True, exclude_none=True)
