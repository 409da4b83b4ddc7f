"""`make bench`'s targets table: the cache rows (issue 13) and the node-safety rows (issue 14).

The results fed here have the shape `bench.cache.run` and `bench.nodesafety`
return; the figures are those of real runs on this project's machine (the cache
scenarios at 04:43 on 2026-11-30, nodesafety-20261130T062819Z), trimmed. A
scenario that failed, was skipped or is missing must print "not measured" and
never take the table down.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
from bench.report import table
from hypothesis import given, settings
from hypothesis import strategies as st

CACHE: dict[str, Any] = {
    "fan_in": {
        "nodes": 10,
        "image_bytes": 34615392,
        "direct_single": 1.15,
        "direct_concurrent_slowest": 6.003,
        "front": {
            "pulls_ok": 10,
            "upstream_gets_per_blob": [1, 1, 1, 1],
            "upstream_manifest_gets": 1,
            "slowest": 5.825,
            "median": 5.67,
            "slowest_over_direct_single": 5.07,
            "slowest_over_direct_concurrent": 0.97,
        },
        "bare_distribution": {"pulls_ok": 10, "upstream_gets_per_blob": [3, 4, 9, 10], "upstream_manifest_gets": 4, "slowest": 5.945},
    },
    "warm_prewarm": {
        "direct": 0.963,
        "warm": 0.813,
        "warm_ratio": 0.84,
        "prewarm_wait_seconds": 52.6,
        "prewarmed_first_pull": 0.794,
        "prewarmed_warm_pull": 0.851,
        "prewarmed_first_over_warm": 0.93,
        "prewarmed_upstream_requests": 0,
        "upstream_pings_meanwhile": 0,
    },
    "cap_stream": {
        "cap_bytes": 7870799,
        "stream_bytes": 23612398,
        "images": 9,
        "peak_disk_bytes": 8395845,
        "peak_over_cap": 1.067,
        "disk_samples": 124,
        "pinned_image_whole": True,
        "evicted_image_pulled_again_from_upstream": True,
        "last_eviction": {"time": "2026-11-30T04:46:40Z", "reason": "SizeCap", "blobs": 2, "bytes": 2098574},
    },
    "outage": {
        "stopped": {"pulled": 2, "of": 2, "median_seconds": 0.27},
        "blackholed": {"pulled": 2, "of": 2, "median_seconds": 0.28},
        "429": {"pulled": 1, "of": 2, "median_seconds": 0.29},
    },
}


def _mode(stale: float, ok: bool, direct: float, detect: float, after: float) -> dict[str, Any]:
    return {
        "stale_seconds": stale,
        "stale_ok": ok,
        "stale_penalty": round(stale - direct, 3) if ok else None,
        "detect_seconds": detect,
        "withdrawn_penalty": after,
        "agent_cpu_fraction": 0.0007,
    }


NODESAFETY: dict[str, Any] = {
    "probe_cost": {"requests_per_second_per_mirror_at_1000_nodes": 500, "requests_per_second_per_node_per_mirror": 0.5, "note": "..."},
    "failopen": {
        "stale_cap_seconds": 45.0,
        "probe": {"interval": 2.0, "timeout": 0.5},
        "releases": {
            "1.6.20": {
                "dial_timeout": False,
                "direct": 0.166,
                "refused": _mode(0.146, True, 0.166, 0.68, -0.014),
                "blackholed": _mode(55.102, False, 0.166, 2.59, 0.053),
                "hanging": _mode(55.101, False, 0.166, 1.43, -0.018),
            },
            "2.0.5": {"skipped": "not built"},
            "2.4.2": {
                "dial_timeout": True,
                "direct": 0.086,
                "refused": _mode(0.067, True, 0.086, 1.09, 0.007),
                "blackholed": _mode(0.532, True, 0.086, 2.45, 0.058),
                "hanging": _mode(55.105, False, 0.086, 1.4, 0.049),
            },
        },
    },
    "taint": {
        "100": {
            "nodes": 100,
            "lifted": 100,
            "errors": [],
            "latency_p50": 0.252,
            "latency_p95": 0.481,
            "latency_max": 0.62,
            "all_lifted_seconds": 1.96,
        },
        "1000": {
            "nodes": 1000,
            "lifted": 998,
            "errors": [],
            "latency_p50": 0.388,
            "latency_p95": 0.744,
            "latency_max": 1.136,
            "all_lifted_seconds": 22.47,
        },
    },
}


def results(cache: Any = None, nodesafety: Any = None) -> dict[str, Any]:
    """What `python -m bench` hands the report: a data path with its cache scenarios, and node safety."""
    out: dict[str, Any] = {"scale": "default", "stamp": "test", "machine": {}}
    out["dataplane"] = {"pulls": {}, "cache": copy.deepcopy(CACHE) if cache is None else cache}
    out["nodesafety"] = copy.deepcopy(NODESAFETY) if nodesafety is None else nodesafety
    return out


def rows_of(res: dict[str, Any]) -> dict[str, tuple[str, str, str]]:
    """figure -> (measured, target, verdict); indented rows are keyed by their parent's figure, then theirs."""
    rows, text = table(res)
    assert text.count("\n") == len(rows) + 2  # the header, the rule, one line per row
    out: dict[str, tuple[str, str, str]] = {}
    parent = ""
    for r in rows:
        key = r["figure"] if not r["figure"].startswith("  ") else f"{parent} / {r['figure'].strip()}"
        if not r["figure"].startswith("  "):
            parent = r["figure"]
        out[key] = (str(r["measured"]), r["target"], r["verdict"])
    return out


