"""The only module that talks to the Kubernetes API: one small async client behind a protocol.

Reconcilers depend on `KubeClient` (apply, apply status, get, list, watch,
patch, delete, create an Event), so unit tests hand them a fake. The real
client is aiohttp on the operator's event loop (Kopf already depends on it,
so there is one HTTP stack and no thread per request); the kubernetes
package is used only to read the kubeconfig or the in-cluster credentials.

Every request has its own timeout (shorter than a watch's) and is retried a
few times on 429 (honouring Retry-After), 5xx, timeouts and dropped
connections before the caller sees an `ApiError`; callers then back off per
key. Writes are server-side apply under one field manager
(`constants.FIELD_MANAGER`): the API server merges our fields with everyone
else's, so there is no read-modify-write race and no fight with GitOps tools.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp

from regmirror import constants as c
from regmirror.conditions import now_rfc3339

log = logging.getLogger(__name__)

# Statuses worth another attempt: the server is overloaded, restarting or timed out.
TRANSIENT_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
MAX_RETRY_AFTER = 30.0
MAX_MESSAGE = 600
# How long a bearer token is reused before the loader's refresh hook runs again (a kubelet rotates a
# projected token at 80% of its lifetime, hours ahead; an exec plugin's token is renewed once expired).
TOKEN_RECHECK_SECONDS = 1.0


@dataclass(frozen=True)
class ResourceType:
    """Where a kind lives in the REST API."""

    api_version: str
    plural: str
    namespaced: bool

    def path(self, namespace: str | None, name: str | None = None, subresource: str | None = None) -> str:
        """The REST path of the collection, or of one object (and its subresource)."""
        prefix = "/api/v1" if self.api_version == "v1" else f"/apis/{self.api_version}"
        # A namespaced kind without a namespace is its collection across every namespace (the pods the caches pin).
        path = f"{prefix}/namespaces/{namespace}/{self.plural}" if self.namespaced and namespace is not None else f"{prefix}/{self.plural}"
        if name:
            path += f"/{name}"
        if subresource:
            path += f"/{subresource}"
        return path


RESOURCES: dict[str, ResourceType] = {
    "ConfigMap": ResourceType("v1", "configmaps", True),
    "Secret": ResourceType("v1", "secrets", True),
    "Service": ResourceType("v1", "services", True),
    "PersistentVolumeClaim": ResourceType("v1", "persistentvolumeclaims", True),
    "Pod": ResourceType("v1", "pods", True),
    "Event": ResourceType("v1", "events", True),
    "Node": ResourceType("v1", "nodes", False),
    "Deployment": ResourceType("apps/v1", "deployments", True),
    "DaemonSet": ResourceType("apps/v1", "daemonsets", True),
    "PodDisruptionBudget": ResourceType("policy/v1", "poddisruptionbudgets", True),
    "NetworkPolicy": ResourceType("networking.k8s.io/v1", "networkpolicies", True),
    "Lease": ResourceType("coordination.k8s.io/v1", "leases", True),
    c.KIND: ResourceType(c.API_VERSION, c.PLURAL, False),
}


@dataclass
class ApiError(Exception):
    """The API server refused a request, or could not be reached (status 0)."""

    status: int
    reason: str
    message: str
    retry_after: float | None = None
    causes: list[tuple[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        return f"{self.status} {self.reason}: {self.message}"[:MAX_MESSAGE]

    @property
    def transient(self) -> bool:
        """Whether trying again later may succeed without anyone changing anything."""
        return self.status == 0 or self.status in TRANSIENT_STATUSES or self.status == 409

    @property
    def invalid(self) -> bool:
        """The object itself was rejected (422 Invalid, 400 BadRequest): trying again cannot help."""
        return self.status in (400, 422)

    def field_error(self) -> str:
        """The API server's own words about what is wrong, bounded: the fields it names, else its message.

        The message of a 422 names the object and each invalid field with its
        value; object values we send never contain Secret data (those are
        referenced, not copied), so the text is safe for status and Events.
        """
        text = "; ".join(f"{f}: {m}" if f else m for f, m in self.causes) if self.causes else self.message
        return text[:MAX_MESSAGE]

    @classmethod
    def from_response(cls, status: int, body: bytes, retry_after: str | None = None) -> ApiError:
        """Parse a metav1.Status body (or whatever the server sent)."""
        try:
            data = json.loads(body)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            return cls(status, "Error", body[:300].decode(errors="replace"), _seconds(retry_after))
        details = data.get("details") or {}
        causes = [(str(x.get("field", "")), str(x.get("message", ""))) for x in details.get("causes") or [] if isinstance(x, dict)]
        after = _seconds(retry_after)
        if after is None and details.get("retryAfterSeconds"):
            after = _seconds(str(details["retryAfterSeconds"]))
        return cls(status, str(data.get("reason") or "Error"), str(data.get("message") or ""), after, causes)


def _seconds(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return min(MAX_RETRY_AFTER, max(0.0, float(value)))
    except ValueError:
        return None


WatchEvent = tuple[str, dict[str, Any]]


@dataclass(frozen=True)
class ListPage:
    """One page of a list: its items, the list's resourceVersion, and where the next page starts ("" when last)."""

    items: list[dict[str, Any]]
    resource_version: str
    continue_token: str = ""


