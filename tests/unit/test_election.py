"""Leader election: the pure decisions, a simulation of candidates racing on one Lease, and the Elector's I/O.

The simulation is the safety argument made executable: candidates with skewed,
drifting clocks, lost and late requests (a write the API server applies after the
client timed out), leaders that lose the lease and campaign on, kills, graceful
releases and restarts under the same or a new name, against a linearizable Lease
with resourceVersion checks. The property: no
two candidates ever believe they lead at the same instant of real time.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from regmirror.election import Candidate, Create, LeaseRecord, Timing, Update, Wait, lease_body
from regmirror.kube import ApiError
from regmirror.leader import Elector
from regmirror.settings import Settings

TIMING = Timing()  # 15 / 10 / 2, the defaults
WALL = "2026-01-01T00:00:00.000000Z"


def lease(holder: str, *, rv: str = "1", duration: Any = 15, renew: str = WALL, transitions: Any = 0) -> dict[str, Any]:
    spec = {"holderIdentity": holder, "leaseDurationSeconds": duration, "renewTime": renew, "leaseTransitions": transitions}
    return {"metadata": {"name": "l", "namespace": "ns", "resourceVersion": rv}, "spec": spec}


# ---------------------------------------------------------------- decisions


def test_an_absent_lease_is_created_holding_us() -> None:
    action = Candidate("a", TIMING).decide(None, now=0.0, wall=WALL)
    assert action == Create(LeaseRecord("a", 15, WALL, WALL, 0))


def test_anothers_lease_is_waited_out_by_our_own_clock_not_its_timestamps() -> None:
    me = Candidate("b", TIMING)
    # The record's renewTime is years old by our wall clock: skew must not make us take over.
    old = lease("a", renew="2001-01-01T00:00:00.000000Z")
    assert isinstance(me.decide(old, now=1000.0, wall=WALL), Wait)
    assert isinstance(me.decide(old, now=1014.9, wall=WALL), Wait)
    taken = me.decide(old, now=1015.0, wall=WALL)
    assert taken == Update(LeaseRecord("b", 15, WALL, WALL, 1), "1")


def test_a_renewed_lease_restarts_the_wait() -> None:
    me = Candidate("b", TIMING)
    assert isinstance(me.decide(lease("a", rv="1"), now=0.0, wall=WALL), Wait)
    renewed = lease("a", rv="2", renew="2026-01-01T00:00:02.000000Z")
    assert isinstance(me.decide(renewed, now=14.0, wall=WALL), Wait)
    wait = me.decide(renewed, now=28.0, wall=WALL)
    assert isinstance(wait, Wait) and wait.expires_in == pytest.approx(1.0)
    assert isinstance(me.decide(renewed, now=29.0, wall=WALL), Update)


def test_renewing_keeps_acquire_time_and_transitions() -> None:
    me = Candidate("a", TIMING)
    ours = lease("a", rv="7", transitions=3)
    ours["spec"]["acquireTime"] = "2025-01-01T00:00:00.000000Z"
    action = me.decide(ours, now=0.0, wall=WALL)
    assert action == Update(LeaseRecord("a", 15, "2025-01-01T00:00:00.000000Z", WALL, 3), "7")


def test_a_released_lease_is_taken_at_once() -> None:
    action = Candidate("b", TIMING).decide(lease("", duration=1, transitions=4), now=0.0, wall=WALL)
    assert action == Update(LeaseRecord("b", 15, WALL, WALL, 5), "1")


@pytest.mark.parametrize("duration", [0, -5, "15", None, True])
def test_a_lease_without_a_sensible_duration_is_judged_by_ours(duration: Any) -> None:
    me = Candidate("b", TIMING)
    odd = lease("a", duration=duration, transitions="x")
    assert isinstance(me.decide(odd, now=0.0, wall=WALL), Wait)
    assert me.decide(odd, now=15.0, wall=WALL) == Update(LeaseRecord("b", 15, WALL, WALL, 1), "1")


def test_the_leader_believes_until_the_deadline_after_its_last_successful_start() -> None:
    me = Candidate("a", TIMING)
    me.succeeded(lease("a", rv="2"), started=100.0, now=103.0)
    assert me.leads(103.0) and me.leads(109.99) and not me.leads(110.0)
    release = me.release(WALL)
    assert release == Update(LeaseRecord("", 1, None, WALL, 0), "2")
    assert not me.leads(103.0)
    assert me.release(WALL) is None or not me.leads(0.0)


def test_timings_that_could_overlap_are_refused() -> None:
    for bad in ((10.0, 10.0, 2.0), (15.0, 2.0, 2.0), (15.0, 10.0, 0.0)):
        with pytest.raises(ValueError):
            Timing(*bad)
    with pytest.raises(ValueError, match="lease duration"):
        Settings.from_env({"REGMIRROR_LEASE_DURATION": "5"})
    assert Settings.from_env({"REGMIRROR_LEASE_DURATION": "30"}).lease_duration == 30.0


# ---------------------------------------------------------------- simulation

TIMEOUT = TIMING.renew_deadline / 2  # what the operator gives one lease request (handlers.py)


@dataclass
class Net:
    """One request's fate: latency there and back, and whether either leg is lost."""

    there: float
    back: float
    lost_there: bool
    lost_back: bool


