"""Two operator replicas on the real control plane: one leads, the other takes over.

Each replica is a real `regmirror run` process with the operator's ServiceAccount
and its own pod name (POD_NAME), which it sends in its User-Agent: the API
server's audit log tells the replicas' writes apart. The session's operator is
stopped (it releases the Lease) for each test and started again afterwards.
"""

from __future__ import annotations

import datetime
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness import LocalCluster
from harness.audit import now, summary
from harness.objects import MirrorFactory
from harness.operator import OPERATOR_NS, OPERATOR_USER, OperatorProcess, wait_condition, wait_settled
from harness.waiting import wait_for
from regmirror.settings import Settings

DEFAULTS = Settings()
LEASE = DEFAULTS.lease_name
# A behaviour bound, not a speed target: the standby must wait out the lease (11 s) and
# then win on its next attempt (2 s, jittered); anything near 30 s means it did not.
FAILOVER_BOUND = 30.0


def _parse(stamp: str) -> datetime.datetime:
    return datetime.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=datetime.UTC)


def lease(cluster: LocalCluster) -> dict[str, Any]:
    return dict(cluster.kubectl_json("get", "lease", LEASE, "-n", OPERATOR_NS))


def writes_by(cluster: LocalCluster, proc: OperatorProcess, since: str, *, leases: bool = False) -> list[dict[str, Any]]:
    """Completed writes of one replica (told apart by its User-Agent), without its Lease writes unless asked."""
    return [
        e
        for e in cluster.write_events(OPERATOR_USER, since=since)
        if e.get("userAgent") == proc.user_agent and ((e.get("objectRef") or {}).get("resource") == "leases") == leases
    ]


def acquired_at(cluster: LocalCluster, proc: OperatorProcess, since: str) -> str | None:
    """When the API server received the replica's first successful Lease write after `since` (audit time)."""
    done = [e for e in writes_by(cluster, proc, since, leases=True) if (e.get("responseStatus") or {}).get("code") in (200, 201)]
    return min((e["requestReceivedTimestamp"] for e in done), default=None)


def writes_until_quiet(cluster: LocalCluster, proc: OperatorProcess, since: str) -> list[dict[str, Any]]:
    """The replica's controller writes from `since` on, once two polls 3 s apart agree (it has caught up)."""
    seen: list[list[dict[str, Any]]] = []

    def stable() -> bool:
        seen.append(writes_by(cluster, proc, since))
        return len(seen) >= 2 and len(seen[-1]) == len(seen[-2])

    wait_for(stable, 120, f"{proc.identity}'s writes to stop", interval=3.0)
    return seen[-1]


@pytest.fixture
def pair(cluster: LocalCluster, operator: OperatorProcess, tmp_path: Path) -> Iterator[tuple[OperatorProcess, OperatorProcess]]:
    """Two replicas (not started), each behind a relay of its own (``proc.relay``, to partition one),
    the session's operator stopped meanwhile and restarted afterwards."""
    assert operator.relay is not None
    operator.stop()  # SIGTERM: it releases the Lease
    replicas = []
    for name in "ab":
        relay = cluster.open_relay()
        # The session operator's ServiceAccount kubeconfig, pointed at this replica's relay.
        kubeconfig = tmp_path / f"kubeconfig-{name}"
        kubeconfig.write_text(operator.kubeconfig.read_text().replace(operator.relay.url, relay.url))
        kubeconfig.chmod(0o600)
        replicas.append(OperatorProcess(cluster, kubeconfig, tmp_path / f"{name}.log", relay, identity=f"regmirror-operator-{name}"))
    try:
        yield replicas[0], replicas[1]
    finally:
        for proc in replicas:
            assert proc.relay is not None
            proc.relay.heal()
            proc.stop()
            print(f"{proc.identity} log: {proc.log_path}")
        operator.start()
        operator.wait_live()
        wait_for(lambda: operator.leads() is True, 60, "the session's operator to lead again", diagnose=operator.log_tail)


def start_leader_and_standby(pair: tuple[OperatorProcess, OperatorProcess]) -> tuple[OperatorProcess, OperatorProcess]:
    """Start both replicas at once (they race for the Lease); the one that leads, and the other."""
    for proc in pair:
        proc.start()
    for proc in pair:
        proc.wait_live()  # a standby is live (and ready) too
    views = lambda: [proc.leads() for proc in pair]  # noqa: E731
    wait_for(lambda: None not in views() and True in views(), 60, "a replica to lead", diagnose=pair[0].log_tail)
    leading = [proc for proc, leads in zip(pair, views(), strict=True) if leads]
    assert len(leading) == 1, [proc.identity for proc in leading]
    leader = leading[0]
    standby = pair[1] if leader is pair[0] else pair[0]
    assert lease(standby.cluster)["spec"]["holderIdentity"] == leader.identity
    return leader, standby


