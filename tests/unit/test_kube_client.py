"""The real HTTP client against a small aiohttp server on loopback: retries, Retry-After, field errors, timeouts."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aiohttp import web
from loopback import Handler, serve

from regmirror import constants as c
from regmirror.kube import ApiError, Credentials, HttpKube

DEPLOYMENT = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "regmirror-hub", "namespace": "ns"}, "spec": {}}


@asynccontextmanager
async def server(handler: Handler, **options: Any) -> AsyncIterator[HttpKube]:
    async with serve(handler) as url:
        client = HttpKube(Credentials(url, False, lambda: "token-x"), timeout=0.5, attempts=4, **options)
        try:
            yield client
        finally:
            await client.close()


def status_body(code: int, reason: str, message: str, causes: list[dict[str, str]] | None = None, retry: int | None = None) -> str:
    details: dict[str, Any] = {"causes": causes or []}
    if retry is not None:
        details["retryAfterSeconds"] = retry
    return json.dumps({"kind": "Status", "code": code, "reason": reason, "message": message, "details": details})


async def test_429_is_retried_after_the_servers_retry_after() -> None:
    seen: list[float] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(time.monotonic())
        assert request.headers["Authorization"] == "Bearer token-x"
        if len(seen) == 1:
            return web.Response(status=429, text=status_body(429, "TooManyRequests", "slow down"), headers={"Retry-After": "1"})
        assert request.query["fieldManager"] == c.FIELD_MANAGER and request.query["force"] == "true"
        assert request.headers["Content-Type"] == "application/apply-patch+yaml"
        return web.json_response(await request.json())

    async with server(handler) as client:
        result = await client.apply(DEPLOYMENT)
    assert result["metadata"]["name"] == "regmirror-hub"
    assert len(seen) == 2 and seen[1] - seen[0] >= 0.95


async def test_5xx_is_retried_then_raised_as_transient() -> None:
    calls = 0

    async def handler(request: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        return web.Response(status=500, text=status_body(500, "InternalError", "etcdserver: request timed out"))

    async with server(handler) as client:
        with pytest.raises(ApiError) as err:
            await client.apply(DEPLOYMENT)
    assert calls == 4
    assert err.value.transient and "etcdserver" in str(err.value)


async def test_422_is_not_retried_and_keeps_the_field_error() -> None:
    calls = 0

    async def handler(request: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        causes = [{"field": "spec.clusterIP", "message": 'Invalid value: "10.0.0.7": provided IP is not in the valid range'}]
        return web.Response(status=422, text=status_body(422, "Invalid", 'Service "regmirror-hub" is invalid', causes))

    async with server(handler) as client:
        with pytest.raises(ApiError) as err:
            await client.apply(DEPLOYMENT)
    assert calls == 1
    assert err.value.invalid and not err.value.transient
    assert err.value.field_error() == 'spec.clusterIP: Invalid value: "10.0.0.7": provided IP is not in the valid range'


async def test_403_is_not_retried() -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(status=403, text=status_body(403, "Forbidden", "forbidden"))

    async with server(handler) as client:
        with pytest.raises(ApiError) as err:
            await client.get("Deployment", "ns", "x")
    assert err.value.status == 403 and not err.value.transient


async def test_a_hung_request_times_out_and_is_retried() -> None:
    calls = 0

    async def handler(request: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        if calls < 3:
            await asyncio.sleep(1.5)
        return web.json_response({"kind": "Deployment", "metadata": {"name": "x"}})

    async with server(handler) as client:
        assert (await client.get("Deployment", "ns", "x"))["metadata"]["name"] == "x"  # type: ignore[index]
    assert calls == 3


async def test_absent_is_none_and_watch_errors_carry_their_code() -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        if request.query.get("watch"):
            response = web.StreamResponse()
            await response.prepare(request)
            event = {"type": "ADDED", "object": {"metadata": {"name": "a", "resourceVersion": "5"}}}
            await response.write(json.dumps(event).encode() + b"\n")
            gone = {"type": "ERROR", "object": {"kind": "Status", "code": 410, "reason": "Expired", "message": "too old resource version"}}
            await response.write(json.dumps(gone).encode() + b"\n")
            return response
        return web.Response(status=404, text=status_body(404, "NotFound", "not found"))

    async with server(handler) as client:
        assert await client.get("Service", "ns", "nope") is None
        seen = []
        with pytest.raises(ApiError) as err:
            async for type_, obj in client.watch("Service", "ns", resource_version="1", timeout_seconds=5, inactivity=5):
                seen.append((type_, obj["metadata"]["name"]))
    assert seen == [("ADDED", "a")] and err.value.status == 410


async def test_requests_in_flight_stay_within_the_bound_and_a_watch_takes_no_place() -> None:
    in_flight, most, answered = 0, 0, 0
    watching = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        nonlocal in_flight, most, answered
        if request.query.get("watch"):
            response = web.StreamResponse()
            await response.prepare(request)
            watching.set()
            await asyncio.sleep(2)  # a watch stays open while the other requests go
            return response
        in_flight += 1
        most = max(most, in_flight)
        await asyncio.sleep(0.05)
        in_flight -= 1
        answered += 1
        return web.json_response({"kind": "Deployment", "metadata": {"name": request.path.rsplit("/", 1)[-1]}})

    async def watch(client: HttpKube) -> None:
        with contextlib.suppress(ApiError):
            async for _ in client.watch("Service", "ns", resource_version="1", timeout_seconds=5, inactivity=5):
                pass

    waits: list[float] = []
    async with server(handler, max_in_flight=3, on_wait=waits.append) as client:
        client.timeout = 5.0
        watcher = asyncio.create_task(watch(client))
        await asyncio.wait_for(watching.wait(), 5)
        got = await asyncio.gather(*(client.get("Deployment", "ns", f"d{i}") for i in range(12)))
        watcher.cancel()
    assert [g["metadata"]["name"] for g in got if g] == [f"d{i}" for i in range(12)]
    assert answered == 12 and most == 3
    # Nine of the twelve waited for a place, the last ones for about three answers (3 x 0.05 s).
    assert len(waits) == 9 and max(waits) >= 0.1


async def test_a_write_that_waited_for_its_place_is_fenced_on_the_lease_then() -> None:
    leading = True
    writes: list[str] = []
    release = asyncio.Event()

    async def handler(request: web.Request) -> web.Response:
        if request.method == "GET":
            await release.wait()
            return web.json_response({"kind": "Deployment", "metadata": {"name": "x"}})
        writes.append(request.path)
        return web.json_response(await request.json())

    async with server(handler, max_in_flight=1, may_write=lambda: leading) as client:
        client.timeout = 5.0
        read = asyncio.create_task(client.get("Deployment", "ns", "x"))
        await asyncio.sleep(0.2)  # the read holds the one place
        write = asyncio.create_task(client.apply(DEPLOYMENT))
        await asyncio.sleep(0.2)
        leading = False  # the lease lapses while the write waits
        release.set()
        await read
        with pytest.raises(ApiError) as err:
            await write
    assert err.value.reason == "NotLeader" and writes == []


async def test_requests_cancelled_while_waiting_for_a_place_take_none() -> None:
    """A reconcile cancelled at shutdown or by a timeout while its request waits: the bound stays whole."""
    in_flight, most = 0, 0
    release = asyncio.Event()

    async def handler(request: web.Request) -> web.Response:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        try:
            if request.path.endswith("/held"):
                await release.wait()
            else:
                await asyncio.sleep(0.02)
        finally:
            in_flight -= 1
        return web.json_response({"kind": "Deployment", "metadata": {"name": request.path.rsplit("/", 1)[-1]}})

    async with server(handler, max_in_flight=2) as client:
        client.timeout = 5.0
        held = [asyncio.create_task(client.get("Deployment", "ns", "held")) for _ in range(2)]
        await asyncio.sleep(0.2)  # both places taken
        waiting = [asyncio.create_task(client.get("Deployment", "ns", f"w{i}")) for i in range(3)]
        await asyncio.sleep(0.1)
        for task in waiting:
            task.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)
        after = [asyncio.create_task(client.get("Deployment", "ns", f"d{i}")) for i in range(6)]
        await asyncio.sleep(0.1)
        assert not any(task.done() for task in after), "the places are still held"
        release.set()
        got = await asyncio.wait_for(asyncio.gather(*held, *after), 5)
    assert [g["metadata"]["name"] for g in got if g] == ["held", "held", *(f"d{i}" for i in range(6))]
    assert most == 2, "the cancelled requests took no place, and the bound held for the ones after them"


def test_a_rotated_in_cluster_token_is_used_within_the_recheck_period(tmp_path: Any) -> None:
    """The kubernetes package's in-cluster loader re-reads the projected token file through its refresh hook; the
    client runs that hook at most once per TOKEN_RECHECK_SECONDS (per request it cost 3% of the operator's CPU)."""
    from kubernetes.client import Configuration
    from kubernetes.config.incluster_config import InClusterConfigLoader

    from regmirror.kube import TOKEN_RECHECK_SECONDS, bearer_token

    token_file, ca_file = tmp_path / "token", tmp_path / "ca.crt"
    token_file.write_text("first")
    ca_file.write_text("not read here")
    loader = InClusterConfigLoader(
        str(token_file), str(ca_file), environ={"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    )
    loader._token_refresh_period = datetime.timedelta(0)  # the kubelet rotated it: re-read at every hook run
    cfg = Configuration()
    loader.load_and_set(cfg)
    now = [100.0]
    token = bearer_token(cfg, clock=lambda: now[0])
    assert token() == "bearer first"
    token_file.write_text("second")
    now[0] += TOKEN_RECHECK_SECONDS / 2
    assert token() == "bearer first", "within the period the token is reused, the hook not run"
    now[0] += TOKEN_RECHECK_SECONDS
    assert token() == "bearer second", "the rotated token is picked up once the period is over"
