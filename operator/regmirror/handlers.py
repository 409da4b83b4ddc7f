"""The only module with Kopf decorators: Kopf runs the process, the controller does the work.

Kopf gives the operator its CLI (`kopf run`), logging, signal handling,
start-up/clean-up and the liveness endpoint. The watches, the store, the work
queue and the reconcilers are the controller's own (regmirror.controller):
Kopf's watch streams and indices keep objects that vanished while the
operator could not watch, see controller/informer.py. So no resource handler
is registered here; the finalizer is managed by the children reconciler.

Run with `regmirror run` (= `kopf run -m regmirror.handlers --standalone
--namespace <operator ns> --namespace <agent ns> --log-format=json`).
"""

from __future__ import annotations

import os
import tracemalloc
from typing import Any

import kopf
from prometheus_client import start_http_server

from regmirror.controller.manager import Manager
from regmirror.kube import HttpKube, load_credentials
from regmirror.memory import dump_tracemalloc
from regmirror.metrics import Metrics
from regmirror.settings import Settings


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
    manager: Manager | None = None

    def wrote(kind: str, verb: str) -> None:
        metrics.writes.labels(kind=kind, verb=verb).inc()
        if manager is not None:
            manager.store.api_answered()  # a write that went through: the API server answers again

    client = HttpKube(
        load_credentials(),
        timeout=config.request_timeout,
        attempts=config.request_attempts,
        on_retry=metrics.api_retries.inc,
        on_write=wrote,
    )
    manager = Manager(client, config, metrics)
    memo["manager"] = manager
    memo["client"] = client
    await manager.start()


@kopf.on.cleanup()
async def stop(memo: kopf.Memo, **_: Any) -> None:
    """Stop the controller and close the API connections."""
    manager: Manager | None = memo.get("manager")
    if manager is not None:
        await manager.stop()
        if tracemalloc.is_tracing():
            dump_tracemalloc(os.environ.get("REGMIRROR_TRACEMALLOC_OUT", ""), manager.memory_holders())
    client: HttpKube | None = memo.get("client")
    if client is not None:
        await client.close()


@kopf.on.probe(id="controller", errors=kopf.ErrorsMode.PERMANENT)
def probe(memo: kopf.Memo, **_: Any) -> dict[str, Any]:
    """Liveness: fails (HTTP 500) once a watch has been unable to list or watch for too long."""
    manager: Manager | None = memo.get("manager")
    if manager is None:
        return {"starting": True}
    try:
        return manager.liveness()
    except RuntimeError as exc:
        raise kopf.PermanentError(str(exc)) from exc
