"""Dead mirrors for fail-open tests: refused (process gone), blackholed (packets dropped), hanging (accepts, never answers)."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator

from harness.dataplane.registry import Registry


class HangingListener:
    """A TCP port that accepts connections and never answers (a wedged mirror)."""

    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(64)
        self.sock.settimeout(0.2)
        self.conns: list[socket.socket] = []
        self._halt = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self._halt.is_set():
            try:
                conn, _ = self.sock.accept()
                self.conns.append(conn)
            except (TimeoutError, OSError):
                continue

    def close(self) -> None:
        self._halt.set()
        self.thread.join(2)
        for conn in self.conns:
            conn.close()
        self.sock.close()


def iptables_usable() -> bool:
    """Whether this process may add iptables rules (root, and the tool works in this network namespace)."""
    return bool(shutil.which("iptables")) and subprocess.run(["iptables", "-S", "OUTPUT"], capture_output=True, check=False).returncode == 0


@contextlib.contextmanager
def blackholed(host: str, port: int) -> Iterator[None]:
    """Drop every packet to host:port (a dead node behind a still-listed endpoint): connects hang until they time out."""
    rule = ["OUTPUT", "-d", host, "-p", "tcp", "--dport", str(port), "-j", "DROP"]
    subprocess.run(["iptables", "-I", *rule], check=True, capture_output=True)
    try:
        yield
    finally:
        subprocess.run(["iptables", "-D", *rule], check=False, capture_output=True)


@contextlib.contextmanager
def dead_mirror(kind: str, registry: Registry) -> Iterator[None]:
    """Take a running mirror down: refused (process gone), blackholed (packets dropped), hanging (accepts, never answers)."""
    registry.stop()
    listener = HangingListener(registry.host, registry.port) if kind == "hanging" else None
    try:
        if kind == "blackholed":
            with blackholed(registry.host, registry.port):
                yield
        else:
            yield
    finally:
        if listener is not None:
            listener.close()
