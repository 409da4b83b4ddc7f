"""The RegistryMirror API: pydantic models that are the one source of the CRD schema.

Every field carries a description (it becomes `kubectl explain` text), and the
cross-field and transition rules are CEL expressions attached with
`x-kubernetes-validations`, so the API server rejects bad input before the
operator ever sees it. The same rules are re-checked here in Python where they
can be, so `regmirror render` and the unit tests fail with the same message.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

from regmirror import constants as c
from regmirror.lowlevel import selector_matches

QUANTITY_PATTERN = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|m|k|M|G|T|P|E)?$"
DURATION_PATTERN = r"^(0|([0-9]+(\.[0-9]+)?(ns|us|ms|s|m|h))+)$"
URL_PATTERN = r"^https?://[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?(:[0-9]{1,5})?(/[^\s]*)?$"
HOST_PATTERN = r"^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?(:[0-9]{1,5})?$"
PROXY_URL_PATTERN = r"^(https?|socks5)://[^\s]+$"
NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
IP_PATTERN = r"^([0-9]{1,3}\.){3}[0-9]{1,3}$|^[0-9a-fA-F:]+:[0-9a-fA-F:]*$"


def cel(rule: str, message: str, **extra: str) -> Any:
    """One `x-kubernetes-validations` entry."""
    return {"rule": rule, "message": message, **extra}


def immutable(what: str) -> dict[str, Any]:
    """Schema extra that makes a field unchangeable after creation (a CEL transition rule)."""
    return {"x-kubernetes-validations": [cel("self == oldSelf", f"{what} is immutable")]}


class Model(BaseModel):
    """Base: frozen, camelCase on the wire, unknown fields rejected."""

    model_config = ConfigDict(
        frozen=True,
        populate_by_name=True,
        alias_generator=to_camel,
        extra="forbid",
        use_enum_values=False,
    )


class FallbackPolicy(StrEnum):
    ALLOW_UPSTREAM = "AllowUpstream"
    NEVER_CONTACT_UPSTREAM = "NeverContactUpstream"


class Runtime(StrEnum):
    CONTAINERD = "containerd"
    CRIO = "crio"


class Capability(StrEnum):
    PULL = "pull"
    RESOLVE = "resolve"


class AccessMode(StrEnum):
    READ_WRITE_ONCE = "ReadWriteOnce"
    READ_WRITE_MANY = "ReadWriteMany"
    READ_WRITE_ONCE_POD = "ReadWriteOncePod"


class DeletionPolicy(StrEnum):
    DELETE = "Delete"
    RETAIN = "Retain"


class SecretKeyRef(Model):
    """A key of a Secret in the operator's namespace."""

    name: Annotated[str, Field(description="Name of the Secret, in the operator's namespace.", pattern=NAME_PATTERN, max_length=253)]
    key: Annotated[str, Field(description="Key within the Secret.", min_length=1)]


class CredentialsSecretRef(Model):
    """Basic-auth credentials for the upstream, held in a Secret."""

    name: Annotated[
        str,
        Field(
            description=(
                "Name of a Secret in the operator's namespace holding the upstream credentials. "
                "The values reach the registry container only through Secret-backed environment "
                "variables; they are never copied into a ConfigMap, a log, an Event or status."
            ),
            pattern=NAME_PATTERN,
            max_length=253,
        ),
    ]
    username_key: Annotated[str, Field(description="Key of the username in the Secret.", min_length=1)] = "username"
    password_key: Annotated[str, Field(description="Key of the password (or token) in the Secret.", min_length=1)] = "password"


class UpstreamTLS(Model):
    """How the mirror verifies the upstream's certificate."""

    ca_secret_ref: Annotated[
        SecretKeyRef | None,
        Field(description="A Secret key holding a PEM CA bundle that signs the upstream's certificate, added to the system roots."),
    ] = None


