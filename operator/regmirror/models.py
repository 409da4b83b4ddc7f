"""The RegistryMirror API: pydantic models that are the one source of the CRD schema.

Every field carries a description (it becomes `kubectl explain` text). Every
admission rule is a `Rule`: one CEL expression that the API server evaluates
(`x-kubernetes-validations`) and its Python twin that pydantic evaluates, side
by side in the same object, with the same message. Patterns and the Go
semantics behind CEL functions live in `regmirror.grammar`. So `regmirror
render -f`, the operator and the API server reach the same verdict on every
spec; a hypothesis test holds them to it against a real API server.

Only transition rules (`oldSelf`: immutable fields, a volume that cannot
shrink) have no Python twin: they need the stored object.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Self

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, core_schema

from regmirror import constants as c
from regmirror import grammar as g
from regmirror.lowlevel import selector_matches

# Re-exported: the operator, the node plan and the tests derive hosts through these.
normalize_registry_host = g.normalize_registry_host
registry_host_from_url = g.registry_host_from_url
image_registry_host = g.image_registry_host

#: Longest RegistryMirror name: children are `regmirror-<name>` (10 characters) and the generated
#: credentials Secret `regmirror-<name>-auth` (15), and a Service name has at most 63 characters.
MAX_NAME_LENGTH = 48
#: A cache TTL longer than this is certainly a typo, and near Go's duration limit (292 years)
#: distribution's expiry arithmetic would overflow.
MAX_CACHE_TTL = "87600h"


# ---------------------------------------------------------------- rules


@dataclass(frozen=True)
class Rule:
    """One admission rule: CEL for the API server, its Python twin for pydantic, one message for both.

    `holds` receives the field's value (field rules) or the model instance
    (model rules). An exception inside it counts as a failed rule, as a CEL
    evaluation error rejects the object. `holds=None` marks a transition rule.
    """

    cel: str
    message: str
    holds: Callable[[Any], bool] | None
    field_path: str | None = None
    #: Only for new input (the API server, `regmirror render`): the operator still reads an object stored
    #: before the rule existed, because it handles that case safely and reports it (folded hosts, a
    #: bootstrap condition) instead of dropping a working mirror as InvalidSpec.
    admission_only: bool = False

    def validation(self) -> dict[str, str]:
        """The `x-kubernetes-validations` entry."""
        out = {"rule": self.cel, "message": self.message}
        if self.field_path:
            out["fieldPath"] = self.field_path
        return out

    def check(self, value: Any, admission: bool = True) -> None:
        """Raise ValueError(message) when the Python twin says no (admission-only rules only for admission)."""
        if self.holds is None or (self.admission_only and not admission):
            return
        try:
            ok = self.holds(value)
        except Exception:  # the CEL twin errors too: an error rejects
            ok = False
        if not ok:
            raise ValueError(self.message)


#: Validation context key: set by admit_document (new input), absent when the operator reads stored objects.
ADMISSION = "regmirror.admission"


def is_admission(info: ValidationInfo) -> bool:
    """Whether this validation judges new input (every rule) rather than a stored object."""
    return bool(isinstance(info.context, dict) and info.context.get(ADMISSION))


@dataclass(frozen=True)
class Checked:
    """Annotated metadata: field rules, emitted into the schema and enforced after pydantic's own checks."""

    rules: tuple[Rule, ...]

    def __init__(self, *rules: Rule) -> None:
        object.__setattr__(self, "rules", rules)

    def _enforce(self, value: Any, info: ValidationInfo) -> Any:
        if value is None:  # an optional field left empty: the API server has nothing to evaluate either
            return value
        for rule in self.rules:
            rule.check(value, is_admission(info))
        return value

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        return core_schema.with_info_after_validator_function(self._enforce, handler(source))

    def __get_pydantic_json_schema__(self, schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        json_schema = handler(schema)
        json_schema.setdefault("x-kubernetes-validations", []).extend(r.validation() for r in self.rules)
        return json_schema


def immutable(what: str) -> Checked:
    """A transition rule: the field cannot change after creation."""
    return Checked(Rule("self == oldSelf", f"{what} is immutable", None))


@dataclass(frozen=True)
class SetList:
    """Annotated metadata: `x-kubernetes-list-type: set` for the API server, and the same no-duplicates rule in Python."""

    def _enforce(self, value: list[Any] | None) -> list[Any] | None:
        items = value or []
        for i, item in enumerate(items):
            if item in items[:i]:
                raise ValueError(f"duplicate value {str(item)!r}: each value may appear once")
        return value

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        return core_schema.no_info_after_validator_function(self._enforce, handler(source))

    def __get_pydantic_json_schema__(self, schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        json_schema = handler(schema)
        json_schema["x-kubernetes-list-type"] = "set"
        return json_schema


SET_LIST = SetList()


def pattern_rule(pattern: str, message: str) -> Rule:
    """A string rule from an anchored grammar pattern: CEL `matches()` (RE2) and Python's `re.fullmatch`."""
    return Rule(g.cel_matches("self", pattern), message, lambda v: g.matches(pattern, v))


def _strict_int(value: Any) -> Any:
    # The API server takes a JSON number for an integer field (1.0 too), never a string or a bool;
    # pydantic's lax int would take "1" and true.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("must be an integer")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError("must be an integer")
        return int(value)
    return value


def _strict_bool(value: Any) -> Any:
    if not isinstance(value, bool):
        raise ValueError("must be true or false")
    return value


#: An integer as the API server reads one (no "1", no true). It goes after the Field that holds
#: ge/le, so pydantic still emits them as minimum/maximum.
STRICT_INT = BeforeValidator(_strict_int)
#: A boolean as the API server reads one (no "yes", no 1).
Bool = Annotated[bool, BeforeValidator(_strict_bool)]


class Model(BaseModel):
    """Base: frozen, camelCase on the wire, unknown fields rejected, model rules in RULES."""

    model_config = ConfigDict(
        frozen=True,
        populate_by_name=True,
        alias_generator=to_camel,
        extra="forbid",
        use_enum_values=False,
        # An error never echoes the input: a URL or a Secret key could carry what should stay secret.
        hide_input_in_errors=True,
    )

    #: Rules on the whole object (cross-field); each gets a fieldPath naming the field it is about.
    RULES: ClassVar[tuple[Rule, ...]] = ()

    @model_validator(mode="after")
    def _model_rules(self, info: ValidationInfo) -> Self:
        for rule in type(self).RULES:
            rule.check(self, is_admission(info))
        return self

    @classmethod
    def __get_pydantic_json_schema__(cls, schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        json_schema = super().__get_pydantic_json_schema__(schema, handler)
        if cls.RULES:
            target = handler.resolve_ref_schema(json_schema)
            target["x-kubernetes-validations"] = [r.validation() for r in cls.RULES]
        return json_schema


# ---------------------------------------------------------------- shared field shapes

_SECRET_NAME = Checked(
    Rule(
        g.cel_dns_subdomain("self"),
        "must be a Secret name: lower-case letters, digits, '-' and '.', starting and ending with a letter or digit",
        g.is_dns_subdomain,
    )
)
_CONFIG_KEY = Checked(
    Rule(
        g.cel_config_key("self"),
        "must be a Secret key: letters, digits, '-', '_' and '.', not '.' and not starting with '..'",
        g.is_config_key,
    )
)
_LABEL_KEY = Checked(
    Rule(
        g.cel_qualified_name("self"),
        "must be a label key: an optional DNS-subdomain prefix and '/', then at most 63 letters, digits, '-', '_' or '.', "
        "starting and ending with a letter or digit",
        g.is_qualified_name,
    )
)
_LABEL_VALUE = Checked(
    Rule(
        g.cel_label_value("self"),
        "must be a label value: empty, or at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit",
        g.is_label_value,
    )
)
_LABEL_MAP_RULE = Rule(
    f"self.all(k, {g.cel_qualified_name('k')} && {g.cel_label_value('self[k]')})",
    "every key must be a label key (optional DNS-subdomain prefix and '/', then a name of at most 63 characters) "
    "and every value a label value (at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit)",
    lambda m: all(g.is_qualified_name(k) and g.is_label_value(v) for k, v in m.items()),
)
LabelKey = Annotated[str, Field(max_length=g.QUALIFIED_NAME_MAX), _LABEL_KEY]
LabelValue = Annotated[str, Field(max_length=g.LABEL_VALUE_MAX), _LABEL_VALUE]
LabelMap = Annotated[dict[str, Annotated[str, Field(max_length=g.LABEL_VALUE_MAX)]], Field(max_length=32), Checked(_LABEL_MAP_RULE)]


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


class AccessPolicy(StrEnum):
    OPEN = "Open"
    RESTRICTED = "Restricted"


class ServiceType(StrEnum):
    CLUSTER_IP = "ClusterIP"
    NODE_PORT = "NodePort"
    LOAD_BALANCER = "LoadBalancer"


class TolerationOperator(StrEnum):
    EXISTS = "Exists"
    EQUAL = "Equal"


class TaintEffect(StrEnum):
    NO_SCHEDULE = "NoSchedule"
    PREFER_NO_SCHEDULE = "PreferNoSchedule"
    NO_EXECUTE = "NoExecute"


class SelectorOperator(StrEnum):
    IN = "In"
    NOT_IN = "NotIn"
    EXISTS = "Exists"
    DOES_NOT_EXIST = "DoesNotExist"


class NodeSelectorOperator(StrEnum):
    IN = "In"
    NOT_IN = "NotIn"
    EXISTS = "Exists"
    DOES_NOT_EXIST = "DoesNotExist"
    GT = "Gt"
    LT = "Lt"


class SecretKeyRef(Model):
    """A key of a Secret in the operator's namespace."""

    name: Annotated[str, Field(description="Name of the Secret, in the operator's namespace.", max_length=253), _SECRET_NAME]
    key: Annotated[str, Field(description="Key within the Secret.", min_length=1, max_length=253), _CONFIG_KEY]


class CredentialsSecretRef(Model):
    """Basic-auth credentials for the upstream, held in a Secret."""

    name: Annotated[
        str,
        Field(
            description=(
                "Name of a Secret in the operator's namespace holding the upstream credentials. "
                "The values reach the registry container only through Secret-backed environment "
                "variables; no password, token or username is ever copied into a ConfigMap, a log, an Event or status."
            ),
            max_length=253,
        ),
        _SECRET_NAME,
    ]
    username_key: Annotated[str, Field(description="Key of the username in the Secret.", min_length=1, max_length=253), _CONFIG_KEY] = (
        "username"
    )
    password_key: Annotated[
        str, Field(description="Key of the password (or token) in the Secret.", min_length=1, max_length=253), _CONFIG_KEY
    ] = "password"


class UpstreamTLS(Model):
    """How the mirror verifies the upstream's certificate."""

    ca_secret_ref: Annotated[
        SecretKeyRef | None,
        Field(description="A Secret key holding a PEM CA bundle that signs the upstream's certificate, added to the system roots."),
    ] = None


_URL_RULE = Rule(
    f"{g.cel_matches('self', g.UPSTREAM_URL_PATTERN)} && self.split('/')[2].size() <= {g.REGISTRY_HOST_MAX}",
    "upstream.url must be http:// or https://, a host name (letters, digits, '-' and '.'; host and port at most "
    f"{g.REGISTRY_HOST_MAX} characters), an optional port 1-65535 and an optional path; no user name or password "
    "(use credentialsSecretRef), no query, no fragment, no spaces",
    lambda v: g.matches(g.UPSTREAM_URL_PATTERN, v) and len(g.url_authority(v)) <= g.REGISTRY_HOST_MAX,
)
_HOST_RULE = pattern_rule(
    g.REGISTRY_HOST_PATTERN,
    "upstream.hosts: each entry must be a registry host as image references spell it: host or host:port "
    "(letters, digits, '-' and '.'; port 1-65535), without scheme or path",
)
_DISTINCT_HOSTS_RULE = Rule(
    f"self.all(h, self.exists_one(x, {g.cel_normalized_host('x')} == {g.cel_normalized_host('h')}))",
    "upstream.hosts lists the same registry twice: names are compared case-insensitively, and registry-1.docker.io, "
    "index.docker.io and docker.io are all docker.io; a duplicate would make the node's hosts.toml invalid, and "
    "containerd would then ignore it and pull from the upstream",
    lambda hosts: len({g.normalize_registry_host(h) for h in hosts}) == len(hosts),
    admission_only=True,  # the node plan folds a stored duplicate into one entry
)


class Upstream(Model):
    """The registry this mirror caches."""

    url: Annotated[
        str,
        Field(
            description=(
                "Base URL of the upstream registry, http or https, e.g. https://registry-1.docker.io "
                "or https://quay.io. The mirror fetches from here on a cache miss. A port must be 1-65535; "
                "no user name or password (use credentialsSecretRef), query or fragment."
            ),
            max_length=2048,
        ),
        Checked(_URL_RULE),
    ]
    hosts: Annotated[
        list[Annotated[str, Field(max_length=g.REGISTRY_HOST_MAX), Checked(_HOST_RULE)]] | None,
        Field(
            description=(
                "Registry names (host or host:port, as they appear in image references) that nodes route "
                "to this mirror. Default: the URL's host, where registry-1.docker.io and index.docker.io mean docker.io. "
                "Each registry may appear once: a second spelling (case, or one of Docker Hub's aliases) is refused."
            ),
            max_length=32,
        ),
        SET_LIST,
        Checked(_DISTINCT_HOSTS_RULE),
    ] = None
    credentials_secret_ref: Annotated[
        CredentialsSecretRef | None,
        Field(description="Credentials the mirror presents to the upstream (for private registries and rate limits)."),
    ] = None
    tls: Annotated[UpstreamTLS | None, Field(description="TLS settings for the connection to the upstream.")] = None

    @field_validator("url")
    @classmethod
    def _drop_trailing_slash(cls, value: str) -> str:
        # A normalisation, not a rule (it runs after the rules): https://quay.io/ and https://quay.io are the same upstream.
        return value.rstrip("/")

    def effective_hosts(self) -> list[str]:
        """The registry names nodes route here: explicit hosts, or the one derived from the URL."""
        if self.hosts:
            return [normalize_registry_host(h) for h in self.hosts]
        return [registry_host_from_url(self.url)]


_QUANTITY_SHAPE = "digits with an optional fraction and an optional suffix: m, k, M, G, T, P, E, Ki, Mi, Gi, Ti, Pi, Ei"


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
            max_length=253,
        ),
        _SECRET_NAME,
    ]
    access_key_key: Annotated[
        str, Field(description="Key of the access key id in the Secret.", min_length=1, max_length=253), _CONFIG_KEY
    ] = "accessKey"
    secret_key_key: Annotated[
        str, Field(description="Key of the secret access key in the Secret.", min_length=1, max_length=253), _CONFIG_KEY
    ] = "secretKey"


class S3Storage(Model):
    """An S3-compatible bucket that every replica of the mirror shares (distribution's s3 driver)."""

    endpoint: Annotated[
        str | None,
        Field(
            description=(
                "URL of the S3 API, e.g. https://minio.storage.svc:9000; http:// talks plain HTTP. Empty means AWS S3 "
                "in `region`. Reached from the mirror's pods (cluster DNS works here, unlike on the nodes)."
            ),
            max_length=2048,
        ),
        Checked(
            Rule(
                _URL_RULE.cel,
                "storage.s3.endpoint must be http:// or https://, a host name, an optional port 1-65535 and an optional path; "
                "no user name or password (use credentialsSecretRef), no query, no fragment, no spaces",
                _URL_RULE.holds,
            )
        ),
    ] = None
    bucket: Annotated[
        str,
        Field(description="Bucket name. The bucket must exist; the mirror never creates or deletes it.", max_length=63),
        Checked(
            pattern_rule(
                g.S3_BUCKET_PATTERN,
                "storage.s3.bucket must be 3-63 lower-case letters, digits, '.' and '-', starting and ending with a letter or digit",
            )
        ),
    ]
    region: Annotated[
        str,
        Field(description="Region of the bucket (any value the endpoint accepts when `endpoint` is set).", max_length=32),
        Checked(pattern_rule(g.S3_REGION_PATTERN, "storage.s3.region must be lower-case letters, digits and '-', e.g. eu-west-1")),
    ] = "us-east-1"
    root_directory: Annotated[
        str | None,
        Field(
            description=(
                "Key prefix under which this mirror keeps its objects. Default: regmirror/<mirror name>, so mirrors "
                "sharing a bucket never share content paths (two upstreams may both have library/nginx)."
            ),
            max_length=512,
        ),
        Checked(pattern_rule(g.S3_ROOT_PATTERN, "storage.s3.rootDirectory must be a key prefix: letters, digits, '_', '.', '-' and '/'")),
    ] = None
    force_path_style: Annotated[
        Bool,
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

    RULES = (
        Rule(
            "!has(self.accessModes) || !self.accessModes.exists(m, m == 'ReadWriteOncePod') || self.accessModes.size() == 1",
            "storage.accessModes: ReadWriteOncePod cannot be combined with another access mode",
            lambda s: AccessMode.READ_WRITE_ONCE_POD not in s.access_modes or len(s.access_modes) == 1,
            field_path=".accessModes",
        ),
        Rule(
            "!has(self.s3) || !has(self.ephemeral) || !self.ephemeral",
            "storage: choose one back-end: s3 or ephemeral (neither means a PersistentVolumeClaim)",
            lambda s: s.s3 is None or not s.ephemeral,
        ),
        Rule(
            "!has(self.s3) || !has(self.storageClassName)",
            "storage.storageClassName is for a PersistentVolumeClaim; with storage.s3 there is none",
            lambda s: s.s3 is None or s.storage_class_name is None,
            field_path=".storageClassName",
        ),
    )

    size: Annotated[
        str,
        Field(
            description="Capacity of the cache volume (a Kubernetes quantity, e.g. 20Gi); with s3, only sizes each pod's front store. Can grow, never shrink.",
            max_length=64,
        ),
        Checked(
            Rule(
                f"{g.cel_matches('self', g.QUANTITY_PATTERN)} && quantity(self).isGreaterThan(quantity('0'))",
                f"storage.size must be a positive quantity ({_QUANTITY_SHAPE}), e.g. 20Gi",
                lambda v: (g.parse_quantity(v) or 0) > 0,
            ),
            Rule(
                "!isQuantity(self) || !isQuantity(oldSelf) || quantity(self).compareTo(quantity(oldSelf)) >= 0",
                "storage.size cannot shrink (a PersistentVolumeClaim can only grow)",
                None,
            ),
        ),
    ] = "10Gi"
    storage_class_name: Annotated[
        str | None,
        Field(
            description="StorageClass of the cache's PersistentVolumeClaim; empty uses the cluster default. Immutable.",
            max_length=253,
        ),
        Checked(
            Rule(
                f"self == '' || {g.cel_dns_subdomain('self')}",
                "storage.storageClassName must be a StorageClass name: lower-case letters, digits, '-' and '.'",
                lambda v: v == "" or g.is_dns_subdomain(v),
            )
        ),
        immutable("storage.storageClassName"),
    ] = None
    access_modes: Annotated[
        list[AccessMode],
        Field(
            description=(
                "Access modes of the PersistentVolumeClaim (ignored with s3). More than one replica on a volume needs "
                "ReadWriteMany; ReadWriteOncePod stands alone. Immutable."
            ),
            min_length=1,
            max_length=3,
        ),
        SET_LIST,
        immutable("storage.accessModes"),
    ] = [AccessMode.READ_WRITE_ONCE]
    ephemeral: Annotated[
        Bool,
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


def _ttl_within_bounds(value: str) -> bool:
    nanos = g.parse_go_duration(value)
    limit = g.parse_go_duration(MAX_CACHE_TTL)
    return g.matches(g.DURATION_PATTERN, value) and nanos is not None and limit is not None and nanos <= limit


def _go_duration(value: str) -> bool:
    return g.matches(g.DURATION_PATTERN, value) and g.parse_go_duration(value) is not None


_WATERMARKS_RULE = Rule(
    "!has(self.lowWatermarkPercent) || !has(self.highWatermarkPercent) || self.lowWatermarkPercent < self.highWatermarkPercent",
    "cache.lowWatermarkPercent must be below cache.highWatermarkPercent",
    lambda cache: cache.low_watermark_percent < cache.high_watermark_percent,
    field_path=".lowWatermarkPercent",
)


class Cache(Model):
    """What the cache keeps, for how long, and how fresh a tag must be."""

    RULES = (_WATERMARKS_RULE,)

    ttl: Annotated[
        str,
        Field(
            description=(
                "Upper bound on how long an image stays cached after its last pull (a Go duration, e.g. 168h; at most "
                f"{MAX_CACHE_TTL}); 0 keeps images until the size cap needs their room. Images that running pods use are kept past it."
            ),
            max_length=64,
        ),
        Checked(
            Rule(
                f"{g.cel_matches('self', g.DURATION_PATTERN)} && (self == '0' || duration(self) <= duration('{MAX_CACHE_TTL}'))",
                f"cache.ttl must be 0 or a Go duration of at most {MAX_CACHE_TTL}: numbers with units ns, us, ms, s, m, h (e.g. 168h, 1h30m)",
                _ttl_within_bounds,
            )
        ),
    ] = "168h"
    max_size: Annotated[
        str | None,
        Field(
            description=(
                "Size cap of the cached content (a positive quantity, at most storage.size). Above highWatermarkPercent of it, the "
                "least recently pulled images that no running pod uses are evicted down to lowWatermarkPercent. "
                "Default: 90% of storage.size."
            ),
            max_length=64,
        ),
        Checked(
            Rule(
                f"{g.cel_matches('self', g.QUANTITY_PATTERN)} && quantity(self).isGreaterThan(quantity('0'))",
                f"cache.maxSize must be a positive quantity ({_QUANTITY_SHAPE}), e.g. 18Gi",
                lambda v: (g.parse_quantity(v) or 0) > 0,
            )
        ),
    ] = None
    high_watermark_percent: Annotated[
        int, Field(description="Eviction starts when the cache holds more than this percentage of maxSize.", ge=2, le=100), STRICT_INT
    ] = 95
    low_watermark_percent: Annotated[
        int, Field(description="Eviction stops once the cache holds at most this percentage of maxSize.", ge=1, le=99), STRICT_INT
    ] = 85
    tag_freshness: Annotated[
        str,
        Field(
            description=(
                "How long a pulled tag is served from the cache before it is checked against the upstream again (a Go "
                "duration). 0 (default) checks on every pull; while the upstream is down or rate-limited, the cached tag "
                "is served either way. Invalidate one tag early with `regmirror cache invalidate`."
            ),
            max_length=64,
        ),
        Checked(
            Rule(
                f"{g.cel_matches('self', g.DURATION_PATTERN)} && (self == '0' || duration(self) >= duration('0s'))",
                "cache.tagFreshness must be 0 or a Go duration: numbers with units ns, us, ms, s, m, h (e.g. 10m, 1h30m)",
                _go_duration,
            )
        ),
    ] = "0"


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
            max_length=512,
        ),
        Checked(
            pattern_rule(
                g.PREWARM_IMAGE_PATTERN,
                "prewarm[].image must be [host[:port]/]repository[:tag][@sha256:digest] in lower case (port 1-65535), "
                "e.g. library/nginx:1.27",
            )
        ),
    ]
    platforms: Annotated[
        list[
            Annotated[
                str,
                Field(max_length=64),
                Checked(pattern_rule(g.PLATFORM_PATTERN, "prewarm[].platforms: each must be os/arch[/variant], e.g. linux/amd64")),
            ]
        ],
        Field(
            description="For a multi-platform image, the platforms to fetch (os/arch[/variant], e.g. linux/amd64); empty fetches all.",
            max_length=16,
        ),
        SET_LIST,
    ] = []


RESOURCE_NAMES = ("cpu", "memory", "ephemeral-storage")
_RESOURCE_LIST_RULE = Rule(
    f"self.all(k, k in {list(RESOURCE_NAMES)} && {g.cel_matches('self[k]', g.QUANTITY_PATTERN)})",
    f"resources: keys must be {', '.join(RESOURCE_NAMES)} and values quantities ({_QUANTITY_SHAPE}), e.g. 100m or 256Mi",
    lambda m: all(k in RESOURCE_NAMES and g.parse_quantity(v) is not None for k, v in m.items()),
)
ResourceList = Annotated[dict[str, Annotated[str, Field(max_length=64)]], Field(max_length=3), Checked(_RESOURCE_LIST_RULE)]


def _requests_within_limits(resources: ResourceRequirements) -> bool:
    for name, request in resources.requests.items():
        limit = resources.limits.get(name)
        if limit is None:
            continue
        req, lim = g.parse_quantity(request), g.parse_quantity(limit)
        if req is not None and lim is not None and req > lim:
            return False
    return True


class ResourceRequirements(Model):
    """CPU, memory and ephemeral storage for the registry container."""

    RULES = (
        Rule(
            "!has(self.requests) || !has(self.limits) || self.requests.all(k, !(k in self.limits) || !isQuantity(self.requests[k]) || !isQuantity(self.limits[k])"
            " || quantity(self.requests[k]).compareTo(quantity(self.limits[k])) <= 0)",
            "resources.requests must not exceed resources.limits for the same resource "
            "(limits default to memory: 512Mi; raise resources.limits with the request)",
            _requests_within_limits,
            field_path=".requests",
        ),
    )

    requests: Annotated[
        ResourceList,
        Field(description="Minimum resources (cpu, memory, ephemeral-storage), as quantities; none may exceed its limit."),
    ] = {"cpu": "50m", "memory": "64Mi"}
    limits: Annotated[
        ResourceList,
        Field(description="Maximum resources (cpu, memory, ephemeral-storage), as quantities. An empty map sets no limit."),
    ] = {"memory": "512Mi"}


class Toleration(Model):
    """A toleration of the mirror's pods (same meaning and rules as in a Pod spec)."""

    RULES = (
        Rule(
            "(has(self.key) && self.key != '') || self.operator == 'Exists'",
            "tolerations: operator must be Exists when key is empty (which means: tolerate every taint)",
            lambda t: bool(t.key) or t.operator == TolerationOperator.EXISTS,
            field_path=".operator",
        ),
        Rule(
            "!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')",
            "tolerations: tolerationSeconds is only allowed with effect NoExecute",
            lambda t: t.toleration_seconds is None or t.effect == TaintEffect.NO_EXECUTE,
            field_path=".tolerationSeconds",
        ),
        Rule(
            f"self.operator == 'Exists' ? (!has(self.value) || self.value == '') : (!has(self.value) || {g.cel_label_value('self.value')})",
            "tolerations: value must be empty with operator Exists, and a label value (at most 63 letters, digits, "
            "'-', '_' or '.', starting and ending with a letter or digit) with operator Equal",
            lambda t: not t.value if t.operator == TolerationOperator.EXISTS else (t.value is None or g.is_label_value(t.value)),
            field_path=".value",
        ),
    )

    key: Annotated[
        str | None,
        Field(
            description="Taint key the toleration applies to; empty with operator Exists matches all keys.", max_length=g.QUALIFIED_NAME_MAX
        ),
        Checked(
            Rule(
                f"self == '' || {g.cel_qualified_name('self')}",
                "tolerations: key must be a label key",
                lambda v: v == "" or g.is_qualified_name(v),
            )
        ),
    ] = None
    operator: Annotated[TolerationOperator, Field(description="Exists or Equal.")] = TolerationOperator.EQUAL
    value: Annotated[str | None, Field(description="Taint value to match when operator is Equal.", max_length=g.LABEL_VALUE_MAX)] = None
    effect: Annotated[
        TaintEffect | None,
        Field(description="Taint effect to match: NoSchedule, PreferNoSchedule or NoExecute; empty matches all."),
    ] = None
    toleration_seconds: Annotated[
        Annotated[int, Field(ge=0, le=2**31 - 1), STRICT_INT] | None,
        Field(description="Only with effect NoExecute: how long the pod stays bound after the taint appears."),
    ] = None


class Proxy(Model):
    """Outbound proxy for the mirror's own requests to the upstream."""

    http_proxy: Annotated[
        str | None,
        Field(
            description="HTTP_PROXY for the registry container: http(s)://host:port or socks5://host:port, without credentials.",
            max_length=2048,
        ),
        Checked(
            pattern_rule(
                g.PROXY_URL_PATTERN,
                "proxy.httpProxy must be http://, https:// or socks5:// with a host and an optional port 1-65535, nothing else (no credentials, no path)",
            )
        ),
    ] = None
    https_proxy: Annotated[
        str | None,
        Field(
            description="HTTPS_PROXY for the registry container: http(s)://host:port or socks5://host:port, without credentials.",
            max_length=2048,
        ),
        Checked(
            pattern_rule(
                g.PROXY_URL_PATTERN,
                "proxy.httpsProxy must be http://, https:// or socks5:// with a host and an optional port 1-65535, nothing else (no credentials, no path)",
            )
        ),
    ] = None
    no_proxy: Annotated[
        str | None,
        Field(
            description="NO_PROXY for the registry container: comma-separated hosts, .domains, *.domains, IPs and CIDRs reached directly.",
            max_length=2048,
        ),
        Checked(
            pattern_rule(
                g.NO_PROXY_PATTERN,
                "proxy.noProxy must be comma-separated entries, each *, a host or domain (optionally .domain or *.domain, "
                "optionally :port), an IP address or a CIDR; no other characters",
            )
        ),
    ] = None


class ServiceTLS(Model):
    """Serve the mirror over HTTPS with a certificate from a Secret."""

    secret_name: Annotated[
        str,
        Field(
            description="A kubernetes.io/tls Secret in the operator's namespace (tls.crt, tls.key, and ca.crt if the issuer is private). Its ca.crt (or, for a self-signed certificate, tls.crt; both public) is given to the nodes so containerd trusts the mirror. Nodes connect to the ClusterIP, so the certificate must name it as an IP SAN, which is why TLS needs a fixed service.clusterIP.",
            max_length=253,
        ),
        _SECRET_NAME,
    ]


def _usable_cluster_ip(value: str) -> bool:
    address = g.parse_ip(value)
    return address is not None and g.is_global_unicast(address)


def is_canonical_cidr(value: str) -> bool:
    """A CIDR as CEL's `isCIDR` reads it, with no host bits set and written as `string(cidr(x).masked())` prints it."""
    if not isinstance(value, str) or not value.isascii() or "%" in value or "/" not in value:
        return False
    address, _, bits = value.partition("/")
    if g.parse_ip(address) is None or not bits.isdigit():
        return False
    try:
        network = ipaddress.ip_network(value, strict=True)
    except ValueError:
        return False
    return str(network) == value


#: A network as a NetworkPolicy ipBlock or a Service's loadBalancerSourceRanges take it.
_CIDR_RULE = Rule(
    "isCIDR(self) && string(cidr(self).masked()) == self",
    "must be a CIDR in canonical form, e.g. 10.0.0.0/16 or fd00:10::/64: the network address (no host bits set), "
    "lower case, no leading zeros, not IPv4-mapped",
    is_canonical_cidr,
)
Cidr = Annotated[str, Field(max_length=49), Checked(_CIDR_RULE)]


class ServiceSpec(Model):
    """The Service in front of the mirror, which is what nodes connect to."""

    RULES = (
        Rule(
            "!has(self.tls) || has(self.clusterIP)",
            "service.tls needs a fixed service.clusterIP: nodes connect to the IP, so the certificate must name it",
            lambda s: s.tls is None or bool(s.cluster_ip),
            field_path=".tls",
        ),
        Rule(
            "!has(self.nodePort) || (has(self.type) && self.type != 'ClusterIP')",
            "service.nodePort needs service.type NodePort or LoadBalancer",
            lambda s: s.node_port is None or s.type != ServiceType.CLUSTER_IP,
            field_path=".nodePort",
        ),
        Rule(
            "!has(self.loadBalancerSourceRanges) || size(self.loadBalancerSourceRanges) == 0 || "
            "(has(self.type) && self.type == 'LoadBalancer')",
            "service.loadBalancerSourceRanges needs service.type LoadBalancer",
            lambda s: not s.load_balancer_source_ranges or s.type == ServiceType.LOAD_BALANCER,
            field_path=".loadBalancerSourceRanges",
        ),
    )

    port: Annotated[
        int,
        Field(description="Port of the Service (nodes use ClusterIP:port). 5001 is taken by the metrics port.", ge=1, le=65535),
        STRICT_INT,
        Checked(
            Rule(
                f"self != {c.REGISTRY_DEBUG_PORT}",
                f"service.port {c.REGISTRY_DEBUG_PORT} is reserved for the registry's metrics port",
                lambda v: v != c.REGISTRY_DEBUG_PORT,
            )
        ),
    ] = c.REGISTRY_PORT
    cluster_ip: Annotated[
        str | None,
        Field(
            alias="clusterIP",
            description=(
                "A fixed ClusterIP from the service range, so node configuration survives a re-creation of the Service. "
                "An IPv4 or IPv6 address (no leading zeros, no IPv4-mapped IPv6, not loopback, link-local, multicast or "
                "unspecified); the API server also requires it to be in the cluster's service range. Immutable; empty lets Kubernetes choose."
            ),
            max_length=45,
        ),
        Checked(
            Rule(
                "isIP(self) && ip(self).isGlobalUnicast()",
                "service.clusterIP must be a usable IPv4 or IPv6 address (e.g. 10.96.0.53 or fd00:10:96::53): no leading "
                "zeros, not IPv4-mapped, not loopback, link-local, multicast or unspecified",
                _usable_cluster_ip,
            )
        ),
        immutable("service.clusterIP"),
    ] = None
    tls: Annotated[ServiceTLS | None, Field(description="Serve HTTPS instead of plain HTTP.")] = None
    type: Annotated[
        ServiceType,
        Field(
            description=(
                "ClusterIP (default): only the cluster reaches the mirror. NodePort or LoadBalancer also expose its registry "
                "port (only that port) to hosts outside the cluster, through a second Service regmirror-<name>-ext of that "
                "type; nodes keep using the ClusterIP. A mirror with upstream credentials cannot be exposed with access.policy Open."
            )
        ),
    ] = ServiceType.CLUSTER_IP
    node_port: Annotated[
        Annotated[int, Field(ge=1, le=65535), STRICT_INT] | None,
        Field(
            description=(
                "A fixed node port for the registry port (NodePort or LoadBalancer); it must lie in the cluster's node port "
                "range (30000-32767 by default). Empty lets Kubernetes choose."
            )
        ),
    ] = None
    load_balancer_source_ranges: Annotated[
        list[Cidr],
        Field(
            description=(
                "With type LoadBalancer: the client networks the load balancer admits (CIDRs), where the cloud provider enforces "
                "them. Empty admits every address the load balancer is reachable from."
            ),
            max_length=32,
        ),
        SET_LIST,
    ] = []


_SELECTOR_VALUES_RULE = Rule(
    "self.operator in ['In', 'NotIn'] ? has(self.values) && self.values.size() > 0 : !has(self.values) || self.values.size() == 0",
    "matchExpressions: values must be non-empty with operator In or NotIn, and empty with Exists or DoesNotExist",
    lambda r: bool(r.values) if r.operator in (SelectorOperator.IN, SelectorOperator.NOT_IN) else not r.values,
    field_path=".values",
)


class LabelSelectorRequirement(Model):
    """One match expression of a label selector."""

    RULES = (_SELECTOR_VALUES_RULE,)

    key: Annotated[LabelKey, Field(description="Label key.")]
    operator: Annotated[SelectorOperator, Field(description="In, NotIn, Exists or DoesNotExist.")]
    values: Annotated[
        list[LabelValue], Field(description="Values for In and NotIn; empty for Exists and DoesNotExist.", max_length=32)
    ] = []


class LabelSelector(Model):
    """A Kubernetes label selector; empty selects everything."""

    match_labels: Annotated[LabelMap, Field(description="Labels that must all be present with these values.")] = {}
    match_expressions: Annotated[
        list[LabelSelectorRequirement], Field(description="Set-based requirements, all of which must hold.", max_length=16)
    ] = []

    def matches(self, labels: dict[str, str]) -> bool:
        """Whether a set of labels satisfies this selector."""
        return selector_matches(self.match_labels, self.match_expressions, labels)


class NodeConfig(Model):
    """How nodes' container runtimes are pointed at this mirror."""

    RULES = (
        Rule(
            "!has(self.runtimes) || !self.runtimes.exists(r, r == 'docker') || !has(self.fallback) "
            f"|| self.fallback != '{FallbackPolicy.NEVER_CONTACT_UPSTREAM}'",
            "nodeConfig.runtimes: Docker Engine always falls back to Docker Hub, so the docker runtime cannot be NeverContactUpstream",
            lambda n: Runtime.DOCKER not in n.runtimes or n.fallback != FallbackPolicy.NEVER_CONTACT_UPSTREAM,
            field_path=".runtimes",
        ),
    )

    enabled: Annotated[
        Bool,
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
            max_length=3,
        ),
        SET_LIST,
    ] = [Runtime.CONTAINERD]
    priority: Annotated[
        int,
        Field(description="Order among mirrors of the same registry host: higher is tried first; ties are broken by name.", ge=0, le=1000),
        STRICT_INT,
    ] = 100
    capabilities: Annotated[
        list[Capability],
        Field(
            description="What containerd may ask this mirror: pull (fetch blobs and manifests by digest) and resolve (turn a tag into a digest). At least one.",
            min_length=1,
            max_length=2,
        ),
        SET_LIST,
    ] = [Capability.PULL, Capability.RESOLVE]
    fallback: Annotated[
        FallbackPolicy,
        Field(
            description=(
                "AllowUpstream (default, fail-open): nodes fall back to the upstream when the mirror fails, and the agent withdraws "
                "an unreachable mirror from the node's files until it answers again. NeverContactUpstream (air-gapped, strict): "
                "nodes only ever pull through the mirror; when it is down, pulls fail. A strict mirror cannot run an image from "
                "a registry it serves (spec.image): its own pod could never be pulled again."
            ),
        ),
    ] = FallbackPolicy.ALLOW_UPSTREAM


