"""The connection guard: sock_diag parsing (searched with arbitrary bytes), the real kernel on loopback, and the guard's rules.

The kernel tests open real TCP connections on loopback, ask the real kernel
for them through netlink, and abort them as the agent does on a node; they
need root (CAP_NET_ADMIN for SOCK_DESTROY), as the agent has it on a node.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from _agentkit import node_root, plan_json, wire_entry
from hypothesis import given, settings
from hypothesis import strategies as st

from regmirror.agent.guard import ConnectionGuard, Guarded, mirror_destination
from regmirror.agent.loop import Agent, AgentConfig
from regmirror.agent.probe import HealthTracker, Target
from regmirror.agent.sockdiag import (
    NLMSG_DONE,
    NLMSG_ERROR,
    SOCK_DIAG_BY_FAMILY,
    TCP_ESTABLISHED,
    TCP_SYN_SENT,
    Destination,
    SockDiag,
    SockDiagError,
    TcpSocket,
    bytecode,
    parse_messages,
    parse_socket,
    port_bytecode,
)

ROOT = os.geteuid() == 0


# ------------------------------------------------------------------ parsing untrusted bytes


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600), st.integers(min_value=0, max_value=5))
def test_any_bytes_from_netlink_parse_or_raise_sockdiagerror(data: bytes, seq: int) -> None:
    """A truncated, garbled or hostile netlink read never raises anything but SockDiagError."""
    try:
        messages, _done = parse_messages(data, seq)
    except SockDiagError:
        return
    for kind, payload in messages:
        if kind == SOCK_DIAG_BY_FAMILY:
            with contextlib.suppress(SockDiagError):
                parse_socket(payload)


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=0, max_size=400))
def test_any_inet_diag_msg_parses_or_raises_sockdiagerror(payload: bytes) -> None:
    try:
        sock = parse_socket(payload)
    except SockDiagError:
        return
    assert sock.family in (socket.AF_INET, socket.AF_INET6)
    assert len(sock.raw_id) == 48


def _nlmsg(kind: int, seq: int, payload: bytes) -> bytes:
    return struct.pack("=IHHII", 16 + len(payload), kind, 0, seq, 0) + payload + b"\0" * ((4 - len(payload) % 4) % 4)


def test_an_error_ack_names_the_errno_and_other_sequences_are_ignored() -> None:
    data = _nlmsg(NLMSG_DONE, 7, b"\0\0\0\0") + _nlmsg(NLMSG_ERROR, 8, struct.pack("=i", -errno.EOPNOTSUPP) + b"\0" * 16)
    with pytest.raises(SockDiagError) as raised:
        parse_messages(data, 8)
    assert raised.value.errno == errno.EOPNOTSUPP
    assert parse_messages(data, 7) == ([], True)
    assert parse_messages(_nlmsg(NLMSG_ERROR, 9, struct.pack("=i", 0)), 9) == ([], True), "error 0 is the ack"


destinations = st.lists(
    st.one_of(
        st.builds(lambda a, p: Destination.parse(a, p), st.ip_addresses(v=4).map(str), st.integers(1, 65535)),
        st.builds(lambda a, p: Destination.parse(a, p), st.ip_addresses(v=6).map(str), st.integers(1, 65535)),
    ),
    min_size=1,
    max_size=6,
)


@settings(max_examples=200, deadline=None)
@given(destinations, st.booleans())
def test_the_bytecode_is_a_chain_the_kernel_audit_accepts(dests: list[Destination], by_port: bool) -> None:
    """The rules of inet_diag_bc_audit: every op's "yes" steps to the next op, every "no" lands on an op or just past the end."""
    code = port_bytecode(socket.AF_INET6, (d.port for d in dests)) if by_port else bytecode(dests)
    starts = []
    offset = 0
    while offset < len(code):
        starts.append(offset)
        _op, yes, no = struct.unpack_from("=BBH", code, offset)
        assert yes % 4 == 0 and no % 4 == 0 and yes >= 4
        assert offset + yes <= len(code)
        offset += yes
    assert offset == len(code)
    for start in starts:
        _code, _yes, no = struct.unpack_from("=BBH", code, start)
        assert start + no in [*starts, len(code), len(code) + 4]


