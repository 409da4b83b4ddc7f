"""PURE: the native registry configuration of platforms where no DaemonSet may write node files.

`regmirror render --node-config gke|k3s|talos -f CR.yaml` prints it for the
mirrors of a file, from the same node plan the agent uses and the same host
normalisation (render/nodefiles.py's routes): each registry host gets the
same mirrors in the same order as our own hosts.toml would list them. Set
`nodeConfig.enabled: false` on those mirrors so the agent stays out of the
way, and give the platform this output.

What each platform can express, honestly:
- GKE (`gcloud container node-pools update --containerd-config-from-file`):
  `registryHosts`, one hosts.toml per entry (at most 25); per host `server`
  is the registry itself, so NeverContactUpstream cannot be expressed (after
  the mirrors containerd tries the upstream). A mirror's CA must come from
  Secret Manager (gcpSecretManagerSecretUri), and an Authorization header
  sits in the node pool's configuration, readable by whoever can read the
  cluster: for a Restricted mirror prefer node pools of your own.
- k3s / RKE2 (`/etc/rancher/k3s/registries.yaml`, `/etc/rancher/rke2/...`):
  `mirrors.<host>.endpoint` in order, `configs.<endpoint>.auth/tls`; the
  upstream is tried last unless the node runs with
  `disable-default-registry-endpoint: true` (k3s config.yaml), which is what
  a NeverContactUpstream host needs; read at start, so nodes restart k3s.
- Talos (`machine.registries` of the machine config): `mirrors.<host>.endpoints`
  in order and `skipFallback: true` for NeverContactUpstream;
  `config.<endpoint>.auth`, `tls.ca` (base64 PEM).

Credentials are never printed: where a platform needs one, the output holds
a placeholder (REGMIRROR-NODE-CREDENTIAL-OF-<mirror>) and a comment naming
the Secret key to take it from. Mirrors whose nodeSelector does not match
`node_labels` are left out (these configurations apply per node pool or
machine, not per node label).
"""

from __future__ import annotations

import base64
import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import yaml

from regmirror import constants as c
from regmirror.access import client_secret_name
from regmirror.lowlevel import registry_host_spellings
from regmirror.models import AccessPolicy, RegistryMirror
from regmirror.nodeplan import MirrorEntry, build_node_plan
from regmirror.render import nodefiles
from regmirror.render.nodeinput import RUNTIME_CONTAINERD, check_plan

PLATFORMS: Final = ("gke", "k3s", "talos")
GKE_MAX_REGISTRY_HOSTS: Final = 25


def credential_placeholder(mirror: str) -> str:
    """What stands where a platform needs a Restricted mirror's credential (base64 of user:password)."""
    return f"REGMIRROR-AUTH-OF-{mirror}"


def platform_client(mirror: RegistryMirror, name: str | None) -> str | None:
    """The access client whose credential a platform's nodes use: `name`, else the mirror's only client, else one named `nodes`."""
    clients = [c_.name for c_ in mirror.spec.access.clients]
    if name is not None:
        return name if name in clients else None
    if len(clients) == 1:
        return clients[0]
    return "nodes" if "nodes" in clients else None


@dataclass(frozen=True)
class PlatformConfig:
    """The document to give the platform, and what the reader must know about it."""

    platform: str
    document: dict[str, Any]
    notes: tuple[str, ...] = ()
    #: Registry hosts that are NeverContactUpstream but where the platform will still try the upstream.
    not_strict: tuple[str, ...] = ()

    def render(self) -> str:
        """The document as YAML, with the notes as leading comments."""
        head = "".join(f"# {line}\n" for note in self.notes for line in note.splitlines())
        return head + yaml.safe_dump(self.document, sort_keys=False, default_flow_style=False, width=4096)


@dataclass(frozen=True)
class _Route:
    host: str
    server: str
    strict: bool
    endpoints: tuple[str, ...]  # mirror URLs in try order
    mirrors: tuple[str, ...]  # their names
    ca: Mapping[str, str] = field(default_factory=dict)  # endpoint -> PEM
    capabilities: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # endpoint -> pull/resolve