_SETTINGS_HOST_RULE = pattern_rule(
    g.REGISTRY_HOST_PATTERN,
    "node settings: each registry must be host or host:port as image references spell it (letters, digits, '-' and '.'; port 1-65535)",
)


class NodeSettings(Model):
    """Cluster-wide registry settings of every node, declared once (operator settings), not per mirror.

    The classic Docker knobs `--add-registry` and `--block-registry`. They are
    the cluster's, not a mirror's: two mirrors could disagree, and deleting a
    mirror must not change which registries the cluster may pull from.
    """

    unqualified_search_registries: Annotated[
        list[Annotated[str, Field(max_length=g.REGISTRY_HOST_MAX), Checked(_SETTINGS_HOST_RULE)]],
        Field(
            max_length=32,
            description=(
                "CRI-O nodes: the registries a short image name (`busybox`) is looked up in, in order "
                "(containers-registries.conf `unqualified-search-registries`). containerd has no such setting: a short name "
                "always means docker.io/library/<name>."
            ),
        ),
    ] = []
    blocked_registries: Annotated[
        list[Annotated[str, Field(max_length=g.REGISTRY_HOST_MAX), Checked(_SETTINGS_HOST_RULE)]],
        Field(
            max_length=64,
            description=(
                "Registries no node may pull from: CRI-O gets `blocked = true`, containerd a hosts.toml in which nothing may "
                "pull or resolve. A blocked registry's mirrors are not used either."
            ),
        ),
    ] = []


