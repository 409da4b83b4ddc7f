"""Every reconciler that calls the API server, under each way a call fails: 403, 409, 422, 429, 500, timeouts.

For each failure the tests assert what a user would meet: the typed result (so
the queue retries with growing pauses, or waits for a change, and never spins),
what reaches the mirror's status, its Events and the operator's log (a 422
names the field, a 403 says what is forbidden, a transient error stays quiet
for the grace period), that nothing already working is lost (no Secret,
credential or plan is deleted or blanked), that no credential appears in any
message, and that the next pass after the fault converges.

The children reconciler's failure paths are in test_reconcile_children.py.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from dataclasses import dataclass, field
from typing import Any

import pytest
from controller_kit import AGENT_NS, NS, Kit, make_serving, mirror, ready, status_of
from fakekube import FakeKube, api_error
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from regmirror import access as acc
from regmirror import constants as c
from regmirror.conditions import get_condition
from regmirror.controller import credentials
from regmirror.controller.credentials import UpstreamChecker
from regmirror.controller.manager import RECONCILERS
from regmirror.controller.state import ACCESS, PLAN, STATUS, Done, Key, RequeueAfter, Result, Terminal, Transient
from regmirror.kube import ApiError
from regmirror.models import RegistryMirrorSpec
from regmirror.nodeplan import NodePlan
from regmirror.render.access import decode_data
from regmirror.upstream import UpstreamCheck

CODES = ("403", "409", "422", "429", "500", "timeout")
TRANSIENT = ("409", "429", "500", "timeout")
# The API server's field error for a 422 on each kind (what it sends in status.details.causes).
FIELD_ERRORS = {
    "Secret": ("metadata.annotations", "Too long: must have at most 262144 bytes"),
    "ConfigMap": ("data", "Too long: must have at most 1048576 bytes"),
    "DaemonSet": ("spec.template.spec.containers[0].image", 'Invalid value: "": must not be empty'),
    c.KIND: ("status.conditions[0].message", "Too long: may not be longer than 32768"),
}
UPSTREAM_PASSWORD = "hunter2-upstream-password"
PRIVATE = {"upstream": {"url": "https://quay.io", "credentialsSecretRef": {"name": "quay"}}, "access": {"clients": [{"name": "ci"}]}}


def fault(code: str, kind: str, name: str) -> ApiError:
    """The error the client raises for `code` on a write of `kind` `name` (after its own retries)."""
    plural = f"{kind.lower()}s"
    if code == "403":
        return api_error(
            403, f'{plural} "{name}" is forbidden: User "system:serviceaccount:{NS}:regmirror" cannot patch resource "{plural}"'
        )
    if code == "409":
        return api_error(409, f'Operation cannot be fulfilled on {plural} "{name}": the object has been modified')
    if code == "422":
        return api_error(422, f'{kind} "{name}" is invalid', causes=[FIELD_ERRORS[kind]])
    if code == "429":
        return api_error(429, "Too many requests, please try again later.", retry_after=2)
    if code == "500":
        return api_error(500, "etcdserver: leader changed")
    return api_error(0, "no answer within the request timeout")


@dataclass
class RecordingKube(FakeKube):
    """A FakeKube that remembers every credential the operator tried to write, and fails calls on one object by name."""

    credentials: set[str] = field(default_factory=set)
    named: list[tuple[str, str, ApiError]] = field(default_factory=list)

    def fail_named(self, verb: str, name: str, error: ApiError) -> None:
        """The next `verb` call on the object called `name` raises `error`."""
        self.named.append((verb, name, error))

    def _check(self, verb: str, kind: str, name: str) -> None:
        for i, (v, n, error) in enumerate(self.named):
            if (v, n) == (verb, name):
                del self.named[i]
                self.calls.append((verb, kind, name))
                raise error
        super()._check(verb, kind, name)

    async def apply(self, obj: dict[str, Any], *, subresource: str | None = None) -> dict[str, Any]:
        if obj["kind"] == "Secret":
            self.credentials |= credentials_in(obj)
        return await super().apply(obj, subresource=subresource)


def credentials_in(secret: dict[str, Any] | None) -> set[str]:
    """Every credential a Secret of the operator's holds: passwords and the Basic tokens made of them."""
    data = decode_data(secret)
    found: set[str] = set()
    creds: list[acc.Credential] = []
    if acc.STATE_KEY in data:
        creds += acc.parse_state(data[acc.STATE_KEY]).node_credentials().values()
    if "password" in data:
        found |= {data["password"], data.get("auth", "")} - {""}
    for key, value in data.items():
        if key not in (acc.STATE_KEY, acc.ACCESS_VCL_KEY, acc.HTPASSWD_KEY, *acc.CLIENT_KEYS):
            try:
                creds += acc.parse_node_entry(value)[1].values()
            except acc.CredentialError:
                continue
    for cred in creds:
        found |= {cred.password, cred.basic}
    return found


