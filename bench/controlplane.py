"""Control-plane scenarios: N mirrors at once on M kwok nodes, with and without the operator.

Phases, all on one LocalCluster (so both sides pay the same Kubernetes):

1. M kwok nodes (timed).
2. Baseline: every mirror's children, rendered by ``render_mirror_children``, plus
   the node plan ConfigMap and agent DaemonSet, applied directly with server-side
   apply into namespaces the operator does not watch; per mirror, the time until
   its Deployment is Available, its PVC Bound and every node runs a Ready agent
   pod with the plan. Then a bare DaemonSet rollout (a template annotation changed).
   The baseline namespaces are deleted before the operator starts.
3. Operator (``regmirror run`` with its own ServiceAccount, as tests/conftest.py
   starts it): N RegistryMirrors created at once; per mirror apply -> Ready, and
   how long after its children were ready (by the same definition as the baseline)
   Ready was reported; API requests from the audit log; RSS and CPU from /proc;
   one more mirror (node rollout); a quiet period.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.kubewatch import Watch
from bench.measure import (
    ProcSampler,
    SchedSampler,
    audit_requests,
    histograms,
    percentiles,
    proc_status,
    ready_burst,
    ready_status_write,
    ready_writes,
    rfc3339,
    rfc3339_now,
    summarize_requests,
    thread_time,
    window_load,
)
from bench.profile import PySpy
from bench.track import ChildReady, DaemonSetPods, MirrorReady, NodePlans, Sampler
from harness import LocalCluster
from harness.operator import (
    AGENT_NS,
    OPERATOR_NS,
    OPERATOR_SA,
    OPERATOR_USER,
    REPO,
    OperatorProcess,
    install_crd_and_namespaces,
    mirror_body,
)
from regmirror import constants as c
from regmirror.models import RegistryMirrorSpec
from regmirror.nodeplan import build_node_plan, mirror_entry
from regmirror.render.agent import render_agent_daemonset, render_node_config_map
from regmirror.render.mirror import render_mirror_children

BASE_NS = "bench-baseline"
BASE_NODE_NS = "bench-baseline-node"
ROLLOUT_ANNOTATION = "bench.regmirror.dev/rollout"
AGENT_SELECTOR = f"{c.LABEL_NAME}={c.APP_NAME},{c.LABEL_COMPONENT}=agent"
MANAGED_SELECTOR = f"{c.LABEL_MANAGED_BY}={c.MANAGED_BY}"
APPLY_THREADS = 16
EXTRA_MIRROR = "zz-extra"


@dataclass
class Config:
    mirrors: int
    nodes: int
    quiet_seconds: float
    timeout: float
    profile: bool
    out_dir: Path
    stamp: str


def mirror_names(n: int) -> list[str]:
    return [f"m{i:04d}" for i in range(n)]


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def ssa(cluster: LocalCluster, path: str, body: dict[str, Any], manager: str = "bench") -> Any:
    """Server-side apply one object (as admin)."""
    return cluster.api("PATCH", f"{path}?fieldManager={manager}&force=true", body, content_type="application/apply-patch+yaml")


def object_path(obj: dict[str, Any]) -> str:
    kind, meta = obj["kind"], obj["metadata"]
    plural = {
        "ConfigMap": "configmaps",
        "Service": "services",
        "PersistentVolumeClaim": "persistentvolumeclaims",
        "Deployment": "deployments",
        "DaemonSet": "daemonsets",
    }[kind]
    prefix = "/api/v1" if obj["apiVersion"] == "v1" else f"/apis/{obj['apiVersion']}"
    return f"{prefix}/namespaces/{meta['namespace']}/{plural}/{meta['name']}"


def wait(predicate: Any, timeout: float, what: str, cluster: LocalCluster, every: float = 0.2) -> bool:
    """Poll until true; False on timeout (a scenario reports how far it got instead of failing)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        cluster.check_alive()
        if predicate():
            return True
        time.sleep(every)
    log(f"timed out after {timeout:.0f}s waiting for {what}")
    return False


def namespace(cluster: LocalCluster, name: str, level: str) -> None:
    body = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": {"pod-security.kubernetes.io/enforce": level}}}
    ssa(cluster, f"/api/v1/namespaces/{name}", body)