def test_mirror_destination_is_the_urls_address_and_port_and_names_are_not_resolved() -> None:
    assert str(mirror_destination("http://10.96.0.12:5000")) == "10.96.0.12:5000"
    assert str(mirror_destination("https://10.96.0.12")) == "10.96.0.12:443"
    assert str(mirror_destination("http://[fd00::12]:5000")) == "[fd00::12]:5000"
    assert mirror_destination("http://mirror.example:5000") is None
    assert mirror_destination("http://10.0.0.1:99999") is None
    assert mirror_destination("not a url") is None


# ------------------------------------------------------------------ the real kernel


@pytest.fixture
def hanging() -> Iterator[tuple[socket.socket, int]]:
    """A loopback listener that accepts and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    yield server, server.getsockname()[1]
    server.close()


def _reader(sock: socket.socket) -> tuple[threading.Thread, dict[str, object]]:
    out: dict[str, object] = {}

    def read() -> None:
        try:
            out["data"] = sock.recv(16)
        except OSError as exc:
            out["error"] = exc

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread, out


@pytest.mark.skipif(not ROOT, reason="SOCK_DESTROY needs CAP_NET_ADMIN (the agent has it on a node)")
def test_the_kernel_reports_a_waiting_request_and_aborting_it_wakes_the_reader(hanging: tuple[socket.socket, int]) -> None:
    _server, port = hanging
    waiting = socket.create_connection(("127.0.0.1", port))
    waiting.sendall(b"HEAD /v2/app/manifests/v1 HTTP/1.1\r\nHost: m\r\n\r\n")
    idle = socket.create_connection(("127.0.0.1", port))
    other = socket.create_connection(("127.0.0.1", port))
    time.sleep(0.25)
    with SockDiag() as diag:
        found = {s.source: s for s in diag.connections([Destination.parse("127.0.0.1", port)])}
        assert f"127.0.0.1:{waiting.getsockname()[1]}" in found and f"127.0.0.1:{idle.getsockname()[1]}" in found
        request = found[f"127.0.0.1:{waiting.getsockname()[1]}"]
        assert request.state == TCP_ESTABLISHED
        assert request.awaiting_reply_ms is not None and request.awaiting_reply_ms >= 200
        assert found[f"127.0.0.1:{idle.getsockname()[1]}"].awaiting_reply_ms is None, "an idle connection owes nothing"
        assert diag.connections([Destination.parse("127.0.0.1", port + 1 if port < 65535 else port - 1)]) == []
        thread, out = _reader(waiting)
        diag.destroy(request)
        thread.join(2)
        assert isinstance(out.get("error"), ConnectionAbortedError), out
        left = {s.source for s in diag.connections([Destination.parse("127.0.0.1", port)])}
        assert f"127.0.0.1:{waiting.getsockname()[1]}" not in left
        assert f"127.0.0.1:{other.getsockname()[1]}" in left, "only that one connection was aborted"
        diag.destroy(request)  # gone already: not an error
    for s in (waiting, idle, other):
        s.close()


@pytest.mark.skipif(not ROOT, reason="SOCK_DESTROY needs CAP_NET_ADMIN (the agent has it on a node)")
def test_an_answered_request_is_not_waiting(hanging: tuple[socket.socket, int]) -> None:
    server, port = hanging
    client = socket.create_connection(("127.0.0.1", port))
    conn, _ = server.accept()
    client.sendall(b"GET /v2/ HTTP/1.1\r\n\r\n")
    conn.recv(100)
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    client.recv(100)
    time.sleep(0.2)
    with SockDiag() as diag:
        (sock,) = [s for s in diag.connections([Destination.parse("127.0.0.1", port)]) if s.source.endswith(f":{client.getsockname()[1]}")]
        assert sock.awaiting_reply_ms is None
        client.sendall(b"GET /v2/next HTTP/1.1\r\n\r\n")  # the next request on the kept-alive connection
        time.sleep(0.2)
        (sock,) = [s for s in diag.connections([Destination.parse("127.0.0.1", port)]) if s.source.endswith(f":{client.getsockname()[1]}")]
        assert sock.awaiting_reply_ms is not None and sock.awaiting_reply_ms >= 150
    client.close()
    conn.close()


@pytest.mark.skipif(not ROOT, reason="SOCK_DESTROY needs CAP_NET_ADMIN (the agent has it on a node)")
@settings(max_examples=25, deadline=None)
@given(destinations)
def test_the_kernel_filter_finds_a_connection_exactly_when_its_destination_is_asked_for(others: list[Destination]) -> None:
    """The bytecode against the real kernel: mixed families and ports, the real destination anywhere in the list, or absent."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    real = Destination.parse("127.0.0.1", server.getsockname()[1])
    client = socket.create_connection(("127.0.0.1", real.port))
    try:
        with SockDiag() as diag:
            source = f"127.0.0.1:{client.getsockname()[1]}"
            unrelated = [d for d in others if d != real]
            assert source not in {s.source for s in diag.connections(unrelated)}
            for at in (0, len(unrelated)):
                asked = [*unrelated[:at], real, *unrelated[at:]]
                assert source in {s.source for s in diag.connections(asked)}
    finally:
        client.close()
        server.close()


