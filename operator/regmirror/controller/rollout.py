"""Node accounting for the controller: the ROLLOUT key and each mirror's NodeRollout.

Agent pod and Node events only mark the node index stale and queue the
ROLLOUT key; its pass rebuilds the index once (O(nodes)), computes every
mirror's NodeRollout (O(groups) each) and queues a mirror's status only when
its rollout changed: a Ready flip or a problem at once, progress counts when
no progress write is already scheduled. A 1,000-node rollout therefore costs a
few passes per second, not a status computation per pod event per mirror.
"""

from __future__ import annotations

import time
from typing import Any

from regmirror.conditions import is_true
from regmirror.controller.state import CHILDREN, STATUS, ConfigError, Context, Done, MirrorRecord, RequeueAfter, Result
from regmirror.models import RegistryMirrorSpec
from regmirror.observe import deployment_available, storage_status
from regmirror.rollout import Carried, NodeIndex, NodeRollout, newest_pods, node_rollout


def node_index(ctx: Context) -> NodeIndex:
    """The node index, rebuilt if a node or agent pod changed since it was built."""
    if ctx.nodes.index is None:
        pods = newest_pods(ctx.store.agent_pods().values())
        labels = {name: node["labels"] for name, node in ctx.store.nodes().items()}
        ctx.nodes.index = NodeIndex.build(labels, pods, ctx.nodes.applied, time.time())
    return ctx.nodes.index


def ready_may_flip(ctx: Context, name: str, mirror: dict[str, Any], rec: MirrorRecord, *, configured: bool) -> bool:
    """Whether the nodes' flip to `configured` can flip the mirror's Ready (its Deployment and claim decide the rest)."""
    ready = is_true((mirror.get("status") or {}).get("conditions"), "Ready")
    if not configured or ready or not isinstance(rec.spec, RegistryMirrorSpec):
        return ready and not configured
    available = deployment_available(ctx.store.child_view("Deployment", name), rec.spec.replicas)[0]
    return available and storage_status(rec.spec, ctx.store.child_view("PersistentVolumeClaim", name))[0]


def mirror_rollout(ctx: Context, name: str, rec: MirrorRecord, *, deleting: bool = False) -> NodeRollout:
    """Desired/updated/ready nodes for one mirror under the current plan."""
    spec = rec.spec
    if not isinstance(spec, RegistryMirrorSpec) or not spec.node_config.enabled:
        return NodeRollout(enabled=False)
    want: str | Carried | None = None if deleting else ctx.plan.entries.get(name, Carried.NOT_IN_PLAN)
    return node_rollout(node_index(ctx), ctx.plan.history, want, name, spec.node_config.node_selector, removing=deleting)


async def reconcile_rollout(ctx: Context, _name: str = "") -> Result:
    """Recompute every mirror's node accounting; queue the statuses (and deletions) it changed."""
    ctx.nodes.index = None
    index = node_index(ctx)
    for name, mirror in ctx.store.mirrors().items():
        rec = ctx.record(name)
        if rec.spec is None:
            rec.spec_of(mirror)
        if isinstance(rec.spec, ConfigError):
            continue
        deleting = bool(mirror["metadata"].get("deletionTimestamp"))
        rollout = mirror_rollout(ctx, name, rec, deleting=deleting)
        before = rec.rollout
        if rollout == before:
            continue
        rec.rollout = rollout
        if deleting:
            ctx.enqueue(CHILDREN, name)  # the finalizer may be released now
        flipped = before is not None and before.configured != rollout.configured
        if flipped or before is None or not rec.progress_scheduled:
            # When a rollout completes, a hundred mirrors of a burst may turn Ready at once, while its pod events
            # have queued progress passes of every other mirror: the passes that flip Ready go first.
            urgent = flipped and ready_may_flip(ctx, name, mirror, rec, configured=rollout.configured)
            ctx.enqueue(STATUS, name, after=ctx.settings.status_coalesce, urgent=urgent)
    if index.recheck_at is not None:
        # An agent's grace period ends then; no event will say so.
        return RequeueAfter(max(0.5, index.recheck_at - time.time()))
    return Done()
