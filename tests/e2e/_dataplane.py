"""Moved to ``harness.dataplane``; this name stays for the callers that still import it
(tests/e2e/test_agent_containerd.py, bench/dataplane.py)."""

from harness.dataplane import *  # noqa: F403
from harness.dataplane import __all__ as _moved
from harness.waiting import free_port, wait_for

__all__ = [*_moved, "free_port", "wait_for"]