def routes(entries: Sequence[MirrorEntry], node_labels: Mapping[str, str]) -> list[_Route]:
    """Per registry host, the mirrors a node with these labels uses, in order (what our hosts.toml lists)."""
    checked = check_plan(build_node_plan(list(entries)))
    out = []
    for route in nodefiles.host_routes(checked, node_labels, RUNTIME_CONTAINERD):
        if route.blocked:
            out.append(_Route(route.host, route.server, True, (), ()))
            continue
        out.append(
            _Route(
                route.host,
                route.server,
                route.strict,
                tuple(m.url for m in route.mirrors),
                tuple(m.name for m in route.mirrors),
                {m.url: m.ca_pem for m in route.mirrors if m.ca_pem},
                {m.url: tuple(m.capabilities) for m in route.mirrors},
            )
        )
    return out


def _hostport(url: str) -> str:
    return url.split("://", 1)[1]


def _tls(mirrors: Mapping[str, RegistryMirror], name: str, route: _Route, url: str) -> bool:
    mirror = mirrors.get(name)
    return url in route.ca or (mirror is not None and mirror.spec.service.tls is not None)


def _restricted(mirrors: Mapping[str, RegistryMirror], name: str) -> bool:
    mirror = mirrors.get(name)
    return mirror is not None and mirror.spec.effective_access_policy() == AccessPolicy.RESTRICTED


def _credential_note(mirrors: Mapping[str, RegistryMirror], names: Sequence[str], client: str | None, what: str) -> str:
    """Where each placeholder's value comes from: an access client's Secret (a credential that only changes when you ask)."""
    lines = [f"Restricted mirrors: replace each {credential_placeholder('<mirror>')} with {what}:"]
    for name in names:
        picked = platform_client(mirrors[name], client) if name in mirrors else None
        if picked is None:
            lines.append(
                f"  {name}: add an access client for these nodes (spec.access.clients: [{{name: nodes}}]); the operator then creates "
                f"Secret {c.DEFAULT_NAMESPACE}/{client_secret_name(name, 'nodes')}"
            )
        else:
            lines.append(
                f"  {name}: kubectl -n {c.DEFAULT_NAMESPACE} get secret {client_secret_name(name, picked)} -o jsonpath='{{.data.auth}}' | base64 -d"
            )
    lines.append("Delete that Secret to reissue the credential (then update the platform): it does not rotate on its own.")
    return "\n".join(lines)


def render_gke(
    entries: Sequence[MirrorEntry], mirrors: Mapping[str, RegistryMirror], node_labels: Mapping[str, str], client: str | None = None
) -> PlatformConfig:
    """GKE's containerd configuration (`registryHosts`) for a node pool."""
    hosts: list[dict[str, Any]] = []
    notes = ["GKE runtime configuration: gcloud container node-pools update POOL --containerd-config-from-file=THIS_FILE"]
    not_strict, needs_cred = [], []
    for route in routes(entries, node_labels):
        if route.strict:
            not_strict.append(route.host)
        items = []
        for url, name in zip(route.endpoints, route.mirrors, strict=True):
            caps = route.capabilities.get(url, ("pull", "resolve"))
            item: dict[str, Any] = {"host": url, "capabilities": [f"HOST_CAPABILITY_{cap.upper()}" for cap in caps]}
            if _tls(mirrors, name, route, url):
                item["ca"] = [{"gcpSecretManagerSecretUri": f"projects/PROJECT/secrets/regmirror-{name}-ca/versions/latest"}]
            if _restricted(mirrors, name):
                item["header"] = [{"key": "Authorization", "value": [f"Basic {credential_placeholder(name)}"]}]
                needs_cred.append(name)
            items.append(item)
        # One hosts.toml per spelling a reference may use, as the agent writes them (docker.io's three names).
        for spelling in registry_host_spellings(route.host):
            hosts.append({"server": spelling, "hosts": copy.deepcopy(items)})
    if len(hosts) > GKE_MAX_REGISTRY_HOSTS:
        notes.append(f"{len(hosts)} registry hosts: GKE accepts at most {GKE_MAX_REGISTRY_HOSTS}; split the mirrors over node pools.")
    if not_strict:
        notes.append(
            f"NeverContactUpstream cannot be expressed on GKE ({', '.join(not_strict)}): after the mirrors, containerd tries the registry itself."
        )
    if any(m.spec.service.tls for m in mirrors.values()):
        notes.append("HTTPS mirrors: store each mirror's CA (ca.crt of its TLS Secret) in Secret Manager under the name shown.")
    if needs_cred:
        notes.append(_credential_note(mirrors, sorted(set(needs_cred)), client, "the client's auth (base64 of user:password)"))
        notes.append("A header sits in the node pool's configuration, readable by whoever can read the cluster's configuration.")
    return PlatformConfig("gke", {"registryHosts": hosts}, tuple(notes), tuple(not_strict))


