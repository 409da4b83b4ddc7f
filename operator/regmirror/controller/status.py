"""The status reconciler (one key per mirror): gather -> evaluate (observe.py, pure) -> write.

What is written, and when:
- nothing, when the evaluated status equals the stored one;
- at once, when something a reader acts on changed: Ready, Stalled or
  UpstreamAuthenticated flipped, a problem reason appeared or changed, or the
  observed generation, the endpoint or a host position changed;
- otherwise (node counts, replica counts, cache counters, messages) as
  progress: at most once per `status_progress_interval` per mirror, and at
  most `status_progress_rate` per second for all mirrors together. While a
  mirror is not Ready, each progress write in a row waits twice as long as
  the one before (60 s, 120 s, 240 s ... at most 16 intervals apart) until a
  write a reader acts on (Ready, a problem) starts the count again. A new
  mirror that is progressing normally gets its first status when it is
  Ready, has a problem, or after that interval. So a mirror that converges
  quickly is written once, and one whose rollout takes T seconds costs about
  log2(T / interval) progress writes, not T / interval: the writes per mirror
  of a convergence barely grow with the cluster (the large benchmark wrote
  about 14 per mirror over an 11-minute convergence at a fixed interval).

Events: a Warning when Ready turns False for a reason an admin must act on,
and a Normal MirrorReady when a mirror recovers from one. What was announced
is seeded from the live status, so an operator restart posts nothing.
"""

from __future__ import annotations

import logging
from typing import Any

from regmirror import constants as c
from regmirror.cachestatus import cache_state
from regmirror.conditions import get_condition
from regmirror.controller.cache import node_usage
from regmirror.controller.rollout import mirror_rollout
from regmirror.controller.state import ConfigError, Context, Done, MirrorRecord, RequeueAfter, Result, Terminal, Transient
from regmirror.drift import status_changed
from regmirror.kube import ApiError
from regmirror.models import status_written
from regmirror.observe import Observation, evaluate, invalid_status, typed_status

log = logging.getLogger("regmirror.status")

# While a mirror converges, progress-only writes in a row are spaced 1, 2, 4, 8, then 16 intervals apart.
PROGRESS_BACKOFF_STEPS = 4

# Ready reasons worth a Warning Event and an immediate write: the operator cannot fix them alone.
# Not AgentNotReady: a node's agent reports that itself (an Event on the Node), and during a
# rollout on a loaded cluster agents cross the grace period back and forth; treated as a
# problem, that flapping rewrote 500 statuses per pass (15,751 writes in the large benchmark).
# Not DeploymentMissing or ClaimMissing either: the operator creates those itself (a new mirror
# reported them at its first status: 153 Warning Events in the large benchmark).
PROBLEM_SUFFIXES = ("SecretMissing", "Malformed", "Rejected", "Failed", "InvalidSpec", "Forbidden", "ClaimTerminating")
URGENT_FIELDS = ("observedGeneration", "endpoint", "hosts", "url")


def observation(ctx: Context, name: str, mirror: dict[str, Any], rec: MirrorRecord) -> Observation | ConfigError:
    """Gather what the status of one mirror is computed from (store and records only, no API call)."""
    spec = rec.spec_of(mirror)
    if isinstance(spec, ConfigError):
        return spec
    deleting = bool(mirror["metadata"].get("deletionTimestamp"))
    rollout = mirror_rollout(ctx, name, rec, deleting=deleting)
    rec.rollout = rollout
    # The children's failing writes first, then the access Secrets', then the node plan's if it holds this
    # mirror's entry back: each retried before anyone is told.
    now, grace = ctx.clock(), ctx.settings.transient_grace
    repair = rec.repair.shown(now, grace) or rec.access_repair.shown(now, grace)
    if repair is None and name in ctx.plan.blocked:
        repair = ctx.plan.failing.shown(now, grace)
    auth = ctx.upstream_verdicts.get(name) if spec.upstream.credentials_secret_ref is not None else None
    error = rec.config_error
    return Observation(
        name=name,
        generation=mirror["metadata"].get("generation"),
        spec=spec,
        namespace=ctx.settings.namespace,
        deployment=ctx.store.child_view("Deployment", name),
        service=ctx.store.child_view("Service", name),
        pvc=ctx.store.child_view("PersistentVolumeClaim", name),
        nodes=rollout,
        deleting=deleting,
        error_reason=error.reason if error else None,
        error_message=error.message if error else "",
        repair=repair,
        host_routes={host: routes[name] for host, routes in ctx.routes.items() if name in routes},
        upstream_auth=auth,
        bootstrap=ctx.bootstrap.get(name),
        usage=None if deleting else node_usage(ctx, rec, spec, (mirror.get("status") or {}).get("nodes")),
    )


