"""Names that the API, the operator, the agent and the manifests share.

Each one is defined once here so that a rename cannot leave a stale copy behind.
"""

from typing import Final

GROUP: Final = "regmirror.dev"
VERSION: Final = "v1alpha1"
API_VERSION: Final = f"{GROUP}/{VERSION}"
KIND: Final = "RegistryMirror"
PLURAL: Final = "registrymirrors"
SINGULAR: Final = "registrymirror"
SHORT_NAMES: Final = ("rmir",)
CATEGORIES: Final = ("regmirror",)
CRD_NAME: Final = f"{PLURAL}.{GROUP}"

# Server-side apply field manager: one fixed name so repeated applies are
# idempotent and other managers (kubectl, Argo CD, Flux) see who owns what.
FIELD_MANAGER: Final = "regmirror-operator"

# Kopf's finalizer and annotation prefix are ours, not kopf.zalando.org.
FINALIZER: Final = f"{GROUP}/node-cleanup"
# On a RegistryMirror: tags its cache must check again (`regmirror cache invalidate`, cache/cli.py); copied into its ConfigMap.
ANNOTATION_INVALIDATE: Final = f"{GROUP}/invalidate"
ANNOTATION_PREFIX: Final = GROUP

# The operator and the mirrors run in a namespace at Pod Security level
# `restricted`; the node agent needs hostPath volumes, which only the
# `privileged` level admits, so it gets a namespace of its own.
DEFAULT_NAMESPACE: Final = "regmirror-system"
AGENT_NAMESPACE: Final = "regmirror-node"

# Pinned default image of the CNCF distribution registry in proxy mode.
DEFAULT_REGISTRY_IMAGE: Final = "docker.io/library/registry:3.0.0"
DEFAULT_OPERATOR_IMAGE: Final = "ghcr.io/regmirror/regmirror:0.1.0"
REGISTRY_PORT: Final = 5000
REGISTRY_DEBUG_PORT: Final = 5001
REGISTRY_STORAGE_PATH: Final = "/var/lib/registry"

# Docker Hub: the registry name users write versus the host that serves it.
DOCKER_HUB_NAME: Final = "docker.io"
DOCKER_HUB_HOSTS: Final = frozenset({"registry-1.docker.io", "index.docker.io", "docker.io"})
DOCKER_HUB_SERVER: Final = "https://registry-1.docker.io"

# Labels and annotations.
LABEL_NAME: Final = "app.kubernetes.io/name"
LABEL_INSTANCE: Final = "app.kubernetes.io/instance"
LABEL_COMPONENT: Final = "app.kubernetes.io/component"
LABEL_PART_OF: Final = "app.kubernetes.io/part-of"
LABEL_MANAGED_BY: Final = "app.kubernetes.io/managed-by"
LABEL_MIRROR: Final = f"{GROUP}/mirror"
APP_NAME: Final = "regmirror"
MANAGED_BY: Final = "regmirror-operator"
ANNOTATION_CONFIG_HASH: Final = f"{GROUP}/config-hash"
ANNOTATION_CREDENTIALS_HASH: Final = f"{GROUP}/credentials-hash"
ANNOTATION_NODE_CONFIG_HASH: Final = f"{GROUP}/node-config-hash"

# ClusterIP that `regmirror render` assumes offline for a mirror without a fixed one.
RENDER_CLUSTER_IP: Final = "10.96.0.10"

# The cluster-wide node agent.
AGENT_NAME: Final = "regmirror-agent"
# The agent's /healthz, /readyz and /report. With hostNetwork (the connection guard) it is a port of the
# node: one no common node daemon uses (kubelet and kube-proxy 10248-10259, CSI probes 9808, node-exporter 9100).
AGENT_HEALTH_PORT: Final = 10273
NODE_CONFIG_NAME: Final = "regmirror-node-config"
NODE_CONFIG_KEY: Final = "mirrors.json"
# Recent plans' per-mirror entry digests, so a restarted operator still knows
# which mirrors an agent pod carrying an older plan digest has applied.
NODE_CONFIG_HISTORY_KEY: Final = "history.json"
CONTAINERD_CONFIG_PATH: Final = "/etc/containerd/certs.d"
CRIO_DROPIN_DIR: Final = "/etc/containers/registries.conf.d"
CRIO_DROPIN_FILE: Final = "50-regmirror.conf"
# Every file the agent writes starts with this line; files without it are
# foreign and never changed or removed.
OWNERSHIP_MARKER: Final = "# managed-by: regmirror-agent (do not edit; changes are overwritten)"

# Condition reason for a mirror whose own image comes from a registry that NeverContactUpstream
# mirrors make strict on nodes (see models.bootstrap_conflicts).
REASON_IMAGE_BEHIND_STRICT_MIRROR: Final = "ImageBehindStrictMirror"

# Names of the operator's own namespaced objects (manifests/ and the agent's). A mirror's children
# are named `regmirror-<mirror>`, so a mirror may not be named after one of these: its Deployment
# or Service would be the operator's own (a unit test keeps this list in sync with manifests/).
OPERATOR_OWN_OBJECT_NAMES: Final = (
    "regmirror-operator",
    "regmirror-operator-metrics",
    "regmirror-operator-events",
    AGENT_NAME,
    "regmirror-agent-events",
    NODE_CONFIG_NAME,
    "regmirror-dashboard",
)