@dataclass
class Server:
    """A linearizable Lease with resourceVersion checks (the API server)."""

    spec: dict[str, Any] | None = None
    rv: int = 0

    def read(self) -> dict[str, Any] | None:
        if self.spec is None:
            return None
        return {"metadata": {"resourceVersion": str(self.rv)}, "spec": dict(self.spec)}

    def write(self, body: dict[str, Any], create: bool) -> dict[str, Any] | None:
        if create and self.spec is not None:
            return None
        if not create and body["metadata"].get("resourceVersion") != str(self.rv):
            return None
        self.rv += 1
        self.spec = dict(body["spec"])
        return self.read()


@dataclass
class Incarnation:
    """One process of a replica: its candidate and its clock (local = offset + rate * real time)."""

    name: str
    candidate: Candidate
    offset: float
    rate: float
    alive: bool = True
    belief: list[tuple[float, float]] = field(default_factory=list)  # [start, end) in real time
    believing_since: float | None = None

    def local(self, t: float) -> float:
        return self.offset + self.rate * t

    def real(self, local: float) -> float:
        return (local - self.offset) / self.rate


class Simulation:
    """Discrete events in real time; every candidate follows the Elector's loop (leader.py)."""

    def __init__(self, nets: list[Net]) -> None:
        self.server = Server()
        self.nets = itertools.cycle(nets)
        self.events: list[tuple[float, int, Callable[[], None]]] = []
        self.seq = itertools.count()
        self.now = 0.0
        self.procs: list[Incarnation] = []

    def at(self, t: float, action: Callable[[], None]) -> None:
        heapq.heappush(self.events, (t, next(self.seq), action))

    def run(self, until: float) -> None:
        while self.events and self.events[0][0] <= until:
            self.now, _, action = heapq.heappop(self.events)
            action()
        for proc in self.procs:
            self.end_belief(proc, until)

    # A request: applied at the server after `there` (even if the client gave up: a late write),
    # answered after `back`; the client sees a failure when a leg is lost or it took longer than TIMEOUT.
    def request(self, proc: Incarnation, apply: Callable[[], Any], done: Callable[[Any, bool], None]) -> None:
        net = next(self.nets)
        sent = self.now
        box: list[Any] = []
        if not net.lost_there:
            self.at(sent + net.there, lambda: box.append(apply()))
        answered = not net.lost_there and not net.lost_back and net.there + net.back <= TIMEOUT * proc.rate
        if answered:
            self.at(sent + net.there + net.back, lambda: proc.alive and done(box[0], True))
        else:
            self.at(proc.real(proc.local(sent) + TIMEOUT), lambda: proc.alive and done(None, False))

    def spawn(self, name: str, offset: float, rate: float, start: float) -> Incarnation:
        proc = Incarnation(name, Candidate(name, TIMING), offset, rate)
        self.procs.append(proc)
        self.at(start, lambda: self.attempt(proc))
        return proc

    def attempt(self, proc: Incarnation) -> None:
        if not proc.alive:
            return
        started = proc.local(self.now)

        def got(snapshot: Any, ok: bool) -> None:
            if not ok:
                return self.next_attempt(proc)
            action = proc.candidate.decide(snapshot, proc.local(self.now), WALL)
            if isinstance(action, Wait):
                return self.next_attempt(proc)
            create = isinstance(action, Create)
            body = lease_body("ns", "l", action.record, None if isinstance(action, Create) else action.resource_version)
            self.request(proc, lambda: self.server.write(body, create), lambda written, ok: wrote(written, ok))
            return None

        def wrote(written: Any, ok: bool) -> None:
            if ok and written is not None:
                proc.candidate.succeeded(written, started, proc.local(self.now))
                if proc.candidate.leads(proc.local(self.now)):
                    if proc.believing_since is None:
                        proc.believing_since = self.now
                    # The watchdog: fires at the deadline in this process's own time.
                    self.at(proc.real(proc.candidate.leader_until or 0.0), lambda: self.watchdog(proc))
            self.next_attempt(proc)

        self.request(proc, self.server.read, got)

    def next_attempt(self, proc: Incarnation) -> None:
        # The standby's jitter is drawn by the network list too: leaders retry on the period.
        period = TIMING.retry_period * (1.0 if proc.believing_since is not None else 1.1)
        self.at(proc.real(proc.local(self.now) + period), lambda: self.attempt(proc))

    def watchdog(self, proc: Incarnation) -> None:
        if not proc.alive or proc.believing_since is None:
            return
        if proc.candidate.leads(proc.local(self.now)):
            # Extended meanwhile, or rounding put us a hair early: look again (leader.py loops the same way).
            self.at(max(proc.real(proc.candidate.leader_until or 0.0), self.now + 1e-6), lambda: self.watchdog(proc))
            return
        self.end_belief(proc, self.now)  # leader.py's on_lost: the controller stops, the candidate campaigns on

    def end_belief(self, proc: Incarnation, t: float) -> None:
        if proc.believing_since is not None:
            proc.belief.append((proc.believing_since, t))
            proc.believing_since = None

    def kill(self, proc: Incarnation) -> None:
        if proc.alive:
            self.end_belief(proc, self.now)
            proc.alive = False  # in-flight requests still reach the server: they were sent

    def terminate(self, proc: Incarnation) -> None:
        """SIGTERM: the controller stops, then the leader releases (handlers.stop)."""
        if not proc.alive:
            return
        release = proc.candidate.release(WALL) if proc.candidate.leads(proc.local(self.now)) else None
        self.end_belief(proc, self.now)
        proc.alive = False
        if release is not None:
            body = lease_body("ns", "l", release.record, release.resource_version)
            self.request(proc, lambda: self.server.write(body, False), lambda *_: None)


