"""status.cache and the cache's pins, evaluated with no I/O: the seams the operator core wires.

- `pinned_digests(pods, hosts)`: the manifest digests of images running pods use
  that come from this mirror's hosts (status.containerStatuses[].imageID), for
  the `-cache` ConfigMap's pins.json (render/cache.py).
- `next_cache_status(report, previous, last_write, now)`: what to write into
  status.cache from the sidecar's /stats (untrusted JSON), or None: nothing
  when nothing changed (a quiet cluster costs no write), counters at most every
  MIN_WRITE_SECONDS, state changes (an eviction, the upstream flipping, prewarm
  progress, the cap exceeded) at once.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from regmirror import constants as c
from regmirror.models import CacheEviction, CacheStatus, PrewarmStatus, normalize_registry_host

MIN_WRITE_SECONDS = 60.0
_DIGEST = re.compile(r"@(sha256:[a-f0-9]{64})$")
_COUNTERS = ("hits", "misses", "hit_ratio", "bytes_served", "bytes_from_upstream", "disk_used")


def image_registry(image: str) -> str:
    """Registry host of an image reference or imageID (docker.io when the first part is not a host)."""
    image = image.split("://", 1)[-1]
    first, slash, _ = image.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        return normalize_registry_host(first)
    return c.DOCKER_HUB_NAME


def pinned_digests(pods: Iterable[Mapping[str, Any]], hosts: Iterable[str]) -> set[str]:
    """Digests of the images running (or starting) pods use from these registry hosts."""
    wanted = {normalize_registry_host(h) for h in hosts}
    pins: set[str] = set()
    for pod in pods:
        status = pod.get("status") or {}
        if status.get("phase") in ("Succeeded", "Failed"):
            continue
        for key in ("initContainerStatuses", "containerStatuses", "ephemeralContainerStatuses"):
            for cs in status.get(key) or []:
                image_id = cs.get("imageID") if isinstance(cs, Mapping) else None
                if not isinstance(image_id, str):
                    continue
                match = _DIGEST.search(image_id)
                if match and image_registry(image_id) in wanted:
                    pins.add(match.group(1))
    return pins


def _count(report: Mapping[str, Any], key: str) -> int:
    value = report.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def parse_report(report: Mapping[str, Any]) -> CacheStatus:
    """The sidecar's /stats as a CacheStatus; anything malformed reads as absent or zero."""
    hits, misses = _count(report, "hits"), _count(report, "misses")
    eviction = report.get("lastEviction")
    last = None
    if isinstance(eviction, Mapping) and isinstance(eviction.get("time"), str) and eviction.get("reason") in ("SizeCap", "TTL"):
        last = CacheEviction(
            time=eviction["time"], reason=eviction["reason"], blobs=_count(eviction, "blobs"), bytes=_count(eviction, "bytes")
        )
    pre = report.get("prewarm")
    prewarm = None
    if isinstance(pre, Mapping):
        failed = [str(f)[:300] for f in pre.get("failed") or [] if isinstance(f, str)][:10]
        prewarm = PrewarmStatus(images=_count(pre, "images"), ready=_count(pre, "ready"), pending=_count(pre, "pending"), failed=failed)
    reachable = report.get("upstreamReachable")
    observed = report.get("observedAt")
    return CacheStatus(
        hits=hits,
        misses=misses,
        hit_ratio=f"{hits / (hits + misses):.3f}" if hits + misses else None,
        bytes_served=_count(report, "bytesServed"),
        bytes_from_upstream=_count(report, "bytesFromUpstream"),
        disk_used=_count(report, "diskUsed"),
        disk_cap=_count(report, "diskCap"),
        pinned_images=_count(report, "pinnedImages"),
        upstream_reachable=reachable if isinstance(reachable, bool) else None,
        last_eviction=last,
        prewarm=prewarm,
        observed_at=observed if isinstance(observed, str) else None,
    )


def next_cache_status(report: Mapping[str, Any], previous: CacheStatus | None, last_write: float | None, now: float) -> CacheStatus | None:
    """The status.cache to write now, or None."""
    current = parse_report(report)
    if previous is None:
        return current
    ignore = {"observed_at"}
    if current.model_dump(exclude=ignore) == previous.model_dump(exclude=ignore):
        return None
    counters_only = current.model_dump(exclude=ignore | set(_COUNTERS)) == previous.model_dump(exclude=ignore | set(_COUNTERS))
    if counters_only and last_write is not None and now - last_write < MIN_WRITE_SECONDS:
        return None
    return current
