"""The data path end to end, with the real programs, on loopback.

What runs:
- two "upstream" registries (Debian's docker-registry, access log on), one
  open and one behind htpasswd, seeded with images built here (harness.dataplane.images);
- the operator (`regmirror run`) on the local control plane, given
  RegistryMirrors that point at those upstreams; the tests read back what it
  wrote (config.yml, the Deployment's args and env, the Secret, the node plan)
  and run the real docker-registry from exactly that, with only addresses and
  paths mapped (`harness.dataplane.map_to_loopback`, the one mapping);
- `regmirror agent` against a temporary host root per simulated node, and
  real containerd (one daemon per node) pulling through the files it wrote;
  skopeo with the CRI-O drop-in; dockerd with the daemon.json mirror settings.

Every daemon is stopped and every mirror and Secret deleted at teardown; every port
comes from harness.waiting.free_port().
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from harness import LocalCluster
from harness.dataplane import (
    AgentNode,
    Containerd,
    ContainerdBinaries,
    Dockerd,
    LoopbackMirror,
    Registry,
    TokenService,
    blob_gets,
    docker_cli,
    ensure_binaries,
    ensure_commands,
    htpasswd_line,
    map_plan,
    read_mirror_objects,
    read_node_credentials,
    read_node_plan,
    served_requests,
    system_containerd,
)
from harness.dataplane.images import BuiltImage, multi_layer_image, multi_platform_index
from harness.objects import MirrorFactory
from harness.operator import OperatorProcess, condition, get_mirror
from harness.waiting import wait_for
from regmirror import constants as c
from regmirror.agent.plan import parse_plan
from regmirror.render.nodefiles import render_docker_daemon_json
from regmirror.upstream import check_upstream

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="runs containerd, dockerd and registries as daemons: needs root")

STRICT_LABEL = "e2e.regmirror.dev/strict"
CREDS_LABEL = "e2e.regmirror.dev/creds"
AUTH_USER, AUTH_PASSWORD, WRONG_PASSWORD = "puller", "e2e-Right-Pa55", "e2e-Wrong-Pa55"


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def containerd_bin() -> ContainerdBinaries:
    reason = ensure_binaries() or ensure_commands({"skopeo": "skopeo", "apache2-utils": "htpasswd"})
    if reason:
        pytest.skip(reason)
    found = system_containerd()
    assert found is not None
    return found


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, BuiltImage]:
    root = tmp_path_factory.mktemp("images")
    return {
        "multi": multi_layer_image(root / "multi"),
        "multiarch": multi_platform_index(root / "multiarch"),
        "private": multi_layer_image(root / "private", name="library/private", layer_sizes=(128 << 10, 4 << 10)),
    }


@pytest.fixture(scope="module")
def upstream(containerd_bin: object, images: dict[str, BuiltImage], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """The stand-in for Docker Hub: plain HTTP on loopback, access log on."""
    with Registry.start(tmp_path_factory.mktemp("upstream")) as registry:
        images["multi"].push(registry.address)
        images["multiarch"].push(registry.address)
        yield registry


@pytest.fixture(scope="module")
def tokens(containerd_bin: object, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TokenService]:
    """The private upstream's token service: https on another port, its certificate from a private CA."""
    work = tmp_path_factory.mktemp("tokens")
    (work / "htpasswd").write_text(htpasswd_line(AUTH_USER, AUTH_PASSWORD))
    with TokenService.start(work / "service", work / "htpasswd") as service:
        yield service