# ---------------------------------------------------------------- affinity (as in a Pod spec, with the API server's rules)


class NodeSelectorRequirement(Model):
    """A node label requirement of a node affinity term."""

    RULES = (
        Rule(
            "self.operator in ['In', 'NotIn'] ? has(self.values) && self.values.size() > 0 : "
            "(self.operator in ['Gt', 'Lt'] ? has(self.values) && self.values.size() == 1 && "
            f"{g.cel_matches('self.values[0]', g.INT64_VALUE_PATTERN)} : !has(self.values) || self.values.size() == 0)",
            "affinity matchExpressions: values must be non-empty with In or NotIn, exactly one whole number with Gt or Lt, "
            "and empty with Exists or DoesNotExist",
            lambda r: (
                bool(r.values)
                if r.operator in (NodeSelectorOperator.IN, NodeSelectorOperator.NOT_IN)
                else (len(r.values) == 1 and g.matches(g.INT64_VALUE_PATTERN, r.values[0]))
                if r.operator in (NodeSelectorOperator.GT, NodeSelectorOperator.LT)
                else not r.values
            ),
            field_path=".values",
        ),
    )

    key: Annotated[LabelKey, Field(description="Node label key.")]
    operator: Annotated[NodeSelectorOperator, Field(description="In, NotIn, Exists, DoesNotExist, Gt or Lt.")]
    values: Annotated[
        list[LabelValue], Field(description="Values: several for In/NotIn, one number for Gt/Lt, none otherwise.", max_length=32)
    ] = []