class Upstream(Model):
    """The registry this mirror caches."""

    url: Annotated[
        str,
        Field(
            description=(
                "Base URL of the upstream registry, http or https, e.g. https://registry-1.docker.io "
                "or https://quay.io. The mirror fetches from here on a cache miss."
            ),
            pattern=URL_PATTERN,
            max_length=2048,
        ),
    ]
    hosts: Annotated[
        list[Annotated[str, Field(pattern=HOST_PATTERN, max_length=253)]] | None,
        Field(
            description=(
                "Registry names (host or host:port, as they appear in image references) that nodes route "
                "to this mirror. Default: the URL's host, where registry-1.docker.io and index.docker.io mean docker.io."
            ),
            max_length=32,
            json_schema_extra={"x-kubernetes-list-type": "set"},
        ),
    ] = None
    credentials_secret_ref: Annotated[
        CredentialsSecretRef | None,
        Field(description="Credentials the mirror presents to the upstream (for private registries and rate limits)."),
    ] = None
    tls: Annotated[UpstreamTLS | None, Field(description="TLS settings for the connection to the upstream.")] = None

    @field_validator("url")
    @classmethod
    def _url_has_host(cls, value: str) -> str:
        if not urlsplit(value).hostname:
            raise ValueError("upstream.url must be an http or https URL with a host")
        return value.rstrip("/")

    def effective_hosts(self) -> list[str]:
        """The registry names nodes route here: explicit hosts, or the one derived from the URL."""
        if self.hosts:
            return [normalize_registry_host(h) for h in self.hosts]
        return [registry_host_from_url(self.url)]


def registry_host_from_url(url: str) -> str:
    """The registry name an image reference uses for this URL (docker.io for Docker Hub)."""
    parts = urlsplit(url)
    host = parts.netloc.lower()
    default_port = {"http": ":80", "https": ":443"}.get(parts.scheme, "")
    if default_port and host.endswith(default_port):
        host = host[: -len(default_port)]
    return normalize_registry_host(host)


def normalize_registry_host(host: str) -> str:
    """Lower-case a registry name and fold Docker Hub's aliases into docker.io."""
    host = host.lower()
    return c.DOCKER_HUB_NAME if host in c.DOCKER_HUB_HOSTS else host


class Storage(Model):
    """Where the cache keeps blobs (/var/lib/registry)."""

    size: Annotated[
        str,
        Field(
            description="Capacity of the cache volume (a Kubernetes quantity, e.g. 20Gi). Can grow, never shrink.",
            pattern=QUANTITY_PATTERN,
            json_schema_extra={
                "x-kubernetes-validations": [
                    cel("isQuantity(self) && quantity(self).isGreaterThan(quantity('0'))", "storage.size must be a positive quantity"),
                    cel(
                        "quantity(self).compareTo(quantity(oldSelf)) >= 0",
                        "storage.size cannot shrink (a PersistentVolumeClaim can only grow)",
                    ),
                ]
            },
        ),
    ] = "10Gi"
    storage_class_name: Annotated[
        str | None,
        Field(
            description="StorageClass of the cache's PersistentVolumeClaim; empty uses the cluster default. Immutable.",
            max_length=253,
            json_schema_extra=immutable("storage.storageClassName"),
        ),
    ] = None
    access_modes: Annotated[
        list[AccessMode],
        Field(
            description="Access modes of the PersistentVolumeClaim. More than one replica needs ReadWriteMany (or ephemeral storage). Immutable.",
            min_length=1,
            max_length=3,
            json_schema_extra={"x-kubernetes-list-type": "set", **immutable("storage.accessModes")},
        ),
    ] = [AccessMode.READ_WRITE_ONCE]
    ephemeral: Annotated[
        bool,
        Field(
            description="Keep the cache in an emptyDir (lost when the pod moves) instead of a PersistentVolumeClaim; size becomes the emptyDir's sizeLimit."
        ),
    ] = False
    deletion_policy: Annotated[
        DeletionPolicy,
        Field(
            description="What happens to the PersistentVolumeClaim when the RegistryMirror is deleted: Delete it with the mirror, or Retain it (and its cached blobs) for a later mirror of the same name."
        ),
    ] = DeletionPolicy.DELETE


class Cache(Model):
    """Cache behaviour of distribution's proxy mode."""

    ttl: Annotated[
        str,
        Field(
            description="How long a proxied blob stays in the cache after its last fetch (a Go duration, e.g. 168h). 0 keeps blobs forever.",
            pattern=DURATION_PATTERN,
        ),
    ] = "168h"


class ResourceRequirements(Model):
    """CPU and memory for the registry container."""

    requests: Annotated[
        dict[str, Annotated[str, Field(pattern=QUANTITY_PATTERN)]],
        Field(description="Minimum resources (cpu, memory, ephemeral-storage), as quantities."),
    ] = {"cpu": "50m", "memory": "64Mi"}
    limits: Annotated[
        dict[str, Annotated[str, Field(pattern=QUANTITY_PATTERN)]],
        Field(description="Maximum resources (cpu, memory, ephemeral-storage), as quantities."),
    ] = {"memory": "512Mi"}