@pytest.fixture(scope="module")
def auth_upstream(tokens: TokenService, images: dict[str, BuiltImage], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A private upstream: token authentication (Docker Hub's shape), users in an htpasswd (bcrypt) file."""
    with Registry.start(tmp_path_factory.mktemp("auth-upstream"), auth=tokens.registry_auth()) as registry:
        images["private"].push(registry.address, creds=f"{AUTH_USER}:{AUTH_PASSWORD}")  # --dest-tls-verify=false: the realm too
        yield registry


def mirror_cr(name: str, url: str, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"upstream": {"url": url}, "storage": {"ephemeral": True, "size": "1Gi"}, **spec}
    return {"apiVersion": c.API_VERSION, "kind": c.KIND, "metadata": {"name": name}, "spec": body}


@dataclass
class Deployed:
    """The operator's mirrors, planned onto loopback, and the node plan it wrote."""

    hub: LoopbackMirror  # AllowUpstream, docker.io and the upstream's own host:port, containerd + CRI-O
    strict: LoopbackMirror  # NeverContactUpstream, docker.io, only nodes labelled STRICT_LABEL
    auth: LoopbackMirror  # the private upstream with the right Secret
    auth_wrong: LoopbackMirror  # the private upstream with a wrong password, only nodes labelled CREDS_LABEL=wrong
    plan_json: str  # the node plan as the operator wrote it
    credentials: dict[str, str]  # regmirror-agent-credentials as the operator wrote it (every node mounts it)

    @property
    def all(self) -> list[LoopbackMirror]:
        return [self.hub, self.strict, self.auth, self.auth_wrong]

    def plan(self) -> str:
        """The plan as a node here reads it: every mirror address mapped to loopback."""
        return map_plan(self.plan_json, self.all)


@pytest.fixture(scope="module")
def deployed(
    cluster: LocalCluster,
    operator: OperatorProcess,
    upstream: Registry,
    auth_upstream: Registry,
    tokens: TokenService,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Deployed]:
    names = ["dp-hub", "dp-strict", "dp-auth", "dp-auth-wrong"]
    made = MirrorFactory(cluster)  # for the whole module; deleted (and waited for) at its end
    for secret, password in (("dp-auth-creds", AUTH_PASSWORD), ("dp-auth-wrong-creds", WRONG_PASSWORD)):
        made.secret(secret, username=AUTH_USER, password=password)
    # The private upstream's CA, given the way a user would; the operator's check and the mirror both need it.
    made.secret("dp-auth-ca", **{"ca.crt": tokens.ca_pem.decode()})
    auth_tls = {"caSecretRef": {"name": "dp-auth-ca", "key": "ca.crt"}}
    not_strict = {"matchExpressions": [{"key": STRICT_LABEL, "operator": "DoesNotExist"}]}
    bodies = [
        mirror_cr(
            "dp-hub",
            upstream.url,
            upstream={"url": upstream.url, "hosts": ["docker.io", upstream.address]},
            nodeConfig={"runtimes": ["containerd", "crio"], "nodeSelector": not_strict},
        ),
        mirror_cr(
            "dp-strict",
            upstream.url,
            upstream={"url": upstream.url, "hosts": ["docker.io"]},
            # A strict docker.io mirror cannot run an image from docker.io (admission refuses the bootstrap deadlock).
            image="registry.corp.example/mirror/registry:3.0.0",
            nodeConfig={"fallback": "NeverContactUpstream", "nodeSelector": {"matchLabels": {STRICT_LABEL: "true"}}},
        ),
        mirror_cr(
            "dp-auth",
            auth_upstream.url,
            upstream={"url": auth_upstream.url, "credentialsSecretRef": {"name": "dp-auth-creds"}, "tls": auth_tls},
            nodeConfig={"nodeSelector": {"matchExpressions": [{"key": CREDS_LABEL, "operator": "DoesNotExist"}]}},
        ),
        mirror_cr(
            "dp-auth-wrong",
            auth_upstream.url,
            upstream={"url": auth_upstream.url, "credentialsSecretRef": {"name": "dp-auth-wrong-creds"}, "tls": auth_tls},
            nodeConfig={"nodeSelector": {"matchLabels": {CREDS_LABEL: "wrong"}}},
        ),
    ]
    try:
        for body in bodies:
            made.track_mirror(body["metadata"]["name"])
            cluster.kubectl("apply", "--server-side", "--field-manager=e2e-admin", "-f", "-", input=body)
        objects = {name: read_mirror_objects(cluster, operator, name) for name in names}
        plan_json = read_node_plan(cluster, operator, names)
        credentials = read_node_credentials(cluster, operator, plan_json)
        work = tmp_path_factory.mktemp("mirrors")
        yield Deployed(
            hub=LoopbackMirror.plan(objects["dp-hub"], work / "hub", docker_hub=upstream.url),
            strict=LoopbackMirror.plan(objects["dp-strict"], work / "strict", docker_hub=upstream.url),
            auth=LoopbackMirror.plan(objects["dp-auth"], work / "auth"),
            auth_wrong=LoopbackMirror.plan(objects["dp-auth-wrong"], work / "auth-wrong"),
            plan_json=plan_json,
            credentials=credentials,
        )
    finally:
        made.cleanup()


@pytest.fixture(scope="module")
def hub(deployed: Deployed) -> Iterator[Registry]:
    """The dp-hub mirror, running. Debian's registry 2.8 needs its upstream up to start (it is)."""
    with deployed.hub.run() as registry:
        yield registry


def make_node(
    binaries: ContainerdBinaries,
    root: Path,
    plan_json: str | None,
    labels: dict[str, str] | None = None,
    credentials: dict[str, str] | None = None,
) -> AgentNode:
    """A simulated node's host root holding the agent's Secret (`credentials`); the agent applied once with `plan_json` (None: not yet)."""
    node = AgentNode(root.name, root, labels or {}, runtime_version=f"containerd://{binaries.version}.0", credentials=credentials or {})
    node.write_containerd_config()
    node.certs_dir.mkdir(parents=True, exist_ok=True)
    if plan_json is not None:
        rc, events = node.agent_once(plan_json)
        assert rc == 0, events
    return node


@contextlib.contextmanager
def node_with_containerd(
    binaries: ContainerdBinaries,
    root: Path,
    plan_json: str | None,
    labels: dict[str, str] | None = None,
    credentials: dict[str, str] | None = None,
) -> Iterator[tuple[AgentNode, Containerd]]:
    """make_node, then a containerd of its own reading the node's certs.d."""
    node = make_node(binaries, root, plan_json, labels, credentials)
    with Containerd.start(binaries, str(node.certs_dir)) as daemon:
        yield node, daemon


def pull(daemon: Containerd, node: AgentNode, ref: str, timeout: float = 60) -> float:
    """ctr pull through the node's certs.d; returns seconds; fails the test with ctr's output if it fails."""
    started = time.monotonic()
    result = daemon.pull(ref, hosts_dir=str(node.certs_dir), timeout=timeout)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, f"pull {ref} failed:\n{result.stderr[-1500:]}\n{result.stdout[-500:]}"
    return elapsed


def registry_major() -> int:
    """Major version of the docker-registry binary ("docker-registry github.com/docker/distribution 2.8.2+ds1")."""
    out = subprocess.run(["docker-registry", "--version"], capture_output=True, text=True, check=True).stdout.split()
    return int(out[-1].lstrip("v").split(".")[0])


def hub_ref(image: BuiltImage) -> str:
    return f"docker.io/{image.name}:{image.tag}"


# ------------------------------------------------------------------ tests


def test_three_nodes_pull_through_the_mirror_and_the_upstream_serves_each_blob_once(
    containerd_bin: ContainerdBinaries,
    deployed: Deployed,
    hub: Registry,
    upstream: Registry,
    images: dict[str, BuiltImage],
    tmp_path: Path,
) -> None:
    multi, index = images["multi"], images["multiarch"]
    refs = [hub_ref(multi), f"{upstream.address}/{index.name}:{index.tag}"]  # docker.io, and a host with a port
    with contextlib.ExitStack() as stack:
        nodes = [
            stack.enter_context(
                node_with_containerd(containerd_bin, tmp_path / f"node{i}", deployed.plan(), credentials=deployed.credentials)
            )
            for i in range(3)
        ]
        for node, _ in nodes:
            written = sorted(p.relative_to(node.certs_dir).as_posix() for p in node.certs_dir.rglob("hosts.toml"))
            hub_dirs = ["docker.io/hosts.toml", "index.docker.io/hosts.toml", "registry-1.docker.io/hosts.toml"]  # Docker Hub's spellings
            assert written == sorted([*hub_dirs, f"127.0.0.1_{upstream.port}_/hosts.toml"])
            assert (node.certs_dir / "docker.io" / "hosts.toml").read_text().startswith(c.OWNERSHIP_MARKER)
        # The first node pulls cold; the other two pull at the same time, warm.
        for ref in refs:
            pull(nodes[0][1], nodes[0][0], ref)
        blobs = [*multi.blobs_for_host, *index.blobs_for_host]
        # distribution 3 (the operator's default image) tees a missed blob into its cache while
        # serving it: one upstream GET. Debian's 2.8 streams it to the client and fetches it a
        # second time to store it (registry/proxy/proxyblobstore.go, ServeBlob + storeLocal),
        # possibly after the client's pull ended: "warm" is when the mirror has stored them all.
        per_blob = 1 if registry_major() >= 3 else 2
        wait_for(lambda: all(deployed.hub.holds_blob(d) for d in blobs), 30, "the mirror to store every blob of the first pull")
        after_first = upstream.blob_gets_logged(blobs, per_blob)
        errors: list[BaseException] = []

        def pull_all(node: AgentNode, daemon: Containerd) -> None:
            try:
                for ref in refs:
                    pull(daemon, node, ref)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=pull_all, args=(node, daemon)) for node, daemon in nodes[1:]]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        for _, daemon in nodes:
            listed = daemon.ctr("images", "ls", "-q").stdout.split()
            assert set(refs) <= set(listed), listed

    from_upstream = blob_gets(upstream.requests_log(), blobs)
    from_mirror = hub.blob_gets_logged(blobs, 3)
    print(f"\nblob GETs served by the mirror (3 nodes): {sorted(from_mirror.values())}")
    print(f"blob GETs served by the upstream after node 1: {sorted(after_first.values())}, after all 3: {sorted(from_upstream.values())}")
    print(f"mirror expvar proxy counters: {deployed.hub.debug_vars().get('registry', {}).get('proxy')}")
    assert from_mirror == dict.fromkeys(blobs, 3), "each node fetched each blob from the mirror"
    assert from_upstream == after_first, "nodes 2 and 3 cost the upstream nothing"
    assert from_upstream == dict.fromkeys(blobs, per_blob), (
        f"the upstream served each blob {per_blob}x (docker-registry {registry_major()}.x)"
    )
    containerd_direct = [r for r in served_requests(upstream.requests_log()) if r.agent.startswith("containerd")]
    assert containerd_direct == [], "no node went to the upstream"


