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
from hypothesis import settings as hypothesis_settings

from harness import ControlPlaneError, LocalCluster
from harness.objects import MirrorFactory
from harness.operator import OPERATOR_NS, OPERATOR_SA, REPO, OperatorProcess, install_crd_and_namespaces

# Under CI a skipped test fails the run, except the kind tests (harness/skipguard.py).
pytest_plugins = ["harness.skipguard"]

# CI replays a fixed set of examples (derandomized), so a run can never be red by luck; a
# developer's run draws new ones each time, which is where the search finds new inputs (keep
# each one it finds as an explicit @example). .ci/run sets CI.
# No deadline anywhere: tests assert behaviour, not time (speed lives in `make bench`), and a
# loaded CI machine must not turn a slow example into a Flaky/DeadlineExceeded failure.
hypothesis_settings.register_profile("regmirror", deadline=None)
hypothesis_settings.register_profile("ci", parent=hypothesis_settings.get_profile("regmirror"), derandomize=True, print_blob=True)
hypothesis_settings.load_profile("regmirror")
if os.environ.get("CI"):
    hypothesis_settings.load_profile("ci")


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


@pytest.fixture(scope="session")
def operator(cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    """The operator, running with a ServiceAccount of its own (its writes are countable in the audit log).

    It reaches the API server through a TCP relay of its own (``operator.relay``), so a
    test can partition it from the API server without touching anyone else's traffic.
    """
    install_crd_and_namespaces(cluster)
    # Only the rights manifests/rbac grants: a missing permission fails the tests, as it would in a cluster.
    cluster.kubectl("apply", "--server-side", "-k", str(REPO / "manifests" / "rbac"))
    relay = cluster.open_relay()
    kubeconfig = cluster.service_account_kubeconfig(OPERATOR_NS, OPERATOR_SA, server=relay.url)
    proc = OperatorProcess(cluster, kubeconfig, tmp_path_factory.mktemp("operator") / "operator.log", relay)
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()
        print(f"operator log: {proc.log_path}")


@pytest.fixture
def mirrors(cluster: LocalCluster) -> Iterator[MirrorFactory]:
    """RegistryMirrors and Secrets for one test, deleted (and waited for) in its teardown, even after a failure."""
    factory = MirrorFactory(cluster)
    try:
        yield factory
    finally:
        factory.cleanup()