def assert_no_credential(kit: Kit, caplog: pytest.LogCaptureFixture, *results: Result) -> None:
    """No credential in any result, Event, status or log line."""
    bodies = [kit.kube.obj(c.KIND, None, name) or {} for (kind, _, name) in kit.kube.objects if kind == c.KIND]
    shown = json.dumps([kit.kube.events, [b.get("status") for b in bodies], [str(r) for r in results]]) + caplog.text
    secrets = {UPSTREAM_PASSWORD} | (kit.kube.credentials if isinstance(kit.kube, RecordingKube) else set())
    leaked = sorted(s for s in secrets if s in shown)
    assert not leaked, f"credentials in what users see: {leaked}"


def loud(caplog: pytest.LogCaptureFixture) -> str:
    """What the operator logged at WARNING or above."""
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


def assert_says_why(code: str, kind: str, caplog: pytest.LogCaptureFixture) -> None:
    """A 403 says what is forbidden, a 422 names the field, both loud enough for an admin to see."""
    if code == "403":
        assert "forbidden" in loud(caplog), caplog.text
    if code == "422":
        field_path, message = FIELD_ERRORS[kind]
        assert f"{field_path}: {message}" in loud(caplog), caplog.text


def quay_secret(kit: Kit) -> None:
    values = {"username": "robot", "password": UPSTREAM_PASSWORD}
    kit.kube.put(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "quay", "namespace": NS},
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in values.items()},
        }
    )


def live_plan(kit: Kit) -> NodePlan:
    cm = kit.kube.obj("ConfigMap", AGENT_NS, c.NODE_CONFIG_NAME)
    assert cm is not None
    return NodePlan.from_json(cm["data"][c.NODE_CONFIG_KEY])


def node_secret(kit: Kit) -> dict[str, str]:
    return decode_data(kit.kube.obj("Secret", AGENT_NS, acc.NODE_SECRET_NAME))


def assert_plan_names_only_credentials_nodes_hold(kit: Kit) -> None:
    """Every revision the live plan names is in the agents' Secret (a node never waits for a credential that is not there)."""
    held = node_secret(kit)
    for entry in live_plan(kit).mirrors:
        if entry.auth_revision is not None:
            assert entry.auth_revision in acc.parse_node_entry(held.get(entry.name))[1], entry.name


async def worker_pass(kit: Kit, key: Key) -> float | None:
    """One pass of `key` as a worker runs it (through the manager's result handling).

    Returns the seconds until the queue hands the key out again: 0 means at
    once (a hot loop), None that it waits for an event.
    """
    q = kit.manager.queue
    q._due.pop(key, None)
    q._queued.discard(key)
    for ready_keys in q._ready:
        if key in ready_keys:
            ready_keys.remove(key)
    await kit.sync()
    await kit.manager._process(key)
    await kit.sync()
    if key in q._queued:
        return 0.0
    due = q._due.get(key)
    return None if due is None else due - kit.clock()


# ------------------------------------------------------------------ access


async def new_private_mirror() -> Kit:
    """A new private mirror "q" (upstream credentials, an access client) whose children went out; no access pass yet."""
    kit = Kit(RecordingKube())
    quay_secret(kit)
    kit.kube.put(mirror("q", **PRIVATE))
    for _ in range(4):
        await kit.run("children", "q")
    return kit


