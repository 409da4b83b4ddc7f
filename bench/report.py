"""The table (figure, measured, target, pass/miss) and the PNG plots."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _p(d: dict[str, Any] | None) -> str:
    if not d or d.get("p50") is None:
        return "n/a"
    return f"p50 {d['p50']:.2f}s  p95 {d['p95']:.2f}s  max {d['max']:.2f}s"


def _row(rows: list[dict[str, Any]], figure: str, measured: Any, target: str = "", ok: bool | None = None) -> None:
    verdict = "" if ok is None else ("pass" if ok else "MISS")
    rows.append({"figure": figure, "measured": measured, "target": target, "verdict": verdict})


def _s(value: float | None, unit: str = "s") -> str:
    return "n/a" if value is None else f"{value:.2f}{unit}"


def _burst(burst: dict[str, Any]) -> str:
    text = f"{burst['writes']} in {burst['seconds']:.2f}s ({burst['per_second']}/s)"
    loop = burst.get("operator_loop")
    if loop:
        text += f"; operator's event loop on a CPU {loop['on_cpu']:.0%}, waiting for one {loop['runnable']:.0%}, idle {loop['waiting']:.0%}"
    return text


NOT_MEASURED = "not measured"
Rows = list[dict[str, Any]]


def _ratio(value: Any) -> str:
    return "n/a" if value is None else f"{value}x"


def _section(rows: Rows, parent: dict[str, Any], key: str, figure: str, target: str, build: Callable[[Rows, dict[str, Any]], None]) -> None:
    """Rows for `parent[key]` by `build`, or one "not measured" row saying why.

    A failed or missing scenario costs its own rows, never the table: an error is
    a MISS showing the error; a skip, an absence or an incomplete result (a field
    missing) has no verdict.
    """
    section = parent.get(key)
    if isinstance(section, dict) and "error" in section:
        _row(rows, figure, f"{NOT_MEASURED}: {str(section['error'])[:120]}", target, False)
    elif isinstance(section, dict) and "skipped" in section:
        _row(rows, figure, f"{NOT_MEASURED}: skipped: {str(section['skipped'])[:110]}", target)
    elif not isinstance(section, dict) or not section:
        _row(rows, figure, NOT_MEASURED, target)
    else:
        built: Rows = []
        try:
            build(built, section)
        except (KeyError, TypeError, ValueError, ZeroDivisionError, AttributeError) as exc:
            _row(rows, figure, f"{NOT_MEASURED}: incomplete result ({type(exc).__name__}: {exc})"[:140], target)
            return
        rows.extend(built)


def _fan_in(rows: Rows, fan: dict[str, Any]) -> None:
    n = fan["nodes"]
    front, bare = fan["front"], fan.get("bare_distribution") or {}
    per_blob = front["upstream_gets_per_blob"]
    bare_gets = ", ".join(map(str, bare.get("upstream_gets_per_blob") or [])) or "n/a"
    _row(
        rows,
        f"cache: {n} nodes pull at once: upstream GETs per blob",
        ", ".join(map(str, per_blob)) + f" ({front['pulls_ok']}/{n} pulled; bare distribution: {bare_gets})",
        "1 each",
        bool(per_blob) and front["pulls_ok"] == n and all(g == 1 for g in per_blob),
    )
    manifests = front["upstream_manifest_gets"]
    _row(rows, "  upstream GETs of the manifest", manifests, "1", manifests == 1)
    single = front["slowest_over_direct_single"]
    _row(
        rows,
        "  slowest pull / one direct pull (same run)",
        f"{_ratio(single)} ({_s(front['slowest'])} / {_s(fan['direct_single'])})",
        "<= 1.3x",
        single <= 1.3,
    )
    _row(
        rows,
        f"  slowest pull / slowest of {n} direct pulls at once",
        f"{_ratio(front.get('slowest_over_direct_concurrent'))} ({_s(fan.get('direct_concurrent_slowest'))} direct)",
    )


def _cap_stream(rows: Rows, cap: dict[str, Any]) -> None:
    over = cap["peak_over_cap"]
    _row(
        rows,
        f"cache: disk peak / cap, {cap['images']} images = {cap['stream_bytes'] / cap['cap_bytes']:.1f}x the cap",
        f"{_ratio(over)} ({cap['peak_disk_bytes'] / 2**20:.1f} of {cap['cap_bytes'] / 2**20:.1f} MiB, {cap.get('disk_samples')} samples)",
        "<= 1.05x",
        over <= 1.05,
    )
    whole = cap["pinned_image_whole"]
    _row(rows, "  image of a running pod (pinned) after the stream", "whole" if whole else "blobs missing", "whole", bool(whole))
    again = cap.get("evicted_image_pulled_again_from_upstream")
    shown = f"{NOT_MEASURED} (no image was evicted)" if again is None else ("yes" if again is True else "no")
    _row(rows, "  an evicted image pulls again (from the upstream)", shown, "yes", None if again is None else again is True)


def _outage(rows: Rows, outage: dict[str, Any]) -> None:
    for kind in ("stopped", "blackholed", "429"):
        r = outage.get(kind)
        figure = f"cache: upstream {kind}, past the TTL: images in use that pull"
        if not isinstance(r, dict) or not r.get("of"):
            _row(rows, figure, NOT_MEASURED, "100 %")
            continue
        _row(rows, figure, f"{100 * r['pulled'] / r['of']:.0f} % ({r['pulled']}/{r['of']})", "100 %", r["pulled"] == r["of"])


def _warm_prewarm(rows: Rows, warm: dict[str, Any]) -> None:
    first = warm["prewarmed_first_over_warm"]
    _row(
        rows,
        "cache: prewarmed image, first pull on a cold node / warm pull",
        f"{_ratio(first)} ({_s(warm['prewarmed_first_pull'])} / {_s(warm['prewarmed_warm_pull'])})",
        "0.8x-1.2x",
        0.8 <= first <= 1.2,
    )
    asked = warm["prewarmed_upstream_requests"]
    _row(rows, "  upstream manifest/blob requests during that pull", asked, "0", asked == 0)
    ratio = warm["warm_ratio"]
    _row(
        rows,
        "cache: warm pull through the front / direct",
        f"{_ratio(ratio)} ({_s(warm['warm'])} / {_s(warm['direct'])})",
        "<= 1.2x",
        ratio <= 1.2,
    )


def cache_rows(rows: Rows, cache: Any) -> None:
    """Issue 13's targets from `bench.cache.run`'s result (the mirror as rendered: distribution 3 behind Varnish)."""
    if not isinstance(cache, dict) or not cache or "error" in cache or "skipped" in cache:
        _section(rows, {"cache": cache}, "cache", "cache (issue 13)", "", lambda _rows, _section: None)
        return
    _section(rows, cache, "fan_in", "cache: N nodes pull one image at once", "1 GET per blob", _fan_in)
    _section(rows, cache, "cap_stream", "cache: disk peak / cap, a stream 3x the cap", "<= 1.05x", _cap_stream)
    _section(rows, cache, "outage", "cache: upstream down past the TTL: images in use that pull", "100 %", _outage)
    _section(rows, cache, "warm_prewarm", "cache: prewarmed and warm pulls", "0.8x-1.2x; <= 1.2x", _warm_prewarm)


def _release_rows(rows: Rows, r: dict[str, Any], *, release: str) -> None:
    """Per failure mode: the pull that starts at the failure (the worst case), then the withdrawal."""
    two = release.split(".", 1)[0] == "2"
    dial = "dial_timeout" if r.get("dial_timeout") else "no dial_timeout"
    target = "<= +1 s" if two else "(1.x: best achievable)"
    for kind in ("refused", "blackholed", "hanging"):
        figure = f"containerd {release} ({dial}), mirror {kind}: pull at the failure"
        m = r.get(kind)
        if not isinstance(m, dict):
            _row(rows, figure, NOT_MEASURED, target)
            continue
        penalty = m["stale_penalty"] if m["stale_ok"] else None
        if penalty is not None:
            shown = f"{penalty:+.2f}s ({m['stale_seconds']:.2f}s, direct {r['direct']:.2f}s)"
        else:
            shown = f"no image after {m['stale_seconds']:.0f}s (given up)"
        if "guarded_seconds" in m:
            # The agent's connection guard is the DaemonSet's default: its figure carries the target, on every release.
            guarded = m["guarded_penalty"] if m["guarded_ok"] else None
            _row(
                rows,
                f"{figure}, connection guard on",
                "failed" if guarded is None else f"{guarded:+.2f}s ({m['guarded_seconds']:.2f}s, {m.get('guarded_aborted', 0)} aborted)",
                "<= +1 s",
                guarded is not None and guarded <= 1.0,
            )
            _row(rows, "  without the guard", shown)
        else:
            _row(rows, figure, shown, target, (penalty is not None and penalty <= 1.0) if two else None)
        after = m.get("withdrawn_penalty")
        _row(
            rows,
            "  agent withdraws it after / a pull then",
            f"{_s(m.get('detect_seconds'))} / " + ("failed" if after is None else f"{after:+.2f}s"),
        )


def _failopen(rows: Rows, failopen: dict[str, Any]) -> None:
    releases = failopen["releases"]
    if not releases:
        raise ValueError("no containerd release measured")
    for release in releases:
        _section(rows, releases, release, f"fail-open, containerd {release}", "", functools.partial(_release_rows, release=release))


def _per_mode(failopen: Any, key: str) -> list[float]:
    """One figure of every release x failure mode that has it."""
    releases = failopen.get("releases") if isinstance(failopen, dict) else None
    return [
        m[key]
        for r in (releases or {}).values()
        if isinstance(r, dict)
        for m in r.values()
        if isinstance(m, dict) and m.get(key) is not None
    ]


def _probe_cost(rows: Rows, probe: dict[str, Any], failopen: Any) -> None:
    cpu = _per_mode(failopen, "agent_cpu_fraction")
    extra = f"; agent CPU {1000 * min(cpu):.1f}-{1000 * max(cpu):.1f} mCPU" if cpu else ""
    guard_cpu = _per_mode(failopen, "guard_idle_cpu_fraction")
    if guard_cpu:
        extra += f"; with the connection guard, idle: {1000 * min(guard_cpu):.1f}-{1000 * max(guard_cpu):.1f} mCPU"
    _row(
        rows,
        "probe cost: GET /v2/ per second per mirror at 1,000 nodes",
        f"{probe['requests_per_second_per_mirror_at_1000_nodes']}/s ({probe['requests_per_second_per_node_per_mirror']} per node){extra}",
        "stated",
    )


def _taint(rows: Rows, taint: dict[str, Any]) -> None:
    for size, t in taint.items():
        figure = f"startup taint, {size} kwok nodes at once: gone after the agent's call"
        if t.get("latency_max") is None:
            _row(rows, figure, f"{NOT_MEASURED}: {'; '.join(t.get('errors') or []) or 'none lifted'}"[:140], "<= 2 s", False)
            continue
        complete = t["lifted"] == t["nodes"] and not t.get("errors")
        _row(
            rows,
            figure,
            f"p50 {t['latency_p50']:.2f}s p95 {t['latency_p95']:.2f}s max {t['latency_max']:.2f}s ({t['lifted']}/{t['nodes']} lifted)",
            "<= 2 s",
            complete and t["latency_max"] <= 2.0,
        )
        _row(rows, "  all lifted (the bench's one client, 32 threads)", _s(t.get("all_lifted_seconds")))


def nodesafety_rows(rows: Rows, safety: Any) -> None:
    """Issue 14's targets from `bench.nodesafety`: fail-open per containerd release and failure mode, probe cost, the taint."""
    safety = safety if isinstance(safety, dict) else {}
    _section(rows, safety, "failopen", "fail-open per containerd release (issue 14)", "<= +1 s on 2.x", _failopen)
    _section(
        rows,
        safety,
        "probe_cost",
        "probe cost per mirror at 1,000 nodes",
        "stated",
        lambda sub, p: _probe_cost(sub, p, safety.get("failopen")),
    )
    _section(rows, safety, "taint", "startup taint gone after the agent's call", "<= 2 s", _taint)


