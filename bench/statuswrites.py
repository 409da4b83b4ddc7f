"""``python -m bench.statuswrites``: how many RegistryMirror status writes a second the control plane absorbs.

When a node rollout completes at 500 mirrors, about 110 mirrors turn Ready at once and
their status writes go out together (docs/performance.md, "The Ready burst at large,
measured"). This measures the ceiling of such a burst on this machine, with nothing else
running: ``--mirrors`` RegistryMirrors on a fresh control plane, then rounds of one status
write per mirror, all at once, through the operator's own client (`HttpKube`), alternating

- server-side apply (what the operator sends) with ``api_max_in_flight`` 8 (its default)
  and 16 places, and
- a JSON merge patch with 8 places (a cheaper-looking way to write the same status).

Printed: the median seconds per round and writes per second of each; the JSON goes to
bench/results/<stamp>-statuswrites.json.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

from bench.__main__ import RESULTS, source_state
from bench.measure import machine
from harness import LocalCluster
from regmirror import constants as c
from regmirror.kube import HttpKube, load_credentials

WAYS = (("apply", 8), ("apply", 16), ("merge", 8))


def _status(name: str, round_: int) -> dict[str, Any]:
    """A status of four conditions, which change every round, so every write is one. (A real mirror's status
    also carries its hosts, access and node counts: this one is smaller.)"""
    stamp = f"2026-01-01T00:{round_ // 60 % 60:02d}:{round_ % 60:02d}Z"
    conditions = [
        {
            "type": kind,
            "status": value,
            "reason": f"{kind}Round{round_}",
            "message": "m" * 80,
            "lastTransitionTime": stamp,
            "observedGeneration": 1,
        }
        for kind, value in (("Ready", "True"), ("Reconciling", "False"), ("Stalled", "False"), ("NodesConfigured", "True"))
    ]
    return {
        "apiVersion": c.API_VERSION,
        "kind": c.KIND,
        "metadata": {"name": name},
        "status": {"observedGeneration": 1, "conditions": conditions},
    }


async def _round(client: HttpKube, names: list[str], how: str, round_: int) -> float:
    started = time.monotonic()
    if how == "apply":
        await asyncio.gather(*(client.apply(_status(n, round_), subresource="status") for n in names))
    else:
        await asyncio.gather(
            *(
                client._request(  # the same client and places, another content type
                    "PATCH",
                    f"/apis/{c.API_VERSION}/{c.PLURAL}/{n}/status",
                    body={"status": _status(n, round_)["status"]},
                    content_type="application/merge-patch+json",
                )
                for n in names
            )
        )
    return time.monotonic() - started


async def _measure(names: list[str], rounds: int) -> dict[str, list[float]]:
    credentials = load_credentials()
    seconds: dict[str, list[float]] = {f"{how} {places}": [] for how, places in WAYS}
    round_ = 0
    for _ in range(rounds):
        for how, places in WAYS:
            client = HttpKube(credentials, max_in_flight=places, timeout=30.0)
            round_ += 1
            try:
                seconds[f"{how} {places}"].append(await _round(client, names, how, round_))
            finally:
                await client.close()
    return seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.statuswrites", description=__doc__)
    p.add_argument("--mirrors", type=int, default=110, help="status writes per round (default: the Ready burst at 500 mirrors)")
    p.add_argument("--rounds", type=int, default=6, help="rounds of each way, interleaved")
    args = p.parse_args(argv)
    names = [f"m{i:04d}" for i in range(args.mirrors)]
    with LocalCluster() as cluster:
        repo = Path(__file__).resolve().parents[1]
        cluster.kubectl("apply", "--server-side", "-f", str(repo / "crds"))
        cluster.kubectl("wait", "--for=condition=Established", f"crd/{c.CRD_NAME}", "--timeout=60s")
        assert cluster.dir is not None
        manifest = cluster.dir / "mirrors.json"
        spec = {"upstream": {"url": "https://registry-1.docker.io"}, "storage": {"size": "1Gi"}}
        items = [{"apiVersion": c.API_VERSION, "kind": c.KIND, "metadata": {"name": n}, "spec": spec} for n in names]
        manifest.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))
        cluster.kubectl("apply", "--server-side", "-f", str(manifest))
        os.environ["KUBECONFIG"] = str(cluster.kubeconfig)
        seconds = asyncio.run(_measure(names, args.rounds))
    result: dict[str, Any] = {"machine": machine(), "source": source_state(), "mirrors": args.mirrors, "ways": {}}
    for way, values in seconds.items():
        median = statistics.median(values)
        result["ways"][way] = {
            "seconds": [round(v, 3) for v in values],
            "median_seconds": round(median, 3),
            "writes_per_second": round(args.mirrors / median, 1),
        }
        print(
            f"{way:>9} places: median {median:.3f} s per {args.mirrors} writes = {args.mirrors / median:.1f} writes/s  {[round(v, 2) for v in values]}"
        )
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{datetime.datetime.now(datetime.UTC):%Y%m%dT%H%M%SZ}-statuswrites.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