def test_upstream_down_a_warm_pull_is_served_from_the_cache(
    containerd_bin: ContainerdBinaries, deployed: Deployed, hub: Registry, upstream: Registry, images: dict[str, BuiltImage], tmp_path: Path
) -> None:
    ref = hub_ref(images["multi"])
    with node_with_containerd(containerd_bin, tmp_path / "warm", deployed.plan(), credentials=deployed.credentials) as (node, daemon):
        pull(daemon, node, ref)  # warms the mirror (if an earlier test has not)
    with (
        upstream.stopped(),
        node_with_containerd(containerd_bin, tmp_path / "cold-node", deployed.plan(), credentials=deployed.credentials) as (node, daemon),
    ):
        assert not upstream.answers()
        seconds = pull(daemon, node, ref)
        print(f"\nwarm pull with the upstream down: {seconds:.3f}s")


def test_mirror_down_allow_upstream_withdraws_the_mirror_and_pulls_go_to_the_upstream(
    containerd_bin: ContainerdBinaries, deployed: Deployed, hub: Registry, upstream: Registry, images: dict[str, BuiltImage], tmp_path: Path
) -> None:
    multi = images["multi"]
    ref = f"{upstream.address}/{multi.name}:{multi.tag}"  # docker.io's fallback would need the internet
    host_dir = f"127.0.0.1_{upstream.port}_"
    timings: dict[str, float] = {}
    direct_runs = []
    for i in range(2):  # the first pull also warms the upstream's page cache: keep the best of two
        with node_with_containerd(containerd_bin, tmp_path / f"direct{i}", None, credentials=deployed.credentials) as (node, daemon):
            direct_runs.append(pull(daemon, node, ref))
    timings["direct (no mirror configured)"] = min(direct_runs)
    for i in range(2):  # the first pull through the mirror fills its cache; the second is the warm one
        with node_with_containerd(containerd_bin, tmp_path / f"through{i}", deployed.plan(), credentials=deployed.credentials) as (
            node,
            daemon,
        ):
            timings["through the mirror (warm)"] = pull(daemon, node, ref)
    # Two nodes configured while the mirror is up: one keeps its files (no agent running), one runs the agent loop.
    stale = make_node(containerd_bin, tmp_path / "stale", deployed.plan(), credentials=deployed.credentials)
    looping = make_node(containerd_bin, tmp_path / "loop", None, credentials=deployed.credentials)
    with looping.agent_loop(deployed.plan(), interval=0.5) as agent:
        agent.wait_event("files.applied")
        assert (looping.certs_dir / host_dir / "hosts.toml").exists()
        with hub.stopped():
            with Containerd.start(containerd_bin, str(stale.certs_dir)) as daemon:
                assert (stale.certs_dir / host_dir / "hosts.toml").exists()
                timings["dead mirror still listed (containerd falls back)"] = pull(daemon, stale, ref)
            event = agent.wait_event("mirror.withdrawn", mirror="dp-hub")
            wait_for(lambda: not (looping.certs_dir / host_dir / "hosts.toml").exists(), 10, "the agent to remove the dead mirror's file")
            with Containerd.start(containerd_bin, str(looping.certs_dir)) as daemon:
                timings["mirror withdrawn by the agent"] = pull(daemon, looping, ref)
    print(f"\nagent: {event['event']} after the mirror stopped: {event.get('error')}")
    direct = timings["direct (no mirror configured)"]
    print("pull timings, mirror down under AllowUpstream:")
    for what, seconds in timings.items():
        print(f"  {what:50s} {seconds:6.3f}s  ({seconds / direct:4.2f}x direct, {seconds - direct:+.3f}s)")
    assert [r for r in served_requests(upstream.requests_log()) if r.agent.startswith("containerd") and "/manifests/" in r.uri]


