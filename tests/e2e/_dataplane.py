"""Moved to ``harness.dataplane``; this name stays for the callers that still import it
(the e2e tests and the benchmarks)."""

from pathlib import Path

from harness.dataplane import *  # noqa: F403
from harness.dataplane import __all__ as _moved
from harness.dataplane.containerd import short_tmpdir
from harness.dataplane.deadmirror import HangingListener, blackholed, dead_mirror, iptables_usable
from harness.dataplane.node import OPERATOR_SRC
from harness.waiting import free_port, wait_for

HERE = Path(__file__).resolve().parent

__all__ = [
    *_moved,
    "HERE",
    "OPERATOR_SRC",
    "HangingListener",
    "blackholed",
    "dead_mirror",
    "free_port",
    "iptables_usable",
    "short_tmpdir",
    "wait_for",
]
