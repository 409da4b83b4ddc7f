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
from regmirror.units import quantity_bytes

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
    DOCKER = "docker"


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


S3_BUCKET_PATTERN = r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$"
S3_ROOT_PATTERN = r"^/?([A-Za-z0-9_.-]+/)*[A-Za-z0-9_.-]*$"
S3_REGION_PATTERN = r"^[a-z0-9-]{1,32}$"


class S3CredentialsSecretRef(Model):
    """An access key for the bucket, held in a Secret."""

    name: Annotated[
        str,
        Field(
            description=(
                "Name of a Secret in the operator's namespace holding the access key. The values reach the registry "
                "only through Secret-backed environment variables (REGISTRY_STORAGE_S3_ACCESSKEY and "
                "REGISTRY_STORAGE_S3_SECRETKEY); they are never copied into a ConfigMap, a log, an Event or status."
            ),
            pattern=NAME_PATTERN,
            max_length=253,
        ),
    ]
    access_key_key: Annotated[str, Field(description="Key of the access key id in the Secret.", min_length=1)] = "accessKey"
    secret_key_key: Annotated[str, Field(description="Key of the secret access key in the Secret.", min_length=1)] = "secretKey"


class S3Storage(Model):
    """An S3-compatible bucket that every replica of the mirror shares (distribution's s3 driver)."""

    endpoint: Annotated[
        str | None,
        Field(
            description=(
                "URL of the S3 API, e.g. https://minio.storage.svc:9000; http:// talks plain HTTP. Empty means AWS S3 "
                "in `region`. Reached from the mirror's pods (cluster DNS works here, unlike on the nodes)."
            ),
            pattern=URL_PATTERN,
            max_length=2048,
        ),
    ] = None
    bucket: Annotated[
        str, Field(description="Bucket name. The bucket must exist; the mirror never creates or deletes it.", pattern=S3_BUCKET_PATTERN)
    ]
    region: Annotated[
        str,
        Field(description="Region of the bucket (any value the endpoint accepts when `endpoint` is set).", pattern=S3_REGION_PATTERN),
    ] = "us-east-1"
    root_directory: Annotated[
        str | None,
        Field(
            description=(
                "Key prefix under which this mirror keeps its objects. Default: regmirror/<mirror name>, so mirrors "
                "sharing a bucket never share content paths (two upstreams may both have library/nginx)."
            ),
            pattern=S3_ROOT_PATTERN,
            max_length=512,
        ),
    ] = None
    force_path_style: Annotated[
        bool,
        Field(
            description="Address the bucket as <endpoint>/<bucket> instead of <bucket>.<endpoint> (what most self-hosted S3 servers need)."
        ),
    ] = True
    credentials_secret_ref: Annotated[
        S3CredentialsSecretRef | None,
        Field(description="Access key for the bucket. Unset: the SDK's default chain (instance role, web identity / IRSA)."),
    ] = None
    ca_secret_ref: Annotated[
        SecretKeyRef | None,
        Field(description="A Secret key holding a PEM CA bundle that signs the endpoint's certificate, added to the system roots."),
    ] = None

    def effective_root(self, mirror: str) -> str:
        """The key prefix, with the per-mirror default; always absolute (distribution's form)."""
        root = self.root_directory if self.root_directory is not None else f"regmirror/{mirror}"
        return "/" + root.strip("/")


