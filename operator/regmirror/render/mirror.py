"""A mirror's namespaced children, rendered from its spec with no I/O.

Every function returns plain dicts in the shape the API server stores, with
fields in a fixed order and quantities as the user wrote them, so a server-side
apply of an unchanged rendering is a no-op and a test can compare objects
directly. Credentials never appear here: the registry gets them from
Secret-backed environment variables, which distribution reads as overrides of
`proxy.username` and `proxy.password`.
"""

from __future__ import annotations

import copy
import hashlib
import ipaddress
from collections.abc import Iterable, Mapping
from typing import Any

import yaml

from regmirror import constants as c
from regmirror import naming
from regmirror.models import AccessMode, AccessPolicy, DeletionPolicy, RegistryMirrorSpec, ServiceType
from regmirror.render import cache as render_cache
from regmirror.render.front import (
    CACHE_SIDECAR_PORT,
    FRONT_CONFIG_KEY,
    REALM,
    REGISTRY_BACKEND_PORT,
    FrontSettings,
    render_front_vcl,
)
from regmirror.units import duration_seconds

CONFIG_KEY = "config.yml"
CONFIG_DIR = "/etc/distribution"
CONFIG_PATH = f"{CONFIG_DIR}/{CONFIG_KEY}"
TLS_DIR = "/etc/regmirror/tls"
UPSTREAM_CA_DIR = "/etc/regmirror/upstream-ca"
UPSTREAM_CA_FILE = "ca.crt"
# Go reads every file of every directory listed in SSL_CERT_DIR; keeping the system
# directory first means a private CA adds to the public roots instead of replacing them.
SYSTEM_CERT_DIR = "/etc/ssl/certs"
# Distribution 3 and the official image run fine as any user; 65532 is the
# conventional "nonroot" id, and fsGroup makes the cache volume writable.
NONROOT_ID = 65532
ENV_PROXY_USERNAME = "REGISTRY_PROXY_USERNAME"
ENV_PROXY_PASSWORD = "REGISTRY_PROXY_PASSWORD"
# distribution reads these as overrides of storage.s3.accesskey / secretkey.
ENV_S3_ACCESS_KEY = "REGISTRY_STORAGE_S3_ACCESSKEY"
ENV_S3_SECRET_KEY = "REGISTRY_STORAGE_S3_SECRETKEY"
STORAGE_CA_DIR = "/etc/regmirror/storage-ca"
STORAGE_CA_FILE = "ca.crt"
# With s3 the pod keeps no blobs; this emptyDir only holds the cache sidecar's small state file.
S3_SCRATCH_SIZE = "64Mi"
# How long a replica stays bound to a node that stopped reporting before it is evicted and
# replaced elsewhere (the default is 300 s). The Service stops routing to it earlier, as soon
# as the node controller marks the node NotReady and its pods not ready; this bounds how long
# the mirror runs one replica short. Not shorter: a kubelet blip would then evict a healthy
# replica and, on ephemeral storage, drop its whole cache.
NODE_FAILURE_TOLERATION_SECONDS = 30
NODE_FAILURE_TAINTS = ("node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable")
HOSTNAME_TOPOLOGY_KEY = "kubernetes.io/hostname"
# A replica being deleted (rollout, drain, scale-down) keeps serving this long after it leaves
# the Service: kube-proxy on every node needs a moment to stop sending it new connections (a
# reset one makes containerd fetch that request from the upstream instead), and transfers
# already running finish instead of relying on containerd to resume them elsewhere.
SHUTDOWN_DELAY_SECONDS = 15
# Then distribution stops accepting and lets in-flight requests finish for up to this long
# (its http.draintimeout; without one, SIGTERM ends it at once).
DRAIN_SECONDS = 10
TERMINATION_GRACE_SECONDS = SHUTDOWN_DELAY_SECONDS + DRAIN_SECONDS + 5
# Containers that serve nodes (or hear from the registry) wait out the delay; the stats loop need not.
DELAYED_SHUTDOWN_CONTAINERS = ("registry", "front", "cache")
PORT_NAME = "registry"
BACKEND_PORT_NAME = "backend"
CACHE_PORT_NAME = "cache"
METRICS_PORT_NAME = "metrics"
METRICS_PATH = "/metrics"
HEALTH_PATH = "/debug/health"
# An HTTPS mirror (no front: Varnish speaks no TLS) under Restricted: distribution's own htpasswd
# auth, from the mirror's access Secret. distribution re-reads the file when its mtime changes.
ACCESS_SECRET_DIR = "/etc/regmirror/access"
HTPASSWD_KEY = "htpasswd"
# Secret files readable by the pod's user and group only (fsGroup), never by others.
SECRET_FILE_MODE = 0o440
EXTERNAL_SUFFIX = "-ext"


