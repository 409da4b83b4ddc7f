"""Who may pull (regmirror.access): credentials, the state in the Secrets, and rotation that never fails a pull.

The state machine is searched, not replayed: hypothesis drives a small world
(the operator's Secret, the agent's copy, the published node plan, nodes that
apply it one by one, fronts that load a new access.vcl only when "the kubelet"
gets round to it, hands that delete or corrupt Secrets, clocks that run, policy
switches) and after every step checks what a user would see: no node that
routes to the mirror ever holds a credential the front it reaches refuses.
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

import bcrypt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from regmirror import access as acc
from regmirror.models import AccessPolicy, RegistryMirrorSpec
from regmirror.render.front import render_access_vcl


def spec(**fields: Any) -> RegistryMirrorSpec:
    body: dict[str, Any] = {"upstream": {"url": "https://quay.io"}}
    body.update(fields)
    return RegistryMirrorSpec.model_validate(body)


PRIVATE = {"upstream": {"url": "https://quay.io", "credentialsSecretRef": {"name": "quay-creds"}}}


def counter_token() -> Any:
    """Deterministic, distinct 43-character tokens (what secrets.token_urlsafe(32) returns)."""
    state = {"n": 0}

    def token(_nbytes: int) -> str:
        state["n"] += 1
        return f"tok{state['n']:040d}"

    return token


def front_view(access_vcl: str) -> tuple[set[str], bool, int]:
    """What a front that compiled this access.vcl accepts: (Authorization values, enforced, generation)."""
    accepted = set(re.findall(r'req\.http\.Authorization == "([^"]+)"', access_vcl))
    info = json.loads(re.search(r'"""(\{.*\})"""', access_vcl).group(1))  # type: ignore[union-attr]
    return accepted, bool(info["enforced"]), int(info["generation"])


# ---------------------------------------------------------------- credentials and stored forms


def test_a_credential_never_shows_its_password() -> None:
    cred = acc.generate("regmirror-node-r1")
    assert cred.password not in repr(cred)
    assert acc.Credential.from_authorization(cred.authorization) == cred
    state = acc.AccessState(revision=1, current=cred, next=acc.generate("regmirror-node-r2"))
    assert cred.password not in repr(state)


@pytest.mark.parametrize(
    "value",
    ["", "Bearer abc", "Basic !!!!", "Basic " + "QQ==", "Basic dXNlcjpwYXNz\n", 'Basic ab"cd'],
)
def test_what_is_not_a_generated_credential_is_refused(value: str) -> None:
    with pytest.raises(acc.CredentialError):
        acc.Credential.from_authorization(value)


@given(st.text(max_size=200) | st.binary(max_size=200).map(lambda b: b.decode("latin-1")))
def test_any_stored_text_reads_as_a_state_or_as_corrupt_never_crashes(text: str) -> None:
    for parse in (acc.parse_state, acc.parse_node_entry):
        with contextlib.suppress(acc.CredentialError):
            parse(text)  # type: ignore[operator]


@given(st.data())
def test_a_state_survives_its_own_json_and_any_damage_to_it_is_caught(data: st.DataObject) -> None:
    state = acc.decide_access(acc.AccessInputs("m", spec(), now=5.0), counter_token()).state
    text = state.to_json()
    assert acc.parse_state(text) == state
    raw = json.loads(text)
    key = data.draw(st.sampled_from(sorted(raw)))
    raw[key] = data.draw(st.one_of(st.none(), st.integers(-3, 3), st.text(max_size=5), st.just({"username": "x", "password": "y"})))
    try:
        damaged = acc.parse_state(json.dumps(raw))
    except acc.CredentialError:
        return
    # Whatever still parses is a coherent state (a field that accepts the new value).
    assert damaged.current.username == acc.node_username(damaged.revision)


def test_the_access_vcl_refuses_to_carry_anything_but_basic_credentials() -> None:
    with pytest.raises(ValueError):
        render_access_vcl(['Basic abc"; } sub vcl_recv { return (pass); } "'], enforced=True, generation=1)


def test_htpasswd_keeps_a_line_whose_hash_still_matches_and_hashes_new_ones() -> None:
    token = counter_token()
    state = acc.decide_access(acc.AccessInputs("m", spec(**PRIVATE), now=0.0), token).state
    first = acc.render_htpasswd(state, {})
    lines = dict(line.split(":", 1) for line in first.splitlines())
    assert set(lines) == {"regmirror-node-r1", "regmirror-node-r2"}
    assert bcrypt.checkpw(state.current.password.encode(), lines["regmirror-node-r1"].encode())
    assert acc.render_htpasswd(state, {}, first) == first, "unchanged passwords keep their salted hashes"
    client = acc.generate("client-ci", token)
    second = acc.render_htpasswd(state, {"ci": client}, first)
    assert second.startswith(first) and "client-ci:" in second


# ---------------------------------------------------------------- decisions


def test_open_by_default_restricted_with_upstream_credentials() -> None:
    assert acc.decide_access(acc.AccessInputs("m", spec(), now=0.0)).policy == AccessPolicy.OPEN
    private = acc.decide_access(acc.AccessInputs("m", spec(**PRIVATE), now=0.0))
    assert private.policy == AccessPolicy.RESTRICTED
    accepted, enforced, _ = front_view(private.auth_data[acc.ACCESS_VCL_KEY])
    assert enforced, "a new mirror is enforced at once: no node routes to it before it has the credential"
    assert accepted == {private.state.current.authorization, private.state.next.authorization}
    explicit_open = acc.decide_access(acc.AccessInputs("m", spec(**PRIVATE, access={"policy": "Open"}), now=0.0))
    assert not front_view(explicit_open.auth_data[acc.ACCESS_VCL_KEY])[1]


def test_nothing_secret_leaves_the_secret_data() -> None:
    d = acc.decide_access(acc.AccessInputs("m", spec(**PRIVATE, access={"clients": [{"name": "ci"}]}), now=0.0))
    secrets = [d.state.current.password, d.state.next.password, d.client_data["ci"]["password"]]
    secrets += [d.state.current.basic, d.state.next.basic, d.client_data["ci"]["auth"]]
    public = json.dumps([d.status(True), d.events, d.plan_revision, repr(d.state)])
    assert not [s for s in secrets if s in public]
    assert d.status(True)["clients"] == ["regmirror-m.client-ci"]


def test_a_mirror_whose_plan_entry_carries_no_credential_is_not_enforced_until_nodes_have_one() -> None:
    s = spec(**PRIVATE)
    first = acc.decide_access(acc.AccessInputs("m", s, now=0.0, published=acc.Published(None, True)))
    assert not first.state.enforced, "nodes routing to it send no credential yet"
    stored = first.auth_data
    d = acc.decide_access(
        acc.AccessInputs("m", s, now=1.0, stored_state=stored[acc.STATE_KEY], published=acc.Published(first.plan_revision, False))
    )
    assert not d.state.enforced, "rolling out"
    d = acc.decide_access(
        acc.AccessInputs("m", s, now=2.0, stored_state=d.auth_data[acc.STATE_KEY], published=acc.Published(first.plan_revision, True))
    )
    assert d.state.enforced and d.state.generation > first.state.generation


def test_a_deleted_access_secret_is_restored_from_the_nodes_copy_without_a_new_credential() -> None:
    s = spec(**PRIVATE)
    d = acc.decide_access(acc.AccessInputs("m", s, now=0.0))
    published = acc.Published(d.plan_revision, True)
    again = acc.decide_access(acc.AccessInputs("m", s, now=10.0, node_copy=d.node_entry, published=published))
    assert again.state.current == d.state.current and again.state.next == d.state.next
    assert again.state.enforced
    assert [e[0] for e in again.events] == ["CredentialsRecovered"]


def test_a_corrupted_client_secret_is_reissued_and_the_old_value_stops_being_accepted() -> None:
    s = spec(**PRIVATE, access={"clients": [{"name": "ci"}]})
    d = acc.decide_access(acc.AccessInputs("m", s, now=0.0))
    old = acc.Credential(d.client_data["ci"]["username"], d.client_data["ci"]["password"])
    broken = {**d.client_data["ci"], "auth": "tampered"}
    d2 = acc.decide_access(acc.AccessInputs("m", s, now=1.0, stored_state=d.auth_data[acc.STATE_KEY], client_secrets={"ci": broken}))
    new = acc.Credential(d2.client_data["ci"]["username"], d2.client_data["ci"]["password"])
    assert new != old
    accepted = front_view(d2.auth_data[acc.ACCESS_VCL_KEY])[0]
    assert new.authorization in accepted and old.authorization not in accepted
    assert [e[0] for e in d2.events] == ["ClientCredentialIssued"]


# ---------------------------------------------------------------- the searched world


@dataclass
class Node:
    holds: str | None = None  # the Authorization its files carry (None: no route to the mirror)
    applied: int | None = None  # the plan revision it applied


@dataclass
class World:
    policy_open: bool = False
    now: float = 0.0
    auth: dict[str, str] | None = None  # regmirror-<m>-auth data
    node_copy: str | None = None
    clients: dict[str, dict[str, str]] = field(default_factory=dict)
    published: int | None = None  # revision in the published plan; None: not published yet
    nodes: list[Node] = field(default_factory=lambda: [Node() for _ in range(3)])
    fronts: list[str] = field(default_factory=list)  # access.vcl each front replica has loaded
    rotate_request: str = ""


class AccessWorld(RuleBasedStateMachine):
    """One mirror, three nodes, two front replicas, and everything that can happen to them."""

    def __init__(self) -> None:
        super().__init__()
        self.w = World()
        self.token = counter_token()
        self.requests = 0

    def spec(self) -> RegistryMirrorSpec:
        return spec(**PRIVATE, access={"policy": "Open" if self.w.policy_open else "Restricted", "rotateEvery": "24h"})

    def rolled_out(self) -> bool:
        return self.w.published is not None and all(n.applied == self.w.published for n in self.w.nodes)

    @initialize()
    def create(self) -> None:
        self.reconcile()
        assert self.w.auth is not None
        # The pods cannot start before the Secret exists: they load what it holds first.
        self.w.fronts = [self.w.auth[acc.ACCESS_VCL_KEY]] * 2

    @rule()
    def reconcile(self) -> None:
        w = self.w
        w.now += 0.002  # a reconcile and the Secret write it ends with take time
        loaded = [front_view(f)[2] for f in w.fronts]
        d = acc.decide_access(
            acc.AccessInputs(
                "m",
                self.spec(),
                now=w.now,
                stored_state=(w.auth or {}).get(acc.STATE_KEY),
                stored_htpasswd=(w.auth or {}).get(acc.HTPASSWD_KEY),
                node_copy=w.node_copy,
                client_secrets=w.clients,
                published=None if w.published is None else acc.Published(w.published, self.rolled_out()),
                fronts_loaded=min(loaded) if loaded else None,
                rotate_request=w.rotate_request,
                min_rotation_spacing=600,
            ),
            self.token,
        )
        # What the operator applies, in this order: Secrets first, then the plan.
        w.auth, w.node_copy = dict(d.auth_data), d.node_entry
        w.published = d.plan_revision

    @rule(i=st.integers(0, 2))
    def node_applies_the_plan(self, i: int) -> None:
        w, node = self.w, self.w.nodes[i]
        if w.published is None:
            return
        try:
            _, creds = acc.parse_node_entry(w.node_copy)
        except acc.CredentialError:
            return  # the agent keeps its files and reports the credential missing
        if w.published in creds:
            node.holds, node.applied = creds[w.published].authorization, w.published

    @rule(i=st.integers(0, 1))
    def kubelet_refreshes_a_front(self, i: int) -> None:
        # A Secret (or key) that is gone leaves the volume as it was: the kubelet keeps the last files.
        if self.w.auth is not None and acc.ACCESS_VCL_KEY in self.w.auth:
            self.w.fronts[i] = self.w.auth[acc.ACCESS_VCL_KEY]

    @rule(seconds=st.sampled_from([1.0, 700.0, 90000.0]))
    def time_passes(self, seconds: float) -> None:
        self.w.now += seconds

    @rule()
    def someone_asks_for_a_rotation(self) -> None:
        self.requests += 1
        self.w.rotate_request = f"r{self.requests}"

    @rule(how=st.sampled_from(["delete", "corrupt"]))
    def a_hand_breaks_the_access_secret(self, how: str) -> None:
        # The pods keep the files they mounted: the kubelet never empties a Secret volume.
        self.w.auth = None if how == "delete" else {**(self.w.auth or {}), acc.STATE_KEY: '{"version": 1, "revision": "x"}'}

    @rule(how=st.sampled_from(["delete", "corrupt"]))
    def a_hand_breaks_the_nodes_copy(self, how: str) -> None:
        self.w.node_copy = None if how == "delete" else "{}"

    @rule()
    def a_hand_breaks_both(self) -> None:
        self.w.auth, self.w.node_copy = None, None

    @rule()
    def the_policy_flips(self) -> None:
        self.w.policy_open = not self.w.policy_open

    @invariant()
    def no_node_is_ever_refused(self) -> None:
        for node in self.w.nodes:
            if node.holds is None:
                continue  # no route to the mirror yet
            for loaded in self.w.fronts:
                accepted, enforced, _ = front_view(loaded)
                assert not enforced or node.holds in accepted, "a node's pull would get 401"

    @precondition(lambda self: self.rolled_out() and self.w.auth is not None and not self.w.policy_open)
    @invariant()
    def once_rolled_out_and_reconciled_nothing_else_is_accepted(self) -> None:
        assert self.w.auth is not None
        try:
            state = acc.parse_state(self.w.auth.get(acc.STATE_KEY))
        except acc.CredentialError:
            return  # a hand just broke it; the next reconcile restores it
        accepted, enforced, _ = front_view(self.w.auth[acc.ACCESS_VCL_KEY])
        if state.retired is None and enforced:
            assert accepted == {state.current.authorization, state.next.authorization}


AccessWorld.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
test_rotation_and_hostile_hands_never_fail_a_pull = AccessWorld.TestCase


def test_a_full_rotation_retires_the_old_credential_only_once_every_node_has_the_new_one() -> None:
    token = counter_token()
    s = spec(**PRIVATE, access={"rotateEvery": "24h"})
    d = acc.decide_access(acc.AccessInputs("m", s, now=0.0), token)
    published = acc.Published(d.plan_revision, True)

    def step(now: float, published: acc.Published, **kw: Any) -> acc.AccessDecision:
        return acc.decide_access(
            acc.AccessInputs("m", s, now=now, stored_state=d.auth_data[acc.STATE_KEY], published=published, **kw), token
        )

    old = d.state.current
    d = step(86400.0 + 1, published, fronts_loaded=d.state.generation)
    assert d.state.revision == 2 and d.state.current.username == "regmirror-node-r2"
    assert d.state.retired == old and [e[0] for e in d.events] == ["CredentialsRotated"]
    accepted = front_view(d.auth_data[acc.ACCESS_VCL_KEY])[0]
    assert old.authorization in accepted, "nodes still on revision 1 keep pulling"
    d = step(86402.0, acc.Published(2, False))
    assert d.state.retired == old, "not every node has revision 2 yet"
    d = step(86403.0, acc.Published(2, True))
    assert d.state.retired is None
    assert old.authorization not in front_view(d.auth_data[acc.ACCESS_VCL_KEY])[0]
    assert d.status(False)["rotating"] is False


# Sequences the search found (each once failed a pull), replayed on every run.
FOUND = {
    "regenerated credential handed over before the fronts loaded it": [
        ("a_hand_breaks_both", {}),
        ("reconcile", {}),
        ("node_applies_the_plan", {"i": 0}),
    ],
    "a copy restored mid-handover handed the unloaded credential over": [
        ("a_hand_breaks_the_access_secret", {"how": "delete"}),
        ("a_hand_breaks_the_nodes_copy", {"how": "delete"}),
        ("reconcile", {}),
        ("a_hand_breaks_the_access_secret", {"how": "delete"}),
        ("reconcile", {}),
        ("node_applies_the_plan", {"i": 0}),
    ],
    "a restored state reused the generation the fronts had loaded for another set": [
        ("someone_asks_for_a_rotation", {}),
        ("reconcile", {}),
        ("a_hand_breaks_the_access_secret", {"how": "delete"}),
        ("node_applies_the_plan", {"i": 0}),
        ("node_applies_the_plan", {"i": 1}),
        ("node_applies_the_plan", {"i": 2}),
        ("reconcile", {}),
        ("someone_asks_for_a_rotation", {}),
        ("reconcile", {}),
        ("node_applies_the_plan", {"i": 0}),
    ],
}


@pytest.mark.parametrize("steps", list(FOUND.values()), ids=list(FOUND))
def test_found_sequences_keep_every_pull_working(steps: list[tuple[str, dict[str, Any]]]) -> None:
    world = AccessWorld()
    world.create()
    for name, kwargs in steps:
        getattr(world, name)(**kwargs)
        world.no_node_is_ever_refused()
