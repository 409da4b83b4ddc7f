"""The one way tests wait for something, and the one way they pick a free port.

Tests wait for the condition they need, never for a fixed time: ``wait_for`` polls
a predicate (quickly at first, then every ``interval`` seconds) and returns its
first truthy value, or fails with ``WaitTimeout`` naming what it waited for.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

#: The first poll comes this soon; the pause then grows by half each round up to ``interval``.
FIRST_POLL_SECONDS = 0.02


class WaitTimeout(AssertionError):
    """A condition did not hold in time: the behaviour under test did not happen."""


def wait_for(
    predicate: Callable[[], T | None],
    timeout: float = 60.0,
    what: str = "condition",
    *,
    interval: float = 0.25,
    diagnose: Callable[[], str] | None = None,
) -> T:
    """Poll ``predicate`` until it returns something truthy, and return that value.

    Exceptions from the predicate propagate (a predicate that may fail for a while, e.g.
    while the API server restarts, catches them itself). On timeout raises ``WaitTimeout``
    with ``what`` and, if given, the text ``diagnose()`` returns (a log tail, a status).
    """
    deadline = time.monotonic() + timeout
    pause = min(FIRST_POLL_SECONDS, interval)
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            detail = f"\n{diagnose()}" if diagnose is not None else ""
            raise WaitTimeout(f"timed out after {timeout:g}s waiting for {what}{detail}")
        time.sleep(min(pause, max(0.0, deadline - time.monotonic())) or FIRST_POLL_SECONDS)
        pause = min(pause * 1.5, interval)


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct free TCP ports on ``host`` (held open together, so none repeats)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((host, 0))
            sockets.append(sock)
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


def free_port(host: str = "127.0.0.1") -> int:
    """One free TCP port on ``host``."""
    return free_ports(1, host)[0]
