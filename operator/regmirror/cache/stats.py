"""The cache's figures from the counters its parts keep (no I/O).

- distribution's Prometheus text: `registry_proxy_{hits,misses,pulled_bytes,pushed_bytes}_total{type=blob|manifest}`;
  a proxy miss is a fetch from the upstream, its bytes are bytes from the upstream;
- Varnish's `varnishstat -j`: `MAIN.cache_hit` counts requests the front answered
  from its store (including nodes that waited on a fetch in flight), and
  `MAIN.s_resp_bodybytes` the bytes it sent.

hits = front hits + registry hits (served from the volume); misses = registry
misses. Without a front (HTTPS mirrors) the registry's own counters are all.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass

_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?P<labels>[^}]*)\})?\s+(?P<value>[0-9.eE+-]+)")


@dataclass(frozen=True)
class Figures:
    """What the cache did since its pod started."""

    hits: int = 0
    misses: int = 0
    bytes_served: int = 0
    bytes_from_upstream: int = 0

    def as_dict(self) -> dict[str, int]:
        """camelCase keys, as in status.cache."""
        return {"hits": self.hits, "misses": self.misses, "bytesServed": self.bytes_served, "bytesFromUpstream": self.bytes_from_upstream}


def parse_prometheus(text: str) -> dict[tuple[str, str], float]:
    """(metric name, type label) -> value, for the proxy counters."""
    out: dict[tuple[str, str], float] = {}
    for line in text.splitlines():
        if not line.startswith("registry_proxy_"):
            continue
        match = _SAMPLE.match(line)
        if not match:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match["labels"] or ""))
        try:
            out[(match["name"], labels.get("type", ""))] = float(match["value"])
        except ValueError:
            continue
    return out


def _proxy(counters: Mapping[tuple[str, str], float], what: str) -> int:
    return int(sum(v for (name, _), v in counters.items() if name in (f"registry_proxy_{what}_total", f"registry_proxy_{what}")))


def varnish_counter(doc: Mapping[str, object], name: str) -> int:
    """One counter of `varnishstat -j` (7.x nests them under "counters"; 6.x kept them at the top)."""
    counters = doc.get("counters", doc)
    entry = counters.get(name) if isinstance(counters, dict) else None
    value = entry.get("value") if isinstance(entry, dict) else None
    return int(value) if isinstance(value, (int, float)) else 0


def combine(registry_metrics: str, varnish_json: str | None) -> Figures:
    """Figures from the registry's /metrics and (with a front) the front's counters."""
    proxy = parse_prometheus(registry_metrics)
    misses = _proxy(proxy, "misses")
    registry_hits = _proxy(proxy, "hits")
    from_upstream = _proxy(proxy, "pulled_bytes")
    if varnish_json is None:
        return Figures(registry_hits, misses, _proxy(proxy, "pushed_bytes"), from_upstream)
    try:
        doc = json.loads(varnish_json)
    except ValueError:
        doc = {}
    if not isinstance(doc, dict):
        doc = {}
    return Figures(
        hits=varnish_counter(doc, "MAIN.cache_hit") + registry_hits,
        misses=misses,
        bytes_served=varnish_counter(doc, "MAIN.s_resp_bodybytes"),
        bytes_from_upstream=from_upstream,
    )


def figures_dict(figures: Figures) -> dict[str, int]:
    """Plain dict (snake_case), for JSON state."""
    return asdict(figures)