def owner_reference(name: str, uid: str) -> dict[str, Any]:
    """Owner reference to the RegistryMirror, so garbage collection removes its children."""
    return {
        "apiVersion": c.API_VERSION,
        "kind": c.KIND,
        "name": name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(name: str, uid: str, namespace: str, *, owned: bool = True) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": naming.child_name(name), "namespace": namespace, "labels": naming.labels(name)}
    if owned:
        meta["ownerReferences"] = [owner_reference(name, uid)]
    return meta


def config_hash(text: str) -> str:
    """Short sha256 of a rendered text: a pod-template annotation that triggers a rollout on change."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _uses_pvc(spec: RegistryMirrorSpec) -> bool:
    return not spec.storage.ephemeral and spec.storage.s3 is None


def uses_s3(spec: RegistryMirrorSpec) -> bool:
    """Whether the cache lives in an S3 bucket shared by every replica (no volume holds blobs)."""
    return spec.storage.s3 is not None


def _single_attach(spec: RegistryMirrorSpec) -> bool:
    """Whether the cache volume can be mounted by one pod only (so a rollout must stop the old pod first)."""
    return _uses_pvc(spec) and AccessMode.READ_WRITE_MANY not in spec.storage.access_modes


def front_enabled(spec: RegistryMirrorSpec) -> bool:
    """Whether Varnish fronts the registry. Varnish speaks no TLS, so an HTTPS mirror is served by distribution itself."""
    return spec.service.tls is None


def registry_listen_port(spec: RegistryMirrorSpec) -> int:
    """Where distribution listens in the pod: behind the front, or on the Service's target itself."""
    return REGISTRY_BACKEND_PORT if front_enabled(spec) else c.REGISTRY_PORT


def registry_listen_address(spec: RegistryMirrorSpec) -> str:
    """distribution's http.addr. Behind the front it listens on the pod's loopback only: on the pod IP,
    any pod could reach it directly and pull past the front's access check."""
    return f"127.0.0.1:{REGISTRY_BACKEND_PORT}" if front_enabled(spec) else f":{c.REGISTRY_PORT}"


def registry_auth_enforced(spec: RegistryMirrorSpec, access_enforced: bool | None) -> bool:
    """Whether distribution itself checks credentials: an HTTPS mirror (no front) whose access is enforced.

    `access_enforced` is what the access state says (regmirror/access.py);
    None (offline rendering) means: as the spec's policy says.
    """
    if front_enabled(spec):
        return False
    return access_enforced if access_enforced is not None else spec.effective_access_policy() == AccessPolicy.RESTRICTED


def _storage_config(name: str, spec: RegistryMirrorSpec) -> dict[str, Any]:
    s3 = spec.storage.s3
    if s3 is None:
        return {"filesystem": {"rootdirectory": c.REGISTRY_STORAGE_PATH}}
    params: dict[str, Any] = {"bucket": s3.bucket, "region": s3.region}
    if s3.endpoint:
        params["regionendpoint"] = s3.endpoint
        # The SDK takes the endpoint's scheme; `secure` says the same for its defaults.
        params["secure"] = s3.endpoint.startswith("https://")
    params["forcepathstyle"] = s3.force_path_style
    params["rootdirectory"] = s3.effective_root(name)
    # No accesskey/secretkey here: they come from REGISTRY_STORAGE_S3_* Secret-backed env vars.
    return {
        "s3": params,
        # Blobs are served by the registry itself, not by a 307 to a pre-signed bucket URL:
        # nodes may not reach the bucket, and the front must see (and merge) every blob GET.
        "redirect": {"disable": True},
    }


def render_registry_config(spec: RegistryMirrorSpec, name: str = "", *, access_enforced: bool | None = None) -> str:
    """distribution's config.yml for proxy mode; never holds credentials.

    `name` (the mirror's) only matters for s3 storage: the default key prefix.
    `access_enforced`: see `registry_auth_enforced` (only an HTTPS mirror's
    registry checks credentials itself; behind the front, the front does).
    """
    http: dict[str, Any] = {
        "addr": registry_listen_address(spec),
        "draintimeout": f"{DRAIN_SECONDS}s",
        "headers": {"X-Content-Type-Options": ["nosniff"]},
        "debug": {
            "addr": f":{c.REGISTRY_DEBUG_PORT}",
            "prometheus": {"enabled": True, "path": METRICS_PATH},
        },
    }
    if spec.service.tls is not None:
        http["tls"] = {"certificate": f"{TLS_DIR}/tls.crt", "key": f"{TLS_DIR}/tls.key"}
    config: dict[str, Any] = {
        "version": "0.1",
        # The access log is Apache-style text; the JSON "response completed" lines already cover each request.
        "log": {"accesslog": {"disabled": True}, "level": "info", "formatter": "json", "fields": {"service": "registry"}},
        "storage": {
            **_storage_config(name, spec),
            "delete": {"enabled": True},
            # No blobdescriptor cache: the cache sidecar deletes evicted blobs under the running
            # registry, and a cached descriptor would keep answering "present" for a blob that is
            # gone (distribution#2367; Gardener's registry cache disables it for the same reason).
        },
        "http": http,
        **(
            {"auth": {"htpasswd": {"realm": REALM, "path": f"{ACCESS_SECRET_DIR}/{HTPASSWD_KEY}"}}}
            if registry_auth_enforced(spec, access_enforced)
            else {}
        ),
        # A failing check makes distribution answer 503 to every request (health.Handler), /v2/
        # included: the readiness probes then take the pod out of the Service, which is how an
        # unreachable bucket or a broken volume shows.
        "health": {"storagedriver": {"enabled": True, "interval": "10s", "threshold": 3}},
        # ttl 0 turns distribution's own expiry off: its scheduler deletes blindly, also what
        # running pods use. The cache sidecar enforces cache.ttl as an upper bound instead,
        # keeping pinned images. (A string: Go's YAML decoder parses durations only from strings.)
        "proxy": {"remoteurl": spec.upstream.url, "ttl": "0"},
        # Every pull the registry serves is posted to the sidecar, which keeps "last pulled"
        # per blob for least-recently-pulled eviction.
        "notifications": {
            "events": {"includereferences": False},
            "endpoints": [
                {
                    "name": "regmirror-cache",
                    "url": f"http://127.0.0.1:{CACHE_SIDECAR_PORT}{render_cache.EVENTS_PATH}",
                    "timeout": "2s",
                    "threshold": 5,
                    "backoff": "2s",
                    "ignore": {"actions": ["push", "delete", "mount"]},
                }
            ],
        },
    }
    text: str = yaml.safe_dump(config, sort_keys=False, default_flow_style=False)
    return text


def front_settings(spec: RegistryMirrorSpec) -> FrontSettings:
    """The front's parameters for this mirror."""
    return FrontSettings(
        tag_freshness_seconds=int(duration_seconds(spec.cache.tag_freshness)),
        max_object_bytes=render_cache.front_store_bytes(spec) // 2,
    )


def render_config_map(
    name: str,
    uid: str,
    spec: RegistryMirrorSpec,
    namespace: str,
    *,
    access_enforced: bool | None = None,
    pins: Iterable[str] = (),
    invalidations: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The mirror's one ConfigMap: config.yml and the front's VCL (hashed into the pod template, see
    `pod_config_hash`), and the cache sidecar's live inputs (not hashed: render/cache.py). The
    accepted credentials are in the access Secret."""
    data = _config_data(name, spec, access_enforced)
    data |= render_cache.control_data(spec, pins=pins, invalidations=invalidations)
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _metadata(name, uid, namespace), "data": data}


def pod_config_hash(config_map: Mapping[str, Any]) -> str:
    """The hash of what the pods read only at start (config.yml and the VCL): a change restarts them."""
    data = config_map["data"]
    return config_hash("".join(data[key] for key in (CONFIG_KEY, FRONT_CONFIG_KEY) if key in data))


def _config_data(name: str, spec: RegistryMirrorSpec, access_enforced: bool | None = None) -> dict[str, str]:
    data = {CONFIG_KEY: render_registry_config(spec, name, access_enforced=access_enforced)}
    if front_enabled(spec):
        data[FRONT_CONFIG_KEY] = render_front_vcl(front_settings(spec))
    return data


def render_pvc(name: str, uid: str, spec: RegistryMirrorSpec, namespace: str) -> dict[str, Any] | None:
    """The cache's PersistentVolumeClaim; None for ephemeral storage.

    A claim with deletionPolicy Retain carries no owner reference, so garbage
    collection leaves it (and its blobs) for a later mirror of the same name.
    """
    if not _uses_pvc(spec):
        return None
    storage = spec.storage
    pvc_spec: dict[str, Any] = {"accessModes": [m.value for m in storage.access_modes]}
    if storage.storage_class_name:
        pvc_spec["storageClassName"] = storage.storage_class_name
    pvc_spec["volumeMode"] = "Filesystem"
    pvc_spec["resources"] = {"requests": {"storage": storage.size}}
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": _metadata(name, uid, namespace, owned=storage.deletion_policy != DeletionPolicy.RETAIN),
        "spec": pvc_spec,
    }


def render_service(name: str, uid: str, spec: RegistryMirrorSpec, namespace: str) -> dict[str, Any]:
    """The ClusterIP Service nodes reach the mirror through (by IP: the host cannot resolve cluster DNS)."""
    ports: list[dict[str, Any]] = [{"name": PORT_NAME, "protocol": "TCP", "port": spec.service.port, "targetPort": PORT_NAME}]
    if spec.service.port != c.REGISTRY_DEBUG_PORT:
        # Two Service ports cannot share a number; a mirror served on 5001 gives up the metrics port.
        ports.append({"name": METRICS_PORT_NAME, "protocol": "TCP", "port": c.REGISTRY_DEBUG_PORT, "targetPort": METRICS_PORT_NAME})
    if spec.service.port != CACHE_SIDECAR_PORT:
        # The cache sidecar's figures (/stats, /metrics for Prometheus), read-only.
        ports.append({"name": CACHE_PORT_NAME, "protocol": "TCP", "port": CACHE_SIDECAR_PORT, "targetPort": CACHE_PORT_NAME})
    svc_spec: dict[str, Any] = {"type": "ClusterIP"}
    if spec.service.cluster_ip:
        svc_spec["clusterIP"] = spec.service.cluster_ip
    svc_spec["selector"] = naming.selector_labels(name)
    svc_spec["ports"] = ports
    return {"apiVersion": "v1", "kind": "Service", "metadata": _metadata(name, uid, namespace), "spec": svc_spec}


def external_service_name(mirror: str) -> str:
    """The Service that exposes a mirror outside the cluster (service.type NodePort or LoadBalancer)."""
    return f"{naming.child_name(mirror)}{EXTERNAL_SUFFIX}"


def render_external_service(name: str, uid: str, spec: RegistryMirrorSpec, namespace: str) -> dict[str, Any] | None:
    """The registry port alone, as a NodePort or LoadBalancer Service; None for ClusterIP.

    A second Service rather than a new type for the first: that one also
    carries the metrics and cache ports, which must not leave the cluster, and
    its ClusterIP (what nodes use) stays as it is.
    """
    svc = spec.service
    if svc.type == ServiceType.CLUSTER_IP:
        return None
    port: dict[str, Any] = {"name": PORT_NAME, "protocol": "TCP", "port": svc.port, "targetPort": PORT_NAME}
    if svc.node_port is not None:
        port["nodePort"] = svc.node_port
    svc_spec: dict[str, Any] = {"type": svc.type.value, "selector": naming.selector_labels(name), "ports": [port]}
    if svc.type == ServiceType.LOAD_BALANCER and svc.load_balancer_source_ranges:
        svc_spec["loadBalancerSourceRanges"] = list(svc.load_balancer_source_ranges)
    meta = _metadata(name, uid, namespace)
    meta["name"] = external_service_name(name)
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": svc_spec}


def node_source_cidrs(spec: RegistryMirrorSpec, node_addresses: Iterable[str]) -> list[str]:
    """Where nodes' connections come from: access.networkPolicy.nodeSources, else each node address as a /32 or /128.

    Addresses that do not parse are skipped (they come from Node objects); the
    result is collapsed and sorted, so a node list in another order renders
    the same policy.
    """
    explicit = spec.access.network_policy.node_sources
    if explicit:
        return list(explicit)
    v4: list[ipaddress.IPv4Network] = []
    v6: list[ipaddress.IPv6Network] = []
    for address in node_addresses:
        try:
            parsed = ipaddress.ip_address(address)
        except ValueError:
            continue
        if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
            parsed = parsed.ipv4_mapped
        if isinstance(parsed, ipaddress.IPv4Address):
            v4.append(ipaddress.IPv4Network(parsed))
        else:
            v6.append(ipaddress.IPv6Network(parsed))
    return [str(n) for n in ipaddress.collapse_addresses(v4)] + [str(n) for n in ipaddress.collapse_addresses(v6)]


def operator_pod_selector() -> dict[str, Any]:
    """The operator's pods (manifests/base/operator.yaml), which live in the mirrors' namespace."""
    return {"matchLabels": {c.LABEL_NAME: c.APP_NAME, c.LABEL_COMPONENT: "operator"}}


def render_network_policy(
    name: str, uid: str, spec: RegistryMirrorSpec, namespace: str, node_addresses: Iterable[str] = ()
) -> dict[str, Any] | None:
    """Ingress to the mirror's pods: the nodes to the registry port; the operator and access.networkPolicy.from to every port.

    None when the policy is off (access.networkPolicy.enabled, by default on
    exactly when the access policy is Restricted). Without any node source
    (none given, no node address known yet) the nodes' rule is left out: an
    ingress rule with no `from` would admit every source.
    """
    if not spec.network_policy_enabled():
        return None
    registry_port = {"protocol": "TCP", "port": c.REGISTRY_PORT}
    every_port = [registry_port, {"protocol": "TCP", "port": c.REGISTRY_DEBUG_PORT}, {"protocol": "TCP", "port": CACHE_SIDECAR_PORT}]
    rules: list[dict[str, Any]] = []
    sources = node_source_cidrs(spec, node_addresses)
    if spec.service.type == ServiceType.LOAD_BALANCER:
        # Where a load balancer keeps the client's address, the ranges it admits reach the pods as they are.
        sources += [r for r in spec.service.load_balancer_source_ranges if r not in sources]
    if sources:
        rules.append({"from": [{"ipBlock": {"cidr": cidr}} for cidr in sources], "ports": [registry_port]})
    rules.append({"from": [{"podSelector": operator_pod_selector()}], "ports": every_port})
    extra = [p.to_peer() for p in spec.access.network_policy.from_]
    if extra:
        rules.append({"from": extra, "ports": every_port})
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _metadata(name, uid, namespace),
        "spec": {"podSelector": {"matchLabels": naming.selector_labels(name)}, "policyTypes": ["Ingress"], "ingress": rules},
    }


def _env(spec: RegistryMirrorSpec) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = []
    creds = spec.upstream.credentials_secret_ref
    if creds is not None:
        for var, key in ((ENV_PROXY_USERNAME, creds.username_key), (ENV_PROXY_PASSWORD, creds.password_key)):
            env.append({"name": var, "valueFrom": {"secretKeyRef": {"name": creds.name, "key": key}}})
    s3 = spec.storage.s3
    if s3 is not None and s3.credentials_secret_ref is not None:
        ref = s3.credentials_secret_ref
        for var, key in ((ENV_S3_ACCESS_KEY, ref.access_key_key), (ENV_S3_SECRET_KEY, ref.secret_key_key)):
            env.append({"name": var, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": key}}})
    cert_dirs = [SYSTEM_CERT_DIR]
    if spec.upstream.tls is not None and spec.upstream.tls.ca_secret_ref is not None:
        cert_dirs.append(UPSTREAM_CA_DIR)
    if s3 is not None and s3.ca_secret_ref is not None:
        cert_dirs.append(STORAGE_CA_DIR)
    if len(cert_dirs) > 1:
        env.append({"name": "SSL_CERT_DIR", "value": ":".join(cert_dirs)})
    # distribution 3 exports OpenTelemetry traces to localhost by default and
    # logs every failed export; nothing collects them here.
    env.append({"name": "OTEL_TRACES_EXPORTER", "value": "none"})
    proxy = spec.proxy
    for var, value in (("HTTP_PROXY", proxy.http_proxy), ("HTTPS_PROXY", proxy.https_proxy), ("NO_PROXY", proxy.no_proxy)):
        if value:
            # Go honours the upper-case names, other tools the lower-case ones.
            env.append({"name": var, "value": value})
            env.append({"name": var.lower(), "value": value})
    return env


def _volumes_and_mounts(name: str, spec: RegistryMirrorSpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    child = naming.child_name(name)
    volumes: list[dict[str, Any]] = [
        {"name": "config", "configMap": {"name": child, "items": [{"key": CONFIG_KEY, "path": CONFIG_KEY}]}},
    ]
    if front_enabled(spec):
        volumes.append(
            {"name": "front-config", "configMap": {"name": child, "items": [{"key": FRONT_CONFIG_KEY, "path": FRONT_CONFIG_KEY}]}}
        )
    mounts: list[dict[str, Any]] = [{"name": "config", "mountPath": CONFIG_DIR, "readOnly": True}]
    if _uses_pvc(spec):
        volumes.append({"name": "storage", "persistentVolumeClaim": {"claimName": child}})
    elif uses_s3(spec):
        volumes.append({"name": "storage", "emptyDir": {"sizeLimit": S3_SCRATCH_SIZE}})
    else:
        volumes.append({"name": "storage", "emptyDir": {"sizeLimit": spec.storage.size}})
    mounts.append({"name": "storage", "mountPath": c.REGISTRY_STORAGE_PATH})
    volumes.append({"name": "tmp", "emptyDir": {}})
    mounts.append({"name": "tmp", "mountPath": "/tmp"})
    volumes += render_cache.cache_volumes(name, spec, front_enabled(spec))
    if not front_enabled(spec):
        # An HTTPS mirror checks credentials itself when its access is enforced (config.yml says so).
        volumes.append(
            {
                "name": "access",
                "secret": {
                    "secretName": naming.credentials_secret_name(name),
                    "items": [{"key": HTPASSWD_KEY, "path": HTPASSWD_KEY}],
                    "defaultMode": SECRET_FILE_MODE,
                },
            }
        )
        mounts.append({"name": "access", "mountPath": ACCESS_SECRET_DIR, "readOnly": True})
    if spec.service.tls is not None:
        volumes.append(
            {
                "name": "tls",
                "secret": {
                    "secretName": spec.service.tls.secret_name,
                    "items": [{"key": "tls.crt", "path": "tls.crt"}, {"key": "tls.key", "path": "tls.key"}],
                },
            }
        )
        mounts.append({"name": "tls", "mountPath": TLS_DIR, "readOnly": True})
    if spec.upstream.tls is not None and spec.upstream.tls.ca_secret_ref is not None:
        ref = spec.upstream.tls.ca_secret_ref
        volumes.append({"name": "upstream-ca", "secret": {"secretName": ref.name, "items": [{"key": ref.key, "path": UPSTREAM_CA_FILE}]}})
        mounts.append({"name": "upstream-ca", "mountPath": UPSTREAM_CA_DIR, "readOnly": True})
    s3 = spec.storage.s3
    if s3 is not None and s3.ca_secret_ref is not None:
        ref = s3.ca_secret_ref
        volumes.append({"name": "storage-ca", "secret": {"secretName": ref.name, "items": [{"key": ref.key, "path": STORAGE_CA_FILE}]}})
        mounts.append({"name": "storage-ca", "mountPath": STORAGE_CA_DIR, "readOnly": True})
    return volumes, mounts


def _probe(path: str, port: int, scheme: str, *, period: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": port, "scheme": scheme},
        "timeoutSeconds": 3,
        "periodSeconds": period,
        "successThreshold": 1,
        "failureThreshold": failures,
    }


def _liveness(spec: RegistryMirrorSpec) -> dict[str, Any]:
    if uses_s3(spec):
        # /debug/health fails with the storage check, and a restart cannot bring a remote bucket
        # back: it would only restart every replica in a loop while readiness already keeps them
        # out of the Service. Liveness asks whether the process answers at all.
        return {"tcpSocket": {"port": METRICS_PORT_NAME}, "periodSeconds": 10, "timeoutSeconds": 3, "failureThreshold": 6}
    return _probe(HEALTH_PATH, c.REGISTRY_DEBUG_PORT, "HTTP", period=10, failures=6)


def _tolerations(spec: RegistryMirrorSpec) -> list[dict[str, Any]]:
    """The user's tolerations, plus a short stay on a failed node for the taints the user did not set."""
    tolerations = [t.model_dump(mode="json", by_alias=True, exclude_none=True) for t in spec.tolerations]
    given = {t.key for t in spec.tolerations}
    for key in NODE_FAILURE_TAINTS:
        if key not in given:
            tolerations.append(
                {"key": key, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": NODE_FAILURE_TOLERATION_SECONDS}
            )
    return tolerations


def _spread(name: str) -> list[dict[str, Any]]:
    """One replica per node where the nodes allow it.

    ScheduleAnyway, not DoNotSchedule: a dead node keeps its (NotReady-tainted) domain in the
    skew count, so DoNotSchedule would leave the replacement replica Pending until the node
    returns, exactly when it is needed. Rendered for one replica too (a no-op there), so that
    scaling never changes the pod template and rolls the pods.
    """
    return [
        {
            "maxSkew": 1,
            "topologyKey": HOSTNAME_TOPOLOGY_KEY,
            "whenUnsatisfiable": "ScheduleAnyway",
            "labelSelector": {"matchLabels": naming.selector_labels(name)},
            # Count only this revision's pods: during a rolling update the old ones are leaving.
            "matchLabelKeys": ["pod-template-hash"],
        }
    ]


def render_pdb(name: str, uid: str, spec: RegistryMirrorSpec, namespace: str) -> dict[str, Any] | None:
    """A PodDisruptionBudget keeping all but one replica up through drains; None for one replica or none.

    maxUnavailable 1 (not minAvailable): it holds for any replica count. AlwaysAllow lets a
    drain evict a replica that is not ready anyway (a broken pod must not block node maintenance).
    One replica gets none: a budget there either blocks every drain or protects nothing. A
    budget left behind by a scale-down to one is harmless (maxUnavailable 1 lets the last pod
    go) and leaves with the mirror (owner reference): the operator never deletes through the API.
    """
    if spec.replicas <= 1:
        return None
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(name, uid, namespace),
        "spec": {
            "maxUnavailable": 1,
            "selector": {"matchLabels": naming.selector_labels(name)},
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        },
    }


def _strategy(spec: RegistryMirrorSpec) -> dict[str, Any]:
    if _single_attach(spec):
        # A ReadWriteOnce(Pod) claim cannot be mounted by the old and the new pod at once.
        return {"type": "Recreate"}
    return {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}


def render_deployment(
    name: str,
    uid: str,
    spec: RegistryMirrorSpec,
    namespace: str,
    *,
    config_hash: str,
    credentials_hash: str | None,
    sidecar_image: str = c.DEFAULT_OPERATOR_IMAGE,
    front_image: str = render_cache.DEFAULT_FRONT_IMAGE,
) -> dict[str, Any]:
    """distribution in proxy mode behind the cache front, with the cache sidecar, probes and metrics.

    The config and credentials hashes on the pod template make a changed
    config.yml or a rotated Secret roll the pods (neither is re-read live).
    """
    volumes, mounts = _volumes_and_mounts(name, spec)
    annotations = {c.ANNOTATION_CONFIG_HASH: config_hash}
    if credentials_hash is not None:
        annotations[c.ANNOTATION_CREDENTIALS_HASH] = credentials_hash
    resources: dict[str, Any] = {}
    if spec.resources.requests:
        resources["requests"] = dict(spec.resources.requests)
    if spec.resources.limits:
        resources["limits"] = dict(spec.resources.limits)
    container: dict[str, Any] = {
        "name": "registry",
        "image": spec.image,
        # The official image's entrypoint turns `serve <path>` into `registry serve <path>`;
        # an explicit path works for 3.x (/etc/distribution) and 2.x (/etc/docker/registry) images alike.
        "args": ["serve", CONFIG_PATH],
        "ports": [
            {
                "name": BACKEND_PORT_NAME if front_enabled(spec) else PORT_NAME,
                "containerPort": registry_listen_port(spec),
                "protocol": "TCP",
            },
            {"name": METRICS_PORT_NAME, "containerPort": c.REGISTRY_DEBUG_PORT, "protocol": "TCP"},
        ],
        "env": _env(spec),
        "resources": resources,
        "volumeMounts": mounts,
        # Not /v2/: behind the front the registry listens on loopback only (the kubelet cannot reach it), and
        # an HTTPS mirror under Restricted answers /v2/ with 401. /debug/health fails exactly when distribution
        # answers 503 to every request (its storage check), which is what readiness must catch.
        "readinessProbe": _probe(HEALTH_PATH, c.REGISTRY_DEBUG_PORT, "HTTP", period=5, failures=3),
        "livenessProbe": _liveness(spec),
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
        },
    }
    pod_spec: dict[str, Any] = {
        "terminationGracePeriodSeconds": TERMINATION_GRACE_SECONDS,
        "enableServiceLinks": False,
        "automountServiceAccountToken": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": NONROOT_ID,
            "runAsGroup": NONROOT_ID,
            "fsGroup": NONROOT_ID,
            "fsGroupChangePolicy": "OnRootMismatch",
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": _containers(spec, container, sidecar_image, front_image),
        "volumes": volumes,
    }
    if spec.node_selector:
        pod_spec["nodeSelector"] = dict(spec.node_selector)
    pod_spec["tolerations"] = _tolerations(spec)
    pod_spec["topologySpreadConstraints"] = _spread(name)
    if spec.affinity is not None and spec.affinity.to_pod_spec():
        pod_spec["affinity"] = spec.affinity.to_pod_spec()
    if spec.priority_class_name:
        pod_spec["priorityClassName"] = spec.priority_class_name
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(name, uid, namespace),
        "spec": {
            "replicas": spec.replicas,
            "revisionHistoryLimit": 3,
            "selector": {"matchLabels": naming.selector_labels(name)},
            "strategy": _strategy(spec),
            "template": {
                "metadata": {"labels": naming.labels(name), "annotations": annotations},
                "spec": pod_spec,
            },
        },
    }