def rollout_watches(
    cluster: LocalCluster, ns: str, node_ns: str, children: ChildReady, pods: list[DaemonSetPods], plans: NodePlans | None
) -> list[Watch]:
    def on_pod(type_: str, obj: dict[str, Any], t: float) -> None:
        for tracker in pods:
            tracker.on_event(type_, obj, t)

    watches = [
        Watch(cluster, f"/apis/apps/v1/namespaces/{ns}/deployments", children.on_deployment, label_selector=MANAGED_SELECTOR),
        Watch(cluster, f"/api/v1/namespaces/{ns}/persistentvolumeclaims", children.on_pvc, label_selector=MANAGED_SELECTOR),
        Watch(cluster, f"/api/v1/namespaces/{node_ns}/pods", on_pod, label_selector=AGENT_SELECTOR),
    ]
    if plans is not None:
        watches.append(Watch(cluster, f"/api/v1/namespaces/{node_ns}/configmaps", plans.on_event, label_selector=AGENT_SELECTOR))
    for w in watches:
        w.start()
    for w in watches:
        w.synced.wait(30)
    return watches


# ------------------------------------------------------------------ baseline


def run_baseline(cluster: LocalCluster, cfg: Config) -> dict[str, Any]:
    """The same children applied directly, and a bare DaemonSet rollout."""
    names = mirror_names(cfg.mirrors)
    namespace(cluster, BASE_NS, "restricted")
    namespace(cluster, BASE_NODE_NS, "privileged")
    sa = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "regmirror-agent", "namespace": BASE_NODE_NS}}
    ssa(cluster, f"/api/v1/namespaces/{BASE_NODE_NS}/serviceaccounts/regmirror-agent", sa)

    children = ChildReady()
    plan_pods = DaemonSetPods(c.ANNOTATION_NODE_CONFIG_HASH)
    bare_pods = DaemonSetPods(ROLLOUT_ANNOTATION)
    watches = rollout_watches(cluster, BASE_NS, BASE_NODE_NS, children, [plan_pods, bare_pods], None)
    sampler = Sampler(plan_pods, cfg.nodes)
    sampler.start()
    bare_sampler = Sampler(bare_pods, cfg.nodes)
    bare_sampler.start()

    specs = {n: RegistryMirrorSpec.model_validate(mirror_body(n)["spec"]) for n in names}
    started: dict[str, float] = {}
    cluster_ips: dict[str, str] = {}

    def apply_children(name: str) -> None:
        started[name] = time.monotonic()
        for obj in render_mirror_children(name, "baseline", specs[name], BASE_NS):
            obj["metadata"].pop("ownerReferences", None)  # no owner here: the GC would collect them
            result = ssa(cluster, object_path(obj), obj)
            if obj["kind"] == "Service":
                cluster_ips[name] = result["spec"]["clusterIP"]

    log(f"baseline: applying the children of {len(names)} mirrors directly")
    since = rfc3339_now()
    t0 = time.monotonic()
    with ThreadPoolExecutor(APPLY_THREADS) as pool:
        list(pool.map(apply_children, names))
    applied = time.monotonic() - t0
    plan = build_node_plan([mirror_entry(n, specs[n], cluster_ips[n]) for n in names])
    sampler.want_value("plan", {plan.digest()})
    for obj in (render_node_config_map(plan, BASE_NODE_NS), render_agent_daemonset(plan, BASE_NODE_NS, "regmirror:test")):
        ssa(cluster, object_path(obj), obj)
    log(f"baseline: applied in {applied:.1f}s; waiting for Deployments, PVCs and {cfg.nodes} agent pods")

    def converged() -> bool:
        return children.deployment.done(names) and children.pvc.done(names) and "plan" in sampler.rolled.at

    complete = wait(converged, cfg.timeout, "the baseline to converge", cluster)
    until = rfc3339_now()
    rolled = sampler.rolled.at.get("plan")
    per_mirror, done_at = {}, {}
    for n in names:
        parts = [children.deployment.at.get(n), children.pvc.at.get(n), rolled]
        if all(p is not None for p in parts):
            done_at[n] = max(p for p in parts if p is not None)
            per_mirror[n] = done_at[n] - started[n]
    result: dict[str, Any] = {
        "complete": complete,
        "apply_seconds": round(applied, 2),
        "ready_seconds": percentiles(list(per_mirror.values())),
        "ready_samples": sorted(round(v, 3) for v in per_mirror.values()),
        # From the first apply to the last mirror's children ready, as the operator's figure is (from its
        # first RegistryMirror): the slowest mirror from its own start leaves out the time the baseline
        # took to apply the mirrors before it (48-53 s at 500 mirrors).
        "converged_seconds": round(max(done_at.values()) - t0 if done_at else float("nan"), 2),
        "slowest_mirror_seconds": round(max(per_mirror.values()) if per_mirror else float("nan"), 2),
        "ready_from_first_apply": percentiles([t - t0 for t in done_at.values()]),
        "deployment_available": percentiles([children.deployment.at[n] - started[n] for n in names if n in children.deployment.at]),
        "pvc_bound": percentiles([children.pvc.at[n] - started[n] for n in names if n in children.pvc.at]),
        "daemonset_created_to_all_nodes": round(rolled - t0, 2) if rolled else None,
        "load": window_load(cluster.audit_log, since, until),
    }

    # A bare DaemonSet rollout: the same DaemonSet, only a template annotation changed.
    if complete:
        patch = {"spec": {"template": {"metadata": {"annotations": {ROLLOUT_ANNOTATION: "1"}}}}}
        bare_sampler.want_value("bare", {"1"})
        t1 = time.monotonic()
        cluster.api(
            "PATCH",
            f"/apis/apps/v1/namespaces/{BASE_NODE_NS}/daemonsets/{c.AGENT_NAME}",
            patch,
            content_type="application/merge-patch+json",
        )
        done = wait(lambda: "bare" in bare_sampler.rolled.at, cfg.timeout, "the bare DaemonSet rollout", cluster, every=0.1)
        result["bare_daemonset_rollout_seconds"] = round(bare_sampler.rolled.at["bare"] - t1, 2) if done else None
        log(f"baseline: bare DaemonSet rollout over {cfg.nodes} nodes took {result['bare_daemonset_rollout_seconds']}s")

    for w in watches:
        w.stop()
    sampler.stop()
    bare_sampler.stop()
    t2 = time.monotonic()
    for ns in (BASE_NS, BASE_NODE_NS):
        cluster.kubectl("delete", "namespace", ns, "--wait=false")
    gone = wait(
        lambda: all(cluster.kubectl("get", "namespace", ns, check=False).returncode != 0 for ns in (BASE_NS, BASE_NODE_NS)),
        max(300.0, cfg.timeout),
        "the baseline namespaces to be deleted",
        cluster,
        every=2.0,
    )
    result["cleanup_seconds"] = round(time.monotonic() - t2, 1) if gone else None
    log(
        f"baseline: converged={complete} in {result['converged_seconds']}s; per mirror p50={result['ready_seconds']['p50']}s "
        f"max={result['slowest_mirror_seconds']}s; cleanup {result['cleanup_seconds']}s"
    )
    return result


