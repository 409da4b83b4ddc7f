"""A TCP relay between one client (the operator) and the API server: partitions, and outages as they look.

The operator's kubeconfig points at the relay instead of the API server, so a test can
put a network fault between the two without touching anyone else's traffic.

- ``cut()`` models a network partition, not a refusing server: open connections stay
  open with every byte in either direction held back, and new connections are not
  accepted (the listen queue shrinks to one, so further SYNs are dropped and
  ``connect()`` hangs, as behind a firewall that drops packets). Neither side sees a
  reset or an EOF. ``heal()`` lets everything held flow again.
- ``upstream_down()`` / ``upstream_up()`` keep the relay faithful while the API server
  itself is stopped (``LocalCluster`` calls them for the relays it opened): the client
  sees its connections closed and new ones refused, exactly as without a relay (a relay
  that accepted and then hung up would be a different fault, and clients handle it
  differently). During a partition the client sees nothing until it heals.
- ``reset()`` closes every open connection at once.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

BUFFER = 65536
#: Listen queue while traffic flows (the operator opens a dozen watches at once).
BACKLOG = 128


@dataclass
class _Link:
    """One client connection and, once connected, its connection to the target."""

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

    def close_upstream(self) -> None:
        """The target's side died (e.g. the API server stopped); the client learns it when bytes flow."""
        if self.upstream is not None:
            with contextlib.suppress(OSError):
                self.upstream.shutdown(socket.SHUT_RDWR)

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
        self.host = listen_host
        self._listener: socket.socket | None = socket.create_server((listen_host, 0), backlog=BACKLOG)
        self.port = int(self._listener.getsockname()[1])
        self._flowing = threading.Event()
        self._flowing.set()
        self._upstream_alive = True
        self._stopped = threading.Event()
        self._lock = threading.RLock()
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

    # ------------------------------------------------------------------ faults

    def cut(self) -> None:
        """Start a partition: hold every byte, and drop new connection attempts, until ``heal()``."""
        with self._lock:
            self._flowing.clear()
            self._listen(0)

    def heal(self) -> None:
        """End the partition: what was held flows, queued connections are accepted and relayed."""
        with self._lock:
            if not self._upstream_alive:
                self._refuse()
            else:
                self._listen(BACKLOG)
            self._flowing.set()

    @contextlib.contextmanager
    def partition(self) -> Iterator[TcpRelay]:
        """``cut()`` for the duration of the block, ``heal()`` afterwards (also on error)."""
        self.cut()
        try:
            yield self
        finally:
            self.heal()

    def upstream_down(self) -> None:
        """The target stopped: its side of every connection is gone; clients see it (unless cut)."""
        with self._lock:
            self._upstream_alive = False
            for link in self._links:
                link.close_upstream()
            if not self.is_cut:
                self._refuse()

    def upstream_up(self) -> None:
        """The target is back: new connections are relayed again (unless cut)."""
        with self._lock:
            self._upstream_alive = True
            self._listen(0 if self.is_cut else BACKLOG)

    def reset(self) -> None:
        """Close every open connection (the client sees them reset); new ones are relayed as usual."""
        with self._lock:
            links, self._links = self._links, []
        for link in links:
            link.close()

    def open_connections(self) -> int:
        """How many client connections are open now."""
        with self._lock:
            self._links = [link for link in self._links if not link.closed.is_set()]
            return len(self._links)

    def stop(self) -> None:
        """Close the listener and every connection."""
        self._stopped.set()
        with self._lock:
            self._flowing.set()  # release threads waiting on a partition
            self._refuse()
        self._thread.join(timeout=5)

    # ------------------------------------------------------------------ listener state

    def _listen(self, backlog: int) -> None:
        """Listen on our port with this queue length (reopening it after ``_refuse``)."""
        if self._listener is None:
            self._listener = socket.create_server((self.host, self.port), backlog=backlog)
        else:
            # Linux updates the backlog of a listening socket in place: with a queue of
            # (about) one, the kernel drops further SYNs instead of completing handshakes.
            with contextlib.suppress(OSError):
                self._listener.listen(backlog)

    def _refuse(self) -> None:
        """Nothing listens on our port (new connections are refused); open ones are closed."""
        if self._listener is not None:
            # shutdown() stops a listening socket at once, even while accept() waits on it.
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                self._listener.close()
            self._listener = None
        links, self._links = self._links, []
        for link in links:
            link.close()

    # ------------------------------------------------------------------ relaying

    def _accept_loop(self) -> None:
        while not self._stopped.is_set():
            self._flowing.wait()  # nothing is accepted during a partition
            with self._lock:
                listener = self._listener
            if listener is None:
                self._stopped.wait(0.05)
                continue
            listener.settimeout(0.2)
            try:
                client, _ = listener.accept()
            except OSError:  # a timeout to look at the state again, or the listener closed
                continue
            client.settimeout(None)
            link = _Link(client)
            with self._lock:
                self._links.append(link)
                self.accepted += 1
            threading.Thread(target=self._connect, args=(link,), daemon=True).start()

    def _connect(self, link: _Link) -> None:
        # Accepted just before a cut: it waits for the partition to heal like the rest.
        self._flowing.wait()
        if link.closed.is_set() or self._stopped.is_set():
            return
        try:
            upstream = socket.create_connection(self.target, timeout=10)
            upstream.settimeout(None)
        except OSError:
            link.close()
            return
        with self._lock:
            link.upstream = upstream
            gone = link.closed.is_set() or not self._upstream_alive
        if gone:
            link.close()
            return
        threading.Thread(target=self._pump, args=(link, link.client, upstream), daemon=True).start()
        self._pump(link, upstream, link.client)

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
            if failed or (not data and source is link.upstream and not self._upstream_alive):
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
