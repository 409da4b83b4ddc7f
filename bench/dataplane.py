"""Data-path scenarios with the real programs, on loopback (the helpers of tests/e2e).

- an "upstream" registry (Debian's docker-registry, access log on) seeded with
  images built here (no internet);
- the mirror: the config.yml, args and env that ``render_mirror_children``
  renders (what the operator writes), run by a real distribution registry (v3,
  the default image's major, when ``$REGMIRROR_BENCH_REGISTRY`` or the cache
  has it; else Debian's 2.8) with only addresses and paths mapped to loopback;
- nodes: ``regmirror agent`` on a temporary host root, and a containerd of its
  own per pull (a fresh content store), pulling with ``ctr`` through the
  hosts.toml the agent wrote.

Every figure is a median over ``repeats`` pulls, each by a fresh containerd.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "e2e"))

from _dataplane import (  # noqa: E402
    AgentNode,
    Containerd,
    ContainerdBinaries,
    LoopbackMirror,
    MirrorObjects,
    Registry,
    blob_gets,
    dead_mirror,
    ensure_binaries,
    ensure_commands,
    map_plan,
    system_containerd,
)
from _images import BuiltImage, multi_layer_image  # noqa: E402

from bench.measure import ProcSampler  # noqa: E402
from harness.cachepath import distribution_v3, registry_version, varnish_version  # noqa: E402
from regmirror.models import RegistryMirrorSpec  # noqa: E402
from regmirror.nodeplan import build_node_plan, mirror_entry  # noqa: E402
from regmirror.render.mirror import render_mirror_children  # noqa: E402

MIRROR = "bench-hub"
CLUSTER_IP = "10.96.0.42"  # the Service address the plan names; mapped to loopback per mirror
PULL_TIMEOUT = 120.0
HUNG_PULL_TIMEOUT = 60.0  # a pull that waits on a blackholed or wedged mirror is given up after this
AGENT_INTERVAL = 2.0  # the agent's default (the DaemonSet does not override it)
_ACCESS = re.compile(r'"GET (?P<uri>\S+) HTTP/[0-9.]+" (?P<status>\d{3}) (?P<size>\d+|-)')


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def mirror_binary() -> tuple[str, str]:
    """(binary, version) of distribution 3, the major of the default image, built from the Go module proxy
    (`make distribution`, cached). No silent fallback to Debian's 2.8: it fetches differently."""
    binary, why = distribution_v3()
    if binary is None:
        raise RuntimeError(f"distribution 3 is needed for the data path: {why}")
    return binary, registry_version(binary)


