"""py-spy on the operator while it converges: where its CPU goes, per thread and function."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

RATE = 50  # samples per second: enough for a minute-long window, light on a 2-core machine


def _py_spy() -> str | None:
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


class PySpy:
    """``py-spy record --format raw`` (collapsed stacks) on a pid, from start() to stop()."""

    def __init__(self, pid: int, out: Path) -> None:
        self.pid = pid
        self.out = out
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0

    def start(self) -> None:
        binary = _py_spy()
        if binary is None:
            print("bench: py-spy not installed (pip install py-spy); no profile", file=sys.stderr)
            return
        argv = [
            binary,
            "record",
            "--pid",
            str(self.pid),
            "--rate",
            str(RATE),
            "--format",
            "raw",
            "--threads",
            "--nonblocking",
            "-o",
            str(self.out),
        ]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.started = time.monotonic()

    def stop(self) -> dict[str, Any]:
        if self.proc is None:
            return {}
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        seconds = time.monotonic() - self.started
        if not self.out.exists():
            err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
            return {"error": err[-500:]}
        return {"file": str(self.out), "seconds": round(seconds, 1), **summarize(self.out, seconds)}


def _frame(frame: str) -> str:
    # "reconcile_mirror (regmirror/reconcile.py:402)" -> "reconcile_mirror (regmirror/reconcile.py)"
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "lib/python3", "operator/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{name} ({path})" if where else name


def summarize(path: Path, seconds: float, top: int = 20) -> dict[str, Any]:
    """Busy samples per thread, and the functions with the most samples (self and inclusive)."""
    threads: Counter[str] = Counter()
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        try:
            count = int(count_text)
        except ValueError:
            continue
        frames = stack.split(";")
        total += count
        # "thread (12345): reconcile_2" -> "reconcile": pool threads counted together
        thread = frames[0].split(": ", 1)[-1]
        threads[re.sub(r"_\d+$", "", thread)[:60]] += count
        names = [_frame(f) for f in frames[1:]]
        if names:
            self_time[names[-1]] += count
        for name in set(names):
            inclusive[name] += count
    busy = total / RATE
    return {
        "samples": total,
        "busy_cpu_seconds_estimate": round(busy, 1),
        "busy_fraction_of_window": round(busy / seconds, 2) if seconds else None,
        "threads": {k: round(v / RATE, 1) for k, v in threads.most_common(8)},
        "top_self": [(k, round(v / RATE, 1)) for k, v in self_time.most_common(top)],
        "top_inclusive": [(k, round(v / RATE, 1)) for k, v in inclusive.most_common(top * 2)],
    }