@pytest.mark.parametrize("code", CODES)
@pytest.mark.parametrize("target", ["auth", "client"])
async def test_a_failed_access_secret_write_hands_nodes_no_credential_and_the_next_pass_converges(
    code: str, target: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    kit = await new_private_mirror()
    name = acc.auth_secret_name("q") if target == "auth" else acc.client_secret_name("q", "ci")
    assert isinstance(kit.kube, RecordingKube)
    kit.kube.fail_named("apply", name, fault(code, "Secret", name))
    result = await kit.run("access", "q")
    assert isinstance(result, Transient), "the Secrets are the operator's own: even a 403 or a 422 is retried with backoff"
    assert_says_why(code, "Secret", caplog)
    assert kit.ctx.records["q"].access is None, "no decision is recorded from a pass that did not write it"
    assert isinstance(await kit.run("plan"), RequeueAfter), "the new mirror's entry waits for its credential"
    assert kit.kube.obj("ConfigMap", AGENT_NS, c.NODE_CONFIG_NAME) is None
    # The fault clears: the next pass writes both Secrets, and one plan names the credential the nodes' Secret holds.
    assert isinstance(await kit.run("access", "q"), Done | RequeueAfter)
    kit.clock.advance(5)
    await kit.run("hosts")
    assert await kit.run("plan") == Done()
    state = acc.parse_state(decode_data(kit.kube.obj("Secret", NS, acc.auth_secret_name("q")))[acc.STATE_KEY])
    assert [(e.name, e.auth_revision) for e in live_plan(kit).mirrors] == [("q", state.revision)]
    assert_plan_names_only_credentials_nodes_hold(kit)
    client = decode_data(kit.kube.obj("Secret", NS, acc.client_secret_name("q", "ci")))
    accepted = decode_data(kit.kube.obj("Secret", NS, acc.auth_secret_name("q")))[acc.ACCESS_VCL_KEY]
    assert base64.b64encode(f"{client['username']}:{client['password']}".encode()).decode() in accepted, (
        "the client's credential is the one the front accepts"
    )
    assert_no_credential(kit, caplog, result)


@pytest.mark.parametrize("code", CODES)
async def test_a_failing_access_secret_write_is_shown_in_status_once_someone_must_know(code: str, caplog: pytest.LogCaptureFixture) -> None:
    """A new private mirror whose access Secret cannot be written waits for its nodes: the status says why."""
    caplog.set_level(logging.INFO)
    kit = await new_private_mirror()
    name = acc.auth_secret_name("q")
    assert isinstance(kit.kube, RecordingKube)
    for _ in range(2 if code in TRANSIENT else 1):  # one failing pass each
        kit.kube.fail_named("apply", name, fault(code, "Secret", name))

    async def stalled_and_reconciling() -> tuple[dict[str, Any], dict[str, Any]]:
        assert isinstance(await kit.run("access", "q"), Transient)
        await kit.run("status", "q")
        conditions = status_of(kit, "q").get("conditions") or []
        return get_condition(conditions, "Stalled") or {}, get_condition(conditions, "Reconciling") or {}

    stalled, reconciling = await stalled_and_reconciling()
    if code in TRANSIENT:
        assert "failed" not in stalled.get("message", "") + reconciling.get("message", ""), "retried before anyone is told"
        kit.clock.advance(31)  # past the transient grace
        stalled, reconciling = await stalled_and_reconciling()
        assert stalled.get("status") != "True"
        assert f"applying Secret {NS}/{name} failed" in reconciling.get("message", "")
    else:
        assert stalled.get("status") == "True", "someone must act: told at once"
        assert stalled.get("reason") == ("ApplyForbidden" if code == "403" else "ApplyFailed")
        assert f"applying Secret {NS}/{name} failed" in stalled.get("message", "")
    assert isinstance(await kit.run("access", "q"), Done | RequeueAfter), "the fault cleared"
    await kit.run("status", "q")
    conditions = status_of(kit, "q").get("conditions") or []
    assert "Secret" not in (get_condition(conditions, "Stalled") or {}).get("message", "") + (
        get_condition(conditions, "Reconciling") or {}
    ).get("message", ""), "the problem clears with the write that succeeds"
    assert_no_credential(kit, caplog)


@pytest.mark.parametrize("code", CODES)
@pytest.mark.parametrize("read", ["auth", "client", "nodes"])
async def test_an_unreadable_access_secret_is_never_taken_for_a_lost_one(code: str, read: str, caplog: pytest.LogCaptureFixture) -> None:
    """A restarted operator whose reads fail must not issue new credentials: that would fail every node's pulls."""
    caplog.set_level(logging.INFO)
    kit = await new_private_mirror()
    await kit.converge("q")
    kube = kit.kube
    assert isinstance(kube, RecordingKube)
    make_serving(kit, "q")
    kit.clock.advance(61)
    await kit.run("status", "q")
    before = {name: kube.obj("Secret", ns, name) for ns, name in _access_secrets("q")}
    status_before = status_of(kit, "q")
    restarted = Kit(kube)
    for _ in range(4):
        await restarted.run("children", "q")
    await restarted.run("hosts")
    kube.calls.clear()
    name = {"auth": acc.auth_secret_name("q"), "client": acc.client_secret_name("q", "ci"), "nodes": acc.NODE_SECRET_NAME}[read]
    kube.fail_named("get", name, fault(code, "Secret", name))
    result = await restarted.run("access", "q")
    assert isinstance(result, Transient), "retried with backoff"
    assert kube.writes() == [], "nothing regenerated, nothing blanked"
    await restarted.run("plan")
    await restarted.run("status", "q")
    assert {name: kube.obj("Secret", ns, name) for ns, name in _access_secrets("q")} == before
    if code in TRANSIENT:
        assert status_of(restarted, "q") == status_before, "retried before anyone is told: the status stays as it was"
    else:
        # Someone must act: the status says what failed, and the mirror keeps serving.
        status = status_of(restarted, "q")
        assert status["access"] == status_before["access"]
        stalled = get_condition(status["conditions"], "Stalled") or {}
        assert stalled.get("status") == "True" and "reading its access Secrets failed" in stalled.get("message", "")
        assert (get_condition(status["conditions"], "Ready") or {}).get("status") == "True"
    # The read succeeds again: the same credentials, still nothing to write but the status that clears the problem.
    assert isinstance(await restarted.run("access", "q"), Done | RequeueAfter)
    await restarted.run("plan")
    await restarted.run("status", "q")
    assert [w for w in kube.writes() if w[0] != "apply_status"] == []
    assert (get_condition(status_of(restarted, "q")["conditions"], "Stalled") or {}).get("status") == "False"
    assert_no_credential(restarted, caplog, result)


def _access_secrets(name: str) -> list[tuple[str, str]]:
    return [(NS, acc.auth_secret_name(name)), (NS, acc.client_secret_name(name, "ci")), (AGENT_NS, acc.NODE_SECRET_NAME)]


@pytest.mark.parametrize("code", CODES)
async def test_a_restored_access_secret_is_announced_even_when_a_later_write_of_the_pass_fails(
    code: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    kit = await new_private_mirror()
    await kit.converge("q")
    kube = kit.kube
    assert isinstance(kube, RecordingKube)
    before = acc.parse_state(decode_data(kube.obj("Secret", NS, acc.auth_secret_name("q")))[acc.STATE_KEY])
    kube.events.clear()
    kube.remove("Secret", NS, acc.auth_secret_name("q"))
    kube.remove("Secret", NS, acc.client_secret_name("q", "ci"))
    kube.fail_named("apply", acc.client_secret_name("q", "ci"), fault(code, "Secret", acc.client_secret_name("q", "ci")))
    result = await kit.run("access", "q")
    assert isinstance(result, Transient)
    restored = acc.parse_state(decode_data(kube.obj("Secret", NS, acc.auth_secret_name("q")))[acc.STATE_KEY])
    assert (restored.revision, restored.current) == (before.revision, before.current), "restored from the nodes' copy"
    assert [e["reason"] for e in kube.events] == ["CredentialsRecovered"], "what went out is announced, once"
    assert isinstance(await kit.run("access", "q"), Done | RequeueAfter)
    assert [e["reason"] for e in kube.events] == ["CredentialsRecovered", "ClientCredentialIssued"]
    assert isinstance(await kit.run("access", "q"), Done | RequeueAfter)
    assert len(kube.events) == 2, "nothing announced twice"
    assert_no_credential(kit, caplog, result)


# ------------------------------------------------------------------ plan


PLAN_OBJECTS = {"ConfigMap": c.NODE_CONFIG_NAME, "DaemonSet": c.AGENT_NAME, "Secret": acc.NODE_SECRET_NAME}


@pytest.mark.parametrize("code", CODES)
@pytest.mark.parametrize("kind", ["Secret", "ConfigMap", "DaemonSet"])
async def test_a_failed_plan_write_keeps_the_previous_plan_on_the_nodes_and_the_next_pass_rolls_the_new_one(
    code: str, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    kit = Kit(RecordingKube())
    kit.kube.put(mirror("a"))
    await kit.converge("a")
    before = {k: kit.kube.obj(k, AGENT_NS, n) for k, n in PLAN_OBJECTS.items()}
    old_digest = live_plan(kit).digest()
    kit.kube.put(mirror("b"))
    await kit.admit("b")
    kit.clock.advance(5)
    kit.kube.fail("apply", fault(code, kind, PLAN_OBJECTS[kind]), kind=kind)
    result = await kit.run("plan")
    assert isinstance(result, Transient), "the plan is the operator's own: even a 403 or a 422 is retried with backoff"
    assert_says_why(code, kind, caplog)
    after = {k: kit.kube.obj(k, AGENT_NS, n) for k, n in PLAN_OBJECTS.items()}
    assert all(after.values()), "nothing deleted"
    previous = NodePlan.from_json((before["ConfigMap"] or {})["data"][c.NODE_CONFIG_KEY])
    assert [e for e in live_plan(kit).mirrors if e.name == "a"] == previous.mirrors, "a's entry is untouched"
    assert node_secret(kit)["a"] == decode_data(before["Secret"])["a"], "a's nodes keep their credential"
    ds = after["DaemonSet"]
    assert ds is not None
    assert ds["spec"]["template"]["metadata"]["annotations"][c.ANNOTATION_NODE_CONFIG_HASH] == old_digest, (
        "the agents are not rolled: their pods keep the previous plan"
    )
    if kind != "DaemonSet":
        assert after["ConfigMap"] == before["ConfigMap"], "no plan goes out before the credentials it names"
    assert_plan_names_only_credentials_nodes_hold(kit)
    assert kit.ctx.plan.plan is not None and kit.ctx.plan.plan.digest() == old_digest, "the controller knows what nodes have"
    # b's nodes wait for this plan: its status says why (a transient failure once it lasted the grace period);
    # a's nodes keep their entry, so its status does not change.
    make_serving(kit, "a")
    assert (STATUS, "b") in kit.queued()

    async def plan_problem(name: str) -> str:
        await kit.run("status", name)
        conditions = status_of(kit, name).get("conditions") or []
        return " ".join(m for cd in conditions if "node plan" in (m := str(cd.get("message", ""))))

    if code in TRANSIENT:
        assert await plan_problem("b") == "", "retried before anyone is told"
        kit.clock.advance(31)
    told = await plan_problem("b")
    assert f"{kind} {AGENT_NS}/{PLAN_OBJECTS[kind]} failed" in told, status_of(kit, "b")
    if code == "422":
        field_path, words = FIELD_ERRORS[kind]
        assert field_path in told and words not in told, "status names the field, never the API server's words (they may quote credentials)"
    if code not in TRANSIENT:
        stalled = get_condition(status_of(kit, "b").get("conditions"), "Stalled") or {}
        assert stalled.get("reason") == ("ApplyForbidden" if code == "403" else "ApplyFailed")
    assert await plan_problem("a") == "", "a's nodes are not waiting for this plan"
    # The fault clears: the next pass rolls the plan with both mirrors.
    kit.clock.advance(5)
    assert await kit.run("plan") == Done()
    assert await plan_problem("b") == "", "the problem clears with the plan that goes out"
    assert [e.name for e in live_plan(kit).mirrors] == ["a", "b"]
    ds = kit.kube.obj("DaemonSet", AGENT_NS, c.AGENT_NAME)
    assert ds is not None and ds["spec"]["template"]["metadata"]["annotations"][c.ANNOTATION_NODE_CONFIG_HASH] == live_plan(kit).digest()
    assert_plan_names_only_credentials_nodes_hold(kit)
    assert ("rollout", "") in kit.queued()
    assert_no_credential(kit, caplog, result)


# ------------------------------------------------------------------ status


async def serving_mirror(kit: Kit, name: str = "hub", **spec: Any) -> None:
    kit.kube.put(mirror(name, nodeConfig={"enabled": False}, **spec))
    await kit.converge(name)
    make_serving(kit, name)


@pytest.mark.parametrize("code", CODES)
async def test_a_failed_status_write_keeps_the_last_status_and_the_next_pass_writes_the_news(
    code: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    kit = Kit()
    await serving_mirror(kit)
    assert await kit.run("status", "hub") == Done()
    written = status_of(kit, "hub")
    assert ready(written) == ("True", "MirrorReady")
    kit.kube.remove("Service", NS, "regmirror-hub")  # news: the endpoint is gone
    kit.kube.fail("apply_status", fault(code, c.KIND, "hub"))
    result = await kit.run("status", "hub")
    if code == "422":
        assert isinstance(result, Terminal), "the API server refuses this status: retrying it unchanged cannot help"
        assert "status.conditions[0].message: Too long" in result.error, "the rejection names the field"
    else:
        assert isinstance(result, Transient), "retried with backoff"
    assert_says_why(code, c.KIND, caplog)
    assert status_of(kit, "hub") == written, "the last status stays; nothing is blanked"
    assert kit.kube.events == []
    # The fault clears (for a 422: the next event, or the resync): the news is written.
    assert await kit.run("status", "hub") == Done()
    assert ready(status_of(kit, "hub"))[0] == "False" and status_of(kit, "hub").get("endpoint") is None
    await kit.run("children", "hub")  # the Service comes back
    assert await kit.run("status", "hub") == Done()
    assert ready(status_of(kit, "hub")) == ("True", "MirrorReady")
    assert_no_credential(kit, caplog, result)


@pytest.mark.parametrize("code", CODES)
async def test_a_problem_is_announced_once_and_only_after_the_status_that_shows_it_is_written(
    code: str, caplog: pytest.LogCaptureFixture
) -> None:
    kit = Kit()
    kit.kube.put(mirror("hub", upstream={"url": "https://quay.io", "credentialsSecretRef": {"name": "quay"}}))
    await kit.run("children", "hub")
    kit.kube.fail("apply_status", fault(code, c.KIND, "hub"))
    result = await kit.run("status", "hub")
    assert isinstance(result, Terminal if code == "422" else Transient)
    assert kit.kube.events == [], "no Event for a status nobody can read"
    assert await kit.run("status", "hub") == Done()
    assert ready(status_of(kit, "hub")) == ("False", "CredentialsSecretMissing")
    assert [(e["reason"], e["type"]) for e in kit.kube.events] == [("CredentialsSecretMissing", "Warning")]
    await kit.run("status", "hub")
    assert len(kit.kube.events) == 1
    # The Secret appears: the mirror recovers, and says so.
    quay_secret(kit)
    await kit.converge("hub")
    make_serving(kit, "hub")
    assert await kit.run("status", "hub") == Done()
    assert ready(status_of(kit, "hub")) == ("True", "MirrorReady")
    assert [e["reason"] for e in kit.kube.events] == ["CredentialsSecretMissing", "MirrorReady"]
    assert_no_credential(kit, caplog, result)


# ------------------------------------------------------------------ no reconciler spins


async def _failing(kit: Kit, concern: str, code: str) -> Key:
    """A cluster where `concern`'s next write fails with `code` until the fault is cleared; its key."""
    forever = 10**6
    if concern == ACCESS:
        quay_secret(kit)
        kit.kube.put(mirror("q", **PRIVATE))
        for _ in range(4):
            await kit.run("children", "q")
        kit.kube.fail("apply", fault(code, "Secret", acc.auth_secret_name("q")), kind="Secret", times=forever)
        return (ACCESS, "q")
    if concern == PLAN:
        kit.kube.put(mirror("a"))
        await kit.admit("a")
        kit.kube.fail("apply", fault(code, "ConfigMap", c.NODE_CONFIG_NAME), kind="ConfigMap", times=forever)
        return (PLAN, "")
    await serving_mirror(kit)
    kit.kube.fail("apply_status", fault(code, c.KIND, "hub"), times=forever)
    return (STATUS, "hub")


@pytest.mark.parametrize("code", CODES)
@pytest.mark.parametrize("concern", [ACCESS, PLAN, STATUS])
async def test_a_lasting_fault_is_retried_with_doubling_pauses_never_in_a_loop(concern: str, code: str) -> None:
    kit = Kit(backoff_base=0.5, backoff_max=300)
    key = await _failing(kit, concern, code)
    pauses: list[float | None] = []
    while sum(p or 0 for p in pauses) < 120:
        pause = await worker_pass(kit, key)
        pauses.append(pause)
        if pause is None:
            break
        kit.clock.advance(pause)
    if concern == STATUS and code == "422":
        assert pauses == [None], "a rejected status waits for a change (an event, the resync), not a timer"
    elif code == "429":
        assert pauses == [2.0, 2.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0], "never sooner than the server's Retry-After (2 s)"
    else:
        assert pauses == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0], "per-key backoff, doubling"
    kit.kube.failures.clear()
    kit.clock.advance(5)
    assert await worker_pass(kit, key) != 0.0
    assert kit.manager.queue.failures(key) == 0, "a success starts the next backoff from the beginning"


@pytest.mark.parametrize("concern", ["hosts", "rollout", "pins"])
async def test_the_passes_that_only_read_the_store_make_no_api_call_so_no_api_failure_reaches_them(concern: str) -> None:
    kit = Kit()
    kit.kube.put(mirror("a"))
    await kit.converge("a")
    kit.kube.calls.clear()
    for verb in ("get", "list", "apply", "apply_status", "patch", "delete", "event"):
        kit.kube.fail(verb, api_error(500), times=10**6)
    result = await RECONCILERS[concern](kit.ctx, "")
    assert isinstance(result, Done | RequeueAfter)
    assert kit.kube.calls == []


# ------------------------------------------------------------------ the upstream credentials check


SPEC = RegistryMirrorSpec.model_validate({"upstream": {"url": "https://quay.io", "credentialsSecretRef": {"name": "quay"}}})


async def until(predicate: Any, what: str = "") -> None:
    for _ in range(300):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out: {what}")


def judge(seen: list[str]) -> Any:
    def check(url: str, username: str, password: str, ca_pem: str | None = None, proxies: object = None) -> UpstreamCheck:
        seen.append(password)
        if password == UPSTREAM_PASSWORD:
            return UpstreamCheck(True, "Authenticated", f"{url} accepted user {username!r}")
        return UpstreamCheck(False, "CredentialsRejected", f"{url} rejected user {username!r}")

    return check


def checker_kit() -> Kit:
    kit = Kit(upstream_recheck=0.05, backoff_base=0.005)
    kit.kube.put(mirror("hub"))
    quay_secret(kit)
    return kit


@pytest.mark.parametrize("code", CODES)
async def test_an_unreadable_credentials_secret_is_reported_at_once_only_when_someone_must_act(
    code: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[str] = []
    monkeypatch.setattr(credentials, "check_upstream", judge(seen))
    kit = checker_kit()
    kit.kube.fail("get", fault(code, "Secret", "quay"), kind="Secret", times=10**6)
    checker = UpstreamChecker(kit.ctx)
    checker.credentials_changed("hub", SPEC, "fp1")
    try:
        if code in TRANSIENT:
            await until(lambda: len(kit.kube.calls) >= 4, "retries")
            assert "hub" not in kit.ctx.upstream_verdicts, "retried quietly during the grace period"
            kit.clock.advance(31)
        await until(lambda: "hub" in kit.ctx.upstream_verdicts, "a verdict")
        ok, reason, message = kit.ctx.upstream_verdicts["hub"]
        assert (ok, reason) == (None, "CheckFailed")
        assert f"Secret {NS}/quay" in message and str(fault(code, "Secret", "quay")) in message, message
        if code == "403":
            assert "RBAC" in message, "someone must grant the operator the read"
        assert seen == [], "no check with credentials it could not read"
        # The fault clears: the recheck lands the real verdict.
        kit.kube.failures.clear()
        await until(lambda: kit.ctx.upstream_verdicts.get("hub", (None,))[0] is True, "the verdict after the fault")
        assert UPSTREAM_PASSWORD not in json.dumps(kit.ctx.upstream_verdicts) + caplog.text
    finally:
        await checker.stop()


@pytest.mark.parametrize("code", TRANSIENT)
async def test_a_standing_verdict_is_kept_while_a_recheck_cannot_read_the_secret(code: str, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []
    monkeypatch.setattr(credentials, "check_upstream", judge(seen))
    kit = checker_kit()
    wrong = kit.kube.obj("Secret", NS, "quay")
    assert wrong is not None
    wrong["data"]["password"] = base64.b64encode(b"wrong").decode()
    kit.kube.put(wrong)
    checker = UpstreamChecker(kit.ctx)
    checker.credentials_changed("hub", SPEC, "fp1")
    try:
        await until(lambda: "hub" in kit.ctx.upstream_verdicts, "the first verdict")
        rejected = kit.ctx.upstream_verdicts["hub"]
        assert rejected[0] is False
        kit.kube.fail("get", fault(code, "Secret", "quay"), kind="Secret", times=10**6)
        calls = len(kit.kube.calls)
        await until(lambda: len(kit.kube.calls) >= calls + 3, "rechecks")
        assert kit.ctx.upstream_verdicts["hub"] == rejected, "an API hiccup does not turn a known verdict into Unknown"
    finally:
        await checker.stop()


# ------------------------------------------------------------------ any sequence of faults


TARGETS = [
    ("get", "Secret", acc.auth_secret_name("q")),
    ("get", "Secret", acc.NODE_SECRET_NAME),
    ("apply", "Secret", acc.auth_secret_name("q")),
    ("apply", "Secret", acc.client_secret_name("q", "ci")),
    ("apply", "Secret", acc.NODE_SECRET_NAME),
    ("apply", "ConfigMap", c.NODE_CONFIG_NAME),
    ("apply", "DaemonSet", c.AGENT_NAME),
    ("apply_status", c.KIND, "q"),
]
fault_plans = st.lists(st.tuples(st.sampled_from(TARGETS), st.sampled_from(CODES)), max_size=6)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fault_plans)
def test_whatever_faults_hit_a_private_mirror_it_converges_once_they_clear_and_no_credential_leaks(
    faults: list[tuple[tuple[str, str, str], str]],
) -> None:
    """The faults hit the access, plan and status passes of a new private mirror, in any order, any number."""
    asyncio.run(_converge_through(faults))


async def _converge_through(faults: list[tuple[tuple[str, str, str], str]]) -> None:
    kube = RecordingKube()
    kit = Kit(kube)
    quay_secret(kit)
    kit.kube.put(mirror("q", **PRIVATE))
    for _ in range(2):
        await kit.run("children", "q")
    await kit.run("hosts")
    for (verb, kind, name), code in faults:
        kube.fail_named(verb, name, fault(code, kind, name))
    # A worker's passes while the faults last: each pass meets the next fault on its objects, if any.
    results = []
    for _ in range(2):
        for concern, name in (("access", "q"), ("plan", ""), ("status", "q")):
            kit.clock.advance(2)
            results.append(await kit.run(concern, name))
            secrets = [kube.obj("Secret", ns, n) for ns, n in _access_secrets("q")]
            assert all(s is None or decode_data(s) for s in secrets), "a Secret is never blanked"
            if kit.kube.obj("ConfigMap", AGENT_NS, c.NODE_CONFIG_NAME) is not None:
                assert_plan_names_only_credentials_nodes_hold(kit)
    kube.named.clear()
    for _ in range(2):
        kit.clock.advance(5)
        for concern, name in (("access", "q"), ("plan", ""), ("rollout", "")):
            await kit.run(concern, name)
    make_serving(kit, "q")
    kit.clock.advance(61)
    assert await kit.run("status", "q") == Done()
    state = acc.parse_state(decode_data(kube.obj("Secret", NS, acc.auth_secret_name("q")))[acc.STATE_KEY])
    assert [(e.name, e.auth_revision) for e in live_plan(kit).mirrors] == [("q", state.revision)]
    assert_plan_names_only_credentials_nodes_hold(kit)
    assert ready(status_of(kit, "q")) == ("True", "MirrorReady")
    shown = json.dumps([kube.events, status_of(kit, "q"), [str(r) for r in results]])
    assert not [s for s in kube.credentials | {UPSTREAM_PASSWORD} if s in shown]