class Toleration(Model):
    """A toleration of the mirror's pods (same meaning as in a Pod spec)."""

    key: Annotated[str | None, Field(description="Taint key the toleration applies to; empty with operator Exists matches all keys.")] = (
        None
    )
    operator: Annotated[str, Field(description="Exists or Equal.", pattern=r"^(Exists|Equal)$")] = "Equal"
    value: Annotated[str | None, Field(description="Taint value to match when operator is Equal.")] = None
    effect: Annotated[
        str | None,
        Field(
            description="Taint effect to match: NoSchedule, PreferNoSchedule or NoExecute; empty matches all.",
            pattern=r"^(NoSchedule|PreferNoSchedule|NoExecute)$",
        ),
    ] = None
    toleration_seconds: Annotated[int | None, Field(description="For NoExecute: how long the pod stays bound after the taint appears.")] = (
        None
    )


class Proxy(Model):
    """Outbound proxy for the mirror's own requests to the upstream."""

    http_proxy: Annotated[str | None, Field(description="HTTP_PROXY for the registry container.", pattern=PROXY_URL_PATTERN)] = None
    https_proxy: Annotated[str | None, Field(description="HTTPS_PROXY for the registry container.", pattern=PROXY_URL_PATTERN)] = None
    no_proxy: Annotated[
        str | None, Field(description="NO_PROXY for the registry container: comma-separated hosts, domains and CIDRs reached directly.")
    ] = None


class ServiceTLS(Model):
    """Serve the mirror over HTTPS with a certificate from a Secret."""

    secret_name: Annotated[
        str,
        Field(
            description="A kubernetes.io/tls Secret in the operator's namespace (tls.crt, tls.key, and ca.crt if the issuer is private). Its ca.crt (or, for a self-signed certificate, tls.crt; both public) is given to the nodes so containerd trusts the mirror. Nodes connect to the ClusterIP, so the certificate must name it as an IP SAN, which is why TLS needs a fixed service.clusterIP.",
            pattern=NAME_PATTERN,
        ),
    ]


class ServiceSpec(Model):
    """The Service in front of the mirror, which is what nodes connect to."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "!has(self.tls) || has(self.clusterIP)",
                    "service.tls needs a fixed service.clusterIP: nodes connect to the IP, so the certificate must name it",
                    fieldPath=".tls",
                )
            ]
        }
    )

    port: Annotated[
        int,
        Field(
            description="Port of the Service (nodes use ClusterIP:port). 5001 is taken by the metrics port.",
            ge=1,
            le=65535,
            json_schema_extra={
                "x-kubernetes-validations": [cel("self != 5001", "service.port 5001 is reserved for the registry's metrics port")]
            },
        ),
    ] = c.REGISTRY_PORT
    cluster_ip: Annotated[
        str | None,
        Field(
            alias="clusterIP",
            description="A fixed ClusterIP from the service range, so node configuration survives a re-creation of the Service. Immutable; empty lets Kubernetes choose.",
            pattern=IP_PATTERN,
            json_schema_extra=immutable("service.clusterIP"),
        ),
    ] = None
    tls: Annotated[ServiceTLS | None, Field(description="Serve HTTPS instead of plain HTTP.")] = None

    @model_validator(mode="after")
    def _tls_needs_fixed_ip(self) -> ServiceSpec:
        if self.tls is not None and not self.cluster_ip:
            raise ValueError("service.tls needs a fixed service.clusterIP: nodes connect to the IP, so the certificate must name it")
        return self

    @field_validator("port")
    @classmethod
    def _not_the_metrics_port(cls, value: int) -> int:
        if value == c.REGISTRY_DEBUG_PORT:
            raise ValueError("service.port 5001 is reserved for the registry's metrics port")
        return value


class LabelSelectorRequirement(Model):
    """One match expression of a label selector."""

    key: Annotated[str, Field(description="Label key.", min_length=1)]
    operator: Annotated[str, Field(description="In, NotIn, Exists or DoesNotExist.", pattern=r"^(In|NotIn|Exists|DoesNotExist)$")]
    values: Annotated[list[str], Field(description="Values for In and NotIn; empty for Exists and DoesNotExist.")] = []


class LabelSelector(Model):
    """A Kubernetes label selector; empty selects every node."""

    match_labels: Annotated[dict[str, str], Field(description="Labels a node must carry, all of them.")] = {}
    match_expressions: Annotated[list[LabelSelectorRequirement], Field(description="Set-based requirements, all of which must hold.")] = []

    def matches(self, labels: dict[str, str]) -> bool:
        """Whether a set of labels satisfies this selector."""
        return selector_matches(self.match_labels, self.match_expressions, labels)


class NodeConfig(Model):
    """How nodes' container runtimes are pointed at this mirror."""

    enabled: Annotated[
        bool,
        Field(description="Write registry configuration on the selected nodes. false runs only the cache (use its endpoint yourself)."),
    ] = True
    node_selector: Annotated[LabelSelector, Field(description="Which nodes route pulls to this mirror; empty selects all nodes.")] = (
        LabelSelector()
    )
    runtimes: Annotated[
        list[Runtime],
        Field(
            description="Runtimes to configure: containerd (hosts.toml under its config_path) and crio (a registries.conf.d drop-in).",
            min_length=1,
            json_schema_extra={"x-kubernetes-list-type": "set"},
        ),
    ] = [Runtime.CONTAINERD]
    priority: Annotated[
        int,
        Field(description="Order among mirrors of the same registry host: higher is tried first; ties are broken by name.", ge=0, le=1000),
    ] = 100
    capabilities: Annotated[
        list[Capability],
        Field(
            description="What containerd may ask this mirror: pull (fetch blobs and manifests by digest) and resolve (turn a tag into a digest).",
            min_length=1,
            json_schema_extra={"x-kubernetes-list-type": "set"},
        ),
    ] = [Capability.PULL, Capability.RESOLVE]
    fallback: Annotated[
        FallbackPolicy,
        Field(
            description=(
                "AllowUpstream (default, fail-open): nodes fall back to the upstream when the mirror fails, and the agent withdraws "
                "an unreachable mirror from the node's files until it answers again. NeverContactUpstream (air-gapped, strict): "
                "nodes only ever pull through the mirror; when it is down, pulls fail."
            ),
        ),
    ] = FallbackPolicy.ALLOW_UPSTREAM


