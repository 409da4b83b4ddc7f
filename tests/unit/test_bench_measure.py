"""`bench.measure`'s audit-log readings: who loaded the API server in a window, and where the Ready write's time went.

The lines are in the shape kube-apiserver writes them (the harness's audit
policy, Metadata level); the log here is written by the test.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from bench.controlplane import _metric_lines
from bench.measure import (
    KWOK_USER,
    SchedSampler,
    _seconds,
    audit_requests,
    histograms,
    ready_burst,
    ready_status_write,
    ready_writes,
    rfc3339,
    thread_time,
    window_load,
)
from prometheus_client import CollectorRegistry, generate_latest

from regmirror.metrics import Metrics


def _event(user: str, verb: str, resource: str, received: str, took_ms: int, stage: str = "ResponseComplete") -> str:
    seconds = float(received[17:26]) + took_ms / 1000
    done = f"{received[:17]}{seconds:09.6f}Z"
    return json.dumps(
        {
            "kind": "Event",
            "apiVersion": "audit.k8s.io/v1",
            "level": "Metadata",
            "auditID": f"{user}-{received}-{stage}",
            "stage": stage,
            "verb": verb,
            "user": {"username": user},
            "objectRef": {"resource": resource},
            "requestReceivedTimestamp": received,
            "stageTimestamp": done,
        },
        separators=(",", ":"),
    )


def test_counts_users_and_kwoks_claim_requests_in_the_window(tmp_path: Path) -> None:
    lines = [
        _event(KWOK_USER, "create", "persistentvolumes", "2026-12-01T10:00:01.000000Z", 40),
        _event(KWOK_USER, "patch", "persistentvolumeclaims", "2026-12-01T10:00:01.100000Z", 60, stage="ResponseStarted"),
        _event(KWOK_USER, "patch", "persistentvolumeclaims", "2026-12-01T10:00:01.100000Z", 60),
        _event(KWOK_USER, "patch", "pods", "2026-12-01T10:00:02.000000Z", 500),  # not a claim
        _event(KWOK_USER, "update", "leases", "2026-12-01T10:00:02.000000Z", 5),  # node heartbeat
        _event(KWOK_USER, "watch", "persistentvolumeclaims", "2026-12-01T10:00:02.000000Z", 9000),
        _event("regmirror", "patch", "deployments", "2026-12-01T10:00:03.000000Z", 20),
        _event("regmirror", "patch", "deployments", "2026-12-01T10:00:09.000000Z", 20),  # after the window
        _event(KWOK_USER, "patch", "persistentvolumeclaims", "2026-12-01T09:59:59.000000Z", 700),  # before it
        "not json",
    ]
    log = tmp_path / "audit.jsonl"
    log.write_text("\n".join(lines) + "\n")

    load = window_load(log, "2026-12-01T10:00:00.000000Z", "2026-12-01T10:00:05.000000Z")

    assert load["requests_by_user"] == {KWOK_USER: 3, "regmirror": 1}
    assert load["lease_requests"] == 1
    claims = load["kwok_claim_requests"]
    assert claims["n"] == 2
    assert claims["max"] == 0.06
    assert claims["sum_seconds"] == 0.1
    assert "inner_requests_by_user" not in load

    # The same pass counts a shorter window in it (the Ready burst), node leases included.
    burst = window_load(
        log, "2026-12-01T10:00:00.000000Z", "2026-12-01T10:00:05.000000Z", ("2026-12-01T10:00:01.500000Z", "2026-12-01T10:00:03.000000Z")
    )
    assert burst["inner_requests_by_user"] == {KWOK_USER: 2}
    assert {k: v for k, v in burst.items() if k != "inner_requests_by_user"} == load


def test_an_empty_window_reports_no_requests(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    log.write_text(_event(KWOK_USER, "create", "persistentvolumes", "2026-12-01T10:00:01.000000Z", 40) + "\n")
    load = window_load(log, "2026-12-01T11:00:00.000000Z", "2026-12-01T12:00:00.000000Z")
    assert load == {
        "requests_by_user": {},
        "lease_requests": 0,
        "kwok_claim_requests": {"n": 0, "p50": None, "p95": None, "max": None, "mean": None, "sum_seconds": 0},
    }


def _status_patch(name: str, received: float, answered: float) -> dict[str, Any]:
    return {
        "verb": "patch",
        "stage": "ResponseComplete",
        "objectRef": {"resource": "registrymirrors", "subresource": "status", "name": name},
        "requestReceivedTimestamp": rfc3339(received),
        "stageTimestamp": rfc3339(answered),
    }


def test_ready_status_write_splits_the_lag_at_the_write_that_made_the_mirror_ready() -> None:
    offset = time.time() - time.monotonic()
    wall = time.time() - 100
    events = [
        _status_patch("a", wall + 1.0, wall + 1.1),  # progress, before the children were ready
        _status_patch("a", wall + 10.2, wall + 10.5),  # the Ready flip
        _status_patch("a", wall + 30.0, wall + 30.1),  # a later write: after Ready was seen
        {**_status_patch("b", wall + 5.0, wall + 5.0), "objectRef": {"resource": "registrymirrors", "name": "b"}},  # the finalizer
        _status_patch("c", wall + 7.0, wall + 7.5),
    ]
    children_ready = {"a": wall + 10.0 - offset, "b": wall + 4.0 - offset}
    ready_seen = {"a": wall + 10.6 - offset, "b": wall + 6.0 - offset, "c": wall + 8.0 - offset}

    split = ready_status_write(events, children_ready, ready_seen)

    # Only "a" counts: "b" has no status write, "c" no children-ready time.
    assert split["operator"]["n"] == split["api_server"]["n"] == split["watch"]["n"] == 1
    assert abs(split["operator"]["max"] - 0.2) < 0.01
    assert abs(split["api_server"]["max"] - 0.3) < 0.01
    assert abs(split["watch"]["max"] - 0.1) < 0.01
    assert ready_writes(events, ready_seen) == {"a": _seconds_pair(wall + 10.2, wall + 10.5), "c": _seconds_pair(wall + 7.0, wall + 7.5)}


def _seconds_pair(received: float, answered: float) -> tuple[float, float]:
    """As the audit log's microsecond stamps give them back."""
    return _seconds(rfc3339(received)), _seconds(rfc3339(answered))


