"""The node's TCP connections to given destinations, and aborting one: Linux sock_diag over netlink.

Two requests, both on a NETLINK_SOCK_DIAG socket in the network namespace the
agent runs in (the host's: the DaemonSet uses hostNetwork):

- SOCK_DIAG_BY_FAMILY dump of TCP sockets in SYN-SENT or ESTABLISHED whose
  destination is one of the given `address:port`s, filtered in the kernel
  (inet_diag bytecode, as `ss dst A or dst B` does), each with its tcp_info;
- SOCK_DESTROY of one socket by its id and cookie, as `ss -K` does: the
  kernel aborts it, so a blocked connect() or read() in its owner returns
  ECONNABORTED. It needs CAP_NET_ADMIN and a kernel built with
  CONFIG_INET_DIAG_DESTROY; without them the error says so.

Everything the kernel sends back is parsed defensively: a truncated or odd
message ends the dump with SockDiagError, never with another exception.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
SOCK_DESTROY = 21
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_DUMP = 0x300
NLMSG_ERROR = 2
NLMSG_DONE = 3
INET_DIAG_INFO = 2
INET_DIAG_REQ_BYTECODE = 1
INET_DIAG_BC_JMP = 1
INET_DIAG_BC_D_COND = 8

TCP_ESTABLISHED = 1
TCP_SYN_SENT = 2
STATE_NAMES = {TCP_ESTABLISHED: "ESTABLISHED", TCP_SYN_SENT: "SYN-SENT"}

_NLMSGHDR = struct.Struct("=IHHII")
# inet_diag_sockid: sport, dport (big endian), src[4], dst[4] (big endian words), interface, cookie[2].
_SOCKID = struct.Struct(">HH16s16sI8s")
_SOCKID_COOKIE = struct.Struct("=II")  # cookie words are in host order
_REQ_HEAD = struct.Struct("=BBBBI")  # family, protocol, ext, pad, states
_MSG_HEAD = struct.Struct("=BBBB")  # family, state, timer, retrans
_MSG_TAIL = struct.Struct("=IIIII")  # expires, rqueue, wqueue, uid, inode
_RTA = struct.Struct("=HH")
_BC_OP = struct.Struct("=BBH")  # code, yes, no
_HOSTCOND = struct.Struct("=BBxxi")  # family, prefix_len, (pad), port
# struct tcp_info (uapi/linux/tcp.h): the fields read here and their offsets. Times are milliseconds ago.
_TCP_INFO_LAST_DATA_SENT = (44, struct.Struct("=I"))
_TCP_INFO_LAST_DATA_RECV = (52, struct.Struct("=I"))
_TCP_INFO_BYTES_RECEIVED = (128, struct.Struct("=Q"))  # since Linux 4.1
_TCP_INFO_DATA_SEGS_OUT = (156, struct.Struct("=I"))  # since Linux 4.6
MAX_MESSAGES = 100_000
# Destinations matched exactly by the kernel's filter in one dump; past this, by port only.
MAX_EXACT = 64


class SockDiagError(Exception):
    """The kernel refused a request (errno set), or sent something we cannot read."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.errno = code


@dataclass(frozen=True)
class Destination:
    """An `address:port` connections go to (the mirror's ClusterIP and port)."""

    address: ipaddress.IPv4Address | ipaddress.IPv6Address
    port: int

    @classmethod
    def parse(cls, host: str, port: int) -> Destination | None:
        """The destination of an IP-literal host (brackets allowed), else None: names are not resolved here."""
        try:
            address = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            return None
        if not 0 < port < 65536:
            return None
        return cls(address, port)

    def __str__(self) -> str:
        return f"[{self.address}]:{self.port}" if self.address.version == 6 else f"{self.address}:{self.port}"


@dataclass(frozen=True)
class TcpSocket:
    """One TCP socket of this network namespace, as sock_diag reports it."""

    family: int
    state: int
    source: str
    destination: Destination
    interface: int
    cookie: tuple[int, int]
    inode: int
    retransmits: int  # idiag_retrans: of a SYN-SENT socket, how many times its SYN was sent again
    # From tcp_info (None where the kernel's tcp_info is too old to carry them): milliseconds since the last
    # data was sent / received, bytes received, segments with data sent.
    last_data_sent_ms: int | None
    last_data_recv_ms: int | None
    bytes_received: int | None
    data_segs_out: int | None
    raw_id: bytes  # the inet_diag_sockid as the kernel sent it, for SOCK_DESTROY

    @property
    def awaiting_reply_ms(self) -> int | None:
        """How long a request on this connection has waited for any byte back, or None when nothing waits.

        The peer owes a reply when data went out and none came back yet (a
        new connection's first request, or a TLS ClientHello without the
        ServerHello), or when data went out more recently than any came in
        (the next request on a kept-alive connection). A connection that
        sent nothing, or whose last event was receiving, owes nothing; so
        does one that received in the same millisecond it sent (a fast
        answer, not a stall).
        """
        sent, recv = self.last_data_sent_ms, self.last_data_recv_ms
        if self.state != TCP_ESTABLISHED or sent is None or recv is None or not self.data_segs_out:
            return None
        if self.bytes_received == 0 or sent < recv:
            return sent
        return None