def test_one_replica_leads_and_the_standby_takes_over_after_a_sigkill(
    cluster: LocalCluster, pair: tuple[OperatorProcess, OperatorProcess], mirrors: MirrorFactory
) -> None:
    since = now()
    old, new = start_leader_and_standby(pair)
    mirrors.create("ha-one")
    wait_settled(cluster, ["ha-one"])
    spec = lease(cluster)["spec"]
    assert spec["holderIdentity"] == old.identity and spec["leaseDurationSeconds"] == round(DEFAULTS.lease_duration)
    assert writes_by(cluster, old, since), "the leader made the mirror Ready: its writes are in the audit log"
    assert writes_by(cluster, new, since) == [], summary(writes_by(cluster, new, since))
    assert new.leads() is False and old.leads() is True

    transitions = spec.get("leaseTransitions", 0)
    killed = now()
    started = time.monotonic()
    old.stop(signal.SIGKILL)
    wait_for(lambda: new.leads() is True, 60, f"{new.identity} to take over", interval=0.2, diagnose=new.log_tail)
    noticed = time.monotonic() - started
    acquired = acquired_at(cluster, new, killed)
    assert acquired is not None
    failover = (_parse(acquired) - _parse(killed)).total_seconds()
    print(f"failover after SIGKILL: lease taken {failover:.1f}s after the kill (metrics showed it after {noticed:.1f}s)")
    assert DEFAULTS.lease_duration - 2 * DEFAULTS.lease_retry_period <= failover < FAILOVER_BOUND
    spec = lease(cluster)["spec"]
    assert spec["holderIdentity"] == new.identity and spec["leaseTransitions"] == transitions + 1

    failover_writes = writes_until_quiet(cluster, new, killed)
    # The new leader converges: a mirror created after the failover becomes Ready, the old one stays so.
    mirrors.create("ha-two")
    wait_settled(cluster, ["ha-one", "ha-two"])
    # No interleaving: nothing of the old leader's reached the API server after the new one's first write.
    first_new = min(e["requestReceivedTimestamp"] for e in writes_by(cluster, new, killed, leases=True))
    late = writes_by(cluster, old, first_new) + writes_by(cluster, old, first_new, leases=True)
    assert late == [], summary(late)

    # For comparison, from the same state (a mirror just settled, its progress writes possibly
    # still deferred): a plain restart of the one leader (same pod name: it resumes its own Lease at once).
    restarted = now()
    new.stop(signal.SIGKILL)
    new.start()
    wait_for(lambda: new.leads() is True, 60, f"{new.identity} to lead after its restart", diagnose=new.log_tail)
    restart_writes = writes_until_quiet(cluster, new, restarted)
    print(f"controller writes to converge: after the failover {len(failover_writes)}, after a plain restart {len(restart_writes)}")
    print("after the failover:", summary(failover_writes), "after the restart:", summary(restart_writes))
    wait_settled(cluster, ["ha-one", "ha-two"])


def test_a_sigtermed_leader_releases_the_lease_and_the_standby_takes_over_at_once(
    cluster: LocalCluster, pair: tuple[OperatorProcess, OperatorProcess], mirrors: MirrorFactory
) -> None:
    old, new = start_leader_and_standby(pair)
    stopping = now()
    started = time.monotonic()
    old.stop(signal.SIGTERM)  # returns once the process exited: the controller stopped, then the Lease was released
    wait_for(lambda: new.leads() is True, 60, f"{new.identity} to take over", interval=0.2, diagnose=new.log_tail)
    noticed = time.monotonic() - started
    acquired = acquired_at(cluster, new, stopping)
    assert acquired is not None
    handover = (_parse(acquired) - _parse(stopping)).total_seconds()
    print(f"handover after SIGTERM: lease taken {handover:.1f}s after the signal (metrics showed it after {noticed:.1f}s)")
    # Faster than any expiry could be: the release made the standby's next attempt win.
    assert handover < DEFAULTS.lease_duration
    released = [e for e in writes_by(cluster, old, stopping, leases=True) if e["verb"] == "update"]
    assert released, "the stopping leader wrote its release"
    assert old.error_lines() == [], old.error_lines()
    mirrors.create("ha-term")
    wait_condition(cluster, "ha-term", "Ready", "True")


def test_a_partitioned_leader_stops_before_the_standby_takes_over_and_stays_a_standby(
    cluster: LocalCluster, pair: tuple[OperatorProcess, OperatorProcess], mirrors: MirrorFactory
) -> None:
    old, new = start_leader_and_standby(pair)
    name = mirrors.create("ha-part")
    wait_settled(cluster, [name])
    assert old.relay is not None
    cut = now()
    with old.relay.partition():
        wait_for(lambda: new.leads() is True, 60, f"{new.identity} to take over", interval=0.5, diagnose=new.log_tail)
        # The old leader's renew deadline passed before the standby could take over: it stopped leading.
        assert old.leads() is False
        # Cut off, it is a standby the API server does not answer: liveness says so.
        wait_for(lambda: old.liveness() not in (200, None), 60, f"{old.identity}'s liveness to fail", interval=1.0)
        # The new leader does the work: a child deleted now comes back.
        uid = cluster.kubectl_json("get", "service", "-n", OPERATOR_NS, "-l", f"regmirror.dev/mirror={name}")["items"][0]["metadata"]
        cluster.kubectl("delete", "service", uid["name"], "-n", OPERATOR_NS)
        wait_for(
            lambda: any(
                s["metadata"]["uid"] != uid["uid"]
                for s in cluster.kubectl_json("get", "service", "-n", OPERATOR_NS, "-l", f"regmirror.dev/mirror={name}")["items"]
            ),
            60,
            "the new leader to re-create the Service",
        )
    # Healed: the old leader sees the new holder and stays a standby, live again; it writes nothing.
    wait_for(lambda: old.liveness() == 200, 60, f"{old.identity}'s liveness to recover", interval=1.0, diagnose=old.log_tail)
    mirrors.create("ha-after-heal")
    wait_settled(cluster, [name, "ha-after-heal"])
    assert old.leads() is False and new.leads() is True and lease(cluster)["spec"]["holderIdentity"] == new.identity
    first_new = min(e["requestReceivedTimestamp"] for e in writes_by(cluster, new, cut, leases=True))
    late = writes_by(cluster, old, first_new) + writes_by(cluster, old, first_new, leases=True)
    assert late == [], summary(late)
    assert old.running, "a leader that lost its lease campaigns on; it does not exit"
