"""Fail-open and the startup taint in the agent: EndpointSlice counts, the wake-ups of the loop, lifting the taint."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from regmirror import nodetaint
from regmirror.agent.endpoints import EndpointCounts, EndpointWatcher, ready_endpoints
from regmirror.agent.loop import Agent, AgentConfig
from regmirror.agent.nodeapi import ApiError, NodeInfo
from regmirror.agent.probe import HealthTracker, Target
from regmirror.models import Capability, FallbackPolicy, Runtime
from regmirror.nodeplan import MirrorEntry, build_node_plan

GOOD_CONFIG = 'version = 3\n[plugins."io.containerd.cri.v1.images".registry]\n  config_path = "/etc/containerd/certs.d"\n'
TAINT = {"key": nodetaint.TAINT_KEY, "effect": "NoSchedule"}
OTHER_TAINT = {"key": "example.com/gpu", "value": "true", "effect": "NoSchedule"}


def endpoint_slice(name: str, service: str | None, *ready: bool | None) -> dict[str, Any]:
    labels = {"kubernetes.io/service-name": service} if service else {}
    endpoints = [{"addresses": [f"10.0.0.{i}"], "conditions": {} if r is None else {"ready": r}} for i, r in enumerate(ready)]
    ports = [{"name": "metrics", "port": 5001}, {"name": "registry", "port": 5000}]
    return {"metadata": {"name": name, "labels": labels, "resourceVersion": "1"}, "endpoints": endpoints, "ports": ports}


def test_ready_endpoints_counts_what_kube_proxy_routes_to() -> None:
    # nil means ready; the registry port's number is the pod's
    assert ready_endpoints(endpoint_slice("a", "svc", True, None, False)) == ("svc", 2, ("10.0.0.0:5000", "10.0.0.1:5000"))
    assert ready_endpoints(endpoint_slice("a", None, True)) is None
    assert ready_endpoints({"metadata": {"labels": {"kubernetes.io/service-name": "svc"}}, "endpoints": None}) == ("svc", 0, ())
    assert ready_endpoints("garbage") is None
    no_address = {"metadata": {"labels": {"kubernetes.io/service-name": "svc"}}, "endpoints": [{"conditions": {"ready": True}}]}
    assert ready_endpoints(no_address) == ("svc", 0, ())
    v6 = {**endpoint_slice("b", "svc"), "endpoints": [{"addresses": ["fd00::5"]}, {"addresses": ["not-an-ip"]}]}
    assert ready_endpoints(v6) == ("svc", 2, ("[fd00::5]:5000",))


def test_counts_follow_the_watch_and_sum_a_services_slices() -> None:
    counts = EndpointCounts()
    counts.replace([endpoint_slice("hub-a", "hub", True), endpoint_slice("hub-b", "hub", True, False)])
    assert counts.counts() == {"hub": 2}
    assert counts.addresses() == {"hub": ("10.0.0.0:5000",)}, "the two slices list the same address (10.0.0.0), once"
    assert counts.apply("MODIFIED", endpoint_slice("hub-a", "hub", False)) is True
    assert counts.counts() == {"hub": 1}
    assert counts.apply("MODIFIED", endpoint_slice("hub-a", "hub", False)) is False, "no change, no wake-up"
    assert counts.apply("DELETED", endpoint_slice("hub-b", "hub")) is True
    assert counts.counts() == {"hub": 0}


@given(
    st.lists(
        st.tuples(st.sampled_from(["ADDED", "MODIFIED", "DELETED", "BOOKMARK"]), st.integers(0, 3), st.lists(st.booleans(), max_size=3))
    )
)
def test_counts_equal_a_fresh_list_of_what_the_events_left(events: list[tuple[str, int, list[bool]]]) -> None:
    """Replaying any event sequence gives the same counts as listing the slices it leaves behind."""
    counts = EndpointCounts()
    counts.replace([])
    live: dict[str, dict[str, Any]] = {}
    for kind, index, ready in events:
        obj = endpoint_slice(f"s{index}", f"svc{index % 2}", *ready)
        counts.apply(kind, obj)
        if kind == "DELETED":
            live.pop(f"s{index}", None)
        elif kind in ("ADDED", "MODIFIED"):
            live[f"s{index}"] = obj
    fresh = EndpointCounts()
    fresh.replace(list(live.values()))
    assert counts.counts() == fresh.counts()


class FakeWatchApi:
    """Lists once, then replays watch events from a queue; a None event ends the stream with an error."""

    def __init__(self, items: list[dict[str, Any]]) -> None:
        self.items = items
        self.events: list[dict[str, Any] | None] = []
        self.more = threading.Event()
        self.lists = 0

    def list_endpointslices(self, namespace: str) -> tuple[list[dict[str, Any]], str]:
        self.lists += 1
        return list(self.items), "1"

    def watch_endpointslices(self, namespace: str, resource_version: str) -> Iterator[dict[str, Any]]:
        while True:
            self.more.wait(5)
            self.more.clear()
            while self.events:
                event = self.events.pop(0)
                if event is None:
                    raise ApiError("connection reset")
                yield event


def test_the_watcher_wakes_the_agent_and_forgets_what_it_cannot_know() -> None:
    api = FakeWatchApi([endpoint_slice("hub-a", "regmirror-hub", True)])
    changed = threading.Event()
    watcher = EndpointWatcher(api, "regmirror-system", changed.set, lambda *a, **k: None).start()
    try:
        assert changed.wait(5)
        assert watcher.ready("regmirror-hub") == 1
        assert watcher.ready("regmirror-other") == 0
        changed.clear()
        api.events.append({"type": "MODIFIED", "object": endpoint_slice("hub-a", "regmirror-hub", False)})
        api.more.set()
        assert changed.wait(5)
        assert watcher.ready("regmirror-hub") == 0
        changed.clear()
        api.events.append(None)  # the watch breaks: unknown until listed again, then known again
        api.items = [endpoint_slice("hub-a", "regmirror-hub", True)]
        api.more.set()
        assert changed.wait(5)
        assert watcher.ready("regmirror-hub") is None, "while the watch is broken the probes decide alone"
        changed.clear()
        assert changed.wait(5), "listed again after the backoff"
        assert watcher.ready("regmirror-hub") == 1 and api.lists == 2
    finally:
        watcher.stop()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# ------------------------------------------------------------------ the startup taint


class FakeNodeApi:
    """The agent's API as far as the taint goes: a Node with taints, Events, and a patch that may be refused."""

    def __init__(self, taints: list[dict[str, Any]], refuse: bool = False) -> None:
        self.taints = list(taints)
        self.refuse = refuse
        self.patches: list[list[dict[str, Any]]] = []
        self.events: list[str] = []

    def node(self) -> NodeInfo:
        return NodeInfo("n1", "u1", {"kubernetes.io/hostname": "n1"}, "containerd://2.1.5", tuple(dict(t) for t in self.taints))

    def get_node(self, name: str) -> NodeInfo:
        return self.node()

    def post_event(self, node: NodeInfo, reason: str, message: str, *, warning: bool, mirror: str | None = None) -> None:
        self.events.append(reason)

    def remove_startup_taint(self, node: NodeInfo) -> None:
        patch = nodetaint.removal_patch(node.taints)
        self.patches.append(patch)
        if self.refuse:
            raise ApiError("PATCH /api/v1/nodes/n1: HTTP 403: forbidden")
        assert patch[0]["value"] == self.taints, "the test op carries the taints as read"
        self.taints = patch[1]["value"]


