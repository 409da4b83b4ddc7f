"""The table (figure, measured, target, pass/miss) and the PNG plots."""

from __future__ import annotations

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
        lag = op.get("ready_after_children") or {}
        _row(rows, "Ready reported after children ready", _p(lag), "p95 <= 1 s", None if lag.get("p95") is None else lag["p95"] <= 1.0)
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
        _row(rows, "  baseline: all children ready", _s(base.get("converged_seconds")))
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
                _row(
                    rows,
                    f"{fan['nodes']} nodes pull ({how}): upstream GETs per blob",
                    f"{fan['max_gets_per_blob']} max ({fan['upstream_blob_bytes'] / 2**20:.1f} MiB served for a {fan['image_blob_bytes'] / 2**20:.1f} MiB image)",
                    "exactly 1",
                    fan["max_gets_per_blob"] == 1,
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
    elif dp:
        _row(rows, "data path", dp["error"][:200], "", False)

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
