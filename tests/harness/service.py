"""A Service's ClusterIP on loopback: one address, connections spread over the ready endpoints.

Nodes reach a mirror through ONE ClusterIP; kube-proxy sends each new
connection to one of the Service's ready endpoints, and an endpoint leaves
once its pod is not ready (EndpointSlice update). `LoopbackService` does the
same for the HA tests: each accepted connection goes to the next endpoint in
turn (kube-proxy's iptables mode picks at random; round robin makes a test
deterministic, hitting every endpoint), and `remove()` is the EndpointSlice
update. A connection to an endpoint that refuses is closed at once, as the
client would see a reset from a dead pod on a live node.
"""

from __future__ import annotations

import contextlib
import itertools
import socket
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field


@dataclass
class LoopbackService:
    """Round-robin TCP forwarding from one loopback port to a mutable list of endpoints."""

    listener: socket.socket
    endpoints: list[tuple[str, int]]
    # Bytes per second per connection towards the client (0: unlimited): a network slow
    # enough that a transfer is still running when a test acts on it.
    rate: int = 0
    connections: dict[tuple[str, int], int] = field(default_factory=dict)
    active: dict[tuple[str, int], int] = field(default_factory=dict)
    sent: dict[tuple[str, int], int] = field(default_factory=dict)
    refused: dict[tuple[str, int], int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _turn: itertools.count[int] = field(default_factory=itertools.count)
    _stop: threading.Event = field(default_factory=threading.Event)

    @property
    def address(self) -> str:
        host, port = self.listener.getsockname()[:2]
        return f"{host}:{port}"

    def remove(self, endpoint: tuple[str, int]) -> None:
        """The endpoint left the EndpointSlice: no new connection goes there."""
        with self._lock:
            self.endpoints = [e for e in self.endpoints if e != endpoint]

    def _pick(self) -> tuple[str, int] | None:
        with self._lock:
            if not self.endpoints:
                return None
            endpoint = self.endpoints[next(self._turn) % len(self.endpoints)]
            self.connections[endpoint] = self.connections.get(endpoint, 0) + 1
            return endpoint

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._forward, args=(client,), daemon=True).start()

    def _forward(self, client: socket.socket) -> None:
        endpoint = self._pick()
        if endpoint is None:
            client.close()
            return
        try:
            upstream = socket.create_connection(endpoint, timeout=5)
        except OSError:
            with self._lock:
                self.refused[endpoint] = self.refused.get(endpoint, 0) + 1
            client.close()
            return
        upstream.settimeout(None)
        with self._lock:
            self.active[endpoint] = self.active.get(endpoint, 0) + 1

        def pipe(src: socket.socket, dst: socket.socket, rate: int = 0) -> None:
            chunk_size = min(1 << 16, rate // 20) if rate else 1 << 16
            try:
                while chunk := src.recv(chunk_size):
                    dst.sendall(chunk)
                    if dst is client:
                        with self._lock:
                            self.sent[endpoint] = self.sent.get(endpoint, 0) + len(chunk)
                    if rate:
                        self._stop.wait(len(chunk) / rate)
            except OSError:
                pass
            finally:
                with contextlib.suppress(OSError):
                    dst.shutdown(socket.SHUT_WR)

        back = threading.Thread(target=pipe, args=(upstream, client, self.rate), daemon=True)
        back.start()
        pipe(client, upstream)
        back.join()
        client.close()
        upstream.close()
        with self._lock:
            self.active[endpoint] -= 1

    def bytes_sent(self, endpoint: tuple[str, int]) -> int:
        """Bytes the endpoint has sent to clients so far."""
        with self._lock:
            return self.sent.get(endpoint, 0)

    def busy(self, endpoint: tuple[str, int]) -> int:
        """Connections to `endpoint` still open (a transfer through it may be running)."""
        with self._lock:
            return self.active.get(endpoint, 0)

    @classmethod
    @contextlib.contextmanager
    def run(cls, endpoints: list[tuple[str, int]], host: str = "127.0.0.1", *, rate: int = 0) -> Iterator[LoopbackService]:
        """Listen on a free port of `host` until the block ends."""
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, 0))
        listener.listen(128)
        service = cls(listener, list(endpoints), rate)
        thread = threading.Thread(target=service._serve, daemon=True)
        thread.start()
        try:
            yield service
        finally:
            service._stop.set()
            listener.close()
            thread.join(5)


@dataclass
class KernelService:
    """A ClusterIP the way kube-proxy's iptables mode makes one: DNAT in the kernel, a random endpoint per connection.

    Needed where the user-space `LoopbackService` would lie: a blackholed endpoint (its node
    gone) must stall the client's own connect, not the forwarder's. Rules match only this
    virtual address and port, so nothing else on the machine is touched; `close()` removes them.
    """

    address: str
    port: int
    endpoints: list[tuple[str, int]]
    _rules: list[list[str]] = field(default_factory=list)

    def _apply(self) -> None:
        for rule in self._rules:
            subprocess.run(["iptables", "-t", "nat", "-D", *rule], check=False, capture_output=True)
        self._rules = []
        for i, (host, port) in enumerate(self.endpoints):
            rule = ["OUTPUT", "-d", self.address, "-p", "tcp", "--dport", str(self.port)]
            left = len(self.endpoints) - i
            if left > 1:
                rule += ["-m", "statistic", "--mode", "random", "--probability", f"{1 / left:.5f}"]
            rule += ["-j", "DNAT", "--to-destination", f"{host}:{port}"]
            subprocess.run(["iptables", "-t", "nat", "-A", *rule], check=True, capture_output=True)
            self._rules.append(rule)

    def remove(self, endpoint: tuple[str, int]) -> None:
        """The endpoint left the EndpointSlice."""
        self.endpoints = [e for e in self.endpoints if e != endpoint]
        self._apply()

    @classmethod
    @contextlib.contextmanager
    def run(cls, address: str, port: int, endpoints: list[tuple[str, int]]) -> Iterator[KernelService]:
        """Install the DNAT rules until the block ends."""
        service = cls(address, port, list(endpoints))
        try:
            service._apply()
            yield service
        finally:
            service.endpoints = []
            service._apply()


@contextlib.contextmanager
def blackholed(endpoint: tuple[str, int]) -> Iterator[None]:
    """Packets to the endpoint are dropped (a node that died without a word) until the block ends.

    Dropped on INPUT, after the connection's NAT decision is confirmed on the way out, as on a
    real node where the packet leaves for the dead pod and is lost on the network: the client's
    SYN retries keep going to the same dead endpoint. (Dropped on OUTPUT, the unconfirmed
    decision would be taken again for every retry, and half of them would reach the live one.)
    """
    rule = ["INPUT", "-d", endpoint[0], "-p", "tcp", "--dport", str(endpoint[1]), "-j", "DROP"]
    subprocess.run(["iptables", "-I", *rule], check=True, capture_output=True)
    try:
        yield
    finally:
        subprocess.run(["iptables", "-D", *rule], check=False, capture_output=True)