def entry(name: str, url: str) -> MirrorEntry:
    return MirrorEntry(
        name=name,
        hosts=["docker.io"],
        servers={"docker.io": "https://registry-1.docker.io"},
        url=url,
        priority=100,
        capabilities=[Capability.PULL, Capability.RESOLVE],
        fallback=FallbackPolicy.ALLOW_UPSTREAM,
        runtimes=[Runtime.CONTAINERD],
    )


def agent_with(tmp_path: Path, api: FakeNodeApi, answers: dict[str, str | None], config_toml: str = GOOD_CONFIG) -> Agent:
    plan = tmp_path / "mirrors.json"
    plan.write_text(build_node_plan([entry(name, f"http://10.96.0.{i + 10}:5000") for i, name in enumerate(answers)]).to_json())
    root = tmp_path / "host"
    (root / "etc/containerd").mkdir(parents=True, exist_ok=True)
    (root / "etc/containerd/config.toml").write_text(config_toml)
    urls = {f"http://10.96.0.{i + 10}:5000": name for i, name in enumerate(answers)}
    tracker = HealthTracker(probe=lambda url, timeout, ca: answers[urls[url]], jitter=0)
    config = AgentConfig(plan_path=plan, host_root=root, node_name="n1", health_port=0)
    return Agent(config, api=api, tracker=tracker)  # type: ignore[arg-type]