class RegistryMirrorSpec(Model):
    """Desired state of a pull-through cache for one upstream registry."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "self.replicas <= 1 || (has(self.storage) && (self.storage.ephemeral || self.storage.accessModes.exists(m, m == 'ReadWriteMany')))",
                    "more than one replica needs storage.ephemeral or the ReadWriteMany access mode",
                    fieldPath=".replicas",
                ),
                cel(
                    "!has(self.nodeConfig) || self.nodeConfig.fallback != 'NeverContactUpstream' || self.replicas >= 1",
                    "NeverContactUpstream with 0 replicas would make every pull of these hosts fail",
                    fieldPath=".replicas",
                ),
            ]
        }
    )

    upstream: Annotated[Upstream, Field(description="The registry to cache.")]
    storage: Annotated[Storage, Field(description="The cache's volume.")] = Storage()
    cache: Annotated[Cache, Field(description="Cache expiry.")] = Cache()
    replicas: Annotated[
        int, Field(description="Registry pods. 0 stops the cache (nodes fall back to the upstream under AllowUpstream).", ge=0, le=20)
    ] = 1
    image: Annotated[str, Field(description="Image of the CNCF distribution registry, pinned by default.", min_length=1)] = (
        c.DEFAULT_REGISTRY_IMAGE
    )
    resources: Annotated[ResourceRequirements, Field(description="Resources of the registry container.")] = ResourceRequirements()
    node_selector: Annotated[dict[str, str], Field(description="Node labels the mirror's own pods must be scheduled on.")] = {}
    tolerations: Annotated[list[Toleration], Field(description="Tolerations of the mirror's own pods.")] = []
    affinity: Annotated[
        dict[str, Any] | None,
        Field(
            description="Affinity of the mirror's own pods, as in a Pod spec (validated by the API server when the Deployment is applied).",
            json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
        ),
    ] = None
    priority_class_name: Annotated[str | None, Field(description="PriorityClass of the mirror's own pods.", max_length=253)] = None
    proxy: Annotated[Proxy, Field(description="Outbound HTTP(S) proxy for the mirror's requests to the upstream.")] = Proxy()
    service: Annotated[ServiceSpec, Field(description="The Service nodes connect to.")] = ServiceSpec()
    node_config: Annotated[NodeConfig, Field(description="Node-level registry configuration rolled out by the regmirror agent.")] = (
        NodeConfig()
    )

    @model_validator(mode="after")
    def _replicas_need_shared_storage(self) -> RegistryMirrorSpec:
        if self.replicas > 1 and not (self.storage.ephemeral or AccessMode.READ_WRITE_MANY in self.storage.access_modes):
            raise ValueError("replicas: more than one replica needs storage.ephemeral or the ReadWriteMany access mode")
        if self.node_config.fallback == FallbackPolicy.NEVER_CONTACT_UPSTREAM and self.replicas == 0:
            raise ValueError("replicas: NeverContactUpstream with 0 replicas would make every pull of these hosts fail")
        return self

    @field_validator("storage")
    @classmethod
    def _positive_size(cls, value: Storage) -> Storage:
        if re.fullmatch(r"0+(\.0+)?[A-Za-z]*", value.size):
            raise ValueError("storage.size must be a positive quantity")
        return value


# ---------------------------------------------------------------- status


class Condition(Model):
    """A metav1.Condition."""

    type: Annotated[
        str,
        Field(description="Condition type: Ready, Available, StorageBound, NodesConfigured, Reconciling, Stalled, UpstreamAuthenticated."),
    ]
    status: Annotated[str, Field(description="True, False or Unknown.", pattern=r"^(True|False|Unknown)$")]
    reason: Annotated[str, Field(description="A CamelCase machine-readable reason.")]
    message: Annotated[str, Field(description="A human-readable explanation.")] = ""
    observed_generation: Annotated[int | None, Field(description="The metadata.generation this condition was computed from.")] = None
    last_transition_time: Annotated[
        str, Field(description="When status last changed (RFC 3339).", json_schema_extra={"format": "date-time"})
    ]


class StorageStatus(Model):
    """What the cache's volume reports."""

    phase: Annotated[str, Field(description="PersistentVolumeClaim phase (Pending, Bound, Lost) or Ephemeral.")] = ""
    capacity: Annotated[str | None, Field(description="Capacity the volume actually has.")] = None


