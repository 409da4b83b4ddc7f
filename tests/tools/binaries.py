"""Go-built tools (helm, kind, registry, versitygw) from tests/tools/build.sh, cached by version under ~/.cache/regmirror."""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path

BUILD_SCRIPT = Path(__file__).resolve().parent / "build.sh"


class ToolBuildError(RuntimeError):
    """build.sh could not produce the tool (no Go, no module proxy): a set-up failure, not a skip."""


@functools.cache
def go_tool(name: str) -> Path:
    """Path of `name` (helm, kind, registry or versitygw), built on first use; later calls return at once."""
    # stderr is inherited: a first build takes minutes and says what it does.
    result = subprocess.run(["bash", str(BUILD_SCRIPT), name], stdout=subprocess.PIPE, text=True, check=False)
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        raise ToolBuildError(f"{BUILD_SCRIPT} {name} failed (exit {result.returncode}); run `make {name}` to see why")
    return Path(lines[-1])
