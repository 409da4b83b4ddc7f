"""Who may pull, end to end: the real front (Varnish), distribution 3, the agent and containerd.

The mirror pod runs as the operator renders it (harness/cachepath.py), in
front of a private upstream (Debian's docker-registry with htpasswd: nothing
pulls from it without the mirror's upstream credentials). The test plays the
operator's part that is not wired into the core yet: it runs
`regmirror.access.decide_access`, writes the access Secret's files where the
pod mounts them (as the kubelet swaps a Secret volume), the agent's Secret
where the agent reads it, and the node plan with the revision the decision
names. The front reloads its VCL itself (the front-stats loop); every wait is
for what the front reports at /_regmirror/access.

Clients reach the front on the host end of a veth pair (a network namespace
made here), never on the pod's loopback, which the front reserves for the
pod's own containers. A client "without credentials from another namespace"
is curl inside that namespace.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from _dataplane import (
    OPERATOR_SRC,
    AgentNode,
    Containerd,
    ContainerdBinaries,
    Registry,
    ensure_commands,
    htpasswd_line,
    wait_for,
)
from _images import BuiltImage, multi_layer_image

from harness.cachepath import CLUSTER_IP, CachePod
from regmirror import access as acc
from regmirror.models import RegistryMirrorSpec
from regmirror.nodeplan import build_node_plan, mirror_entry
from regmirror.render.front import ACCESS_INFO_PATH

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="runs containerd, varnishd and registries, makes a network namespace: needs root")

UP_USER, UP_PASSWORD = "mirror", "upstream-Pa55"
HOST_IP, NS_IP = "10.240.77.1", "10.240.77.2"


@pytest.fixture(scope="module")
def binaries(binaries: ContainerdBinaries) -> ContainerdBinaries:
    """The shared node binaries (tests/e2e/conftest.py), and curl and ip for the pod network namespace."""
    reason = ensure_commands({"curl": "curl", "iproute2": "ip"})
    if reason:
        pytest.skip(reason)
    return binaries


@pytest.fixture(scope="module")
def netns() -> Iterator[str]:
    """A network namespace joined to this one by a veth pair: HOST_IP here, NS_IP there."""
    name = f"racc{os.getpid() % 100000}"
    host_if, ns_if = f"{name}h", f"{name}n"

    def run(*argv: str) -> None:
        subprocess.run(argv, check=True, capture_output=True)

    run("ip", "netns", "add", name)
    try:
        run("ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        run("ip", "link", "set", ns_if, "netns", name)
        run("ip", "addr", "add", f"{HOST_IP}/30", "dev", host_if)
        run("ip", "link", "set", host_if, "up")
        run("ip", "netns", "exec", name, "ip", "addr", "add", f"{NS_IP}/30", "dev", ns_if)
        run("ip", "netns", "exec", name, "ip", "link", "set", ns_if, "up")
        run("ip", "netns", "exec", name, "ip", "link", "set", "lo", "up")
        yield name
    finally:
        subprocess.run(["ip", "link", "del", host_if], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> BuiltImage:
    return multi_layer_image(tmp_path_factory.mktemp("access-image"), name="team/private", layer_sizes=(192 << 10, 64 << 10))


@pytest.fixture(scope="module")
def upstream(binaries: ContainerdBinaries, image: BuiltImage, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A private upstream: every request needs UP_USER's password."""
    work = tmp_path_factory.mktemp("access-upstream")
    (work / "htpasswd").write_text(htpasswd_line(UP_USER, UP_PASSWORD))
    auth = f"auth:\n  htpasswd:\n    realm: upstream\n    path: {work / 'htpasswd'}\n"
    with Registry.start(work, auth=auth) as registry:
        image.push(registry.address, creds=f"{UP_USER}:{UP_PASSWORD}")
        yield registry


def spec_for(upstream: Registry, policy: str | None = None) -> RegistryMirrorSpec:
    body: dict[str, Any] = {
        "upstream": {"url": upstream.url, "hosts": [upstream.address], "credentialsSecretRef": {"name": "up-creds"}},
        "storage": {"ephemeral": True, "size": "1Gi"},
    }
    if policy:
        body["access"] = {"policy": policy}
    return RegistryMirrorSpec.model_validate(body)


