"""Each mirror's place among the mirrors of its hosts, and whose image strict mirrors hold (one singleton key).

status.hosts tells a mirror its 1-based position for each host and the head
of that host's order (the first `HEAD` mirrors nodes try), not every mirror
of the host: a mirror added behind the head changes no other mirror's status.
Positions are absolute because that is what nodes do; a mirror inserted
ahead of others moves them, and their statuses say so.
"""

from __future__ import annotations

from regmirror.controller.state import STATUS, ConfigError, Context, Done, Result
from regmirror.models import BootstrapConflict, RegistryMirrorSpec, bootstrap_conflicts
from regmirror.nodeplan import mirror_order_key

HEAD = 10


def host_routes(ctx: Context) -> dict[str, dict[str, tuple[int, list[str]]]]:
    """host -> mirror -> (position, head of the order), from every mirror's spec."""
    keyed: dict[str, list[tuple[tuple[int, str], str]]] = {}
    for name, mirror in ctx.store.mirrors().items():
        if mirror["metadata"].get("deletionTimestamp"):
            continue
        spec = ctx.record(name).spec_of(mirror)
        if isinstance(spec, ConfigError) or not isinstance(spec, RegistryMirrorSpec) or not spec.node_config.enabled:
            continue
        for host in spec.upstream.effective_hosts():
            keyed.setdefault(host, []).append((mirror_order_key(spec.node_config.priority, name), name))
    routes: dict[str, dict[str, tuple[int, list[str]]]] = {}
    for host, items in keyed.items():
        order = [name for _, name in sorted(items)]
        head = order[:HEAD]
        routes[host] = {name: (i + 1, head) for i, name in enumerate(order)}
    return routes


def image_dependencies(ctx: Context) -> dict[str, BootstrapConflict]:
    """mirror -> the strict mirrors its own image can only be pulled through (see models.bootstrap_conflicts)."""
    specs: dict[str, RegistryMirrorSpec] = {}
    for name, mirror in ctx.store.mirrors().items():
        spec = ctx.record(name).spec_of(mirror)
        if not mirror["metadata"].get("deletionTimestamp") and isinstance(spec, RegistryMirrorSpec):
            specs[name] = spec
    return {conflict.mirror: conflict for conflict in bootstrap_conflicts(specs)}


async def reconcile_hosts(ctx: Context, _name: str = "") -> Result:
    """Recompute the routes and image dependencies; queue the status of every mirror whose place or dependency changed."""
    new = host_routes(ctx)
    old = ctx.routes
    ctx.routes = new
    names = {n for routes in (*old.values(), *new.values()) for n in routes}
    changed = {
        name for name in names if {h: r[name] for h, r in old.items() if name in r} != {h: r[name] for h, r in new.items() if name in r}
    }
    old_bootstrap, ctx.bootstrap = ctx.bootstrap, image_dependencies(ctx)
    changed |= {name for name in set(old_bootstrap) | set(ctx.bootstrap) if old_bootstrap.get(name) != ctx.bootstrap.get(name)}
    for name in changed:
        ctx.enqueue(STATUS, name, after=ctx.settings.status_coalesce)
    return Done()
