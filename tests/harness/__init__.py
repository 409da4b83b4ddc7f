"""Test harness: a real, local Kubernetes control plane with kwok-simulated nodes.

Shared by the integration tests, the benchmarks and ``make dev``::

    from harness import LocalCluster

    with LocalCluster(nodes=3) as cluster:
        cluster.kubectl("get", "nodes")

Modules: ``cluster`` (the control plane; kube-apiserver can be stopped and started
alone), ``operator`` (the operator process and mirror helpers), ``objects`` (what a test
makes, deleted in its teardown), ``children`` (a mirror's children and the ownership
invariant), ``watch`` (watches that survive API server restarts), ``audit`` (writes
counted from the audit log), ``proxy`` (the relay that partitions the operator from the
API server), ``faults`` (what a fault test breaks), ``waiting`` (the one ``wait_for``
and ``free_port``), ``dataplane`` (registries, containerd, dockerd, token service).
"""

from harness.cluster import ControlPlaneError, LocalCluster, find_controlplane_dir

__all__ = ["ControlPlaneError", "LocalCluster", "find_controlplane_dir"]