# ------------------------------------------------------------------ operator


def metrics_up(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1) as rsp:
            return bool(rsp.status == 200)
    except OSError:
        return False


def run_operator(cluster: LocalCluster, cfg: Config) -> dict[str, Any]:
    names = mirror_names(cfg.mirrors)
    cluster.kubectl("apply", "--server-side", "-k", str(REPO / "manifests" / "rbac"))
    kubeconfig = cluster.service_account_kubeconfig(OPERATOR_NS, OPERATOR_SA)
    log_path = cfg.out_dir / f"{cfg.stamp}-operator.log"
    proc = OperatorProcess(cluster, kubeconfig, log_path)
    started_at = time.monotonic()
    proc.start()
    assert proc.proc is not None
    pid = proc.proc.pid
    sampler_proc = ProcSampler(pid)
    sampler_proc.start()
    sampler_loop = SchedSampler(pid)  # the event loop's thread
    sampler_loop.start()
    result: dict[str, Any] = {"log": str(log_path)}
    try:
        wait(lambda: metrics_up(proc.metrics_port), 60, "the operator's metrics endpoint", cluster)
        time.sleep(3)  # let its initial lists and watches settle
        result["startup_seconds"] = round(time.monotonic() - started_at, 1)
        idle = proc_status(pid)
        result["idle_before_mirrors"] = {"rss_mib": round(idle.get("VmRSS", 0), 1), "cpu_seconds": round(idle.get("cpu_seconds", 0), 2)}

        mirrors = MirrorReady()
        children = ChildReady()
        pods = DaemonSetPods(c.ANNOTATION_NODE_CONFIG_HASH)
        plans = NodePlans(c.NODE_CONFIG_KEY)
        bare_pods = DaemonSetPods(ROLLOUT_ANNOTATION)
        watches = rollout_watches(cluster, OPERATOR_NS, AGENT_NS, children, [pods, bare_pods], plans)
        mw = Watch(cluster, f"/apis/{c.API_VERSION}/{c.PLURAL}", mirrors.on_event)
        mw.start()
        mw.synced.wait(30)
        watches.append(mw)
        rollout = Sampler(pods, cfg.nodes, plans)
        rollout.want_mirrors([*names, EXTRA_MIRROR])
        rollout.start()

        spy = PySpy(pid, cfg.out_dir / f"{cfg.stamp}-operator-profile.txt") if cfg.profile else None
        if spy:
            spy.start()
        since = rfc3339_now()
        cpu0 = proc_status(pid).get("cpu_seconds", 0.0)
        sample0 = len(sampler_proc.samples)
        scrape0 = _scrape(proc)
        applied: dict[str, float] = {}

        def apply_mirror(name: str) -> None:
            applied[name] = time.monotonic()
            ssa(cluster, f"/apis/{c.API_VERSION}/{c.PLURAL}/{name}", mirror_body(name), manager="bench-admin")

        log(f"operator: creating {len(names)} RegistryMirrors at once")
        t0 = time.monotonic()
        with ThreadPoolExecutor(APPLY_THREADS) as pool:
            list(pool.map(apply_mirror, names))
        result["apply_seconds"] = round(time.monotonic() - t0, 2)

        def progress() -> bool:
            done = mirrors.ready.done(names)
            if not done and int(time.monotonic() - t0) % 15 == 0:
                log(f"operator: {mirrors.ready.count(names)}/{len(names)} Ready, plans so far {len(plans.versions)}")
                time.sleep(1)
            return done

        complete = wait(progress, cfg.timeout, f"{len(names)} mirrors Ready", cluster)
        t_conv = time.monotonic()
        until = rfc3339_now()
        cpu1 = proc_status(pid).get("cpu_seconds", 0.0)
        scrape1 = _scrape(proc)
        # Per concern while converging: passes (and their time), and how long ready keys waited for a worker.
        result["reconciles_converging"] = histograms(scrape0, scrape1, "regmirror_reconcile_duration_seconds", "concern")
        result["queue_wait_converging"] = histograms(scrape0, scrape1, "regmirror_queue_wait_seconds", "concern")
        if spy:
            result["profile"] = spy.stop()
        ready = {n: mirrors.ready.at[n] - applied[n] for n in names if n in mirrors.ready.at}
        result.update(
            complete=complete,
            ready_count=len(ready),
            ready_seconds=percentiles(list(ready.values())),
            ready_samples=sorted(round(v, 3) for v in ready.values()),
            converged_seconds=round(max(mirrors.ready.at[n] for n in ready) - t0, 2) if ready else None,
            cpu_seconds_converging=round(cpu1 - cpu0, 2),
            ready_from_first_apply=percentiles([mirrors.ready.at[n] - t0 for n in ready]),
        )
        # Ready reported how long after the children were ready (Deployment, PVC, every node's agent pod)?
        lags, child_ready = {}, {}
        for n in ready:
            parts = [children.deployment.at.get(n), children.pvc.at.get(n), rollout.rolled.at.get(n)]
            if all(p is not None for p in parts):
                child_ready[n] = max(p for p in parts if p is not None)
                lags[n] = mirrors.ready.at[n] - child_ready[n]
        result["ready_after_children"] = percentiles(list(lags.values()))
        requests = audit_requests(cluster.audit_log, OPERATOR_USER, since, until)
        result["ready_status_write"] = ready_status_write(requests, child_ready, mirrors.ready.at)
        # The largest run of Ready writes (at 500 mirrors: those the completed node rollout made Ready), where the
        # operator's event loop spent it, and (with the load below) what else the API server answered meanwhile.
        burst = ready_burst(ready_writes(requests, mirrors.ready.at))
        if burst is not None:
            burst["operator_loop"] = thread_time(sampler_loop.samples, burst["from"], burst["to"])
        result["ready_burst"] = burst
        result["children_ready_seconds"] = percentiles([child_ready[n] - applied[n] for n in child_ready])
        result["deployment_available"] = percentiles([children.deployment.at[n] - applied[n] for n in names if n in children.deployment.at])
        result["pvc_bound"] = percentiles([children.pvc.at[n] - applied[n] for n in names if n in children.pvc.at])
        result["nodes_rolled"] = percentiles([rollout.rolled.at[n] - applied[n] for n in names if n in rollout.rolled.at])
        result["plan_versions"] = [{"at": round(t - t0, 2), "digest": d, "mirrors": k} for t, d, k in plans.versions if t >= t0 - 1]
        result["requests_converging"] = summarize_requests(requests, len(names))
        result["load"] = window_load(cluster.audit_log, since, until, (rfc3339(burst["from"]), rfc3339(burst["to"])) if burst else None)
        if burst is not None:
            burst["requests_by_user"] = result["load"].pop("inner_requests_by_user")
        log(
            f"operator: {len(ready)}/{len(names)} Ready in {result['converged_seconds']}s; "
            f"{len(result['plan_versions'])} node plans; {result['requests_converging']['writes']} writes"
        )

        # Node rollout: one more mirror, to every node.
        t1 = time.monotonic()
        since_extra = rfc3339_now()
        apply_mirror(EXTRA_MIRROR)
        wait(
            lambda: EXTRA_MIRROR in mirrors.ready.at and EXTRA_MIRROR in rollout.rolled.at,
            cfg.timeout,
            "the extra mirror to reach every node",
            cluster,
            every=0.1,
        )
        result["extra_mirror"] = {
            "nodes_rolled_seconds": round(rollout.rolled.at[EXTRA_MIRROR] - t1, 2) if EXTRA_MIRROR in rollout.rolled.at else None,
            "ready_seconds": round(mirrors.ready.at[EXTRA_MIRROR] - t1, 2) if EXTRA_MIRROR in mirrors.ready.at else None,
            "deployment_available_seconds": round(children.deployment.at[EXTRA_MIRROR] - t1, 2)
            if EXTRA_MIRROR in children.deployment.at
            else None,
        }
        time.sleep(3)
        result["extra_mirror"]["requests"] = summarize_requests(
            audit_requests(cluster.audit_log, OPERATOR_USER, since_extra, rfc3339_now()), 1
        )
        log(f"operator: one more mirror reached all {cfg.nodes} nodes in {result['extra_mirror']['nodes_rolled_seconds']}s")

        # The same kind of bare rollout as the baseline's, of the operator's own DaemonSet, right
        # after: same cluster, same moment's load (on a shared machine the baseline's rollout
        # minutes earlier can be tens of percent faster or slower). The annotation is another
        # manager's field, so the operator must not write anything for it.
        bare_sampler = Sampler(bare_pods, cfg.nodes)
        bare_sampler.start()
        bare_sampler.want_value("bare", {"after"})
        since_bare = rfc3339_now()
        t2 = time.monotonic()
        cluster.api(
            "PATCH",
            f"/apis/apps/v1/namespaces/{AGENT_NS}/daemonsets/{c.AGENT_NAME}",
            {"spec": {"template": {"metadata": {"annotations": {ROLLOUT_ANNOTATION: "after"}}}}},
            content_type="application/merge-patch+json",
        )
        done = wait(
            lambda: "bare" in bare_sampler.rolled.at, cfg.timeout, "the bare rollout of the operator's DaemonSet", cluster, every=0.1
        )
        bare_sampler.stop()
        result["extra_mirror"]["bare_rollout_after_seconds"] = round(bare_sampler.rolled.at["bare"] - t2, 2) if done else None
        time.sleep(2)
        result["extra_mirror"]["writes_during_bare_rollout"] = summarize_requests(
            audit_requests(cluster.audit_log, OPERATOR_USER, since_bare, rfc3339_now()), 1
        )["writes"]
        log(f"operator: a bare rollout of its DaemonSet right after took {result['extra_mirror']['bare_rollout_after_seconds']}s")

        # Quiet period: nothing changes; the operator should write nothing.
        since_quiet = rfc3339_now()
        cpu_q0 = proc_status(pid).get("cpu_seconds", 0.0)
        log(f"operator: quiet period of {cfg.quiet_seconds:.0f}s")
        time.sleep(cfg.quiet_seconds)
        quiet = audit_requests(cluster.audit_log, OPERATOR_USER, since_quiet, rfc3339_now())
        result["quiet"] = {
            "seconds": cfg.quiet_seconds,
            **summarize_requests(quiet, 1),
            "write_list": [
                f"{e.get('verb')} {(e.get('objectRef') or {}).get('resource')}/{(e.get('objectRef') or {}).get('name')}"
                for e in quiet
                if e.get("verb") in {"create", "update", "patch", "delete"}
            ][:20],
            "cpu_seconds": round(proc_status(pid).get("cpu_seconds", 0.0) - cpu_q0, 2),
        }
        final = proc_status(pid)
        result["footprint"] = {
            "rss_mib": round(final.get("VmRSS", 0), 1),
            "hwm_mib": round(final.get("VmHWM", 0), 1),
            "cpu_seconds_total": round(final.get("cpu_seconds", 0), 2),
        }
        result["metrics"] = _scrape(proc)
        result["converging_window"] = [
            sampler_proc.samples[sample0][0] if len(sampler_proc.samples) > sample0 else 0,
            t_conv - sampler_proc.t0,
        ]
        for w in watches:
            w.stop()
        rollout.stop()
    finally:
        proc.stop(signal.SIGTERM)
        sampler_proc.stop()
        sampler_loop.stop()
    result["rss_samples"] = [(round(t, 1), round(r, 1), round(h, 1), round(cpu, 2)) for t, r, h, cpu in sampler_proc.samples]
    result["tracemalloc"] = memory_profile(cluster, cfg, kubeconfig)
    return result