def test_cache_rows_show_each_issue_13_figure_with_its_target() -> None:
    rows = rows_of(results())
    fan = "cache: 10 nodes pull at once: upstream GETs per blob"
    assert rows[fan] == ("1, 1, 1, 1 (10/10 pulled; bare distribution: 3, 4, 9, 10)", "1 each", "pass")
    assert rows[f"{fan} / upstream GETs of the manifest"] == ("1", "1", "pass")
    assert rows[f"{fan} / slowest pull / one direct pull (same run)"] == ("5.07x (5.83s / 1.15s)", "<= 1.3x", "MISS")
    assert rows[f"{fan} / slowest pull / slowest of 10 direct pulls at once"] == ("0.97x (6.00s direct)", "", "")
    cap = "cache: disk peak / cap, 9 images = 3.0x the cap"
    assert rows[cap] == ("1.067x (8.0 of 7.5 MiB, 124 samples)", "<= 1.05x", "MISS")
    assert rows[f"{cap} / image of a running pod (pinned) after the stream"] == ("whole", "whole", "pass")
    assert rows[f"{cap} / an evicted image pulls again (from the upstream)"] == ("yes", "yes", "pass")
    assert rows["cache: upstream stopped, past the TTL: images in use that pull"] == ("100 % (2/2)", "100 %", "pass")
    assert rows["cache: upstream blackholed, past the TTL: images in use that pull"] == ("100 % (2/2)", "100 %", "pass")
    assert rows["cache: upstream 429, past the TTL: images in use that pull"] == ("50 % (1/2)", "100 %", "MISS")
    pre = "cache: prewarmed image, first pull on a cold node / warm pull"
    assert rows[pre] == ("0.93x (0.79s / 0.85s)", "0.8x-1.2x", "pass")
    assert rows[f"{pre} / upstream manifest/blob requests during that pull"] == ("0", "0", "pass")
    assert rows["cache: warm pull through the front / direct"] == ("0.84x (0.81s / 0.96s)", "<= 1.2x", "pass")


