"""PURE: has an object drifted from what we render? Only the fields WE set count.

Server-side apply merges lists of named things (containers, env, ports,
volumes...) item by item, so another manager may add an env var to our
Deployment or a port to our Service without touching anything we own. Such an
addition is not drift and must cost no write. A field we set that is missing
or different is drift (someone scaled the Deployment, edited the ConfigMap,
or forced a field we own): it is applied again.

Lists of objects are matched by their merge key (`name`, else `mountPath`,
`containerPort` or `port`) and compared as "every item we render is there
and agrees"; lists of plain values and lists without such a key are atomic
in the API (one manager owns the whole list) and must be equal.
"""

from __future__ import annotations

from typing import Any

MERGE_KEYS = ("name", "mountPath", "containerPort", "port", "type")


def _merge_key(items: list[Any]) -> str | None:
    if not items or not all(isinstance(i, dict) for i in items):
        return None
    for key in MERGE_KEYS:
        values = [i.get(key) for i in items]
        if all(v is not None for v in values) and len(set(map(str, values))) == len(values):
            return key
    return None


def drifted(desired: Any, live: Any) -> bool:
    """Whether `live` lacks or differs in any field that `desired` sets (extra fields and list items are someone else's)."""
    if isinstance(desired, dict):
        if not isinstance(live, dict):
            return True
        return any(drifted(value, live.get(key)) for key, value in desired.items())
    if isinstance(desired, list):
        if not isinstance(live, list):
            return True
        key = _merge_key(desired)
        if key is None or _merge_key(live) != key:
            return len(live) != len(desired) or any(drifted(d, item) for d, item in zip(desired, live, strict=True))
        by_key = {str(item.get(key)): item for item in live}
        return any(drifted(item, by_key.get(str(item[key]))) for item in desired)
    return bool(desired != live)


def status_changed(old: dict[str, Any] | None, new: dict[str, Any]) -> bool:
    """Whether writing `new` would change anything a reader sees (both ways: a dropped field counts)."""
    old = old or {}
    return _differs(new, old) or _differs(old, new)


def _differs(a: Any, b: Any) -> bool:
    if isinstance(a, dict):
        if not isinstance(b, dict):
            return True
        return any(_differs(v, b.get(k)) for k, v in a.items())
    if isinstance(a, list):
        return not isinstance(b, list) or len(a) != len(b) or any(_differs(x, y) for x, y in zip(a, b, strict=True))
    return bool(a != b)