def _summary(status: dict[str, Any]) -> dict[str, Any]:
    # Ready, Stalled and UpstreamAuthenticated flips, and problem reasons, are news; Reconciling
    # and the phase follow progress (they flip back and forth while agents roll, and writing each
    # flip of 500 mirrors at once was a storm of thousands of writes in the large benchmark).
    # status.cache: its state is news, its counters progress (the poller already writes them at
    # most once a minute per mirror, cachestatus.next_cache_status).
    conds = {cd.get("type"): cd for cd in status.get("conditions") or []}
    summary: dict[str, Any] = {t: (conds.get(t) or {}).get("status") for t in ("Ready", "Stalled", "UpstreamAuthenticated")}
    summary["problems"] = sorted(p for p in (_problem(str(cd.get("reason", ""))) for cd in conds.values()) if p)
    summary["conditions"] = sorted(str(t) for t in conds)  # one appearing (ImageIndependent) or going
    summary |= {k: status.get(k) for k in URGENT_FIELDS}
    summary["cache"] = cache_state(status.get("cache"))
    return summary


def _problem(reason: str) -> str:
    # "Retrying": a repair has failed for longer than the grace period; show it now.
    return reason if reason.endswith(PROBLEM_SUFFIXES) or reason.startswith(("Upstream", "Apply", "Retrying")) else ""