def test_cache_verdicts_follow_the_figures() -> None:
    cache = copy.deepcopy(CACHE)
    cache["fan_in"]["front"]["upstream_gets_per_blob"] = [1, 2, 1, 1]
    cache["fan_in"]["front"]["slowest_over_direct_single"] = 1.3
    cache["cap_stream"]["peak_over_cap"] = 0.73
    cache["cap_stream"]["pinned_image_whole"] = False
    cache["cap_stream"]["evicted_image_pulled_again_from_upstream"] = None
    cache["warm_prewarm"]["prewarmed_first_over_warm"] = 1.21
    cache["warm_prewarm"]["prewarmed_upstream_requests"] = 3
    rows = rows_of(results(cache=cache))
    fan = "cache: 10 nodes pull at once: upstream GETs per blob"
    assert rows[fan][2] == "MISS"
    assert rows[f"{fan} / slowest pull / one direct pull (same run)"][2] == "pass"
    cap = "cache: disk peak / cap, 9 images = 3.0x the cap"
    assert rows[cap][2] == "pass"
    assert rows[f"{cap} / image of a running pod (pinned) after the stream"] == ("blobs missing", "whole", "MISS")
    assert rows[f"{cap} / an evicted image pulls again (from the upstream)"] == ("not measured (no image was evicted)", "yes", "")
    pre = "cache: prewarmed image, first pull on a cold node / warm pull"
    assert rows[pre][2] == "MISS"
    assert rows[f"{pre} / upstream manifest/blob requests during that pull"] == ("3", "0", "MISS")


def test_a_fan_in_where_a_node_failed_to_pull_misses_even_with_one_get_per_blob() -> None:
    cache = copy.deepcopy(CACHE)
    cache["fan_in"]["front"]["pulls_ok"] = 9
    rows = rows_of(results(cache=cache))
    assert rows["cache: 10 nodes pull at once: upstream GETs per blob"][2] == "MISS"


def test_failed_cache_scenarios_print_not_measured_and_miss() -> None:
    cache = {key: {"error": f"RuntimeError: {key} broke"} for key in CACHE}
    rows = rows_of(results(cache=cache))
    assert rows["cache: N nodes pull one image at once"] == ("not measured: RuntimeError: fan_in broke", "1 GET per blob", "MISS")
    assert rows["cache: disk peak / cap, a stream 3x the cap"] == ("not measured: RuntimeError: cap_stream broke", "<= 1.05x", "MISS")
    assert rows["cache: upstream down past the TTL: images in use that pull"][0] == "not measured: RuntimeError: outage broke"
    assert rows["cache: prewarmed and warm pulls"][0] == "not measured: RuntimeError: warm_prewarm broke"


def test_missing_cache_scenarios_print_not_measured_without_a_verdict() -> None:
    cache = {"fan_in": copy.deepcopy(CACHE["fan_in"]), "outage": {"429": CACHE["outage"]["429"]}}
    rows = rows_of(results(cache=cache))
    assert rows["cache: 10 nodes pull at once: upstream GETs per blob"][2] == "pass"
    assert rows["cache: disk peak / cap, a stream 3x the cap"] == ("not measured", "<= 1.05x", "")
    assert rows["cache: prewarmed and warm pulls"][0] == "not measured"
    # An outage kind this machine could not stage (no iptables) is not measured, not passed.
    assert rows["cache: upstream blackholed, past the TTL: images in use that pull"] == ("not measured", "100 %", "")


def test_an_incomplete_cache_scenario_prints_not_measured() -> None:
    cache = copy.deepcopy(CACHE)
    del cache["cap_stream"]["peak_over_cap"]
    cache["warm_prewarm"]["warm_ratio"] = None
    rows = rows_of(results(cache=cache))
    assert rows["cache: disk peak / cap, a stream 3x the cap"][0] == "not measured: incomplete result (KeyError: 'peak_over_cap')"
    assert rows["cache: prewarmed and warm pulls"][0].startswith("not measured: incomplete result (TypeError")
    assert rows["cache: 10 nodes pull at once: upstream GETs per blob"][2] == "pass"  # the others are untouched


