"""Every version of an object the API server shows, from a watch that survives API server restarts.

Polling can miss a status that lasted a moment; a watch cannot. ``ResourceWatch``
follows one resource (e.g. every RegistryMirror) from a LIST's resourceVersion,
resumes from the last version it saw after a disconnect (the API server may be down
for minutes), and re-lists only if that version has expired (counted in ``gaps``).
``MirrorWatch`` reduces that to what an admin watches: each mirror's phase and Ready.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from dataclasses import dataclass
from typing import Any

from harness.cluster import ApiError, LocalCluster
from regmirror import constants as c

MIRRORS_PATH = f"/apis/{c.GROUP}/{c.VERSION}/{c.PLURAL}"
#: Each watch request ends after this long, so ``stop()`` never waits for a quiet stream.
WATCH_SECONDS = 5


@dataclass(frozen=True)
class Seen:
    """One version of one object, as the watch delivered it."""

    at: float  # time.monotonic() when it arrived
    type: str  # ADDED, MODIFIED, DELETED, or LISTED after a re-list
    name: str
    body: dict[str, Any]


def ready_of(body: dict[str, Any]) -> tuple[str | None, str | None]:
    """(status, reason) of the Ready condition, (None, None) without one."""
    ready: dict[str, Any] = next((cd for cd in (body.get("status") or {}).get("conditions") or [] if cd.get("type") == "Ready"), {})
    return ready.get("status"), ready.get("reason")


class ResourceWatch:
    """A background watch of ``path`` (a collection URL) as admin; use as a context manager."""

    def __init__(self, cluster: LocalCluster, path: str = MIRRORS_PATH) -> None:
        self.cluster = cluster
        self.path = path
        self.seen: list[Seen] = []
        self.gaps = 0  # times the watch had to re-list: events in between may be missing
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._version = ""
        self._thread = threading.Thread(target=self._run, name=f"watch {path}", daemon=True)

    def __enter__(self) -> ResourceWatch:
        self._list()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop watching (within one watch period)."""
        self._stop.set()
        self._thread.join(timeout=WATCH_SECONDS + 5)

    def versions(self, name: str) -> list[Seen]:
        """Every version of object ``name`` seen so far, oldest first."""
        with self._lock:
            return [s for s in self.seen if s.name == name]

    def names(self) -> set[str]:
        """Every object name seen so far."""
        with self._lock:
            return {s.name for s in self.seen}

    def _record(self, type_: str, body: dict[str, Any]) -> None:
        with self._lock:
            self.seen.append(Seen(time.monotonic(), type_, body["metadata"]["name"], body))

    def _list(self) -> None:
        # Right after a CRD is installed or changed its storage is "(re)initializing" for a moment: 429.
        deadline = time.monotonic() + 30
        while True:
            try:
                listed = self.cluster.api("GET", self.path)
                break
            except ApiError as exc:
                if exc.status != 429 or time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        for item in listed.get("items", []):
            self._record("LISTED", item)
        self._version = listed["metadata"]["resourceVersion"]

    def _run(self) -> None:
        while not self._stop.is_set():
            query = f"?watch=1&allowWatchBookmarks=true&timeoutSeconds={WATCH_SECONDS}&resourceVersion={self._version}"
            try:
                for line in self.cluster.stream(self.path + query, timeout=WATCH_SECONDS + 10):
                    self._handle(json.loads(line))
            except ApiError as exc:
                if exc.status != 410:
                    raise
                self._expired()
            except (OSError, ValueError, http.client.HTTPException):
                # The API server is down or restarting: try again from the same version.
                self._stop.wait(0.5)

    def _handle(self, event: dict[str, Any]) -> None:
        obj = event.get("object") or {}
        if event.get("type") == "ERROR":
            if obj.get("code") == 410:
                self._expired()
            return
        version = (obj.get("metadata") or {}).get("resourceVersion")
        if version:
            self._version = version
        if event.get("type") != "BOOKMARK":
            self._record(str(event.get("type")), obj)

    def _expired(self) -> None:
        with self._lock:
            self.gaps += 1
        self._list()


class MirrorWatch(ResourceWatch):
    """Every status the RegistryMirrors show, as (phase, Ready status, Ready reason) per update."""

    def __init__(self, cluster: LocalCluster, name: str | None = None) -> None:
        super().__init__(cluster, MIRRORS_PATH)
        self.name = name

    @property
    def statuses(self) -> list[tuple[str, str | None, str | None]]:
        """(phase, Ready status, Ready reason) of every version of the watched mirror (``name``)."""
        assert self.name is not None, "statuses needs MirrorWatch(cluster, name)"
        return [_summary(s.body) for s in self.versions(self.name)]

    def ready_history(self, name: str) -> list[str | None]:
        """The Ready status of mirror ``name`` over time, consecutive repeats collapsed."""
        history: list[str | None] = []
        for seen in self.versions(name):
            if seen.type == "DELETED":
                continue
            status, _ = ready_of(seen.body)
            if not history or history[-1] != status:
                history.append(status)
        return history

    def readiness_drops(self) -> dict[str, list[str | None]]:
        """Mirrors whose Ready went from True to anything else at least once, with their history."""
        drops = {}
        for name in sorted(self.names()):
            history = self.ready_history(name)
            if "True" in history and any(s != "True" for s in history[history.index("True") :]):
                drops[name] = history
        return drops


def _summary(body: dict[str, Any]) -> tuple[str, str | None, str | None]:
    status, reason = ready_of(body)
    return (body.get("status") or {}).get("phase", ""), status, reason