class NodeField(StrEnum):
    METADATA_NAME = "metadata.name"


class FieldSelectorOperator(StrEnum):
    IN = "In"
    NOT_IN = "NotIn"


class NodeFieldSelectorRequirement(Model):
    """A node field requirement: metadata.name, In or NotIn, exactly one node name."""

    key: Annotated[NodeField, Field(description="The node field: metadata.name.")]
    operator: Annotated[FieldSelectorOperator, Field(description="In or NotIn.")]
    values: Annotated[
        list[
            Annotated[
                str,
                Field(max_length=253),
                Checked(Rule(g.cel_dns_subdomain("self"), "affinity matchFields: values must be node names", g.is_dns_subdomain)),
            ]
        ],
        Field(description="Exactly one node name.", min_length=1, max_length=1),
    ]


class NodeSelectorTerm(Model):
    """A node selector term: all its requirements must hold."""

    match_expressions: Annotated[list[NodeSelectorRequirement], Field(description="Requirements on node labels.", max_length=16)] = []
    match_fields: Annotated[list[NodeFieldSelectorRequirement], Field(description="Requirements on node fields.", max_length=8)] = []


class NodeSelector(Model):
    """Required node affinity: at least one term, any of which must match."""

    node_selector_terms: Annotated[list[NodeSelectorTerm], Field(description="Terms, ORed.", min_length=1, max_length=16)]