def _containers(spec: RegistryMirrorSpec, registry: dict[str, Any], sidecar_image: str, front_image: str) -> list[dict[str, Any]]:
    front = front_enabled(spec)
    # The sidecar gets the registry's env (proxy, CA, upstream credentials) for its own
    # upstream probes and rate-limit reads; it never logs them. Not the bucket's key: it
    # never talks to the bucket.
    env = [e for e in copy.deepcopy(registry["env"]) if e["name"] not in (ENV_S3_ACCESS_KEY, ENV_S3_SECRET_KEY)]
    sidecar = render_cache.sidecar_container(spec, sidecar_image, env, front)
    containers = [registry]
    if front:
        containers += render_cache.front_containers(spec, front_image, "front-config")
    containers.append(sidecar)
    # Only where another pod serves meanwhile: with a single-attach claim (Recreate) the old pod
    # has left the Service already and the new one cannot start before it is gone, so a delay
    # would only lengthen every rollout's gap.
    for container in containers if not _single_attach(spec) else []:
        if container["name"] in DELAYED_SHUTDOWN_CONTAINERS:
            # The kubelet's own sleep (no shell needed in the image; GA in Kubernetes 1.34, on by default since 1.30).
            container["lifecycle"] = {"preStop": {"sleep": {"seconds": SHUTDOWN_DELAY_SECONDS}}}
    return containers


