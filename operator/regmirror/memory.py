"""Where the operator's memory goes: a tracemalloc summary for the benchmark.

Enabled with REGMIRROR_TRACEMALLOC=<frames> (tracing costs CPU: never in
production); the summary is written at shutdown to REGMIRROR_TRACEMALLOC_OUT.
"""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path


def summary(limit: int = 15) -> dict[str, object]:
    """Current and peak traced memory, and the largest holders by file and by line."""
    current, peak = tracemalloc.get_traced_memory()
    snapshot = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
    by_file = snapshot.statistics("filename")[:limit]
    by_line = snapshot.statistics("lineno")[:limit]
    return {
        "current_mib": round(current / 2**20, 1),
        "peak_mib": round(peak / 2**20, 1),
        "by_file": [(str(s.traceback[0].filename), round(s.size / 2**20, 2)) for s in by_file],
        "by_line": [(f"{s.traceback[0].filename}:{s.traceback[0].lineno}", round(s.size / 2**20, 2)) for s in by_line],
    }


def dump_tracemalloc(path: str) -> None:
    """Write the summary as JSON (nothing when no path is set)."""
    if path:
        Path(path).write_text(json.dumps(summary(), indent=1))