def news(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What a reader acts on that differs between two statuses (empty: only progress counts or messages)."""
    before, after = _summary(old), _summary(new)
    out = []
    for key, value in after.items():
        if before[key] != value:
            short = key in ("Ready", "Stalled", "UpstreamAuthenticated", "problems", "conditions", "observedGeneration", "cache")
            out.append(f"{key} {before[key]} -> {value}" if short else key)
    return out


def _ready_key(status: dict[str, Any]) -> str | None:
    ready = get_condition(status.get("conditions"), "Ready")
    return f"{ready.get('status')}/{ready.get('reason')}" if ready else None


async def _announce(ctx: Context, mirror: dict[str, Any], rec: MirrorRecord, status: dict[str, Any]) -> None:
    key = _ready_key(status)
    if key is None or key == rec.announced:
        return
    previous, rec.announced = rec.announced, key
    ready = get_condition(status.get("conditions"), "Ready") or {}
    reason = str(ready.get("reason", ""))
    if ready.get("status") == "False" and reason.endswith(PROBLEM_SUFFIXES):
        await ctx.client.create_event(mirror, reason=reason, message=str(ready.get("message", "")), type_="Warning")
    elif (
        ready.get("status") == "True" and previous is not None and previous.startswith("False/") and previous[6:].endswith(PROBLEM_SUFFIXES)
    ):
        await ctx.client.create_event(mirror, reason=reason, message=str(ready.get("message", "")), type_="Normal")


async def reconcile_status(ctx: Context, name: str) -> Result:
    """Compute a mirror's status and write it when (and as soon as) it should be."""
    mirror = ctx.store.mirror(name)
    if mirror is None:
        return Done()
    rec = ctx.record(name)
    old = mirror.get("status") or {}
    if rec.announced is None:
        # Seed from what is already there: a restart must not announce every Ready mirror again.
        rec.announced = _ready_key(old) or "none"
    obs = observation(ctx, name, mirror, rec)
    generation = mirror["metadata"].get("generation")
    if isinstance(obs, ConfigError):
        new = invalid_status(generation, old.get("conditions") or [], obs.reason, obs.message)
    else:
        new = evaluate(obs, old.get("conditions") or [])
    # status.access: the access reconciler's view; until its first pass after a start, what the status holds
    # (a restarted operator's first status pass would otherwise drop it and write it back a moment later).
    access = rec.access.status if rec.access is not None else old.get("access")
    if access:
        new["access"] = access
    # status.cache: the poller's figures (controller/cache.py), else what the status holds (never dropped).
    cache = rec.cache_status.model_dump(mode="json", by_alias=True, exclude_none=True) if rec.cache_status is not None else old.get("cache")
    if cache:
        new["cache"] = cache
    if not status_changed(old, new):
        rec.progress_scheduled = False
        rec.progress_turn = None
        return Done()
    now = ctx.clock()
    if not status_written(old):
        # A new mirror progressing normally (not Ready, no problem): its first status waits.
        ready = get_condition(new.get("conditions"), "Ready") or {}
        problems = any(_problem(str(cd.get("reason", ""))) for cd in new.get("conditions") or [])
        # The cache's first figures (its pods answer) are not held back either.
        deferrable = ready.get("status") != "True" and not _stalled(new) and not problems and not new.get("cache")
        why = "progress (first status)" if deferrable else "first status"
        last = rec.first_seen
    else:
        changes = news(old, new)
        deferrable = not changes
        why = "progress" if deferrable else "; ".join(changes)
        last = rec.last_status_write if rec.last_status_write is not None else float("-inf")
    converging = (get_condition(new.get("conditions"), "Ready") or {}).get("status") != "True"
    spacing = 2 ** min(rec.progress_writes, PROGRESS_BACKOFF_STEPS) if converging else 1
    due = last + ctx.settings.status_progress_interval * spacing - now
    if deferrable and due <= 0:
        # Progress of every mirror together is written at a bounded rate, too: each mirror reserves its
        # place once and is handed out again when it comes (events in between find it still ahead).
        if rec.progress_turn is None:
            rec.progress_turn = now + ctx.progress_budget.reserve(now)
        due = rec.progress_turn - now
    if deferrable and due > 0:
        rec.progress_scheduled = True
        return RequeueAfter(due)
    body = {"apiVersion": c.API_VERSION, "kind": c.KIND, "metadata": {"name": name}, "status": typed_status(new)}
    try:
        result = await ctx.client.apply(body, subresource="status")
    except ApiError as exc:
        if exc.status == 404:
            return Done()
        if exc.invalid:
            # Sending the same status again cannot help: the next change (or the resync) tries a new one.
            message = f"the API server rejected the status of {name}: {exc.field_error()}"
            log.error("%s", message)
            return Terminal(message)
        log.warning("status of %s not written: %s; retrying with backoff", name, exc)
        return Transient(str(exc), exc.retry_after)
    log.info("status of %s written: %s", name, why)
    rec.last_status_write = now
    rec.progress_scheduled = False
    rec.progress_turn = None  # used, or not needed by a write a reader acts on
    rec.progress_writes = rec.progress_writes + 1 if deferrable and converging else 0
    mirror["status"] = result.get("status") or new
    mirror["metadata"]["resourceVersion"] = (result.get("metadata") or {}).get("resourceVersion", mirror["metadata"].get("resourceVersion"))
    await _announce(ctx, mirror, rec, mirror["status"])
    return Done()


def _stalled(status: dict[str, Any]) -> bool:
    stalled = get_condition(status.get("conditions"), "Stalled")
    return bool(stalled and stalled.get("status") == "True")
