"""The children reconciler: one mirror's Deployment, Service, PVC and ConfigMap (and the optional ones), and its finalizer.

desired = render(spec); apply what drifted (only the fields we render count,
see drift.py); the store tells what exists, so an unchanged cluster costs no
API call at all. A new mirror's children go out in two waves of concurrent
applies: the Service, ConfigMap, claim and NetworkPolicy (with the finalizer),
then the Deployment, whose pods need the others. The node plan needs only the
Service, and the plan reconciler waits while new ClusterIPs keep appearing, so
a burst of new mirrors becomes one agent rollout. The claim is in the first
wave because provisioning is the long pole of a new mirror: in the benchmark a
claim waited about 6 s for its volume, and applying the children one after
another put it three round trips behind the Service. (An earlier version
applied every mirror's Service before any other child; that started the
agent rollout before the registry pods and their claims: all mirrors Ready
2.3x the baseline at 50 mirrors.)

Failures are classified: a spec the API server rejects (422) is the user's to
fix and is reported verbatim, then left alone until the spec or a Secret
changes; an unavailable API server is retried with per-key backoff and only
reported after a grace period, without touching Ready.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from typing import Any

from regmirror import constants as c
from regmirror import naming
from regmirror.conditions import get_condition
from regmirror.controller.cache import mirror_invalidations, mirror_pins
from regmirror.controller.rollout import mirror_rollout
from regmirror.controller.state import (
    PLAN,
    STATUS,
    ConfigError,
    Context,
    Done,
    MirrorRecord,
    RequeueAfter,
    Result,
    Terminal,
    Transient,
    failure,
)
from regmirror.drift import drifted
from regmirror.kube import ApiError
from regmirror.models import RegistryMirrorSpec
from regmirror.render.mirror import render_mirror_children

log = logging.getLogger("regmirror.children")

# A field we own that someone keeps changing is won back, but each repair in a
# row waits twice as long as the one before (1 s, 2 s, 4 s ... 5 min).
REPAIR_BACKOFF_BASE = 1.0
REPAIR_BACKOFF_MAX = 300.0
# Applied only once every other child was: the Deployment's pods mount the ConfigMap and the claim, and
# must never start before the NetworkPolicy that guards them. Everything else goes out at once.
AFTER_THE_REST = frozenset({"Deployment", "PodDisruptionBudget"})


def credentials_hash(ctx: Context, spec: RegistryMirrorSpec) -> str | ConfigError | None:
    """Fingerprint of every Secret value the mirror's pods use; a ConfigError when one is unusable."""
    parts: list[str] = []
    wanted: list[tuple[str, list[str], str]] = []
    ref = spec.upstream.credentials_secret_ref
    if ref is not None:
        wanted.append((ref.name, [ref.username_key, ref.password_key], "Credentials"))
    ca = spec.upstream.tls.ca_secret_ref if spec.upstream.tls else None
    if ca is not None:
        wanted.append((ca.name, [ca.key], "UpstreamCA"))
    if spec.service.tls is not None:
        wanted.append((spec.service.tls.secret_name, ["tls.crt", "tls.key"], "ServiceTLS"))
    ns = ctx.settings.namespace
    for name, keys, what in wanted:
        secret = ctx.store.secret(name)
        if secret is None:
            return ConfigError(f"{what}SecretMissing", f"Secret {ns}/{name} does not exist")
        missing = [k for k in keys if k not in secret["fingerprint"]]
        if missing:
            return ConfigError(f"{what}SecretMalformed", f"Secret {ns}/{name} lacks the key(s) {', '.join(missing)}")
        parts.append(",".join(f"{name}/{k}={secret['fingerprint'][k]}" for k in keys))
    if not parts:
        return None
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def _digest(obj: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _set_config_error(ctx: Context, name: str, rec: MirrorRecord, error: ConfigError | None) -> None:
    if rec.config_error != error:
        rec.config_error = error
        ctx.enqueue(STATUS, name)
        # A broken mirror keeps its last good node-plan entry; a repaired one gets its current one.
        ctx.enqueue(PLAN)


async def _ensure_finalizer(ctx: Context, mirror: dict[str, Any]) -> None:
    meta = mirror["metadata"]
    finalizers = list(meta.get("finalizers") or [])
    if c.FINALIZER in finalizers:
        return
    if finalizers:
        patch = [
            {"op": "test", "path": "/metadata/finalizers", "value": finalizers},
            {"op": "replace", "path": "/metadata/finalizers", "value": [*finalizers, c.FINALIZER]},
        ]
    else:
        patch = [
            {"op": "test", "path": "/metadata/resourceVersion", "value": meta.get("resourceVersion")},
            {"op": "add", "path": "/metadata/finalizers", "value": [c.FINALIZER]},
        ]
    result = await ctx.client.patch(c.KIND, None, meta["name"], patch)
    meta["finalizers"] = (result.get("metadata") or {}).get("finalizers") or [c.FINALIZER]
    meta["resourceVersion"] = (result.get("metadata") or {}).get("resourceVersion", meta.get("resourceVersion"))


async def _release(ctx: Context, mirror: dict[str, Any]) -> None:
    meta = mirror["metadata"]
    finalizers = list(meta.get("finalizers") or [])
    if c.FINALIZER not in finalizers:
        return
    patch = [
        {"op": "test", "path": "/metadata/finalizers", "value": finalizers},
        {"op": "replace", "path": "/metadata/finalizers", "value": [f for f in finalizers if f != c.FINALIZER]},
    ]
    try:
        await ctx.client.patch(c.KIND, None, meta["name"], patch)
    except ApiError as exc:
        if exc.status != 404:
            raise


def removal_progress(ctx: Context, name: str, rec: MirrorRecord) -> tuple[bool, str]:
    """During deletion: whether every node dropped the mirror's files (and what we wait for)."""
    plan = ctx.plan.plan
    if plan is None:
        return False, "the node plan is not known yet"
    if name in ctx.plan.entries:
        return False, "the node plan still lists this mirror"
    rollout = mirror_rollout(ctx, name, rec, deleting=True)
    if not rollout.enabled:
        return True, "node configuration disabled"
    if rollout.ready >= rollout.desired:
        return True, f"{rollout.desired} nodes dropped the configuration"
    return False, f"{rollout.ready}/{rollout.desired} nodes dropped the configuration; waiting for {', '.join(rollout.not_ready)}"


async def reconcile_children(ctx: Context, name: str) -> Result:
    """Bring one mirror's children (and finalizer) to the rendered state."""
    mirror = ctx.store.mirror(name)
    if mirror is None:
        ctx.records.pop(name, None)
        return Done()
    rec = ctx.record(name)
    try:
        if mirror["metadata"].get("deletionTimestamp"):
            done, why = removal_progress(ctx, name, rec)
            if not done:
                # Waiting for the nodes is normal: rollout events requeue this key; the timer is a safety net.
                log.info("mirror %s is being deleted: %s", name, why)
                return RequeueAfter(10.0)
            await _release(ctx, mirror)
            log.info("mirror %s: %s; finalizer released", name, why)
            return Done()
        if c.FINALIZER not in (mirror["metadata"].get("finalizers") or []):
            # Independent writes: the finalizer and the first child go out together.
            _, result = await asyncio.gather(_ensure_finalizer(ctx, mirror), _reconcile_spec(ctx, name, mirror, rec))
            return result
        return await _reconcile_spec(ctx, name, mirror, rec)
    except ApiError as exc:
        return _failed(ctx, name, rec, exc)


async def _reconcile_spec(ctx: Context, name: str, mirror: dict[str, Any], rec: MirrorRecord) -> Result:
    try:
        spec = rec.spec_of(mirror)
        if isinstance(spec, ConfigError):
            ctx.enqueue(STATUS, name)
            return Terminal(spec.message)
        creds = credentials_hash(ctx, spec)
        if isinstance(creds, ConfigError):
            _set_config_error(ctx, name, rec, creds)
            return Terminal(creds.message)
        rec.credentials = creds
        # The checker restarts only when what it checks (values, URL, proxy) changed.
        ctx.on_credentials(name, spec, creds)
        generation = mirror["metadata"].get("generation")
        if rec.rejected == (generation, creds):
            return Terminal("the API server rejected this spec; waiting for a change")
        return await _apply_children(ctx, name, mirror, spec, creds, rec)
    except ApiError as exc:
        return _failed(ctx, name, rec, exc)


def _repair_pause(repairs: int) -> float:
    """Seconds to wait before repairing a child's drift again after `repairs` repairs in a row (1 s, 2 s, 4 s ... 300 s)."""
    return float(min(REPAIR_BACKOFF_MAX, REPAIR_BACKOFF_BASE * 2 ** (repairs - 1)))


async def _apply_children(
    ctx: Context, name: str, mirror: dict[str, Any], spec: RegistryMirrorSpec, creds: str | None, rec: MirrorRecord
) -> Result:
    ns = ctx.settings.namespace
    uid = mirror["metadata"]["uid"]
    enforced = rec.access.enforced if rec.access is not None else None
    addresses, pins, invalidations = ctx.store.node_addresses(), mirror_pins(ctx, name, spec), mirror_invalidations(mirror)
    # Every event about a child (a Deployment's status, a claim's phase) runs this pass; rendering (config.yml is
    # YAML) was a tenth of the operator's CPU while 50 mirrors converged. The spec is memoized per generation, so
    # these inputs determine the rendering (without a generation, as in a hand-made object, nothing is memoized).
    inputs = (uid, rec.generation, creds, enforced, tuple(addresses), pins, tuple(sorted(invalidations.items())))
    if rec.generation is None or rec.rendered is None or rec.rendered[0] != inputs:
        children = render_mirror_children(
            name,
            uid,
            spec,
            ns,
            credentials_hash=creds,
            sidecar_image=ctx.settings.agent_image,
            access_enforced=enforced,
            node_addresses=addresses,
            pins=pins,
            invalidations=invalidations,
        )
        # Kept as compact JSON (16 KB a mirror instead of 53 KB of dicts): 500 converging mirrors held their
        # renderings at once, a fifth of the operator's memory peak (docs/performance.md, "Large").
        rec.rendered = (inputs, json.dumps(children, separators=(",", ":")), tuple(_digest(obj) for obj in children))
    desired = zip(json.loads(rec.rendered[1]), rec.rendered[2], strict=True)
    later: float | None = None
    waves: list[list[tuple[dict[str, Any], str, str, int]]] = [[], []]
    for obj, digest in desired:
        kind, child = obj["kind"], obj["metadata"]["name"]
        key = f"{kind}/{child}"  # a mirror has two Services with an external one: keyed by name, not kind
        live = ctx.store.child(kind, name, child)
        if live is not None and not drifted(obj, live):
            count, last = rec.drift_repairs.get(key, (0, 0.0))
            # Forget a fight only once the object has stayed as we render it for twice the last pause: a pass that
            # merely sees our own repair (any event of the mirror causes one) must not reset the backoff, or a
            # co-owner forcing the field every few seconds gets a write from us every time.
            if count and ctx.clock() - last > 2 * _repair_pause(count):
                rec.drift_repairs.pop(key, None)
            continue
        if rec.applied.get(key) != digest:
            rec.drift_repairs.pop(key, None)  # a new rendering is applied at once
        count, last = rec.drift_repairs.get(key, (0, float("-inf")))
        if count:
            wait = _repair_pause(count) - (ctx.clock() - last)
            if wait > 0:
                later = wait if later is None else min(later, wait)
                continue
        waves[1 if kind in AFTER_THE_REST else 0].append((obj, key, digest, count))
    for wave in waves:
        for obj, *_ in wave:
            log.info("applying %s %s/%s for mirror %s", obj["kind"], ns, obj["metadata"]["name"], name)
        # One wave's objects go out together: a new mirror costs two round trips, not one per child.
        results = await asyncio.gather(*(ctx.client.apply(obj) for obj, *_ in wave), return_exceptions=True)
        failure: BaseException | None = None
        for (obj, key, digest, count), result in zip(wave, results, strict=True):
            if isinstance(result, BaseException):
                failure = failure or result
                continue
            ctx.store.put_child(result)
            if rec.applied.get(key) == digest:
                rec.drift_repairs[key] = (count + 1, ctx.clock())
            rec.applied[key] = digest
            if obj["kind"] == "Service":
                ctx.enqueue(PLAN)
        rejected = next(((obj, r) for (obj, *_), r in zip(wave, results, strict=True) if isinstance(r, ApiError) and r.invalid), None)
        if rejected is not None:
            obj, exc = rejected
            message = f"the API server rejected {obj['kind']} {ns}/{obj['metadata']['name']}: {exc.field_error()}"
            rec.rejected = (mirror["metadata"].get("generation"), creds)
            _set_config_error(ctx, name, rec, ConfigError("ApplyRejected", message))
            log.warning("mirror %s: %s", name, message)
            return Terminal(message)
        if failure is not None:
            raise failure
    legacy = naming.legacy_cache_config_name(name)
    if ctx.store.child("ConfigMap", name, legacy) is not None:
        # Left by an earlier version; the Deployment just applied mounts the keys from the one ConfigMap.
        log.info("deleting ConfigMap %s/%s of mirror %s: its keys moved into %s", ns, legacy, name, naming.child_name(name))
        await ctx.client.delete("ConfigMap", ns, legacy)
    rec.rejected = None
    _set_config_error(ctx, name, rec, None)
    if rec.repair.cleared():
        ctx.enqueue(STATUS, name)
    ready = get_condition((mirror.get("status") or {}).get("conditions"), "Ready") or {}
    if not any(waves) and later is None and ready.get("status") == "True":
        # Converged: the rendering is kept only while events keep coming.
        rec.rendered = None
    return RequeueAfter(later) if later is not None else Done()


def _failed(ctx: Context, name: str, rec: MirrorRecord, exc: ApiError) -> Result:
    message = f"the API server did not take a write: {exc}" if exc.transient else f"applying the children failed: {exc}"
    rec.repair.failed(failure(exc, message), ctx.clock())
    # A transient failure is shown once it lasted the grace period; one that needs someone (403) at once.
    ctx.enqueue(STATUS, name, after=ctx.settings.transient_grace if exc.transient else 0.0)
    log.log(logging.INFO if exc.transient else logging.WARNING, "mirror %s: %s; retrying with backoff", name, exc)
    return Transient(str(exc), exc.retry_after)
