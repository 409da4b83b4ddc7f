"""Test harness: a real, local Kubernetes control plane with kwok-simulated nodes.

Shared by the integration tests, the benchmarks and ``make dev``::

    from harness import LocalCluster

    with LocalCluster(nodes=3) as cluster:
        cluster.kubectl("get", "nodes")
"""

from harness.cluster import ControlPlaneError, LocalCluster, find_controlplane_dir

__all__ = ["ControlPlaneError", "LocalCluster", "find_controlplane_dir"]
