"""A TCP relay between one client (the operator) and the API server, that can be cut.

The operator's kubeconfig points at the relay instead of the API server. ``cut()``
models a network partition, not a refusing server: connections stay open, bytes in
either direction are held back, new connections are accepted but never reach the API
server. Neither side sees a reset or an EOF; requests and watches simply hang, as
they do when a route or a firewall drops packets. ``heal()`` lets everything held
flow again (a side that closed meanwhile, e.g. a restarted API server, is then seen
as closed). ``reset()`` closes every open connection at once.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

BUFFER = 65536


@dataclass
class _Link:
    """One client connection and, once flowing, its connection to the target."""

    client: socket.socket
    upstream: socket.socket | None = None
    closed: threading.Event = field(default_factory=threading.Event)
    half_closed: int = 0  # directions that saw EOF; both: the link is done
    lock: threading.Lock = field(default_factory=threading.Lock)

    def end_direction(self) -> None:
        with self.lock:
            self.half_closed += 1
            done = self.half_closed == 2
        if done:
            self.close()

    def close(self) -> None:
        self.closed.set()
        for sock in (self.client, self.upstream):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    sock.close()


class TcpRelay:
    """Relay ``listen_host:port`` -> ``target_host:target_port``, with a partition switch."""

    def __init__(self, target_host: str, target_port: int, listen_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self._listener = socket.create_server((listen_host, 0))
        self.host = listen_host
        self.port = int(self._listener.getsockname()[1])
        self._flowing = threading.Event()
        self._flowing.set()
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        self._links: list[_Link] = []
        self.accepted = 0
        self._thread = threading.Thread(target=self._accept_loop, name=f"relay-{self.port}", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        """``https://host:port`` for a kubeconfig (the API server's certificate names 127.0.0.1)."""
        return f"https://{self.host}:{self.port}"

    @property
    def is_cut(self) -> bool:
        """Whether the relay currently holds all traffic back."""
        return not self._flowing.is_set()

    def cut(self) -> None:
        """Start a partition: hold every byte and every new connection until ``heal()``."""
        self._flowing.clear()

    def heal(self) -> None:
        """End the partition: what was held flows, held connections reach the target."""
        self._flowing.set()

    def reset(self) -> None:
        """Close every open connection (the client sees them reset); new ones are relayed as usual."""
        with self._lock:
            links, self._links = self._links, []
        for link in links:
            link.close()

    @contextlib.contextmanager
    def partition(self) -> Iterator[TcpRelay]:
        """``cut()`` for the duration of the block, ``heal()`` afterwards (also on error)."""
        self.cut()
        try:
            yield self
        finally:
            self.heal()

    def open_connections(self) -> int:
        """How many client connections are open now."""
        with self._lock:
            self._links = [link for link in self._links if not link.closed.is_set()]
            return len(self._links)

    def stop(self) -> None:
        """Close the listener and every connection."""
        self._stopped.set()
        self._flowing.set()  # release threads waiting on a partition
        with contextlib.suppress(OSError):
            self._listener.close()
        self.reset()
        self._thread.join(timeout=5)

    def _accept_loop(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            link = _Link(client)
            with self._lock:
                self._links.append(link)
                self.accepted += 1
            threading.Thread(target=self._connect, args=(link,), daemon=True).start()

    def _connect(self, link: _Link) -> None:
        # A connection made during a partition is accepted (the SYN is answered by our
        # kernel) but reaches nothing until the partition heals, as behind a dropped route.
        self._flowing.wait()
        if link.closed.is_set() or self._stopped.is_set():
            return
        try:
            link.upstream = socket.create_connection(self.target, timeout=10)
            link.upstream.settimeout(None)
        except OSError:
            link.close()
            return
        threading.Thread(target=self._pump, args=(link, link.client, link.upstream), daemon=True).start()
        self._pump(link, link.upstream, link.client)

    def _pump(self, link: _Link, source: socket.socket, sink: socket.socket) -> None:
        while not link.closed.is_set():
            try:
                data = source.recv(BUFFER)
                failed = False
            except OSError:
                data, failed = b"", True
            # Whatever arrived during a partition waits here; so does an EOF or a reset.
            self._flowing.wait()
            if link.closed.is_set():
                return
            if failed:
                link.close()
                return
            if not data:
                with contextlib.suppress(OSError):
                    sink.shutdown(socket.SHUT_WR)
                # The other direction may still carry data (a response after the request's EOF).
                link.end_direction()
                return
            try:
                sink.sendall(data)
            except OSError:
                link.close()
                return
