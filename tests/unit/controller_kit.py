"""Build the controller on a FakeKube, and run its reconcilers step by step (no workers, no timers)."""

from __future__ import annotations

from typing import Any

from fakekube import FakeKube
from prometheus_client import CollectorRegistry

from regmirror import constants as c
from regmirror.conditions import get_condition
from regmirror.controller.manager import RECONCILERS, Manager
from regmirror.controller.state import Key, Result
from regmirror.metrics import Metrics
from regmirror.settings import Settings

NS = "regmirror-system"
AGENT_NS = "regmirror-node"


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def mirror(name: str, **spec: Any) -> dict[str, Any]:
    """A RegistryMirror body (docker.io by default)."""
    body: dict[str, Any] = {"upstream": {"url": "https://registry-1.docker.io"}, "storage": {"size": "1Gi"}}
    body.update(spec)
    return {"apiVersion": c.API_VERSION, "kind": c.KIND, "metadata": {"name": name, "generation": 1}, "spec": body}


class Kit:
    """A Manager on a FakeKube; `sync()` stands in for the watches, `run(key)` for a worker."""

    def __init__(self, kube: FakeKube | None = None, **settings: Any) -> None:
        self.kube = kube or FakeKube()
        self.clock = Clock()
        values: dict[str, Any] = {"namespace": NS, "agent_namespace": AGENT_NS, "status_progress_interval": 60.0, "transient_grace": 30.0}
        values.update(settings)
        self.settings = Settings(**values)
        self.manager = Manager(self.kube, self.settings, Metrics(CollectorRegistry()), clock=self.clock)
        self.ctx = self.manager.ctx

    async def sync(self) -> None:
        """Make the store equal to the fake API (what the watches would have reported)."""
        for informer in self.manager.store.informers.values():
            await informer.relist()

    async def run(self, kind: str, name: str = "") -> Result:
        """One reconcile of a key, as a worker would run it (after a sync)."""
        await self.sync()
        result = await RECONCILERS[kind](self.ctx, name)
        await self.sync()
        return result

    async def admit(self, name: str) -> None:
        """A new mirror's children and its access decision: what its node-plan entry waits for."""
        await self.run("children", name)
        await self.run("access", name)

    def queued(self) -> set[Key]:
        """Keys waiting in the queue now or later."""
        q = self.manager.queue
        return {*q._ready[0], *q._ready[1], *q._due}

    async def converge(self, name: str, rounds: int = 4) -> None:
        """Run children (until done), then the plan, then the status of one mirror."""
        for _ in range(rounds):
            await self.run("children", name)
        await self.run("access", name)
        await self.run("hosts")
        await self.run("plan")
        await self.run("rollout")


def make_serving(kit: Kit, name: str = "hub") -> None:
    """What kube-controller-manager and kwok would report: Deployment available, PVC bound."""
    dep = kit.kube.obj("Deployment", NS, f"regmirror-{name}")
    assert dep is not None
    dep["status"] = {
        "observedGeneration": dep["metadata"]["generation"],
        "replicas": 1,
        "updatedReplicas": 1,
        "readyReplicas": 1,
        "conditions": [{"type": "Available", "status": "True"}],
    }
    kit.kube.put(dep)
    pvc = kit.kube.obj("PersistentVolumeClaim", NS, f"regmirror-{name}")
    assert pvc is not None
    pvc["status"] = {"phase": "Bound", "capacity": {"storage": "1Gi"}}
    kit.kube.put(pvc)


def status_of(kit: Kit, name: str = "hub") -> dict[str, Any]:
    """The mirror's status as the fake API server holds it."""
    body = kit.kube.obj(c.KIND, None, name)
    assert body is not None
    return dict(body.get("status") or {})


def ready(status: dict[str, Any]) -> tuple[str, str]:
    """The Ready condition's status and reason."""
    cond = get_condition(status.get("conditions"), "Ready") or {}
    return str(cond.get("status")), str(cond.get("reason"))