@pytest.mark.parametrize(
    ("cache", "shown", "verdict"),
    [
        ({"skipped": "varnishd is not installed (Debian package varnish)"}, "not measured: skipped: varnishd is not installed", ""),
        ({"error": "RuntimeError: boom"}, "not measured: RuntimeError: boom", "MISS"),
        ({}, "not measured", ""),
    ],
)
def test_a_skipped_or_failed_cache_is_one_not_measured_row(cache: dict[str, Any], shown: str, verdict: str) -> None:
    rows = rows_of(results(cache=cache))
    measured, _, got = rows["cache (issue 13)"]
    assert measured.startswith(shown)
    assert got == verdict
    assert not any(k.startswith("cache: ") for k in rows)


def test_nodesafety_rows_judge_the_stale_pull_on_2x_only() -> None:
    rows = rows_of(results())
    old = "containerd 1.6.20 (no dial_timeout), mirror blackholed: pull at the failure"
    assert rows[old] == ("no image after 55s (given up)", "(1.x: best achievable)", "")
    assert rows[f"{old} / agent withdraws it after / a pull then"] == ("2.59s / +0.05s", "", "")
    new = "containerd 2.4.2 (dial_timeout), mirror blackholed: pull at the failure"
    assert rows[new] == ("+0.45s (0.53s, direct 0.09s)", "<= +1 s", "pass")
    assert rows[f"{new} / agent withdraws it after / a pull then"] == ("2.45s / +0.06s", "", "")
    assert rows["containerd 2.4.2 (dial_timeout), mirror hanging: pull at the failure"] == (
        "no image after 55s (given up)",
        "<= +1 s",
        "MISS",
    )
    assert rows["containerd 2.4.2 (dial_timeout), mirror refused: pull at the failure"][2] == "pass"
    assert rows["fail-open, containerd 2.0.5"] == ("not measured: skipped: not built", "", "")


def test_a_stale_pull_over_a_second_on_2x_misses() -> None:
    safety = copy.deepcopy(NODESAFETY)
    safety["failopen"]["releases"]["2.4.2"]["blackholed"] = _mode(1.2, True, 0.086, 2.45, 0.058)
    rows = rows_of(results(nodesafety=safety))
    assert rows["containerd 2.4.2 (dial_timeout), mirror blackholed: pull at the failure"] == (
        "+1.11s (1.20s, direct 0.09s)",
        "<= +1 s",
        "MISS",
    )


def test_taint_and_probe_rows() -> None:
    rows = rows_of(results())
    hundred = "startup taint, 100 kwok nodes at once: gone after the agent's call"
    assert rows[hundred] == ("p50 0.25s p95 0.48s max 0.62s (100/100 lifted)", "<= 2 s", "pass")
    assert rows[f"{hundred} / all lifted (the bench's one client, 32 threads)"] == ("1.96s", "", "")
    # Two nodes never lifted: a miss though every latency measured is in time.
    assert rows["startup taint, 1000 kwok nodes at once: gone after the agent's call"][2] == "MISS"
    probe = rows["probe cost: GET /v2/ per second per mirror at 1,000 nodes"]
    assert probe == ("500/s (0.5 per node); agent CPU 0.7-0.7 mCPU", "stated", "")


def test_a_slow_taint_misses() -> None:
    safety = copy.deepcopy(NODESAFETY)
    safety["taint"] = {"100": {**NODESAFETY["taint"]["100"], "latency_max": 2.4}}
    rows = rows_of(results(nodesafety=safety))
    assert rows["startup taint, 100 kwok nodes at once: gone after the agent's call"][2] == "MISS"


def test_nodesafety_without_root_or_with_a_failed_taint_prints_not_measured() -> None:
    safety = {
        "probe_cost": NODESAFETY["probe_cost"],
        "failopen": {"skipped": "needs root (containerd, iptables)"},
        "taint": {"error": "not reached: the control-plane benchmark failed before it"},
    }
    rows = rows_of(results(nodesafety=safety))
    assert rows["fail-open per containerd release (issue 14)"] == (
        "not measured: skipped: needs root (containerd, iptables)",
        "<= +1 s on 2.x",
        "",
    )
    assert rows["startup taint gone after the agent's call"] == (
        "not measured: not reached: the control-plane benchmark failed before it",
        "<= 2 s",
        "MISS",
    )
    assert rows["probe cost: GET /v2/ per second per mirror at 1,000 nodes"][0] == "500/s (0.5 per node)"