class Rig:
    """The upstream, the rendered mirror objects and plan, and helpers for nodes and pulls."""

    def __init__(self, work: Path, binaries: ContainerdBinaries, upstream: Registry, registry: tuple[str, str]) -> None:
        self.work = work
        self.binaries = binaries
        self.upstream = upstream
        self.registry_bin, self.registry_version = registry
        spec = RegistryMirrorSpec.model_validate(
            {"upstream": {"url": upstream.url, "hosts": [upstream.address]}, "storage": {"ephemeral": True, "size": "1Gi"}}
        )
        rendered = render_mirror_children(MIRROR, "bench-uid", spec, "regmirror-system")
        deployment = next(o for o in rendered if o["kind"] == "Deployment")
        config_yml = next(o["data"]["config.yml"] for o in rendered if o["kind"] == "ConfigMap" and "config.yml" in o["data"])
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        self.objects = MirrorObjects(MIRROR, config_yml, container, {}, CLUSTER_IP, spec.service.port)
        self.plan_json = build_node_plan([mirror_entry(MIRROR, spec, CLUSTER_IP)]).to_json()
        self._seq = 0
        self.agent_hwm = 0.0

    def _dir(self, prefix: str) -> Path:
        self._seq += 1
        return self.work / f"{prefix}{self._seq}"

    def new_mirror(self) -> LoopbackMirror:
        """A mirror with an empty cache and ports of its own."""
        return LoopbackMirror.plan(self.objects, self._dir("mirror"))

    @contextlib.contextmanager
    def run_mirror(self, mirror: LoopbackMirror) -> Iterator[Registry]:
        argv, env = mirror.argv_env()
        argv[0] = self.registry_bin
        with Registry.launch(mirror.workdir, argv, env, mirror.host, mirror.port) as registry:
            yield registry

    def node(self, mirror: LoopbackMirror | None) -> AgentNode:
        """A node; with a mirror, the agent has applied the plan once (while the mirror answers)."""
        root = self._dir("node")
        node = AgentNode(root.name, root, {}, runtime_version=f"containerd://{self.binaries.version}.0")
        node.write_containerd_config()
        node.certs_dir.mkdir(parents=True, exist_ok=True)
        if mirror is not None:
            rc, events = node.agent_once(map_plan(self.plan_json, [mirror]))
            if rc != 0:
                raise RuntimeError(f"agent --once failed: {events}")
        return node

    def pull(self, node: AgentNode, image: BuiltImage, timeout: float = PULL_TIMEOUT) -> tuple[float, int, str]:
        """Seconds, exit code and stderr tail of one pull by a fresh containerd."""
        ref = f"{self.upstream.address}/{image.name}:{image.tag}"
        with Containerd.start(self.binaries, str(node.certs_dir)) as daemon:
            started = time.monotonic()
            try:
                result = daemon.pull(ref, hosts_dir=str(node.certs_dir), timeout=timeout)
                rc, err = result.returncode, result.stderr.strip()[-300:]
            except subprocess.TimeoutExpired:
                rc, err = -1, f"no result after {timeout:.0f}s (ctr killed)"
            return time.monotonic() - started, rc, err


def _ok(result: tuple[float, int, str]) -> float:
    seconds, rc, err = result
    if rc != 0:
        raise RuntimeError(f"pull failed ({rc}): {err}")
    return seconds


def upstream_blob_bytes(log_text: str, digests: set[str]) -> tuple[int, int]:
    """(GETs, bytes) of the given blobs the upstream served (Apache access lines)."""
    gets = size = 0
    for line in log_text.splitlines():
        if line.startswith("time="):
            continue
        m = _ACCESS.search(line)
        if m and m["status"] == "200" and "/blobs/" in m["uri"] and m["uri"].split("/blobs/", 1)[1].split("?")[0] in digests:
            gets += 1
            size += int(m["size"]) if m["size"] != "-" else 0
    return gets, size


# ------------------------------------------------------------------ scenarios


def pulls(rig: Rig, image: BuiltImage, repeats: int) -> dict[str, Any]:
    """Direct, cold-through-mirror and warm-through-mirror pulls, interleaved, medians."""
    direct, cold, warm = [], [], []
    _ok(rig.pull(rig.node(None), image))  # warms the upstream's page cache and the binaries
    for _ in range(repeats):
        direct.append(_ok(rig.pull(rig.node(None), image)))
        mirror = rig.new_mirror()
        with rig.run_mirror(mirror):
            cold.append(_ok(rig.pull(rig.node(mirror), image)))
            warm.append(_ok(rig.pull(rig.node(mirror), image)))
    d, c_, w = statistics.median(direct), statistics.median(cold), statistics.median(warm)
    return {
        "image_bytes": image_size(image),
        "direct": round(d, 3),
        "cold": round(c_, 3),
        "warm": round(w, 3),
        "cold_ratio": round(c_ / d, 2),
        "warm_ratio": round(w / d, 2),
        "samples": {"direct": [round(x, 3) for x in direct], "cold": [round(x, 3) for x in cold], "warm": [round(x, 3) for x in warm]},
    }


def image_size(image: BuiltImage) -> int:
    blobs = image.layout / "blobs" / "sha256"
    return sum((blobs / d.removeprefix("sha256:")).stat().st_size for d in image.blobs_for_host)


