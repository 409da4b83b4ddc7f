"""PURE: what a host outside the cluster needs to pull through a mirror (`regmirror render --client`).

The output is a POSIX shell script, not a credential: the script reads the
client's credential from its Secret (`kubectl get secret ... | base64 -d`)
when it runs, on the host it configures, so the value never passes through
this command, a terminal scrollback or a CI log that prints the command's
output. Every file is rendered by the same code that writes the nodes' files
(render/nodefiles.py for hosts.toml and the registries.conf drop-in,
render/nodeauth.py for the header), so an outside host routes each registry
host exactly as a node does: same mirrors, same order, strict stays strict
(where the client can express it: Docker cannot, see below).

- containerd (ctr, nerdctl, a kubelet elsewhere): hosts.toml per registry host
  under /etc/containerd/certs.d, the Authorization header in it, mode 0600.
- podman (and anything on containers/image: skopeo, buildah, CRI-O): a
  registries.conf.d drop-in; the credential goes where containers/image looks
  it up for the mirror's host:port, with `podman login`.
- docker: dockerd's `registry-mirrors` only ever mirrors Docker Hub, always
  falls back to it, and sends the Docker Hub credentials (never the
  mirror's) to a mirror; a URL with a user name is refused. So an Open
  Docker Hub mirror is a `registry-mirrors` entry, and otherwise the host logs
  in to the mirror by its own name and pulls `<endpoint>/<repository>`.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

from regmirror import constants as c
from regmirror.access import client_secret_name
from regmirror.lowlevel import DOCKER_HUB, parse_endpoint
from regmirror.models import AccessPolicy, LabelSelector, RegistryMirror, ServiceType
from regmirror.naming import child_name
from regmirror.nodeplan import build_node_plan, mirror_entry
from regmirror.render import nodeauth, nodefiles
from regmirror.render.mirror import external_service_name
from regmirror.render.nodeinput import RUNTIME_CONTAINERD, RUNTIME_CRIO, check_plan

KINDS: Final = ("containerd", "podman", "docker")
# Stand-ins while rendering, replaced by shell variables in the script (TEST-NET-1, RFC 5737).
_ENDPOINT_SENTINEL: Final = "192.0.2.123:65001"
_AUTH_SENTINEL: Final = "Basic UkVHTUlSUk9SLUFVVEgtU0VOVElORUw="
CONTAINERD_CERTS: Final = "/etc/containerd/certs.d"
CONTAINERS_DROPINS: Final = "/etc/containers/registries.conf.d"
DOCKER_DAEMON_JSON: Final = "/etc/docker/daemon.json"
HEADER_LINE: Final = "# Written by `regmirror render --client`; re-run it to update (the credential is read from its Secret)."


class ClientError(ValueError):
    """The mirror cannot be used by this client as asked (the message says what to change)."""


@dataclass(frozen=True)
class ClientFile:
    """A file the script writes under $ROOT; ${ENDPOINT} and ${AUTH} are expanded when it runs."""

    path: str
    content: str
    private: bool = False
    #: Only written when absent (someone else's file, such as daemon.json): otherwise written beside it as `<path>.regmirror`.
    keep_existing: bool = False


@dataclass(frozen=True)
class ClientConfig:
    """Everything the script does, in order."""

    kind: str
    mirror: str
    variables: tuple[tuple[str, str], ...]  # shell name -> shell expression
    files: tuple[ClientFile, ...]
    commands: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default_factory=tuple)


def _kubectl(namespace: str, *args: str) -> str:
    return "kubectl -n " + shlex.quote(namespace) + " " + " ".join(shlex.quote(a) for a in args)


def endpoint_expression(mirror: RegistryMirror, namespace: str) -> tuple[str, str]:
    """(shell expression of host:port, a note on where it comes from) for the mirror's Service as outside hosts reach it."""
    svc = mirror.spec.service
    port = svc.port
    if svc.type == ServiceType.LOAD_BALANCER:
        lb = _kubectl(
            namespace,
            "get",
            "service",
            external_service_name(mirror.name),
            "-o",
            "jsonpath={.status.loadBalancer.ingress[0].ip}{.status.loadBalancer.ingress[0].hostname}",
        )
        return f'"$({lb}):{port}"', f"the load balancer of Service {external_service_name(mirror.name)}"
    if svc.type == ServiceType.NODE_PORT:
        node_port = _kubectl(namespace, "get", "service", external_service_name(mirror.name), "-o", "jsonpath={.spec.ports[0].nodePort}")
        node_ip = "kubectl get nodes -o " + shlex.quote('jsonpath={.items[0].status.addresses[?(@.type=="InternalIP")].address}')
        return f'"$({node_ip}):$({node_port})"', f"the node port of Service {external_service_name(mirror.name)} on a node's address"
    cluster_ip = _kubectl(namespace, "get", "service", child_name(mirror.name), "-o", "jsonpath={.spec.clusterIP}")
    return (
        f'"$({cluster_ip}):{port}"',
        "the mirror's ClusterIP: only hosts that route the cluster's service network reach it (set spec.service.type to expose it)",
    )


