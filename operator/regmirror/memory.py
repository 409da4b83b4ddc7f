"""Where the operator's memory goes: a tracemalloc summary and the deep size of each holder.

Enabled with REGMIRROR_TRACEMALLOC=<frames> (tracing costs CPU: never in
production); the summary is written at shutdown to REGMIRROR_TRACEMALLOC_OUT.
tracemalloc attributes an object to the line that allocated it (for watched
objects, the JSON decoder), so the holders are also measured directly: the
deep size of each store collection and of the controller's records.
"""

from __future__ import annotations

import json
import sys
import tracemalloc
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def deep_size(root: object) -> int:
    """Bytes held by `root` and everything it references (each object counted once)."""
    seen: set[int] = set()
    stack: list[object] = [root]
    total = 0
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, type):
            continue
        seen.add(id(obj))
        total += sys.getsizeof(obj)
        if isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
        elif hasattr(obj, "__dict__") and not callable(obj):
            stack.append(vars(obj))
        elif not callable(obj):  # an object with __slots__ (a packed child, store.py)
            stack.extend(getattr(obj, s) for cls in type(obj).__mro__ for s in getattr(cls, "__slots__", ()) if hasattr(obj, s))
    return total


def summary(holders: Mapping[str, Any], limit: int = 15) -> dict[str, object]:
    """Traced current and peak memory, the largest allocation sites, and the deep size of each holder."""
    current, peak = tracemalloc.get_traced_memory()
    snapshot = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
    by_file = snapshot.statistics("filename")[:limit]
    by_line = snapshot.statistics("lineno")[:limit]
    sizes = sorted(((name, round(deep_size(obj) / 2**20, 2)) for name, obj in holders.items()), key=lambda x: -x[1])
    return {
        "current_mib": round(current / 2**20, 1),
        "peak_mib": round(peak / 2**20, 1),
        "holders_mib": sizes,
        "by_file": [(str(s.traceback[0].filename), round(s.size / 2**20, 2)) for s in by_file],
        "by_line": [(f"{s.traceback[0].filename}:{s.traceback[0].lineno}", round(s.size / 2**20, 2)) for s in by_line],
    }


def dump_tracemalloc(path: str, holders: Mapping[str, Any]) -> None:
    """Write the summary as JSON (nothing when no path is set)."""
    if path:
        Path(path).write_text(json.dumps(summary(holders), indent=1))
