"""The mirror pod of the cache work, on loopback: every container of the rendered Deployment as a process.

`CachePod.run(spec, workdir)` renders the children exactly as the operator
does (`render_mirror_children`) and runs each container of the Deployment with
its own args, env and config, only addresses and paths mapped:
- `registry`: distribution v3 (built by `make distribution`), the
  ConfigMap's config.yml;
- `front`: Debian's varnishd (7.1) with the ConfigMap's front.vcl;
- `front-stats`: the container's own shell loop around varnishstat;
- `cache`: `python -m regmirror cache serve`, reading the mirror ConfigMap's
  files from a directory the test can rewrite (as the kubelet does).

Nodes: `configured_node` runs `regmirror agent --once` with the node plan of
this mirror mapped to the front's port; `UpstreamFaults` takes a real upstream
registry down in the ways the cache must survive (stopped, blackholed, 429/503).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml

E2E = Path(__file__).resolve().parents[1] / "e2e"
if str(E2E) not in sys.path:
    sys.path.insert(0, str(E2E))

from _dataplane import (  # noqa: E402
    AgentNode,
    ContainerdBinaries,
    LoopbackMap,
    Registry,
    free_port,
    map_plan,
    map_to_loopback,
    resolve_env,
    wait_for,
)

from harness.processes import stop_process  # noqa: E402
from regmirror import constants as c  # noqa: E402
from regmirror.access import AccessInputs, decide_access  # noqa: E402
from regmirror.models import RegistryMirrorSpec  # noqa: E402
from regmirror.nodeplan import build_node_plan, mirror_entry  # noqa: E402
from regmirror.render import cache as render_cache  # noqa: E402
from regmirror.render import mirror as render_mirror  # noqa: E402
from regmirror.render.front import ACCESS_DIR, ACCESS_FILE, ACCESS_FILE_KEY, CACHE_SIDECAR_PORT, REGISTRY_BACKEND_PORT  # noqa: E402

NAMESPACE = "regmirror-system"
CLUSTER_IP = "10.96.0.77"
OPERATOR_SRC = str(Path(__file__).resolve().parents[2] / "operator")
BUILD_TOOL = Path(__file__).resolve().parents[1] / "tools" / "build.sh"


def distribution_v3() -> tuple[str | None, str]:
    """(path of the distribution 3 registry binary, or None) and why not; builds it once (cached)."""
    override = os.environ.get("REGMIRROR_BENCH_REGISTRY")
    if override and Path(override).exists():
        return override, ""
    if not shutil.which("go"):
        return None, "no Go toolchain to build distribution 3 (make distribution)"
    proc = subprocess.run(["bash", str(BUILD_TOOL), "registry"], capture_output=True, text=True, timeout=1800, check=False)
    if proc.returncode != 0:
        return None, f"building distribution 3 failed: {proc.stderr.strip()[-600:]}"
    return proc.stdout.strip().splitlines()[-1], ""


def registry_version(binary: str) -> str:
    """`registry --version`'s version word."""
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False).stdout.split()
    return out[-1] if out else "?"


def varnish_version() -> str | None:
    """varnishd's version, or None when it is not installed."""
    if not shutil.which("varnishd"):
        return None
    out = subprocess.run(["varnishd", "-V"], capture_output=True, text=True, check=False).stderr
    match = re.search(r"varnish-([0-9.]+)", out)
    return match.group(1) if match else "?"


