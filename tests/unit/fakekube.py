"""An in-memory KubeClient for reconciler tests: objects, server-side apply, watches, and injected failures.

It behaves like the API server where the reconcilers can tell: apply merges
the fields it is given into the stored object (so fields another "manager"
added stay), bumps resourceVersion (and generation when spec changes),
gives Services a ClusterIP, answers 404 for absent objects, and JSON patches
honour `test`. `fail(...)` queues errors for matching calls, e.g. a 422 with
the field causes the real API server sends, or a 429 with Retry-After.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from regmirror.kube import ApiError, ListPage, WatchEvent

ObjKey = tuple[str, str | None, str]


def _merge(into: dict[str, Any], patch: dict[str, Any]) -> None:
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        elif (
            isinstance(value, list)
            and isinstance(into.get(key), list)
            and value
            and all(isinstance(v, dict) and "name" in v for v in value)
        ):
            # A list keyed by name: items merge one by one, others' items stay (as SSA does).
            existing = {item.get("name"): item for item in into[key] if isinstance(item, dict)}
            merged = []
            for item in value:
                if item["name"] in existing:
                    target = existing.pop(item["name"])
                    _merge(target, item)
                    merged.append(target)
                else:
                    merged.append(copy.deepcopy(item))
            into[key] = merged + list(existing.values())
        else:
            into[key] = copy.deepcopy(value)


@dataclass
class Failure:
    verb: str
    kind: str | None
    error: ApiError
    times: int = 1


@dataclass
class FakeKube:
    """KubeClient in memory. `calls` records (verb, kind, name) of every request."""

    objects: dict[ObjKey, dict[str, Any]] = field(default_factory=dict)
    calls: list[tuple[str, str, str]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    _rv: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _ips: itertools.count[int] = field(default_factory=lambda: itertools.count(10))
    _watchers: list[tuple[str, str | None, asyncio.Queue[WatchEvent | ApiError]]] = field(default_factory=list)

    # ------------------------------------------------------------ test helpers

    def fail(self, verb: str, error: ApiError, *, kind: str | None = None, times: int = 1) -> None:
        """The next `times` calls of `verb` (on `kind`) raise `error`."""
        self.failures.append(Failure(verb, kind, error, times))

    def _check(self, verb: str, kind: str, name: str) -> None:
        self.calls.append((verb, kind, name))
        for failure in self.failures:
            if failure.verb == verb and failure.kind in (None, kind) and failure.times > 0:
                failure.times -= 1
                raise failure.error

    def writes(self) -> list[tuple[str, str, str]]:
        """Calls that change something."""
        return [c for c in self.calls if c[0] in ("apply", "apply_status", "patch", "delete", "event")]

    def put(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Store an object as if someone else created it (no call recorded)."""
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        meta.setdefault("uid", f"uid-{meta['name']}")
        meta["resourceVersion"] = str(next(self._rv))
        meta.setdefault("generation", 1)
        if obj["kind"] == "Service":
            obj.setdefault("spec", {}).setdefault("clusterIP", f"10.96.0.{next(self._ips)}")
        self.objects[(obj["kind"], meta.get("namespace"), meta["name"])] = obj
        self._notify("MODIFIED", obj)
        return copy.deepcopy(obj)

    def obj(self, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        """The stored object (a copy)."""
        found = self.objects.get((kind, namespace, name))
        return copy.deepcopy(found) if found is not None else None

    def remove(self, kind: str, namespace: str | None, name: str) -> None:
        """Delete without a recorded call (someone else did it)."""
        gone = self.objects.pop((kind, namespace, name), None)
        if gone is not None:
            self._notify("DELETED", gone)

    def _notify(self, type_: str, obj: dict[str, Any]) -> None:
        for kind, namespace, queue in self._watchers:
            if kind == obj["kind"] and namespace in (None, obj["metadata"].get("namespace")):
                queue.put_nowait((type_, copy.deepcopy(obj)))

    def break_watches(self, error: ApiError) -> None:
        """Every open watch ends with `error` (e.g. 410 Gone)."""
        for _, _, queue in self._watchers:
            queue.put_nowait(error)

    # ------------------------------------------------------------ KubeClient

    async def apply(self, obj: dict[str, Any], *, subresource: str | None = None) -> dict[str, Any]:
        meta = obj["metadata"]
        self._check("apply_status" if subresource == "status" else "apply", obj["kind"], meta["name"])
        key = (obj["kind"], meta.get("namespace"), meta["name"])
        current = self.objects.get(key)
        if subresource == "status":
            if current is None:
                raise ApiError(404, "NotFound", f"{obj['kind']} {meta['name']} not found")
            current["status"] = copy.deepcopy(obj["status"])
            current["metadata"]["resourceVersion"] = str(next(self._rv))
            self._notify("MODIFIED", current)
            return copy.deepcopy(current)
        if current is None:
            return self.put(obj)
        spec_before = copy.deepcopy(current.get("spec"))
        _merge(current, {k: v for k, v in obj.items() if k != "status"})
        if current.get("spec") != spec_before:
            current["metadata"]["generation"] = current["metadata"].get("generation", 1) + 1
        current["metadata"]["resourceVersion"] = str(next(self._rv))
        self._notify("MODIFIED", current)
        return copy.deepcopy(current)

    async def get(self, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        self._check("get", kind, name)
        return self.obj(kind, namespace, name)

    async def list_objects(
        self,
        kind: str,
        namespace: str | None = None,
        *,
        label_selector: str | None = None,
        field_selector: str | None = None,
        limit: int | None = None,
        continue_token: str | None = None,
    ) -> ListPage:
        # Pages as the API server cuts them: in key order, the token says where the next one starts.
        self._check("list", kind, "")
        keys = sorted((ns or "", name) for (k, ns, name) in self.objects if k == kind and (namespace is None or ns == namespace))
        start = int(continue_token) if continue_token else 0
        end = len(keys) if limit is None else min(len(keys), start + limit)
        items = [copy.deepcopy(self.objects[(kind, ns or None, name)]) for ns, name in keys[start:end]]
        for item in items:  # as the API server sends them: list items have no apiVersion and kind
            item.pop("apiVersion", None)
            item.pop("kind", None)
        return ListPage(items, str(next(self._rv)), str(end) if end < len(keys) else "")

    async def watch(
        self,
        kind: str,
        namespace: str | None,
        *,
        resource_version: str,
        label_selector: str | None = None,
        field_selector: str | None = None,
        timeout_seconds: float,
        inactivity: float,
        on_open: Callable[[], None] | None = None,
    ) -> AsyncIterator[WatchEvent]:
        self._check("watch", kind, "")
        if on_open is not None:
            on_open()  # a watch the fake accepts answers at once, like HTTP 200 before any event
        queue: asyncio.Queue[WatchEvent | ApiError] = asyncio.Queue()
        entry = (kind, namespace, queue)
        self._watchers.append(entry)
        try:
            while True:
                item = await queue.get()
                if isinstance(item, ApiError):
                    raise item
                yield item
        finally:
            self._watchers.remove(entry)

    async def patch(self, kind: str, namespace: str | None, name: str, patch: list[dict[str, Any]]) -> dict[str, Any]:
        self._check("patch", kind, name)
        current = self.objects.get((kind, namespace, name))
        if current is None:
            raise ApiError(404, "NotFound", f"{kind} {name} not found")
        for op in patch:
            parts = op["path"].strip("/").split("/")
            parent = current
            for part in parts[:-1]:
                parent = parent.setdefault(part, {})
            last = parts[-1]
            if op["op"] == "test":
                if parent.get(last) != op["value"]:
                    raise ApiError(
                        422, "Invalid", f"the server rejected our request due to an error in our request: test of {op['path']} failed"
                    )
            elif op["op"] in ("add", "replace"):
                parent[last] = copy.deepcopy(op["value"])
        current["metadata"]["resourceVersion"] = str(next(self._rv))
        if kind != "Event" and current["metadata"].get("deletionTimestamp") and not current["metadata"].get("finalizers"):
            self.remove(kind, namespace, name)
        else:
            self._notify("MODIFIED", current)
        return copy.deepcopy(current)

    async def delete(self, kind: str, namespace: str | None, name: str) -> None:
        self._check("delete", kind, name)
        self.remove(kind, namespace, name)

    async def create_event(self, involved: dict[str, Any], *, reason: str, message: str, type_: str = "Normal") -> None:
        self._check("event", "Event", reason)
        self.events.append({"reason": reason, "message": message, "type": type_, "name": involved.get("metadata", {}).get("name")})


def api_error(status: int, message: str = "", *, causes: list[tuple[str, str]] | None = None, retry_after: float | None = None) -> ApiError:
    """An ApiError as the real client raises it."""
    reasons = {403: "Forbidden", 409: "Conflict", 422: "Invalid", 429: "TooManyRequests", 500: "InternalError", 0: "TimeoutError"}
    return ApiError(status, reasons.get(status, "Error"), message or f"HTTP {status}", retry_after, list(causes or []))
