"""status.cache evaluation and pins (regmirror.cachestatus): what the operator core writes, decided purely."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from regmirror.cachestatus import MIN_WRITE_SECONDS, next_cache_status, parse_report, pinned_digests

D1, D2, D3 = ("sha256:" + x * 64 for x in "abc")
REPORT: dict[str, Any] = {
    "hits": 97,
    "misses": 3,
    "bytesServed": 5000,
    "bytesFromUpstream": 1000,
    "diskUsed": 1000,
    "diskCap": 9000,
    "pinnedImages": 1,
    "upstreamReachable": True,
    "lastEviction": None,
    "observedAt": "2026-01-01T00:00:00Z",
}


def pod(phase: str, *image_ids: str) -> dict[str, Any]:
    return {"status": {"phase": phase, "containerStatuses": [{"imageID": i} for i in image_ids]}}


def test_pins_are_the_digests_of_running_pods_images_from_the_mirrors_hosts() -> None:
    pods = [
        pod("Running", f"docker.io/library/nginx@{D1}", f"quay.io/org/app@{D2}"),
        pod("Pending", f"docker-pullable://redis@{D3}"),  # Docker's form, docker.io implied
        pod("Succeeded", f"docker.io/library/done@{'sha256:' + 'f' * 64}"),
        pod("Running", "docker.io/library/tagonly:1"),
    ]
    assert pinned_digests(pods, ["docker.io"]) == {D1, D3}
    assert pinned_digests(pods, ["quay.io"]) == {D2}
    assert pinned_digests(pods, ["registry-1.docker.io"]) == {D1, D3}


def test_figures_are_read_with_a_hit_ratio() -> None:
    status = parse_report(REPORT)
    assert (status.hits, status.misses, status.hit_ratio, status.disk_cap) == (97, 3, "0.970", 9000)


@settings(deadline=None)  # model construction is slow on a loaded shared machine
@given(
    st.dictionaries(
        st.sampled_from([*REPORT, "prewarm", "junk"]), st.one_of(st.integers(), st.text(), st.none(), st.booleans(), st.lists(st.text()))
    )
)
def test_untrusted_reports_never_raise_and_never_go_negative(report: dict[str, Any]) -> None:
    status = parse_report(report)
    assert min(status.hits, status.misses, status.bytes_served, status.disk_used) >= 0


def test_a_quiet_cluster_writes_nothing() -> None:
    first = next_cache_status(REPORT, None, None, 0.0)
    assert first is not None
    later = {**REPORT, "observedAt": "2026-01-01T01:00:00Z"}
    assert next_cache_status(later, first, 0.0, 3600.0) is None


def test_counters_are_written_at_a_bounded_rate_and_state_changes_at_once() -> None:
    first = parse_report(REPORT)
    busier = {**REPORT, "hits": 200}
    assert next_cache_status(busier, first, 100.0, 100.0 + MIN_WRITE_SECONDS / 2) is None
    assert next_cache_status(busier, first, 100.0, 100.0 + MIN_WRITE_SECONDS) is not None
    evicted = {**busier, "lastEviction": {"time": "2026-01-01T00:01:00Z", "reason": "SizeCap", "blobs": 4, "bytes": 10}}
    written = next_cache_status(evicted, first, 100.0, 101.0)
    assert written is not None and written.last_eviction is not None and written.last_eviction.blobs == 4
    down = {**REPORT, "upstreamReachable": False}
    assert next_cache_status(down, first, 100.0, 101.0) is not None
