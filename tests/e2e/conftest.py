"""Fixtures the data-path modules share: the node's containerd and the cache's programs.

Each installs or builds what is missing (as `make test` does beforehand) and skips
only if it cannot; under CI a skip fails the run (harness/skipguard.py).
"""

from __future__ import annotations

import pytest

from harness.cachepath import distribution_v3
from harness.dataplane import ContainerdBinaries, ensure_binaries, ensure_commands, system_containerd


@pytest.fixture(scope="module")
def binaries() -> ContainerdBinaries:
    """Debian's containerd (as a node runs it) and docker-registry, with varnishd for the cache front."""
    reason = ensure_binaries() or ensure_commands({"varnish": "varnishd"})
    if reason:
        pytest.skip(reason)
    found = system_containerd()
    assert found is not None, "containerd is installed but system_containerd() did not find it"
    return found


@pytest.fixture(scope="module")
def registry_binary() -> str:
    """The distribution 3 registry the operator runs (built from the Go module proxy, cached), and varnishd in front of it."""
    reason = ensure_commands({"varnish": "varnishd"})
    if reason:
        pytest.skip(reason)
    binary, why = distribution_v3()
    if binary is None:
        pytest.skip(why)
    return binary
