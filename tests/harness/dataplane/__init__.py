"""Real data-plane programs for e2e tests and benchmarks, all on loopback.

- ``binaries``: Debian's containerd and docker-registry, pinned containerd releases, crictl.
- ``images``: test images built here as OCI layouts (no internet).
- ``registry``: a distribution registry (``Registry``), what it served, a connection counter.
- ``tokens``: a Docker token service for a private upstream.
- ``containerd``: containerd daemons of any release (``Containerd``).
- ``dockerd``: dockerd with its own roots (``Dockerd``).
- ``node``: a simulated node's host root with ``regmirror agent`` (``AgentNode``).
- ``loopback``: the operator's objects run on loopback, only addresses and paths mapped.
- ``readback``: reading what the operator wrote back from the API server.

Every helper is a context manager or returns a reason to skip (``ensure_*``), never
raising for what this machine cannot run::

    with Registry.start(tmp) as mirror:            # CNCF distribution (`docker-registry`)
        mirror.push_image("library/hello", "v1")   # a tiny image built here
        with Containerd.start(binaries, config_path=certs) as ctrd:
            ctrd.pull("docker.io/library/hello:v1", hosts_dir=certs)
"""

from harness.dataplane.binaries import ContainerdBinaries, build_containerd, ensure_binaries, ensure_commands, system_containerd
from harness.dataplane.containerd import CRI_V1_REGISTRY, CRI_V2_REGISTRY, Containerd, config_path_toml, containerd_config, short_tmpdir
from harness.dataplane.dockerd import Dockerd, docker_cli
from harness.dataplane.loopback import LoopbackMap, LoopbackMirror, MirrorObjects, map_plan, map_to_loopback, resolve_env
from harness.dataplane.node import AgentLoop, AgentNode
from harness.dataplane.readback import read_mirror_objects, read_node_credentials, read_node_plan
from harness.dataplane.registry import ConnectionRecorder, Registry, Served, blob_gets, htpasswd_line, served_requests, tiny_image
from harness.dataplane.tokens import TokenService

__all__ = [
    "CRI_V1_REGISTRY",
    "CRI_V2_REGISTRY",
    "AgentLoop",
    "AgentNode",
    "ConnectionRecorder",
    "Containerd",
    "ContainerdBinaries",
    "Dockerd",
    "LoopbackMap",
    "LoopbackMirror",
    "MirrorObjects",
    "Registry",
    "Served",
    "TokenService",
    "blob_gets",
    "build_containerd",
    "config_path_toml",
    "containerd_config",
    "docker_cli",
    "ensure_binaries",
    "ensure_commands",
    "htpasswd_line",
    "map_plan",
    "map_to_loopback",
    "read_mirror_objects",
    "read_node_credentials",
    "read_node_plan",
    "resolve_env",
    "served_requests",
    "short_tmpdir",
    "system_containerd",
    "tiny_image",
]
