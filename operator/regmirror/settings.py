"""The operator's settings: one object, read from the environment once at start-up.

The manifest sets them as `REGMIRROR_*` variables. Nothing reads the
environment at import time, so tests build a `Settings(...)` of their own.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

from regmirror import constants as c
from regmirror.election import Timing

PREFIX = "REGMIRROR_"


class Settings(BaseModel):
    """Everything the operator can be tuned with; field `x` is read from `REGMIRROR_X`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    namespace: Annotated[str, Field(description="Namespace of the operator and of every mirror's children.")] = c.DEFAULT_NAMESPACE
    agent_namespace: Annotated[str, Field(description="Namespace of the node agent DaemonSet and its plan.")] = c.AGENT_NAMESPACE
    agent_image: Annotated[str, Field(description="Image the node agent runs (the operator's own).")] = c.DEFAULT_OPERATOR_IMAGE
    containerd_config_path: Annotated[str, Field(description="containerd's config_path on the nodes.")] = c.CONTAINERD_CONFIG_PATH
    agent_guard_connections: Annotated[
        bool,
        Field(
            description=(
                "Run the node agent in the node's network namespace with CAP_NET_ADMIN, so that it aborts the node's "
                "connections to a dead mirror and pulls already under way fall back at once; false: no hostNetwork, "
                "no capability, and such pulls wait for containerd's own timeouts."
            )
        ),
    ] = True
    metrics_port: Annotated[int, Field(description="Port of the Prometheus endpoint; 0 disables it.", ge=0, le=65535)] = 8000
    workers: Annotated[int, Field(description="Concurrent reconciles (each mostly waits for the API server).", ge=1, le=256)] = 16
    api_max_in_flight: Annotated[
        int,
        Field(
            description=(
                "API requests the controller has at the API server at once, all workers together (watches and the "
                "leader lease not counted): a burst of new mirrors leaves the API server to the cluster's other "
                "controllers (the volume provisioner binding their claims among them); 0: no bound."
            ),
            ge=0,
            le=1024,
        ),
    ] = 8
    request_timeout: Annotated[float, Field(description="Seconds one API request may take before it counts as failed.", gt=0)] = 10.0
    request_attempts: Annotated[
        int, Field(description="Attempts per API request on 429, 5xx, timeouts and dropped connections (then the queue backs off).", ge=1)
    ] = 4
    backoff_base: Annotated[float, Field(description="First per-key retry delay in seconds; doubles per failure.", gt=0)] = 0.5
    backoff_max: Annotated[float, Field(description="Longest per-key retry delay in seconds.", gt=0)] = 300.0
    status_coalesce: Annotated[float, Field(description="Seconds a status key waits for more events before it is computed.", ge=0)] = 0.05
    status_progress_interval: Annotated[
        float,
        Field(
            description=(
                "Seconds between two status writes that only report progress (node counts, replicas); "
                "while a mirror is not Ready, each such write in a row waits twice as long (up to 16 times this); "
                "Ready flips, problems and new generations are written at once."
            ),
            ge=0,
        ),
    ] = 60.0
    status_progress_rate: Annotated[
        float,
        Field(description="Progress-only status writes per second, all mirrors together (a burst of 500 mirrors stays bounded).", gt=0),
    ] = 5.0
    transient_grace: Annotated[
        float, Field(description="Seconds transient API failures are retried before status reports them under Reconciling.", ge=0)
    ] = 30.0
    plan_interval: Annotated[
        float, Field(description="Minimum seconds between two node-plan versions (each one rolls the agent DaemonSet).", ge=0)
    ] = 1.0
    plan_wait_for_services: Annotated[
        float,
        Field(
            description=(
                "Longest a new node plan waits for mirrors whose Service has no ClusterIP yet, so a burst becomes one rollout "
                "(it stops waiting sooner when no new ClusterIP appeared for 3 s and the operator has no pass left to run for the "
                "mirrors it waits for; this bound only matters while a burst is still being applied: at 500 mirrors on a loaded "
                "2-core cluster, 60 s split it into two rollouts of 1,000 agents)."
            ),
            ge=0,
        ),
    ] = 120.0
    resync_interval: Annotated[float, Field(description="Seconds between two re-checks of every key from the store.", gt=0)] = 600.0
    watch_timeout: Annotated[float, Field(description="Server-side timeout of one watch request in seconds.", gt=0)] = 240.0
    watch_inactivity: Annotated[
        float, Field(description="A watch that delivers nothing (not even a bookmark) for this long is reconnected.", gt=0)
    ] = 90.0
    liveness_stale: Annotated[
        float, Field(description="Liveness fails once a watch has been unable to list or watch for this many seconds.", gt=0)
    ] = 120.0
    upstream_recheck: Annotated[
        float, Field(description="Seconds before an inconclusive or failed upstream credentials check is repeated.", gt=0)
    ] = 60.0
    access_rotation_spacing: Annotated[
        float,
        Field(
            description=(
                "Seconds between two rotations of a mirror's node credential: the credential handed out next must have "
                "reached every mirror pod (a Secret volume updates within about a minute)."
            ),
            ge=0,
        ),
    ] = 600.0
    cache_stats_interval: Annotated[
        float,
        Field(
            description=(
                "Seconds between two polls of every ready mirror pod's cache sidecar (/stats) for status.cache; "
                "counters are written at most once a minute and only when they changed. 0 turns the polls off "
                "(status.cache then keeps what it last said), e.g. where a NetworkPolicy keeps the operator "
                "from the mirror pods."
            ),
            ge=0,
        ),
    ] = 60.0
    cache_stats_timeout: Annotated[
        float, Field(description="Seconds one poll of a cache sidecar's /stats may take before the pod counts as not answering.", gt=0)
    ] = 3.0
    cache_pins_debounce: Annotated[
        float,
        Field(
            description=(
                "Seconds pod changes are gathered before the mirrors' pins (digests of images running pods use) are "
                "recomputed: a burst of pod starts is one ConfigMap write per mirror, not one per pod."
            ),
            ge=0,
        ),
    ] = 5.0
    lease_name: Annotated[
        str,
        Field(
            description="Name of the leader-election Lease in the operator's namespace (the RBAC Role names it: change both).",
            pattern=r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$",
        ),
    ] = "regmirror-operator"
    lease_duration: Annotated[
        float, Field(description="Seconds a standby waits, from when it saw the leader's last renew, before taking over.", gt=0)
    ] = 11.0
    lease_renew_deadline: Annotated[
        float, Field(description="Seconds the leader keeps leading without a successful renew; then it stops writing and stands by.", gt=0)
    ] = 7.0
    lease_retry_period: Annotated[float, Field(description="Seconds between two attempts to acquire or renew the Lease.", gt=0)] = 2.0

    @model_validator(mode="after")
    def _lease_timings_are_safe(self) -> Settings:
        # The leader must give up before any standby may take over (see regmirror/election.py).
        Timing(self.lease_duration, self.lease_renew_deadline, self.lease_retry_period)
        return self

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Settings from `REGMIRROR_*` variables (unset ones keep their defaults); invalid values raise naming the variable."""
        env = os.environ if environ is None else environ
        values = {name: env[PREFIX + name.upper()] for name in cls.model_fields if PREFIX + name.upper() in env}
        return cls.model_validate(values)
