"""The cache sidecar's pure parts: notifications, counters, rate limits, prewarm references, units."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from regmirror.cache import events, prewarm, stats, store, upstream
from regmirror.cache.cli import merged_invalidations
from regmirror.units import duration_seconds, quantity_bytes

D1 = "sha256:" + "a" * 64
D2 = "sha256:" + "b" * 64


def test_pull_events_are_read_and_everything_else_ignored() -> None:
    body = json.dumps(
        {
            "events": [
                {"action": "pull", "target": {"digest": D1, "repository": "library/x", "size": 5, "mediaType": "m"}},
                {"action": "push", "target": {"digest": D2, "repository": "library/x"}},
                {"action": "pull", "target": {"digest": "sha256:short", "repository": "library/x"}},
                "junk",
            ]
        }
    ).encode()
    assert events.parse_envelope(body, 7.0) == [events.Pull("library/x", D1, 5, "m", 7.0)]


@settings(deadline=None)
@given(st.binary(max_size=200))
@example(b'{"events": {"not": "a list"}}')
def test_any_body_yields_a_list_never_an_error(body: bytes) -> None:
    assert isinstance(events.parse_envelope(body, 0.0), list)


METRICS = """# HELP registry_proxy_hits_total The number of total proxy request hits
registry_proxy_hits_total{type="blob"} 7
registry_proxy_hits_total{type="manifest"} 2
registry_proxy_misses_total{type="blob"} 3
registry_proxy_misses_total{type="manifest"} 1
registry_proxy_pulled_bytes_total{type="blob"} 1000
registry_proxy_pulled_bytes_total{type="manifest"} 24
registry_proxy_pushed_bytes_total{type="blob"} 5000
"""


def test_figures_combine_the_front_and_the_registry() -> None:
    varnish = json.dumps({"version": 1, "counters": {"MAIN.cache_hit": {"value": 30}, "MAIN.s_resp_bodybytes": {"value": 9000}}})
    assert stats.combine(METRICS, varnish) == stats.Figures(hits=39, misses=4, bytes_served=9000, bytes_from_upstream=1024)
    # Without a front (an HTTPS mirror), the registry's own counters are all there is.
    assert stats.combine(METRICS, None) == stats.Figures(hits=9, misses=4, bytes_served=5000, bytes_from_upstream=1024)
    assert stats.combine("", "not json") == stats.Figures()


@pytest.mark.parametrize(
    ("limit", "remaining", "expected", "may"),
    [
        ("100;w=21600", "76;w=21600", upstream.RateLimit(100, 76, 21600), True),
        ("100;w=21600", "20;w=21600", upstream.RateLimit(100, 20, 21600), False),  # the reserve: 20% of the window
        ("10;w=60", "6;w=60", upstream.RateLimit(10, 6, 60), True),  # at least 5 kept
        ("10;w=60", "5;w=60", upstream.RateLimit(10, 5, 60), False),
        (None, None, None, True),  # no headers: no limit to respect
        ("x", "y", None, True),
    ],
)
def test_rate_limit_headers_pace_prewarming(limit: str | None, remaining: str | None, expected: object, may: bool) -> None:
    parsed = upstream.parse_rate_limit(limit, remaining)
    assert parsed == expected
    assert prewarm.may_pull(parsed) is may


@pytest.mark.parametrize(
    ("image", "hosts", "repository", "reference"),
    [
        ("nginx:1.27", ["docker.io"], "library/nginx", "1.27"),
        ("docker.io/library/nginx", ["docker.io"], "library/nginx", "latest"),
        ("quay.io/org/app@" + D1, ["quay.io"], "org/app", D1),
        ("127.0.0.1:5000/library/x:v1", ["127.0.0.1:5000"], "library/x", "v1"),
        ("org/app:v2", ["ghcr.io"], "org/app", "v2"),
    ],
)
def test_prewarm_references_resolve_on_the_upstream(image: str, hosts: list[str], repository: str, reference: str) -> None:
    wanted = prewarm.parse_wanted(image, hosts)
    assert (wanted.repository, wanted.reference) == (repository, reference)


def test_prewarm_picks_the_listed_platforms_of_an_index() -> None:
    index = {
        "manifests": [
            {"digest": D1, "platform": {"os": "linux", "architecture": "amd64"}},
            {"digest": D2, "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
        ]
    }
    assert prewarm.children_to_fetch(index, ("linux/arm64/v8",)) == ([D2], [])
    assert prewarm.children_to_fetch(index, ()) == ([D1, D2], [])
    manifest = {"config": {"digest": D1}, "layers": [{"digest": D2}]}
    assert prewarm.children_to_fetch(manifest, ()) == ([], [D1, D2])


def test_prewarm_waits_when_the_budget_is_low_and_fetches_nothing() -> None:
    low = upstream.Head(200, D1, upstream.RateLimit(100, 10, 21600))
    banned: list[tuple[str, str]] = []
    warmer = prewarm.Prewarmer("http://127.0.0.1:1", lambda repo, ref: low, lambda repo, tag: banned.append((repo, tag)))
    warmer.set_wanted([prewarm.parse_wanted("library/x:v1", ["docker.io"])])
    assert warmer.step(1000.0) is False
    assert warmer.states["library/x:v1"].status == prewarm.WAITING
    assert warmer.states["library/x:v1"].next_check >= 1000.0 + prewarm.RETRY_SECONDS
    assert warmer.summary() == {"images": 1, "ready": 0, "pending": 1, "failed": []}


def test_a_missing_image_fails_with_the_reason() -> None:
    warmer = prewarm.Prewarmer("http://127.0.0.1:1", lambda repo, ref: upstream.Head(404, None, None), lambda repo, tag: None)
    warmer.set_wanted([prewarm.parse_wanted("library/gone:v1", ["docker.io"])])
    assert warmer.step(0.0) is True
    assert warmer.summary()["failed"] == ["library/gone:v1: upstream answered 404 for library/gone:v1"]


def test_pinning_a_manifest_keeps_its_index_children_config_and_layers(tmp_path: Path) -> None:
    def put(digest: str, data: bytes) -> None:
        d = store.blob_dir(tmp_path, digest)
        d.mkdir(parents=True)
        (d / "data").write_bytes(data)

    layer, config, child = "sha256:" + "1" * 64, "sha256:" + "2" * 64, "sha256:" + "3" * 64
    put(child, json.dumps({"config": {"digest": config}, "layers": [{"digest": layer}]}).encode())
    put(D1, json.dumps({"manifests": [{"digest": child}]}).encode())
    put(layer, b"\x1f\x8b not json")
    assert store.referenced_digests(tmp_path, D1) == {D1, child, config, layer}
    assert set(store.scan_blobs(tmp_path)) == {D1, child, layer}
    assert store.evict_blob(tmp_path, layer) == len(b"\x1f\x8b not json")
    assert set(store.scan_blobs(tmp_path)) == {D1, child}
    assert store.evict_blob(tmp_path, layer) == 0


def test_invalidation_requests_merge_and_expire() -> None:
    now = 10_000_000.0
    current = json.dumps({"library/a:v1": str(now - 10), "library/old:v1": str(now - 8 * 86400), "bad": "x"})
    merged = merged_invalidations(current, ["library/b:v2", "library/a:v1"], now)
    assert merged == {"library/a:v1": f"{now:.3f}", "library/b:v2": f"{now:.3f}"}


@pytest.mark.parametrize(("text", "value"), [("10Gi", 10 << 30), ("1.5Gi", 1610612736), ("500M", 500_000_000), ("1", 1), ("100m", 0)])
def test_quantities(text: str, value: int) -> None:
    assert quantity_bytes(text) == value


@pytest.mark.parametrize(("text", "value"), [("168h", 604800.0), ("1h30m", 5400.0), ("0", 0.0), ("2.5s", 2.5), ("300ms", 0.3)])
def test_durations(text: str, value: float) -> None:
    assert duration_seconds(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["", "h", "10x", "1h 2m"])
def test_bad_durations_are_rejected(text: str) -> None:
    with pytest.raises(ValueError):
        duration_seconds(text)
