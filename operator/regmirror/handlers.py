"""The only module with Kopf decorators: Kopf runs the process, the controller does the work.

Kopf gives the operator its CLI (`kopf run`), logging, signal handling,
start-up/clean-up and the liveness endpoint. The watches, the store, the work
queue and the reconcilers are the controller's own (regmirror.controller):
Kopf's watch streams and indices keep objects that vanished while the
operator could not watch, see controller/informer.py. So no resource handler
is registered here; the finalizer is managed by the children reconciler.

Run with `regmirror run` (= `kopf run -m regmirror.handlers --standalone
--namespace <operator ns> --namespace <agent ns> --log-format=json`).

Several replicas may run: each campaigns for the Lease `settings.lease_name`
(regmirror.leader) and only the leader runs a controller. A standby serves
liveness and metrics and nothing else. The moment a leader misses its renew
deadline every write is refused (the client's fence) and its controller is
stopped; it campaigns on as a standby, and a new term starts a fresh
controller, as a restart would. So two replicas never write at the same time.
On SIGTERM the leader stops the controller, then releases the Lease so a
standby takes over within seconds.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
import tracemalloc
from typing import Any

import kopf
from prometheus_client import start_http_server

from regmirror import constants as c
from regmirror.controller.manager import Manager
from regmirror.election import Candidate, Timing
from regmirror.kube import HttpKube, load_credentials
from regmirror.leader import Elector, identity
from regmirror.memory import dump_tracemalloc
from regmirror.metrics import Metrics
from regmirror.settings import Settings

log = logging.getLogger("regmirror.operator")


@kopf.on.startup()
async def start(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    """Read the settings, start the metrics endpoint and the controller (kept in Kopf's memo)."""
    settings.posting.enabled = False  # our Events are posted deliberately (controller/status.py)
    # Kopf serves no resource here, so it needs no namespace or CRD watches of its own:
    # without them no Kopf watch can fail during an API outage, and no RBAC is needed for them.
    settings.scanning.disabled = True
    if os.environ.get("REGMIRROR_TRACEMALLOC"):
        tracemalloc.start(int(os.environ["REGMIRROR_TRACEMALLOC"] or "1"))
    config = Settings.from_env()
    metrics = Metrics()
    if config.metrics_port:
        start_http_server(config.metrics_port)
    me = identity()
    # The replica's name in the User-Agent: the API server's audit log tells the replicas' writes apart.
    user_agent = f"{c.FIELD_MANAGER}/{me}"
    credentials = load_credentials()

    def wrote(kind: str, verb: str) -> None:
        metrics.writes.labels(kind=kind, verb=verb).inc()
        manager: Manager | None = memo.get("manager")
        if manager is not None:
            manager.store.api_answered()  # a write that went through: the API server answers again

    client = HttpKube(
        credentials,
        timeout=config.request_timeout,
        attempts=config.request_attempts,
        on_retry=metrics.api_retries.inc,
        on_write=wrote,
        user_agent=user_agent,
        max_in_flight=config.api_max_in_flight,
        on_wait=metrics.api_waits.observe,
        # Every write is fenced on the lease: none leaves once it lapsed, even before the controller is stopped.
        may_write=lambda: bool(memo.get("elector") and memo["elector"].leading),
    )
    memo["client"] = client
    timing = Timing(config.lease_duration, config.lease_renew_deadline, config.lease_retry_period)
    # Its own connections, one attempt per request and a timeout within the renew deadline: a renew
    # never queues behind the controller's requests, and the election loop is the retry.
    lease_client = HttpKube(credentials, timeout=min(config.request_timeout, timing.renew_deadline / 2), attempts=1, user_agent=user_agent)
    memo["lease_client"] = lease_client

    async def lead() -> None:
        """A term begins: a fresh controller (as after a restart), once the previous term's has stopped."""
        stopping: asyncio.Task[None] | None = memo.get("stopping")
        if stopping is not None:
            await stopping
        manager = Manager(client, config, metrics)
        memo["manager"] = manager
        metrics.leader.set(1)
        try:
            await manager.start()
        except Exception:  # the controller could not start: exit, so that the kubelet's restart (or a standby) tries again
            log.exception("the controller failed to start")
            _exit_now()

    def lost(why: str) -> None:
        """The term ended (the fence already stops every write): stop the controller, campaign on as a standby."""
        metrics.leader.set(0)
        manager: Manager | None = memo.pop("manager", None)
        log.error("leadership lost (%s): controller stopped, campaigning again as a standby", why)
        if manager is not None:
            memo["stopping"] = asyncio.get_running_loop().create_task(manager.stop(), name="stop controller")

    elector = Elector(
        lease_client, config.namespace, config.lease_name, Candidate(me, timing), on_started=lead, on_lost=lost, clock=time.monotonic
    )
    memo["elector"] = elector
    memo["liveness_stale"] = config.liveness_stale
    metrics.leader.set(0)
    log.info("campaigning for the lease %s/%s as %s", config.namespace, config.lease_name, me)
    elector.start()


def _exit_now() -> None:
    """Exit at once, non-zero (the kubelet restarts the container), with the logs flushed."""
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stderr.flush()
    os._exit(1)


@kopf.on.cleanup()
async def stop(memo: kopf.Memo, **_: Any) -> None:
    """Stop the controller, then release the Lease (a standby takes over at once), and close the API connections."""
    elector: Elector | None = memo.get("elector")
    if elector is not None:
        await elector.halt()
    manager: Manager | None = memo.get("manager")
    if manager is not None:
        await manager.stop()
        if tracemalloc.is_tracing():
            dump_tracemalloc(os.environ.get("REGMIRROR_TRACEMALLOC_OUT", ""), manager.memory_holders())
    stopping: asyncio.Task[None] | None = memo.get("stopping")
    if stopping is not None:
        await stopping
    if elector is not None:
        await elector.release()  # only now: no write of ours is in flight any more
    for name in ("client", "lease_client"):
        client: HttpKube | None = memo.get(name)
        if client is not None:
            await client.close()


@kopf.on.probe(id="controller", errors=kopf.ErrorsMode.PERMANENT)
def probe(memo: kopf.Memo, **_: Any) -> dict[str, Any]:
    """Liveness: fails (HTTP 500) once a watch has been unable to list or watch for too long.

    A standby is live (and ready) while it campaigns and the API server answers it: it
    holds no watch that could go blind, and it must stay up to take over. The leader
    answers for its watches.
    """
    elector: Elector | None = memo.get("elector")
    if elector is None:
        return {"starting": True}
    if not elector.leading:
        if not elector.running():
            raise kopf.PermanentError("the leader election loop has stopped")
        # A standby cut off from the API server could never take over: as blind as a leader's watches.
        silent = elector.silent_for()
        if silent > memo["liveness_stale"]:
            raise kopf.PermanentError(f"no answer from the API server for {silent:.0f}s (limit {memo['liveness_stale']:.0f}s)")
        return {"leader": False}
    manager: Manager | None = memo.get("manager")
    if manager is None:
        return {"leader": True, "starting": True}
    try:
        return {"leader": True, **manager.liveness()}
    except RuntimeError as exc:
        raise kopf.PermanentError(str(exc)) from exc
