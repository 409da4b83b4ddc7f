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

A read or a write the API server refuses fails the pass (retried with
backoff: the Secrets are ours, so even a 403 or a 422 may pass once RBAC or
the API server is fixed) and changes nothing else: a Secret that could not be
read is never taken for a lost one, and the record keeps the last decision
that went out. The decision's Events about Secrets that did go out are
posted even so (the next pass decides from them and has nothing to say).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Any

from regmirror import access as acc
from regmirror.controller.rollout import mirror_rollout
from regmirror.controller.state import (
    CHILDREN,
    PLAN,
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
        return _failed(ctx, name, rec, "reading its access Secrets", exc)
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
    went_out: set[str] = set()
    for secret in secrets:
        secret_name = secret["metadata"]["name"]
        try:
            if not _fingerprint_matches(ctx, secret):
                log.info("applying Secret %s/%s for mirror %s", ns, secret_name, name)
                await ctx.client.apply(secret)
        except ApiError as exc:
            await _announce(ctx, mirror, decision, _events_about(name, decision.events, sorted(decision.client_data), went_out))
            return _failed(ctx, name, rec, f"applying Secret {ns}/{secret_name}", exc)
        went_out.add(secret_name)
        # The watch echoes our own write back: that event needs no pass (manager.on_change).
        rec.access_written[secret_name] = slim_secret(secret)["fingerprint"]
    await _announce(ctx, mirror, decision, decision.events)
    if rec.access_repair.cleared():
        ctx.enqueue(STATUS, name)
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


def _failed(ctx: Context, name: str, rec: MirrorRecord, what: str, exc: ApiError) -> Result:
    """A read or write of the pass failed: retried with backoff, logged with the field the API server rejected,
    and shown in the mirror's status once it lasts (a 403 at once: someone must act)."""
    why = logged(exc)
    if exc.transient:
        log.info("mirror %s: %s failed: %s; retrying with backoff", name, what, why)
    else:
        log.warning("mirror %s: %s failed: %s; retrying with backoff", name, what, why)
    rec.access_repair.failed(failure(exc, f"{what} failed: {said(exc)}"), ctx.clock())
    ctx.enqueue(STATUS, name, after=0.0 if not exc.transient else ctx.settings.transient_grace)
    return Transient(why, exc.retry_after)


def _events_about(name: str, events: Iterable[tuple[str, str]], clients: Iterable[str], secrets: Collection[str]) -> list[tuple[str, str]]:
    """The decision's events about the given Secrets: one whose message ends naming an access client's Secret is
    about that Secret, any other about the mirror's own."""
    client_secrets = [acc.client_secret_name(name, client) for client in clients]
    out = []
    for reason, message in events:
        about = next((s for s in client_secrets if message.endswith(f" in {s}")), acc.auth_secret_name(name))
        if about in secrets:
            out.append((reason, message))
    return out


async def _announce(ctx: Context, mirror: dict[str, Any], decision: acc.AccessDecision, events: Iterable[tuple[str, str]]) -> None:
    """Post the decision's events (the client makes them best effort)."""
    for reason, message in events:
        log.info("mirror %s: %s", decision.mirror, message)
        await ctx.client.create_event(mirror, reason=reason, message=message)