@dataclass
class CachePod:
    """The rendered mirror pod's containers running on loopback."""

    name: str
    spec: RegistryMirrorSpec
    workdir: Path
    children: list[dict[str, Any]]
    ports: dict[str, int]
    registry_binary: str
    secrets: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    # Where the Service's target port listens: 0.0.0.0 lets clients reach the front from an address
    # that is not the pod's loopback (which the front treats as the pod's own containers).
    listen_host: str = "127.0.0.1"
    # Where the cache sidecar listens: by default a free port on 127.0.0.1; a test that lets the
    # operator poll it gives the pod an address of its own, and the sidecar takes the port the
    # operator polls (CACHE_SIDECAR_PORT) there, as in the pod.
    sidecar_host: str = "127.0.0.1"

    # ------------------------------------------------------------ rendered objects

    def _object(self, kind: str, name: str | None = None) -> dict[str, Any]:
        for obj in self.children:
            if obj["kind"] == kind and (name is None or obj["metadata"]["name"] == name):
                return obj
        raise KeyError(f"{kind} {name}")

    @property
    def deployment(self) -> dict[str, Any]:
        return self._object("Deployment")

    def container(self, name: str) -> dict[str, Any]:
        for container in self.deployment["spec"]["template"]["spec"]["containers"]:
            if container["name"] == name:
                return dict(container)
        raise KeyError(name)

    @property
    def has_front(self) -> bool:
        return render_mirror.front_enabled(self.spec)

    @property
    def url(self) -> str:
        """What nodes reach: the front (or the registry, without one)."""
        return f"http://127.0.0.1:{self.ports['front']}"

    @property
    def sidecar_url(self) -> str:
        return f"http://{self.sidecar_host}:{self.ports['sidecar']}"

    @property
    def storage(self) -> Path:
        return self.workdir / "storage"

    @property
    def control_dir(self) -> Path:
        return self.workdir / "control"

    @property
    def access_dir(self) -> Path:
        """Where the mirror's access Secret is mounted (access.vcl for the front, htpasswd for an HTTPS registry)."""
        return self.workdir / "access"

    def write_access(self, data: Mapping[str, str]) -> None:
        """Swap in the access Secret's files the way the kubelet updates a Secret volume: each file at once."""
        self.access_dir.mkdir(parents=True, exist_ok=True)
        for key in (ACCESS_FILE_KEY, render_mirror.HTPASSWD_KEY):
            if key in data:
                tmp = self.access_dir / f".{key}.tmp"
                tmp.write_text(data[key])
                os.replace(tmp, self.access_dir / key)

    # ------------------------------------------------------------ mapping

    def mapping(self) -> LoopbackMap:
        host = "127.0.0.1"
        addresses = {
            f":{c.REGISTRY_PORT}": f"{self.listen_host}:{self.ports['front']}",
            f":{REGISTRY_BACKEND_PORT}": f"{host}:{self.ports['backend']}",
            f":{c.REGISTRY_DEBUG_PORT}": f"{host}:{self.ports['debug']}",
            f":{CACHE_SIDECAR_PORT}": f"{self.sidecar_host}:{self.ports['sidecar']}",
            f"127.0.0.1:{REGISTRY_BACKEND_PORT}": f"{host}:{self.ports['backend']}",
            f"127.0.0.1:{c.REGISTRY_PORT}": f"{host}:{self.ports['front']}",
            f"127.0.0.1:{c.REGISTRY_DEBUG_PORT}": f"{host}:{self.ports['debug']}",
            f"127.0.0.1:{CACHE_SIDECAR_PORT}": f"{self.sidecar_host}:{self.ports['sidecar']}",
            f"{CLUSTER_IP}:{self.spec.service.port}": f"{host}:{self.ports['front']}",
        }
        paths = {
            c.REGISTRY_STORAGE_PATH: str(self.storage),
            render_mirror.CONFIG_DIR: str(self.workdir / "etc"),
            render_cache.FRONT_CONFIG_DIR: str(self.workdir / "front-config"),
            "/var/lib/varnish": str(self.workdir / "varnish"),
            render_cache.FRONT_STORE_DIR: str(self.workdir / "front-store"),
            render_cache.STATS_DIR: str(self.workdir / "stats"),
            render_cache.CONTROL_DIR: str(self.control_dir),
            ACCESS_DIR: str(self.access_dir),
            render_mirror.ACCESS_SECRET_DIR: str(self.access_dir),
            render_mirror.TLS_DIR: str(self.workdir / "tls"),
        }
        return LoopbackMap(addresses, paths)

    def map_arg(self, value: str) -> str:
        """An argument of a container command: whole-value mapping first, then addresses and paths inside it."""
        mapping = self.mapping()
        mapped = map_to_loopback(value, mapping)
        if mapped != value:
            return str(mapped)
        listen = re.match(r"^:(\d+)(,.*)?$", value)
        if listen and f":{listen.group(1)}" in mapping.addresses:
            return mapping.addresses[f":{listen.group(1)}"] + (listen.group(2) or "")
        for prefix, target in sorted(mapping.paths.items(), key=lambda kv: -len(kv[0])):
            value = re.sub(re.escape(prefix) + r"(?=/|$|,|\s|;)", target, value)
        return value

    def map_vcl(self, vcl: str) -> str:
        vcl = vcl.replace(f'include "{ACCESS_FILE}";', f'include "{self.access_dir / ACCESS_FILE_KEY}";')
        vcl = vcl.replace(f'.port = "{REGISTRY_BACKEND_PORT}";', f'.port = "{self.ports["backend"]}";')
        vcl = vcl.replace(
            f'.host = "127.0.0.1";\n    .port = "{CACHE_SIDECAR_PORT}";',
            f'.host = "{self.sidecar_host}";\n    .port = "{CACHE_SIDECAR_PORT}";',
        )
        return vcl.replace(f'.port = "{CACHE_SIDECAR_PORT}";', f'.port = "{self.ports["sidecar"]}";')

    # ------------------------------------------------------------ control files (what the kubelet mounts)

    def write_control(self, *, pins: list[str] | None = None, invalidations: Mapping[str, str] | None = None) -> None:
        """Write the cache sidecar's files, as the operator would render them with these inputs."""
        self.mount_control(render_cache.control_data(self.spec, pins=pins or (), invalidations=invalidations))

    def mount_control(self, data: Mapping[str, str]) -> None:
        """Swap in the sidecar's keys of the mirror's ConfigMap as the operator wrote them, each file at once (as the kubelet does)."""
        self.control_dir.mkdir(parents=True, exist_ok=True)
        for key, value in data.items():
            tmp = self.control_dir / f".{key}.tmp"
            tmp.write_text(value)
            os.replace(tmp, self.control_dir / key)

    # ------------------------------------------------------------ processes

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        log = (self.workdir / f"{name}.log").open("ab")
        self.procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def log(self, name: str) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def _env(self, container: dict[str, Any]) -> dict[str, str]:
        env = map_to_loopback(resolve_env(container, self.secrets), self.mapping())
        return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env}

    def start_registry(self) -> None:
        registry = self.container("registry")
        config = map_to_loopback(
            yaml.safe_load(self._object("ConfigMap", render_mirror.naming.child_name(self.name))["data"]["config.yml"]), self.mapping()
        )
        config_file = Path(self.map_arg(render_mirror.CONFIG_PATH))
        config_file.parent.mkdir(parents=True, exist_ok=True)
        config_file.write_text(yaml.safe_dump(config, sort_keys=False))
        self.storage.mkdir(parents=True, exist_ok=True)
        args = [self.map_arg(a) for a in registry["args"]]
        self._spawn("registry", [self.registry_binary, *args], self._env(registry))
        port = self.ports["backend"] if self.has_front else self.ports["front"]
        wait_for(lambda: self._answers(port) or self.procs["registry"].poll() is not None, 20, "registry")
        if self.procs["registry"].poll() is not None:
            raise RuntimeError(f"registry exited:\n{self.log('registry')[-2000:]}")

    def start_sidecar(self) -> None:
        sidecar = self.container("cache")
        args = [self.map_arg(a) for a in sidecar["args"]]
        env = {**self._env(sidecar), "PYTHONPATH": OPERATOR_SRC}
        self._spawn("cache", [sys.executable, "-m", "regmirror", *args], env)
        wait_for(lambda: self._get_ok(f"{self.sidecar_url}/healthz") or self.procs["cache"].poll() is not None, 20, "cache sidecar")
        if self.procs["cache"].poll() is not None:
            raise RuntimeError(f"cache sidecar exited:\n{self.log('cache')[-2000:]}")

    def start_front(self) -> None:
        front = self.container("front")
        cm = self._object("ConfigMap", render_mirror.naming.child_name(self.name))
        vcl_dir = Path(self.map_arg(render_cache.FRONT_CONFIG_DIR))
        vcl_dir.mkdir(parents=True, exist_ok=True)
        (vcl_dir / "front.vcl").write_text(self.map_vcl(cm["data"]["front.vcl"]))
        for key in ("/var/lib/varnish", render_cache.FRONT_STORE_DIR, render_cache.STATS_DIR):
            Path(self.map_arg(key)).mkdir(parents=True, exist_ok=True)
        args = [self.map_arg(a) for a in front["args"]]
        self._spawn("front", [*front["command"], *args])
        wait_for(lambda: self._answers(self.ports["front"]) or self.procs["front"].poll() is not None, 60, "varnishd")
        if self.procs["front"].poll() is not None:
            raise RuntimeError(f"varnishd exited:\n{self.log('front')[-3000:]}")
        stats = self.container("front-stats")
        self._spawn("front-stats", [stats["command"][0], stats["command"][1], self.map_arg(stats["command"][2])])

    def stop(self) -> None:
        for name in reversed(list(self.procs)):
            proc = self.procs[name]
            stop_process(proc, 10, group=True)
        self.procs.clear()

    @classmethod
    @contextlib.contextmanager
    def run(
        cls,
        spec: RegistryMirrorSpec,
        workdir: Path,
        registry_binary: str,
        *,
        name: str = "cachepod",
        secrets: Mapping[str, Mapping[str, str]] | None = None,
        pins: list[str] | None = None,
        access: Mapping[str, str] | None = None,
        access_enforced: bool | None = None,
        listen_host: str = "127.0.0.1",
        sidecar_host: str | None = None,
    ) -> Iterator[CachePod]:
        """Start registry, sidecar, front and front-stats (in that order: the front probes the sidecar)."""
        workdir.mkdir(parents=True, exist_ok=True)
        children = render_mirror.render_mirror_children(name, "uid", spec, NAMESPACE, access_enforced=access_enforced)
        ports = {k: free_port() for k in ("front", "backend", "debug", "sidecar")}
        if sidecar_host is not None:
            ports["sidecar"] = CACHE_SIDECAR_PORT
        pod = cls(
            name,
            spec,
            workdir,
            children,
            ports,
            registry_binary,
            secrets or {},
            listen_host=listen_host,
            sidecar_host=sidecar_host or "127.0.0.1",
        )
        try:
            # The access Secret the operator creates before the Deployment (regmirror/access.py).
            pod.write_access(access if access is not None else decide_access(AccessInputs(name, spec, now=0.0)).auth_data)
            pod.write_control(pins=pins)
            pod.start_registry()
            pod.start_sidecar()
            if pod.has_front:
                pod.start_front()
                pod.wait_upstream_verdict(True, timeout=20)
            yield pod
        finally:
            pod.stop()

    # ------------------------------------------------------------ probes

    @staticmethod
    def _answers(port: int) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=1) as resp:
                return bool(resp.status == 200)
        except urllib.error.HTTPError:
            return True
        except OSError:
            return False

    @staticmethod
    def _get_ok(url: str) -> bool:
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                return bool(resp.status == 200)
        except (OSError, ValueError):
            return False

    def stats(self) -> dict[str, Any]:
        """The sidecar's /stats."""
        with urllib.request.urlopen(f"{self.sidecar_url}/stats", timeout=5) as resp:
            return dict(json.loads(resp.read()))

    def wait_upstream_verdict(self, reachable: bool, timeout: float = 30) -> None:
        """Until the sidecar's probe (what the front reads) says the upstream is (un)reachable."""
        wait_for(lambda: self.stats().get("upstreamReachable") is reachable, timeout, f"upstream reachable={reachable}")

    def front_sees_upstream(self, healthy: bool, timeout: float = 30) -> None:
        """Until varnishd's own probe of the sidecar agrees (it polls every 2 s, 2 of 3 needed)."""
        workdir = self.map_arg(render_cache.FRONT_WORK_DIR)

        def agrees() -> bool:
            out = subprocess.run(["varnishadm", "-n", workdir, "backend.list"], capture_output=True, text=True, check=False).stdout
            line = next((ln for ln in out.splitlines() if "upstream_health" in ln), "")
            return ("healthy" in line and "sick" not in line) if healthy else ("sick" in line)

        wait_for(agrees, timeout, f"varnishd sees the upstream {'healthy' if healthy else 'sick'}")

    def wait_janitor(self, predicate: Any, timeout: float = 30, what: str = "the janitor") -> dict[str, Any]:
        """Until the sidecar's /stats satisfy `predicate`; returns them."""
        found: list[dict[str, Any]] = []

        def check() -> bool:
            doc = self.stats()
            if predicate(doc):
                found.append(doc)
                return True
            return False

        wait_for(check, timeout, what)
        return found[-1]

    def blob_present(self, digest: str) -> bool:
        from regmirror.cache import store

        return (store.blob_dir(self.storage, digest) / "data").exists()

    def disk_bytes(self) -> int:
        """Bytes of blob data on the volume, counted here (not by the sidecar)."""
        from regmirror.cache import store

        return sum(b.size for b in store.scan_blobs(self.storage).values()) + store.uploads_bytes(self.storage)


