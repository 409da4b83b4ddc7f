"""Shared pytest fixtures.

``cluster`` is a real control plane (etcd, kube-apiserver, kube-controller-manager,
kube-scheduler) with kwok-simulated nodes, started once per session and only for the
tests that ask for it. It never skips: this project's machines can always build and run
the binaries, so a missing control plane is a failure to fix, not a test to hide.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from harness import ControlPlaneError, LocalCluster


def _node_count() -> int:
    raw = os.environ.get("REGMIRROR_TEST_NODES", "3")
    try:
        return int(raw)
    except ValueError:
        raise pytest.UsageError(f"REGMIRROR_TEST_NODES must be an integer, not {raw!r}") from None


@pytest.fixture(scope="session")
def cluster() -> Iterator[LocalCluster]:
    """A running LocalCluster with ``$REGMIRROR_TEST_NODES`` (default 3) Ready nodes."""
    local = LocalCluster(nodes=_node_count())
    try:
        local.start()
    except ControlPlaneError as exc:
        pytest.fail(f"cannot start the local control plane: {exc}", pytrace=False)
    try:
        yield local
    finally:
        local.stop()


@pytest.fixture
def namespace(cluster: LocalCluster) -> Iterator[str]:
    """A fresh namespace for one test, deleted (without waiting) afterwards."""
    name = f"test-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", name)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)