def test_a_run_without_node_safety_has_no_node_safety_rows() -> None:
    res = results()
    del res["nodesafety"]
    rows = rows_of(res)
    assert not any("containerd" in k or "taint" in k or "probe" in k for k in rows)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 10**9) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)


def _garbled(base: dict[str, Any], data: st.DataObject) -> dict[str, Any]:
    """`base` with a few values anywhere in it replaced by arbitrary JSON (a result from another version, or a half-written one)."""
    out = copy.deepcopy(base)
    for _ in range(data.draw(st.integers(1, 4))):
        node: Any = out
        while isinstance(node, dict) and node:
            key = data.draw(st.sampled_from(sorted(node)))
            if not isinstance(node[key], dict) or data.draw(st.booleans()):
                node[key] = data.draw(JSON)
                break
            node = node[key]
    return out


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_the_table_never_crashes_on_a_malformed_cache_or_nodesafety_result(data: st.DataObject) -> None:
    res = results(cache=_garbled(CACHE, data), nodesafety=_garbled(NODESAFETY, data))
    rows, _ = table(res)
    assert {r["verdict"] for r in rows} <= {"", "pass", "MISS"}
    # Every section still answers: with figures, or with "not measured".
    figures = " | ".join(r["figure"] for r in rows)
    for part in ("cache", "containerd", "probe cost", "taint"):
        assert part in figures


def test_with_the_guard_measured_its_pull_carries_the_target_on_every_release() -> None:
    safety = copy.deepcopy(NODESAFETY)
    guarded = {
        "guarded_seconds": 0.62,
        "guarded_ok": True,
        "guarded_penalty": 0.454,
        "guarded_aborted": 1,
        "guard_idle_cpu_fraction": 0.004,
    }
    safety["failopen"]["releases"]["1.6.20"]["hanging"].update(guarded)
    slow = {**guarded, "guarded_seconds": 1.5, "guarded_penalty": 1.334}
    safety["failopen"]["releases"]["2.4.2"]["hanging"].update(slow)
    failed = {**guarded, "guarded_ok": False, "guarded_penalty": None}
    safety["failopen"]["releases"]["2.4.2"]["blackholed"].update(failed)
    rows = rows_of(results(nodesafety=safety))
    old = "containerd 1.6.20 (no dial_timeout), mirror hanging: pull at the failure, connection guard on"
    assert rows[old] == ("+0.45s (0.62s, 1 aborted)", "<= +1 s", "pass"), "1.x is judged too: the guard gives it the same bound"
    assert rows[f"{old} / without the guard"] == ("no image after 55s (given up)", "", "")
    assert rows["containerd 2.4.2 (dial_timeout), mirror hanging: pull at the failure, connection guard on"][2] == "MISS"
    assert rows["containerd 2.4.2 (dial_timeout), mirror blackholed: pull at the failure, connection guard on"] == (
        "failed",
        "<= +1 s",
        "MISS",
    )
    probe = next(v for k, v in rows.items() if k.startswith("probe cost"))
    assert "with the connection guard, idle: 4.0-4.0 mCPU" in probe[0]


def test_the_ready_burst_row_says_its_pace_and_where_the_operators_loop_spent_it() -> None:
    from bench.report import _burst

    burst: dict[str, Any] = {"writes": 109, "seconds": 1.49, "per_second": 73.2}
    assert _burst(burst) == "109 in 1.49s (73.2/s)"
    burst["operator_loop"] = {"seconds": 1.5, "on_cpu": 0.17, "runnable": 0.25, "waiting": 0.58}
    assert _burst(burst) == "109 in 1.49s (73.2/s); operator's event loop on a CPU 17%, waiting for one 25%, idle 58%"
