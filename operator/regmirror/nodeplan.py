"""The node plan: what the operator tells every agent, aggregated over all mirrors.

The operator renders one NodePlan (JSON, in the `regmirror-node-config`
ConfigMap) from every RegistryMirror and its Service. Each agent renders its
node's files from the plan with `regmirror.render.nodefiles`, keeping only the
mirrors whose node selector matches its node and, under AllowUpstream, that
answer their health probe. Keeping per-node filtering and health in the agent
is what lets one ConfigMap serve every node and lets a node withdraw a dead
mirror without waiting for the operator.
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import Field

from regmirror.lowlevel import canonical_registry_host, default_registry_server
from regmirror.lowlevel import mirror_order_key as mirror_order_key  # the operator's name for it; defined there for the agent
from regmirror.models import (
    AccessPolicy,
    Capability,
    FallbackPolicy,
    LabelSelector,
    Model,
    NodeSettings,
    RegistryMirrorSpec,
    Runtime,
    registry_host_from_url,
)


class MirrorEntry(Model):
    """One mirror as nodes see it."""

    name: Annotated[str, Field(description="RegistryMirror name.")]
    hosts: Annotated[list[str], Field(description="Registry hosts routed to this mirror.")]
    servers: Annotated[dict[str, str], Field(description="For each host, the real registry behind it (containerd's `server`).")]
    url: Annotated[str, Field(description="The mirror's URL as nodes reach it: http(s)://<clusterIP>:<port>.")]
    priority: Annotated[int, Field(description="Higher first; ties by name.")]
    capabilities: Annotated[list[Capability], Field(description="containerd host capabilities.")]
    fallback: Annotated[FallbackPolicy, Field(description="Whether nodes may reach the upstream.")]
    runtimes: Annotated[list[Runtime], Field(description="Runtimes to configure.")]
    node_selector: Annotated[LabelSelector, Field(description="Nodes this mirror applies to.")] = LabelSelector()
    ca_pem: Annotated[str | None, Field(description="PEM CA of the mirror's TLS certificate (public).")] = None
    auth_revision: Annotated[
        int | None,
        Field(
            description=(
                "Revision of the credential nodes send to this mirror (the value is in the agent's Secret "
                "regmirror-agent-credentials, never in the plan). None: no credential."
            )
        ),
    ] = None
    auth_required: Annotated[
        bool,
        Field(
            description=(
                "The mirror is Restricted: a node that cannot send the credential gets 401, so the node is not ready for it "
                "until it can. False (Open): the credential is carried where the runtime can, so a switch to Restricted "
                "needs no rollout, but a node that cannot carry it is still served."
            )
        ),
    ] = False
    upstream_host: Annotated[
        str | None,
        Field(
            description=(
                "The registry host this mirror's upstream URL names: its `servers` entry for that host is the host's "
                "real registry, which every mirror of the host falls back to. Other hosts fall back to their default registry."
            )
        ),
    ] = None
    service: Annotated[
        str | None,
        Field(
            description=(
                "The mirror's Service as `<namespace>/<name>`: agents watch its EndpointSlices, so a mirror whose pods are all "
                "gone or unready is withdrawn at once (AllowUpstream) instead of after failed probes."
            )
        ),
    ] = None


class NodePlan(Model):
    """Every mirror nodes should use, in the order they are tried."""

    mirrors: Annotated[list[MirrorEntry], Field(description="Mirrors, ordered by priority (highest first), then name.")] = []
    settings: Annotated[NodeSettings, Field(description="Cluster-wide node settings (short-name search order, blocked registries).")] = (
        NodeSettings()
    )

    def to_json(self) -> str:
        """Canonical JSON (stable key order), so equal plans hash equally.

        Default settings are left out, so a cluster that sets none keeps the
        plan (and its digest) it had before settings existed.
        """
        data = self.model_dump(mode="json", by_alias=True)
        if self.settings == NodeSettings():
            del data["settings"]
        return json.dumps(data, sort_keys=True, separators=(",", ":"))

    def digest(self) -> str:
        """Short hash of the plan: it goes on the agent's pod template to roll changes out."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    @classmethod
    def from_json(cls, text: str) -> NodePlan:
        """Parse the ConfigMap's JSON."""
        return cls.model_validate_json(text)


def _canonical(host: str) -> str:
    """The host's canonical spelling, or the host itself when it is not one (the agent rejects and reports it)."""
    try:
        return canonical_registry_host(host)
    except ValueError:
        return host


def upstream_host(spec: RegistryMirrorSpec) -> str:
    """The registry host the upstream URL names (docker.io for https://registry-1.docker.io)."""
    return _canonical(registry_host_from_url(spec.upstream.url))


def upstream_server(host: str, spec: RegistryMirrorSpec) -> str:
    """The real registry behind a host, which containerd falls back to.

    The host the upstream URL itself names goes to that URL (so
    https://registry-1.docker.io serves docker.io); any other host routed here
    falls back to its own registry, as it would without a mirror.
    """
    if _canonical(host) == upstream_host(spec):
        parts = urlsplit(spec.upstream.url)
        return f"{parts.scheme}://{parts.netloc}".lower()
    return default_registry_server(_canonical(host))


def entry_hosts(spec: RegistryMirrorSpec) -> list[str]:
    """The mirror's hosts, each once, in their canonical spelling, in the order given.

    `registry-1.docker.io`, `index.docker.io`, `docker.io` and `DOCKER.IO` are one
    registry: listed together they must give one route, not four (a host
    listed twice once made hosts.toml declare one table twice, which
    containerd refuses, falling back to the upstream).
    """
    return list(dict.fromkeys(_canonical(h) for h in spec.upstream.effective_hosts()))


def mirror_entry(
    name: str,
    spec: RegistryMirrorSpec,
    cluster_ip: str,
    ca_pem: str | None = None,
    service: str | None = None,
    auth_revision: int | None = None,
) -> MirrorEntry:
    """A mirror's entry in the node plan, once its Service has a ClusterIP.

    `service` (`<namespace>/<name>` of the mirror's Service,
    `naming.child_name(name)` in the operator's namespace) lets agents watch
    its EndpointSlices. `auth_revision` is regmirror/access.py's
    `plan_revision`: the credential the node must send (never its value);
    the entry says whether the mirror (Restricted) refuses requests without it.
    """
    scheme = "https" if spec.service.tls else "http"
    host = f"[{cluster_ip}]" if ":" in cluster_ip else cluster_ip
    hosts = entry_hosts(spec)
    return MirrorEntry(
        name=name,
        hosts=hosts,
        servers={h: upstream_server(h, spec) for h in hosts},
        url=f"{scheme}://{host}:{spec.service.port}",
        priority=spec.node_config.priority,
        capabilities=list(spec.node_config.capabilities),
        fallback=spec.node_config.fallback,
        runtimes=list(spec.node_config.runtimes),
        node_selector=spec.node_config.node_selector,
        ca_pem=ca_pem,
        auth_revision=auth_revision,
        auth_required=auth_revision is not None and spec.effective_access_policy() == AccessPolicy.RESTRICTED,
        upstream_host=upstream_host(spec),
        service=service,
    )


def build_node_plan(entries: list[MirrorEntry], settings: NodeSettings | None = None) -> NodePlan:
    """Aggregate entries into the plan, in the deterministic order nodes use, with the cluster's node settings."""
    return NodePlan(mirrors=sorted(entries, key=lambda e: mirror_order_key(e.priority, e.name)), settings=settings or NodeSettings())