def memory_profile(cluster: LocalCluster, cfg: Config, kubeconfig: Path) -> dict[str, Any]:
    """Restart the operator with tracemalloc on the converged cluster: where its memory goes at full size.

    A separate run, because tracing slows every allocation and would distort the
    convergence figures; the restart lists every collection and reconciles every
    key (writing nothing), so its store and working set are those of the run above.
    """
    import os

    out = cfg.out_dir / f"{cfg.stamp}-tracemalloc.json"
    os.environ["REGMIRROR_TRACEMALLOC"] = "1"
    os.environ["REGMIRROR_TRACEMALLOC_OUT"] = str(out)
    proc = OperatorProcess(cluster, kubeconfig, cfg.out_dir / f"{cfg.stamp}-operator-tracemalloc.log")
    # Tracing makes every allocation several times slower: at 500 mirrors on 1,000 nodes the traced
    # operator's loop missed the 7 s renew deadline again and again, so its controller restarted
    # every 20 s and never wrote a summary. Only this run gets a lease that outlasts the slowdown.
    proc.extra_env.update(REGMIRROR_LEASE_DURATION="300", REGMIRROR_LEASE_RENEW_DEADLINE="240", REGMIRROR_LEASE_RETRY_PERIOD="5")
    try:
        proc.start()
        assert proc.proc is not None
        pid = proc.proc.pid
        wait(lambda: metrics_up(proc.metrics_port), 120, "the traced operator's metrics endpoint", cluster)
        since = rfc3339_now()

        def idle() -> bool:
            metrics = _metric_lines(proc.metrics())
            return metrics.get("regmirror_queue_depth", 1.0) == 0.0 and metrics.get("regmirror_mirrors", 0.0) >= cfg.mirrors

        wait(idle, 300, "the traced operator to go idle", cluster, every=1.0)
        time.sleep(5)
        status = proc_status(pid)
        writes = summarize_requests(audit_requests(cluster.audit_log, OPERATOR_USER, since, rfc3339_now()), 1)["writes"]
    finally:
        proc.stop(signal.SIGTERM)
        os.environ.pop("REGMIRROR_TRACEMALLOC", None)
        os.environ.pop("REGMIRROR_TRACEMALLOC_OUT", None)
    summary: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {"error": "no tracemalloc summary written"}
    summary["vmhwm_mib_traced_run"] = round(status.get("VmHWM", 0), 1)
    summary["writes_after_restart"] = writes
    log(f"operator memory (tracemalloc): peak {summary.get('peak_mib')} MiB; top {summary.get('by_file', [])[:3]}")
    return summary