class PreferredSchedulingTerm(Model):
    """A weighted preference for nodes."""

    weight: Annotated[int, Field(description="Weight, 1-100.", ge=1, le=100), STRICT_INT]
    preference: Annotated[NodeSelectorTerm, Field(description="The nodes preferred.")]


class NodeAffinity(Model):
    """Node affinity of the mirror's pods."""

    required_during_scheduling_ignored_during_execution: Annotated[
        NodeSelector | None, Field(description="Nodes the pods must run on.")
    ] = None
    preferred_during_scheduling_ignored_during_execution: Annotated[
        list[PreferredSchedulingTerm], Field(description="Nodes the pods prefer.", max_length=16)
    ] = []


class PodAffinityTerm(Model):
    """Pods (selected by labels, in some namespaces) near which, per topology domain, the mirror's pods run or not."""

    label_selector: Annotated[LabelSelector | None, Field(description="Pods this term is about.")] = None
    namespace_selector: Annotated[LabelSelector | None, Field(description="Namespaces of those pods, by label.")] = None
    namespaces: Annotated[
        list[
            Annotated[
                str,
                Field(max_length=63),
                Checked(Rule(g.cel_dns_label("self"), "affinity namespaces: each must be a namespace name", g.is_dns_label)),
            ]
        ],
        Field(description="Namespaces of those pods, by name.", max_length=32),
    ] = []
    topology_key: Annotated[LabelKey, Field(description="Node label that defines a topology domain (e.g. kubernetes.io/hostname).")]


class WeightedPodAffinityTerm(Model):
    """A weighted pod affinity term."""

    weight: Annotated[int, Field(description="Weight, 1-100.", ge=1, le=100), STRICT_INT]
    pod_affinity_term: Annotated[PodAffinityTerm, Field(description="The term.")]


