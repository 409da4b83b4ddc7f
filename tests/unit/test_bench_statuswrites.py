"""`python -m bench.statuswrites`: both ways of a round write the same status of every mirror, to its status subresource."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web
from bench.statuswrites import _round
from loopback import serve

from regmirror import constants as c
from regmirror.kube import Credentials, HttpKube


async def test_a_round_writes_each_mirrors_status_once_and_both_ways_send_the_same_status() -> None:
    seen: list[tuple[str, str, str, dict[str, Any]]] = []

    async def handler(request: web.Request) -> web.Response:
        body = json.loads(await request.read())
        seen.append((request.method, request.path, request.content_type, body))
        return web.json_response(body)

    async with serve(handler) as url:
        client = HttpKube(Credentials(url, False, lambda: "token-x"), max_in_flight=2)
        try:
            names = ["m0000", "m0001", "m0002"]
            await _round(client, names, "apply", 7)
            applied, seen[:] = list(seen), []
            await _round(client, names, "merge", 7)
            merged = list(seen)
        finally:
            await client.close()
    base = f"/apis/{c.API_VERSION}/{c.PLURAL}"
    assert sorted(p for _, p, _, _ in applied) == sorted(p for _, p, _, _ in merged) == [f"{base}/{n}/status" for n in names]
    assert {(m, t) for m, _, t, _ in applied} == {("PATCH", "application/apply-patch+yaml")}
    assert {(m, t) for m, _, t, _ in merged} == {("PATCH", "application/merge-patch+json")}
    by_path = {p: b["status"] for _, p, _, b in applied}
    assert all(by_path[p] == b["status"] for _, p, _, b in merged), "the same status both ways"
    assert all(cd["reason"].endswith("Round7") for s in by_path.values() for cd in s["conditions"])