def fan_in(rig: Rig, image: BuiltImage, k: int, staggered: bool = False) -> dict[str, Any]:
    """K nodes pull one image through a cold mirror, all at once (or one first, then the
    rest at once): what the upstream serves."""
    digests = set(image.blobs_for_host)
    mirror = rig.new_mirror()
    before = len(rig.upstream.requests_log())
    results: list[tuple[float, int, str]] = []
    with rig.run_mirror(mirror) as registry:
        # Configured while the mirror answers: an agent withdraws a mirror it cannot reach.
        nodes = [rig.node(mirror) for _ in range(k)]
        if staggered:
            results.append(rig.pull(nodes.pop(0), image))
        threads = [threading.Thread(target=lambda n=n: results.append(rig.pull(n, image))) for n in nodes]
        for t in threads:
            t.start()
        for t in threads:
            t.join(PULL_TIMEOUT + 30)
        from_mirror = blob_gets(registry.requests_log(), digests)
    new_log = rig.upstream.requests_log()[before:]
    per_blob = blob_gets(new_log, digests)
    gets, size = upstream_blob_bytes(new_log, digests)
    return {
        "nodes": k,
        "staggered": staggered,
        "pulls_ok": sum(1 for _, rc, _ in results if rc == 0),
        "upstream_gets_per_blob": per_blob,
        "max_gets_per_blob": max(per_blob.values()),
        "upstream_blob_gets": gets,
        "upstream_blob_bytes": size,
        "image_blob_bytes": image_size(image),
        "mirror_gets_per_blob": from_mirror,
    }


@contextlib.contextmanager
def fault(kind: str, registry: Registry) -> Iterator[None]:
    """Take the mirror down: refused (process gone), blackholed (packets dropped), hanging (never answers)."""
    with dead_mirror(kind, registry):
        yield


def fail_open(rig: Rig, image: BuiltImage, kinds: list[str]) -> tuple[dict[str, Any], dict[str, float | None]]:
    """For each way a mirror can be down: a pull with the dead mirror still in hosts.toml,
    and a pull after the running agent withdrew it; the penalty is the excess over a direct pull."""
    out: dict[str, Any] = {}
    detect: dict[str, float | None] = {}
    # Small pulls are dominated by ctr and containerd start-up: take the direct reference here, same conditions.
    direct = statistics.median([_ok(rig.pull(rig.node(None), image)) for _ in range(3)])
    out["direct reference"] = {"seconds": round(direct, 3), "rc": 0, "penalty": 0.0}
    for kind in kinds:
        mirror = rig.new_mirror()
        with rig.run_mirror(mirror) as registry:
            _ok(rig.pull(rig.node(mirror), image))  # warm it, as a serving mirror would be
            stale = rig.node(mirror)
            looping = rig.node(None)
            with looping.agent_loop(map_plan(rig.plan_json, [mirror]), interval=AGENT_INTERVAL) as agent:
                agent.wait_event("files.applied")
                sampler = ProcSampler(agent.proc.pid, interval=0.25)
                sampler.start()
                withdrawn: list[float] = []

                def watch_withdrawal(agent: Any = agent, withdrawn: list[float] = withdrawn) -> None:
                    deadline = time.monotonic() + 60
                    while time.monotonic() < deadline:
                        if any(e.get("event") == "mirror.withdrawn" for e in agent.events()):
                            withdrawn.append(time.monotonic())
                            return
                        time.sleep(0.05)

                with fault(kind, registry):
                    t_fault = time.monotonic()
                    watcher = threading.Thread(target=watch_withdrawal, daemon=True)
                    watcher.start()
                    timeout = HUNG_PULL_TIMEOUT if kind != "refused" else PULL_TIMEOUT
                    seconds, rc, err = rig.pull(stale, image, timeout=timeout)
                    out[f"{kind}, still in hosts.toml"] = {
                        "seconds": round(seconds, 3),
                        "rc": rc,
                        "penalty": round(seconds - direct, 3) if rc == 0 else None,
                        **({"error": err} if rc != 0 else {}),
                    }
                    log(f"fail-open: {kind} mirror still in hosts.toml: rc={rc} {seconds:.2f}s")
                    watcher.join(65)
                    detect[kind] = round(withdrawn[0] - t_fault, 2) if withdrawn else None
                    seconds, rc, err = rig.pull(looping, image)
                    out[f"{kind}, withdrawn by the agent"] = {
                        "seconds": round(seconds, 3),
                        "rc": rc,
                        "penalty": round(seconds - direct, 3) if rc == 0 else None,
                        **({"error": err} if rc != 0 else {}),
                    }
                    log(f"fail-open: {kind} mirror withdrawn by the agent (after {detect[kind]}s): rc={rc} {seconds:.2f}s")
                sampler.stop()
                rig.agent_hwm = max([rig.agent_hwm, *(s[2] for s in sampler.samples)])
    return out, detect


