"""Prewarming: fetch listed images through the front before any node asks, and again when a tag moves.

Pacing: before each image the upstream is asked with a HEAD (no pull on
Docker Hub's count) for the manifest's digest and the `ratelimit-remaining`
header. While fewer than RESERVE_PERCENT of the window's pulls remain (and at
least RESERVE_MIN), prewarming waits, leaving them to the cluster's own pulls.
A tag is checked again every REFRESH_SECONDS; only a moved tag is fetched.
"""

from __future__ import annotations

import json
import re
import time
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from regmirror.cache.upstream import MANIFEST_ACCEPT, USER_AGENT, Head, RateLimit

REFRESH_SECONDS = 600.0
RETRY_SECONDS = 60.0
# A fetch that failed locally (the front not up yet: its container starts next to this one).
FETCH_RETRY_SECONDS = 5.0
RESERVE_PERCENT = 20
RESERVE_MIN = 5
MANIFEST_INTERVAL_SECONDS = 1.0
READY, PENDING, WAITING, FAILED = "Ready", "Pending", "WaitingForRateLimit", "Failed"
_DIGEST = re.compile(r"^sha256:[a-f0-9]{64}$")


@dataclass(frozen=True)
class Wanted:
    """One spec.prewarm entry, resolved against the upstream."""

    image: str  # as the user wrote it
    repository: str
    reference: str  # tag or digest
    platforms: tuple[str, ...] = ()

    @property
    def is_digest(self) -> bool:
        """Pinned by digest: never changes, fetched once."""
        return bool(_DIGEST.match(self.reference))


def parse_wanted(image: str, hosts: Iterable[str], platforms: Iterable[str] = ()) -> Wanted:
    """repository and reference of `image` on this upstream (host stripped, Docker Hub's library/ added)."""
    rest = image
    first, slash, remainder = image.partition("/")
    host_list = list(hosts)
    if slash and first in host_list:
        rest = remainder
    digest = ""
    if "@" in rest:
        rest, digest = rest.split("@", 1)
    tag = ""
    name = rest
    if ":" in rest.rsplit("/", 1)[-1]:
        name, tag = rest.rsplit(":", 1)
    if "docker.io" in host_list and "/" not in name:
        name = f"library/{name}"
    return Wanted(image, name, digest or tag or "latest", tuple(platforms))


def platform_of(entry: Mapping[str, Any]) -> str:
    """os/arch[/variant] of an index entry."""
    plat = entry.get("platform") or {}
    parts = [str(plat.get("os", "")), str(plat.get("architecture", ""))]
    if plat.get("variant"):
        parts.append(str(plat["variant"]))
    return "/".join(parts)