@pytest.mark.skipif(not ROOT, reason="SOCK_DESTROY needs CAP_NET_ADMIN (the agent has it on a node)")
def test_hundreds_of_destinations_are_filtered_by_port_in_the_kernel_and_exactly_here(hanging: tuple[socket.socket, int]) -> None:
    """A mirror with many pods, or many mirrors: the request stays small and the answer exact."""
    _server, port = hanging
    client = socket.create_connection(("127.0.0.1", port))
    others = [Destination.parse(f"10.{i // 250}.{i % 250}.1", port) for i in range(300)]
    others += [Destination.parse(f"fd00::{i:x}", port) for i in range(300)]
    with SockDiag() as diag:
        source = f"127.0.0.1:{client.getsockname()[1]}"
        assert source in {s.source for s in diag.connections([*others, Destination.parse("127.0.0.1", port)])}
        assert source not in {s.source for s in diag.connections(others)}, "same port, another address: not ours"
    client.close()


# ------------------------------------------------------------------ the guard's rules, on a scripted kernel

M1 = Destination.parse("10.96.0.10", 5000)
M2 = Destination.parse("10.96.0.11", 5000)


def sock(dest: Destination, cookie: int, *, state: int = TCP_ESTABLISHED, waiting_ms: int | None = None, inode: int = 100) -> TcpSocket:
    sent = waiting_ms if waiting_ms is not None else 5000
    return TcpSocket(
        family=socket.AF_INET,
        state=state,
        source=f"10.0.0.5:{40000 + cookie}",
        destination=dest,
        interface=0,
        cookie=(cookie, 0),
        inode=inode,
        retransmits=0,
        last_data_sent_ms=sent,
        last_data_recv_ms=sent + 10 if waiting_ms is not None else 4000,  # else: answered 4 s ago, quiet since
        bytes_received=10,
        data_segs_out=1,
        raw_id=bytes(48),
    )


class ScriptedDiag:
    """What the kernel would report, scan by scan; records aborts."""

    def __init__(self, sockets: list[TcpSocket], destroy_error: int | None = None) -> None:
        self.sockets = sockets
        self.destroyed: list[tuple[int, int]] = []
        self.destroy_error = destroy_error

    def connections(self, dests: object) -> list[TcpSocket]:
        wanted = set(dests)  # type: ignore[call-overload]
        return [s for s in self.sockets if s.destination in wanted]

    def destroy(self, s: TcpSocket) -> None:
        if self.destroy_error is not None:
            raise SockDiagError("refused", self.destroy_error)
        self.destroyed.append(s.cookie)
        self.sockets = [x for x in self.sockets if x.cookie != s.cookie]

    def close(self) -> None:
        pass


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def guard_for(diag: ScriptedDiag, clock: Clock, own: frozenset[int] = frozenset()) -> ConnectionGuard:
    return ConnectionGuard(lambda: diag, clock, own_inodes=lambda: own)  # type: ignore[arg-type,return-value]