def _credential_source(mirror: RegistryMirror, client: str | None) -> str | None:
    """The access client whose Secret the script reads, or None when the mirror is Open and none was asked for."""
    names = [c_.name for c_ in mirror.spec.access.clients]
    if client is not None:
        if client not in names:
            raise ClientError(f"mirror {mirror.name} has no access client {client!r} (spec.access.clients: {', '.join(names) or 'none'})")
        return client
    if mirror.spec.effective_access_policy() == AccessPolicy.OPEN:
        return None
    if len(names) == 1:
        return names[0]
    if not names:
        raise ClientError(
            f"mirror {mirror.name} is Restricted and has no access client: add one to spec.access.clients "
            "(the operator then creates its credential Secret)"
        )
    raise ClientError(f"mirror {mirror.name} has several access clients ({', '.join(names)}): choose one with --name")


def _routes(mirror: RegistryMirror, runtime: str) -> list[nodefiles.HostRoute]:
    """The mirror's routes as a node renders them, with the endpoint a stand-in and no node selector (this host asked for it)."""
    scheme = "https" if mirror.spec.service.tls else "http"
    entry = mirror_entry(mirror.name, mirror.spec, _ENDPOINT_SENTINEL.split(":")[0]).model_copy(
        update={"url": f"{scheme}://{_ENDPOINT_SENTINEL}", "runtimes": [runtime], "node_selector": LabelSelector()}
    )
    return nodefiles.host_routes(check_plan(build_node_plan([entry])), {}, runtime)


def _substitute(text: str) -> str:
    """Text for an unquoted heredoc: the shell's own characters escaped, then the stand-ins made variables."""
    escaped = text.replace("\\", "\\\\").replace("`", "\\`").replace("$", "\\$")
    return escaped.replace(_ENDPOINT_SENTINEL, "${ENDPOINT}").replace(_AUTH_SENTINEL, "Basic ${AUTH}")


def _containerd(mirror: RegistryMirror, with_auth: bool) -> list[ClientFile]:
    routes = _routes(mirror, RUNTIME_CONTAINERD)
    files = nodefiles.NodeFiles()
    for route in routes:
        files.routes[(route.host, RUNTIME_CONTAINERD)] = route
        for dir_name in nodefiles.containerd_route_dirs(route.host):
            path = f"{CONTAINERD_CERTS}/{dir_name}/{nodefiles.HOSTS_TOML}"
            files.files[path] = nodefiles.render_hosts_toml(route, f"{CONTAINERD_CERTS}/{dir_name}")
    private: set[str] = set()
    if with_auth:
        result = nodeauth.add_credentials(files, {mirror.name: _AUTH_SENTINEL}, containerd_config_path=CONTAINERD_CERTS)
        private = result.private
    out = []
    for path, text in sorted(files.files.items()):
        body = text.split("\n", 1)[1] if text.startswith(c.OWNERSHIP_MARKER) else text
        out.append(ClientFile(path, _substitute(f"{HEADER_LINE}\n{body}"), private=path in private))
    return out


def _podman(mirror: RegistryMirror) -> list[ClientFile]:
    text = nodefiles.render_crio_dropin(_routes(mirror, RUNTIME_CRIO))
    body = text.split("\n", 1)[1] if text.startswith(c.OWNERSHIP_MARKER) else text
    return [ClientFile(f"{CONTAINERS_DROPINS}/50-regmirror-{mirror.name}.conf", _substitute(f"{HEADER_LINE}\n{body}"))]