@dataclass
class Operator:
    """The operator's access reconcile, by hand: decisions, and the files the kubelet would mount from them."""

    name: str
    spec: RegistryMirrorSpec
    node: AgentNode
    now: float = 1000.0
    decision: acc.AccessDecision | None = None
    published: acc.Published | None = None
    rotate_request: str = ""
    history: list[acc.AccessDecision] = field(default_factory=list)

    def reconcile(self, pod: CachePod | None = None) -> acc.AccessDecision:
        self.now += 1.0
        previous = self.decision
        d = acc.decide_access(
            acc.AccessInputs(
                self.name,
                self.spec,
                now=self.now,
                stored_state=previous.auth_data[acc.STATE_KEY] if previous else None,
                stored_htpasswd=previous.auth_data[acc.HTPASSWD_KEY] if previous else None,
                node_copy=previous.node_entry if previous else None,
                published=self.published,
                fronts_loaded=front_generation(pod) if pod is not None and pod.has_front else None,
                rotate_request=self.rotate_request,
                min_rotation_spacing=0,
            )
        )
        self.decision = d
        self.history.append(d)
        # What the operator applies: the agent's Secret (as the kubelet mounts it), then the pod's (if running).
        assert self.node.auth_dir is not None
        self.node.auth_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.node.auth_dir / f".{self.name}.tmp"
        tmp.write_text(d.node_entry)
        os.replace(tmp, self.node.auth_dir / self.name)
        if pod is not None:
            pod.write_access(d.auth_data)
        return d

    def plan(self, pod: CachePod) -> str:
        assert self.decision is not None
        text = build_node_plan([mirror_entry(self.name, self.spec, CLUSTER_IP, auth_revision=self.decision.plan_revision)]).to_json()
        return text.replace(f"http://{CLUSTER_IP}:{self.spec.service.port}", f"http://{HOST_IP}:{pod.ports['front']}")

    def roll_out(self, pod: CachePod) -> None:
        """The agent applies the plan on the node (the whole fleet, here)."""
        rc, events = self.node.agent_once(self.plan(pod))
        assert rc == 0, f"agent --once: {events}"
        assert self.decision is not None
        self.published = acc.Published(self.decision.plan_revision, True)


def front_generation(pod: CachePod) -> int:
    info = json.loads(curl(f"http://{HOST_IP}:{pod.ports['front']}{ACCESS_INFO_PATH}", body=True))
    return int(info["generation"])


def wait_front(pod: CachePod, decision: acc.AccessDecision) -> None:
    """Until the front runs the access.vcl of this decision (the front-stats loop reloads it within seconds)."""
    wait_for(lambda: front_generation(pod) == decision.state.generation, 60, f"the front to load generation {decision.state.generation}")


def curl(url: str, *, authorization: str | None = None, netns: str | None = None, body: bool = False) -> str:
    """GET `url`: the status code (or the body), from this namespace or another one."""
    argv = ["curl", "-sS", "--max-time", "10"]
    if not body:
        argv += ["-o", "/dev/null", "-w", "%{http_code}"]
    if authorization:
        argv += ["-H", f"Authorization: {authorization}"]
    argv += ["-H", "Accept: application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json", url]
    if netns:
        argv = ["ip", "netns", "exec", netns, *argv]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 0, f"curl {url}: {proc.stderr}"
    return proc.stdout