def test_every_quiet_connection_to_a_withdrawn_mirror_is_aborted_and_nothing_else() -> None:
    diag = ScriptedDiag([sock(M1, 1), sock(M1, 2, waiting_ms=3000), sock(M2, 3, waiting_ms=50), sock(M1, 4, inode=7)])
    guard = guard_for(diag, Clock(), own=frozenset({7}))
    result = guard.scan([Guarded("one", M1, withdrawn=True), Guarded("two", M2, withdrawn=False)])
    assert sorted(diag.destroyed) == [(1, 0), (2, 0)], "the agent's own socket (inode 7) is exempt; mirror two is healthy"
    assert result.aborted == {"one": 2}
    assert result.suspects == {}, "a request waiting 50 ms is not a stall"


def test_a_withdrawn_mirrors_connection_that_is_still_receiving_is_left_to_finish() -> None:
    """A blob streaming in from a mirror withdrawn by one slow probe is not cut; a quiet one is, and one that never received a byte."""
    streaming = replace(sock(M1, 1), last_data_recv_ms=20, last_data_sent_ms=4000)
    quiet = replace(sock(M1, 2), last_data_recv_ms=400, last_data_sent_ms=4000)
    fresh = replace(sock(M1, 3), last_data_recv_ms=20, last_data_sent_ms=20, bytes_received=0)  # its request just went out
    diag = ScriptedDiag([streaming, quiet, fresh])
    result = guard_for(diag, Clock()).scan([Guarded("one", M1, withdrawn=True)])
    assert sorted(diag.destroyed) == [(2, 0), (3, 0)] and result.aborted == {"one": 2}


def test_a_stalled_request_makes_its_mirror_a_suspect_once_and_touches_nothing() -> None:
    clock = Clock()
    diag = ScriptedDiag([sock(M1, 1, waiting_ms=400)])
    guard = guard_for(diag, clock)
    first = guard.scan([Guarded("one", M1, withdrawn=False)])
    assert list(first.suspects) == ["one"] and "400 ms" in first.suspects["one"]
    assert diag.destroyed == [], "a slow mirror keeps its connections until a probe says it is dead"
    clock.now += 5
    assert guard.scan([Guarded("one", M1, withdrawn=False)]).suspects == {}, "the same waiting request is judged once"
    diag.sockets.append(sock(M1, 2, waiting_ms=300))
    assert list(guard.scan([Guarded("one", M1, withdrawn=False)]).suspects) == ["one"], "a new stalled request is news"
    diag.sockets.append(sock(M1, 3, waiting_ms=300))
    clock.now += 0.1
    assert guard.scan([Guarded("one", M1, withdrawn=False)]).suspects == {}, "at most one suspicion per second per mirror"


def test_a_connect_unanswered_past_the_connect_timeout_is_aborted_even_on_a_live_mirror() -> None:
    clock = Clock()
    diag = ScriptedDiag([sock(M1, 1, state=TCP_SYN_SENT)])
    guard = guard_for(diag, clock)
    assert guard.scan([Guarded("one", M1, withdrawn=False)]).aborted == {}, "first seen now: not late yet"
    clock.now += 0.05
    assert guard.scan([Guarded("one", M1, withdrawn=False)]).aborted == {}
    clock.now += 0.06
    result = guard.scan([Guarded("one", M1, withdrawn=False)])
    assert result.aborted == {"one": 1} and diag.destroyed == [(1, 0)]
    assert "got no answer" in result.suspects["one"]


def test_a_connect_whose_syn_was_retransmitted_is_aborted_at_first_sight() -> None:
    diag = ScriptedDiag([replace(sock(M1, 1, state=TCP_SYN_SENT), retransmits=1)])
    result = guard_for(diag, Clock()).scan([Guarded("one", M1, withdrawn=False)])
    assert result.aborted == {"one": 1} and "retransmission" in result.suspects["one"]


