"""CRI-O under a Restricted mirror: the real front (Varnish) + distribution 3, the agent, and a real CRI-O 1.34.

The front answers 401 without the nodes' credential. CRI-O cannot carry a
header in registries.conf; it reads containers-auth.json on every pull,
looked up by the mirror's location, and with its default
`global_auth_file = ""` that is /run/containers/0/auth.json. Each CRI-O here
runs in a mount namespace whose /run/containers is the simulated node's (as
the agent's hostPath is), so this machine's /run is never touched.

The mirror is NeverContactUpstream: a CRI-O that does not send the credential
gets 401 and has nowhere else to go (the pull fails, nothing reaches the
upstream); with the agent's file it pulls through the front. A rotation is
picked up without a restart or reload (the file is read per pull).
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from _dataplane import ContainerdBinaries, Registry
from _images import BuiltImage
from test_access import (  # the Restricted front's harness: one place, not two
    HOST_IP,
    Operator,
    binaries,  # noqa: F401  (fixture)
    image,  # noqa: F401  (fixture)
    netns,  # noqa: F401  (fixture)
    spec_for,
    upstream,  # noqa: F401  (fixture)
    wait_front,
)
from test_crio import crictl, crio, crio_bin  # noqa: F401  (fixtures)

from harness.cachepath import CachePod
from harness.dataplane.node import AgentNode
from regmirror.models import RegistryMirrorSpec

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="runs CRI-O, varnishd and registries, makes a network namespace: needs root")

UP_USER, UP_PASSWORD = "mirror", "upstream-Pa55"


def strict_crio_spec(private_upstream: Registry) -> RegistryMirrorSpec:
    body = spec_for(private_upstream, "Restricted").model_dump(by_alias=True, exclude_none=True)
    body["nodeConfig"] = {"runtimes": ["crio"], "fallback": "NeverContactUpstream"}
    return RegistryMirrorSpec.model_validate(body)


def test_crio_pulls_through_a_restricted_front_with_the_agent_file_and_gets_401_without_it(
    crio_bin: Path,  # noqa: F811
    crictl: str,  # noqa: F811
    binaries: ContainerdBinaries,  # noqa: F811
    registry_binary: str,
    netns: str,  # noqa: F811
    upstream: Registry,  # noqa: F811
    image: BuiltImage,  # noqa: F811
    tmp_path: Path,
) -> None:
    ref = f"{upstream.address}/{image.name}:{image.tag}"
    spec = strict_crio_spec(upstream)
    node = AgentNode("crio-acc", tmp_path / "node", {}, runtime_version="cri-o://1.34.0")
    run_containers = node.root / "run" / "containers"
    run_containers.mkdir(parents=True)  # the DaemonSet's hostPath (DirectoryOrCreate)
    bare_run = tmp_path / "bare-run"
    bare_run.mkdir()
    node.crio_dir.mkdir(parents=True)
    op = Operator("crio-acc", spec, node)
    first = op.reconcile()
    assert first.state.enforced, "Restricted"
    secrets = {"up-creds": {"username": UP_USER, "password": UP_PASSWORD}}
    with CachePod.run(
        spec, tmp_path / "pod", registry_binary, name="crio-acc", secrets=secrets, access=first.auth_data, listen_host="0.0.0.0"
    ) as pod:
        op.roll_out(pod)
        endpoint = f"{HOST_IP}:{pod.ports['front']}"
        auth_file = run_containers / "0" / "auth.json"
        assert stat.S_IMODE(auth_file.stat().st_mode) == 0o600
        assert set(json.loads(auth_file.read_text())["auths"]) == {endpoint}
        dropin = next(node.crio_dir.glob("*.conf")).read_text()
        assert endpoint in dropin and upstream.address in dropin

        # The same drop-in without the agent's auth file: the front's 401, and no way around it.
        with crio(crio_bin, node.crio_dir, crictl, bare_run) as daemon:
            refused = daemon.crictl("pull", ref, timeout=60)
            assert refused.returncode != 0, "a CRI-O without the credential must not pull from a Restricted mirror"
            assert "unauthorized" in refused.stderr.lower(), refused.stderr

        with crio(crio_bin, node.crio_dir, crictl, run_containers) as daemon:
            pulled = daemon.crictl("pull", ref, timeout=120)
            assert pulled.returncode == 0, pulled.stderr + daemon.log()[-2000:]

            # A rotation: the agent rewrites the file, the running CRI-O uses the new credential on its next pull.
            old = first.state.current.authorization
            op.rotate_request = "rotate-1"
            rotated = op.reconcile(pod)
            wait_front(pod, rotated)
            op.roll_out(pod)
            new_auth = rotated.state.current.authorization
            assert json.loads(auth_file.read_text())["auths"][endpoint]["auth"] == new_auth.removeprefix("Basic ")
            done = op.reconcile(pod)
            assert done.state.retired is None
            wait_front(pod, done)  # the old credential is refused now
            assert old != new_auth
            daemon.crictl("rmi", ref)
            again = daemon.crictl("pull", ref, timeout=120)
            assert again.returncode == 0, again.stderr + daemon.log()[-2000:]
