"""``python -m bench.nodesafety``: what a dead mirror costs a pull on each containerd release, and the startup taint at scale.

Fail-open, per containerd release (Debian's 1.6 and the releases
tests/e2e/build-containerd.sh built) and per failure mode (refused,
blackholed, hanging), with a real upstream and a real mirror on loopback:

- `stale`: a CRI pull (kubelet's path, crictl) that starts the moment the
  mirror dies, with the mirror still in hosts.toml (nothing has reacted yet);
  given up after STALE_CAP seconds;
- `withdrawn`: the agent's loop (default settings) notices the failure and
  rewrites the file; `detect` is how long after the failure, and the pull
  after that is timed;
- the penalty of a pull started at any moment after the failure is the
  stale penalty for pulls started within `detect`, the withdrawn one after;
- `guarded`: the same pull at the moment of the failure, with the agent's
  connection guard running (agent/guard.py, the DaemonSet's default): it
  aborts the pull's connections to the dead mirror, so this is the worst
  case with the guard. Its CPU is sampled while the mirror is healthy (the
  guard's idle cost: ten netlink dumps a second).

Startup taint, on the local control plane with kwok nodes: N nodes carry the
taint; for each, a pod of the agent's ServiceAccount and a token bound to it
(what the kubelet mounts); then all N agents remove their taint at once, with
the agent's own code (`InClusterClient.remove_startup_taint`), through RBAC and
the ValidatingAdmissionPolicy. The latency is from the call to the moment a
watch on the nodes sees the taint gone.

Probe cost is computed from the agent's settings (one GET /v2/ per mirror per
probe interval per selected node) and the agent's CPU is sampled while it
probes.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "e2e"))
sys.path.insert(0, str(REPO / "tests"))

from _dataplane import (  # noqa: E402
    AgentNode,
    Containerd,
    ContainerdBinaries,
    Registry,
    build_containerd,
    dead_mirror,
    ensure_binaries,
    iptables_usable,
    system_containerd,
)

from regmirror import nodetaint  # noqa: E402
from regmirror.agent.preflight import dial_timeout_supported  # noqa: E402
from regmirror.agent.probe import DEFAULT_INTERVAL, DEFAULT_TIMEOUT  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
STALE_CAP = 45.0
RELEASES = ("1.6", "1.7", "2.0.5", "2.4")


def log(msg: str) -> None:
    print(f"[nodesafety {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ fail-open


def _plan(mirror_url: str, upstream: Registry) -> str:
    host = upstream.address
    entry = {
        "name": "cache",
        "hosts": [host],
        "servers": {host: upstream.url},
        "upstreamHost": host,
        "url": mirror_url,
        "priority": 100,
        "capabilities": ["pull", "resolve"],
        "fallback": "AllowUpstream",
        "runtimes": ["containerd"],
        "nodeSelector": {},
    }
    return json.dumps({"mirrors": [entry]})


def _cri_pull(binaries: ContainerdBinaries, node: AgentNode, ref: str, cap: float) -> tuple[float, bool]:
    """Seconds and success of one CRI pull by a fresh containerd reading the node's certs.d."""
    with Containerd.start(binaries, str(node.certs_dir)) as daemon:
        started = time.monotonic()
        try:
            ok = daemon.cri_pull(ref, timeout=cap).returncode == 0
        except Exception:  # crictl killed at the cap
            ok = False
        return time.monotonic() - started, ok


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def failopen(work: Path, releases: Sequence[str] = RELEASES) -> dict[str, Any]:
    """Every release in `releases` (entries of RELEASES; "2.4" means the newest 2.4.x built) x failure mode; see the module docstring."""
    if os.geteuid() != 0:
        return {"skipped": "needs root (containerd, iptables)"}
    reason = ensure_binaries()
    built, why = build_containerd()
    if reason or why:
        return {"skipped": reason or why}
    crictl = next((b.crictl for b in built if b.crictl), None)
    found = {b.release: b for b in built}
    system = system_containerd(crictl)
    if system is not None:
        found[system.release] = system
    kinds = ["refused", *(["blackholed"] if iptables_usable() else []), "hanging"]
    out: dict[str, Any] = {
        "stale_cap_seconds": STALE_CAP,
        "probe": {"interval": DEFAULT_INTERVAL, "timeout": DEFAULT_TIMEOUT},
        "releases": {},
    }
    work.mkdir(parents=True, exist_ok=True)
    with Registry.start(work / "upstream", "127.0.0.2") as upstream:
        upstream.push_image("team/app", "v1", "bench\n")
        ref = f"{upstream.address}/team/app:v1"
        for wanted in releases:
            matches = [b for r, b in sorted(found.items()) if (r == wanted or r.startswith(wanted + ".")) and b.crictl]
            if not matches:
                out["releases"][wanted] = {"skipped": "not built"}
                continue
            binaries = matches[-1]
            row: dict[str, Any] = {"dial_timeout": dial_timeout_supported(binaries.runtime_version)}
            direct_node = AgentNode("direct", work / f"direct-{binaries.release}", {}, runtime_version=binaries.runtime_version)
            direct = statistics.median(_cri_pull(binaries, direct_node, ref, 60)[0] for _ in range(3))
            row["direct"] = round(direct, 3)
            for kind in kinds:
                with Registry.start(work / f"mirror-{binaries.release}-{kind}", "127.0.0.3") as mirror:
                    mirror.push_image("team/app", "v1", "bench\n")
                    stale_node = AgentNode("stale", work / f"stale-{binaries.release}-{kind}", {}, runtime_version=binaries.runtime_version)
                    stale_node.write_containerd_config()
                    stale_node.agent_once(_plan(mirror.url, upstream))
                    loop_node = AgentNode("loop", work / f"loop-{binaries.release}-{kind}", {}, runtime_version=binaries.runtime_version)
                    loop_node.write_containerd_config()
                    with loop_node.agent_loop(_plan(mirror.url, upstream), interval=2.0) as agent:
                        agent.wait_event("files.applied")
                        time.sleep(3)  # settle: the first probes are done
                        cpu_before, wall_before = _cpu_seconds(agent.proc.pid), time.monotonic()
                        with dead_mirror(kind, mirror):
                            failed = time.monotonic()
                            withdrawn: list[float] = []

                            def watch(agent: Any = agent, withdrawn: list[float] = withdrawn) -> None:
                                deadline = time.monotonic() + 60
                                while time.monotonic() < deadline and not withdrawn:
                                    if any(e.get("event") == "mirror.withdrawn" for e in agent.events()):
                                        withdrawn.append(time.monotonic())
                                    time.sleep(0.02)

                            watcher = threading.Thread(target=watch, daemon=True)
                            watcher.start()
                            stale, stale_ok = _cri_pull(binaries, stale_node, ref, STALE_CAP)
                            watcher.join(65)
                            detect = withdrawn[0] - failed if withdrawn else None
                            after, after_ok = _cri_pull(binaries, loop_node, ref, 60)
                        cpu = (_cpu_seconds(agent.proc.pid) - cpu_before) / (time.monotonic() - wall_before)
                    row[kind] = {
                        "stale_seconds": round(stale, 3),
                        "stale_ok": stale_ok,
                        "stale_penalty": round(stale - direct, 3) if stale_ok else None,
                        "detect_seconds": round(detect, 2) if detect is not None else None,
                        "withdrawn_penalty": round(after - direct, 3) if after_ok else None,
                        "agent_cpu_fraction": round(cpu, 4),
                        **_guarded(binaries, work / f"guard-{binaries.release}-{kind}", kind, upstream, ref, direct),
                    }
                    log(
                        f"containerd {binaries.release} {kind}: stale {stale:.2f}s ok={stale_ok}, detect {detect}, after {after:.2f}s, "
                        f"guarded {row[kind]['guarded_seconds']:.2f}s ok={row[kind]['guarded_ok']}"
                    )
            out["releases"][binaries.release] = row
    return out


