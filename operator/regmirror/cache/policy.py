"""What to evict, decided with no I/O: size cap with watermarks, TTL as an upper bound, pins.

Least recently pulled first, by blob: a layer shared by two images is as
recent as the most recent pull of either. A pinned blob (part of an image a
running pod uses) is never a victim, even past the TTL and even when that
leaves the cache over its cap (the cap is then reported as exceeded, not
enforced by breaking running workloads).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

REASON_TTL = "TTL"
REASON_SIZE = "SizeCap"


@dataclass(frozen=True)
class Policy:
    """The sidecar's rules, from cache.json (render/cache.py cache_policy)."""

    cap_bytes: int
    high_percent: int = 95
    low_percent: int = 85
    ttl_seconds: int = 0

    @property
    def high_bytes(self) -> int:
        """Usage above which eviction starts."""
        return self.cap_bytes * self.high_percent // 100

    @property
    def low_bytes(self) -> int:
        """Usage eviction brings the cache down to."""
        return self.cap_bytes * self.low_percent // 100

    @classmethod
    def from_json(cls, doc: Mapping[str, object]) -> Policy:
        """Read cache.json, rejecting what is not a number where one is needed."""

        def number(key: str, default: int) -> int:
            value = doc.get(key, default)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"cache.json: {key} must be a non-negative integer")
            return value

        return cls(
            cap_bytes=number("capBytes", 0),
            high_percent=number("highWatermarkPercent", 95),
            low_percent=number("lowWatermarkPercent", 85),
            ttl_seconds=number("ttlSeconds", 0),
        )


@dataclass(frozen=True)
class Candidate:
    """A stored blob as the policy sees it."""

    digest: str
    size: int
    last_pulled: float


@dataclass
class Plan:
    """Blobs to evict, in order, and why."""

    victims: list[str] = field(default_factory=list)
    freed: int = 0
    reasons: dict[str, str] = field(default_factory=dict)
    over_cap_pinned: bool = False

    def add(self, blob: Candidate, reason: str) -> None:
        """Queue one victim."""
        self.victims.append(blob.digest)
        self.reasons[blob.digest] = reason
        self.freed += blob.size

    @property
    def reason(self) -> str:
        """SizeCap if any victim was chosen for room, else TTL."""
        return REASON_SIZE if REASON_SIZE in self.reasons.values() else REASON_TTL


def plan_eviction(blobs: Iterable[Candidate], pinned: set[str], policy: Policy, now: float, in_flight: int = 0) -> Plan:
    """Victims: unpinned blobs past the TTL, then least recently pulled ones until usage is at the low watermark.

    `in_flight` counts bytes being fetched right now: they will land, so room is made for them too.
    """
    plan = Plan()
    items = sorted(blobs, key=lambda b: (b.last_pulled, b.digest))
    used = sum(b.size for b in items) + in_flight
    if policy.ttl_seconds > 0:
        for blob in items:
            if blob.digest not in pinned and now - blob.last_pulled > policy.ttl_seconds:
                plan.add(blob, REASON_TTL)
                used -= blob.size
    if policy.cap_bytes > 0 and used > policy.high_bytes:
        for blob in items:
            if used <= policy.low_bytes:
                break
            if blob.digest in pinned or blob.digest in plan.reasons:
                continue
            plan.add(blob, REASON_SIZE)
            used -= blob.size
        plan.over_cap_pinned = used > policy.cap_bytes
    return plan
