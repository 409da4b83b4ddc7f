"""``python -m bench [--scale large]``: run the scenarios, print the table, write JSON and plots.

In order: the control plane (the baseline and the operator on kwok nodes; then,
on the same cluster, the startup taint lifted from every node at once), the data
path (pulls, fan-in and fail-open with containerd 1.6, then the cache scenarios),
then node safety's fail-open per containerd release. Each part has a --skip flag.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from bench.measure import machine
from bench.report import plots, table

RESULTS = Path(__file__).resolve().parent / "results"
SCALES = {
    # mirrors, nodes, quiet period (s), per-phase timeout (s)
    "default": (50, 100, 60.0, 300.0),
    "large": (500, 1000, 120.0, 600.0),
    # A realistic large cluster: few mirrors, many nodes (rollouts and node accounting dominate).
    "nodes": (20, 2000, 60.0, 900.0),
}


def source_state() -> dict[str, Any]:
    """The commit and the uncommitted operator files the figures were taken with."""
    import hashlib
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=False, cwd=RESULTS.parents[1]).stdout.strip()

    package = RESULTS.parents[1] / "operator" / "regmirror"
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.read_bytes())
    return {
        "commit": git("rev-parse", "--short", "HEAD"),
        "uncommitted": git("status", "--porcelain", "--", "operator").splitlines(),
        "operator_sources_sha256": digest.hexdigest()[:16],
    }


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument(
        "--scale", choices=sorted(SCALES), default="default", help="default: 50 mirrors / 100 nodes; large: 500 / 1,000; nodes: 20 / 2,000"
    )
    p.add_argument("--mirrors", type=int, help="override the number of mirrors")
    p.add_argument("--nodes", type=int, help="override the number of kwok nodes")
    p.add_argument("--quiet-seconds", type=float, help="length of the quiet period after convergence (default 60, large 120)")
    p.add_argument("--timeout", type=float, help="timeout of each waiting phase in seconds")
    p.add_argument("--repeats", type=int, default=3, help="pulls per data-path measurement (median reported)")
    p.add_argument(
        "--profile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="py-spy the operator while it converges (default: on when py-spy is installed)",
    )
    p.add_argument("--skip-controlplane", action="store_true")
    p.add_argument("--skip-dataplane", action="store_true", help="no pulls, fan-in or cache scenarios")
    p.add_argument("--skip-failopen", action="store_true", help="no fail-open per containerd release (node safety, issue 14)")
    p.add_argument("--skip-taint", action="store_true", help="no startup-taint latency (node safety, issue 14)")
    p.add_argument(
        "--releases", help="containerd releases for the fail-open part, comma-separated (default: all of bench.nodesafety.RELEASES)"
    )
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    return p.parse_args(argv)


def _section_errors(sections: Any) -> bool:
    """Whether any section of a result (a dict of dicts) recorded an error instead of figures."""
    return isinstance(sections, dict) and any(isinstance(v, dict) and "error" in v for v in sections.values())


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    mirrors, nodes, quiet, timeout = SCALES[args.scale]
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    profile = args.profile
    if profile is None:
        from bench.profile import _py_spy

        profile = _py_spy() is not None and os.geteuid() == 0
    results: dict[str, Any] = {
        "stamp": stamp,
        "scale": args.scale,
        "command": " ".join(["python -m bench", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine(),
        "note": "shared 2-core machine; other work may run concurrently, so expect noise",
        "source": source_state(),
    }
    began = time.monotonic()
    failed = False
    node_count = args.nodes or nodes
    safety: dict[str, Any] = {}
    releases: list[str] = []
    if not (args.skip_failopen and args.skip_taint):
        from bench import nodesafety

        # A wrong --releases stops here, not after the control plane's minutes.
        releases = nodesafety.parse_releases(args.releases) if args.releases else list(nodesafety.RELEASES)
        safety["probe_cost"] = nodesafety.probe_cost()
        # A part left out on purpose says so in the table ("not measured: skipped: --skip-taint").
        safety.update(
            {part: {"skipped": f"--skip-{part}"} for part, skip in (("taint", args.skip_taint), ("failopen", args.skip_failopen)) if skip}
        )
        results["nodesafety"] = safety

    def taint_on(cluster: Any, names: list[str]) -> None:
        """The startup taint on the control plane's own kwok nodes (saves a cluster start and N node creations)."""
        from bench import nodesafety

        try:
            safety["taint"] = nodesafety.taint_on(cluster, names, [node_count])
        except Exception as exc:
            traceback.print_exc()
            safety["taint"] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}

    if not args.skip_controlplane:
        from bench import controlplane

        cfg = controlplane.Config(
            mirrors=args.mirrors or mirrors,
            nodes=node_count,
            quiet_seconds=args.quiet_seconds if args.quiet_seconds is not None else quiet,
            timeout=args.timeout or timeout,
            profile=profile,
            out_dir=args.out_dir,
            stamp=stamp,
        )
        try:
            results["controlplane"] = controlplane.run(cfg, then=None if args.skip_taint else taint_on)
        except Exception as exc:
            failed = True
            traceback.print_exc()
            results["controlplane"] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
    if not args.skip_dataplane:
        from bench import dataplane

        try:
            results["dataplane"] = dataplane.run(args.out_dir / f"{stamp}-dataplane", repeats=args.repeats)
        except Exception as exc:
            failed = True
            traceback.print_exc()
            results["dataplane"] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
        failed = failed or _section_errors(results["dataplane"].get("cache"))
    if not args.skip_taint and not args.skip_controlplane and "taint" not in safety:
        safety["taint"] = {"error": "not reached: the control-plane benchmark failed before it"}
    elif not args.skip_taint and args.skip_controlplane:
        # No control plane to reuse: one of its own, at the same node count.
        from bench import nodesafety

        try:
            safety["taint"] = nodesafety.taint([node_count])
        except Exception as exc:
            traceback.print_exc()
            safety["taint"] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
    if not args.skip_failopen:
        from bench import nodesafety

        work = Path(tempfile.mkdtemp(prefix="bench-failopen-"))
        try:
            safety["failopen"] = nodesafety.failopen(work, releases)
        except Exception as exc:
            traceback.print_exc()
            safety["failopen"] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
        finally:
            shutil.rmtree(work, ignore_errors=True)
        if "skipped" in safety["failopen"]:
            print(f"bench: fail-open per containerd release skipped: {safety['failopen']['skipped']}", file=sys.stderr)
    failed = failed or _section_errors(safety)
    results["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    results["wall_seconds"] = round(time.monotonic() - began, 1)
    results["plots"] = plots(results, args.out_dir, stamp)
    rows, text = table(results)
    results["targets"] = rows
    out = args.out_dir / f"{stamp}.json"
    out.write_text(json.dumps(results, indent=1, default=str))
    print(text)
    print(f"\nresults: {out}")
    for p in results["plots"]:
        print(f"plot:    {p}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