def _guarded(binaries: ContainerdBinaries, work: Path, kind: str, upstream: Registry, ref: str, direct: float) -> dict[str, Any]:
    """A pull that starts the moment the mirror dies, with the agent's connection guard running; and the guard's idle CPU."""
    with Registry.start(work / "mirror", "127.0.0.3") as mirror:
        mirror.push_image("team/app", "v1", "bench\n")
        node = AgentNode("guard", work / "node", {}, runtime_version=binaries.runtime_version)
        node.write_containerd_config()
        with node.agent_loop(_plan(mirror.url, upstream), interval=2.0, extra=["--guard-connections"]) as agent:
            agent.wait_event("files.applied")
            time.sleep(1)
            cpu_before, wall_before = _cpu_seconds(agent.proc.pid), time.monotonic()
            time.sleep(5)
            idle_cpu = (_cpu_seconds(agent.proc.pid) - cpu_before) / (time.monotonic() - wall_before)
            with dead_mirror(kind, mirror):
                log(f"guarded: {kind} from now")
                seconds, ok = _cri_pull(binaries, node, ref, STALE_CAP)
            aborted = sum(e.get("count", 0) for e in agent.events() if e.get("event") == "connections.aborted")
    return {
        "guarded_seconds": round(seconds, 3),
        "guarded_ok": ok,
        "guarded_penalty": round(seconds - direct, 3) if ok else None,
        "guarded_aborted": aborted,
        "guard_idle_cpu_fraction": round(idle_cpu, 4),
    }


