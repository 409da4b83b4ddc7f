"""Leader election on a coordination.k8s.io/v1 Lease: the decisions only, no I/O.

The rules are client-go's leaderelection; `regmirror.leader` does the requests.
Why two replicas never both believe they lead:

- A candidate judges another holder's lease by its OWN monotonic clock: the
  lease counts as held until `leaseDurationSeconds` after the moment this
  candidate first saw the current record and resourceVersion (every renew
  writes, so a live holder keeps resetting that moment). The record's timestamps are
  another machine's wall clock and are never compared with ours, so clock
  skew between replicas does not matter, only the clocks' rates do.
- The holder believes it leads only until `renew_deadline` after the START
  of its last successful write: the API server stored that record at or
  after the start, a standby saw it at or after that, and waits a full lease
  duration (longer than the renew deadline) from then.
- Every write carries the resourceVersion it was decided on: when two
  candidates write at once the API server accepts one, the other gets 409.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

# client-go's JitterFactor: a retry period may stretch by up to 1.2x, and must still fit the renew deadline.
JITTER_FACTOR = 1.2


@dataclass(frozen=True)
class Timing:
    """client-go's three durations, in seconds (defaults 15 / 10 / 2)."""

    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0

    def __post_init__(self) -> None:
        if not self.lease_duration > self.renew_deadline:
            raise ValueError(f"lease duration ({self.lease_duration}s) must exceed the renew deadline ({self.renew_deadline}s)")
        if not self.renew_deadline > JITTER_FACTOR * self.retry_period:
            raise ValueError(
                f"renew deadline ({self.renew_deadline}s) must exceed {JITTER_FACTOR} x the retry period ({self.retry_period}s)"
            )
        if self.retry_period <= 0:
            raise ValueError("the retry period must be positive")


@dataclass(frozen=True)
class LeaseRecord:
    """The fields of a Lease's spec the election reads and writes."""

    holder: str
    duration_seconds: int
    acquire_time: str | None = None
    renew_time: str | None = None
    transitions: int = 0

    @classmethod
    def from_lease(cls, lease: dict[str, Any]) -> tuple[LeaseRecord, str]:
        """The record and resourceVersion of a Lease read from the API (untrusted: odd values become harmless ones)."""
        spec = lease.get("spec") if isinstance(lease.get("spec"), dict) else {}
        assert isinstance(spec, dict)
        duration = spec.get("leaseDurationSeconds")
        transitions = spec.get("leaseTransitions")
        record = cls(
            holder=str(spec.get("holderIdentity") or ""),
            duration_seconds=duration if isinstance(duration, int) and not isinstance(duration, bool) else 0,
            acquire_time=str(spec["acquireTime"]) if spec.get("acquireTime") else None,
            renew_time=str(spec["renewTime"]) if spec.get("renewTime") else None,
            transitions=transitions if isinstance(transitions, int) and not isinstance(transitions, bool) and transitions >= 0 else 0,
        )
        return record, str((lease.get("metadata") or {}).get("resourceVersion") or "")

    def spec(self) -> dict[str, Any]:
        """The Lease spec holding this record."""
        spec: dict[str, Any] = {
            "holderIdentity": self.holder,
            "leaseDurationSeconds": self.duration_seconds,
            "leaseTransitions": self.transitions,
        }
        if self.acquire_time:
            spec["acquireTime"] = self.acquire_time
        if self.renew_time:
            spec["renewTime"] = self.renew_time
        return spec


@dataclass(frozen=True)
class Create:
    """No Lease exists: create it holding `record`."""

    record: LeaseRecord


@dataclass(frozen=True)
class Update:
    """Write `record` over the Lease read at `resource_version` (409 when someone wrote in between)."""

    record: LeaseRecord
    resource_version: str


@dataclass(frozen=True)
class Wait:
    """Another candidate holds a lease that has not expired by our clock."""

    holder: str
    expires_in: float


Action = Create | Update | Wait


def lease_body(namespace: str, name: str, record: LeaseRecord, resource_version: str | None = None) -> dict[str, Any]:
    """A coordination.k8s.io/v1 Lease holding `record` (with the resourceVersion that guards an update)."""
    metadata: dict[str, Any] = {"name": name, "namespace": namespace}
    if resource_version:
        metadata["resourceVersion"] = resource_version
    return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": metadata, "spec": record.spec()}


class Candidate:
    """One replica's view of the election; mutated only on its event loop (no locks).

    `now` is always this replica's monotonic clock; `wall` is an RFC 3339
    MicroTime string written into the record for humans (`kubectl get lease`),
    never read back for a decision.
    """

    def __init__(self, identity: str, timing: Timing) -> None:
        if not identity:
            raise ValueError("a candidate needs a non-empty identity")
        self.identity = identity
        self.timing = timing
        self.observed: LeaseRecord | None = None
        self.observed_version = ""
        self.observed_at = 0.0
        self.leader_until: float | None = None
        self.resource_version = ""  # of the last record we wrote, for the release

    def leads(self, now: float) -> bool:
        """Whether this replica may act as the leader at `now`."""
        return self.leader_until is not None and now < self.leader_until

    def decide(self, lease: dict[str, Any] | None, now: float, wall: str) -> Action:
        """What to write after reading `lease` (None: absent) at `now`."""
        duration = math.ceil(self.timing.lease_duration)
        if lease is None:
            return Create(LeaseRecord(self.identity, duration, wall, wall, 0))
        record, resource_version = LeaseRecord.from_lease(lease)
        # Any write counts as a renew, even one that left the record as it was (a wall clock
        # that stood still): the resourceVersion changes with every write.
        if (record, resource_version) != (self.observed, self.observed_version):
            self.observed, self.observed_version, self.observed_at = record, resource_version, now
        # A record without a sensible duration is judged by ours rather than taken over at once.
        held_for = record.duration_seconds if record.duration_seconds > 0 else duration
        expires_in = self.observed_at + held_for - now
        if record.holder and record.holder != self.identity and expires_in > 0:
            return Wait(record.holder, expires_in)
        if record.holder == self.identity:
            mine = replace(record, duration_seconds=duration, renew_time=wall)
        else:
            mine = LeaseRecord(self.identity, duration, wall, wall, record.transitions + 1)
        return Update(mine, resource_version)

    def succeeded(self, written: dict[str, Any], started: float, now: float) -> None:
        """Our Create/Update of an attempt begun at `started` was stored (the Lease as the API returned it)."""
        record, resource_version = LeaseRecord.from_lease(written)
        self.observed, self.observed_version, self.observed_at = record, resource_version, now
        self.resource_version = resource_version
        self.leader_until = started + self.timing.renew_deadline

    def step_down(self) -> None:
        """Stop believing we lead (the deadline passed, or we are about to release)."""
        self.leader_until = None

    def release(self, wall: str) -> Update | None:
        """The write that hands the lease over (holder empty, 1 s duration), after `step_down`; None when we hold nothing."""
        if not self.resource_version or self.observed is None or self.observed.holder != self.identity:
            return None
        self.step_down()
        record = LeaseRecord("", 1, self.observed.acquire_time, wall, self.observed.transitions)
        return Update(record, self.resource_version)
