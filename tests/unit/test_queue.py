"""The work queue: client-go semantics on asyncio."""

from __future__ import annotations

import asyncio
import contextlib
import math

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

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


async def test_a_retry_after_longer_than_the_backoff_wins_and_still_counts_as_a_failure() -> None:
    q, _ = queue(base_delay=0.5, max_delay=4.0)
    assert q.add_rate_limited("a", at_least=3.0) == 3.0, "the server asked for 3 s"
    assert q.add_rate_limited("a", at_least=0.2) == 1.0, "a shorter one does not cut the backoff"
    assert q.add_rate_limited("a", at_least=None) == 2.0
    assert q.add_rate_limited("a", at_least=10.0) == 10.0, "beyond the cap too: the client already bounds Retry-After"
    assert q.failures("a") == 4


async def test_backoff_is_per_key_and_forgetting_one_key_leaves_the_others_backing_off() -> None:
    q, _ = queue(base_delay=1.0, max_delay=60.0)
    assert [q.add_rate_limited("a") for _ in range(3)] == [1.0, 2.0, 4.0]
    assert q.add_rate_limited("b") == 1.0, "another key's failures do not lengthen this one's pause"
    q.forget("b")
    assert q.add_rate_limited("a") == 8.0, "forgetting b does not reset a"
    assert (q.failures("a"), q.failures("b")) == (4, 0)


async def test_a_key_that_comes_due_while_a_worker_holds_it_runs_once_after_done() -> None:
    q, clock = queue()
    q.add("a")
    assert await take(q) == "a"
    q.add_rate_limited("a")  # the pass failed: its retry is due in 0.5 s
    q.add_after("a", 0.2)  # an event meanwhile asks for an earlier look: the earlier time wins
    clock.now = 1.0
    assert await take(q) is None, "still held by its worker"
    q.done("a")
    assert await take(q) == "a"
    q.done("a")
    assert await take(q) is None, "once, not once per request"
    assert q.failures("a") == 1, "a requeue does not forget the failures: only a success does"


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


async def take_now(q: WorkQueue[str]) -> str | None:
    """The key a worker would get without waiting, or None (no real time passes)."""
    task = asyncio.ensure_future(q.get())
    await asyncio.sleep(0)
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return None


KEYS = st.sampled_from(["a", "b"])
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("add"), KEYS),
        st.tuples(st.just("urgent"), KEYS),
        st.tuples(st.just("after"), KEYS, st.sampled_from([-1.0, 0.0, 0.5, 2.0, 7.0])),
        st.tuples(st.just("limited"), KEYS),
        st.tuples(st.just("forget"), KEYS),
        st.tuples(st.just("tick"), st.sampled_from([0.1, 1.0, 5.0])),
        st.tuples(st.just("take")),
        st.tuples(st.just("done"), KEYS),
    ),
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(OPS)
@example([("after", "a", 0.5), ("after", "a", 7.0), ("tick", 1.0), ("take",)])  # a later request never postpones
@example([("add", "a"), ("take",), ("add", "a"), ("done", "a"), ("take",)])  # re-added while held: runs again after
def test_any_sequence_hands_each_wanted_key_out_once_when_due_and_never_to_two_workers(ops: list[tuple[object, ...]]) -> None:
    """A model of the semantics: a key is wanted from the earliest time anyone asked for it; it is handed
    out once that time came and no worker holds it; asking again while it waits changes nothing else;
    the backoff is base * 2^failures (capped) since the key was last forgotten; a key added as urgent is
    handed out before any due key that is not, once."""
    asyncio.run(_check_model(ops))