def test_the_guard_looks_more_often_while_pulls_run_and_while_it_lets_go_of_a_dead_mirror() -> None:
    clock = Clock()
    diag = ScriptedDiag([])
    guard = guard_for(diag, clock)
    healthy, dead = [Guarded("one", M1, withdrawn=False)], [Guarded("one", M1, withdrawn=True)]
    guard.scan(healthy)
    assert guard.next_due == clock.now + guard.interval, "idle"
    diag.sockets.append(sock(M1, 1, waiting_ms=20))
    guard.scan(healthy)
    assert guard.next_due == clock.now + guard.active_interval < clock.now + guard.interval, "a connection is open"
    diag.sockets.clear()
    clock.now += 1
    guard.scan(healthy)
    assert guard.next_due == clock.now + guard.active_interval, "the pull's next request may come in a moment"
    clock.now += 2
    guard.scan(healthy)
    assert guard.next_due == clock.now + guard.interval, "idle again"
    diag.sockets.append(sock(M1, 2))
    guard.scan(dead)
    assert diag.destroyed == [(2, 0)]
    clock.now += 3
    guard.scan(dead)
    assert guard.next_due - clock.now < guard.active_interval, "still letting go of a dead mirror's connections"
    clock.now += 5
    guard.scan(dead)
    assert guard.next_due == clock.now + guard.interval


def test_a_node_that_cannot_abort_turns_the_guard_off_and_says_why() -> None:
    diag = ScriptedDiag([sock(M1, 1)], destroy_error=errno.EPERM)
    guard = guard_for(diag, Clock())
    result = guard.scan([Guarded("one", M1, withdrawn=True)])
    assert result.aborted == {}
    assert guard.disabled is not None and "CAP_NET_ADMIN" in guard.disabled
    assert guard.scan([Guarded("one", M1, withdrawn=True)]).aborted == {}


def test_a_failing_dump_is_transient() -> None:
    class Broken(ScriptedDiag):
        def connections(self, dests: object) -> list[TcpSocket]:
            raise SockDiagError("netlink: timed out", errno.ETIMEDOUT)

    guard = guard_for(Broken([]), Clock())
    assert guard.scan([Guarded("one", M1, withdrawn=True)]).aborted == {}
    assert guard.disabled is None and guard.last_error == "netlink: timed out"


# ------------------------------------------------------------------ a suspect's probe


def test_a_suspect_that_fails_its_probe_is_withdrawn_at_once_and_one_that_answers_is_kept() -> None:
    answers = {"http://10.96.0.10:5000": "TimeoutError: timed out", "http://10.96.0.11:5000": None}
    seen_timeouts: list[float] = []

    def probe(url: str, timeout: float, ca: str | None) -> str | None:
        seen_timeouts.append(timeout)
        return answers.get(url)

    clock = Clock()
    tracker = HealthTracker(probe, clock)
    targets = {"one": Target("http://10.96.0.10:5000"), "two": Target("http://10.96.0.11:5000")}
    answers["http://10.96.0.10:5000"] = None
    tracker.update(targets)  # both healthy at first
    answers["http://10.96.0.10:5000"] = "TimeoutError: timed out"
    transitions = tracker.suspect(targets, {"one": "a request waited 400 ms", "two": "a request waited 300 ms"}, timeout=0.3)
    assert [(t.name, t.healthy) for t in transitions] == [("one", False)]
    assert "a request waited 400 ms" in (transitions[0].error or "") and "timed out" in (transitions[0].error or "")
    assert tracker.unhealthy() == {"one"}
    assert seen_timeouts[-2:] == [0.3, 0.3], "the suspect probe has its own short timeout"
    assert tracker.suspect(targets, {"one": "again"}, timeout=0.3) == [], "a withdrawn mirror is not probed on suspicion"
    answers["http://10.96.0.10:5000"] = None
    clock.now += 10
    assert [(t.name, t.healthy) for t in tracker.update(targets)] == [("one", True)], "its scheduled probe restores it"


def test_a_stall_on_a_mirror_whose_last_probe_failed_withdraws_it_without_another_probe() -> None:
    answers: dict[str, str | None] = {"http://10.96.0.10:5000": None}
    clock = Clock()
    tracker = HealthTracker(lambda url, timeout, ca: answers[url], clock, confirm_delay=0.25)
    targets = {"one": Target("http://10.96.0.10:5000")}
    tracker.update(targets)
    assert tracker.stalled("one", "http://10.96.0.10:5000", "a request waited 300 ms") is None, "a healthy record: probe first"
    answers["http://10.96.0.10:5000"] = "TimeoutError: timed out"
    clock.now += 10
    assert tracker.update(targets) == [], "one failed probe: confirmation pending"
    t = tracker.stalled("one", "http://10.96.0.10:5000", "a request waited 300 ms")
    assert t is not None and not t.healthy and "its last probe failed too" in (t.error or "")
    assert tracker.unhealthy() == {"one"}


