"""Pure renderers: a spec or a node plan in, plain Kubernetes objects (dicts) out.

No kopf, no kubernetes client, no I/O: reconcile applies what these return.
"""

from regmirror.render.agent import agent_args, render_agent_daemonset, render_node_config_map
from regmirror.render.mirror import (
    config_hash,
    owner_reference,
    render_config_map,
    render_deployment,
    render_mirror_children,
    render_pvc,
    render_registry_config,
    render_service,
)

__all__ = [
    "agent_args",
    "config_hash",
    "owner_reference",
    "render_agent_daemonset",
    "render_config_map",
    "render_deployment",
    "render_mirror_children",
    "render_node_config_map",
    "render_pvc",
    "render_registry_config",
    "render_service",
]