# ------------------------------------------------------------------ startup taint


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class _NodeWatch:
    """A watch on the nodes that records when each of `wanted` is seen without the startup taint."""

    def __init__(self, cluster: Any, wanted: set[str]) -> None:
        self.cluster = cluster
        self.wanted = wanted
        self.gone: dict[str, float] = {}
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        self.ready.wait(30)

    def _run(self) -> None:
        import http.client
        import ssl

        version = self.cluster.api("GET", "/api/v1/nodes?limit=1")["metadata"]["resourceVersion"]
        context = ssl.create_default_context(cafile=str(self.cluster.ca_cert))
        conn = http.client.HTTPSConnection("127.0.0.1", self.cluster.port, context=context, timeout=600)
        conn.request(
            "GET", f"/api/v1/nodes?watch=1&resourceVersion={version}", headers={"Authorization": f"Bearer {self.cluster._admin_token}"}
        )
        resp = conn.getresponse()
        self.ready.set()
        while len(self.gone) < len(self.wanted):
            line = resp.readline()
            if not line:
                break
            obj = json.loads(line)["object"]
            name = obj["metadata"]["name"]
            if name in self.wanted and name not in self.gone and not nodetaint.has_startup_taint((obj.get("spec") or {}).get("taints")):
                self.gone[name] = time.monotonic()
        conn.close()


def _lift_burst(cluster: Any, batch: list[str], tokens: dict[str, Path]) -> dict[str, Any]:
    """Taint `batch`, then have every node's agent code remove its taint at once; latencies to the watch."""
    from regmirror.agent import nodeapi

    def taint_node(name: str) -> None:
        body = {"spec": {"taints": [{"key": nodetaint.TAINT_KEY, "effect": "NoSchedule"}]}}
        cluster.api("PATCH", f"/api/v1/nodes/{name}", body, content_type="application/merge-patch+json")

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        list(pool.map(taint_node, batch))
    started: dict[str, float] = {}
    errors: list[str] = []
    watch = _NodeWatch(cluster, set(batch))

    def lift(name: str) -> None:
        client = nodeapi.InClusterClient(sa_dir=tokens[name])
        node = client.get_node(name)
        started[name] = time.monotonic()
        try:
            client.remove_startup_taint(node)
        except nodeapi.ApiError as exc:
            errors.append(f"{name}: {exc}")

    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        list(pool.map(lift, batch))
    watch.thread.join(120)
    latencies = [watch.gone[n] - started[n] for n in batch if n in watch.gone and n in started]
    return {
        "nodes": len(batch),
        "lifted": len(latencies),
        "errors": errors[:5],
        "latency_p50": round(_percentile(latencies, 0.5), 3) if latencies else None,
        "latency_p95": round(_percentile(latencies, 0.95), 3) if latencies else None,
        "latency_max": round(max(latencies), 3) if latencies else None,
        "all_lifted_seconds": round(max(watch.gone.values()) - t0, 2) if watch.gone else None,
    }


