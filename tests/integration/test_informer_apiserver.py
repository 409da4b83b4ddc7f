"""The operator's informer against the real API server: a list read in pages is the whole collection.

The unit tests page through the fake client; this checks the real server's side of
the contract (`limit`, `metadata.continue`, one resourceVersion for every page) that
the fake imitates, with pages much smaller than the collection.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from harness import LocalCluster
from regmirror.controller.informer import Informer, Source
from regmirror.kube import HttpKube, ListPage, load_credentials

COUNT = 23
PAGE = 5


@pytest.fixture
def kube(cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch) -> HttpKube:
    monkeypatch.setenv("KUBECONFIG", str(cluster.kubeconfig))
    return HttpKube(load_credentials())


def test_a_paged_relist_reads_every_object_and_watches_from_the_lists_version(
    cluster: LocalCluster, namespace: str, kube: HttpKube
) -> None:
    for i in range(COUNT):
        cluster.kubectl("-n", namespace, "create", "configmap", f"cm-{i:02d}", f"--from-literal=i={i}")
    pages: list[ListPage] = []
    list_page = kube.list_objects

    async def counted(*args: Any, **kwargs: Any) -> ListPage:
        page = await list_page(*args, **kwargs)
        pages.append(page)
        return page

    kube.list_objects = counted  # type: ignore[method-assign]
    seen: list[str] = []

    async def scenario() -> None:
        informer = Informer(
            kube, Source("ConfigMap", namespace, transform=lambda o: {"data": o.get("data")}), lambda *a: seen.append(a[1]), page_size=PAGE
        )
        task = asyncio.create_task(informer.run())
        try:
            await asyncio.wait_for(informer.synced.wait(), 30)
            assert {f"cm-{i:02d}" for i in range(COUNT)} <= set(informer.items)  # and kube-root-ca.crt
            assert informer.items["cm-07"] == {"data": {"i": "7"}}
            assert len(pages) == -(-len(informer.items) // PAGE), [len(p.items) for p in pages]
            assert all(len(p.items) <= PAGE for p in pages)
            assert len({p.resource_version for p in pages}) == 1, "every page is the same snapshot"
            # The watch resumes from that snapshot: an object made after the list arrives as an event.
            await asyncio.to_thread(cluster.kubectl, "-n", namespace, "create", "configmap", "late")
            for _ in range(200):
                if "late" in informer.items:
                    break
                await asyncio.sleep(0.05)
            assert "late" in informer.items
            assert informer.relists == 1
        finally:
            task.cancel()
            await kube.close()

    asyncio.run(scenario())