class PodAffinity(Model):
    """Pod affinity or anti-affinity of the mirror's pods."""

    required_during_scheduling_ignored_during_execution: Annotated[
        list[PodAffinityTerm], Field(description="Terms that must hold.", max_length=16)
    ] = []
    preferred_during_scheduling_ignored_during_execution: Annotated[
        list[WeightedPodAffinityTerm], Field(description="Terms preferred.", max_length=16)
    ] = []


class Affinity(Model):
    """Scheduling constraints of the mirror's pods, as in a Pod spec (matchLabelKeys and mismatchLabelKeys are not supported)."""

    node_affinity: Annotated[NodeAffinity | None, Field(description="Node affinity.")] = None
    pod_affinity: Annotated[PodAffinity | None, Field(description="Pod affinity.")] = None
    pod_anti_affinity: Annotated[PodAffinity | None, Field(description="Pod anti-affinity.")] = None

    def to_pod_spec(self) -> dict[str, Any]:
        """The affinity as a Pod spec holds it (fields left at their defaults are omitted, as the API server stores them)."""
        return self.model_dump(mode="json", by_alias=True, exclude_defaults=True)


# ---------------------------------------------------------------- access: who may pull through the mirror

#: Longest name of an access client (a DNS label): its Secret regmirror-<mirror>.client-<client> stays a DNS subdomain.
MAX_CLIENT_NAME_LENGTH = 63
#: Default rotation period of the generated credentials (nodes and clients alike).
DEFAULT_ROTATION = "720h"


class AccessClient(Model):
    """A client outside the cluster (a Docker host, a CI runner) with its own credential."""

    name: Annotated[
        str,
        Field(
            description=(
                "Name of the client (a DNS label). The operator creates the Secret regmirror-<mirror>.client-<name> in its "
                "namespace with the keys username, password and auth (base64 of username:password); "
                "`regmirror render --client` prints the configuration that reads it. Delete the Secret to revoke and reissue the credential."
            ),
            max_length=MAX_CLIENT_NAME_LENGTH,
        ),
        Checked(
            Rule(g.cel_dns_label("self"), "access.clients[].name must be a DNS label: lower-case letters, digits and '-'", g.is_dns_label)
        ),
    ]


class NetworkPolicyPeer(Model):
    """A source the mirror's NetworkPolicy admits besides the nodes and the operator."""

    RULES = (
        Rule(
            "has(self.cidr) != (has(self.namespaceSelector) || has(self.podSelector))",
            "access.networkPolicy.from[]: set either cidr, or namespaceSelector and/or podSelector",
            lambda p: (p.cidr is not None) != (p.namespace_selector is not None or p.pod_selector is not None),
        ),
    )

    cidr: Annotated[Cidr | None, Field(description="Addresses admitted (an ipBlock), e.g. 10.20.0.0/16.")] = None
    namespace_selector: Annotated[
        LabelSelector | None,
        Field(description="Namespaces whose pods are admitted (all pods there, or those podSelector picks); {} means every namespace."),
    ] = None
    pod_selector: Annotated[
        LabelSelector | None,
        Field(description="Pods admitted: in the operator's namespace, or in the namespaces namespaceSelector picks."),
    ] = None

    def to_peer(self) -> dict[str, Any]:
        """The NetworkPolicyPeer as the API server stores it."""
        if self.cidr is not None:
            return {"ipBlock": {"cidr": self.cidr}}
        peer: dict[str, Any] = {}
        if self.namespace_selector is not None:
            peer["namespaceSelector"] = self.namespace_selector.model_dump(mode="json", by_alias=True, exclude_defaults=True)
        if self.pod_selector is not None:
            peer["podSelector"] = self.pod_selector.model_dump(mode="json", by_alias=True, exclude_defaults=True)
        return peer


class NetworkPolicySpec(Model):
    """The mirror's NetworkPolicy: a second wall behind the credentials."""

    enabled: Annotated[
        Bool | None,
        Field(
            description=(
                "Render a NetworkPolicy that admits only the nodes, the operator and `from`. Default: on when the access "
                "policy is Restricted, off when it is Open. It only holds where the CNI enforces NetworkPolicies, and "
                "host-network traffic is seen differently by each CNI: see the security section of docs/deploy.md."
            )
        ),
    ] = None
    node_sources: Annotated[
        list[Cidr],
        Field(
            description=(
                "Where the nodes' own (host-network) connections to the mirror come from, as CIDRs: usually the node subnet. "
                "Empty: the nodes' InternalIP addresses, kept current by the operator. CNIs that source such traffic from "
                "a tunnel address (Calico IPIP/VXLAN, flannel) need that address range here."
            ),
            max_length=64,
        ),
        SET_LIST,
    ] = []
    from_: Annotated[
        list[NetworkPolicyPeer],
        Field(
            alias="from",
            description="More sources admitted to every port of the mirror (e.g. Prometheus for the metrics port).",
            max_length=32,
        ),
    ] = []


def _rotation_ok(value: str) -> bool:
    return _go_duration(value) and (value == "0" or (g.parse_go_duration(value) or 0) >= 3600 * 10**9)


class Access(Model):
    """Who may pull through the mirror."""

    RULES = (
        Rule(
            "!has(self.clients) || self.clients.all(c, self.clients.exists_one(x, x.name == c.name))",
            "access.clients: each name may appear once",
            lambda a: len({c.name for c in a.clients}) == len(a.clients),
            field_path=".clients",
        ),
    )

    policy: Annotated[
        AccessPolicy | None,
        Field(
            description=(
                "Open: anyone who reaches the mirror pulls through it (fine for public upstreams). Restricted: only "
                "authenticated clients (the nodes, with credentials the operator generates and rotates, and access.clients); "
                "anything else gets 401, for cached content too. Default: Restricted when upstream.credentialsSecretRef is set, "
                "else Open. status.access shows the policy in force."
            )
        ),
    ] = None
    clients: Annotated[
        list[AccessClient],
        Field(
            description="Clients outside the cluster, each with its own generated credential Secret.",
            max_length=32,
            json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
        ),
    ] = []
    rotate_every: Annotated[
        str,
        Field(
            description=(
                "How often the generated credentials of the nodes are replaced (a Go duration of at least 1h; 0 never). Old and "
                "new are both accepted until every node has the new one. Rotate at once with the annotation "
                "regmirror.dev/rotate-credentials set to any new value."
            ),
            max_length=64,
        ),
        Checked(
            Rule(
                f"{g.cel_matches('self', g.DURATION_PATTERN)} && (self == '0' || duration(self) >= duration('1h'))",
                "access.rotateEvery must be 0 or a Go duration of at least 1h (e.g. 720h)",
                _rotation_ok,
            )
        ),
    ] = DEFAULT_ROTATION
    network_policy: Annotated[NetworkPolicySpec, Field(description="The mirror's NetworkPolicy (who may connect at all).")] = (
        NetworkPolicySpec()
    )


# ---------------------------------------------------------------- the spec

_STRICT = f"has(self.nodeConfig) && self.nodeConfig.enabled && self.nodeConfig.fallback == '{FallbackPolicy.NEVER_CONTACT_UPSTREAM}'"
_EFFECTIVE_HOSTS = (
    "(has(self.upstream.hosts) && self.upstream.hosts.size() > 0 ? "
    f"self.upstream.hosts.map(h, {g.cel_normalized_host('h')}) : [{g.cel_registry_host_from_url('self.upstream.url')}])"
)
BOOTSTRAP_MESSAGE = (
    "image: this mirror is NeverContactUpstream for the registry spec.image comes from, so once nodes are strict a "
    "rescheduled or new mirror pod could never pull its own image (a bootstrap deadlock). Ways out: pin spec.image "
    "(by digest) to a copy in a registry this mirror does not serve (e.g. skopeo copy docker://docker.io/library/registry:3.0.0 "
    "docker://registry.corp.example/registry:3.0.0); pre-load the image on every node under a name no strict mirror "
    "serves; or use nodeConfig.fallback: AllowUpstream"
)


def _self_bootstrap_ok(spec: RegistryMirrorSpec) -> bool:
    strict = spec.node_config.enabled and spec.node_config.fallback == FallbackPolicy.NEVER_CONTACT_UPSTREAM
    return not strict or image_registry_host(spec.image) not in spec.upstream.effective_hosts()


def _max_size_fits(spec: RegistryMirrorSpec) -> bool:
    cap, size = spec.cache.max_size, spec.storage.size
    if cap is None:
        return True
    cap_value, size_value = g.parse_quantity(cap), g.parse_quantity(size)
    return cap_value is None or size_value is None or cap_value <= size_value


