"""metav1.Condition helpers: lastTransitionTime moves only when status flips."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

TRUE = "True"
FALSE = "False"
UNKNOWN = "Unknown"


def now_rfc3339() -> str:
    """Current time in the format metav1.Time uses (second precision, Z)."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def condition(type_: str, status: bool | str, reason: str, message: str = "") -> dict[str, Any]:
    """A condition without its timestamps (set_condition adds them)."""
    if isinstance(status, bool):
        status = TRUE if status else FALSE
    return {"type": type_, "status": status, "reason": reason, "message": message}


def set_condition(
    existing: list[dict[str, Any]], new: dict[str, Any], *, generation: int | None, now: str | None = None
) -> list[dict[str, Any]]:
    """Return `existing` with `new` merged in by type.

    Keeps the old lastTransitionTime unless the status changed, and stamps
    observedGeneration, like meta.SetStatusCondition in apimachinery.
    """
    stamped = dict(new)
    stamped["observedGeneration"] = generation
    previous = next((c for c in existing if c.get("type") == new["type"]), None)
    if previous is not None and previous.get("status") == new["status"] and previous.get("lastTransitionTime"):
        stamped["lastTransitionTime"] = previous["lastTransitionTime"]
    else:
        stamped["lastTransitionTime"] = now or now_rfc3339()
    out = [c for c in existing if c.get("type") != new["type"]]
    out.append(stamped)
    return out


def merge_conditions(
    existing: list[dict[str, Any]], new: list[dict[str, Any]], *, generation: int | None, now: str | None = None
) -> list[dict[str, Any]]:
    """Apply several conditions at once, in a stable order (the order of `new`).

    Types in `existing` that `new` does not mention are dropped: the set of
    conditions is fully determined by the current observation.
    """
    stamp = now or now_rfc3339()
    merged: list[dict[str, Any]] = []
    for cond in new:
        merged = [*merged, set_condition(existing, cond, generation=generation, now=stamp)[-1]]
    return merged


def get_condition(conditions: list[dict[str, Any]] | None, type_: str) -> dict[str, Any] | None:
    """The condition of a type, or None."""
    return next((c for c in conditions or [] if c.get("type") == type_), None)


def is_true(conditions: list[dict[str, Any]] | None, type_: str) -> bool:
    """Whether a condition of that type exists with status True."""
    found = get_condition(conditions, type_)
    return found is not None and found.get("status") == TRUE