class NodesStatus(Model):
    """Rollout of this mirror's node configuration."""

    desired: Annotated[int, Field(description="Nodes this mirror selects.")] = 0
    updated: Annotated[int, Field(description="Selected nodes whose agent runs the current configuration.")] = 0
    ready: Annotated[int, Field(description="Selected nodes whose agent applied the current configuration and is Ready.")] = 0
    not_ready: Annotated[list[str], Field(description="A few selected nodes that are not yet configured (at most 10).")] = []


class HostRoute(Model):
    """Where this mirror stands for one registry host it serves."""

    host: Annotated[str, Field(description="Registry host, as in image references.")]
    position: Annotated[int, Field(description="1-based position of this mirror among the mirrors of this host (priority, then name).")]
    mirrors: Annotated[list[str], Field(description="The first mirrors of this host (at most 10), in the order nodes try them.")]


class RegistryMirrorStatus(Model):
    """Observed state, following metav1.Condition and kstatus conventions."""

    observed_generation: Annotated[int | None, Field(description="The metadata.generation the operator last acted on.")] = None
    phase: Annotated[str | None, Field(description="Short summary: Pending, Progressing, Ready, Degraded, Failed or Terminating.")] = None
    endpoint: Annotated[
        str | None, Field(description="ClusterIP:port that nodes use (containerd on the host cannot resolve cluster DNS).")
    ] = None
    url: Annotated[str | None, Field(description="The mirror's URL as nodes use it, e.g. http://10.96.0.20:5000.")] = None
    service_dns: Annotated[str | None, Field(alias="serviceDNS", description="In-cluster DNS name of the mirror's Service.")] = None
    replicas: Annotated[int | None, Field(description="Registry pods desired.")] = None
    ready_replicas: Annotated[int | None, Field(description="Registry pods ready.")] = None
    storage: Annotated[StorageStatus | None, Field(description="The cache volume.")] = None
    nodes: Annotated[NodesStatus | None, Field(description="Node configuration rollout.")] = None
    nodes_ratio: Annotated[str | None, Field(description="ready/desired nodes, for the printer column.")] = None
    hosts: Annotated[list[HostRoute], Field(description="Order of this mirror among the mirrors of each of its hosts.")] = []
    conditions: Annotated[
        list[Condition],
        Field(
            description="Ready and its details: Available, StorageBound, NodesConfigured, Reconciling, Stalled, and UpstreamAuthenticated when credentials are set.",
            json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
        ),
    ] = []


class RegistryMirror(Model):
    """A pull-through cache for one upstream registry, and the node configuration that uses it."""

    model_config = ConfigDict(extra="ignore")

    api_version: Annotated[str, Field(description="regmirror.dev/v1alpha1")] = c.API_VERSION
    kind: Annotated[str, Field(description="RegistryMirror")] = c.KIND
    metadata: Annotated[dict[str, Any], Field(description="Standard object metadata.")] = {}
    spec: Annotated[RegistryMirrorSpec, Field(description="Desired state.")]
    status: Annotated[RegistryMirrorStatus | None, Field(description="Observed state.")] = None

    @property
    def name(self) -> str:
        """metadata.name."""
        return str(self.metadata.get("name", ""))