def render_mirror_children(
    name: str,
    uid: str,
    spec: RegistryMirrorSpec,
    namespace: str,
    *,
    credentials_hash: str | None = None,
    sidecar_image: str = c.DEFAULT_OPERATOR_IMAGE,
    pins: Iterable[str] = (),
    invalidations: Mapping[str, str] | None = None,
    access_enforced: bool | None = None,
    node_addresses: Iterable[str] = (),
) -> list[dict[str, Any]]:
    """ConfigMap (registry and front config, the cache's live inputs), PVC (unless ephemeral or s3),
    Service (and the external one), NetworkPolicy, PodDisruptionBudget (more than one replica) and
    Deployment, in the order to apply them.

    `sidecar_image` is the operator's own image (it runs `regmirror cache serve`); `pins` and
    `invalidations` are the cache sidecar's live inputs (see render/cache.py). `access_enforced`
    (from regmirror/access.py) only shapes an HTTPS mirror's config.yml; `node_addresses` feed the
    NetworkPolicy when access.networkPolicy.nodeSources is empty. The access Secret the pods mount
    is not among these: the operator applies it first (render/access.py).
    """
    config_map = render_config_map(name, uid, spec, namespace, access_enforced=access_enforced, pins=pins, invalidations=invalidations)
    children = [config_map]
    pvc = render_pvc(name, uid, spec, namespace)
    if pvc is not None:
        children.append(pvc)
    children.append(render_service(name, uid, spec, namespace))
    external = render_external_service(name, uid, spec, namespace)
    if external is not None:
        children.append(external)
    policy = render_network_policy(name, uid, spec, namespace, node_addresses)
    if policy is not None:
        children.append(policy)
    pdb = render_pdb(name, uid, spec, namespace)
    if pdb is not None:
        children.append(pdb)
    children.append(
        render_deployment(
            name,
            uid,
            spec,
            namespace,
            config_hash=pod_config_hash(config_map),
            credentials_hash=credentials_hash,
            sidecar_image=sidecar_image,
        )
    )
    return children