def test_never_contact_upstream_fails_when_its_mirror_is_down(
    containerd_bin: ContainerdBinaries, deployed: Deployed, upstream: Registry, images: dict[str, BuiltImage], tmp_path: Path
) -> None:
    labels = {STRICT_LABEL: "true"}
    with node_with_containerd(containerd_bin, tmp_path / "strict", None, labels, credentials=deployed.credentials) as (node, daemon):
        with deployed.strict.run() as strict:
            rc, events = node.agent_once(deployed.plan())
            assert rc == 0, events
            toml = (node.certs_dir / "docker.io" / "hosts.toml").read_text()
            assert f'server = "{deployed.strict.url}"' in toml, toml
            assert "dp-hub" not in toml, "the hub mirror does not select strict nodes"
            pull(daemon, node, hub_ref(images["multi"]))
            assert strict.blob_gets_logged(images["multi"].blobs_for_host, 1) == dict.fromkeys(images["multi"].blobs_for_host, 1)
        before = len(upstream.requests_log())
        rc, events = node.agent_once(deployed.plan())
        assert any(e["event"] == "mirror.unreachable" and e["mirror"] == "dp-strict" for e in events), events
        assert (node.certs_dir / "docker.io" / "hosts.toml").read_text() == toml, "a strict mirror stays in the files when down"
        started = time.monotonic()
        result = daemon.pull(hub_ref(images["multiarch"]), hosts_dir=str(node.certs_dir), timeout=60)
        print(f"\nstrict pull with the mirror down failed after {time.monotonic() - started:.2f}s: {result.stderr.strip()[-300:]}")
        assert result.returncode != 0
        assert upstream.requests_log()[before:] == "", "nothing reached the upstream"