def _scrape(proc: OperatorProcess) -> dict[str, float]:
    try:
        return _metric_lines(proc.metrics())
    except OSError:
        return {}


def _metric_lines(text: str) -> dict[str, float]:
    wanted = ("regmirror_", "process_resident_memory_bytes", "process_cpu_seconds_total")
    out = {}
    for line in text.splitlines():
        if line.startswith(wanted) and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[key] = float(value)
    return out


# ------------------------------------------------------------------ all of it


def run(cfg: Config, then: Callable[[LocalCluster, list[str]], None] | None = None) -> dict[str, Any]:
    """The baseline and the operator on one cluster of `cfg.nodes` kwok nodes.

    `then(cluster, node_names)` runs last, on the same cluster (the operator
    stopped), so another scenario needs no control plane of its own; what it
    raises is its own business (call it with its own error handling).
    """
    out: dict[str, Any] = {"mirrors": cfg.mirrors, "nodes": cfg.nodes}
    with LocalCluster(nodes=0) as cluster:
        out["cluster_start_seconds"] = round(cluster.startup_seconds, 1)
        log(f"cluster up in {cluster.startup_seconds:.1f}s; adding {cfg.nodes} kwok nodes")
        t0 = time.monotonic()
        names = cluster.add_nodes(cfg.nodes, wait=False)
        created = time.monotonic() - t0
        cluster.wait_nodes_ready(names, timeout=max(120.0, cfg.nodes * 0.6))
        out["add_nodes"] = {"create_seconds": round(created, 1), "ready_seconds": round(time.monotonic() - t0, 1)}
        log(f"{cfg.nodes} nodes created in {created:.1f}s, Ready after {out['add_nodes']['ready_seconds']}s")
        install_crd_and_namespaces(cluster)
        out["baseline"] = run_baseline(cluster, cfg)
        out["operator"] = run_operator(cluster, cfg)
        comps = {}
        for name, pid in cluster.component_pids().items():
            s = proc_status(pid)
            comps[name] = {"cpu_seconds": round(s.get("cpu_seconds", 0), 1), "rss_mib": round(s.get("VmRSS", 0), 1)}
        out["components"] = comps
        out["audit_log_mib"] = round(cluster.audit_log.stat().st_size / 2**20, 1)
        base, op = out["baseline"], out["operator"]
        ratios = {}
        for key in ("p50", "p95", "max"):
            b, o = (base.get("ready_seconds") or {}).get(key), (op.get("ready_seconds") or {}).get(key)
            if b and o:
                ratios[key] = round(o / b, 2)
        out["overhead_ratio"] = ratios
        extra = (op.get("extra_mirror") or {}).get("nodes_rolled_seconds")
        bare = base.get("bare_daemonset_rollout_seconds")
        out["node_rollout_ratio"] = round(extra / bare, 2) if extra and bare else None
        after = (op.get("extra_mirror") or {}).get("bare_rollout_after_seconds")
        out["node_rollout_ratio_back_to_back"] = round(extra / after, 2) if extra and after else None
        if then is not None:
            then(cluster, names)
    return out


def json_safe(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))