class RegistryMirrorSpec(Model):
    """Desired state of a pull-through cache for one upstream registry."""

    RULES = (
        Rule(
            "self.replicas <= 1 || (has(self.storage) && (has(self.storage.s3) || self.storage.ephemeral || "
            "self.storage.accessModes.exists(m, m == 'ReadWriteMany')))",
            "replicas: more than one replica needs storage.s3, storage.ephemeral or the ReadWriteMany access mode",
            lambda s: (
                s.replicas <= 1 or s.storage.s3 is not None or s.storage.ephemeral or AccessMode.READ_WRITE_MANY in s.storage.access_modes
            ),
            field_path=".replicas",
        ),
        Rule(
            f"!({_STRICT}) || self.replicas >= 1",
            "replicas: NeverContactUpstream with 0 replicas would make every pull of these hosts fail",
            lambda s: not (s.node_config.enabled and s.node_config.fallback == FallbackPolicy.NEVER_CONTACT_UPSTREAM) or s.replicas >= 1,
            field_path=".replicas",
        ),
        Rule(
            f"!({_STRICT}) || !({g.cel_image_registry_host('self.image')} in {_EFFECTIVE_HOSTS})",
            BOOTSTRAP_MESSAGE,
            _self_bootstrap_ok,
            field_path=".image",
            admission_only=True,  # a stored one is reported by bootstrap_conflicts as a condition
        ),
        Rule(
            "!has(self.cache) || !has(self.cache.maxSize) || !has(self.storage) || !has(self.storage.size) || "
            "!isQuantity(self.cache.maxSize) || !isQuantity(self.storage.size) || "
            "quantity(self.cache.maxSize).compareTo(quantity(self.storage.size)) <= 0",
            "cache.maxSize must not exceed storage.size",
            _max_size_fits,
            field_path=".cache.maxSize",
        ),
        Rule(
            "!(has(self.service) && has(self.service.type) && self.service.type != 'ClusterIP' && "
            "has(self.upstream.credentialsSecretRef) && has(self.access) && has(self.access.policy) && self.access.policy == 'Open')",
            "access.policy: a mirror holding upstream credentials cannot be exposed outside the cluster (service.type "
            "NodePort or LoadBalancer) with policy Open: anyone who reaches it would pull the private images; use Restricted "
            "(the default with credentials) and give outside hosts access.clients",
            lambda s: (
                not (
                    s.service.type != ServiceType.CLUSTER_IP
                    and s.upstream.credentials_secret_ref is not None
                    and s.access.policy == AccessPolicy.OPEN
                )
            ),
            field_path=".access.policy",
        ),
        Rule(
            "!has(self.storage) || !has(self.storage.s3) || !has(self.cache) || !has(self.cache.maxSize)",
            "cache.maxSize cannot be enforced on storage.s3: the cache sidecar does not evict from a bucket; "
            "bound the bucket with a lifecycle rule instead",
            lambda s: s.storage.s3 is None or s.cache.max_size is None,
            field_path=".cache.maxSize",
        ),
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
        int,
        Field(description="Registry pods. 0 stops the cache (nodes fall back to the upstream under AllowUpstream).", ge=0, le=20),
        STRICT_INT,
    ] = 1
    image: Annotated[
        str,
        Field(
            description=(
                "Image of the CNCF distribution registry, pinned by default. An image reference as kubelet parses it "
                f"([registry/]path[:tag][@digest]), at most {g.IMAGE_MAX_LENGTH} characters."
            ),
            min_length=1,
            max_length=g.IMAGE_MAX_LENGTH,
        ),
        Checked(
            Rule(
                f"{g.cel_matches('self', g.IMAGE_PATTERN)} && !{g.cel_matches('self', g.IMAGE_ID_PATTERN)}",
                "image must be an image reference kubelet can pull: [registry[:port]/]path[:tag][@sha256:digest], "
                "with a lower-case path, a port 1-65535 and no spaces",
                g.is_image_reference,
            )
        ),
    ] = c.DEFAULT_REGISTRY_IMAGE
    resources: Annotated[ResourceRequirements, Field(description="Resources of the registry container.")] = ResourceRequirements()
    node_selector: Annotated[LabelMap, Field(description="Node labels the mirror's own pods must be scheduled on.")] = {}
    tolerations: Annotated[list[Toleration], Field(description="Tolerations of the mirror's own pods.", max_length=32)] = []
    affinity: Annotated[Affinity | None, Field(description="Affinity of the mirror's own pods, as in a Pod spec.")] = None
    priority_class_name: Annotated[
        str | None,
        Field(description="PriorityClass of the mirror's own pods (the PriorityClass must exist).", max_length=253),
        Checked(
            Rule(
                g.cel_dns_subdomain("self"),
                "priorityClassName must be a PriorityClass name: lower-case letters, digits, '-' and '.'",
                g.is_dns_subdomain,
            )
        ),
    ] = None
    proxy: Annotated[Proxy, Field(description="Outbound HTTP(S) proxy for the mirror's requests to the upstream.")] = Proxy()
    service: Annotated[ServiceSpec, Field(description="The Service nodes connect to.")] = ServiceSpec()
    node_config: Annotated[NodeConfig, Field(description="Node-level registry configuration rolled out by the regmirror agent.")] = (
        NodeConfig()
    )
    access: Annotated[
        Access, Field(description="Who may pull through the mirror: the access policy, external clients, the NetworkPolicy.")
    ] = Access()

    def effective_access_policy(self) -> AccessPolicy:
        """access.policy, or its default: Restricted when the mirror holds upstream credentials, else Open."""
        if self.access.policy is not None:
            return self.access.policy
        return AccessPolicy.RESTRICTED if self.upstream.credentials_secret_ref is not None else AccessPolicy.OPEN

    def network_policy_enabled(self) -> bool:
        """access.networkPolicy.enabled, or its default: on exactly when the access policy is Restricted."""
        enabled = self.access.network_policy.enabled
        return enabled if enabled is not None else self.effective_access_policy() == AccessPolicy.RESTRICTED


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

    phase: Annotated[
        str,
        Field(
            description="PersistentVolumeClaim phase (Pending, Bound, Lost), Terminating while the claim is being deleted, Missing before it exists; Ephemeral (emptyDir) or ObjectStorage (storage.s3) without a claim."
        ),
    ] = ""
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
    mirrors: Annotated[list[str], Field(description="The first mirrors of this host (at most 10), in the order nodes try them.")]


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
    replicas: Annotated[
        int, Field(description="Ready mirror pods whose figures are summed here (each pod's counters start at its start).")
    ] = 0
    stale_replicas: Annotated[
        int,
        Field(
            description=(
                "Of those, pods whose stats endpoint did not answer the operator's last poll: their last figures are kept "
                "(0 when every pod answered)."
            )
        ),
    ] = 0


class AccessStatus(Model):
    """The access policy in force, and the generated credentials' state (never a credential)."""

    policy: Annotated[str, Field(description="Open or Restricted: the policy in force (access.policy or its default).")] = ""
    enforced: Annotated[
        bool,
        Field(
            description=(
                "Whether the mirror refuses unauthenticated pulls right now. Restricted but not yet enforced: nodes that use "
                "the mirror are still receiving their credential."
            )
        ),
    ] = False
    revision: Annotated[int, Field(description="Revision of the nodes' credential (it increases on every rotation).")] = 0
    rotating: Annotated[bool, Field(description="A rotation is rolling out: the previous credential is still accepted.")] = False
    clients: Annotated[list[str], Field(description="Names of the Secrets holding each access client's credential.")] = []
    network_policy: Annotated[bool, Field(description="Whether the mirror's NetworkPolicy is in place.")] = False
    message: Annotated[str, Field(description="What the access state means, or what it waits for.")] = ""


#: What a RegistryMirror's status reads before the operator wrote one: the CRD defaults it on every
#: read, so kstatus sees generation 1 not yet observed (in progress) instead of no status (current).
UNWRITTEN_STATUS: Mapping[str, Any] = {"observedGeneration": 0}


def status_written(status: Mapping[str, Any] | None) -> bool:
    """Whether a status holds anything written (not only defaults: the API server shows a new mirror
    `{observedGeneration: 0, conditions: [], hosts: []}`, the nested defaults included)."""
    return any(value not in (None, 0, "", [], {}) for value in (status or {}).values())


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
    access: Annotated[AccessStatus | None, Field(description="Who may pull: the policy in force and the credentials' state.")] = None
    conditions: Annotated[
        list[Condition],
        Field(
            description="Ready and its details: Available, StorageBound, NodesConfigured, Reconciling, Stalled, and UpstreamAuthenticated when credentials are set.",
            json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
        ),
    ] = []


_NAME_RULE = Rule(
    f"self.metadata.name.size() <= {MAX_NAME_LENGTH} && {g.cel_matches('self.metadata.name', g.MIRROR_NAME_PATTERN)}",
    f"metadata.name must be at most {MAX_NAME_LENGTH} lower-case letters, digits and '-', starting and ending with a letter "
    "or digit (no dots, no upper case): it names the mirror's Service, regmirror-<name>, which must be a DNS label",
    lambda name: isinstance(name, str) and len(name) <= MAX_NAME_LENGTH and g.matches(g.MIRROR_NAME_PATTERN, name),
    field_path=".metadata",
)


