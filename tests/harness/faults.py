"""What a fault test breaks and builds its scenario with (the ``faults`` fixture hands it over)."""

from __future__ import annotations

from dataclasses import dataclass

from harness.cluster import LocalCluster
from harness.objects import MirrorFactory
from harness.operator import OperatorProcess
from harness.proxy import TcpRelay


@dataclass(frozen=True)
class Faults:
    """The session's cluster and operator, for one test that breaks them, and its mirror factory."""

    cluster: LocalCluster
    operator: OperatorProcess
    mirrors: MirrorFactory

    @property
    def relay(self) -> TcpRelay:
        """The relay between the operator and the API server (``cut()`` partitions them)."""
        assert self.operator.relay is not None, "the operator fixture runs the operator behind a relay"
        return self.operator.relay

    def restore(self) -> None:
        """Heal the relay, start a stopped API server, and restart the operator (a fault may have left it blind)."""
        self.relay.heal()
        if not self.cluster.apiserver_running:
            self.cluster.start_apiserver()
        self.operator.restart()
        self.operator.wait_live()