def overlaps(procs: list[Incarnation]) -> list[tuple[str, tuple[float, float], str, tuple[float, float]]]:
    found = []
    for a, b in itertools.combinations(procs, 2):
        for x in a.belief:
            for y in b.belief:
                if x[0] < y[1] and y[0] < x[1]:
                    found.append((a.name, x, b.name, y))
    return found


nets = st.builds(
    Net,
    there=st.floats(0.0, 8.0),
    back=st.floats(0.0, 8.0),
    lost_there=st.integers(0, 4).map(lambda x: x == 0),  # mostly delivered: more handovers to check
    lost_back=st.integers(0, 4).map(lambda x: x == 0),
)
replica = st.tuples(st.floats(-1e6, 1e6), st.floats(0.9, 1.1))  # clock offset (any skew) and rate (±10 % drift)
disruption = st.tuples(st.floats(0.0, 120.0), st.integers(0, 2), st.sampled_from(["kill", "term"]), st.booleans(), st.floats(0.0, 20.0))


def simulate(replicas: list[tuple[float, float]], nets_: list[Net], disruptions: list[tuple[float, int, str, bool, float]]) -> Simulation:
    sim = Simulation(nets_)
    current: dict[int, Incarnation] = {}
    for i, (offset, rate) in enumerate(replicas):
        current[i] = sim.spawn(f"r{i}", offset, rate, start=0.1 * i)
    for t, who, how, same_name, restart_after in disruptions:
        index = who % len(replicas)

        def disrupt(index: int = index, how: str = how, same_name: bool = same_name, restart_after: float = restart_after) -> None:
            proc = current[index]
            if not proc.alive:
                return  # already down (exited, or disrupted twice): one pod never runs two processes
            (sim.kill if how == "kill" else sim.terminate)(proc)
            offset, rate = replicas[index]
            # A restarted container keeps its pod's name; a rescheduled pod gets a new one.
            name = proc.name if same_name else f"{proc.name}'"
            restart = sim.now + restart_after
            sim.at(restart, lambda: current.__setitem__(index, sim.spawn(name, offset + 7.0, rate, start=restart)))

        sim.at(t, disrupt)
    sim.run(until=200.0)
    return sim


