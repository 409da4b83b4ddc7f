"""The node plan reconciler (one singleton key): the plan ConfigMap and the agent DaemonSet.

The plan lists every mirror with node configuration whose Service has a
ClusterIP; a mirror whose spec broke keeps the last entry nodes had, so a
broken spec never takes a working node configuration down. Each plan version
rolls the DaemonSet (its digest is on the pod template), so versions are
rationed: at most one per `plan_interval`, and a new plan waits while mirrors
that will be in it still lack a ClusterIP, as long as their Services keep
appearing or the operator still has their children or access passes to run
(at most `plan_wait_for_services`), which turns a burst of new mirrors into
one rollout even when the API server or the operator is slow.

After a restart the live ConfigMap seeds the history (which plan digest
carried which mirror entry) and the last good entries.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
from typing import Any

from regmirror import constants as c
from regmirror.access import NODE_SECRET_NAME
from regmirror.controller.access import seed_node_auth
from regmirror.controller.state import (
    ACCESS,
    CHILDREN,
    ROLLOUT,
    STATUS,
    ConfigError,
    Context,
    Done,
    MirrorRecord,
    RequeueAfter,
    Result,
    Transient,
    failure,
    logged,
    said,
)
from regmirror.drift import drifted
from regmirror.kube import ApiError
from regmirror.models import RegistryMirrorSpec, Runtime
from regmirror.nodeplan import MirrorEntry, NodePlan, build_node_plan, mirror_entry
from regmirror.observe import cluster_ip
from regmirror.render.access import render_node_auth_secret
from regmirror.render.agent import render_agent_daemonset, render_node_config_map
from regmirror.rollout import entry_digest

log = logging.getLogger("regmirror.plan")

# A new plan stops waiting for missing ClusterIPs when none appeared for this long.
PLAN_STALL = 3.0


def _mirror_ca(ctx: Context, spec: RegistryMirrorSpec) -> str | None:
    """The public CA nodes need to trust a TLS mirror: ca.crt, or tls.crt for a self-signed certificate."""
    if spec.service.tls is None:
        return None
    secret = ctx.store.secret(spec.service.tls.secret_name) or {}
    encoded = (secret.get("public") or {}).get("ca.crt") or (secret.get("public") or {}).get("tls.crt")
    if not encoded:
        return None
    try:
        return base64.b64decode(encoded).decode(errors="replace")
    except ValueError:
        return None


def _auth_revision(rec: MirrorRecord) -> int | None:
    """The credential revision the mirror's entry names: the access reconciler's, else the one nodes already have."""
    if rec.access is not None:
        return int(rec.access.plan_revision)
    return rec.last_good.auth_revision if rec.last_good is not None else None


async def _apply_node_auth(ctx: Context, plan: NodePlan) -> Result | None:
    """regmirror-agent-credentials for every mirror the plan gives a revision, before the plan that names it (None: done).

    After a start the live Secret seeds what the access reconciles have not
    decided yet, so a restart never takes a node's credential away.
    """
    try:
        await seed_node_auth(ctx)
    except ApiError as exc:
        return _failed(ctx, plan, f"reading Secret {ctx.settings.agent_namespace}/{NODE_SECRET_NAME}", exc)
    wanted = {e.name: ctx.node_auth[e.name] for e in plan.mirrors if e.auth_revision is not None and e.name in ctx.node_auth}
    secret = render_node_auth_secret(wanted, ctx.settings.agent_namespace)
    live = ctx.store.node_auth_secret()
    want = {k: hashlib.sha256(str(v).encode()).hexdigest() for k, v in secret["data"].items()}
    if live is not None and live.get("fingerprint") == want:
        return None
    if live is None and not wanted:
        return None
    try:
        await ctx.client.apply(secret)
    except ApiError as exc:
        return _failed(ctx, plan, f"applying Secret {ctx.settings.agent_namespace}/{NODE_SECRET_NAME}", exc)
    return None


def _failed(ctx: Context, plan: NodePlan, what: str, exc: ApiError) -> Result:
    """A request of the plan pass failed: nothing after it goes out (no plan before the credentials it names).

    Even a rejection is retried with backoff: the plan is ours, not the user's.
    The log names the field the API server rejected (its causes, which
    `str(exc)` leaves out) or what it forbids. The mirrors whose entries this
    plan would change (and only those: the others' nodes keep what they have)
    show it in their status, a transient failure once it lasted the grace period.
    """
    why = logged(exc)
    log.error("node plan: %s failed: %s; retrying with backoff", what, why)
    failing = ctx.plan.failing
    before = failing.error
    now = ctx.clock()
    # The log has the API server's words; the statuses the fields only (the plan's Secret holds node credentials).
    since = failing.failed(failure(exc, f"the node plan cannot be rolled out: {what} failed: {said(exc)}"), now)
    kept = {e.name for e in plan.mirrors}
    changed = {e.name for e in plan.mirrors if ctx.plan.entries.get(e.name) != entry_digest(e)}
    blocked = frozenset(changed | (set(ctx.plan.entries) - kept))  # new or changed entries, and removals
    # Statuses to compute again: every blocked mirror when the failure is new or now needs someone, else the
    # mirrors that joined or left the blocked ones; a transient failure is shown once it lasted the grace period.
    due = blocked if before is None or before.transient != exc.transient else blocked ^ ctx.plan.blocked
    ctx.plan.blocked = blocked
    after = max(0.0, since + ctx.settings.transient_grace - now) if exc.transient else 0.0
    for name in due:
        ctx.enqueue(STATUS, name, after=after)
    return Transient(why, exc.retry_after)


def _succeeded(ctx: Context) -> None:
    """The plan pass got through: a failure it showed clears from the mirrors' statuses."""
    if ctx.plan.failing.cleared():
        for name in ctx.plan.blocked:
            ctx.enqueue(STATUS, name)
    ctx.plan.blocked = frozenset()


def desired_plan(ctx: Context) -> tuple[NodePlan, list[str]]:
    """The plan from the store, and the mirrors that belong in it but still lack a ClusterIP (or a credential)."""
    entries: list[MirrorEntry] = []
    waiting: list[str] = []
    for name, mirror in ctx.store.mirrors().items():
        if mirror["metadata"].get("deletionTimestamp"):
            continue
        rec = ctx.record(name)
        spec = rec.spec_of(mirror)
        broken = isinstance(spec, ConfigError) or rec.config_error is not None
        if broken or not isinstance(spec, RegistryMirrorSpec):
            if rec.last_good is not None:
                entries.append(rec.last_good)
            continue
        if not spec.node_config.enabled:
            continue
        ip = cluster_ip(ctx.store.child_view("Service", name))
        if ip is None or (rec.access is None and rec.last_good is None):
            # No ClusterIP yet, or a new mirror whose credential is not decided yet (controller/access.py):
            # its entry waits, so nodes get the route and the credential in one plan (one rollout, not two).
            waiting.append(name)
            if rec.last_good is not None:
                entries.append(rec.last_good)
            continue
        ca, revision = _mirror_ca(ctx, spec), _auth_revision(rec)
        memo = rec.entry_inputs
        if memo is None or rec.last_good is None or memo[0] is not spec or memo[1:] != (ip, ca, revision):
            # The entry is rebuilt only when what it is made of changed: this pass runs on every Service
            # event of a burst, over every mirror (at 500 mirrors it was half the operator's CPU).
            rec.last_good = mirror_entry(name, spec, ip, ca_pem=ca, auth_revision=revision)
            rec.entry_inputs = (spec, ip, ca, revision)
        entries.append(rec.last_good)
    return build_node_plan(entries), waiting


def _seed_from_live(ctx: Context) -> None:
    """After a restart, broken mirrors keep the entry the nodes already have, and old digests stay known."""
    ctx.plan.seeded = True
    live = ctx.store.agent_object("ConfigMap")
    if not live:
        return
    data = live.get("data") or {}
    try:
        plan = NodePlan.from_json(data.get(c.NODE_CONFIG_KEY, "{}"))
    except ValueError:
        return
    try:
        history = json.loads(data.get(c.NODE_CONFIG_HISTORY_KEY, "{}"))
    except ValueError:
        history = {}
    if isinstance(history, dict):
        ctx.plan.history.seed({str(k): v for k, v in history.items() if isinstance(v, dict)})
    for entry in plan.mirrors:
        rec = ctx.records.get(entry.name)
        if rec is not None and rec.last_good is None:
            rec.last_good = entry
    ctx.plan.set(plan, ctx.plan.history.remember(plan))


def _working_on(ctx: Context, names: list[str]) -> bool:
    """Whether a children or access pass of one of these mirrors is still to run (queued, running, not failing)."""
    return any(ctx.queue.in_progress((concern, name)) for name in names for concern in (CHILDREN, ACCESS))


def _version(obj: dict[str, Any]) -> str | None:
    """What changes when someone edits the object: a ConfigMap's resourceVersion; a DaemonSet's generation (its
    status, updated all through a rollout, moves the resourceVersion but not what we render), labels and annotations."""
    meta = obj.get("metadata") or {}
    if obj.get("kind") != "DaemonSet":
        return meta.get("resourceVersion")
    if meta.get("generation") is None:
        return None
    return json.dumps([meta.get("generation"), meta.get("labels"), meta.get("annotations")], sort_keys=True)


def _unchanged_since_checked(ctx: Context, kind: str) -> bool:
    """Whether the live object is the version last found equal to (or written from) the current plan's rendering."""
    live = ctx.store.agent_object(kind)
    return live is not None and _version(live) is not None and ctx.plan.checked.get(kind) == _version(live)


async def reconcile_plan(ctx: Context, _name: str = "") -> Result:
    """Apply the node plan ConfigMap and the agent DaemonSet when they drifted."""
    now = ctx.clock()
    if not ctx.plan.seeded:
        _seed_from_live(ctx)
    plan, waiting = desired_plan(ctx)
    # Equal plans serialize (and hash) equally; comparing the models spares the JSON of every pass.
    changed = ctx.plan.plan is None or plan != ctx.plan.plan
    if changed and waiting:
        # Wait while Services keep appearing (a burst under load can take tens of seconds), but not for one
        # that does not come: PLAN_STALL seconds with no new one, and no pass of the operator's own still to
        # run for the mirrors waited for, end the wait. (Counting only new ClusterIPs, a burst of 500 on a busy
        # operator went out as three plans, each one restarting the agent rollout on 1,000 nodes.)
        if ctx.plan.waiting_since is None or len(waiting) < ctx.plan.waiting or _working_on(ctx, waiting):
            ctx.plan.last_progress = now
        ctx.plan.waiting_since = ctx.plan.waiting_since or now
        ctx.plan.waiting = len(waiting)
        give_up = min(ctx.plan.waiting_since + ctx.settings.plan_wait_for_services, ctx.plan.last_progress + PLAN_STALL)
        if now < give_up:
            # Every ClusterIP that appears (a Service event) and every credential decided queues this key: the
            # timer only ends the wait. (Polling every 0.2 s recomputed the plan of 500 mirrors five times a second.)
            return RequeueAfter(give_up - now)
    if changed and now - ctx.plan.last_apply < ctx.settings.plan_interval:
        return RequeueAfter(ctx.settings.plan_interval - (now - ctx.plan.last_apply))
    ctx.plan.waiting_since = None
    previous = ctx.plan.plan
    digest = plan.digest() if changed or ctx.plan.digest is None else ctx.plan.digest
    if not plan.mirrors and ctx.store.agent_object("ConfigMap") is None and ctx.store.agent_object("DaemonSet") is None:
        # Nothing to configure and nothing to clean up: no agent on any node until the first
        # mirror (whose plan then creates the DaemonSet, which is faster than a rolling update).
        ctx.plan.set(plan, digest)
        _succeeded(ctx)
        return Done()
    waiting_for_credentials = await _apply_node_auth(ctx, plan)
    if waiting_for_credentials is not None:
        return waiting_for_credentials
    if not changed and all(_unchanged_since_checked(ctx, kind) for kind in ("ConfigMap", "DaemonSet")):
        # Same plan, and neither object changed since it last matched: rendering 500 entries to compare
        # them again is the one cost of this pass (it runs on every Service event).
        _succeeded(ctx)
        return Done()
    if changed:
        ctx.plan.history.remember(plan, digest)
    # What matched the plan before does not say it matches this one (nor, after a failed write, the plan kept).
    ctx.plan.checked.clear()
    ns = ctx.settings.agent_namespace
    objects = [
        render_node_config_map(plan, ns, ctx.plan.history.as_dict()),
        render_agent_daemonset(
            plan,
            ns,
            ctx.settings.agent_image,
            containerd_config_path=ctx.settings.containerd_config_path,
            crio=any(Runtime.CRIO in e.runtimes for e in plan.mirrors),
            guard_connections=ctx.settings.agent_guard_connections,
        ),
    ]
    for obj in objects:
        live = ctx.store.agent_object(obj["kind"])
        if obj["kind"] == "ConfigMap" and live is not None and not changed:
            # The history only grows when the plan changes: compare the plan itself.
            obj["data"][c.NODE_CONFIG_HISTORY_KEY] = (live.get("data") or {}).get(c.NODE_CONFIG_HISTORY_KEY, "")
        if live is not None and not drifted(obj, live):
            ctx.plan.checked[obj["kind"]] = _version(live)
            continue
        log.info("applying %s %s/%s (node plan %s, %d mirrors)", obj["kind"], ns, obj["metadata"]["name"], digest, len(plan.mirrors))
        try:
            result = await ctx.client.apply(obj)
        except ApiError as exc:
            ctx.plan.checked.clear()
            return _failed(ctx, plan, f"applying {obj['kind']} {ns}/{obj['metadata']['name']}", exc)
        ctx.store.put_agent_object(result)
        ctx.plan.checked[obj["kind"]] = _version(result)
        ctx.plan.last_apply = ctx.clock()
    _succeeded(ctx)
    if not changed:
        return Done()
    old = dict(ctx.plan.entries) if previous is not None else {}
    old_digest = ctx.plan.digest
    ctx.plan.set(plan, digest)
    if previous is None or old_digest != digest:
        new = ctx.plan.entries
        for name in set(old) | set(new):
            if old.get(name) != new.get(name) and name in ctx.records:
                ctx.records[name].progress_scheduled = False
                ctx.enqueue(STATUS, name, after=ctx.settings.status_coalesce)
        ctx.enqueue(ROLLOUT)
    return Done()
