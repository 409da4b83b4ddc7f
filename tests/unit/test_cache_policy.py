"""Eviction decisions (regmirror.cache.policy): searched with hypothesis, not replayed."""

from __future__ import annotations

from hypothesis import example, given, settings
from hypothesis import strategies as st

from regmirror.cache.policy import REASON_SIZE, REASON_TTL, Candidate, Policy, plan_eviction

NOW = 1_000_000.0

blobs_strategy = st.lists(
    st.builds(
        Candidate,
        digest=st.text("0123456789abcdef", min_size=4, max_size=8).map(lambda h: f"sha256:{h}"),
        size=st.integers(0, 10_000),
        last_pulled=st.floats(NOW - 100_000, NOW),
    ),
    max_size=30,
    unique_by=lambda b: b.digest,
)


@settings(deadline=None)
@given(blobs_strategy, st.data())
@example([Candidate("sha256:aa", 600, NOW - 5), Candidate("sha256:bb", 600, NOW - 1)], None)
def test_size_cap_evicts_oldest_unpinned_down_to_the_low_watermark(blobs: list[Candidate], data: st.DataObject | None) -> None:
    pinned = set(data.draw(st.sets(st.sampled_from([b.digest for b in blobs])))) if data and blobs else set()
    policy = Policy(cap_bytes=1000, high_percent=90, low_percent=60)
    plan = plan_eviction(blobs, pinned, policy, NOW)
    assert not set(plan.victims) & pinned, "a pinned blob is never evicted"
    used = sum(b.size for b in blobs)
    left = used - plan.freed
    if used > policy.high_bytes:
        unpinned_left = [b for b in blobs if b.digest not in pinned and b.digest not in plan.victims]
        # Either at the low watermark, or nothing unpinned is left to take.
        assert left <= policy.low_bytes or not unpinned_left
        # Least recently pulled first: every victim is older than every unpinned survivor.
        if plan.victims and unpinned_left:
            newest_victim = max(b.last_pulled for b in blobs if b.digest in plan.victims)
            assert newest_victim <= min(b.last_pulled for b in unpinned_left)
        assert plan.over_cap_pinned == (left > policy.cap_bytes)
    else:
        assert plan.victims == []


@settings(deadline=None)
@given(blobs_strategy)
def test_ttl_is_an_upper_bound_except_for_pins(blobs: list[Candidate]) -> None:
    pinned = {b.digest for b in blobs[::2]}
    plan = plan_eviction(blobs, pinned, Policy(cap_bytes=0, ttl_seconds=3600), NOW)
    expired = {b.digest for b in blobs if NOW - b.last_pulled > 3600 and b.digest not in pinned}
    assert set(plan.victims) == expired
    assert all(plan.reasons[d] == REASON_TTL for d in plan.victims)


def test_in_flight_bytes_count_toward_the_cap() -> None:
    blobs = [Candidate("sha256:old", 500, NOW - 10), Candidate("sha256:new", 300, NOW)]
    assert plan_eviction(blobs, set(), Policy(cap_bytes=1000, high_percent=90, low_percent=80), NOW).victims == []
    plan = plan_eviction(blobs, set(), Policy(cap_bytes=1000, high_percent=90, low_percent=80), NOW, in_flight=200)
    assert plan.victims == ["sha256:old"] and plan.reason == REASON_SIZE


def test_everything_pinned_over_the_cap_is_reported_not_evicted() -> None:
    blobs = [Candidate("sha256:a", 800, NOW - 10), Candidate("sha256:b", 800, NOW)]
    plan = plan_eviction(blobs, {"sha256:a", "sha256:b"}, Policy(cap_bytes=1000), NOW)
    assert plan.victims == [] and plan.over_cap_pinned


def test_policy_rejects_a_non_number() -> None:
    import pytest

    with pytest.raises(ValueError, match="capBytes"):
        Policy.from_json({"capBytes": "10Gi"})
    assert Policy.from_json({"capBytes": 5, "ttlSeconds": 7}) == Policy(cap_bytes=5, ttl_seconds=7)
