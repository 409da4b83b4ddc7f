"""Child object names and the app.kubernetes.io/* labels: one helper for all."""

from __future__ import annotations

from regmirror import constants as c


def child_name(mirror: str) -> str:
    """Name of every namespaced child of a mirror (Deployment, Service, PVC, ConfigMap)."""
    return f"regmirror-{mirror}"


def legacy_cache_config_name(mirror: str) -> str:
    """Name of the cache sidecar's own ConfigMap in earlier versions (its keys now live in the
    mirror's one ConfigMap); the operator deletes it where one remains.

    A dot, which a mirror name (a DNS label) can never contain, kept it from
    colliding with another mirror's children.
    """
    return f"{child_name(mirror)}.cache"


def mirror_of_child_name(name: str) -> str | None:
    """The mirror a child is named after (`regmirror-<m>`, or an earlier version's `regmirror-<m>.cache`), or None."""
    prefix = child_name("")
    if not name.startswith(prefix) or len(name) == len(prefix):
        return None
    mirror = name[len(prefix) :]
    return mirror.removesuffix(".cache") or None


def credentials_secret_name(mirror: str) -> str:
    """Not used for user Secrets (those keep their own names); reserved for generated ones."""
    return f"regmirror-{mirror}-auth"


def labels(mirror: str | None = None, component: str = "mirror") -> dict[str, str]:
    """Recommended labels; `mirror` set for a mirror's children, None for cluster-wide objects."""
    out = {
        c.LABEL_NAME: c.APP_NAME,
        c.LABEL_COMPONENT: component,
        c.LABEL_PART_OF: c.APP_NAME,
        c.LABEL_MANAGED_BY: c.MANAGED_BY,
    }
    if mirror is not None:
        out[c.LABEL_INSTANCE] = mirror
        out[c.LABEL_MIRROR] = mirror
    return out


def selector_labels(mirror: str) -> dict[str, str]:
    """The stable subset of labels used in a Deployment/Service selector (immutable once set)."""
    return {c.LABEL_NAME: c.APP_NAME, c.LABEL_COMPONENT: "mirror", c.LABEL_MIRROR: mirror}


def agent_selector_labels() -> dict[str, str]:
    """Selector of the node agent's DaemonSet pods."""
    return {c.LABEL_NAME: c.APP_NAME, c.LABEL_COMPONENT: "agent"}