class Storage(Model):
    """Where the cache keeps blobs: a PersistentVolumeClaim (default), an emptyDir (ephemeral) or an S3 bucket (s3)."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "!has(self.s3) || !has(self.ephemeral) || !self.ephemeral",
                    "storage: choose one back-end: s3 or ephemeral (neither means a PersistentVolumeClaim)",
                ),
                cel(
                    "!has(self.s3) || !has(self.storageClassName)",
                    "storage.storageClassName is for a PersistentVolumeClaim; with storage.s3 there is none",
                    fieldPath=".storageClassName",
                ),
            ]
        }
    )

    size: Annotated[
        str,
        Field(
            description="Capacity of the cache volume (a Kubernetes quantity, e.g. 20Gi); with s3, only sizes each pod's front store. Can grow, never shrink.",
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
            description="Access modes of the PersistentVolumeClaim (ignored with s3). More than one replica on a volume needs ReadWriteMany. Immutable.",
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
    s3: Annotated[
        S3Storage | None,
        Field(
            description=(
                "Keep the cache in an S3-compatible bucket instead of a volume: every replica serves what any replica "
                "fetched, so replicas > 1 need no ReadWriteMany volume. size then only sizes each pod's front store; the "
                "cache sidecar does not evict from a bucket (bound it with a lifecycle rule on the bucket, see "
                "docs/deploy.md), so cache.maxSize cannot be set and cache.ttl is not enforced."
            ),
        ),
    ] = None

    @model_validator(mode="after")
    def _one_back_end(self) -> Storage:
        if self.s3 is not None and self.ephemeral:
            raise ValueError("storage: choose one back-end: s3 or ephemeral (neither means a PersistentVolumeClaim)")
        if self.s3 is not None and self.storage_class_name is not None:
            raise ValueError("storage.storageClassName is for a PersistentVolumeClaim; with storage.s3 there is none")
        return self


class Cache(Model):
    """What the cache keeps, for how long, and how fresh a tag must be."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "!has(self.lowWatermarkPercent) || !has(self.highWatermarkPercent) || "
                    "self.lowWatermarkPercent < self.highWatermarkPercent",
                    "cache.lowWatermarkPercent must be below cache.highWatermarkPercent",
                    fieldPath=".lowWatermarkPercent",
                )
            ]
        }
    )

    ttl: Annotated[
        str,
        Field(
            description=(
                "Upper bound on how long an image stays cached after its last pull (a Go duration, e.g. 168h); 0 keeps "
                "images until the size cap needs their room. Images that running pods use are kept past it."
            ),
            pattern=DURATION_PATTERN,
        ),
    ] = "168h"
    max_size: Annotated[
        str | None,
        Field(
            description=(
                "Size cap of the cached content (a quantity, at most storage.size). Above highWatermarkPercent of it, the "
                "least recently pulled images that no running pod uses are evicted down to lowWatermarkPercent. "
                "Default: 90% of storage.size."
            ),
            pattern=QUANTITY_PATTERN,
        ),
    ] = None
    high_watermark_percent: Annotated[
        int, Field(description="Eviction starts when the cache holds more than this percentage of maxSize.", ge=2, le=100)
    ] = 95
    low_watermark_percent: Annotated[
        int, Field(description="Eviction stops once the cache holds at most this percentage of maxSize.", ge=1, le=99)
    ] = 85
    tag_freshness: Annotated[
        str,
        Field(
            description=(
                "How long a pulled tag is served from the cache before it is checked against the upstream again (a Go "
                "duration). 0 (default) checks on every pull; while the upstream is down or rate-limited, the cached tag "
                "is served either way. Invalidate one tag early with `regmirror cache invalidate`."
            ),
            pattern=DURATION_PATTERN,
        ),
    ] = "0"

    @model_validator(mode="after")
    def _watermarks_ordered(self) -> Cache:
        if self.low_watermark_percent >= self.high_watermark_percent:
            raise ValueError("cache.lowWatermarkPercent must be below cache.highWatermarkPercent")
        return self


IMAGE_REF_PATTERN = (
    r"^([a-z0-9]+([._-][a-z0-9]+)*(:[0-9]+)?/)?[a-z0-9]+([._-]+[a-z0-9]+)*(/[a-z0-9]+([._-]+[a-z0-9]+)*)*"
    r"(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(@sha256:[a-f0-9]{64})?$"
)
PLATFORM_PATTERN = r"^[a-z0-9]+/[a-z0-9_]+(/[a-z0-9.]+)?$"