def test_crio_dropin_resolves_through_the_mirror_with_skopeo(
    containerd_bin: object, deployed: Deployed, hub: Registry, upstream: Registry, images: dict[str, BuiltImage], tmp_path: Path
) -> None:
    node = AgentNode("crio", tmp_path / "crio", {}, credentials=deployed.credentials)
    node.write_containerd_config()
    rc, events = node.agent_once(deployed.plan())
    assert rc == 0, events
    dropin = (node.crio_dir / c.CRIO_DROPIN_FILE).read_text()
    assert dropin.startswith(c.OWNERSHIP_MARKER)
    conf = tmp_path / "registries.conf"
    # A whole registries.conf: the drop-in, plus the short-name search list CRI-O nodes usually have.
    conf.write_text('unqualified-search-registries = ["docker.io"]\n' + dropin)
    before, upstream_before = len(served_requests(hub.requests_log())), len(served_requests(upstream.requests_log()))
    result = subprocess.run(
        ["skopeo", "--registries-conf", str(conf), "inspect", "--raw", f"docker://{hub_ref(images['multiarch'])}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"{result.stderr}\n--- {conf}:\n{conf.read_text()}"
    assert json.loads(result.stdout)["mediaType"] == "application/vnd.oci.image.index.v1+json"
    new = served_requests(hub.requests_log())[before:]
    assert any(r.agent.startswith("skopeo") and r.uri.startswith("/v2/library/multiarch/manifests/v1") for r in new), new
    assert not [r for r in served_requests(upstream.requests_log())[upstream_before:] if r.agent.startswith("skopeo/")], (
        "skopeo never went to the upstream"
    )


def test_dockerd_pulls_a_short_name_through_the_mirror(
    containerd_bin: object, deployed: Deployed, hub: Registry, upstream: Registry, images: dict[str, BuiltImage]
) -> None:
    reason = ensure_commands({"docker.io": "dockerd"})
    if reason or not docker_cli():
        pytest.skip(reason or "no docker CLI")
    daemon_json = render_docker_daemon_json(parse_plan(deployed.plan()), {})
    assert daemon_json == {"registry-mirrors": [deployed.hub.url], "insecure-registries": [f"{deployed.hub.host}:{deployed.hub.port}"]}
    before = len(served_requests(hub.requests_log()))
    with Dockerd.start(daemon_json) as dockerd:
        result = dockerd.docker("pull", images["multi"].short + ":v1")
        assert result.returncode == 0, f"{result.stderr}\n{dockerd.log()[-2000:]}"
        assert f"docker.io/{images['multi'].name}:v1" in result.stdout
    new = [r for r in served_requests(hub.requests_log())[before:] if r.agent.startswith("docker/")]
    assert any(r.uri.startswith("/v2/library/multi/manifests/v1") for r in new), new
    assert not [r for r in served_requests(upstream.requests_log()) if r.agent.startswith("docker/")], "dockerd never went to the upstream"


def test_authenticated_upstream_works_with_the_secrets_credentials(
    containerd_bin: ContainerdBinaries,
    deployed: Deployed,
    auth_upstream: Registry,
    tokens: TokenService,
    images: dict[str, BuiltImage],
    tmp_path: Path,
) -> None:
    env = deployed.auth.argv_env()[1]
    assert (env["REGISTRY_PROXY_USERNAME"], env["REGISTRY_PROXY_PASSWORD"]) == (AUTH_USER, AUTH_PASSWORD), "from the Secret"
    assert AUTH_PASSWORD not in deployed.auth.objects.config_yml
    # The mirror trusts the token service's CA through the Secret volume the Deployment mounts (SSL_CERT_DIR).
    ca_files = [Path(d, "ca.crt") for d in env["SSL_CERT_DIR"].split(":") if Path(d, "ca.crt").is_file()]
    assert [f.read_bytes() for f in ca_files] == [tokens.ca_pem], env["SSL_CERT_DIR"]
    without_ca = check_upstream(auth_upstream.url, AUTH_USER, AUTH_PASSWORD)
    assert (without_ca.ok, without_ca.reason) == (None, "TLSError"), without_ca
    check = check_upstream(auth_upstream.url, AUTH_USER, AUTH_PASSWORD, ca_pem=tokens.ca_pem)
    assert (check.ok, check.reason) == (True, "Authenticated"), check
    private = images["private"]
    with (
        deployed.auth.run() as mirror,
        node_with_containerd(containerd_bin, tmp_path / "auth", deployed.plan(), credentials=deployed.credentials) as (node, daemon),
    ):
        pull(daemon, node, f"{auth_upstream.address}/{private.name}:{private.tag}")
        assert mirror.blob_gets_logged(private.blobs_for_host, 1) == dict.fromkeys(private.blobs_for_host, 1)


def test_wrong_credentials_are_reported_not_silently_bypassed(
    containerd_bin: ContainerdBinaries,
    deployed: Deployed,
    auth_upstream: Registry,
    images: dict[str, BuiltImage],
    tokens: TokenService,
    tmp_path: Path,
    cluster: LocalCluster,
) -> None:
    check = check_upstream(auth_upstream.url, AUTH_USER, WRONG_PASSWORD, ca_pem=tokens.ca_pem)
    print(f"\ncheck_upstream with the wrong password: {check}")
    assert (check.ok, check.reason) == (False, "CredentialsRejected")
    assert WRONG_PASSWORD not in check.message

    private = images["private"]
    ref = f"{auth_upstream.address}/{private.name}:{private.tag}"
    with deployed.auth_wrong.run() as mirror:
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(f"{mirror.url}/v2/{private.name}/manifests/{private.tag}", timeout=10) as resp:
                status = resp.status
        except urllib.error.HTTPError as exc:
            status = exc.code
        print(f"the mirror with wrong credentials answers a manifest request with HTTP {status}")
        assert status >= 400
        with node_with_containerd(
            containerd_bin, tmp_path / "wrong", deployed.plan(), {CREDS_LABEL: "wrong"}, credentials=deployed.credentials
        ) as (node, daemon):
            result = daemon.pull(ref, hosts_dir=str(node.certs_dir), timeout=60)
            print(
                f"containerd through it (AllowUpstream, so it falls back to the upstream): rc={result.returncode} {result.stderr.strip()[-300:]}"
            )
    fallback = [r for r in served_requests(auth_upstream.requests_log()) if r.agent.startswith("containerd")]
    print(f"the upstream saw the node itself (fallback): {[(r.method, r.uri, r.status) for r in fallback][:4]}")
    assert fallback, "under AllowUpstream the node falls back to the upstream: only a condition tells the admin why"

    # What the admin sees: the UpstreamAuthenticated condition, once the operator ran its check.
    # Its absence is a regression (the operator stopped checking), never a reason to skip.
    cond = wait_for(
        lambda: condition(get_mirror(cluster, "dp-auth-wrong"), "UpstreamAuthenticated"),
        20,
        "the operator to set UpstreamAuthenticated on dp-auth-wrong",
        diagnose=lambda: json.dumps(get_mirror(cluster, "dp-auth-wrong").get("status"), indent=1),
    )
    assert (cond["status"], cond["reason"]) == ("False", "CredentialsRejected"), cond
    assert WRONG_PASSWORD not in json.dumps(get_mirror(cluster, "dp-auth-wrong"))
    good = condition(get_mirror(cluster, "dp-auth"), "UpstreamAuthenticated")
    assert good is not None and good["status"] == "True", good