async def _check_model(ops: list[tuple[object, ...]]) -> None:
    q, clock = queue(base_delay=0.5, max_delay=4.0)
    wanted: dict[str, float] = {}  # key -> earliest time it must be handed out
    holding: set[str] = set()
    failures: dict[str, int] = {}
    urgent: set[str] = set()
    for op in ops:
        kind = op[0]
        if kind in ("add", "urgent"):
            key = str(op[1])
            q.add(key, urgent=kind == "urgent")
            wanted[key] = min(wanted.get(key, math.inf), clock.now)
            if kind == "urgent":
                urgent.add(key)
        elif kind == "after":
            key, delay = str(op[1]), float(op[2])  # type: ignore[arg-type]
            q.add_after(key, delay)
            wanted[key] = min(wanted.get(key, math.inf), clock.now + max(delay, 0.0))
        elif kind == "limited":
            key = str(op[1])
            expected = min(4.0, 0.5 * 2.0 ** failures.get(key, 0))
            failures[key] = failures.get(key, 0) + 1
            assert q.add_rate_limited(key) == expected
            wanted[key] = min(wanted.get(key, math.inf), clock.now + expected)
        elif kind == "forget":
            q.forget(str(op[1]))
            failures.pop(str(op[1]), None)
        elif kind == "tick":
            clock.now += float(op[1])  # type: ignore[arg-type]
        elif kind == "take":
            due = {k for k, at in wanted.items() if at <= clock.now and k not in holding}
            got = await take_now(q)
            assert (got is None) == (not due), (got, due)
            if got is not None:
                assert got in due, "never a key that is not due, nor one a worker holds"
                assert got in urgent or not (due & urgent), "an urgent key first"
                urgent.discard(got)
                holding.add(got)
                del wanted[got]
        elif kind == "done" and str(op[1]) in holding:
            holding.discard(str(op[1]))
            q.done(str(op[1]))
        assert q.failures("a") == failures.get("a", 0)
    # Every worker finishes and time passes: each wanted key comes out exactly once, nothing else.
    for held in sorted(holding):
        q.done(held)
    clock.now += 100
    drained = []
    while (out := await take_now(q)) is not None:
        drained.append(out)
    assert sorted(drained) == sorted(wanted)


async def test_an_urgent_key_overtakes_the_normal_backlog_but_not_the_singletons() -> None:
    q, _ = queue(priority=lambda k: HIGH if k == "plan" else NORMAL)
    for key in ("status/a", "status/b", "status/c", "plan"):
        q.add(key)
    q.add("status/c", urgent=True)  # already waiting: moved up, not added twice
    assert [await take(q) for _ in range(4)] == ["plan", "status/c", "status/a", "status/b"]
    assert await take(q) is None
    for key in ("plan", "status/a", "status/b", "status/c"):
        q.done(key)
    q.add("status/a")
    q.add("status/c")
    assert [await take(q), await take(q)] == ["status/a", "status/c"], "urgency lasts one turn"


async def test_urgency_given_while_a_key_is_held_or_delayed_applies_to_its_next_turn() -> None:
    q, clock = queue()
    q.add("held")
    assert await take(q) == "held"
    q.add("x")
    q.add("held", urgent=True)
    q.done("held")
    assert await take(q) == "held", "re-queued by done() ahead of the backlog"
    q.done("held")
    q.add_after("later", 1.0, urgent=True)
    q.add("y")
    clock.now += 1.0
    assert [await take(q) for _ in range(3)] == ["later", "x", "y"]


async def test_the_wait_for_a_worker_is_measured_from_the_moment_a_key_could_be_taken() -> None:
    """client-go's queue_duration: a busy operator's backlog shows here, a requeue delay does not."""
    waits: list[tuple[str, float]] = []
    clock = Clock()
    q: WorkQueue[str] = WorkQueue(clock=clock, on_take=lambda key, seconds: waits.append((key, seconds)))
    q.add("now")
    q.add_after("later", 5.0)
    clock.now = 2.0
    assert await take(q) == "now"
    clock.now = 8.0  # "later" was due at 5, no worker looked until 8
    assert await take(q) == "later"
    q.add("now")  # held: ready only when done() hands it back
    clock.now = 9.0
    q.done("now")
    clock.now = 9.5
    assert await take(q) == "now"
    assert waits == [("now", 2.0), ("later", 3.0), ("now", 0.5)]
