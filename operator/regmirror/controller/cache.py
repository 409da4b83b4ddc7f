"""The cache's two inputs from the cluster and its one output to the status.

- Pins: the cache sidecar never evicts the images running pods use. A
  cluster-wide Pod watch keeps each pod as the digests of its imageIDs
  (store.py slim_workload_pod); pod changes queue the PINS singleton after
  `cache_pins_debounce`, which rebuilds one index (registry host -> digests)
  and queues CHILDREN only for the mirrors whose pins changed; the children
  reconciler renders the mirror's ConfigMap with `mirror_pins`. A burst of
  pod starts is thus one ConfigMap write per affected mirror, and a pod event
  that changes no digest (readiness, restarts) costs nothing.
- Invalidations: the `regmirror.dev/invalidate` annotation is kept in the
  store (a change queues the mirror like a spec change) and rendered into the
  same ConfigMap by the children reconciler (`mirror_invalidations`).
- status.cache: one background task (off the work queue, like the upstream
  credentials check) polls every ready mirror pod's sidecar (`GET /stats` on
  CACHE_SIDECAR_PORT) every `cache_stats_interval`, keeps each pod's last
  answer in the mirror's record, merges them (cachestatus.merge_reports) and
  applies cachestatus.next_cache_status's rate rule; only a change queues
  STATUS, which writes `rec.cache_status`. A pod that does not answer keeps
  its last figures and is counted in `staleReplicas`; a mirror none of whose
  pods ever answered gets no status.cache (nothing to say yet) and costs no
  write. A poll never fails a reconcile: errors are a stale pod, nothing more.
- status.nodes.pulledRecently: the same answers carry the client addresses
  the front saw pulling in the last 24 h; the poll maps them to node names
  at once (nodeusage.NodeLocator, built once per round from the store's
  nodes) and keeps only the names per pod (`rec.cache_clients`); the status
  reconciler counts the selected nodes among them (`node_usage`). A change
  in who was seen queues STATUS like a counter change (progress, bounded).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp

from regmirror import constants as c
from regmirror.cachestatus import digests_by_registry, invalidation_requests, merge_reports, next_cache_status, pins_of
from regmirror.controller.state import CHILDREN, STATUS, Context, Done, MirrorRecord, Result
from regmirror.kube import cancel_quietly
from regmirror.models import CacheStatus, RegistryMirrorSpec
from regmirror.nodeusage import MAX_NAMED, NodeAddresses, NodeLocator, clients_of, counts, reports_clients
from regmirror.render.front import CACHE_SIDECAR_PORT

log = logging.getLogger("regmirror.cache")

# Polls in flight at once, all mirrors together (each waits at most cache_stats_timeout, so a
# round over 500 silent pods takes about 500 / 32 x 3 s; sockets, not CPU).
POLL_CONCURRENCY = 32
# A /stats answer larger than this is not a sidecar's (a few hundred bytes, a few KiB with its clients).
MAX_STATS_BYTES = 256 << 10
# What is kept of each answer (merge_reports reads nothing else; the rest is not held per pod).
REPORT_KEYS = (
    "hits",
    "misses",
    "bytesServed",
    "bytesFromUpstream",
    "diskUsed",
    "diskCap",
    "pinnedImages",
    "upstreamReachable",
    "lastEviction",
    "prewarm",
    "observedAt",
    "clients",  # turned into node names at once (decide), never kept as addresses
)


def pin_index(ctx: Context) -> dict[str, set[str]]:
    """Registry host -> digests of the images running pods use (built from the store when unknown)."""
    if ctx.pin_index is None:
        ctx.pin_index = digests_by_registry(i for pod in ctx.store.workload_pods().values() for i in pod["images"])
    return ctx.pin_index


def mirror_pins(ctx: Context, name: str, spec: RegistryMirrorSpec) -> frozenset[str]:
    """The pins to render into a mirror's ConfigMap (remembered: PINS compares against them)."""
    pins = pins_of(pin_index(ctx), spec.upstream.effective_hosts())
    ctx.record(name).pins = pins
    return pins


