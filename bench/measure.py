"""Process footprint from /proc, audit-log request counts, percentiles, and the machine."""

from __future__ import annotations

import json
import os
import platform
import statistics
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

CLK_TCK = os.sysconf("SC_CLK_TCK")
WRITE_VERBS = frozenset({"create", "update", "patch", "delete", "deletecollection"})


def proc_status(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM (MiB) and user+system CPU seconds of one process."""
    out: dict[str, float] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) / 1024
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        out["cpu_seconds"] = (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime
    except (OSError, ValueError, IndexError):
        pass
    return out


class ProcSampler(threading.Thread):
    """Samples one process every ``interval`` s: (seconds since start, RSS MiB, HWM MiB, CPU s)."""

    def __init__(self, pid: int, interval: float = 0.5) -> None:
        super().__init__(name=f"proc sampler {pid}", daemon=True)
        self.pid = pid
        self.interval = interval
        self.t0 = time.monotonic()
        self.samples: list[tuple[float, float, float, float]] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while True:
            s = proc_status(self.pid)
            if s:
                self.samples.append((time.monotonic() - self.t0, s.get("VmRSS", 0.0), s.get("VmHWM", 0.0), s.get("cpu_seconds", 0.0)))
            if self._halt.wait(self.interval):
                return

    def stop(self) -> None:
        self._halt.set()
        self.join(5)


class SchedSampler(threading.Thread):
    """One thread's ``/proc/<pid>/task/<tid>/schedstat`` every ``interval`` s (the main thread by default):
    (wall-clock time, ns on a CPU, ns runnable but waiting for one). Where the operator's event loop
    spent a burst of a second or two: working, waiting for a core, or waiting for answers."""

    def __init__(self, pid: int, tid: int | None = None, interval: float = 0.05) -> None:
        super().__init__(name=f"schedstat sampler {pid}", daemon=True)
        self.path = Path(f"/proc/{pid}/task/{tid or pid}/schedstat")
        self.interval = interval
        self.samples: list[tuple[float, int, int]] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while True:
            try:
                on_cpu, waiting, _ = self.path.read_text().split()
                self.samples.append((time.time(), int(on_cpu), int(waiting)))
            except (OSError, ValueError):
                return  # the process ended (or the kernel has no schedstats)
            if self._halt.wait(self.interval):
                return

    def stop(self) -> None:
        self._halt.set()
        self.join(5)


def thread_time(samples: list[tuple[float, int, int]], since: float, until: float) -> dict[str, float] | None:
    """Shares of the wall-clock window [since, until] a sampled thread spent on a CPU, runnable (waiting for
    a core) and neither (waiting for I/O or a timer), between the samples nearest to its ends; None when
    the samples do not cover it."""
    if not samples or samples[0][0] > since or samples[-1][0] < until:
        return None
    first = min(samples, key=lambda s: abs(s[0] - since))
    last = min(samples, key=lambda s: abs(s[0] - until))
    wall = last[0] - first[0]
    if wall <= 0:
        return None
    on_cpu, runnable = (last[1] - first[1]) / 1e9 / wall, (last[2] - first[2]) / 1e9 / wall
    return {
        "seconds": round(wall, 3),
        "on_cpu": round(on_cpu, 3),
        "runnable": round(runnable, 3),
        "waiting": round(max(0.0, 1 - on_cpu - runnable), 3),
    }


def rfc3339(epoch: float) -> str:
    """An epoch time as the audit log writes it."""
    import datetime

    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def rfc3339_now() -> str:
    """An audit-log comparable timestamp (the API server writes microseconds, UTC, Z)."""
    return rfc3339(time.time())


def _audit_events(audit_log: Path, since: str, until: str, *needles: str) -> Iterator[dict[str, Any]]:
    """The audit log's events received in [since, until) whose line holds every needle.

    The needles are matched before JSON is parsed: the log of a 1,000-node
    cluster is hundreds of MB of kwok heartbeats."""
    with open(audit_log, encoding="utf-8") as f:
        for line in f:
            if not all(needle in line for needle in needles):
                continue
            try:
                event = json.loads(line)
            except ValueError:
                continue  # a line still being written
            if since <= event.get("requestReceivedTimestamp", "") < until:
                yield event


def audit_requests(audit_log: Path, user: str, since: str = "", until: str = "\uffff") -> list[dict[str, Any]]:
    """One record per request (by auditID) of ``user`` received in [since, until)."""
    seen: dict[str, dict[str, Any]] = {}
    for event in _audit_events(audit_log, since, until, f'"username":"{user}"'):
        if (event.get("objectRef") or {}).get("resource") == "leases":
            continue  # leader election's heartbeat (a GET and a renew every 2 s), not the work measured
        audit_id = event.get("auditID", "")
        # A watch logs ResponseStarted and ResponseComplete: keep one, the completed one if any.
        if audit_id not in seen or event.get("stage") == "ResponseComplete":
            seen[audit_id] = event
    return list(seen.values())


#: kwok's identity in the harness (tests/harness/cluster.py): it provisions and binds every claim.
KWOK_USER = "kwok-controller"
CLAIM_RESOURCES = frozenset({"persistentvolumeclaims", "persistentvolumes"})


def window_load(audit_log: Path, since: str, until: str, inner: tuple[str, str] | None = None) -> dict[str, Any]:
    """Who loaded the API server in [since, until), and what that did to claim binding.

    kwok v0.8.0 plays the stages of a non-pod resource with one worker
    (`PlayStageParallelism: 1` in pkg/kwok/controllers/controller.go), so it
    provisions claims one at a time: one play of the stages is four requests
    (create the PV, patch the claim's metadata, spec, status) and one more to
    bind the PV, but more than half of the stages play twice (the second PV
    create is answered 409), so it measured about 11 requests per claim at
    500 mirrors. How fast claims bind is then the latency of those requests, which grows with
    everything else the API server serves on the same cores. Returned:
    completed non-watch requests by user (node leases counted apart), and
    kwok's claim and volume requests: count, server latency, and their sum
    (the time the one worker spent waiting on the API server). With ``inner``
    (a shorter window in it, such as a burst), the same pass also counts the
    requests received in that window by user (``inner_requests_by_user``,
    node leases included)."""
    by_user: Counter[str] = Counter()
    in_inner: Counter[str] = Counter()
    leases = 0
    claim_latency: list[float] = []
    for event in _audit_events(audit_log, since, until, '"stage":"ResponseComplete"'):
        if event.get("verb") == "watch":
            continue
        resource = (event.get("objectRef") or {}).get("resource", "")
        user = (event.get("user") or {}).get("username", "?")
        if inner is not None and inner[0] <= event.get("requestReceivedTimestamp", "") < inner[1]:
            in_inner[user] += 1
        if resource == "leases":
            leases += 1
            continue
        by_user[user] += 1
        if user == KWOK_USER and resource in CLAIM_RESOURCES and event.get("verb") != "list":
            try:
                claim_latency.append(_seconds(event["stageTimestamp"]) - _seconds(event["requestReceivedTimestamp"]))
            except (KeyError, ValueError):
                continue
    load: dict[str, Any] = {
        "requests_by_user": dict(by_user.most_common()),
        "lease_requests": leases,
        "kwok_claim_requests": {
            **percentiles(claim_latency),
            "sum_seconds": round(sum(claim_latency), 1),
        },
    }
    if inner is not None:
        load["inner_requests_by_user"] = dict(in_inner.most_common())
    return load


def ready_status_write(events: list[dict[str, Any]], children_ready: dict[str, float], ready_seen: dict[str, float]) -> dict[str, Any]:
    """Where "Ready after children ready" goes, per mirror, from the operator's audit events.

    ``children_ready`` and ``ready_seen`` are ``time.monotonic()`` stamps of the
    bench's own watches. The status write that made a mirror Ready is its last
    status patch received before the bench saw Ready. Split: children ready ->
    that request received (the operator's watch, queue and pass), received ->
    answered (the API server), answered -> seen (the watch back to the bench)."""
    offset = time.time() - time.monotonic()
    decided, served, delivered = [], [], []
    for name, (received, answered) in ready_writes(events, ready_seen).items():
        if name not in children_ready:
            continue
        decided.append(received - (children_ready[name] + offset))
        served.append(answered - received)
        delivered.append(ready_seen[name] + offset - answered)
    return {"operator": percentiles(decided), "api_server": percentiles(served), "watch": percentiles(delivered)}


def ready_writes(events: list[dict[str, Any]], ready_seen: dict[str, float]) -> dict[str, tuple[float, float]]:
    """Per mirror, the status write that made it Ready: its last status patch received before the bench saw
    Ready (``ready_seen``: ``time.monotonic()`` stamps), as (received, answered) epoch times."""
    offset = time.time() - time.monotonic()
    writes: dict[str, list[tuple[float, float]]] = {}
    for e in events:
        ref = e.get("objectRef") or {}
        if e.get("verb") != "patch" or ref.get("subresource") != "status" or e.get("stage") != "ResponseComplete":
            continue
        try:
            writes.setdefault(ref.get("name", ""), []).append((_seconds(e["requestReceivedTimestamp"]), _seconds(e["stageTimestamp"])))
        except (KeyError, ValueError):
            continue
    out = {}
    for name, ready in ready_seen.items():
        before = [w for w in writes.get(name, []) if w[0] <= ready + offset]
        if before:
            out[name] = max(before)
    return out


def ready_burst(writes: dict[str, tuple[float, float]], gap: float = 0.3) -> dict[str, Any] | None:
    """The largest run of Ready-making status writes (``ready_writes``) received less than ``gap`` s apart:
    at 500 mirrors, the hundred mirrors that turn Ready when the node rollout completes. Its size, span
    (first received to last answered), pace, and the API server's time for those writes."""
    stamps = sorted(writes.values())
    if not stamps:
        return None
    runs, run = [], [stamps[0]]
    for w in stamps[1:]:
        if w[0] - run[-1][0] < gap:
            run.append(w)
        else:
            runs.append(run)
            run = [w]
    runs.append(run)
    burst = max(runs, key=len)
    since, until = burst[0][0], max(answered for _, answered in burst)
    span = until - since
    return {
        "writes": len(burst),
        "from": since,
        "to": until,
        "seconds": round(span, 3),
        "per_second": round(len(burst) / span, 1) if span > 0 else None,
        "api_server": percentiles([answered - received for received, answered in burst]),
    }


def histograms(before: dict[str, float], after: dict[str, float], name: str, label: str) -> dict[str, dict[str, float | None]]:
    """One labelled Prometheus histogram between two scrapes (metric line -> value), per label value:
    observations, mean, and the p50/p95 as the upper bound of the bucket they fall in (None when
    nothing was observed or it lies past the last finite bucket: JSON has no infinity)."""
    out: dict[str, dict[str, float | None]] = {}
    buckets: dict[str, list[tuple[float, float]]] = {}
    for line, value in after.items():
        if not line.startswith(name + "_bucket{") or f'{label}="' not in line:
            continue
        fields = dict(part.split("=", 1) for part in line[line.index("{") + 1 : -1].split(","))
        key, le = fields[label].strip('"'), fields["le"].strip('"')
        buckets.setdefault(key, []).append((float(le), value - before.get(line, 0.0)))
    for key, counts in sorted(buckets.items()):
        counts.sort()
        total = counts[-1][1] if counts else 0.0
        labels = f'{{{label}="{key}"}}'
        summed = after.get(f"{name}_sum{labels}", 0.0) - before.get(f"{name}_sum{labels}", 0.0)

        def quantile(q: float, counts: list[tuple[float, float]] = counts, total: float = total) -> float | None:
            le = next((le for le, n in counts if n >= q * total), None) if total else None
            return le if le is not None and le != float("inf") else None

        out[key] = {"n": total, "mean": round(summed / total, 4) if total else None, "p50_le": quantile(0.5), "p95_le": quantile(0.95)}
    return out


def _resource(event: dict[str, Any]) -> str:
    ref = event.get("objectRef") or {}
    resource = ref.get("resource", "?")
    if ref.get("subresource"):
        resource += "/" + ref["subresource"]
    return resource


def summarize_requests(events: list[dict[str, Any]], per: int) -> dict[str, Any]:
    """Requests by verb and writes by verb+resource, in total and per mirror."""
    by_verb = Counter(e.get("verb", "?") for e in events)
    writes = [e for e in events if e.get("verb") in WRITE_VERBS]
    by_write = Counter(f"{e.get('verb')} {_resource(e)}" for e in writes)
    failed = Counter(
        f"{e.get('verb')} {_resource(e)} {e.get('responseStatus', {}).get('code')}"
        for e in events
        if (e.get("responseStatus") or {}).get("code", 200) >= 400
    )
    per = max(per, 1)
    latency: dict[str, list[float]] = {}
    for e in events:
        if e.get("verb") in ("watch",) or e.get("stage") != "ResponseComplete":
            continue
        try:
            took = _seconds(e["stageTimestamp"]) - _seconds(e["requestReceivedTimestamp"])
        except (KeyError, ValueError):
            continue
        latency.setdefault(e.get("verb", "?"), []).append(took)
    return {
        "server_latency_by_verb": {verb: percentiles(v) for verb, v in latency.items()},
        "total": len(events),
        "writes": len(writes),
        "by_verb": dict(by_verb.most_common()),
        "per_mirror_by_verb": {k: round(v / per, 2) for k, v in by_verb.most_common()},
        "writes_per_mirror": round(len(writes) / per, 2),
        "writes_by_resource": dict(by_write.most_common()),
        "failed": dict(failed.most_common()),
    }


def _seconds(stamp: str) -> float:
    import datetime

    return datetime.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=datetime.UTC).timestamp()


def percentiles(values: list[float]) -> dict[str, float | None]:
    """p50, p95, max, mean of a sample (None when empty)."""
    if not values:
        return {"n": 0, "p50": None, "p95": None, "max": None, "mean": None}
    ordered = sorted(values)

    def pct(p: float) -> float:
        # nearest-rank: the smallest value with at least p% of the sample at or below it
        index = max(0, min(len(ordered) - 1, int(-(-p * len(ordered) // 100)) - 1))
        return round(ordered[index], 3)

    return {"n": len(ordered), "p50": pct(50), "p95": pct(95), "max": round(ordered[-1], 3), "mean": round(statistics.fmean(ordered), 3)}


def machine() -> dict[str, Any]:
    """What the figures were taken on."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kib = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    except OSError:
        pass
    load = os.getloadavg()
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg_at_start": [round(x, 2) for x in load],
    }