def client_config(
    mirror: RegistryMirror, kind: str, *, client: str | None = None, endpoint: str | None = None, namespace: str = c.DEFAULT_NAMESPACE
) -> ClientConfig:
    """The configuration `kind` needs on a host outside the cluster; ClientError when it cannot have one as asked."""
    if kind not in KINDS:
        raise ClientError(f"unknown client {kind!r}: one of {', '.join(KINDS)}")
    source = _credential_source(mirror, client)
    notes: list[str] = []
    variables: list[tuple[str, str]] = []
    if endpoint is not None:
        try:
            parse_endpoint(f"http://{endpoint}")
        except ValueError as exc:
            raise ClientError(f"--endpoint: {exc}") from None
        variables.append(("ENDPOINT", shlex.quote(endpoint)))
    else:
        expression, where = endpoint_expression(mirror, namespace)
        variables.append(("ENDPOINT", f'"${{ENDPOINT:-}}"; [ -n "$ENDPOINT" ] || ENDPOINT={expression}'))
        notes.append(f"ENDPOINT (host:port) is {where}; set ENDPOINT=host:port to override.")
    secret = client_secret_name(mirror.name, source) if source else None

    def secret_value(key: str) -> str:
        return f"{_kubectl(namespace, 'get', 'secret', secret or '', '-o', 'jsonpath={.data.' + key + '}')} | base64 -d"

    if secret is not None:
        variables.append(("USERNAME", f'"$({secret_value("username")})"'))
        if kind == "containerd":
            variables.append(("AUTH", f'"$({secret_value("auth")})"'))
        notes.append(
            f"The credential is read from Secret {namespace}/{secret} when this runs; delete that Secret to revoke and reissue it."
        )
    tls = mirror.spec.service.tls is not None
    if tls:
        notes.append(
            "The mirror serves HTTPS with the certificate of Secret "
            f"{namespace}/{mirror.spec.service.tls.secret_name if mirror.spec.service.tls else ''}: it must name the address in ENDPOINT, and "
            "this host must trust its CA."
        )
    files: list[ClientFile] = []
    commands: list[str] = []
    strict = mirror.spec.node_config.fallback.value == "NeverContactUpstream"
    if kind == "containerd":
        files = _containerd(mirror, secret is not None)
        notes.append(
            'containerd must read these files: config_path = "/etc/containerd/certs.d" in its config.toml (no restart needed after).'
        )
    elif kind == "podman":
        files = _podman(mirror)
        if secret is not None:
            flag = "" if tls else "--tls-verify=false "
            commands.append(f'{secret_value("password")} | podman login {flag}--username "$USERNAME" --password-stdin "$ENDPOINT"')
    else:
        hub = DOCKER_HUB in mirror.spec.upstream.effective_hosts()
        daemon: dict[str, list[str]] = {}
        if hub and secret is None:
            daemon["registry-mirrors"] = [f"{'https' if tls else 'http'}://{_ENDPOINT_SENTINEL}"]
            if strict:
                notes.append("dockerd always falls back to Docker Hub: NeverContactUpstream cannot be expressed for Docker.")
        else:
            why = (
                "Docker mirrors only Docker Hub"
                if not hub
                else "dockerd would send a mirror its Docker Hub credentials, never the mirror's"
            )
            notes.append(f'{why}: pull through the mirror by its own name, e.g. docker pull "$ENDPOINT/<repository>:<tag>".')
        if not tls:
            daemon["insecure-registries"] = [_ENDPOINT_SENTINEL]
        if daemon:
            files.append(ClientFile(DOCKER_DAEMON_JSON, _substitute(json.dumps(daemon, indent=2) + "\n"), keep_existing=True))
            notes.append("dockerd reloads registry-mirrors and insecure-registries on SIGHUP (systemctl reload docker).")
        if secret is not None:
            commands.append(f'{secret_value("password")} | docker login --username "$USERNAME" --password-stdin "$ENDPOINT"')
    return ClientConfig(kind, mirror.name, tuple(variables), tuple(files), tuple(commands), tuple(notes))


def render_script(config: ClientConfig) -> str:
    """The POSIX shell script for `config`: files under ${ROOT:-} (default /), private ones mode 0600."""
    lines = [
        "#!/bin/sh",
        f"# regmirror render --client {config.kind}: mirror {config.mirror}.",
        *(f"# {note}" for note in config.notes),
        "set -eu",
        'ROOT="${ROOT:-}"',
    ]
    for name, expression in config.variables:
        lines.append(f"{name}={expression}")
    lines.append('[ -n "$ENDPOINT" ] || { echo "regmirror: no endpoint: set ENDPOINT=host:port" >&2; exit 1; }')
    for f in config.files:
        target = f'"$ROOT"{shlex.quote(f.path)}'
        lines.append(f'mkdir -p "$(dirname {target})"')
        if f.keep_existing:
            lines.append(
                f'if [ -e {target} ]; then dest={target}.regmirror; echo "regmirror: {f.path} exists: merge $dest into it" >&2; else dest={target}; fi'
            )
            target = '"$dest"'
        if f.private:
            lines.append(f"(umask 077 && cat > {target} <<EOF")
        else:
            lines.append(f"cat > {target} <<EOF")
        lines.append(f.content.rstrip("\n"))
        lines.append("EOF")
        if f.private:
            lines[-1] = "EOF\n)"
            lines.append(f"chmod 600 {target}")
    lines += list(config.commands)
    return "\n".join(lines) + "\n"


def parse_kinds(values: Sequence[str]) -> list[str]:
    """Validate the --client choices."""
    for value in values:
        if value not in KINDS:
            raise ClientError(f"unknown client {value!r}: one of {', '.join(KINDS)}")
    return list(values)
