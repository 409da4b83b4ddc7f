"""Leader election's I/O: read and write the Lease on a timer, start the controller when elected.

The decisions are `regmirror.election.Candidate`'s; this module only does the
requests and keeps time. A standby keeps trying every retry period (jittered,
as client-go does) and does nothing else; the leader renews every retry
period, and a watchdog fires the moment its renew deadline passes without a
successful renew: `on_lost` must stop the controller (the client's write
fence, `leading`, already refuses every write from that instant). The
candidate then campaigns on as a standby; `on_started` runs again for each
new term.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import time
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from typing import Any, Protocol

from regmirror.election import JITTER_FACTOR, Candidate, Create, Timing, Update, Wait, lease_body
from regmirror.kube import ApiError, cancel_quietly

log = logging.getLogger("regmirror.leader")


class LeaseApi(Protocol):
    """The three requests the election makes (`regmirror.kube.HttpKube` has them)."""

    async def get(self, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        """The object, or None when it does not exist."""
        ...

    async def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Create `obj`; 409 when it exists."""
        ...

    async def replace(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Replace `obj` (its metadata.resourceVersion guards the write: 409 when it changed)."""
        ...


def identity() -> str:
    """This replica's name in the Lease: the pod's name (POD_NAME, from the downward API), else hostname-pid."""
    return os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}"


def micro_time() -> str:
    """The current time as a metav1.MicroTime (what a Lease's acquireTime and renewTime hold)."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Elector:
    """Runs one candidate: `start()` begins campaigning; `on_started` runs once when elected, `on_lost` when the lease is lost."""

    def __init__(
        self,
        api: LeaseApi,
        namespace: str,
        name: str,
        candidate: Candidate,
        *,
        on_started: Callable[[], Coroutine[Any, Any, None]],
        on_lost: Callable[[str], None],
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], str] = micro_time,
    ) -> None:
        self.api = api
        self.namespace = namespace
        self.name = name
        self.candidate = candidate
        self.timing: Timing = candidate.timing
        self._on_started = on_started
        self._on_lost = on_lost
        self._clock = clock
        self._wall = wall
        self._loop_task: asyncio.Task[None] | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._started: asyncio.Task[None] | None = None
        self._last_error = ""
        self._last_answer = clock()

    def silent_for(self) -> float:
        """Seconds since the API server last answered a lease request (a standby's liveness)."""
        return self._clock() - self._last_answer

    @property
    def leading(self) -> bool:
        """Whether this replica leads right now."""
        return self.candidate.leads(self._clock())

    def start(self) -> None:
        """Begin campaigning in the background."""
        self._loop_task = asyncio.get_running_loop().create_task(self._campaign(), name="leader election")

    def running(self) -> bool:
        """Whether the campaign is still going (the liveness probe of a standby)."""
        return self._loop_task is not None and not self._loop_task.done()

    async def try_once(self) -> bool:
        """One read-decide-write round; True when we lead afterwards. Never raises on API errors."""
        started = self._clock()
        try:
            lease = await self.api.get("Lease", self.namespace, self.name)
            self._last_answer = self._clock()
            action = self.candidate.decide(lease, self._clock(), self._wall())
            if isinstance(action, Wait):
                return False
            body = lease_body(self.namespace, self.name, action.record, action.resource_version if isinstance(action, Update) else None)
            written = await (self.api.create(body) if isinstance(action, Create) else self.api.replace(body))
        except ApiError as exc:
            if exc.status:
                self._last_answer = self._clock()  # an answer, if not the one we hoped for
            # 409: another candidate wrote first (or created the Lease at the same time): it won this round.
            message = "another candidate wrote the lease first" if exc.status == 409 else str(exc)
            if message != self._last_error:
                log.info("lease %s/%s: %s", self.namespace, self.name, message)
                self._last_error = message
            return False
        self._last_error = ""
        self.candidate.succeeded(written, started, self._clock())
        return self.leading

    async def _campaign(self) -> None:
        while True:
            leading = await self.try_once()
            if leading and self._started is None:
                log.info("elected leader of %s/%s as %s", self.namespace, self.name, self.candidate.identity)
                self._watchdog = asyncio.get_running_loop().create_task(self._watch_deadline(), name="renew deadline")
                self._started = asyncio.get_running_loop().create_task(self._on_started(), name="start controller")
            if self._started is not None:
                await asyncio.sleep(self.timing.retry_period)
            else:
                # Standbys spread their attempts (client-go jitters the acquire loop too).
                await asyncio.sleep(self.timing.retry_period * random.uniform(1.0, JITTER_FACTOR))

    async def _watch_deadline(self) -> None:
        """Ends the term the moment the renew deadline passes without a successful renew."""
        while True:
            until = self.candidate.leader_until
            remaining = (until - self._clock()) if until is not None else 0.0
            if remaining <= 0:
                break
            await asyncio.sleep(remaining)
        self.candidate.step_down()
        log.error("lost the lease %s/%s (no renew within %.0fs)", self.namespace, self.name, self.timing.renew_deadline)
        started, self._started, self._watchdog = self._started, None, None
        if started is not None and not started.done():
            started.cancel()  # a controller still starting (listing) stops there
        self._on_lost("renew deadline passed")

    async def halt(self) -> None:
        """Stop campaigning and renewing (we may still lead until the deadline: stop the controller, then `release`)."""
        for task in (self._watchdog, self._loop_task, self._started):
            if task is not None:
                await cancel_quietly(task)

    async def release(self) -> None:
        """Hand the lease over at once (holder empty, 1 s duration), if we still lead; call after every write stopped."""
        action = self.candidate.release(self._wall()) if self.candidate.leads(self._clock()) else None
        self.candidate.step_down()
        if action is None:
            return
        try:
            await self.api.replace(lease_body(self.namespace, self.name, action.record, action.resource_version))
            log.info("released the lease %s/%s", self.namespace, self.name)
        except ApiError as exc:
            log.warning("could not release the lease %s/%s (it expires on its own): %s", self.namespace, self.name, exc)
