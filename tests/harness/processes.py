"""Stopping the processes the harness starts: one way for every component."""

from __future__ import annotations

import os
import signal
import subprocess


def stop_process(proc: subprocess.Popen[bytes], timeout: float, *, group: bool = False) -> int:
    """SIGTERM, wait up to `timeout` seconds, then SIGKILL (the whole process group with `group`, for a
    component started in its own session whose children must go too); returns the exit code.

    A process that already exited is only reaped.
    """
    if proc.poll() is None:
        proc.terminate()
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            if group:
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                proc.kill()
    return proc.wait()
