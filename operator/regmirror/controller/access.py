"""The access reconciler (one key per mirror): who may pull, applied (regmirror/access.py decides it).

Each pass reads the mirror's access Secret and its access clients' Secrets
(values read for this pass only, as the upstream check does: the store keeps
hashes), takes the nodes' copy from what the operator last applied (seeded
from the live regmirror-agent-credentials after a restart), asks `decide_access`, and
applies what changed: the mirror's Secrets here; the nodes' copy goes out
with the node plan (the PLAN key applies it before the plan that names its
revision). The mirror's record keeps what other reconcilers need and no
credential: the revision the plan names, whether the access is enforced (an
HTTPS registry's config.yml) and the status.

A pass that waits for something (nodes to apply a revision, fronts to load a
new accepted set, the next rotation) requeues itself; Secret events (a hand
deleting or editing one) queue it at once.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from regmirror import access as acc
from regmirror.controller.rollout import mirror_rollout
from regmirror.controller.state import CHILDREN, PLAN, STATUS, ConfigError, Context, Done, RequeueAfter, Result, Transient
from regmirror.controller.store import slim_secret
from regmirror.kube import ApiError
from regmirror.models import RegistryMirrorSpec
from regmirror.render.access import decode_data, render_auth_secret, render_client_secret
from regmirror.units import duration_seconds

log = logging.getLogger("regmirror.access")

# While a rotation, a handover or a first rollout is under way, look again this often.
WAITING_RECHECK = 5.0


@dataclass(frozen=True)
class AccessView:
    """What the other reconcilers read of a mirror's access (no credential)."""

    plan_revision: int
    enforced: bool
    status: dict[str, Any]


def _fingerprint_matches(ctx: Context, secret: dict[str, Any]) -> bool:
    """Whether the store's hashes of a live Secret equal the rendered one (then nothing is written)."""
    live = ctx.store.secret(secret["metadata"]["name"])
    return live is not None and bool(live.get("fingerprint") == slim_secret(secret)["fingerprint"])


def _published(ctx: Context, name: str, spec: RegistryMirrorSpec) -> acc.Published | None:
    """The revision the applied node plan names for this mirror, and whether every node it selects applied it."""
    plan = ctx.plan.plan
    entry = next((e for e in plan.mirrors if e.name == name), None) if plan is not None else None
    if entry is None:
        return None
    rollout = mirror_rollout(ctx, name, ctx.record(name))
    return acc.Published(entry.auth_revision, rollout.enabled and rollout.ready >= rollout.desired)


async def seed_node_auth(ctx: Context) -> None:
    """Once after a start: what the live regmirror-agent-credentials holds, for the mirrors not decided yet."""
    if not ctx.node_auth_seeded:
        live = await ctx.client.get("Secret", ctx.settings.agent_namespace, acc.NODE_SECRET_NAME)
        for key, value in decode_data(live).items():
            ctx.node_auth.setdefault(key, value)
        ctx.node_auth_seeded = True


async def reconcile_access(ctx: Context, name: str) -> Result:
    """Decide and apply one mirror's access (see the module docstring)."""
    mirror = ctx.store.mirror(name)
    if mirror is None or mirror["metadata"].get("deletionTimestamp"):
        if ctx.node_auth.pop(name, None) is not None:
            ctx.enqueue(PLAN)
        return Done()
    rec = ctx.record(name)
    spec = rec.spec_of(mirror)
    if isinstance(spec, ConfigError):
        return Done()
    ns = ctx.settings.namespace
    try:
        auth = decode_data(await ctx.client.get("Secret", ns, acc.auth_secret_name(name)))
        clients = {}
        for client in spec.access.clients:
            data = decode_data(await ctx.client.get("Secret", ns, acc.client_secret_name(name, client.name)))
            if data:
                clients[client.name] = data
        await seed_node_auth(ctx)
        node_copy = ctx.node_auth.get(name)
    except ApiError as exc:
        return Transient(str(exc))
    decision = acc.decide_access(
        acc.AccessInputs(
            name,
            spec,
            now=time.time(),
            stored_state=auth.get(acc.STATE_KEY),
            stored_htpasswd=auth.get(acc.HTPASSWD_KEY),
            node_copy=node_copy,
            client_secrets=clients,
            published=_published(ctx, name, spec),
            rotate_request=str(((mirror["metadata"].get("annotations") or {}).get(acc.ANNOTATION_ROTATE)) or ""),
            min_rotation_spacing=ctx.settings.access_rotation_spacing,
        )
    )
    uid = mirror["metadata"]["uid"]
    secrets = [render_auth_secret(name, uid, ns, decision.auth_data)]
    secrets += [render_client_secret(name, uid, ns, client, data) for client, data in sorted(decision.client_data.items())]
    try:
        for secret in secrets:
            if not _fingerprint_matches(ctx, secret):
                log.info("applying Secret %s/%s for mirror %s", ns, secret["metadata"]["name"], name)
                await ctx.client.apply(secret)
            # The watch echoes our own write back: that event needs no pass (manager.on_change).
            rec.access_written[secret["metadata"]["name"]] = slim_secret(secret)["fingerprint"]
    except ApiError as exc:
        return Transient(str(exc))
    for reason, message in decision.events:
        log.info("mirror %s: %s", name, message)
        await ctx.client.create_event(mirror, reason=reason, message=message)
    if ctx.node_auth.get(name) != decision.node_entry:
        ctx.node_auth[name] = decision.node_entry
        ctx.enqueue(PLAN)
    view = AccessView(decision.plan_revision, decision.state.enforced, decision.status(spec.network_policy_enabled()))
    previous = rec.access
    rec.access = view
    if previous is None or previous.plan_revision != view.plan_revision:
        ctx.enqueue(PLAN)
    if previous is None or previous.enforced != view.enforced:
        ctx.enqueue(CHILDREN, name)  # an HTTPS registry's config.yml follows the enforcement
    if previous is None or previous.status != view.status:
        ctx.enqueue(STATUS, name, after=ctx.settings.status_coalesce)
    state = decision.state
    asked = (mirror["metadata"].get("annotations") or {}).get(acc.ANNOTATION_ROTATE)
    if state.retired is not None or state.handover_generation is not None or not state.enforceable:
        return RequeueAfter(WAITING_RECHECK)
    if asked and asked != state.rotation_token:
        # Asked for, and waiting for the spacing since the last rotation.
        return RequeueAfter(max(WAITING_RECHECK, state.rotated_at + ctx.settings.access_rotation_spacing - time.time()))
    period = duration_seconds(spec.access.rotate_every)
    if period > 0:
        return RequeueAfter(max(WAITING_RECHECK, state.rotated_at + period - time.time()))
    return Done()