def bytecode(destinations: Iterable[Destination]) -> bytes:
    """inet_diag bytecode accepting a socket whose destination is any of these, laid out as `ss` compiles an OR.

    The kernel's audit walks the "yes" jumps and requires them to step
    through every op in order, so each condition falls through on a match
    and jumps on a miss: `D_COND(dest) JMP(to the end)` per destination, the
    miss of one jumping to the next destination's condition; the last
    condition falls through to the end (accept) or jumps past it (reject).
    """
    conds: list[bytes] = []
    for dest in destinations:
        family = socket.AF_INET if dest.address.version == 4 else socket.AF_INET6
        addr = dest.address.packed
        conds.append(_HOSTCOND.pack(family, len(addr) * 8, dest.port) + addr)
    return _or_chain(conds)


def port_bytecode(family: int, ports: Iterable[int]) -> bytes:
    """inet_diag bytecode accepting a socket whose destination port is any of these, whatever its address."""
    zero = bytes(4 if family == socket.AF_INET else 16)
    return _or_chain([_HOSTCOND.pack(family, 0, port) + zero for port in sorted(set(ports))])


def _or_chain(conds: list[bytes]) -> bytes:
    blocks = []
    for i, cond in enumerate(conds):
        length = _BC_OP.size + len(cond)
        last = i == len(conds) - 1
        blocks.append((length, cond, last))
    total = sum(length + (0 if last else _BC_OP.size) for length, _, last in blocks)
    out = b""
    for length, cond, last in blocks:
        out += _BC_OP.pack(INET_DIAG_BC_D_COND, length, length + _BC_OP.size) + cond
        if not last:
            out += _BC_OP.pack(INET_DIAG_BC_JMP, _BC_OP.size, total - len(out))
    return out


def _rta(kind: int, payload: bytes) -> bytes:
    length = _RTA.size + len(payload)
    return _RTA.pack(length, kind) + payload + b"\0" * ((4 - length % 4) % 4)


def dump_request(family: int, destinations: list[Destination], seq: int) -> bytes:
    """A SOCK_DIAG_BY_FAMILY dump request for TCP sockets of one family in SYN-SENT or ESTABLISHED.

    Up to MAX_EXACT destinations are matched exactly in the kernel; more (a
    mirror with many pods, many mirrors) by port only, the caller matching
    the addresses: the filter stays small whatever the EndpointSlices hold.
    """
    states = (1 << TCP_ESTABLISHED) | (1 << TCP_SYN_SENT)
    body = _REQ_HEAD.pack(family, socket.IPPROTO_TCP, 1 << (INET_DIAG_INFO - 1), 0, states) + b"\0" * _SOCKID.size
    code = bytecode(destinations) if len(destinations) <= MAX_EXACT else port_bytecode(family, (d.port for d in destinations))
    body += _rta(INET_DIAG_REQ_BYTECODE, code)
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + body


def destroy_request(sock: TcpSocket, seq: int) -> bytes:
    """A SOCK_DESTROY request for exactly this socket (its id, cookie included)."""
    body = _REQ_HEAD.pack(sock.family, socket.IPPROTO_TCP, 0, 0, 0xFFFFFFFF) + sock.raw_id
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, seq, 0) + body


def _address(family: int, raw: bytes) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.IPv4Address(raw[:4]) if family == socket.AF_INET else ipaddress.IPv6Address(raw)


def _tcp_info(info: bytes, field: tuple[int, struct.Struct]) -> int | None:
    """One field of a tcp_info the kernel sent (shorter on older kernels: then None)."""
    offset, shape = field
    return int(shape.unpack_from(info, offset)[0]) if len(info) >= offset + shape.size else None


