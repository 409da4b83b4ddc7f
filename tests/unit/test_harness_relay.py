"""The fault relay of the test harness does what the fault tests say it does.

A partition holds bytes and drops new connections (no reset, no EOF); a stopped
target looks like a stopped server (connections closed, new ones refused), except
during a partition, when the client learns nothing until it heals.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from harness.proxy import TcpRelay

HELD = 1.0  # how long "nothing arrives" is watched for


@pytest.fixture
def echo() -> Iterator[socket.socket]:
    """An echo server on loopback (the relay's target)."""
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=lambda c=conn: _echo(c), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    yield server
    server.close()


def _echo(conn: socket.socket) -> None:
    with conn:
        while data := conn.recv(1024):
            conn.sendall(data)


@pytest.fixture
def relay(echo: socket.socket) -> Iterator[TcpRelay]:
    relay = TcpRelay("127.0.0.1", echo.getsockname()[1])
    yield relay
    relay.stop()


def connect(relay: TcpRelay, timeout: float = 2.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", relay.port), timeout=timeout)


def roundtrip(sock: socket.socket, data: bytes = b"ping") -> bytes:
    sock.sendall(data)
    return sock.recv(1024)


def nothing_arrives(sock: socket.socket) -> bool:
    sock.settimeout(HELD)
    try:
        sock.recv(1024)
    except TimeoutError:
        return True
    return False


def closed(sock: socket.socket) -> bool:
    """Whether the peer closed the connection (EOF or reset)."""
    sock.settimeout(5)
    try:
        return sock.recv(1024) == b""
    except ConnectionResetError:
        return True


def test_bytes_flow_both_ways(relay: TcpRelay) -> None:
    with connect(relay) as sock:
        assert roundtrip(sock) == b"ping"


def test_a_partition_holds_bytes_and_drops_new_connections_until_it_heals(relay: TcpRelay) -> None:
    with connect(relay) as sock:
        assert roundtrip(sock) == b"ping"
        relay.cut()
        sock.sendall(b"held")
        assert nothing_arrives(sock), "no byte crosses a partition, and the connection is not closed"
        outcomes = []
        for _ in range(3):  # the first one or two fit the listen queue; then SYNs are dropped
            try:
                connect(relay, timeout=HELD).close()
                outcomes.append("queued")
            except TimeoutError:
                outcomes.append("timeout")
        assert outcomes[-1] == "timeout", outcomes
        relay.heal()
        sock.settimeout(5)
        assert sock.recv(1024) == b"held"
    with connect(relay) as sock:
        assert roundtrip(sock) == b"ping"


def test_a_stopped_target_closes_connections_and_refuses_new_ones(relay: TcpRelay) -> None:
    with connect(relay) as sock:
        assert roundtrip(sock) == b"ping"
        relay.upstream_down()
        assert closed(sock)
    with pytest.raises(ConnectionRefusedError):
        connect(relay)
    relay.upstream_up()
    with connect(relay) as sock:
        assert roundtrip(sock) == b"ping"


def test_a_target_stopped_during_a_partition_is_seen_only_after_it_heals(relay: TcpRelay) -> None:
    with connect(relay) as sock:
        assert roundtrip(sock) == b"ping"
        relay.cut()
        relay.upstream_down()
        assert nothing_arrives(sock), "the client cannot see the server go away through a partition"
        relay.heal()
        assert closed(sock)
    with pytest.raises(ConnectionRefusedError):
        connect(relay)
    relay.upstream_up()
    with connect(relay) as sock:
        assert roundtrip(sock) == b"ping"