class KubeClient(Protocol):
    """What the controller needs from the API; `HttpKube` is the real one, tests use a fake."""

    async def apply(self, obj: dict[str, Any], *, subresource: str | None = None) -> dict[str, Any]:
        """Server-side apply `obj` (force: we own the fields we render); returns the object as stored."""
        ...

    async def get(self, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        """The object, or None when it does not exist."""
        ...

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
        """One page of a kind's objects (at most `limit`; all without it), from `continue_token` on."""
        ...

    def watch(
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
        """(type, object) pairs from resource_version on; ends when the server closes the stream.

        `on_open` is called once the server has accepted the watch (HTTP 200), before any event.
        """
        ...

    async def patch(self, kind: str, namespace: str | None, name: str, patch: list[dict[str, Any]]) -> dict[str, Any]:
        """A JSON patch (used with `test` operations to change finalizers without a race)."""
        ...

    async def delete(self, kind: str, namespace: str | None, name: str) -> None:
        """Delete an object; absent is fine."""
        ...

    async def create_event(self, involved: dict[str, Any], *, reason: str, message: str, type_: str = "Normal") -> None:
        """Record an Event about an object (best effort)."""
        ...


@dataclass(frozen=True)
class Credentials:
    """Where the API server is and how to authenticate: a base URL, TLS and a (refreshable) token."""

    server: str
    ssl_context: ssl.SSLContext | bool
    token: Callable[[], str | None]


def load_credentials() -> Credentials:
    """In-cluster credentials in a pod, else the kubeconfig (any auth the kubernetes package understands)."""
    from kubernetes import client as k8s_client
    from kubernetes import config as k8s_config

    cfg = k8s_client.Configuration()
    try:
        k8s_config.load_incluster_config(client_configuration=cfg)
    except k8s_config.ConfigException:
        k8s_config.load_kube_config(client_configuration=cfg)
    context: ssl.SSLContext | bool
    # The stubs lag behind the generated Configuration: read its TLS fields by name.
    ca_file, cert_file, key_file = (getattr(cfg, a, None) for a in ("ssl_ca_cert", "cert_file", "key_file"))
    if not cfg.verify_ssl:
        context = False
    else:
        context = ssl.create_default_context(cafile=ca_file) if ca_file else ssl.create_default_context()
        if cert_file:
            context.load_cert_chain(cert_file, key_file)

    return Credentials(server=cfg.host.rstrip("/"), ssl_context=context, token=bearer_token(cfg))


def bearer_token(cfg: Any, clock: Callable[[], float] = time.monotonic) -> Callable[[], str | None]:
    """The token of a kubernetes client Configuration, refreshed through its loader's hook when due.

    In a pod the projected token rotates and the loader's hook re-reads it. The hook also resets
    the Configuration (reading the proxy environment): run per request it was 3% of the
    operator's CPU at 500 mirrors, so it runs at most once per TOKEN_RECHECK_SECONDS.
    """
    checked_at, current = float("-inf"), None

    def token() -> str | None:
        nonlocal checked_at, current
        now = clock()
        if now - checked_at >= TOKEN_RECHECK_SECONDS:
            hook = getattr(cfg, "refresh_api_key_hook", None)
            if hook is not None:
                hook(cfg)
            value = cfg.get_api_key_with_prefix("authorization") or cfg.get_api_key_with_prefix("BearerToken")
            checked_at, current = now, (str(value) if value else None)
        return current

    return token


class HttpKube:
    """`KubeClient` over aiohttp, with per-request timeouts and retries with backoff."""

    def __init__(
        self,
        credentials: Credentials,
        *,
        timeout: float = 10.0,
        attempts: int = 4,
        on_retry: Callable[[], None] | None = None,
        on_write: Callable[[str, str], None] | None = None,
        user_agent: str = c.FIELD_MANAGER,
        may_write: Callable[[], bool] | None = None,
        max_in_flight: int = 0,
        on_wait: Callable[[float], None] | None = None,
    ) -> None:
        self.credentials = credentials
        # At most this many requests at the API server at once (0: no bound); watches are not counted.
        self.max_in_flight = max_in_flight
        self._slots: tuple[asyncio.AbstractEventLoop, asyncio.Semaphore] | None = None
        self._on_wait = on_wait or (lambda _seconds: None)
        self.user_agent = user_agent
        # A fence checked before every write (and every retry of one): the leader's lease still holds.
        self._may_write = may_write or (lambda: True)
        self.timeout = timeout
        self.attempts = max(1, attempts)
        self._on_retry = on_retry or (lambda: None)
        self._on_write = on_write or (lambda _kind, _verb: None)
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # limit=0: concurrency is bounded by max_in_flight (or the workers) and the watches, not by the pool.
            connector = aiohttp.TCPConnector(limit=0, ssl=self.credentials.ssl_context)
            self._session = aiohttp.ClientSession(connector=connector, headers={"User-Agent": self.user_agent})
        return self._session

    async def close(self) -> None:
        """Close the connection pool."""
        if self._session is not None:
            await self._session.close()

    @contextlib.asynccontextmanager
    async def _slot(self) -> AsyncIterator[None]:
        """A place among the requests in flight (see `max_in_flight`), waited for in order of arrival;
        the time a request waited for it goes to `on_wait`."""
        if self.max_in_flight <= 0:
            yield
            return
        loop = asyncio.get_running_loop()
        if self._slots is None or self._slots[0] is not loop:
            self._slots = (loop, asyncio.Semaphore(self.max_in_flight))
        slots = self._slots[1]
        if slots.locked():
            started = time.monotonic()
            await slots.acquire()
            self._on_wait(time.monotonic() - started)
        else:
            await slots.acquire()
        try:
            yield
        finally:
            slots.release()

    def _headers(self, content_type: str | None) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        token = self.credentials.token()
        if token:
            headers["Authorization"] = token if token.lower().startswith("bearer ") else f"Bearer {token}"
        if content_type:
            headers["Content-Type"] = content_type
        return headers

    async def _request(
        self, method: str, path: str, *, body: Any = None, content_type: str | None = None, params: dict[str, str] | None = None
    ) -> Any:
        """One logical request: retried on transient failures with jittered exponential backoff."""
        data = json.dumps(body).encode() if body is not None else None
        delay = 0.2
        for attempt in range(1, self.attempts + 1):
            try:
                async with self._slot():
                    # Fenced after the wait for a place: the lease may have lapsed during it.
                    if method != "GET" and not self._may_write():
                        raise ApiError(0, "NotLeader", "this replica no longer holds the leader lease: not writing")
                    async with self._client().request(
                        method,
                        self.credentials.server + path,
                        params=params,
                        data=data,
                        headers=self._headers(content_type),
                        timeout=aiohttp.ClientTimeout(total=self.timeout),
                    ) as response:
                        payload = await response.read()
                        if response.status < 300:
                            return json.loads(payload) if payload else None
                        error = ApiError.from_response(response.status, payload, response.headers.get("Retry-After"))
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                error = ApiError(0, type(exc).__name__, str(exc) or "no answer within the request timeout")
            if not error.transient or error.status == 409 or attempt == self.attempts:
                raise error
            self._on_retry()
            wait = error.retry_after if error.retry_after is not None else delay * (0.5 + random.random())
            log.debug("%s %s: %s; attempt %d/%d in %.1fs", method, path, error, attempt + 1, self.attempts, wait)
            await asyncio.sleep(wait)
            delay = min(delay * 2, 5.0)
        raise AssertionError("unreachable")

    async def apply(self, obj: dict[str, Any], *, subresource: str | None = None) -> dict[str, Any]:
        """Server-side apply under our field manager, forcing ownership of the fields we render."""
        meta = obj["metadata"]
        path = RESOURCES[obj["kind"]].path(meta.get("namespace"), meta["name"], subresource)
        result: dict[str, Any] = await self._request(
            "PATCH",
            path,
            body=obj,
            content_type="application/apply-patch+yaml",
            params={"fieldManager": c.FIELD_MANAGER, "force": "true"},
        )
        self._on_write(obj["kind"] + (f"/{subresource}" if subresource else ""), "apply")
        return result

    async def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Create `obj` (409 when it exists): for objects written by compare-and-swap, like the leader Lease."""
        meta = obj["metadata"]
        result: dict[str, Any] = await self._request(
            "POST", RESOURCES[obj["kind"]].path(meta.get("namespace")), body=obj, content_type="application/json"
        )
        self._on_write(obj["kind"], "create")
        return result

    async def replace(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Replace `obj` (PUT); its metadata.resourceVersion makes the write conditional: 409 when it changed since."""
        meta = obj["metadata"]
        result: dict[str, Any] = await self._request(
            "PUT", RESOURCES[obj["kind"]].path(meta.get("namespace"), meta["name"]), body=obj, content_type="application/json"
        )
        self._on_write(obj["kind"], "update")
        return result

    async def get(self, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        """The object, or None when it does not exist."""
        try:
            result: dict[str, Any] = await self._request("GET", RESOURCES[kind].path(namespace, name))
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise
        return result

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
        """One page of a kind's objects; an expired `continue_token` raises ApiError 410 (start the list again)."""
        params = {
            k: str(v)
            for k, v in (
                ("labelSelector", label_selector),
                ("fieldSelector", field_selector),
                ("limit", limit),
                ("continue", continue_token),
            )
            if v
        }
        result = await self._request("GET", RESOURCES[kind].path(namespace), params=params)
        meta = result.get("metadata") or {}
        items: list[dict[str, Any]] = result.get("items") or []
        return ListPage(items, str(meta.get("resourceVersion", "")), str(meta.get("continue") or ""))

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
        """One watch request; raises ApiError (410 when resource_version is too old) or ends when the server closes it.

        A stream that sends nothing, not even a bookmark, for `inactivity` seconds
        counts as dead (a partition leaves the TCP connection open and silent).
        """
        params = {
            "watch": "true",
            "allowWatchBookmarks": "true",
            "resourceVersion": resource_version,
            "timeoutSeconds": str(int(timeout_seconds)),
        }
        params |= {k: v for k, v in (("labelSelector", label_selector), ("fieldSelector", field_selector)) if v}
        timeout = aiohttp.ClientTimeout(total=timeout_seconds + 30, connect=self.timeout, sock_read=inactivity)
        try:
            async with self._client().get(
                self.credentials.server + RESOURCES[kind].path(namespace), params=params, headers=self._headers(None), timeout=timeout
            ) as response:
                if response.status >= 300:
                    raise ApiError.from_response(response.status, await response.read(), response.headers.get("Retry-After"))
                if on_open is not None:
                    on_open()
                buffer = b""
                async for chunk in response.content.iter_any():
                    buffer += chunk
                    *lines, buffer = buffer.split(b"\n")
                    for line in lines:
                        if not line.strip():
                            continue
                        event = json.loads(line)
                        if event.get("type") == "ERROR":
                            status = event.get("object") or {}
                            raise ApiError(int(status.get("code") or 500), str(status.get("reason") or "Error"), str(status.get("message")))
                        yield str(event.get("type")), event.get("object") or {}
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            raise ApiError(0, type(exc).__name__, str(exc) or "the watch stream stalled") from None

    async def patch(self, kind: str, namespace: str | None, name: str, patch: list[dict[str, Any]]) -> dict[str, Any]:
        """A JSON patch; a failed `test` operation comes back as 422 (someone changed the object meanwhile)."""
        result: dict[str, Any] = await self._request(
            "PATCH", RESOURCES[kind].path(namespace, name), body=patch, content_type="application/json-patch+json"
        )
        self._on_write(kind, "patch")
        return result

    async def delete(self, kind: str, namespace: str | None, name: str) -> None:
        """Delete an object in the background; absent is fine."""
        try:
            await self._request("DELETE", RESOURCES[kind].path(namespace, name), params={"propagationPolicy": "Background"})
        except ApiError as exc:
            if exc.status != 404:
                raise
        self._on_write(kind, "delete")

    async def create_event(self, involved: dict[str, Any], *, reason: str, message: str, type_: str = "Normal") -> None:
        """Record an Event (best effort: a failed Event never fails a reconcile).

        The API server requires an Event about a cluster-scoped object (a RegistryMirror)
        to live in the `default` namespace; a namespaced object's Event lives beside it.
        """
        body = event_body(involved, reason=reason, message=message, type_=type_)
        namespace = body["metadata"]["namespace"]
        try:
            await self._request("POST", RESOURCES["Event"].path(namespace), body=body, content_type="application/json")
            self._on_write("Event", "create")
        except ApiError as exc:
            log.warning("could not record event %s: %s", reason, exc)


def event_body(involved: dict[str, Any], *, reason: str, message: str, type_: str) -> dict[str, Any]:
    """A core/v1 Event about `involved` (`kubectl describe` shows it)."""
    meta = involved.get("metadata", {})
    namespace = meta.get("namespace") or "default"
    now = now_rfc3339()
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": f"{meta.get('name', 'regmirror')}.", "namespace": namespace},
        "involvedObject": {
            "apiVersion": involved.get("apiVersion"),
            "kind": involved.get("kind"),
            "name": meta.get("name"),
            "namespace": meta.get("namespace"),
            "uid": meta.get("uid"),
        },
        "reason": reason,
        "message": message[:1000],
        "type": type_,
        "source": {"component": c.FIELD_MANAGER},
        "reportingComponent": c.FIELD_MANAGER,
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    }


async def cancel_quietly(task: asyncio.Task[Any]) -> None:
    """Cancel a task and wait for it, swallowing its cancellation."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