def parse_socket(payload: bytes) -> TcpSocket:
    """One inet_diag_msg (with its attributes). Raises SockDiagError on anything malformed."""
    head = _MSG_HEAD.size + _SOCKID.size + _MSG_TAIL.size
    if len(payload) < head:
        raise SockDiagError(f"inet_diag_msg of {len(payload)} bytes, expected at least {head}")
    family, state, _timer, retrans = _MSG_HEAD.unpack_from(payload, 0)
    if family not in (socket.AF_INET, socket.AF_INET6):
        raise SockDiagError(f"inet_diag_msg of address family {family}")
    raw_id = payload[_MSG_HEAD.size : _MSG_HEAD.size + _SOCKID.size]
    sport, dport, src, dst, interface, raw_cookie = _SOCKID.unpack(raw_id)
    cookie = _SOCKID_COOKIE.unpack(raw_cookie)
    _expires, _rq, _wq, _uid, inode = _MSG_TAIL.unpack_from(payload, _MSG_HEAD.size + _SOCKID.size)
    info = b""
    offset = head
    while offset + _RTA.size <= len(payload):
        length, kind = _RTA.unpack_from(payload, offset)
        if length < _RTA.size or offset + length > len(payload):
            raise SockDiagError(f"attribute of length {length} at {offset} in a message of {len(payload)}")
        if kind == INET_DIAG_INFO:
            info = payload[offset + _RTA.size : offset + length]
        offset += (length + 3) & ~3
    source_address = _address(family, src)
    return TcpSocket(
        family=family,
        state=state,
        source=str(Destination(source_address, sport)),
        destination=Destination(_address(family, dst), dport),
        interface=interface,
        cookie=cookie,
        inode=inode,
        retransmits=retrans,
        last_data_sent_ms=_tcp_info(info, _TCP_INFO_LAST_DATA_SENT),
        last_data_recv_ms=_tcp_info(info, _TCP_INFO_LAST_DATA_RECV),
        bytes_received=_tcp_info(info, _TCP_INFO_BYTES_RECEIVED),
        data_segs_out=_tcp_info(info, _TCP_INFO_DATA_SEGS_OUT),
        raw_id=raw_id,
    )


def parse_messages(data: bytes, seq: int) -> tuple[list[tuple[int, bytes]], bool]:
    """Split one netlink read into (type, payload) of our sequence number; True once NLMSG_DONE or an ack/error came."""
    out: list[tuple[int, bytes]] = []
    offset = 0
    done = False
    while offset + _NLMSGHDR.size <= len(data):
        length, kind, _flags, msg_seq, _pid = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size or offset + length > len(data):
            raise SockDiagError(f"netlink message of length {length} at {offset} in a read of {len(data)}")
        payload = data[offset + _NLMSGHDR.size : offset + length]
        offset += (length + 3) & ~3
        if msg_seq != seq:
            continue  # a late answer to an earlier request
        if kind == NLMSG_DONE:
            done = True
        elif kind == NLMSG_ERROR:
            if len(payload) < 4:
                raise SockDiagError("netlink error message without its code")
            (code,) = struct.unpack_from("=i", payload)
            if code != 0:
                raise SockDiagError(f"{errno.errorcode.get(-code, str(-code))}: {os.strerror(-code)}", -code)
            done = True
        else:
            out.append((kind, payload))
    return out, done


class SockDiag:
    """A NETLINK_SOCK_DIAG socket of the current network namespace; not thread-safe (one owner)."""

    def __init__(self, timeout: float = 1.0) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG)
        self._sock.settimeout(timeout)
        self._sock.bind((0, 0))
        self._seq = 0

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> SockDiag:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        return self._seq

    def _exchange(self, request: bytes, seq: int) -> list[tuple[int, bytes]]:
        try:
            self._sock.send(request)
            messages: list[tuple[int, bytes]] = []
            while True:
                found, done = parse_messages(self._sock.recv(1 << 16), seq)
                messages += found
                if done:
                    return messages
                if len(messages) > MAX_MESSAGES:
                    raise SockDiagError(f"more than {MAX_MESSAGES} sockets in one dump")
        except OSError as exc:
            raise SockDiagError(f"netlink: {exc}", exc.errno) from exc

    def connections(self, destinations: Iterable[Destination]) -> list[TcpSocket]:
        """This namespace's TCP sockets in SYN-SENT or ESTABLISHED to any of these destinations."""
        by_family: dict[int, list[Destination]] = {}
        for dest in set(destinations):
            by_family.setdefault(socket.AF_INET if dest.address.version == 4 else socket.AF_INET6, []).append(dest)
        found: list[TcpSocket] = []
        wanted = {d for ds in by_family.values() for d in ds}
        for family, dests in sorted(by_family.items()):
            seq = self._next_seq()
            for kind, payload in self._exchange(dump_request(family, sorted(dests, key=str), seq), seq):
                if kind != SOCK_DIAG_BY_FAMILY:
                    continue
                sock = parse_socket(payload)
                # The kernel filtered already; checking again costs nothing and guards against a filter it ignored.
                if sock.destination in wanted and sock.state in STATE_NAMES:
                    found.append(sock)
        return found

    def destroy(self, sock: TcpSocket) -> None:
        """Abort this socket. ENOENT (it is gone already) is success; anything else raises SockDiagError."""
        seq = self._next_seq()
        try:
            self._exchange(destroy_request(sock, seq), seq)
        except SockDiagError as exc:
            if exc.errno != errno.ENOENT:
                raise