class PrewarmImage(Model):
    """An image the mirror fetches before any node asks for it."""

    image: Annotated[
        str,
        Field(
            description=(
                "Image reference on this mirror's upstream: repository[:tag][@digest], e.g. library/nginx:1.27 or "
                "nginx@sha256:...; a leading registry host of this mirror (docker.io/...) is accepted. A tag is "
                "fetched again when it moves upstream."
            ),
            pattern=IMAGE_REF_PATTERN,
            max_length=512,
        ),
    ]
    platforms: Annotated[
        list[Annotated[str, Field(pattern=PLATFORM_PATTERN, max_length=64)]],
        Field(
            description="For a multi-platform image, the platforms to fetch (os/arch[/variant], e.g. linux/amd64); empty fetches all.",
            max_length=16,
            json_schema_extra={"x-kubernetes-list-type": "set"},
        ),
    ] = []


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

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "!has(self.runtimes) || !self.runtimes.exists(r, r == 'docker') || !has(self.fallback) "
                    "|| self.fallback != 'NeverContactUpstream'",
                    "Docker Engine always falls back to Docker Hub: the docker runtime cannot be NeverContactUpstream",
                    fieldPath=".runtimes",
                )
            ]
        }
    )

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
            description=(
                "Runtimes to configure: containerd (hosts.toml under its config_path), crio (a registries.conf.d drop-in) and "
                "docker (registry-mirrors and insecure-registries merged into /etc/docker/daemon.json; Docker Engine mirrors "
                "Docker Hub only, and always falls back to it)."
            ),
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


class NodeSettings(Model):
    """Cluster-wide registry settings of every node, declared once (operator settings), not per mirror.

    The classic Docker knobs `--add-registry` and `--block-registry`. They are
    the cluster's, not a mirror's: two mirrors could disagree, and deleting a
    mirror must not change which registries the cluster may pull from.
    """

    unqualified_search_registries: Annotated[
        list[Annotated[str, Field(pattern=HOST_PATTERN, max_length=253)]],
        Field(
            description=(
                "CRI-O nodes: the registries a short image name (`busybox`) is looked up in, in order "
                "(containers-registries.conf `unqualified-search-registries`). containerd has no such setting: a short name "
                "always means docker.io/library/<name>."
            )
        ),
    ] = []
    blocked_registries: Annotated[
        list[Annotated[str, Field(pattern=HOST_PATTERN, max_length=253)]],
        Field(
            description=(
                "Registries no node may pull from: CRI-O gets `blocked = true`, containerd a hosts.toml in which nothing may "
                "pull or resolve. A blocked registry's mirrors are not used either."
            )
        ),
    ] = []