def mirror_invalidations(mirror: Mapping[str, Any]) -> dict[str, str]:
    """The tag invalidations the mirror's annotation asks for (malformed parts left out)."""
    annotations = (mirror.get("metadata") or {}).get("annotations") or {}
    return invalidation_requests(annotations.get(c.ANNOTATION_INVALIDATE))


async def reconcile_pins(ctx: Context, _name: str) -> Result:
    """Rebuild the pin index from the store; queue the children of every mirror whose pins changed."""
    ctx.pin_index = None
    index = pin_index(ctx)
    for name, mirror in ctx.store.mirrors().items():
        rec = ctx.records.get(name)
        if rec is None or rec.pins is None:
            continue  # never rendered yet: its first children reconcile computes its pins
        spec = rec.spec_of(mirror)
        if isinstance(spec, RegistryMirrorSpec) and pins_of(index, spec.upstream.effective_hosts()) != rec.pins:
            ctx.enqueue(CHILDREN, name)
    return Done()


def stats_url(ip: str) -> str:
    """The cache sidecar's /stats on a pod's IP (render/cache.py sidecar_container listens there)."""
    host = f"[{ip}]" if ":" in ip else ip
    return f"http://{host}:{CACHE_SIDECAR_PORT}/stats"


def mirror_stats_targets(ctx: Context) -> dict[str, dict[str, str]]:
    """mirror -> {pod key -> its IP}: the ready mirror pods to poll."""
    targets: dict[str, dict[str, str]] = {}
    for key, pod in ctx.store.workload_pods().items():
        if pod.get("mirror") and pod.get("ready") and pod.get("ip"):
            targets.setdefault(pod["mirror"], {})[key] = pod["ip"]
    return targets


def seeded_status(mirror: Mapping[str, Any]) -> CacheStatus | None:
    """status.cache as the live object has it (after a restart: nothing changed means nothing written)."""
    live = (mirror.get("status") or {}).get("cache")
    if not isinstance(live, dict):
        return None
    try:
        return CacheStatus.model_validate(live)
    except ValueError:
        return None


def node_locator(ctx: Context) -> NodeLocator:
    """Client address -> node, from the store's nodes (built once per poll round)."""
    return NodeLocator(
        NodeAddresses.of(name, [*node.get("addresses", ()), *node.get("externalAddresses", ())], node.get("podCIDRs", ()))
        for name, node in ctx.store.nodes().items()
    )


def nodes_seen(rec: MirrorRecord) -> frozenset[str] | None:
    """Nodes any of the mirror's pods saw pulling in the last 24 h; None when no pod reports clients."""
    if not rec.cache_clients:
        return None
    return frozenset().union(*rec.cache_clients.values())


def node_usage(ctx: Context, rec: MirrorRecord, spec: RegistryMirrorSpec, live: object) -> dict[str, Any] | None:
    """status.nodes' pulledRecently and notPulledRecently, or None while unknown (or no node is configured).

    Before the first answer since the operator started, what the live status says (`live`,
    its status.nodes) is kept: a restart rewrites nothing.
    """
    selector = spec.node_config.node_selector
    if not spec.node_config.enabled or selector is None:
        return None
    seen = nodes_seen(rec)
    if seen is None:
        return None if rec.cache_reports else kept_usage(live)
    return counts((name for name, node in ctx.store.nodes().items() if selector.matches(node["labels"])), seen)


def kept_usage(live: object) -> dict[str, Any] | None:
    """pulledRecently and notPulledRecently from a live status.nodes, if well formed (anyone can write a status)."""
    if not isinstance(live, Mapping):
        return None
    count, names = live.get("pulledRecently"), live.get("notPulledRecently")
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        return None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        return None
    return {"pulledRecently": count, "notPulledRecently": names[:MAX_NAMED]}