# ------------------------------------------------------------------ nodes


def node_plan(pod: CachePod) -> str:
    """The node plan for this mirror, mapped to the front on loopback."""
    plan = build_node_plan([mirror_entry(pod.name, pod.spec, CLUSTER_IP)]).to_json()
    return map_plan(plan, [_PlanMapping(pod.mapping())])


@dataclass(frozen=True)
class _PlanMapping:
    mapping: LoopbackMap


def configured_node(binaries: ContainerdBinaries, root: Path, pod: CachePod | None) -> AgentNode:
    """A node's host root; with a pod, `regmirror agent --once` applied the plan (the front must answer)."""
    node = AgentNode(root.name, root, {}, runtime_version=f"containerd://{binaries.version}.0")
    node.write_containerd_config()
    node.certs_dir.mkdir(parents=True, exist_ok=True)
    if pod is not None:
        rc, events = node.agent_once(node_plan(pod))
        if rc != 0:
            raise RuntimeError(f"agent --once failed: {events}")
    return node


# ------------------------------------------------------------------ upstream faults


class StatusUpstream:
    """Answers every request with one status (429 with Retry-After, or 503): a rate-limited or broken upstream."""

    def __init__(self, host: str, port: int, status: int) -> None:
        self.requests: list[tuple[str, str]] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                owner.requests.append((self.command, self.path))
                body = json.dumps({"errors": [{"code": "TOOMANYREQUESTS" if status == 429 else "UNAVAILABLE", "message": "e2e"}]}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                if status == 429:
                    self.send_header("Retry-After", "3600")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_HEAD = _answer

            def log_message(self, format: str, *args: Any) -> None:
                return

        ThreadingHTTPServer.allow_reuse_address = True
        self.server = ThreadingHTTPServer((host, port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@contextlib.contextmanager
def upstream_fault(upstream: Registry, kind: str) -> Iterator[Any]:
    """The upstream `stopped` (refused), `blackholed` (packets dropped), or answering `429` / `503`."""
    with upstream.stopped():
        if kind == "stopped":
            yield None
        elif kind == "blackholed":
            # A listener that never accepts would still complete the handshake in the kernel: drop the packets.
            rule = ["OUTPUT", "-d", upstream.host, "-p", "tcp", "--dport", str(upstream.port), "-j", "DROP"]
            subprocess.run(["iptables", "-I", *rule], check=True, capture_output=True)
            try:
                yield None
            finally:
                subprocess.run(["iptables", "-D", *rule], check=False, capture_output=True)
        else:
            fake = StatusUpstream(upstream.host, upstream.port, int(kind))
            try:
                yield fake
            finally:
                fake.close()


def iptables_works() -> bool:
    """Whether this machine lets us add OUTPUT rules (needed to blackhole)."""
    if not shutil.which("iptables"):
        return False
    return subprocess.run(["iptables", "-S", "OUTPUT"], capture_output=True, check=False).returncode == 0


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
