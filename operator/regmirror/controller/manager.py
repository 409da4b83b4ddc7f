"""Wiring: informers -> store -> keys -> work queue -> N workers -> reconcilers.

Events only decide which keys to queue; reconcilers read the store. The
manager and everything it holds live on one event loop (Kopf's), so no state
needs a lock: an informer callback, a reconciler between two awaits and the
upstream checker never run at the same time.

Routing (why each event queues what it does):
- a RegistryMirror's spec, generation, annotations or deletion: its ACCESS,
  CHILDREN and STATUS, the PLAN and the HOSTS order; its finalizers alone
  (our own patch echoed back, or someone removing ours): CHILDREN; its status
  alone (often our own write echoed back): nothing;
- a child's spec or metadata (drift, deletion): CHILDREN; its status
  (replicas, PVC phase): STATUS; a Service: the PLAN too (its ClusterIP);
- a Secret: CHILDREN of the mirrors that use it (rotation rolls the pods);
- a Node or an agent pod: ROLLOUT (accounting), which queues statuses;
- the agent DaemonSet or node ConfigMap: PLAN (restored when edited or deleted);
- any pod whose images' digests changed: PINS, debounced (controller/cache.py).
The status.cache poll runs beside the workers, not through the queue.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from regmirror import constants as c
from regmirror.access import NODE_SECRET_NAME, auth_secret_name, client_secret_name
from regmirror.controller import access, cache, children, hosts, plan, rollout, status
from regmirror.controller.credentials import UpstreamChecker
from regmirror.controller.informer import Informer
from regmirror.controller.queue import ShutDown, WorkQueue
from regmirror.controller.state import (
    ACCESS,
    CHILDREN,
    HOSTS,
    PINS,
    PLAN,
    ROLLOUT,
    STATUS,
    Context,
    Done,
    Key,
    RequeueAfter,
    Result,
    Terminal,
    TokenBucket,
    Transient,
    key_priority,
)
from regmirror.controller.store import CHILD_KINDS, PackedChild, Store, sources
from regmirror.kube import KubeClient, cancel_quietly
from regmirror.metrics import Metrics
from regmirror.settings import Settings

log = logging.getLogger("regmirror.controller")

Reconciler = Callable[[Context, str], Awaitable[Result]]
RECONCILERS: dict[str, Reconciler] = {
    CHILDREN: children.reconcile_children,
    STATUS: status.reconcile_status,
    PLAN: plan.reconcile_plan,
    ROLLOUT: rollout.reconcile_rollout,
    HOSTS: hosts.reconcile_hosts,
    ACCESS: access.reconcile_access,
    PINS: cache.reconcile_pins,
}
# Singletons gather bursts of events into one pass.
SINGLETON_COALESCE = 0.05


def _without(obj: dict[str, Any] | None, *drop: str, meta_too: tuple[str, ...] = ()) -> dict[str, Any]:
    if obj is None:
        return {}
    meta = {k: v for k, v in (obj.get("metadata") or {}).items() if k not in ("resourceVersion", "managedFields", *meta_too)}
    return {**{k: v for k, v in obj.items() if k not in drop and k != "metadata"}, "metadata": meta}


class Manager:
    """The controller: owns the store, the queue, the records and the workers."""

    def __init__(self, client: KubeClient, settings: Settings, metrics: Metrics, *, clock: Any = time.monotonic) -> None:
        self.settings = settings
        self.client = client
        self.metrics = metrics
        self.store = Store(settings.namespace, settings.agent_namespace)
        self.queue: WorkQueue[Key] = WorkQueue(
            base_delay=settings.backoff_base,
            max_delay=settings.backoff_max,
            priority=key_priority,
            clock=clock,
            on_take=lambda key, seconds: metrics.queue_wait.labels(concern=key[0]).observe(seconds),
        )
        self.ctx = Context(store=self.store, client=client, settings=settings, queue=self.queue, metrics=metrics, clock=clock)
        self.ctx.progress_budget = TokenBucket(rate=settings.status_progress_rate, burst=settings.status_progress_rate)
        self.checker = UpstreamChecker(self.ctx)
        self.ctx.on_credentials = self.checker.credentials_changed
        self.cache_poller = cache.CachePoller(self.ctx)
        for source in sources(settings.namespace, settings.agent_namespace):
            workload_pods = source.kind == "Pod" and source.namespace is None
            self.store.add(
                Informer(
                    client,
                    source,
                    self.on_workload_pod if workload_pods else self.on_change,
                    watch_timeout=settings.watch_timeout,
                    inactivity=settings.watch_inactivity,
                    on_relist=lambda kind: metrics.watch_restarts.labels(kind=kind).inc(),
                    clock=clock,
                )
            )
        self._tasks: list[asyncio.Task[Any]] = []
        self._started = False

    # ------------------------------------------------------------ events

    def on_change(self, kind: str, name: str, old: Any, new: Any) -> None:
        """Route one store change to the keys it affects (see the module docstring)."""
        if not self._started:
            return  # the first lists fill the store; start() then queues every key once
        enqueue = self.ctx.enqueue
        coalesce = self.settings.status_coalesce
        if kind == c.KIND:
            if new is None:
                self.ctx.records.pop(name, None)
                self.checker.forget(name)
                enqueue(PLAN, after=SINGLETON_COALESCE)
                enqueue(HOSTS, after=SINGLETON_COALESCE)
                return
            if _without(old, "status") != _without(new, "status"):
                if _without(old, "status", meta_too=("finalizers",)) == _without(new, "status", meta_too=("finalizers",)):
                    # Only the finalizers: mostly our own patch echoed back. Only the children reconciler reads
                    # them (it puts ours back if someone removed it); every other pass would change nothing.
                    enqueue(CHILDREN, name)
                    return
                enqueue(ACCESS, name)
                enqueue(CHILDREN, name)
                enqueue(STATUS, name, after=coalesce)
                enqueue(PLAN, after=SINGLETON_COALESCE)
                enqueue(HOSTS, after=SINGLETON_COALESCE)
            return
        if kind in CHILD_KINDS and isinstance(child := new or old, PackedChild):
            mirror = child.mirror
            if self.store.mirror(mirror) is None:
                return
            if new is None or not new.same_but_status(old):
                enqueue(CHILDREN, mirror)
            enqueue(STATUS, mirror, after=coalesce)
            if kind == "Service":
                enqueue(PLAN, after=SINGLETON_COALESCE)
            return
        if kind == "Secret":
            if name == NODE_SECRET_NAME:
                enqueue(PLAN, after=SINGLETON_COALESCE)  # the nodes' credentials, edited or deleted: the plan puts them back
                return
            for mirror, rec in self.ctx.records.items():
                if name in rec.secret_names:
                    enqueue(CHILDREN, mirror)
                    enqueue(PLAN, after=SINGLETON_COALESCE)
                ours = name == auth_secret_name(mirror) or name.startswith(client_secret_name(mirror, ""))
                # Its access Secret or an access client's, edited or deleted by hand; not our own write echoed.
                if ours and (new is None or rec.access_written.get(name) != new.get("fingerprint")):
                    enqueue(ACCESS, mirror)
            return
        if kind == "Node" and (old or {}).get("addresses") != (new or {}).get("addresses"):
            # The NetworkPolicies admit the nodes' addresses.
            for mirror in self.store.mirrors():
                enqueue(CHILDREN, mirror)
        if kind == "Node":
            if (old or {}).get("labels") != (new or {}).get("labels"):
                self.ctx.nodes.index = None
                if new is None:
                    self.ctx.nodes.applied.pop(name, None)
                enqueue(ROLLOUT, after=SINGLETON_COALESCE)
            return
        if kind == "Pod":
            pod = new or old or {}
            if new is not None and new["ready"] and not new["deleting"]:
                self.ctx.nodes.applied[new["node"]] = new["digest"]
            self.ctx.nodes.index = None
            if pod:
                enqueue(ROLLOUT, after=SINGLETON_COALESCE)
            return
        if kind in ("DaemonSet", "ConfigMap") and (old is None or new is None or _without(old) != _without(new)):
            # Not for a DaemonSet status update (its status is not kept, so only the resourceVersion moved):
            # a rollout to 1,000 nodes brings hundreds, and none changes what the plan pass compares.
            enqueue(PLAN, after=SINGLETON_COALESCE)

    def on_workload_pod(self, _kind: str, _name: str, old: dict[str, Any] | None, new: dict[str, Any] | None) -> None:
        """A pod of any namespace changed: the pins are recomputed (debounced) when its images did."""
        if self._started and (old or {}).get("images") != (new or {}).get("images"):
            self.ctx.enqueue(PINS, after=self.settings.cache_pins_debounce)

    # ------------------------------------------------------------ workers

    async def _process(self, key: Key) -> None:
        concern, name = key
        started = time.monotonic()
        try:
            result: Result = await RECONCILERS[concern](self.ctx, name)
        except Exception as exc:  # a bug must not kill the worker; it is retried with backoff
            log.exception("%s of %r crashed", concern, name)
            result = Transient(f"{type(exc).__name__}: {exc}")
        self.metrics.reconcile_seconds.labels(concern=concern).observe(time.monotonic() - started)
        if isinstance(result, Done):
            self.metrics.reconciles.labels(outcome="success").inc()
            self.queue.forget(key)
        elif isinstance(result, RequeueAfter):
            self.metrics.reconciles.labels(outcome="success").inc()
            self.queue.forget(key)
            self.queue.add_after(key, result.seconds)
        elif isinstance(result, Transient):
            self.metrics.reconciles.labels(outcome="error").inc()
            delay = self.queue.add_rate_limited(key, at_least=result.after)
            log.debug("%s of %r: %s; retry in %.1fs", concern, name, result.error, delay)
        elif isinstance(result, Terminal):
            self.metrics.reconciles.labels(outcome="terminal").inc()
            self.queue.forget(key)

    async def _worker(self) -> None:
        while True:
            try:
                key = await self.queue.get()
            except ShutDown:
                return
            try:
                await self._process(key)
            finally:
                self.queue.done(key)
                self.metrics.queue_depth.set(len(self.queue))
                self.metrics.queue_scheduled.set(self.queue.pending() - len(self.queue))

    async def _resync(self) -> None:
        """Every `resync_interval`, re-check every key from the store, spread over a tenth of the interval."""
        while True:
            await asyncio.sleep(self.settings.resync_interval)
            names = list(self.store.mirrors())
            spread = self.settings.resync_interval / 10
            for i, name in enumerate(names):
                self.ctx.enqueue(CHILDREN, name, after=spread * i / max(1, len(names)))
                self.ctx.enqueue(STATUS, name, after=spread * i / max(1, len(names)))
            for singleton in (PLAN, ROLLOUT, HOSTS):
                self.ctx.enqueue(singleton)

    def _publish(self) -> None:
        mirrors = self.store.mirrors()
        ready = sum(
            1
            for m in mirrors.values()
            if any(cd.get("type") == "Ready" and cd.get("status") == "True" for cd in (m.get("status") or {}).get("conditions") or [])
        )
        self.metrics.mirrors.set(len(mirrors))
        self.metrics.mirrors_ready.set(ready)

    async def _gauges(self) -> None:
        while True:
            self._publish()
            await asyncio.sleep(5.0)

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Start the watches, wait until every collection is listed, then the workers (every key once)."""
        loop = asyncio.get_running_loop()
        for informer in self.store.informers.values():
            self._tasks.append(loop.create_task(informer.run(), name=f"watch {informer.source.kind}"))
        while not self.store.synced():
            await asyncio.sleep(0.05)
        self._started = True
        # Nodes that ran a Ready agent pod when we started keep counting as applied.
        for pod in self.store.agent_pods().values():
            if pod["ready"] and not pod["deleting"]:
                self.ctx.nodes.applied[pod["node"]] = pod["digest"]
        for singleton in (HOSTS, PLAN, ROLLOUT):
            self.ctx.enqueue(singleton)
        for name in self.store.mirrors():
            self.ctx.enqueue(ACCESS, name)
            self.ctx.enqueue(CHILDREN, name)
            self.ctx.enqueue(STATUS, name, after=self.settings.status_coalesce)
        for i in range(self.settings.workers):
            self._tasks.append(loop.create_task(self._worker(), name=f"worker {i}"))
        self._tasks.append(loop.create_task(self._resync(), name="resync"))
        self._tasks.append(loop.create_task(self._gauges(), name="gauges"))
        self.cache_poller.start()
        log.info(
            "controller started: %d mirrors, %d nodes, %d workers",
            len(self.store.mirrors()),
            len(self.store.nodes()),
            self.settings.workers,
        )

    async def stop(self) -> None:
        """Stop the workers, the watches and the checks."""
        self.queue.shutdown()
        for task in self._tasks:
            await cancel_quietly(task)
        self._tasks.clear()
        await self.checker.stop()
        await self.cache_poller.stop()

    def memory_holders(self) -> dict[str, Any]:
        """The controller's large objects by name, for the memory report."""
        holders: dict[str, Any] = {f"store {kind} ({ns or 'cluster'})": i.items for (kind, ns), i in self.store.informers.items()}
        holders |= {"mirror records": self.ctx.records, "node plan and history": self.ctx.plan, "node state": self.ctx.nodes}
        holders |= {"host routes": self.ctx.routes}
        holders |= {"pin index": self.ctx.pin_index}
        return holders

    def liveness(self) -> dict[str, Any]:
        """What the liveness probe reports; raises when the operator has been unable to watch for too long."""
        blind = self.store.blind_for()
        if blind > self.settings.liveness_stale:
            raise RuntimeError(f"a watch has failed for {blind:.0f}s (limit {self.settings.liveness_stale:.0f}s)")
        return {"mirrors": len(self.store.mirrors()), "queue": self.queue.pending(), "synced": self.store.synced()}