#: Mirror names whose children would carry the name of one of the operator's own objects.
RESERVED_NAMES = tuple(sorted(n.removeprefix("regmirror-") for n in c.OPERATOR_OWN_OBJECT_NAMES))
_RESERVED_NAME_RULE = Rule(
    f"!(self.metadata.name in {list(RESERVED_NAMES)})",
    f"metadata.name must not be one of {', '.join(RESERVED_NAMES)}: the mirror's children (regmirror-<name>) would "
    "take the name of the operator's own objects",
    lambda name: name not in RESERVED_NAMES,
    field_path=".metadata",
)


class RegistryMirror(Model):
    """A pull-through cache for one upstream registry, and the node configuration that uses it."""

    model_config = ConfigDict(extra="ignore")

    #: Rules on the whole object, at the root of the CRD's schema (only metadata.name is visible to CEL there).
    ROOT_RULES: ClassVar[tuple[Rule, ...]] = (_NAME_RULE, _RESERVED_NAME_RULE)

    api_version: Annotated[str, Field(description="regmirror.dev/v1alpha1")] = c.API_VERSION
    kind: Annotated[str, Field(description="RegistryMirror")] = c.KIND
    metadata: Annotated[dict[str, Any], Field(description="Standard object metadata.")] = {}
    spec: Annotated[RegistryMirrorSpec, Field(description="Desired state.")]
    status: Annotated[RegistryMirrorStatus | None, Field(description="Observed state.")] = None

    @property
    def name(self) -> str:
        """metadata.name."""
        return str(self.metadata.get("name", ""))


# ---------------------------------------------------------------- a whole document, as the API server admits it


class AdmissionError(ValueError):
    """A RegistryMirror document the API server would refuse; the message names the field."""


_ROOT_KEYS = frozenset({"apiVersion", "kind", "metadata", "spec", "status"})
# ObjectMeta's fields: any other key is an unknown field (kubectl's default strict field validation refuses it).
_METADATA_KEYS = frozenset(
    {
        "name",
        "generateName",
        "namespace",
        "selfLink",
        "uid",
        "resourceVersion",
        "generation",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "labels",
        "annotations",
        "ownerReferences",
        "finalizers",
        "managedFields",
    }
)
_MAX_ANNOTATIONS_BYTES = 256 * 1024


def _check_string_map(meta: Mapping[str, Any], field: str) -> dict[str, str]:
    value = meta.get(field)
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise AdmissionError(f"metadata.{field} must be a map of strings to strings")
    return value


def check_metadata(meta: Any) -> None:
    """The checks the API server makes on a RegistryMirror's metadata at creation (ObjectMeta and our name rule)."""
    if not isinstance(meta, dict):
        raise AdmissionError("metadata must be a map")
    unknown = sorted(k for k in meta if k not in _METADATA_KEYS)
    if unknown:
        raise AdmissionError(f"metadata: unknown field {unknown[0]!r}")
    name = meta.get("name")
    if not name:
        raise AdmissionError("metadata.name is required")
    try:
        for rule in RegistryMirror.ROOT_RULES:
            rule.check(name)
    except ValueError as exc:
        raise AdmissionError(str(exc)) from None
    for key, value in _check_string_map(meta, "labels").items():
        if not g.is_qualified_name(key):
            raise AdmissionError(f"metadata.labels: {key!r} is not a label key")
        if not g.is_label_value(value):
            raise AdmissionError(f"metadata.labels[{key}]: {value!r} is not a label value")
    annotations = _check_string_map(meta, "annotations")
    for key in annotations:
        if not g.is_qualified_name(g.lower_ascii(key)):
            raise AdmissionError(f"metadata.annotations: {key!r} is not a valid annotation key")
    if sum(len(k.encode()) + len(v.encode()) for k, v in annotations.items()) > _MAX_ANNOTATIONS_BYTES:
        raise AdmissionError("metadata.annotations: total size must be at most 256 KiB")


def prune_nulls(value: Any) -> Any:
    """Drop null object fields, as the API server does for fields that are not nullable (their defaults then apply).

    Nulls inside lists stay, and are refused like any value of the wrong type.
    """
    if isinstance(value, dict):
        return {k: prune_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [prune_nulls(v) for v in value]
    return value


def admit_document(doc: Any) -> RegistryMirror:
    """The RegistryMirror in one parsed YAML/JSON document, or AdmissionError/ValidationError as the API server would refuse it.

    This is what `regmirror render -f` runs: kind and apiVersion, unknown
    top-level fields, metadata (the name must fit the children's names), null
    pruning and every spec rule. `status` is ignored, as the API server ignores
    it on create (it has its own subresource).
    """
    if not isinstance(doc, dict):
        raise AdmissionError("a RegistryMirror must be a map")
    if doc.get("kind") != c.KIND:
        raise AdmissionError(f"kind: expected {c.KIND}, got {doc.get('kind')!r}")
    if doc.get("apiVersion") != c.API_VERSION:
        raise AdmissionError(f"apiVersion: expected {c.API_VERSION}, got {doc.get('apiVersion')!r}")
    unknown = sorted(str(k) for k in doc if k not in _ROOT_KEYS)
    if unknown:
        raise AdmissionError(f"unknown field {unknown[0]!r}")
    check_metadata(doc.get("metadata"))
    spec = doc.get("spec")
    if not isinstance(spec, dict):
        raise AdmissionError("spec is required and must be a map")
    return RegistryMirror.model_validate(
        {"apiVersion": c.API_VERSION, "kind": c.KIND, "metadata": doc["metadata"], "spec": prune_nulls(spec)},
        context={ADMISSION: True},
    )


def admission_verdict(doc: Any) -> str | None:
    """None when the API server would admit `doc`, else the reason (for tests and tools comparing verdicts)."""
    try:
        admit_document(doc)
    except (AdmissionError, ValidationError) as exc:
        return str(exc)
    return None


# ---------------------------------------------------------------- bootstrap dependencies between mirrors


@dataclass(frozen=True)
class BootstrapConflict:
    """A mirror whose own image comes from a registry that strict mirrors make unreachable except through them.

    When `strict_mirrors` holds the mirror itself it is a deadlock (admission
    refuses it for new specs; a spec stored before that rule can still have
    it). Otherwise the mirror's pods can only be (re)pulled while one of the
    strict mirrors serves, and two such mirrors depending on each other
    deadlock together.
    """

    mirror: str
    image: str
    host: str
    strict_mirrors: tuple[str, ...]

    #: The condition reason the operator reports it with.
    REASON: ClassVar[str] = c.REASON_IMAGE_BEHIND_STRICT_MIRROR

    @property
    def is_self(self) -> bool:
        """The mirror is itself one of the strict mirrors of its image's registry."""
        return self.mirror in self.strict_mirrors

    def message(self) -> str:
        """A condition message: what depends on what, and the way out."""
        others = ", ".join(self.strict_mirrors)
        head = (
            f"spec.image {self.image} comes from {self.host}, which NeverContactUpstream mirror(s) {others} serve: on the nodes "
            "they select, this mirror's pods can only be pulled through "
            + (
                "themselves, so a rescheduled or new pod can never start"
                if self.is_self
                else "them, so it cannot start while they are down"
            )
        )
        return (
            f"{head}. Pin spec.image (by digest) to a copy in a registry no strict mirror serves, pre-load it on every node "
            "under such a name, or use nodeConfig.fallback: AllowUpstream on the strict mirror(s)"
        )


def bootstrap_conflicts(specs: Mapping[str, RegistryMirrorSpec]) -> list[BootstrapConflict]:
    """Every mirror whose image's registry is made strict on nodes by NeverContactUpstream mirrors (pure; name-ordered).

    A host is strict on a node when any mirror of it there is
    NeverContactUpstream (nodes then never reach its upstream), so a mirror
    whose image comes from that host depends on those mirrors to be pulled.
    Node selectors are not compared: node labels can change, and a pod can be
    scheduled on any node its own selector allows.
    """
    strict_by_host: dict[str, list[str]] = {}
    for name, spec in sorted(specs.items()):
        if spec.node_config.enabled and spec.node_config.fallback == FallbackPolicy.NEVER_CONTACT_UPSTREAM:
            for host in spec.upstream.effective_hosts():
                strict_by_host.setdefault(host, []).append(name)
    conflicts = []
    for name, spec in sorted(specs.items()):
        host = image_registry_host(spec.image)
        if host in strict_by_host:
            conflicts.append(BootstrapConflict(name, spec.image, host, tuple(strict_by_host[host])))
    return conflicts


def iter_rules(model: type[BaseModel]) -> Iterable[Rule]:
    """Every Rule reachable from a model (model rules and field rules), for tests that audit them."""
    seen: set[type[BaseModel]] = set()
    stack: list[Any] = [model]
    while stack:
        item = stack.pop()
        if isinstance(item, type) and issubclass(item, BaseModel):
            if item in seen:
                continue
            seen.add(item)
            yield from getattr(item, "RULES", ())
            for field in item.model_fields.values():
                stack.append(field.annotation)
                stack.extend(field.metadata)
        elif isinstance(item, Checked):
            yield from item.rules
        else:
            stack.extend(getattr(item, "__args__", ()))
            stack.extend(getattr(item, "__metadata__", ()))