def cache_hits(pod: CachePod) -> int:
    out = subprocess.run(
        ["varnishstat", "-n", pod.map_arg("/var/lib/varnish/front"), "-1", "-f", "MAIN.cache_hit"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return int(out.split()[1])


@contextlib.contextmanager
def mirror(
    name: str, spec: RegistryMirrorSpec, tmp: Path, registry_binary: str, binaries: ContainerdBinaries
) -> Iterator[tuple[Operator, CachePod, AgentNode, Containerd]]:
    node = AgentNode(name, tmp / "node", {}, runtime_version=f"containerd://{binaries.version}.0")
    node.write_containerd_config()
    node.certs_dir.mkdir(parents=True, exist_ok=True)
    op = Operator(name, spec, node)
    first = op.reconcile()
    secrets = {"up-creds": {"username": UP_USER, "password": UP_PASSWORD}}
    with (
        CachePod.run(spec, tmp / "pod", registry_binary, name=name, secrets=secrets, access=first.auth_data, listen_host="0.0.0.0") as pod,
        Containerd.start(binaries, str(node.certs_dir)) as daemon,
    ):
        op.roll_out(pod)
        yield op, pod, node, daemon


def pull(daemon: Containerd, node: AgentNode, ref: str) -> None:
    daemon.remove_image(ref)
    result = daemon.pull(ref, hosts_dir=str(node.certs_dir), timeout=120)
    assert result.returncode == 0, f"pull {ref} failed:\n{result.stderr[-1500:]}"


def urls(pod: CachePod, image: BuiltImage) -> list[str]:
    """The image's manifest (by tag and by digest) and each blob a pull fetches, on the front."""
    base = f"http://{HOST_IP}:{pod.ports['front']}/v2/{image.name}"
    return [f"{base}/manifests/{image.tag}", f"{base}/manifests/{image.top.digest}"] + [f"{base}/blobs/{d}" for d in image.blobs_for_host]


# ------------------------------------------------------------------ the tests


def test_restricted_refuses_anonymous_clients_for_cached_content_and_the_node_pulls(
    binaries: ContainerdBinaries, registry_binary: str, netns: str, upstream: Registry, image: BuiltImage, tmp_path: Path
) -> None:
    ref = f"{upstream.address}/{image.name}:{image.tag}"
    with mirror("acc-restricted", spec_for(upstream), tmp_path, registry_binary, binaries) as (op, pod, node, daemon):
        assert op.decision is not None and op.decision.state.enforced, "Restricted by default with upstream credentials"
        pull(daemon, node, ref)  # the agent-written hosts.toml carries the node's credential

        node_auth = op.decision.state.current.authorization
        targets = urls(pod, image)
        hits = cache_hits(pod)
        for url in targets:
            assert curl(url, authorization=node_auth) == "200", url
        assert cache_hits(pod) > hits, "the content is in the front now"
        hits = cache_hits(pod)
        for url in [*targets, f"http://{HOST_IP}:{pod.ports['front']}/v2/"]:
            assert curl(url, netns=netns) == "401", f"anonymous from another namespace: {url}"
            assert curl(url) == "401", f"anonymous from this host's other address: {url}"
            wrong = acc.Credential(acc.node_username(1), "x" * 43).authorization
            assert curl(url, authorization=wrong, netns=netns) == "401", url
        assert cache_hits(pod) == hits, "refused before the cache lookup"
        challenge = subprocess.run(
            ["ip", "netns", "exec", netns, "curl", "-sS", "-D", "-", "-o", "/dev/null", f"http://{HOST_IP}:{pod.ports['front']}/v2/"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert 'www-authenticate: basic realm="regmirror"' in challenge.lower()
        # The kubelet's probe path answers without a credential and says nothing else.
        assert curl(f"http://{HOST_IP}:{pod.ports['front']}/_regmirror/ready", netns=netns) == "200"


def test_a_rotation_keeps_pulls_working_and_the_old_credential_stops_once_every_node_has_the_new_one(
    binaries: ContainerdBinaries, registry_binary: str, netns: str, upstream: Registry, image: BuiltImage, tmp_path: Path
) -> None:
    ref = f"{upstream.address}/{image.name}:{image.tag}"
    with mirror("acc-rotate", spec_for(upstream), tmp_path, registry_binary, binaries) as (op, pod, node, daemon):
        assert op.decision is not None
        manifest_url = urls(pod, image)[0]
        old = op.decision.state.current.authorization
        pull(daemon, node, ref)

        op.rotate_request = "rotate-1"
        rotated = op.reconcile(pod)
        assert rotated.state.revision == 2 and [e[0] for e in rotated.events] == ["CredentialsRotated"]
        wait_front(pod, rotated)
        new = rotated.state.current.authorization
        assert curl(manifest_url, authorization=old) == "200", "nodes on the old plan keep pulling"
        assert curl(manifest_url, authorization=new) == "200"
        pull(daemon, node, ref)  # still on revision 1's files

        op.roll_out(pod)  # every node applies revision 2
        hosts_toml = next(node.certs_dir.rglob("hosts.toml")).read_text()
        assert new in hosts_toml and old not in hosts_toml
        pull(daemon, node, ref)

        done = op.reconcile(pod)
        assert done.state.retired is None
        wait_front(pod, done)
        assert curl(manifest_url, authorization=old) == "401", "the old credential stops once every node has the new one"
        assert curl(manifest_url, authorization=new) == "200"
        pull(daemon, node, ref)


def test_switching_open_restricted_open_never_fails_a_pull_in_a_loop(
    binaries: ContainerdBinaries, registry_binary: str, netns: str, upstream: Registry, image: BuiltImage, tmp_path: Path
) -> None:
    ref = f"{upstream.address}/{image.name}:{image.tag}"
    with mirror("acc-switch", spec_for(upstream, "Open"), tmp_path, registry_binary, binaries) as (op, pod, node, daemon):
        manifest_url = urls(pod, image)[0]
        pulls: list[tuple[str, bool, str]] = []
        phase = ["Open"]
        stop = threading.Event()

        def loop() -> None:
            while not stop.is_set():
                daemon.remove_image(ref)
                result = daemon.pull(ref, hosts_dir=str(node.certs_dir), timeout=120)
                pulls.append((phase[0], result.returncode == 0, result.stderr[-600:]))

        worker = threading.Thread(target=loop, daemon=True)
        worker.start()
        try:
            for policy in ("Restricted", "Open", "Restricted", "Open"):
                wait_for(lambda: len([p for p in pulls if p[0] == phase[0]]) >= 2, 120, f"pulls under {phase[0]}")
                op.spec = spec_for(upstream, policy)
                decision = op.reconcile(pod)
                phase[0] = f"switching to {policy}"
                wait_front(pod, decision)
                phase[0] = policy
                anonymous = curl(manifest_url, netns=netns)
                assert anonymous == ("401" if policy == "Restricted" else "200"), f"{policy}: anonymous got {anonymous}"
            wait_for(lambda: len([p for p in pulls if p[0] == phase[0]]) >= 2, 120, f"pulls under {phase[0]}")
        finally:
            stop.set()
            worker.join(180)
        print(f"{len(pulls)} pulls by phase:", {ph: sum(1 for p in pulls if p[0] == ph) for ph in dict.fromkeys(p[0] for p in pulls)})
        failed = [p for p in pulls if not p[1]]
        assert not failed, f"{len(failed)} of {len(pulls)} pulls failed, first: {failed[0]}"
        assert len({p[0] for p in pulls}) >= 3 and len(pulls) >= 10, pulls


def outside_host(tmp: Path, script: str, secret: dict[str, str], front_port: int) -> Path:
    """Run a `render --client` script as an outside host would: ROOT is its filesystem, kubectl a stub holding the client Secret."""
    import base64

    root, bin_dir = tmp / "outside", tmp / "outside-bin"
    root.mkdir(parents=True)
    bin_dir.mkdir(parents=True)
    cases = "".join(f'  *"{{.data.{k}}}"*) printf %s {base64.b64encode(v.encode()).decode()} ;;\n' for k, v in secret.items())
    (bin_dir / "kubectl").write_text(f'#!/bin/sh\ncase "$*" in\n{cases}  *) exit 1 ;;\nesac\n')
    # podman login is containers/image's login: skopeo's, writing the auth file skopeo reads below.
    (bin_dir / "podman").write_text(f'#!/bin/sh\nexec skopeo "$@" --authfile {root}/auth.json\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/sbin:/usr/bin:/sbin:/bin", "ROOT": str(root), "ENDPOINT": f"{HOST_IP}:{front_port}"}
    proc = subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    return root


def test_outside_hosts_pull_with_the_printed_configuration_and_their_own_credential(
    binaries: ContainerdBinaries, registry_binary: str, netns: str, upstream: Registry, image: BuiltImage, tmp_path: Path
) -> None:
    from regmirror.models import RegistryMirror
    from regmirror.render.clients import client_config, render_script

    ref = f"{upstream.address}/{image.name}:{image.tag}"
    spec = RegistryMirrorSpec.model_validate(
        {**spec_for(upstream).model_dump(by_alias=True, exclude_none=True), "access": {"clients": [{"name": "ci"}]}}
    )
    with mirror("acc-outside", spec, tmp_path, registry_binary, binaries) as (op, pod, _node, _daemon):
        assert op.decision is not None and op.decision.state.enforced
        secret = op.decision.client_data["ci"]
        cr = RegistryMirror.model_validate({"metadata": {"name": "acc-outside"}, "spec": spec.model_dump(by_alias=True, exclude_none=True)})

        # containerd on an outside host: the script's hosts.toml, real containerd pulling through the front.
        root = outside_host(tmp_path / "ctrd", render_script(client_config(cr, "containerd")), secret, pod.ports["front"])
        certs = root / "etc/containerd/certs.d"
        with Containerd.start(binaries, str(certs)) as daemon:
            result = daemon.pull(ref, hosts_dir=str(certs), timeout=120)
            assert result.returncode == 0, result.stderr[-1500:]

        # podman (containers/image): the drop-in, and `podman login` into the auth file it reads.
        root = outside_host(tmp_path / "podman", render_script(client_config(cr, "podman")), secret, pod.ports["front"])
        dropin = next((root / "etc/containers/registries.conf.d").glob("*.conf"))
        # skopeo 1.9 reads a registries.conf named by its (hidden) --registries-conf, not by CONTAINERS_REGISTRIES_CONF.
        inspect = subprocess.run(
            ["skopeo", "--registries-conf", str(dropin), "inspect", "--raw", "--authfile", str(root / "auth.json"), f"docker://{ref}"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert inspect.returncode == 0, inspect.stderr[-1500:]
        assert json.loads(inspect.stdout)["schemaVersion"] == 2
        without = subprocess.run(
            ["skopeo", "--registries-conf", str(dropin), "inspect", "--raw", "--authfile", str(tmp_path / "none.json"), f"docker://{ref}"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert without.returncode != 0, "without the client's credential neither the mirror nor the private upstream serves it"


def test_an_https_mirror_is_restricted_by_the_registry_itself_and_rotates_without_a_restart(
    binaries: ContainerdBinaries, registry_binary: str, netns: str, upstream: Registry, image: BuiltImage, tmp_path: Path
) -> None:
    """No front (Varnish speaks no TLS): distribution's htpasswd from the access Secret, re-read when the file changes."""
    from unit._agentkit import tls_material

    ref = f"{upstream.address}/{image.name}:{image.tag}"
    spec = RegistryMirrorSpec.model_validate(
        {
            **spec_for(upstream).model_dump(by_alias=True, exclude_none=True),
            "service": {"clusterIP": "10.96.0.77", "tls": {"secretName": "acc-tls"}},
        }
    )
    tls_dir = tmp_path / "pod" / "tls"
    tls_dir.mkdir(parents=True)
    ca, crt, key = tls_material(tls_dir, HOST_IP)
    crt.rename(tls_dir / "tls.crt")
    key.rename(tls_dir / "tls.key")
    # The CA file hosts.toml names is a real path: the agent writes straight into this containerd's config_path.
    certs = tmp_path / "certs.d"
    certs.mkdir()
    node = AgentNode("acc-tls", tmp_path / "node", {}, runtime_version=f"containerd://{binaries.version}.0")
    op = Operator("acc-tls", spec, node)
    first = op.reconcile()
    secrets = {"up-creds": {"username": UP_USER, "password": UP_PASSWORD}}
    with (
        CachePod.run(
            spec, tmp_path / "pod", registry_binary, name="acc-tls", secrets=secrets, access=first.auth_data, listen_host="0.0.0.0"
        ) as pod,
        Containerd.start(binaries, str(certs)) as daemon,
    ):
        url = f"https://{HOST_IP}:{pod.ports['front']}/v2/{image.name}/manifests/{image.tag}"

        def get(authorization: str | None = None) -> str:
            accept = "Accept: application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json"
            argv = ["curl", "-sS", "--cacert", str(ca), "-H", accept, "-o", "/dev/null", "-w", "%{http_code}", url]
            if authorization:
                argv[1:1] = ["-H", f"Authorization: {authorization}"]
            return subprocess.run(["ip", "netns", "exec", netns, *argv], capture_output=True, text=True, check=True).stdout

        plan = (
            build_node_plan([mirror_entry("acc-tls", spec, "10.96.0.77", ca_pem=ca.read_text(), auth_revision=first.plan_revision)])
            .to_json()
            .replace(f"https://10.96.0.77:{spec.service.port}", f"https://{HOST_IP}:{pod.ports['front']}")
        )

        def agent_once(plan_json: str) -> None:
            node.plan_file.write_text(plan_json)
            argv = [*node.agent_argv(once=True), "--host-root", "/", "--containerd-config-path", str(certs)]
            argv += ["--containerd-config", str(daemon.config_file)]
            proc = subprocess.run(
                argv, capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": OPERATOR_SRC}, check=False
            )
            assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]

        def tls_pull() -> None:
            daemon.remove_image(ref)
            result = daemon.pull(ref, hosts_dir=str(certs), timeout=120)
            assert result.returncode == 0, result.stderr[-1500:]

        agent_once(plan)
        op.published = acc.Published(first.plan_revision, True)
        tls_pull()
        assert get() == "401" and get(first.state.current.authorization) == "200"

        op.rotate_request = "rotate-1"
        rotated = op.reconcile(pod)
        op.reconcile(pod)  # nothing new: the htpasswd lines keep their salts, the file is not rewritten
        assert op.history[-1].auth_data[acc.HTPASSWD_KEY] == rotated.auth_data[acc.HTPASSWD_KEY]
        agent_once(plan.replace('"authRevision":1', f'"authRevision":{rotated.plan_revision}'))
        op.published = acc.Published(rotated.plan_revision, True)
        tls_pull()
        done = op.reconcile(pod)
        assert done.state.retired is None
        wait_for(lambda: get(first.state.current.authorization) == "401", 30, "distribution to re-read its htpasswd")
        assert get(done.state.current.authorization) == "200"
        tls_pull()
