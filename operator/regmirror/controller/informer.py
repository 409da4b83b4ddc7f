"""List + watch one collection into a dict, and say what changed: a small informer.

Why not Kopf's watches and indices (read in kopf 1.45: `_cogs/clients/watching.py`,
`_core/engines/indexing.py`): an index entry is dropped only on a DELETED event,
and a re-list after "410 Gone" (e.g. after an API server restart) replays what
exists as new events, never what vanished, so an object deleted while the
operator could not watch stays in the index for good: the ghost children of
issue 11. And a watch request that fails with 5xx/403 after its 9 attempts
escapes `continuous_watch`, which only swallows connection errors.

So here:
- the first list and every re-list REPLACE the store: an object missing from
  a list is reported as deleted; a list is read in pages of `page_size`
  objects, each slimmed before the next is read;
- a watch resumes from the last resourceVersion; "410 Gone" (or any other
  API error) leads to a re-list; every failure is retried forever with
  jittered backoff capped at 5 s (a few cheap requests while the API server is
  away, and the operator sees it again within seconds of its return);
- a watch that delivers nothing for `inactivity` seconds (a silent partition)
  is dropped and resumed;
- `blind_for()` tells liveness how long the collection has been unwatchable
  (`WatchHealth` below: how an outage starts, and what proves it over).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from regmirror.kube import RESOURCES, ApiError, KubeClient

log = logging.getLogger("regmirror.informer")

# What the store keeps of an object (a slim dict, or a packed child: store.py), or None: not ours.
Transform = Callable[[dict[str, Any]], Any]
OnChange = Callable[[str, str, Any, Any], None]


def object_name(obj: dict[str, Any]) -> str:
    """An object's key in `items`: its name (unique within one namespace)."""
    return str(obj.get("metadata", {}).get("name", ""))


def resource_version(obj: Any) -> int | None:
    """An object's resourceVersion as a number (a slim dict's or a packed child's); None when it has none."""
    meta = obj.get("metadata") if isinstance(obj, dict) else getattr(obj, "metadata", None)
    version = meta.get("resourceVersion") if isinstance(meta, dict) else None
    try:
        return int(version) if version is not None else None
    except (TypeError, ValueError):
        return None


def older(candidate: Any, stored: Any) -> bool:
    """Whether `candidate` is an older version of the object than `stored` (both with numeric resourceVersions).

    A write's response can reach the operator after the watch reported a later
    change of the same object (the Deployment controller's status update); the
    response must not replace it, or the store keeps the stale copy until the
    object changes again. A resourceVersion is an increasing integer that clients
    may compare for objects of one resource (KEP-5504, stable in Kubernetes 1.35,
    client-go's `CompareResourceVersion`); one that is not is never compared.
    """
    new, old = resource_version(candidate), resource_version(stored)
    return new is not None and old is not None and new < old


@dataclass(frozen=True)
class Source:
    """One collection to watch: a kind, where, which objects, and what to keep of each."""

    kind: str
    namespace: str | None = None
    label_selector: str | None = None
    field_selector: str | None = None
    # Reduce an object to what the controller reads (None: not ours, do not keep it).
    transform: Transform = lambda obj: obj
    # The key in `items` (and in change reports): the name, or namespace/name for a cluster-wide namespaced kind.
    key: Callable[[dict[str, Any]], str] = object_name