def decide(ctx: Context, name: str, pods: Mapping[str, str], answers: Mapping[str, Any], locator: NodeLocator | None = None) -> bool:
    """Fold one poll of a mirror's pods into its record; True when its status must be computed again
    (status.cache changed, or the nodes seen pulling did)."""
    mirror = ctx.store.mirror(name)
    if mirror is None:
        return False
    rec = ctx.record(name)
    seen_before = nodes_seen(rec)
    # Pods that are gone take their figures with them (their counters started and ended with them).
    reports = {key: report for key, report in rec.cache_reports.items() if key in pods}
    clients = {key: seen for key, seen in rec.cache_clients.items() if key in pods}
    for key, answer in answers.items():
        if answer is None:
            continue
        report = dict(answer)
        raw = report.pop("clients", None)
        if reports_clients({"clients": raw}):
            located = locator if locator is not None else node_locator(ctx)
            clients[key] = located.nodes_of(clients_of([{"clients": raw}]))
        reports[key] = report
    rec.cache_reports, rec.cache_clients = reports, clients
    seen_changed = nodes_seen(rec) != seen_before
    if not reports:
        return seen_changed  # no pod ever answered: no figures to show yet
    stale = sum(1 for key in pods if answers.get(key) is None)
    report = merge_reports(reports.values(), len(pods), stale)
    if rec.cache_status is None:
        rec.cache_status = seeded_status(mirror)
    now = ctx.clock()
    new = next_cache_status(report, rec.cache_status, rec.cache_decided, now)
    if new is None:
        return seen_changed
    rec.cache_status, rec.cache_decided = new, now
    return True


class CachePoller:
    """The status.cache poll: one task for every mirror, started and stopped by the manager."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        # Where a pod's figures are (tests point it at a sidecar on loopback).
        self.url_of: Callable[[str], str] = stats_url
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start polling (every `cache_stats_interval`, the first round at once; never when it is 0)."""
        if self.ctx.settings.cache_stats_interval <= 0:
            log.info("status.cache polls are off (cache_stats_interval is 0)")
            return
        self._task = asyncio.get_running_loop().create_task(self._run(), name="cache stats")

    @property
    def running(self) -> bool:
        """Whether the polls run."""
        return self._task is not None and not self._task.done()

    async def stop(self) -> None:
        """Stop polling."""
        if self._task is not None:
            await cancel_quietly(self._task)
            self._task = None

    async def _fetch(self, session: aiohttp.ClientSession, limit: asyncio.Semaphore, ip: str) -> Any:
        async with limit:
            try:
                async with session.get(self.url_of(ip), allow_redirects=False) as resp:
                    if resp.status != 200:
                        return None
                    body = await resp.content.read(MAX_STATS_BYTES + 1)
                    if len(body) > MAX_STATS_BYTES:
                        return None
                    doc = json.loads(body)
                    return {k: doc[k] for k in REPORT_KEYS if k in doc} if isinstance(doc, dict) else None
            except (aiohttp.ClientError, TimeoutError, ValueError, OSError):
                return None

    async def poll_once(self, session: aiohttp.ClientSession) -> None:
        """Poll every ready mirror pod once and queue the status of each mirror whose status.cache changed."""
        targets = mirror_stats_targets(self.ctx)
        limit = asyncio.Semaphore(POLL_CONCURRENCY)
        keys = [(name, key, ip) for name, pods in targets.items() for key, ip in pods.items()]
        answers = await asyncio.gather(*(self._fetch(session, limit, ip) for _, key, ip in keys))
        by_mirror: dict[str, dict[str, Any]] = {}
        for (name, key, _), answer in zip(keys, answers, strict=True):
            by_mirror.setdefault(name, {})[key] = answer
        locator = node_locator(self.ctx) if any(reports_clients(a) for a in answers) else None
        for name, pods in targets.items():
            if decide(self.ctx, name, pods, by_mirror.get(name, {}), locator):
                self.ctx.enqueue(STATUS, name, after=self.ctx.settings.status_coalesce)

    async def _run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=self.ctx.settings.cache_stats_timeout)
        async with aiohttp.ClientSession(timeout=timeout, trust_env=False) as session:
            while True:
                try:
                    await self.poll_once(session)
                except asyncio.CancelledError:
                    raise
                except Exception:  # a bug here must not end the polls
                    log.exception("cache stats poll crashed")
                await asyncio.sleep(self.ctx.settings.cache_stats_interval)