def table(results: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
    rows: list[dict[str, Any]] = []
    cp = results.get("controlplane") or {}
    if cp and "error" not in cp:
        n, m = cp["mirrors"], cp["nodes"]
        op, base = cp.get("operator") or {}, cp.get("baseline") or {}
        _row(
            rows, f"add {m} kwok nodes (create / all Ready)", f"{cp['add_nodes']['create_seconds']}s / {cp['add_nodes']['ready_seconds']}s"
        )
        _row(rows, "apply -> Ready, operator", _p(op.get("ready_seconds")) + f"  ({op.get('ready_count')}/{n})")
        _row(rows, "apply -> children ready, baseline (no operator)", _p(base.get("ready_seconds")))
        ratio = cp.get("overhead_ratio") or {}
        p50 = ratio.get("p50")
        _row(
            rows,
            "operator / baseline (p50, p95, max)",
            ", ".join(f"{k} {v}x" for k, v in ratio.items()) or "n/a",
            "p50 <= 1.3x",
            None if p50 is None else p50 <= 1.3,
        )
        op_p50 = (op.get("ready_from_first_apply") or {}).get("p50")
        base_p50 = (base.get("ready_from_first_apply") or {}).get("p50")
        if op_p50 and base_p50:
            _row(rows, "  the same, both from the first apply (p50)", f"{op_p50}s / {base_p50}s = {round(op_p50 / base_p50, 2)}x")
        lag = op.get("ready_after_children") or {}
        _row(rows, "Ready reported after children ready", _p(lag), "p95 <= 1 s", None if lag.get("p95") is None else lag["p95"] <= 1.0)
        burst = op.get("ready_burst")
        if burst:
            _row(rows, "  the largest burst of Ready writes", _burst(burst))
        conv = op.get("converged_seconds")
        base_conv = base.get("converged_seconds")
        all_ratio = round(conv / base_conv, 2) if conv and base_conv else None
        _row(
            rows,
            f"{n} mirrors on {m} nodes: all Ready (/ baseline)",
            _s(conv) + (f" ({all_ratio}x)" if all_ratio else ""),
            "<= 1.3x baseline",
            None if all_ratio is None else all_ratio <= 1.3 and bool(op.get("complete")),
        )
        _row(rows, "  baseline: all children ready (from its first apply)", _s(base.get("converged_seconds")))
        _row(rows, "  node plans written while converging", len(op.get("plan_versions") or []))
        req = op.get("requests_converging") or {}
        per_verb = ", ".join(f"{k} {v}" for k, v in (req.get("per_mirror_by_verb") or {}).items())
        _row(rows, "API requests per mirror by verb", per_verb or "n/a")
        wpm = req.get("writes_per_mirror")
        _row(rows, "writes per mirror", wpm if wpm is not None else "n/a", "<= 6", None if wpm is None else wpm <= 6)
        _row(rows, "  writes by resource", ", ".join(f"{k} {v}" for k, v in (req.get("writes_by_resource") or {}).items()))
        quiet = op.get("quiet") or {}
        if quiet:
            _row(rows, f"writes in a {quiet['seconds']:.0f}s quiet period", quiet["writes"], "0", quiet["writes"] == 0)
            _row(rows, "  all requests in the quiet period", quiet["total"])
        fp = op.get("footprint") or {}
        if fp:
            _row(
                rows,
                f"operator RSS peak (VmHWM), {n} mirrors",
                f"{fp['hwm_mib']} MiB (now {fp['rss_mib']})",
                "< 150 MiB",
                fp["hwm_mib"] < 150,
            )
            _row(rows, "operator CPU while converging / total", f"{op.get('cpu_seconds_converging')}s / {fp['cpu_seconds_total']}s")
        traced = op.get("tracemalloc") or {}
        if traced.get("peak_mib") is not None:
            top = "; ".join(f"{Path(f).name} {m} MiB" for f, m in (traced.get("by_file") or [])[:3])
            _row(rows, "  tracemalloc peak (restart on the converged cluster)", f"{traced['peak_mib']} MiB; largest: {top}")
        extra = op.get("extra_mirror") or {}
        _row(
            rows,
            f"one more mirror: all {m} nodes carry it",
            _s(extra.get("nodes_rolled_seconds")) + f" (Ready {_s(extra.get('ready_seconds'))})",
        )
        _row(rows, f"  bare DaemonSet rollout over {m} nodes", _s(base.get("bare_daemonset_rollout_seconds")))
        _row(rows, "  ratio", f"{cp.get('node_rollout_ratio')}x")
        _row(rows, "  bare rollout of the operator's DaemonSet, right after", _s(extra.get("bare_rollout_after_seconds")))
        ratio_nodes = cp.get("node_rollout_ratio_back_to_back")
        _row(rows, "  ratio, back to back", f"{ratio_nodes}x", "<= 1.2x", None if ratio_nodes is None else ratio_nodes <= 1.2)
        _row(rows, "  operator writes during that bare rollout", extra.get("writes_during_bare_rollout", "n/a"), "0")
        prof = op.get("profile") or {}
        if prof.get("threads"):
            _row(rows, "operator busy while converging (py-spy)", f"{prof['busy_cpu_seconds_estimate']}s CPU over {prof['seconds']}s")
    elif cp:
        _row(rows, "control plane", cp["error"][:200], "", False)

    dp = results.get("dataplane") or {}
    if dp.get("skipped"):
        _row(rows, "data path", f"skipped: {dp['skipped']}")
    elif dp and "error" not in dp:
        for image, r in dp["pulls"].items():
            _row(rows, f"[{image}] direct pull (median)", _s(r["direct"]))
            _row(rows, f"[{image}] cold pull through mirror / direct", f"{r['cold_ratio']}x ({_s(r['cold'])})")
            _row(
                rows,
                f"[{image}] warm pull through mirror / direct",
                f"{r['warm_ratio']}x ({_s(r['warm'])})",
                "<= 1.2x",
                r["warm_ratio"] <= 1.2,
            )
        for key, how in (("fan_in", "at once"), ("fan_in_staggered", "1 then the rest at once")):
            fan = dp.get(key) or {}
            if fan:
                # Bare distribution 3 (the mirror without its cache front): context for the cache's fan-in below,
                # which measures the issue-13 target on what the operator renders.
                _row(
                    rows,
                    f"{fan['nodes']} nodes pull ({how}), bare distribution (no front): upstream GETs per blob",
                    f"{fan['max_gets_per_blob']} max ({fan['upstream_blob_bytes'] / 2**20:.1f} MiB served for a {fan['image_blob_bytes'] / 2**20:.1f} MiB image)",
                )
        if dp.get("mirror_registry"):
            _row(rows, "  mirror registry / containerd", f"distribution {dp['mirror_registry']} / containerd {dp.get('containerd')}")
        for what, r in (dp.get("fail_open") or {}).items():
            penalty = r.get("penalty")
            if what == "direct reference":
                _row(rows, "fail-open: direct pull reference (median of 3)", _s(r["seconds"]))
                continue
            shown = f"{penalty:+.2f}s ({r['seconds']:.2f}s)" if penalty is not None else f"failed: {r.get('error', '')[:60]}"
            _row(rows, f"mirror down: {what}", shown, "<= +1 s", penalty is not None and penalty <= 1.0)
        detect = dp.get("agent_withdraw_seconds") or {}
        for what, secs in detect.items():
            _row(rows, f"  agent withdraws a {what} mirror after", _s(secs))
        agent = dp.get("agent_footprint") or {}
        if agent:
            _row(rows, "agent RSS peak (VmHWM)", f"{agent['hwm_mib']} MiB", "< 30 MiB", agent["hwm_mib"] < 30)
        cache_rows(rows, dp.get("cache"))
    elif dp:
        _row(rows, "data path", dp["error"][:200], "", False)
    if "nodesafety" in results:
        nodesafety_rows(rows, results["nodesafety"])

    width = max((len(r["figure"]) for r in rows), default=10)
    mwidth = min(70, max((len(str(r["measured"])) for r in rows), default=10))
    lines = [f"{'figure':{width}}  {'measured':{mwidth}}  {'target':22}  verdict", "-" * (width + mwidth + 36)]
    for r in rows:
        lines.append(f"{r['figure']:{width}}  {r['measured']!s:{mwidth}}  {r['target']:22}  {r['verdict']}")
    m = results.get("machine") or {}
    lines.insert(
        0,
        f"regmirror bench ({results.get('scale')}) on {m.get('nproc')} x {m.get('cpu_model')}, {m.get('memory_gib')} GiB; {results.get('stamp')}",
    )
    return rows, "\n".join(lines)


def plots(results: dict[str, Any], out_dir: Path, stamp: str) -> list[str]:
    """apply -> Ready distribution (operator vs baseline) and the operator's RSS/CPU over time."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench: matplotlib missing (pip install -e '.[bench]'); no plots")
        return []
    written = []
    cp = results.get("controlplane") or {}
    op, base = cp.get("operator") or {}, cp.get("baseline") or {}
    if op.get("ready_samples") or base.get("ready_samples"):
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
        for label, samples in (
            ("operator: apply -> Ready", op.get("ready_samples")),
            ("baseline: apply -> children ready", base.get("ready_samples")),
        ):
            if samples:
                ax1.plot(samples, [(i + 1) / len(samples) for i in range(len(samples))], drawstyle="steps-post", label=label)
                ax2.hist(samples, bins=30, alpha=0.6, label=label)
        ax1.set_xlabel("seconds")
        ax1.set_ylabel("fraction of mirrors")
        ax1.set_title(f"{cp.get('mirrors')} mirrors on {cp.get('nodes')} kwok nodes (CDF)")
        ax1.grid(alpha=0.3)
        ax1.legend()
        ax2.set_xlabel("seconds")
        ax2.set_ylabel("mirrors")
        ax2.set_title("distribution")
        ax2.legend()
        path = out_dir / f"{stamp}-ready-latency.png"
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(str(path))
    samples = op.get("rss_samples") or []
    if samples:
        fig, ax = plt.subplots(figsize=(10, 4))
        t = [s[0] for s in samples]
        ax.plot(t, [s[1] for s in samples], label="RSS (MiB)")
        ax.plot(t, [s[2] for s in samples], label="VmHWM (MiB)", linestyle="--")
        ax.axhline(150, color="red", linewidth=0.8, label="target 150 MiB")
        ax.set_xlabel("seconds since the operator started")
        ax.set_ylabel("MiB")
        ax2 = ax.twinx()
        ax2.plot(t, [s[3] for s in samples], color="gray", label="CPU seconds (cumulative)")
        ax2.set_ylabel("CPU seconds")
        window = op.get("converging_window")
        if window:
            ax.axvspan(window[0], window[1], color="orange", alpha=0.15, label="converging")
        ax.legend(loc="upper left")
        ax2.legend(loc="lower right")
        ax.set_title(f"operator footprint, {cp.get('mirrors')} mirrors on {cp.get('nodes')} nodes")
        path = out_dir / f"{stamp}-operator-footprint.png"
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(str(path))
    return written