def render_k3s(
    entries: Sequence[MirrorEntry], mirrors: Mapping[str, RegistryMirror], node_labels: Mapping[str, str], client: str | None = None
) -> PlatformConfig:
    """k3s / RKE2 registries.yaml."""
    doc: dict[str, Any] = {"mirrors": {}, "configs": {}}
    notes = ["k3s: /etc/rancher/k3s/registries.yaml (RKE2: /etc/rancher/rke2/registries.yaml) on every node, then restart k3s/rke2."]
    strict, needs_cred = [], []
    for route in routes(entries, node_labels):
        if route.strict:
            strict.append(route.host)
        doc["mirrors"][route.host] = {"endpoint": list(route.endpoints)}
        for url, name in zip(route.endpoints, route.mirrors, strict=True):
            config: dict[str, Any] = {}
            if _restricted(mirrors, name):
                config["auth"] = {"auth": credential_placeholder(name)}
                needs_cred.append(name)
            if _tls(mirrors, name, route, url):
                config["tls"] = {"ca_file": f"/etc/rancher/regmirror/{name}-ca.crt"}
            if config:
                doc["configs"][_hostport(url)] = config
    if not doc["configs"]:
        del doc["configs"]
    if strict:
        notes.append(
            f"NeverContactUpstream ({', '.join(strict)}): k3s tries the upstream after the mirrors unless every node runs with "
            "disable-default-registry-endpoint: true in /etc/rancher/k3s/config.yaml (which applies to every registry host)."
        )
    if any(m.spec.service.tls for m in mirrors.values()):
        notes.append("HTTPS mirrors: put each mirror's CA (ca.crt of its TLS Secret) at the ca_file path shown.")
    if needs_cred:
        notes.append(_credential_note(mirrors, sorted(set(needs_cred)), client, "the client's auth (base64 of user:password)"))
    return PlatformConfig("k3s", doc, tuple(notes), ())


def render_talos(
    entries: Sequence[MirrorEntry], mirrors: Mapping[str, RegistryMirror], node_labels: Mapping[str, str], client: str | None = None
) -> PlatformConfig:
    """A Talos machine config patch (machine.registries)."""
    registries: dict[str, Any] = {"mirrors": {}, "config": {}}
    notes = ["Talos machine config patch: talosctl patch machineconfig --patch @THIS_FILE (applies without a reboot)."]
    needs_cred: list[str] = []
    needs_ca: list[str] = []
    for route in routes(entries, node_labels):
        entry: dict[str, Any] = {"endpoints": list(route.endpoints)}
        if route.strict:
            entry["skipFallback"] = True
        registries["mirrors"][route.host] = entry
        for url, name in zip(route.endpoints, route.mirrors, strict=True):
            config: dict[str, Any] = {}
            if _restricted(mirrors, name):
                config["auth"] = {"auth": credential_placeholder(name)}
                needs_cred.append(name)
            if url in route.ca:
                config["tls"] = {"ca": base64.b64encode(route.ca[url].encode()).decode()}
            elif _tls(mirrors, name, route, url):
                config["tls"] = {"ca": f"REGMIRROR-CA-OF-{name}"}
                needs_ca.append(name)
            if config:
                registries["config"][_hostport(url)] = config
    if not registries["config"]:
        del registries["config"]
    if needs_ca:
        notes.append(
            f"HTTPS mirrors ({', '.join(sorted(set(needs_ca)))}): replace REGMIRROR-CA-OF-<mirror> with the base64 of ca.crt "
            "(or tls.crt) of the mirror's TLS Secret (public)."
        )
    if needs_cred:
        notes.append(_credential_note(mirrors, sorted(set(needs_cred)), client, "the client's auth (base64 of user:password)"))
    return PlatformConfig("talos", {"machine": {"registries": registries}}, tuple(notes), ())


RENDERERS: Final = {"gke": render_gke, "k3s": render_k3s, "talos": render_talos}