@contextmanager
def _in_cluster_env(cluster: Any) -> Iterator[None]:
    """The agent's client finds the API server the way it does in a pod; restored afterwards (the bench runs on)."""
    saved = {k: os.environ.get(k) for k in ("KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT")}
    os.environ["KUBERNETES_SERVICE_HOST"] = "127.0.0.1"
    os.environ["KUBERNETES_SERVICE_PORT"] = str(cluster.port)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def taint_on(cluster: Any, names: list[str], sizes: list[int]) -> dict[str, Any]:
    """On a running cluster whose nodes `names` exist: lift the taint from the first N of them at once, for each N in `sizes`.

    The cluster may be one the control-plane benchmark already used (its
    operator stopped): the RBAC and the admission policy are applied again
    (server-side, idempotent), and each node gets a pod of the agent's
    ServiceAccount to bind its token to, as the kubelet would.
    """
    from harness.operator import AGENT_NS, install_crd_and_namespaces

    sizes = [n for n in sizes if 0 < n <= len(names)]
    if not sizes:
        return {"error": f"no node count in the request fits the {len(names)} nodes there are"}
    install_crd_and_namespaces(cluster)
    cluster.kubectl("apply", "--server-side", "-k", str(REPO / "manifests" / "rbac"))
    names = names[: max(sizes)]
    tokens: dict[str, Path] = {}
    base = Path(tempfile.mkdtemp(prefix="nodesafety-"))

    def prepare(name: str) -> None:
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": f"taint-agent-{name}", "namespace": AGENT_NS},
            "spec": {
                "nodeName": name,
                "serviceAccountName": "regmirror-agent",
                "tolerations": [{"operator": "Exists"}],
                "containers": [{"name": "agent", "image": "example.invalid/regmirror:bench"}],
            },
        }
        created = cluster.api("POST", f"/api/v1/namespaces/{AGENT_NS}/pods", pod)
        ref = {"apiVersion": "v1", "kind": "Pod", "name": created["metadata"]["name"], "uid": created["metadata"]["uid"]}
        request = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {"expirationSeconds": 3600, "boundObjectRef": ref},
        }
        token = cluster.api("POST", f"/api/v1/namespaces/{AGENT_NS}/serviceaccounts/regmirror-agent/token", request)["status"]["token"]
        sa = base / name
        sa.mkdir()
        (sa / "token").write_text(token)
        (sa / "ca.crt").write_bytes(cluster.ca_cert.read_bytes())
        tokens[name] = sa

    out: dict[str, Any] = {}
    try:
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            list(pool.map(prepare, names))
        log(f"taint: pods and bound tokens ready on {len(names)} nodes")
        with _in_cluster_env(cluster):
            for size in sizes:
                out[str(size)] = _lift_burst(cluster, names[:size], tokens)
                log(f"taint, {size} nodes at once: {out[str(size)]}")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return out


def taint(sizes: list[int]) -> dict[str, Any]:
    """On a control plane of its own: kwok nodes, then `taint_on` them."""
    from harness import LocalCluster

    with LocalCluster(nodes=0) as cluster:
        names = cluster.add_nodes(max(sizes), prefix="tainted-", wait=False)
        log(f"{len(names)} kwok nodes created")
        return taint_on(cluster, names, sizes)


def probe_cost() -> dict[str, Any]:
    """What the agent's probes cost a mirror, from its default settings (one GET /v2/ per mirror per interval per node)."""
    return {
        "requests_per_second_per_mirror_at_1000_nodes": round(1000 / DEFAULT_INTERVAL),
        "requests_per_second_per_node_per_mirror": round(1 / DEFAULT_INTERVAL, 2),
        "note": "one new TCP connection and GET /v2/ per probe; jittered +-25%",
    }


def parse_releases(text: str) -> list[str]:
    """`--releases 1.6,2.4` -> ["1.6", "2.4"]; a release that is not one of RELEASES is an error, not a silent no-op."""
    wanted = [r.strip() for r in text.split(",") if r.strip()]
    unknown = [r for r in wanted if r not in RELEASES]
    if unknown or not wanted:
        raise SystemExit(f"--releases: {', '.join(unknown) or 'none given'}; choose from {', '.join(RELEASES)}")
    return wanted


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.nodesafety", description=__doc__)
    p.add_argument("--nodes", default="100,1000", help="kwok node counts for the taint (comma-separated)")
    p.add_argument("--skip-failopen", action="store_true")
    p.add_argument("--skip-taint", action="store_true")
    p.add_argument(
        "--releases",
        default=",".join(RELEASES),
        help=f"containerd releases for the fail-open part, comma-separated (default {','.join(RELEASES)})",
    )
    p.add_argument("--out", type=Path, default=RESULTS / f"nodesafety-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json")
    args = p.parse_args(argv)
    result: dict[str, Any] = {"probe_cost": probe_cost()}
    if not args.skip_failopen:
        result["failopen"] = failopen(Path(tempfile.mkdtemp(prefix="nodesafety-failopen-")), parse_releases(args.releases))
    if not args.skip_taint:
        result["taint"] = taint([int(n) for n in args.nodes.split(",") if n])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