@settings(max_examples=400, deadline=None)
@given(
    replicas=st.lists(replica, min_size=2, max_size=3),
    nets_=st.lists(nets, min_size=1, max_size=12),
    disruptions=st.lists(disruption, max_size=4),
)
@example(  # found: the wall clock in the sim stands still, so renews left the record unchanged; now the resourceVersion counts
    replicas=[(0.0, 1.0), (0.0, 1.0)], nets_=[Net(0.0, 0.0, False, False)], disruptions=[]
)
@example(  # found: the simulated watchdog fired a hair early by rounding and never looked again
    replicas=[(0.0, 1.0625), (0.0, 0.98046875)],
    nets_=[Net(0.0, 0.0, True, True)] * 6 + [Net(0.0, 2.0, False, False)] * 2 + [Net(0.0, 0.0, True, True), Net(0.0, 0.0, False, False)],
    disruptions=[],
)
@example(  # a write applied after the client timed out, then the leader killed mid-renew
    replicas=[(0.0, 1.1), (5e5, 0.9)],
    nets_=[Net(0.1, 0.1, False, False), Net(4.9, 3.0, False, False), Net(0.1, 0.1, False, True)],
    disruptions=[(30.0, 0, "kill", True, 1.0), (60.0, 1, "term", False, 0.5)],
)
def test_no_two_candidates_ever_lead_at_the_same_instant(
    replicas: list[tuple[float, float]], nets_: list[Net], disruptions: list[tuple[float, int, str, bool, float]]
) -> None:
    sim = simulate(replicas, nets_, disruptions)
    assert overlaps(sim.procs) == []


def test_on_a_healthy_network_one_leads_and_a_standby_takes_over_after_a_kill_or_a_release() -> None:
    fast = [Net(0.01, 0.01, False, False)]
    sim = simulate([(0.0, 1.0), (100.0, 1.0)], fast, [(30.0, 0, "kill", False, 20.0), (100.0, 1, "term", False, 1000.0)])
    r0, r1, r0_again = sim.procs
    assert r0.belief and r0.belief[0][0] < 1.0 and r0.belief[0][1] == 30.0
    # After the kill: the standby waits out a full lease from its last sight of a renew (no earlier, no much later).
    takeover = r1.belief[0][0]
    assert (
        30.0 + TIMING.lease_duration - TIMING.retry_period * 1.1 <= takeover <= 30.0 + TIMING.lease_duration + 2 * TIMING.retry_period * 1.1
    )
    # After the release: the next attempt of a standby takes it, within a retry period.
    assert r1.belief[0][1] == 100.0
    assert r0_again.belief and 100.0 < r0_again.belief[0][0] <= 100.0 + 1.1 * TIMING.retry_period + 0.1
    assert overlaps(sim.procs) == []


# ---------------------------------------------------------------- the Elector's I/O on real time