@contextlib.contextmanager
def bare_mirror(b: Any) -> Iterator[tuple[LoopbackMirror, Registry]]:
    """distribution 3 alone, as rendered, without the cache front (for the cache benchmark's comparison)."""
    rig = Rig(b.work, b.binaries, b.upstream, (b.registry_binary, registry_version(b.registry_binary)))
    mirror = rig.new_mirror()
    with rig.run_mirror(mirror) as registry:
        yield mirror, registry


def run(work: Path, repeats: int = 3, fan_nodes: int = 3, cache_nodes: int = 10) -> dict[str, Any]:
    if os.geteuid() != 0:
        msg = "the data path runs containerd and registries as daemons and needs root"
        print(f"bench: data path skipped: {msg}", file=sys.stderr)
        return {"skipped": msg}
    reason = ensure_binaries() or ensure_commands({"skopeo": "skopeo", "varnish": "varnishd"})
    if reason:
        print(f"bench: data path skipped: {reason}", file=sys.stderr)
        return {"skipped": reason}
    binaries = system_containerd()
    assert binaries is not None
    kinds = ["refused"]
    if shutil.which("iptables") and subprocess.run(["iptables", "-S", "OUTPUT"], capture_output=True, check=False).returncode == 0:
        kinds.append("blackholed")
    kinds.append("hanging")
    work.mkdir(parents=True, exist_ok=True)
    registry = mirror_binary()
    log(f"data path: containerd {binaries.version}, mirror registry {registry[1]} ({registry[0]}), {repeats} repeats")
    images = {
        "1.3 MiB, 3 layers": multi_layer_image(work / "img-small"),
        "33 MiB, 3 layers": multi_layer_image(work / "img-big", name="library/big", layer_sizes=(24 << 20, 8 << 20, 1 << 20)),
    }
    result: dict[str, Any] = {
        "containerd": binaries.version,
        "mirror_registry": registry[1],
        "upstream_registry": "Debian docker-registry (2.8)",
        "front": f"varnish {varnish_version()}",
        "repeats": repeats,
    }
    try:
        with Registry.start(work / "upstream") as upstream:
            for image in images.values():
                image.push(upstream.address)
            rig = Rig(work, binaries, upstream, registry)
            result["pulls"] = {}
            for label, image in images.items():
                result["pulls"][label] = pulls(rig, image, repeats)
                r = result["pulls"][label]
                log(
                    f"pulls [{label}]: direct {r['direct']}s, cold {r['cold']}s ({r['cold_ratio']}x), warm {r['warm']}s ({r['warm_ratio']}x)"
                )
            big = images["33 MiB, 3 layers"]
            result["fan_in"] = fan_in(rig, big, fan_nodes)
            result["fan_in_staggered"] = fan_in(rig, big, fan_nodes, staggered=True)
            for key in ("fan_in", "fan_in_staggered"):
                log(f"{key}: {fan_nodes} nodes -> upstream GETs per blob {sorted(result[key]['upstream_gets_per_blob'].values())}")
            small_label = "1.3 MiB, 3 layers"
            result["fail_open"], result["agent_withdraw_seconds"] = fail_open(rig, images[small_label], kinds)
            result["fail_open_image"] = small_label
            result["agent_footprint"] = {"hwm_mib": round(rig.agent_hwm, 1), "note": "regmirror agent loop (python), VmHWM"}
            if varnish_version() is None:
                result["cache"] = {"skipped": "varnishd is not installed (Debian package varnish)"}
            else:
                from bench import cache

                result["cache"] = cache.run(work / "cache", binaries, upstream, registry[0], repeats, cache_nodes)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return result
