"""The upstream credentials check runs off the reconcile path and only ever yields a verdict."""

from __future__ import annotations

import asyncio
import base64

import pytest
from controller_kit import NS, Kit, mirror

from regmirror.controller import credentials
from regmirror.controller.credentials import UpstreamChecker
from regmirror.models import RegistryMirrorSpec
from regmirror.upstream import Proxies, UpstreamCheck

SPEC = RegistryMirrorSpec.model_validate({"upstream": {"url": "https://quay.io", "credentialsSecretRef": {"name": "creds"}}})


def secret(kit: Kit) -> None:
    data = {"username": base64.b64encode(b"robot").decode(), "password": base64.b64encode(b"hunter2").decode()}
    kit.kube.put({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "creds", "namespace": NS}, "data": data})


async def until(predicate: object) -> None:
    for _ in range(200):
        if predicate():  # type: ignore[operator]
            return
        await asyncio.sleep(0.01)
    raise AssertionError("timed out")


async def test_a_verdict_lands_in_status_and_queues_the_mirror(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []

    def fake_check(url: str, username: str, password: str, ca_pem: str | None = None, proxies: object = None) -> UpstreamCheck:
        seen.append((url, username, password))
        return UpstreamCheck(False, "CredentialsRejected", f"quay.io rejected user {username!r}")

    monkeypatch.setattr(credentials, "check_upstream", fake_check)
    kit = Kit(upstream_recheck=3600)
    secret(kit)
    kit.kube.put(mirror("hub"))
    checker = UpstreamChecker(kit.ctx)
    checker.credentials_changed("hub", SPEC, "fp1")
    await until(lambda: "hub" in kit.ctx.upstream_verdicts)
    assert kit.ctx.upstream_verdicts["hub"] == (False, "CredentialsRejected", "quay.io rejected user 'robot'")
    assert ("status", "hub") in kit.queued()
    assert seen == [("https://quay.io", "robot", "hunter2")]
    assert [c for c in kit.kube.calls if c[0] == "get"] == [("get", "Secret", "creds")], "each Secret read once per check"
    await checker.stop()


async def test_a_crashing_check_is_an_unknown_verdict(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_args: object, **_kw: object) -> UpstreamCheck:
        raise ValueError("cadata should be a contiguous buffer")

    monkeypatch.setattr(credentials, "check_upstream", broken)
    kit = Kit(upstream_recheck=3600)
    secret(kit)
    checker = UpstreamChecker(kit.ctx)
    checker.credentials_changed("hub", SPEC, "fp1")
    await until(lambda: "hub" in kit.ctx.upstream_verdicts)
    ok, reason, message = kit.ctx.upstream_verdicts["hub"]
    assert ok is None and reason == "CheckFailed" and "hunter2" not in message
    checker.forget("hub")
    assert "hub" not in kit.ctx.upstream_verdicts


async def test_the_check_reruns_when_what_it_checks_changes_and_only_then(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[str, Proxies | None]] = []

    def fake_check(url: str, username: str, password: str, ca_pem: str | None = None, proxies: Proxies | None = None) -> UpstreamCheck:
        seen.append((url, proxies))
        return UpstreamCheck(True, "Authenticated", "ok")

    monkeypatch.setattr(credentials, "check_upstream", fake_check)
    kit = Kit(upstream_recheck=3600)
    secret(kit)
    checker = UpstreamChecker(kit.ctx)
    proxied = RegistryMirrorSpec.model_validate(
        {**SPEC.model_dump(by_alias=True, exclude_none=True), "proxy": {"httpsProxy": "http://proxy.corp:3128", "noProxy": ".svc"}}
    )
    moved = RegistryMirrorSpec.model_validate(
        {
            **SPEC.model_dump(by_alias=True, exclude_none=True),
            "upstream": {"url": "https://ghcr.io", "credentialsSecretRef": {"name": "creds"}},
        }
    )
    steps = [(SPEC, "fp1", 1), (SPEC, "fp1", 1), (SPEC, "fp2", 2), (proxied, "fp2", 3), (proxied, "fp2", 3), (moved, "fp2", 4)]
    for spec, fingerprint, checks in steps:
        checker.credentials_changed("hub", spec, fingerprint)
        await until(lambda n=checks: len(seen) == n)  # type: ignore[misc]
        await asyncio.sleep(0.05)
        assert len(seen) == checks, (spec.upstream.url, fingerprint, seen)
    assert seen[1][1] == Proxies(None, None, None)
    assert seen[2][1] == Proxies(None, "http://proxy.corp:3128", ".svc"), "the check goes the way the mirror goes"
    assert seen[3][0] == "https://ghcr.io"
    checker.credentials_changed("hub", RegistryMirrorSpec.model_validate({"upstream": {"url": "https://ghcr.io"}}), None)
    assert "hub" not in kit.ctx.upstream_verdicts, "no credentials: no verdict"
    await checker.stop()
