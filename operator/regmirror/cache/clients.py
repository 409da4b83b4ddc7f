"""Which clients pulled through this mirror lately: request-side evidence that nodes use it.

A mirror that no node uses looks exactly like a mirror that works. The front
(Varnish) sees every pull: the `front-stats` container lists the client
addresses of manifest requests (one per pull, at its start) from Varnish's
shared-memory log every few seconds (`varnishncsa -d`, render/cache.py), and
the sidecar keeps, per address, when it was last seen, for WINDOW_SECONDS.
The agent's health probes ask `/v2/` only, so they never count as pulls.

The operator maps addresses to nodes (regmirror/nodeusage.py) and writes how
many selected nodes pulled through the mirror in the window, naming a few
that did not. Undercounting is possible (a request log that wraps between two
reads under very heavy traffic, a TLS mirror without a front), overcounting
is not: an address is listed only if a manifest request came from it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from typing import Any

WINDOW_SECONDS = 24 * 3600.0
MAX_CLIENTS = 10_000  # a bound on memory and on /stats, far above any cluster's node count


def parse_addresses(text: str) -> set[str]:
    """The IP addresses in `text`, one per line (anything else is skipped), in their canonical spelling."""
    found = set()
    for line in text.splitlines()[: MAX_CLIENTS * 4]:
        token = line.strip().split(" ", 1)[0]
        try:
            found.add(str(ipaddress.ip_address(token)))
        except ValueError:
            continue
    return found


class ClientsSeen:
    """address -> when it was last seen pulling, pruned to the window."""

    def __init__(self, seen: Mapping[str, float] | None = None, window: float = WINDOW_SECONDS) -> None:
        self.window = window
        self.seen: dict[str, float] = {}
        for address, when in (seen or {}).items():
            if isinstance(when, (int, float)) and parse_addresses(address) == {address}:
                self.seen[address] = float(when)

    def observe(self, addresses: Iterable[str], now: float) -> bool:
        """Record a read of the front's list; returns whether anything changed."""
        changed = False
        for address in addresses:
            if self.seen.get(address) != now:
                self.seen[address] = now
                changed = True
        return self.prune(now) or changed

    def prune(self, now: float) -> bool:
        """Forget addresses not seen within the window, and the oldest beyond MAX_CLIENTS."""
        before = len(self.seen)
        self.seen = {a: t for a, t in self.seen.items() if now - t <= self.window}
        if len(self.seen) > MAX_CLIENTS:
            newest = sorted(self.seen.items(), key=lambda kv: kv[1], reverse=True)[:MAX_CLIENTS]
            self.seen = dict(newest)
        return len(self.seen) != before

    def summary(self, now: float, rfc3339: Any) -> dict[str, Any]:
        """The /stats document part: the window and every address seen in it with when (newest first)."""
        self.prune(now)
        ordered = sorted(self.seen.items(), key=lambda kv: (-kv[1], kv[0]))
        return {"windowSeconds": int(self.window), "seen": [{"address": a, "lastSeen": rfc3339(t)} for a, t in ordered]}
