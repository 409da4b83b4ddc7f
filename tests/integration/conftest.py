"""Fixtures for the fault-injection tests: a control plane and an operator that a test may break."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from harness import LocalCluster
from harness.faults import Faults
from harness.objects import MirrorFactory
from harness.operator import OperatorProcess


@pytest.fixture
def faults(cluster: LocalCluster, operator: OperatorProcess, mirrors: MirrorFactory) -> Iterator[Faults]:
    """The session's operator and cluster for a test that breaks them.

    Restored in teardown whatever the test did (relay healed, API server started, operator
    restarted), before the ``mirrors`` fixture deletes what the test made.
    """
    if not operator.running:
        operator.start()
    operator.wait_live()
    scenario = Faults(cluster, operator, mirrors)
    try:
        yield scenario
    finally:
        scenario.restore()
