"""status.cache and the cache's pins, evaluated with no I/O: the seams the operator core wires.

- `pinned_digests(pods, hosts)`: the manifest digests of images running pods use
  that come from this mirror's hosts (status.containerStatuses[].imageID), for
  the mirror ConfigMap's pins.json (render/cache.py).
- `merge_reports(reports, replicas, stale)`: one report for the whole mirror
  from each replica's last /stats (untrusted JSON): counters summed, state
  combined (controller/cache.py polls the replicas).
- `next_cache_status(report, previous, last_write, now)`: what to write into
  status.cache from the sidecar's /stats (untrusted JSON), or None: nothing
  when nothing changed (a quiet cluster costs no write), counters at most every
  MIN_WRITE_SECONDS, state changes (an eviction, the upstream flipping, prewarm
  progress, the cap exceeded, a replica not answering) at once.
- `invalidation_requests(annotation)`: the `regmirror.dev/invalidate`
  annotation (untrusted JSON) as the mirror ConfigMap's invalidate.json.
"""

from __future__ import annotations

import json
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


def pod_image_ids(pod: Mapping[str, Any]) -> list[str]:
    """The imageIDs with a digest of a running (or starting) pod's containers; none for a finished pod."""
    status = pod.get("status") or {}
    if not isinstance(status, Mapping) or status.get("phase") in ("Succeeded", "Failed"):
        return []
    ids: set[str] = set()
    for key in ("initContainerStatuses", "containerStatuses", "ephemeralContainerStatuses"):
        for cs in status.get(key) or []:
            image_id = cs.get("imageID") if isinstance(cs, Mapping) else None
            if isinstance(image_id, str) and _DIGEST.search(image_id):
                ids.add(image_id)
    return sorted(ids)


def digests_by_registry(image_ids: Iterable[str]) -> dict[str, set[str]]:
    """Registry host -> the manifest digests of these imageIDs (one pass over every pod, for every mirror)."""
    index: dict[str, set[str]] = {}
    for image_id in image_ids:
        match = _DIGEST.search(image_id)
        if match:
            index.setdefault(image_registry(image_id), set()).add(match.group(1))
    return index


def pins_of(index: Mapping[str, Iterable[str]], hosts: Iterable[str]) -> frozenset[str]:
    """A mirror's pins from `digests_by_registry`'s index: the digests of its hosts' images."""
    return frozenset(d for h in {normalize_registry_host(h) for h in hosts} for d in index.get(h, ()))


def pinned_digests(pods: Iterable[Mapping[str, Any]], hosts: Iterable[str]) -> set[str]:
    """Digests of the images running (or starting) pods use from these registry hosts."""
    return set(pins_of(digests_by_registry(i for pod in pods for i in pod_image_ids(pod)), hosts))


def _count(report: Mapping[str, Any], key: str) -> int:
    value = report.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


# status.cache's counters as written (JSON names): progress, like node counts. Everything else in
# it (the upstream's verdict, an eviction, pins, prewarm, the cap, replicas not answering) is news.
_COUNTER_KEYS = frozenset(str(CacheStatus.model_fields[f].alias) for f in (*_COUNTERS, "observed_at"))


def cache_state(cache: Any) -> dict[str, Any] | None:
    """status.cache (JSON, as written) without its counters: what the status writer must not hold back."""
    if not isinstance(cache, Mapping):
        return None
    return {key: value for key, value in cache.items() if key not in _COUNTER_KEYS}


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
        replicas=_count(report, "replicas"),
        stale_replicas=_count(report, "staleReplicas"),
    )


_SUMMED = ("hits", "misses", "bytesServed", "bytesFromUpstream", "diskUsed", "diskCap")


def merge_reports(reports: Iterable[Any], replicas: int, stale: int) -> dict[str, Any]:
    """One /stats-shaped report for a mirror from its replicas' last reports (untrusted; never raises).

    Counters and disk figures add up (each replica counts its own requests and, unless the
    storage is a shared bucket, where both are 0, has its own volume and cap); pinned images
    are the same pins on every replica (the largest count); the upstream is reachable only
    when every replica that knows says so; the most recent eviction wins; prewarm shows the
    replica furthest behind; `observedAt` is the oldest figure's time, so it never overstates
    freshness.
    """
    docs = [r for r in reports if isinstance(r, Mapping)]
    out: dict[str, Any] = {key: sum(_count(r, key) for r in docs) for key in _SUMMED}
    out["pinnedImages"] = max((_count(r, "pinnedImages") for r in docs), default=0)
    verdicts = [r.get("upstreamReachable") for r in docs if isinstance(r.get("upstreamReachable"), bool)]
    if False in verdicts:
        out["upstreamReachable"] = False
    else:
        out["upstreamReachable"] = True if verdicts and len(verdicts) == len(docs) else None
    evictions = [e for r in docs if isinstance(e := r.get("lastEviction"), Mapping) and isinstance(e.get("time"), str)]
    out["lastEviction"] = max(evictions, key=lambda e: str(e["time"]), default=None)
    prewarms = [p for r in docs if isinstance(p := r.get("prewarm"), Mapping)]
    if prewarms:
        out["prewarm"] = min(prewarms, key=lambda p: (_count(p, "ready"), -_count(p, "pending")))
    times = [t for r in docs if isinstance(t := r.get("observedAt"), str)]
    out["observedAt"] = min(times, default=None)
    out["replicas"], out["staleReplicas"] = replicas, stale
    return out


# The annotation is user input: bounded before it reaches a ConfigMap (and the sidecar, which
# also rejects references that are not repository:tag).
MAX_INVALIDATIONS = 100
MAX_INVALIDATION_LENGTH = 300


def invalidation_requests(annotation: str | None) -> dict[str, str]:
    """The `regmirror.dev/invalidate` annotation (a JSON object: reference -> request id) as the sidecar's input.

    Malformed JSON or entries that are not short strings are left out (nothing to apply);
    at most MAX_INVALIDATIONS, the most recent request ids first.
    """
    try:
        doc = json.loads(annotation) if annotation else {}
    except ValueError:
        return {}
    if not isinstance(doc, dict):
        return {}
    entries = [
        (ref, request_id)
        for ref, request_id in doc.items()
        if isinstance(request_id, str) and 0 < len(ref) <= MAX_INVALIDATION_LENGTH and 0 < len(request_id) <= MAX_INVALIDATION_LENGTH
    ]
    entries.sort(key=lambda e: (e[1], e[0]), reverse=True)
    return dict(sorted(entries[:MAX_INVALIDATIONS]))


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
