"""The informer: a re-list replaces the store (what vanished is reported deleted), watches recover."""

from __future__ import annotations

import asyncio
from typing import Any

from fakekube import FakeKube, api_error
from hypothesis import given, settings
from hypothesis import strategies as st

from regmirror.controller.informer import Informer, Source

NS = "ns"


def svc(name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": NS}, "spec": {"ports": []}}


class Changes:
    def __init__(self) -> None:
        self.seen: list[tuple[str, bool, bool]] = []

    def __call__(self, kind: str, name: str, old: dict[str, Any] | None, new: dict[str, Any] | None) -> None:
        self.seen.append((name, old is not None, new is not None))


async def until(predicate: Any, timeout: float = 2.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def test_a_relist_drops_what_vanished_while_nobody_watched() -> None:
    kube = FakeKube()
    for name in ("a", "b", "c"):
        kube.put(svc(name))
    changes = Changes()
    informer = Informer(kube, Source("Service", NS), changes)
    await informer.relist()
    assert set(informer.items) == {"a", "b", "c"}
    # Deleted during an outage: no watch event will ever say so.
    kube.objects.pop(("Service", NS, "b"))
    await informer.relist()
    assert set(informer.items) == {"a", "c"}
    assert ("b", True, False) in changes.seen, "the vanished object is reported as deleted"


async def test_watch_events_update_the_store_and_a_410_leads_to_a_relist() -> None:
    kube = FakeKube()
    kube.put(svc("a"))
    changes = Changes()
    informer = Informer(kube, Source("Service", NS), changes)
    task = asyncio.create_task(informer.run())
    try:
        await until(informer.synced.is_set)
        await until(lambda: kube._watchers)
        kube.put(svc("b"))
        await until(lambda: "b" in informer.items)
        kube.objects.pop(("Service", NS, "a"))  # vanishes without an event
        kube.break_watches(api_error(410, "too old resource version"))
        await until(lambda: "a" not in informer.items)
        assert informer.relists == 2
    finally:
        task.cancel()


async def test_a_failing_api_is_retried_and_liveness_sees_how_long() -> None:
    now = [0.0]
    kube = FakeKube()
    kube.fail("list", api_error(503), times=2)
    informer = Informer(kube, Source("Service", NS), Changes(), clock=lambda: now[0], max_backoff=0.05)
    task = asyncio.create_task(informer.run())
    try:
        await until(lambda: informer.failing_since is not None)
        now[0] = 100.0
        assert informer.blind_for() == 100.0
        await until(informer.synced.is_set)
        assert informer.blind_for() == 0.0
    finally:
        task.cancel()


async def test_a_dropped_connection_resumes_the_watch_without_a_relist() -> None:
    kube = FakeKube()
    informer = Informer(kube, Source("Service", NS), Changes(), max_backoff=0.05)
    task = asyncio.create_task(informer.run())
    try:
        await until(lambda: kube._watchers)
        kube.break_watches(api_error(0, "ServerDisconnectedError"))
        await until(lambda: len([c for c in kube.calls if c[0] == "watch"]) >= 2)
        assert informer.relists == 1
    finally:
        task.cancel()


async def test_objects_the_transform_rejects_are_not_kept() -> None:
    kube = FakeKube()
    kube.put(svc("mine"))
    kube.put(svc("other"))
    informer = Informer(kube, Source("Service", NS, transform=lambda o: o if o["metadata"]["name"] == "mine" else None), Changes())
    await informer.relist()
    assert set(informer.items) == {"mine"}


@settings(max_examples=60, deadline=None)
@given(
    names=st.sets(st.from_regex(r"[a-z][a-z0-9]{0,6}", fullmatch=True), max_size=30),
    gone=st.sets(st.integers(min_value=0, max_value=29)),
    page_size=st.integers(min_value=1, max_value=12),
)
def test_a_paged_relist_keeps_exactly_the_collection(names: set[str], gone: set[int], page_size: int) -> None:
    """Whatever the page size: every object listed, what vanished reported deleted, one request per page."""

    async def scenario() -> None:
        kube = FakeKube()
        for name in names:
            kube.put(svc(name))
        changes = Changes()
        informer = Informer(kube, Source("Service", NS), changes, page_size=page_size)
        await informer.relist()
        assert set(informer.items) == names
        assert len([c for c in kube.calls if c[0] == "list"]) == max(1, -(-len(names) // page_size))
        removed = {name for i, name in enumerate(sorted(names)) if i in gone}
        for name in removed:
            kube.objects.pop(("Service", NS, name))
        await informer.relist()
        assert set(informer.items) == names - removed
        assert {n for n, had, has in changes.seen if had and not has} == removed

    asyncio.run(scenario())


async def test_an_expired_continue_token_starts_the_list_again() -> None:
    """A 410 on a later page (the token outlived etcd's compaction): the informer lists from the start."""
    kube = FakeKube()
    for name in ("a", "b", "c", "d", "e"):
        kube.put(svc(name))
    expired = [False]
    list_page = kube.list_objects

    async def expiring(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("continue_token") and not expired[0]:
            expired[0] = True
            raise api_error(410, "The provided continue parameter is too old")
        return await list_page(*args, **kwargs)

    kube.list_objects = expiring  # type: ignore[method-assign]
    changes = Changes()
    informer = Informer(kube, Source("Service", NS), changes, page_size=2, max_backoff=0.05)
    task = asyncio.create_task(informer.run())
    try:
        await until(informer.synced.is_set)
        assert expired[0], "the second page failed once"
        assert set(informer.items) == {"a", "b", "c", "d", "e"}
        assert not [n for n, had, has in changes.seen if had and not has], "nothing reported deleted by the broken list"
    finally:
        task.cancel()
