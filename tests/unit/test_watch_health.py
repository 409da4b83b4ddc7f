"""Liveness after an API outage: what starts an outage, what ends it, and what does not.

The state machine (`WatchHealth`) is driven through partition -> heal sequences: any
answer of the API server (a watch that returns HTTP 200 and then stays quiet, a
successful write) ends an outage at once, as does a list or a watch event; a watch that
reconnects and then times out again does not, however often it does so. Then the same
through a running informer against the fake API, and the real HTTP client's signal that
a watch was accepted.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp import web
from fakekube import FakeKube, api_error
from hypothesis import example, given
from hypothesis import strategies as st
from test_informer import Changes, until
from test_kube_client import server

from regmirror.controller.informer import Informer, Source, WatchHealth
from regmirror.controller.store import Store
from regmirror.kube import ApiError

FAIL, ANSWER, CONFIRM = "fail", "answer", "confirm"
# (what happened, seconds since the previous step)
Step = tuple[str, float]
LIMIT = 20.0  # the liveness limit the fault tests' operator runs with (REGMIRROR_LIVENESS_STALE)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def expected_blindness(steps: list[Step]) -> float:
    """The rule, stated over the whole history: blind since the first failure after the last
    confirmation, unless an answer came after every failure so far and no failure has ever
    followed such an answer (then the watch was answered again and is healthy)."""
    now = sum(dt for _, dt in steps)
    since_confirm: list[tuple[str, float]] = []
    at = 0.0
    for what, dt in steps:
        at += dt
        since_confirm = [] if what == CONFIRM else [*since_confirm, (what, at)]
    first = next((i for i, (what, _) in enumerate(since_confirm) if what == FAIL), None)
    if first is None:
        return 0.0
    kinds = [what for what, _ in since_confirm[first:]]
    answered_then_failed = any(a == ANSWER and FAIL in kinds[i + 1 :] for i, a in enumerate(kinds))
    if not answered_then_failed and kinds[-1] == ANSWER:
        return 0.0
    return now - since_confirm[first][1]


def drive(steps: list[Step]) -> tuple[WatchHealth, Clock]:
    clock = Clock()
    health = WatchHealth(clock)
    for what, dt in steps:
        clock.now += dt
        {FAIL: health.failed, ANSWER: health.answered, CONFIRM: health.confirmed}[what]()
    return health, clock


steps_strategy = st.lists(st.tuples(st.sampled_from([FAIL, ANSWER, CONFIRM]), st.floats(0, 100, allow_nan=False)), max_size=30)

PARTITION = [(CONFIRM, 0.0), (FAIL, 90.0), (FAIL, 5.0), (FAIL, 90.0)]  # a silent watch stalls, reconnects stall too


@given(steps=steps_strategy)
@example(steps=[*PARTITION, (ANSWER, 5.0)])  # healed: the watch opened, nothing streamed yet
@example(steps=[*PARTITION, (CONFIRM, 5.0)])  # healed: a re-list
@example(steps=[*PARTITION, (ANSWER, 5.0), (FAIL, 90.0), (ANSWER, 5.0), (FAIL, 90.0)])  # opens, then times out, again
@example(steps=[*PARTITION, (ANSWER, 5.0), (FAIL, 90.0), (ANSWER, 5.0)])  # re-accepted after a broken promise: not enough
@example(steps=[(ANSWER, 1.0), (FAIL, 1.0), (ANSWER, 1.0)])  # an answer while healthy proves nothing later
@example(steps=[(ANSWER, 0.0), (FAIL, 0.0), (ANSWER, 1.0)])  # found by hypothesis: order decides, not equal times
def test_blindness_follows_the_rule(steps: list[Step]) -> None:
    health, clock = drive(steps)
    assert health.blind_for() == expected_blindness(steps)
    last_confirm = max((i for i, (what, _) in enumerate(steps) if what == CONFIRM), default=-1)
    assert health.blind_for() <= clock.now - sum(dt for _, dt in steps[: last_confirm + 1]), "never blinder than since the last proof"


@given(outage=steps_strategy, quiet=st.floats(0, 1000, allow_nan=False))
def test_an_answer_after_any_plain_outage_makes_liveness_pass_at_once(outage: list[Step], quiet: float) -> None:
    # An outage of failures only (however long, however many reconnect attempts), then the
    # API server answers and the watch streams nothing for a while: healthy all along.
    steps = [(FAIL, dt) for _, dt in outage] + [(ANSWER, 1.0)]
    health, clock = drive(steps)
    assert health.blind_for() == 0.0
    clock.now += quiet
    assert health.blind_for() == 0.0


@given(reconnects=st.integers(1, 20), stall=st.floats(1, 200, allow_nan=False))
def test_a_watch_that_keeps_timing_out_after_reconnecting_stays_unhealthy(reconnects: int, stall: float) -> None:
    health, clock = drive([(CONFIRM, 0.0), (FAIL, 10.0)])
    began = clock.now
    for _ in range(reconnects):
        for what, dt in ((ANSWER, 1.0), (FAIL, stall)):  # opened (HTTP 200), then silent until it timed out
            clock.now += dt
            {FAIL: health.failed, ANSWER: health.answered}[what]()
        assert health.blind_for() == clock.now - began
    health.answered()
    assert health.blind_for() == clock.now - began, "after one broken promise only a delivered event counts"
    health.confirmed()
    assert health.blind_for() == 0.0


async def test_an_informer_is_healthy_once_its_watch_is_accepted_even_if_nothing_streams() -> None:
    clock = Clock()
    kube = FakeKube()
    informer = Informer(kube, Source("Service", "ns"), Changes(), clock=clock, max_backoff=0.01)
    task = asyncio.create_task(informer.run())
    try:
        await until(lambda: kube._watchers)
        watches = lambda: len([c for c in kube.calls if c[0] == "watch"])  # noqa: E731
        # The partition: the open watch stalls, and every reconnect times out.
        kube.fail("watch", api_error(0, "ServerTimeoutError"), times=10**6)
        kube.break_watches(api_error(0, "ServerTimeoutError"))
        await until(lambda: informer.failing_since is not None)
        clock.now = 100.0
        await until(lambda: watches() >= 4)
        assert informer.blind_for() == 100.0, "reconnects that time out prove nothing"
        # The heal: a watch is accepted and streams nothing; healthy at once.
        kube.failures.clear()
        opened = watches()
        await until(lambda: watches() > opened and kube._watchers)
        assert informer.blind_for() == 0.0
        # It stalls again before anything arrived: the outage goes on from where it began...
        opened = watches()
        kube.break_watches(api_error(0, "ServerTimeoutError"))
        await until(lambda: informer.failing_since is not None)
        assert informer.blind_for() == 100.0
        await until(lambda: watches() > opened and kube._watchers)
        clock.now = 150.0
        assert informer.blind_for() == 150.0, "re-accepted after a stall, with nothing delivered: still blind"
        # ...until the watch delivers.
        kube.put({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "a", "namespace": "ns"}})
        await until(lambda: "a" in informer.items)
        assert informer.blind_for() == 0.0
    finally:
        task.cancel()


async def test_a_successful_write_ends_an_outage_of_every_collection() -> None:
    clock = Clock()
    store = Store("ns", "agents")
    for kind in ("Service", "Deployment"):
        informer = Informer(FakeKube(), Source(kind, "ns"), Changes(), clock=clock)
        informer.health.failed()
        store.add(informer)
    clock.now = 60.0
    assert store.blind_for() == 60.0
    store.api_answered()
    assert store.blind_for() == 0.0


async def test_the_http_client_signals_an_accepted_watch_before_any_event() -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        if request.query.get("resourceVersion") == "refused":
            return web.Response(status=503, text="{}")
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b"\n")
        await asyncio.sleep(0.3)  # quiet for a while, then the server ends it
        return response

    opened: list[Any] = []
    async with server(handler) as client:
        async for event in client.watch(
            "Service", "ns", resource_version="1", timeout_seconds=5, inactivity=5, on_open=lambda: opened.append("open")
        ):
            opened.append(event)
        assert opened == ["open"]
        with pytest.raises(ApiError) as refused:
            async for _ in client.watch(
                "Service", "ns", resource_version="refused", timeout_seconds=5, inactivity=5, on_open=lambda: opened.append("open")
            ):
                pass
        assert refused.value.status == 503
        assert opened == ["open"], "a refused watch is no answer"
