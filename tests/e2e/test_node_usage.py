"""Which nodes pulled through the mirror: the real front (Varnish), its front-stats loop and the sidecar, as rendered.

A node pulls with real containerd (from 127.0.0.1), another client asks for
a manifest from its own address (127.0.0.7, a second node), and a third only
sends the agent's health probe (`GET /v2/` from 127.0.0.9): the sidecar's
/stats must list the first two, never the prober, and the operator's mapping
(regmirror.nodeusage) must count two of the three selected nodes, naming the
third.
"""

from __future__ import annotations

import http.client
import os
from pathlib import Path

import pytest
from _dataplane import Containerd, ContainerdBinaries, Registry, wait_for
from _images import multi_layer_image

from harness.cachepath import CachePod, configured_node
from regmirror.models import RegistryMirrorSpec
from regmirror.nodeusage import usage

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="runs containerd, varnishd and registries as daemons: needs root")


def get(address: str, port: int, path: str, source: str) -> int:
    conn = http.client.HTTPConnection(address, port, timeout=10, source_address=(source, 0))
    try:
        accept = "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.index.v1+json"
        conn.request("GET", path, headers={"Accept": accept})
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def node(name: str, ip: str) -> dict[str, object]:
    return {"metadata": {"name": name}, "spec": {}, "status": {"addresses": [{"type": "InternalIP", "address": ip}]}}


def test_the_sidecar_names_the_clients_that_pulled_and_the_operator_maps_them_to_nodes(
    tmp_path: Path, binaries: ContainerdBinaries, registry_binary: str
) -> None:
    image = multi_layer_image(tmp_path / "img", name="library/usage", layer_sizes=(64 << 10,))
    with Registry.start(tmp_path / "upstream") as upstream:
        image.push(upstream.address)
        spec = RegistryMirrorSpec.model_validate(
            {"upstream": {"url": upstream.url, "hosts": [upstream.address]}, "storage": {"ephemeral": True, "size": "1Gi"}}
        )
        with CachePod.run(spec, tmp_path / "pod", registry_binary) as pod:
            assert pod.has_front
            configured = configured_node(binaries, tmp_path / "n1", pod)
            with Containerd.start(binaries, str(configured.certs_dir)) as daemon:
                pulled = daemon.pull(f"{upstream.address}/{image.name}:{image.tag}", hosts_dir=str(configured.certs_dir))
                assert pulled.returncode == 0, pulled.stderr[-1500:]
            front_port = pod.ports["front"]
            assert get("127.0.0.1", front_port, f"/v2/{image.name}/manifests/{image.tag}?ns={upstream.address}", "127.0.0.7") == 200
            assert get("127.0.0.1", front_port, "/v2/", "127.0.0.9") in (200, 401)

            def seen() -> set[str]:
                return {c["address"] for c in (pod.stats().get("clients") or {}).get("seen", [])}

            wait_for(lambda: {"127.0.0.1", "127.0.0.7"} <= seen(), 30, "the sidecar to list both pulling clients")
            assert "127.0.0.9" not in seen(), "a health probe is not a pull"
            stats = pod.stats()
            assert stats["clients"]["windowSeconds"] == 86400
            selected = [node("n1", "127.0.0.1"), node("n2", "127.0.0.7"), node("n3", "127.0.0.9")]
            assert usage(selected, [stats]) == {"pulledRecently": 2, "notPulledRecently": ["n3"]}
