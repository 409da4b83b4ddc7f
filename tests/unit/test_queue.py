"""The work queue: client-go semantics on asyncio."""

from __future__ import annotations

import asyncio

import pytest

from regmirror.controller.queue import HIGH, NORMAL, ShutDown, WorkQueue


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def queue(**kw: object) -> tuple[WorkQueue[str], Clock]:
    clock = Clock()
    return WorkQueue(clock=clock, **kw), clock  # type: ignore[arg-type]


async def take(q: WorkQueue[str]) -> str | None:
    """The next key if one is ready now, else None."""
    try:
        return await asyncio.wait_for(q.get(), timeout=0.05)
    except TimeoutError:
        return None


async def test_a_key_added_many_times_is_processed_once() -> None:
    q, _ = queue()
    for _ in range(5):
        q.add("a")
    q.add("b")
    assert len(q) == 2
    assert await take(q) == "a"
    assert await take(q) == "b"
    assert await take(q) is None


async def test_a_key_being_processed_is_not_handed_out_again_but_runs_after() -> None:
    q, _ = queue()
    q.add("a")
    assert await take(q) == "a"
    q.add("a")  # changed while a worker holds it
    assert await take(q) is None, "the same key never goes to two workers at once"
    q.done("a")
    assert await take(q) == "a", "re-added while processing: processed again after done"
    q.done("a")
    assert await take(q) is None


async def test_backoff_doubles_per_failure_up_to_the_cap_and_forget_resets_it() -> None:
    q, _ = queue(base_delay=0.5, max_delay=4.0)
    delays = [q.add_rate_limited("a") for _ in range(6)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert q.failures("a") == 6
    q.forget("a")
    assert q.add_rate_limited("a") == 0.5


async def test_a_rate_limited_key_waits_for_its_delay() -> None:
    q, clock = queue(base_delay=2.0)
    q.add_rate_limited("a")
    assert await take(q) is None
    clock.now = 1.9
    assert await take(q) is None
    clock.now = 2.0
    assert await take(q) == "a"


async def test_requeue_after_keeps_the_earliest_time_and_add_now_overrides() -> None:
    q, clock = queue()
    q.add_after("a", 10)
    q.add_after("a", 3)
    q.add_after("a", 7)
    clock.now = 3
    assert await take(q) == "a"
    q.done("a")
    clock.now = 20
    assert await take(q) is None, "superseded times do not fire again"
    q.add_after("b", 5)
    q.add("b")
    assert await take(q) == "b", "add() now wins over a pending delay"


async def test_high_priority_keys_overtake_a_backlog() -> None:
    q, _ = queue(priority=lambda k: HIGH if k.startswith("status") else NORMAL)
    for i in range(3):
        q.add(f"children/{i}")
    q.add("status/x")
    assert await take(q) == "status/x"
    assert await take(q) == "children/0"


async def test_a_waiting_worker_wakes_when_a_key_is_added() -> None:
    q, _ = queue()
    waiter = asyncio.create_task(q.get())
    await asyncio.sleep(0)
    q.add("late")
    assert await asyncio.wait_for(waiter, timeout=1) == "late"


async def test_shutdown_releases_waiting_workers() -> None:
    q, _ = queue()
    waiter = asyncio.create_task(q.get())
    await asyncio.sleep(0)
    q.shutdown()
    with pytest.raises(ShutDown):
        await asyncio.wait_for(waiter, timeout=1)