def test_a_suspect_never_seen_by_a_probe_is_left_to_the_scheduled_probes() -> None:
    tracker = HealthTracker(lambda url, timeout, ca: "refused", Clock())
    assert tracker.suspect({"one": Target("http://10.96.0.10:5000")}, {"one": "stalled"}, timeout=0.3) == []


def test_a_connect_in_progress_owes_no_reply() -> None:
    assert replace(sock(M1, 1, waiting_ms=900), state=TCP_SYN_SENT).awaiting_reply_ms is None


# ------------------------------------------------------------------ the agent's loop with the guard


class StubWatcher:
    """The EndpointSlice watcher as the agent asks it (ready count and addresses), with scripted answers."""

    def __init__(self, addresses: tuple[str, ...]) -> None:
        self.addresses = addresses

    def ready(self, service: str) -> int | None:
        return len(self.addresses)

    def ready_addresses(self, service: str) -> tuple[str, ...]:
        return self.addresses

    def stop(self) -> None:
        pass


def test_the_agent_withdraws_a_stalled_mirror_and_lets_go_of_its_pods_connections_too(tmp_path: Path) -> None:
    """A stalled request to the ClusterIP, a socket-LB connection to the pod's own address: both let go once the probe fails."""
    url = "http://10.96.0.10:5000"
    entry = wire_entry("hub", url, ["docker.io"])
    entry["service"] = "regmirror-system/regmirror-hub"
    plan = tmp_path / "mirrors.json"
    plan.write_text(plan_json(entry))
    root = node_root(tmp_path)
    labels = tmp_path / "node.json"
    labels.write_text(
        json.dumps({"metadata": {"name": "n1", "labels": {}}, "status": {"nodeInfo": {"containerRuntimeVersion": "containerd://1.6.20"}}})
    )
    answers: dict[str, str | None] = {url: None}
    tracker = HealthTracker(lambda u, timeout, ca: answers[u], jitter=0)
    pod = Destination.parse("10.244.1.7", 5000)
    diag = ScriptedDiag([])
    guard = ConnectionGuard(lambda: diag, own_inodes=frozenset)  # type: ignore[arg-type,return-value]
    config = AgentConfig(plan_path=plan, host_root=root, node_labels_file=labels, health_port=0, guard_connections=True)
    agent = Agent(config, tracker=tracker, guard=guard)
    agent._watchers["regmirror-system"] = StubWatcher(("10.244.1.7:5000",))  # type: ignore[assignment]
    agent.tick(full=True)
    hosts_toml = root / "etc/containerd/certs.d/docker.io/hosts.toml"
    assert "10.96.0.10:5000" in hosts_toml.read_text()

    # The mirror hangs: containerd's request to the ClusterIP waits, another connection went to the pod itself.
    answers[url] = "TimeoutError: timed out"
    diag.sockets += [sock(M1, 1, waiting_ms=300), replace(sock(pod, 2), last_data_recv_ms=900, last_data_sent_ms=900)]
    # (M1 is the ClusterIP here: the same address the plan names.)
    assert mirror_destination(url) == M1
    guard.next_due = 0
    agent.tick(full=False)  # the look: a suspect, probed on the probe thread
    deadline = time.monotonic() + 5
    while not diag.destroyed and time.monotonic() < deadline:
        time.sleep(0.02)
        agent.tick(full=False)
    assert sorted(diag.destroyed) == [(1, 0), (2, 0)], "the ClusterIP's waiting request and the pod's own connection"
    assert tracker.unhealthy() == {"hub"}
    assert not hosts_toml.exists() or "10.96.0.10" not in hosts_toml.read_text(), "withdrawn from the node's files"
    report = agent.readiness.get_report()["connectionGuard"]
    assert report["enabled"] is True and report["aborted"] == {"hub": 2}
