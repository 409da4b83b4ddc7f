"""A loopback HTTP(S) server that plays a scripted answer per request and records what it received.

For tests of clients facing hostile upstreams: the script decides every byte
(garbage, slow trickles, hangs, any header), and `received` shows what the
client really sent (for example whether credentials reached a host).

    with ScriptedServer() as server:
        server.reply = lambda req: [http_response(401, [("WWW-Authenticate", 'Basic realm="x"')])]
        ...
        server.settle()
        assert all(r.authorization is None for r in server.received)

A script is an iterable of steps: bytes are sent, a number pauses that many
seconds (math.inf: until the client leaves). The server stops pausing when
the client closes its side or the server stops.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import math
import select
import socket
import socketserver
import ssl
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any

MAX_HEAD = 64 * 1024


@dataclass(frozen=True)
class Request:
    """One request as received: the raw head and its parsed request line and headers (lower-case names)."""

    head: bytes
    method: str
    target: str
    headers: dict[str, str]

    @property
    def authorization(self) -> str | None:
        """The Authorization header, if the client sent one."""
        return self.headers.get("authorization")


Script = Iterable[bytes | float]


def http_response(status: int, headers: Iterable[tuple[str, str]] = (), body: bytes = b"") -> bytes:
    """A complete HTTP/1.1 response; header names and values are sent as given (UTF-8), hostile ones included."""
    lines = [f"HTTP/1.1 {status} Scripted"] + [f"{k}: {v}" for k, v in headers] + [f"Content-Length: {len(body)}", "Connection: close"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogatepass") + body


def _parse(head: bytes) -> Request:
    text = head.decode("latin-1")
    first, _, rest = text.partition("\r\n")
    method, _, target = first.partition(" ")
    headers = {}
    for line in rest.split("\r\n"):
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return Request(head, method, target.rpartition(" ")[0] or target, headers)


class _Handler(socketserver.BaseRequestHandler):
    server: ScriptedServer

    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.settimeout(5)
        try:
            try:
                if self.server.tls is not None:
                    sock = self.server.tls.wrap_socket(sock, server_side=True)
                head = _read_head(sock)
            finally:
                self.server.done_reading()
            if head:
                request = _parse(head)
                self.server.received.append(request)
                for step in self.server.reply(request):
                    if isinstance(step, bytes):
                        sock.sendall(step)
                    elif not self.server.pause(sock, step):
                        return
        except OSError:  # ssl.SSLError included: a client that is gone or speaks no TLS
            pass
        finally:
            sock.close()


def _read_head(sock: socket.socket) -> bytes:
    head = b""
    while b"\r\n\r\n" not in head and len(head) < MAX_HEAD:
        chunk = sock.recv(4096)
        if not chunk:
            break
        head += chunk
    return head


class ScriptedServer(socketserver.ThreadingTCPServer):
    """A threaded loopback server; `tls` makes it HTTPS. Use as a context manager (it stops on exit)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, tls: ssl.SSLContext | None = None, host: str = "127.0.0.1") -> None:
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host, 0), _Handler)
        self.tls = tls
        self.received: list[Request] = []
        self.reply: Callable[[Request], Script] = lambda _req: [http_response(404)]
        self.errors: list[BaseException] = []  # raised by scripts: a broken test, reported by settle()
        self._stopping = threading.Event()
        self._reading = 0  # connections accepted (or being accepted) whose request head is not read yet
        self._cond = threading.Condition()

    @property
    def port(self) -> int:
        """The port it listens on."""
        port: int = self.server_address[1]
        return port

    @property
    def url(self) -> str:
        """Its base URL (https when it serves TLS)."""
        host = self.server_address[0]
        host = f"[{host}]" if ":" in host else host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    def get_request(self) -> tuple[socket.socket, object]:
        with self._cond:
            self._reading += 1  # before accept: settle() never sees a connection in no state at all
        try:
            return super().get_request()
        except OSError:
            self.done_reading()
            raise

    def done_reading(self) -> None:
        """Called by a handler once its request head is read (or cannot be)."""
        with self._cond:
            self._reading -= 1
            self._cond.notify_all()

    def handle_error(self, request: object, client_address: object) -> None:
        self.errors.append(sys.exc_info()[1] or RuntimeError("unknown"))

    def settle(self, limit: float = 10.0) -> None:
        """Wait until every connection a client made so far has been accepted and its request recorded.

        Raises when a script failed: the client then saw a broken server, not the scripted one.
        """
        end = time.monotonic() + limit
        while time.monotonic() < end:
            pending, _, _ = select.select([self.socket], [], [], 0)
            with self._cond:
                if not pending and self._reading == 0:
                    if self.errors:
                        raise AssertionError(f"a script raised: {self.errors[0]!r}") from self.errors[0]
                    return
                self._cond.wait(0.01)
        raise TimeoutError("the scripted server did not settle")

    def pause(self, sock: socket.socket, seconds: float) -> bool:
        """Wait `seconds` (inf: forever); False as soon as the client has left or the server stops."""
        end = time.monotonic() + seconds if math.isfinite(seconds) else math.inf
        while not self._stopping.is_set():
            left = end - time.monotonic()
            if left <= 0:
                return True
            readable, _, _ = select.select([sock], [], [], min(left, 0.05))
            if readable:  # the client sends nothing after its request: this is its close
                return False
        return False

    def __enter__(self) -> ScriptedServer:
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self._stopping.set()
        self.shutdown()
        self.server_close()


LOOPBACK_NAMES = {"127.0.0.1", "::1", "localhost"}


@contextlib.contextmanager
def loopback_only() -> Iterator[None]:
    """Name resolution that answers only for loopback, so generated hosts never reach a DNS server or a NIC."""
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else host
        if name not in LOOPBACK_NAMES:
            raise socket.gaierror(socket.EAI_NONAME, f"{name!r} is not loopback (tests resolve nothing else)")
        return real(host, *args, **kwargs)

    socket.getaddrinfo = getaddrinfo  # type: ignore[assignment]
    try:
        yield
    finally:
        socket.getaddrinfo = real  # type: ignore[assignment]


@dataclass(frozen=True)
class TLSMaterials:
    """A throw-away CA and a server context whose certificate it signed (for 127.0.0.1, ::1 and localhost)."""

    ca_pem: bytes
    ca_der: bytes
    server: ssl.SSLContext


def make_tls(tmp: str) -> TLSMaterials:
    """Generate the CA and serving certificate (ECDSA: instant) and write the key pair under `tmp`."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: str, signer: ec.EllipticCurvePrivateKey, ca: bool) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            names: list[x509.GeneralName] = [x509.DNSName("localhost")]
            names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ("127.0.0.1", "::1")]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return builder.sign(signer, hashes.SHA256())

    ca_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = cert("scripted-ca", ca_key, "scripted-ca", ca_key, True)
    leaf = cert("scripted-server", leaf_key, "scripted-ca", ca_key, False)
    crt, key = f"{tmp}/server.crt", f"{tmp}/server.key"
    with open(crt, "wb") as f:
        f.write(leaf.public_bytes(serialization.Encoding.PEM))
    with open(key, "wb") as f:
        f.write(leaf_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(crt, key)
    return TLSMaterials(ca.public_bytes(serialization.Encoding.PEM), ca.public_bytes(serialization.Encoding.DER), context)