class WatchHealth:
    """How long a collection has been unwatchable: the state machine liveness reads.

    - `failed()`: a list or watch failed (refused, timed out, stalled, an API error).
      The outage starts at the first failure; later ones do not move its start.
    - `confirmed()`: the collection was seen working (a list, a watch event or
      bookmark, a stream the server ended on its timeout). Ends any outage.
    - `answered()`: the API server answered again (a watch returned HTTP 200, a
      write succeeded). Ends the outage at once, so liveness recovers as soon as a
      partition heals even on a collection where nothing happens; but if the next
      failure comes before anything confirmed the watch, the outage resumes from its
      original start, and from then on only `confirmed()` ends it. So a watch that
      reconnects and times out again and again never counts as healthy.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.failing_since: float | None = None
        # The start of an outage that an answer ended before anything confirmed it.
        self._unconfirmed_since: float | None = None
        # An answer was followed by a failure: answers prove nothing until confirmed().
        self._answers_doubted = False

    def failed(self) -> None:
        """A list or watch attempt failed."""
        if self.failing_since is not None:
            return
        if self._unconfirmed_since is not None:
            self.failing_since, self._unconfirmed_since = self._unconfirmed_since, None
            self._answers_doubted = True
        else:
            self.failing_since = self._clock()

    def answered(self) -> None:
        """The API server answered (watch opened, write succeeded): health, until a failure says otherwise."""
        if self.failing_since is None or self._answers_doubted:
            return
        self._unconfirmed_since, self.failing_since = self.failing_since, None

    def confirmed(self) -> None:
        """The collection was listed or its watch delivered: healthy, whatever happened before."""
        self.failing_since = self._unconfirmed_since = None
        self._answers_doubted = False

    def blind_for(self) -> float:
        """Seconds this collection has been unwatchable (0 while healthy)."""
        return 0.0 if self.failing_since is None else self._clock() - self.failing_since


class Informer:
    """Keeps `items` (name -> transformed object) equal to the collection, and reports changes."""

    def __init__(
        self,
        client: KubeClient,
        source: Source,
        on_change: OnChange,
        *,
        watch_timeout: float = 240.0,
        inactivity: float = 90.0,
        max_backoff: float = 5.0,
        on_relist: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        page_size: int = 100,
    ) -> None:
        self.client = client
        self.source = source
        self.on_change = on_change
        self.watch_timeout = watch_timeout
        self.inactivity = inactivity
        self.max_backoff = max_backoff
        # Objects per list request. client-go's pager takes 500, but 500 of our Deployments (with their
        # managed fields) decode to tens of MiB at once; 100 keeps a restart's peak near its steady state.
        self.page_size = page_size
        self._on_relist = on_relist or (lambda _kind: None)
        self.items: dict[str, Any] = {}
        self.changes = 0  # how often `items` changed (events and write responses): what is derived from it is current while this stays
        self.synced = asyncio.Event()
        self.resource_version = ""
        self.health = WatchHealth(clock)
        self.relists = 0

    @property
    def failing_since(self) -> float | None:
        """When the current outage of this collection began (None while healthy)."""
        return self.health.failing_since

    def blind_for(self) -> float:
        """Seconds this collection has been unwatchable (0 while healthy)."""
        return self.health.blind_for()

    def _put(self, obj: dict[str, Any]) -> None:
        name = self.source.key(obj)
        new = self.source.transform(obj)
        old = self.items.get(name)
        if new is None:
            if old is not None:
                del self.items[name]
                self.changes += 1
                self.on_change(self.source.kind, name, old, None)
            return
        self.items[name] = new
        if old != new:
            self.changes += 1
            self.on_change(self.source.kind, name, old, new)

    def offer(self, name: str, new: Any) -> None:
        """Record what a write returned (transformed), unless the watch already reported a newer version.

        No change is reported: the writer acts on its own result; the watch's echo then compares equal.
        """
        old = self.items.get(name)
        if not older(new, old):
            self.items[name] = new
            self.changes += old != new

    def _delete(self, name: str) -> None:
        old = self.items.pop(name, None)
        if old is not None:
            self.changes += 1
            self.on_change(self.source.kind, name, old, None)

    async def relist(self) -> None:
        """List the collection and make `items` equal to it, reporting what vanished as deleted."""
        s = self.source
        seen = set()
        token: str | None = None
        while True:
            # In pages, each slimmed before the next is read: 2,000 kwok Nodes listed in one
            # request were most of the operator's memory peak after a restart (docs/performance.md).
            page = await self.client.list_objects(
                s.kind,
                s.namespace,
                label_selector=s.label_selector,
                field_selector=s.field_selector,
                limit=self.page_size,
                continue_token=token,
            )
            for obj in page.items:
                # List items carry no apiVersion and kind (watch events do): without them every
                # listed object would differ from its rendering, and a restart would re-apply all.
                obj.setdefault("apiVersion", RESOURCES[s.kind].api_version)
                obj.setdefault("kind", s.kind)
                seen.add(self.source.key(obj))
                self._put(obj)
            if not page.continue_token:
                break
            token = page.continue_token
        for name in [n for n in self.items if n not in seen]:
            self._delete(name)
        # Every page of one list is a snapshot at the first page's resourceVersion; the watch resumes from there.
        self.resource_version = page.resource_version
        self.relists += 1
        self.health.confirmed()
        self.synced.set()

    async def _watch(self) -> None:
        s = self.source
        stream = self.client.watch(
            s.kind,
            s.namespace,
            resource_version=self.resource_version,
            label_selector=s.label_selector,
            field_selector=s.field_selector,
            timeout_seconds=self.watch_timeout * (0.9 + 0.2 * random.random()),
            inactivity=self.inactivity,
            # HTTP 200: the API server answers again, even if the stream stays quiet for a while.
            on_open=self.health.answered,
        )
        async for type_, obj in stream:
            self.health.confirmed()
            rv = obj.get("metadata", {}).get("resourceVersion")
            if rv:
                self.resource_version = rv
            if type_ == "BOOKMARK":
                continue
            obj.setdefault("kind", s.kind)
            if type_ == "DELETED":
                self._delete(self.source.key(obj))
            else:
                self._put(obj)
        self.health.confirmed()  # a stream the server closed on its timeout was healthy to the end

    async def run(self) -> None:
        """List, then watch; re-list after 410 or any failure; forever (until cancelled)."""
        backoff = 0.5
        need_list = True
        while True:
            try:
                if need_list:
                    await self.relist()
                    need_list = False
                await self._watch()
                backoff = 0.5
            except asyncio.CancelledError:
                raise
            except ApiError as exc:
                self.health.failed()
                if exc.status == 410:
                    log.info("watch of %s expired (410); re-listing", self.source.kind)
                    need_list = True
                    self._on_relist(self.source.kind)
                    continue
                # A dropped or silent connection resumes from the last resourceVersion
                # (the server replays every event since, deletions included, or answers
                # 410). Anything else (403, 5xx) starts over with a list.
                if exc.status != 0 and not need_list:
                    need_list = True
                    self._on_relist(self.source.kind)
                log.warning("watch of %s failed (%s); retrying in %.1fs", self.source.kind, exc, backoff)
                await asyncio.sleep(backoff * (0.5 + random.random()))
                backoff = min(self.max_backoff, backoff * 2)
            except Exception as exc:  # a bug in a transform or handler must not end the watch
                self.health.failed()
                need_list = True
                log.exception("watch of %s crashed: %s; retrying in %.1fs", self.source.kind, exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(self.max_backoff, backoff * 2)