class FakeLeases:
    """A Lease API in memory, with resourceVersion checks and a switch that makes one caller's requests fail."""

    def __init__(self) -> None:
        self.server = Server()
        self.broken: set[str] = set()

    def client(self, name: str) -> Any:
        outer = self

        class Client:
            async def get(self, kind: str, namespace: str | None, _name: str) -> dict[str, Any] | None:
                outer.check(name)
                return outer.server.read()

            async def create(self, obj: dict[str, Any]) -> dict[str, Any]:
                outer.check(name)
                return outer.written(outer.server.write(obj, True))

            async def replace(self, obj: dict[str, Any]) -> dict[str, Any]:
                outer.check(name)
                return outer.written(outer.server.write(obj, False))

        return Client()

    def check(self, name: str) -> None:
        if name in self.broken:
            raise ApiError(0, "ClientConnectorError", "partitioned")

    @staticmethod
    def written(result: dict[str, Any] | None) -> dict[str, Any]:
        if result is None:
            raise ApiError(409, "Conflict", "the object has been modified")
        return result


FAST = Timing(lease_duration=1.5, renew_deadline=1.0, retry_period=0.1)


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def test_elector_starts_one_controller_stops_the_partitioned_leader_and_hands_over_on_release() -> None:
    leases = FakeLeases()
    started: list[str] = []
    lost: list[str] = []

    def elector(name: str) -> Elector:
        async def on_started() -> None:
            started.append(name)

        return Elector(leases.client(name), "ns", "l", Candidate(name, FAST), on_started=on_started, on_lost=lambda _: lost.append(name))

    a, b = elector("a"), elector("b")
    a.start()
    await wait_until(lambda: a.leading)
    b.start()
    await asyncio.sleep(FAST.lease_duration)  # b must stay a standby while a renews
    assert started == ["a"] and b.running() and not b.leading

    leases.broken.add("a")  # a can no longer reach the API: it must stop before b may take over
    await wait_until(lambda: lost == ["a"])
    assert not a.leading and not b.leading
    await wait_until(lambda: b.leading and started == ["a", "b"])
    leases.broken.discard("a")  # a, healed, campaigns on as a standby: b keeps the lease
    await asyncio.sleep(FAST.lease_duration)
    assert a.running() and not a.leading and b.leading and started == ["a", "b"]
    assert a.silent_for() < FAST.lease_duration
    await a.halt()

    c = elector("c")
    c.start()
    await asyncio.sleep(0.3)
    assert not c.leading
    await b.halt()
    await b.release()  # SIGTERM: c takes over within a retry period or two, not a lease duration
    assert leases.server.spec is not None and leases.server.spec["holderIdentity"] == ""
    loop = asyncio.get_running_loop()
    released = loop.time()
    await wait_until(lambda: c.leading and started[-1:] == ["c"])
    assert loop.time() - released < FAST.lease_duration
    await c.halt()
    await c.release()
    assert started == ["a", "b", "c"] and lost == ["a"]


async def test_a_replica_that_no_longer_leads_sends_no_write() -> None:
    """The fence in HttpKube: reads go on, writes stop the moment the lease lapses (even if the watchdog runs late)."""
    from aiohttp import web
    from loopback import serve

    from regmirror.kube import Credentials, HttpKube

    seen: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(request.method)
        return web.json_response({"kind": "ConfigMap", "metadata": {"name": "x"}})

    leading = [True]
    body = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x", "namespace": "ns"}}
    async with serve(handler) as url:
        client = HttpKube(Credentials(url, False, lambda: None), timeout=1, attempts=1, may_write=lambda: leading[0])
        try:
            await client.apply(body)
            leading[0] = False
            with pytest.raises(ApiError, match="NotLeader"):
                await client.apply(body)
            with pytest.raises(ApiError, match="NotLeader"):
                await client.delete("ConfigMap", "ns", "x")
            assert await client.get("ConfigMap", "ns", "x") is not None
        finally:
            await client.close()
    assert seen == ["PATCH", "GET"]