def test_the_taint_is_lifted_once_the_files_are_applied_and_the_mirrors_answer(tmp_path: Path) -> None:
    api = FakeNodeApi([OTHER_TAINT, TAINT])
    answers: dict[str, str | None] = {"hub": "TimeoutError"}
    agent = agent_with(tmp_path, api, answers)
    assert agent.step().ready, "a withdrawn mirror does not make the node unready"
    assert api.patches == [], "but the taint stays while a selected mirror does not answer"
    assert agent.readiness.get_report()["startupTaint"].startswith("mirror(s) not answering yet: hub")
    answers["hub"] = None
    agent.tracker._state["hub"].next_probe = 0  # due now
    assert agent.step().ready
    assert api.taints == [OTHER_TAINT], "only our taint is removed, the others are kept in order"
    assert api.events.count(nodetaint.LIFTED_REASON) == 1
    agent.step()
    assert len(api.patches) == 1, "once removed, never patched again"


def test_the_taint_stays_while_the_runtime_would_not_read_the_files(tmp_path: Path) -> None:
    api = FakeNodeApi([TAINT])
    agent = agent_with(tmp_path, api, {"hub": None}, config_toml="version = 3\n")  # 2.1.5 with the default list
    outcome = agent.step()
    assert not outcome.ready and outcome.reason == "PreflightFailed"
    assert api.patches == [] and api.taints == [TAINT]


def test_a_node_no_mirror_selects_is_released_at_once(tmp_path: Path) -> None:
    api = FakeNodeApi([TAINT])
    agent = agent_with(tmp_path, api, {})
    assert agent.step().ready
    assert api.taints == []


def test_a_refused_removal_is_logged_and_retried_with_a_fresh_node(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    api = FakeNodeApi([TAINT], refuse=True)
    agent = agent_with(tmp_path, api, {"hub": None})
    agent.step()
    assert api.taints == [TAINT]
    assert any(json.loads(line)["event"] == "taint.failed" for line in capsys.readouterr().out.splitlines())
    api.refuse = False
    agent.step()
    assert api.taints == [] and len(api.patches) == 2


# ------------------------------------------------------------------ the operator's timeout


def node(name: str, created: str, taints: list[dict[str, Any]]) -> dict[str, Any]:
    return {"metadata": {"name": name, "creationTimestamp": created}, "spec": {"taints": taints}}


def test_the_timeout_counts_from_creation_or_first_sight_whichever_is_later() -> None:
    created = "2026-01-01T00:00:00Z"
    t0 = 1767225600.0  # that moment
    nodes = [node("a", created, [TAINT]), node("b", created, [OTHER_TAINT]), node("c", created, [TAINT])]
    overdue, wake = nodetaint.expired(nodes, {"c": t0 + 200}, now=t0 + 299, timeout=300)
    assert (overdue, wake) == ([], t0 + 300)
    overdue, wake = nodetaint.expired(nodes, {"c": t0 + 200}, now=t0 + 300, timeout=300)
    assert (overdue, wake) == (["a"], t0 + 500), "b has no startup taint; c's clock started when it was first seen"
    assert nodetaint.expired(nodes, {}, now=t0 + 10_000, timeout=300)[0] == ["a", "c"]


def test_the_removal_patch_tests_the_taints_it_read() -> None:
    patch = nodetaint.removal_patch([OTHER_TAINT, TAINT, TAINT])
    assert patch == [
        {"op": "test", "path": "/spec/taints", "value": [OTHER_TAINT, TAINT, TAINT]},
        {"op": "replace", "path": "/spec/taints", "value": [OTHER_TAINT]},
    ]
    assert nodetaint.agent_may_lift(ready=True, selected=["a", "b"], unhealthy={"b", "z"}) == (False, "mirror(s) not answering yet: b")


def test_without_dial_timeout_one_dark_endpoint_withdraws_the_mirror_and_its_leaving_restores_it() -> None:
    """containerd 1.x: a pod whose node died still gets connections (30 s each); the agent probes each endpoint."""
    dead = {"http://10.0.0.2:5000"}
    calls: list[str] = []

    def probe(url: str, timeout: float, ca: str | None) -> str | None:
        calls.append(url)
        return "TimeoutError: timed out" if url in dead else None

    clock = Clock()
    tracker = HealthTracker(probe=probe, clock=clock, jitter=0)
    both = ("http://10.0.0.1:5000", "http://10.0.0.2:5000")
    assert tracker.update({"hub": Target("http://10.96.0.10:5000", None, 2, both)}) != []
    assert tracker.unhealthy() == frozenset({"hub"}) and calls == ["http://10.96.0.10:5000", *both]
    (transition,) = [t for t in tracker.update({"hub": Target("http://10.96.0.10:5000", None, 1, both[:1])})]
    assert transition.healthy, "the dead endpoint left the Service: probed at once, restored"