def test_the_ready_burst_is_the_largest_run_of_ready_writes_less_than_the_gap_apart() -> None:
    early = {f"e{i}": (100.0 + i, 100.05 + i) for i in range(3)}  # one a second: three runs of one
    burst = {f"b{i}": (200.0 + 0.1 * i, 200.1 + 0.1 * i) for i in range(10)}  # ten, 0.1 s apart
    late = {"l0": (200.0 + 0.9 + 0.5, 201.5)}  # 0.5 s after the burst's last: not part of it
    found = ready_burst({**early, **burst, **late})
    assert found is not None
    assert found["writes"] == 10 and found["from"] == 200.0 and abs(found["to"] - 201.0) < 1e-9
    assert found["seconds"] == 1.0 and found["per_second"] == 10.0
    assert abs(found["api_server"]["p50"] - 0.1) < 1e-9
    assert ready_burst({}) is None


def test_thread_time_splits_a_window_into_cpu_run_queue_and_waiting() -> None:
    # (wall time, ns on a CPU, ns runnable): over 2 s, 0.5 s on a CPU and 0.3 s waiting for one.
    samples = [(10.0, 0, 0), (11.0, 200_000_000, 100_000_000), (12.0, 500_000_000, 300_000_000), (13.0, 600_000_000, 300_000_000)]
    assert thread_time(samples, 10.0, 12.0) == {"seconds": 2.0, "on_cpu": 0.25, "runnable": 0.15, "waiting": 0.6}
    assert thread_time(samples, 9.0, 12.0) is None, "the samples begin after the window does"
    assert thread_time(samples, 11.0, 14.0) is None, "or end before it does"


def test_the_schedstat_sampler_sees_this_thread_work() -> None:
    import threading

    sampler = SchedSampler(os.getpid(), threading.get_native_id(), interval=0.01)
    sampler.start()
    started = time.time()
    while time.time() - started < 0.3:  # busy on a CPU
        pass
    sampler.stop()
    share = thread_time(sampler.samples, sampler.samples[0][0], sampler.samples[-1][0])
    assert share is not None and share["on_cpu"] + share["runnable"] > 0.5, share
    assert rfc3339(0.5) == "1970-01-01T00:00:00.500000Z"


def test_audit_requests_keeps_one_record_per_request_of_the_user(tmp_path: Path) -> None:
    started = json.loads(_event("regmirror", "watch", "deployments", "2026-12-01T10:00:01.000000Z", 0, stage="ResponseStarted"))
    completed = {**started, "stage": "ResponseComplete"}  # the same watch (one auditID), completed
    lines = [
        json.dumps(started, separators=(",", ":")),
        json.dumps(completed, separators=(",", ":")),
        _event("regmirror", "patch", "deployments", "2026-12-01T10:00:02.000000Z", 20),
        _event("regmirror", "update", "leases", "2026-12-01T10:00:02.000000Z", 5),  # leader election
        _event("regmirror-other", "patch", "deployments", "2026-12-01T10:00:02.000000Z", 20),  # another user
        _event("regmirror", "patch", "services", "2026-12-01T10:00:09.000000Z", 20),  # after the window
    ]
    log = tmp_path / "audit.jsonl"
    log.write_text("\n".join(lines) + "\n")

    got = audit_requests(log, "regmirror", "2026-12-01T10:00:00.000000Z", "2026-12-01T10:00:05.000000Z")

    assert sorted((e["verb"], e["stage"]) for e in got) == [("patch", "ResponseComplete"), ("watch", "ResponseComplete")]


def test_histograms_between_two_scrapes_count_only_what_happened_between_them() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.queue_wait.labels(concern="status").observe(3.0)  # before the window
    before = _metric_lines(generate_latest(registry).decode())
    for seconds in [0.004] * 10 + [0.3] * 9 + [2.0]:
        metrics.queue_wait.labels(concern="status").observe(seconds)
    metrics.queue_wait.labels(concern="plan").observe(0.02)
    after = _metric_lines(generate_latest(registry).decode())
    got = histograms(before, after, "regmirror_queue_wait_seconds", "concern")
    assert got["status"] == {"n": 20.0, "mean": round((0.04 + 2.7 + 2.0) / 20, 4), "p50_le": 0.005, "p95_le": 0.5}
    assert got["plan"]["n"] == 1.0 and got["plan"]["p95_le"] == 0.025
    for _ in range(30):
        metrics.queue_wait.labels(concern="plan").observe(60.0)  # past the last bucket (30 s)
    late = histograms(after, _metric_lines(generate_latest(registry).decode()), "regmirror_queue_wait_seconds", "concern")
    assert late["plan"] == {"n": 30.0, "mean": 60.0, "p50_le": None, "p95_le": None}, "no infinity in the JSON"
    json.dumps(late, allow_nan=False)
