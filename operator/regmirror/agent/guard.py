"""The connection guard: a pull stuck on a dead mirror is let go in a fraction of a second.

Withdrawing a mirror from hosts.toml helps only the pulls that start after
it: containerd resolves a pull's hosts once, and each of the pull's requests
(resolve, manifest, config, every layer) tries the mirror first. A mirror
that accepts connections and never answers holds each of those requests until
containerd's response-header timeout (30 s, 2.3 and later) or forever (before
2.3); a blackholed one holds each connect until `dial_timeout` (2.0.7+, 2.1+)
or 30 s (everywhere else).

The guard watches the node's own TCP connections to the mirrors (sock_diag,
agent/sockdiag.py; the agent shares the host's network namespace) every
`interval` and acts on what it sees:

- a connection to a mirror the agent has withdrawn is aborted (SOCK_DESTROY,
  as `ss -K` does) once nothing has arrived on it for `stall_after`:
  containerd's request fails with ECONNABORTED and goes to the next host at
  once, so a pull already under way pays a fraction of a second per request
  instead of 30 s or forever. A connection still receiving (a blob streaming
  from a mirror that was withdrawn for a slow probe, not dead) is left to
  finish;
- a connect still unanswered after `connect_timeout` is aborted, whatever the
  mirror's state: the `dial_timeout` that containerd 1.x and 2.0.0-2.0.6
  cannot read, given to every release;
- a request that has waited `stall_after` for any byte back makes the mirror a
  suspect: the agent probes it at once (probe.py) and withdraws it if the
  probe fails too, instead of waiting for its next scheduled probe. A mirror
  that only answers slowly (a cache miss fetched from the upstream) passes
  that probe and nothing is touched.

Only connections in this network namespace to a mirror's own `address:port`
(its ClusterIP, and its pods' addresses from its EndpointSlices, where a
socket-level load balancer such as Cilium's rewrites the destination at
connect() time) are ever looked at, and only those of mirrors that fall back
to the upstream: a NeverContactUpstream mirror's connections are left alone
(there is no other host to go to). The agent's own probes are exempt.

What it costs: one netlink dump per look, 4 a second while no connection to
a mirror is open, 10 a second while one is and for 2 s after (a pull is
under way), 20 a second for 5 s after it let go of a dead mirror's; the
filtering is done in the kernel by destination. The kernel walks its whole
TCP hash table for a dump, so the cost grows with the node's memory (the
table's size), not with its connections: about 1.5-1.9 ms of CPU per dump
with 262,144 buckets (a 24 GiB machine): the agent used 8-12 mCPU idle with
the guard against 0.7-1.0 without it (`make bench`). No request to any mirror while requests
are answered. A suspect costs one probe, at most one per `suspect_spacing` per
mirror. It needs CAP_NET_ADMIN (aborting) and a kernel with
CONFIG_INET_DIAG_DESTROY; without them the first abort fails, the guard turns
itself off and says why (/report, a Node Event), and the probes alone decide.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from regmirror.agent.sockdiag import TCP_SYN_SENT, Destination, SockDiag, SockDiagError, TcpSocket

# How often the node's connections are looked at: while any to a mirror is open, and otherwise.
DEFAULT_ACTIVE_INTERVAL = 0.1
DEFAULT_INTERVAL = 0.25
# While connections to a withdrawn mirror keep appearing (a pull under way sends each of its requests
# there first), look again this soon: each request then costs at most this, however many layers it has.
ABORT_INTERVAL = 0.05
# How long each pace lasts after what set it: the pull's next request may come a moment after its last one.
ACTIVE_LINGER = 2.0
ABORT_LINGER = 5.0
DEFAULT_STALL_AFTER = 0.15
DEFAULT_CONNECT_TIMEOUT = 0.1
DEFAULT_SUSPECT_SPACING = 1.0
# Errors that mean "this node cannot abort connections" (no capability, kernel without INET_DIAG_DESTROY).
UNSUPPORTED = frozenset({errno.EPERM, errno.EACCES, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.EPROTONOSUPPORT})


def mirror_destination(url: str) -> Destination | None:
    """The `address:port` containerd connects to for this mirror URL; None when its host is a name (not resolved here)."""
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return None
    return Destination.parse(parts.hostname or "", port)


@dataclass(frozen=True)
class Guarded:
    """One mirror as the guard sees it."""

    name: str
    destination: Destination
    # Withdrawn from the node's files: its connections that receive nothing are aborted.
    withdrawn: bool
    # Its pods' own `address:port`s (from its EndpointSlices): where a load balancer that rewrites the
    # destination at connect() time (Cilium's socket LB, without kube-proxy) points the node's sockets.
    endpoints: frozenset[Destination] = frozenset()

    @property
    def destinations(self) -> frozenset[Destination]:
        return frozenset({self.destination, *self.endpoints})


@dataclass
class ScanResult:
    # Mirror -> why it is suspected (a request waiting for a reply); probe it now.
    suspects: dict[str, str] = field(default_factory=dict)
    # Mirror -> connections aborted in this scan.
    aborted: dict[str, int] = field(default_factory=dict)


def own_socket_inodes(fd_dir: str = "/proc/self/fd") -> frozenset[int]:
    """Inodes of this process's sockets (the agent's own probes are never aborted)."""
    found = set()
    try:
        names = os.listdir(fd_dir)
    except OSError:
        return frozenset()
    for name in names:
        try:
            target = os.readlink(f"{fd_dir}/{name}")
        except OSError:
            continue
        if target.startswith("socket:[") and target.endswith("]"):
            try:
                found.add(int(target[8:-1]))
            except ValueError:
                continue
    return frozenset(found)


class ConnectionGuard:
    """Scans the node's connections to the mirrors and aborts the hopeless ones; owned by the agent's loop thread."""

    def __init__(
        self,
        diag_factory: Callable[[], SockDiag] = SockDiag,
        clock: Callable[[], float] = time.monotonic,
        *,
        interval: float = DEFAULT_INTERVAL,
        active_interval: float = DEFAULT_ACTIVE_INTERVAL,
        stall_after: float = DEFAULT_STALL_AFTER,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        suspect_spacing: float = DEFAULT_SUSPECT_SPACING,
        own_inodes: Callable[[], frozenset[int]] = own_socket_inodes,
    ) -> None:
        self._diag_factory = diag_factory
        self._diag: SockDiag | None = None
        self._clock = clock
        self.interval = interval
        self.active_interval = min(active_interval, interval)
        self.stall_after = stall_after
        self.connect_timeout = connect_timeout
        self.suspect_spacing = suspect_spacing
        self._own_inodes = own_inodes
        # None while usable; else why the guard is off (it stays off: a capability does not appear later).
        self.disabled: str | None = None
        # Last scan's trouble reading the sockets (transient; the next scan tries again).
        self.last_error: str | None = None
        self._first_seen: dict[tuple[int, int], float] = {}
        self._judged: set[tuple[int, int]] = set()
        self._last_suspected: dict[str, float] = {}
        self._last_seen = float("-inf")  # last look that found a connection to a mirror
        self._last_abort = float("-inf")  # last abort of a withdrawn mirror's connection
        self.aborted_total: dict[str, int] = {}
        self.next_due = clock()

    def close(self) -> None:
        if self._diag is not None:
            self._diag.close()
            self._diag = None

    def _abort(self, diag: SockDiag, sock: TcpSocket) -> bool:
        """Abort one connection; False (and the guard off) when this node cannot."""
        try:
            diag.destroy(sock)
            return True
        except SockDiagError as exc:
            if exc.errno in UNSUPPORTED:
                self.disabled = f"cannot abort connections here ({exc}): needs CAP_NET_ADMIN and a kernel with CONFIG_INET_DIAG_DESTROY"
                self.close()
            else:
                self.last_error = str(exc)
            return False

    def scan(self, mirrors: Iterable[Guarded]) -> ScanResult:
        """One look at the node's connections to these mirrors; aborts what must go, names the suspects."""
        result = ScanResult()
        now = self._clock()
        self.next_due = now + self._pace(now)
        by_destination = {d: m for m in mirrors for d in sorted(m.destinations, key=str)}
        if self.disabled is not None or not by_destination:
            self._first_seen.clear()
            return result
        try:
            if self._diag is None:
                self._diag = self._diag_factory()
            sockets = self._diag.connections(by_destination)
            self.last_error = None
        except (SockDiagError, OSError) as exc:
            self.last_error = str(exc)
            self.close()
            return result
        if sockets:
            self._last_seen = now  # a pull is under way: look closely until a while after it is over
        seen = {s.cookie for s in sockets}
        self._first_seen = {k: v for k, v in self._first_seen.items() if k in seen}
        self._judged &= seen
        own: frozenset[int] | None = None
        for sock in sockets:
            mirror = by_destination.get(sock.destination)
            if mirror is None:
                continue
            first = self._first_seen.setdefault(sock.cookie, now)
            # A connect is late once it has been seen for connect_timeout, or at once when the kernel already
            # retransmitted its SYN (the initial retransmission timeout, 1 s, has passed).
            late_connect = sock.state == TCP_SYN_SENT and (now - first >= self.connect_timeout or sock.retransmits > 0)
            # Of a withdrawn mirror, only connections that are not receiving: a blob still streaming in
            # (a mirror withdrawn by a slow probe, not dead) finishes; a dead one's connections receive nothing,
            # and one that never received a byte goes at first sight (CRI-O sends each request there first).
            quiet = (
                sock.state == TCP_SYN_SENT
                or not sock.bytes_received
                or sock.last_data_recv_ms is None
                or sock.last_data_recv_ms >= self.stall_after * 1000
            )
            hopeless = (mirror.withdrawn and quiet) or late_connect
            waiting = sock.awaiting_reply_ms
            stalled = waiting is not None and waiting >= self.stall_after * 1000
            if not hopeless and not stalled:
                continue
            if own is None:
                own = self._own_inodes()
            if sock.inode in own:
                continue
            if hopeless:
                if mirror.withdrawn:
                    self._last_abort = now
                if self._abort(self._diag, sock):
                    result.aborted[mirror.name] = result.aborted.get(mirror.name, 0) + 1
                    self.aborted_total[mirror.name] = self.aborted_total.get(mirror.name, 0) + 1
                if self.disabled is not None:
                    return result
                if sock.state == TCP_SYN_SENT and not mirror.withdrawn:
                    waited = f"{now - first:.2f} s" if not sock.retransmits else "its first SYN's retransmission timeout"
                    self._suspect(result, mirror.name, f"a connection to {sock.destination} got no answer in {waited}", now)
            elif sock.cookie not in self._judged:
                self._judged.add(sock.cookie)
                self._suspect(result, mirror.name, f"a request to {sock.destination} has waited {waiting} ms for a reply", now)
        self.next_due = now + self._pace(now)  # what this look saw sets the pace of the next
        return result

    def _pace(self, now: float) -> float:
        """Seconds to the next look: quick while a dead mirror's connections are being let go, then while pulls run, else idle."""
        if now - self._last_abort < ABORT_LINGER:
            return min(ABORT_INTERVAL, self.active_interval)
        if now - self._last_seen < ACTIVE_LINGER:
            return self.active_interval
        return self.interval

    def _suspect(self, result: ScanResult, name: str, why: str, now: float) -> None:
        if name in result.suspects or now - self._last_suspected.get(name, float("-inf")) < self.suspect_spacing:
            return
        self._last_suspected[name] = now
        result.suspects[name] = why

    def forget(self, names: Iterable[str]) -> None:
        """Drop per-mirror counters of mirrors no longer selected."""
        keep = set(names)
        self._last_suspected = {k: v for k, v in self._last_suspected.items() if k in keep}
        self.aborted_total = {k: v for k, v in self.aborted_total.items() if k in keep}