class RegistryMirrorSpec(Model):
    """Desired state of a pull-through cache for one upstream registry."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "self.replicas <= 1 || (has(self.storage) && (has(self.storage.s3) || self.storage.ephemeral || "
                    "self.storage.accessModes.exists(m, m == 'ReadWriteMany')))",
                    "more than one replica needs storage.s3, storage.ephemeral or the ReadWriteMany access mode",
                    fieldPath=".replicas",
                ),
                cel(
                    "!has(self.cache) || !has(self.cache.maxSize) || !has(self.storage) || !has(self.storage.size) || "
                    "quantity(self.cache.maxSize).compareTo(quantity(self.storage.size)) <= 0",
                    "cache.maxSize must not exceed storage.size",
                    fieldPath=".cache.maxSize",
                ),
                cel(
                    "!has(self.storage) || !has(self.storage.s3) || !has(self.cache) || !has(self.cache.maxSize)",
                    "cache.maxSize cannot be enforced on storage.s3: the cache sidecar does not evict from a bucket; "
                    "bound the bucket with a lifecycle rule instead",
                    fieldPath=".cache.maxSize",
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
    cache: Annotated[Cache, Field(description="Size cap, eviction, expiry and tag freshness of the cache.")] = Cache()
    prewarm: Annotated[
        list[PrewarmImage],
        Field(
            description=(
                "Images the mirror fetches ahead of need and again when their tag moves, paced by the upstream's "
                "rate-limit headers so that prewarming never uses up a pull limit. Progress is in status.cache.prewarm."
            ),
            max_length=100,
        ),
    ] = []
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
        shared = self.storage.s3 is not None or self.storage.ephemeral or AccessMode.READ_WRITE_MANY in self.storage.access_modes
        if self.replicas > 1 and not shared:
            raise ValueError("replicas: more than one replica needs storage.s3, storage.ephemeral or the ReadWriteMany access mode")
        if self.storage.s3 is not None and self.cache.max_size is not None:
            raise ValueError(
                "cache.maxSize cannot be enforced on storage.s3: the cache sidecar does not evict from a bucket; "
                "bound the bucket with a lifecycle rule instead"
            )
        if self.node_config.fallback == FallbackPolicy.NEVER_CONTACT_UPSTREAM and self.replicas == 0:
            raise ValueError("replicas: NeverContactUpstream with 0 replicas would make every pull of these hosts fail")
        if self.cache.max_size is not None and quantity_bytes(self.cache.max_size) > quantity_bytes(self.storage.size):
            raise ValueError("cache.maxSize must not exceed storage.size")
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
    pulled_recently: Annotated[
        int | None,
        Field(
            description=(
                "Selected nodes seen pulling through this mirror in the last 24 h (the client addresses of manifest requests at "
                "its front, mapped to nodes). Absent while unknown (a TLS mirror has no front)."
            )
        ),
    ] = None
    not_pulled_recently: Annotated[
        list[str] | None,
        Field(
            description=(
                "A few selected nodes not seen pulling through this mirror in the last 24 h (at most 5): idle, or their runtime "
                "bypasses the mirror (their agent's preflight says which)."
            )
        ),
    ] = None


class HostRoute(Model):
    """Where this mirror stands for one registry host it serves."""

    host: Annotated[str, Field(description="Registry host, as in image references.")]
    position: Annotated[int, Field(description="1-based position of this mirror among the mirrors of this host (priority, then name).")]
    mirrors: Annotated[list[str], Field(description="All mirrors of this host, in the order nodes try them.")]


class CacheEviction(Model):
    """The cache's most recent eviction."""

    time: Annotated[str, Field(description="When it ran (RFC 3339).", json_schema_extra={"format": "date-time"})]
    reason: Annotated[str, Field(description="SizeCap (above the high watermark) or TTL (not pulled within cache.ttl).")]
    blobs: Annotated[int, Field(description="Blobs and manifests removed.")] = 0
    bytes: Annotated[int, Field(description="Bytes freed.")] = 0


class PrewarmStatus(Model):
    """Progress of spec.prewarm."""

    images: Annotated[int, Field(description="Images listed in spec.prewarm.")] = 0
    ready: Annotated[int, Field(description="Images whose current content is fully in the cache.")] = 0
    pending: Annotated[int, Field(description="Images still to fetch (or waiting for the upstream's rate limit).")] = 0
    failed: Annotated[list[str], Field(description="A few images that could not be fetched, with the reason (at most 10).")] = []


class CacheStatus(Model):
    """What the cache did: figures since the mirror's pod started, taken by the cache sidecar."""

    hits: Annotated[int, Field(description="Manifest and blob requests answered without fetching from the upstream.")] = 0
    misses: Annotated[int, Field(description="Manifest and blob requests that fetched from the upstream.")] = 0
    hit_ratio: Annotated[str | None, Field(description="hits / (hits + misses), as a decimal string such as 0.97.")] = None
    bytes_served: Annotated[int, Field(description="Bytes of manifests and blobs sent to nodes.")] = 0
    bytes_from_upstream: Annotated[int, Field(description="Bytes of manifests and blobs fetched from the upstream.")] = 0
    disk_used: Annotated[int, Field(description="Bytes of cached content on the volume.")] = 0
    disk_cap: Annotated[int, Field(description="The size cap in bytes (cache.maxSize).")] = 0
    pinned_images: Annotated[int, Field(description="Images kept because running pods use them.")] = 0
    upstream_reachable: Annotated[bool | None, Field(description="Whether the upstream answered the sidecar's last probe.")] = None
    last_eviction: Annotated[CacheEviction | None, Field(description="The most recent eviction, if any.")] = None
    prewarm: Annotated[PrewarmStatus | None, Field(description="Progress of spec.prewarm, when it lists images.")] = None
    observed_at: Annotated[
        str | None, Field(description="When these figures were taken (RFC 3339).", json_schema_extra={"format": "date-time"})
    ] = None


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
    cache: Annotated[CacheStatus | None, Field(description="What the cache saved: hits, bytes, disk, evictions, prewarm.")] = None
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