def children_to_fetch(doc: Mapping[str, Any], platforms: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """(child manifests, blobs) a manifest or index references, for the wanted platforms (all when none)."""
    manifests, blobs = [], []
    for entry in doc.get("manifests") or []:
        if not isinstance(entry, dict) or not isinstance(entry.get("digest"), str):
            continue
        if platforms and platform_of(entry) not in platforms:
            continue
        manifests.append(entry["digest"])
    config = doc.get("config")
    if isinstance(config, dict) and isinstance(config.get("digest"), str):
        blobs.append(config["digest"])
    for layer in doc.get("layers") or []:
        if isinstance(layer, dict) and isinstance(layer.get("digest"), str):
            blobs.append(layer["digest"])
    return manifests, blobs


def may_pull(rate: RateLimit | None) -> bool:
    """Whether the upstream's remaining budget leaves room for a prewarm pull."""
    if rate is None:
        return True
    reserve = max(RESERVE_MIN, rate.limit * RESERVE_PERCENT // 100)
    return rate.remaining > reserve


@dataclass
class ImageState:
    """Progress of one prewarmed image."""

    status: str = PENDING
    digest: str | None = None
    message: str = ""
    next_check: float = 0.0


@dataclass
class Prewarmer:
    """Fetches the wanted images through the front, one at a time, paced by the upstream's budget."""

    front: str
    head: Callable[[str, str], Head]
    ban_tag: Callable[[str, str], None]
    wanted: list[Wanted] = field(default_factory=list)
    states: dict[str, ImageState] = field(default_factory=dict)
    timeout: float = 300.0

    def set_wanted(self, wanted: list[Wanted]) -> None:
        """Replace the list; progress of images still listed is kept."""
        self.wanted = wanted
        keep = {w.image for w in wanted}
        self.states = {k: v for k, v in self.states.items() if k in keep}
        for w in wanted:
            self.states.setdefault(w.image, ImageState())

    def summary(self) -> dict[str, Any]:
        """status.cache.prewarm."""
        states = [self.states[w.image] for w in self.wanted]
        failed = [f"{w.image}: {self.states[w.image].message}" for w in self.wanted if self.states[w.image].status == FAILED]
        return {
            "images": len(states),
            "ready": sum(1 for s in states if s.status == READY),
            "pending": sum(1 for s in states if s.status in (PENDING, WAITING)),
            "failed": failed[:10],
        }

    def step(self, now: float) -> bool:
        """Work on the first image that is due; False when none was (or the budget says wait)."""
        for wanted in self.wanted:
            state = self.states[wanted.image]
            if state.next_check > now:
                continue
            head = self.head(wanted.repository, wanted.reference)
            if not may_pull(head.rate_limit):
                window = head.rate_limit.window_seconds if head.rate_limit else 0
                state.status, state.message = WAITING, "the upstream's pull budget is nearly used"
                # Every image waits: the budget is the upstream's, not the image's.
                for other in self.states.values():
                    other.next_check = max(other.next_check, now + min(max(window, RETRY_SECONDS), REFRESH_SECONDS))
                return False
            if head.status != 200 or not head.digest:
                state.status = FAILED if head.status in (401, 403, 404) else PENDING
                state.message = f"upstream answered {head.status or 'nothing'} for {wanted.repository}:{wanted.reference}"
                state.next_check = now + RETRY_SECONDS
                return True
            if state.status == READY and state.digest == head.digest:
                state.next_check = now + (float("inf") if wanted.is_digest else REFRESH_SECONDS)
                continue
            if state.digest is not None and state.digest != head.digest and not wanted.is_digest:
                # The tag moved: a front holding it for cache.tagFreshness must let it go.
                self.ban_tag(wanted.repository, wanted.reference)
            try:
                self._fetch(wanted)
            except (OSError, ValueError) as exc:
                state.status, state.message = PENDING, f"fetch failed: {exc}"[:200]
                state.next_check = now + FETCH_RETRY_SECONDS
                return True
            state.status, state.digest, state.message = READY, head.digest, ""
            state.next_check = now + (float("inf") if wanted.is_digest else REFRESH_SECONDS)
            return True
        return False

    def _get(self, path: str, accept: str | None = None) -> bytes | None:
        headers = {"User-Agent": USER_AGENT}
        if accept:
            headers["Accept"] = accept
        req = urllib.request.Request(f"{self.front}{path}", headers=headers)
        with urllib.request.urlopen(req, timeout=self.timeout) as resp:
            if accept:
                return bytes(resp.read(4 << 20))
            while resp.read(1 << 20):
                pass
            return None

    def _fetch(self, wanted: Wanted) -> None:
        base = f"/v2/{wanted.repository}"
        top = self._get(f"{base}/manifests/{wanted.reference}", MANIFEST_ACCEPT)
        docs = [json.loads(top or b"{}")]
        blobs: list[str] = []
        while docs:
            doc = docs.pop()
            manifests, layer_blobs = children_to_fetch(doc, wanted.platforms)
            blobs += layer_blobs
            for digest in manifests:
                time.sleep(MANIFEST_INTERVAL_SECONDS)
                docs.append(json.loads(self._get(f"{base}/manifests/{digest}", MANIFEST_ACCEPT) or b"{}"))
        for digest in dict.fromkeys(blobs):
            self._get(f"{base}/blobs/{digest}")
