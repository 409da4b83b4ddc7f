"""Mirror health: a dead mirror is withdrawn after two failed probes and restored after one answer."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from regmirror import constants as c
from regmirror.agent.loop import Agent, AgentConfig
from regmirror.agent.probe import HealthTracker, Target, http_probe
from regmirror.models import Capability, FallbackPolicy, Runtime
from regmirror.nodeplan import MirrorEntry, build_node_plan


class Registry401(BaseHTTPRequestHandler):
    """Answers /v2/ like a registry that wants a token."""

    def do_GET(self) -> None:
        self.send_response(401 if self.path == "/v2/" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        return


@contextlib.contextmanager
def registry_on(port: int) -> Iterator[None]:
    server = ThreadingHTTPServer(("127.0.0.1", port), Registry401)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_any_http_answer_is_healthy_and_a_refused_connection_is_not() -> None:
    port = free_port()
    with registry_on(port):
        assert http_probe(f"http://127.0.0.1:{port}", 1.0) is None  # 401 counts as alive
    error = http_probe(f"http://127.0.0.1:{port}", 1.0)
    assert error is not None and "ConnectionRefused" in error


def test_a_silent_mirror_times_out_quickly() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)  # accepts the connection, never answers
        started = time.monotonic()
        error = http_probe(f"http://127.0.0.1:{listener.getsockname()[1]}", 0.3)
    assert error is not None and time.monotonic() - started < 2


def test_withdraw_after_two_failures_restore_after_one_success_with_a_real_server() -> None:
    port = free_port()
    clock = Clock()
    tracker = HealthTracker(clock=clock, timeout=0.5, interval=2.0, jitter=0)
    targets = {"hub": Target(f"http://127.0.0.1:{port}")}
    with registry_on(port):
        assert tracker.update(targets) == []
        assert tracker.unhealthy() == frozenset()
    clock.now += 2
    assert tracker.update(targets) == [], "one failure is not enough"
    assert tracker.unhealthy() == frozenset()
    assert tracker.next_due() == clock.now + 0.25, "a failure is confirmed soon, not a whole interval later"
    clock.now += 0.2
    assert tracker.update(targets) == [], "not due yet: no probe"
    clock.now += 0.05
    (withdrawn,) = tracker.update(targets)
    assert not withdrawn.healthy and withdrawn.name == "hub" and withdrawn.error
    assert tracker.unhealthy() == frozenset({"hub"})
    assert tracker.next_due() == clock.now + 2, "a withdrawn mirror is probed at the interval"
    with registry_on(port):
        clock.now += 2
        (restored,) = tracker.update(targets)
    assert restored.healthy and tracker.unhealthy() == frozenset()


def test_one_failure_then_an_answer_keeps_the_mirror() -> None:
    answers = iter(["TimeoutError", None, None])
    tracker = HealthTracker(probe=lambda url, timeout, ca: next(answers), clock=(clock := Clock()), jitter=0)
    tracker.update({"hub": Target("u")})  # first probe: a timeout, first seen -> withdrawn at once
    assert tracker.unhealthy() == frozenset({"hub"})
    clock.now += 2
    (restored,) = tracker.update({"hub": Target("u")})
    assert restored.healthy
    clock.now += 2
    assert tracker.update({"hub": Target("u")}) == []


def test_intervals_are_jittered_so_nodes_do_not_probe_in_lockstep() -> None:
    import random

    clock = Clock()
    dues = set()
    for seed in range(20):
        tracker = HealthTracker(probe=lambda url, timeout, ca: None, clock=clock, interval=2.0, rng=random.Random(seed))
        tracker.update({"hub": Target("u")})
        due = tracker.next_due()
        assert due is not None and 1.5 <= due - clock.now <= 2.5
        dues.add(round(due, 6))
    assert len(dues) > 10


def test_endpoints_withdraw_at_once_without_a_probe_and_their_return_probes_at_once() -> None:
    calls: list[str] = []
    healthy = {"value": True}

    def probe(url: str, timeout: float, ca: str | None) -> str | None:
        calls.append(url)
        return None if healthy["value"] else "TimeoutError"

    clock = Clock()
    tracker = HealthTracker(probe=probe, clock=clock, jitter=0)
    assert tracker.update({"hub": Target("u", ready_endpoints=1)}) == []
    assert len(calls) == 1
    clock.now += 0.1  # the pod is deleted: its EndpointSlice says so long before the next probe
    (withdrawn,) = tracker.update({"hub": Target("u", ready_endpoints=0)})
    assert not withdrawn.healthy and withdrawn.error == "no ready endpoint in the mirror's EndpointSlices"
    assert len(calls) == 1, "no probe needed"
    clock.now += 0.1
    assert tracker.update({"hub": Target("u", ready_endpoints=0)}) == []
    clock.now += 0.1  # a new pod is ready: probed now, not at the next interval
    (restored,) = tracker.update({"hub": Target("u", ready_endpoints=1)})
    assert restored.healthy and len(calls) == 2
    clock.now += 0.1  # a second replica joins: look again at once
    healthy["value"] = False
    assert tracker.update({"hub": Target("u", ready_endpoints=2)}) == []
    assert len(calls) == 3 and tracker.next_due() == clock.now + 0.25


def test_a_mirror_first_seen_dead_is_withdrawn_at_once_and_forgotten_when_gone() -> None:
    results = {"a": "ConnectionRefusedError", "b": None}
    tracker = HealthTracker(probe=lambda url, timeout, ca: results[url], clock=Clock())
    transitions = tracker.update({"a": Target("a"), "b": Target("b")})
    assert [(t.name, t.healthy) for t in transitions] == [("a", False)]
    assert tracker.unhealthy() == frozenset({"a"})
    tracker.update({"b": Target("b")})
    assert tracker.unhealthy() == frozenset() and tracker.state("a") is None


def entry(name: str, port: int, fallback: FallbackPolicy = FallbackPolicy.ALLOW_UPSTREAM) -> MirrorEntry:
    return MirrorEntry(
        name=name,
        hosts=["docker.io"],
        servers={"docker.io": c.DOCKER_HUB_SERVER},
        url=f"http://127.0.0.1:{port}",
        priority=100,
        capabilities=[Capability.PULL, Capability.RESOLVE],
        fallback=fallback,
        runtimes=[Runtime.CONTAINERD],
    )


def make_agent(tmp_path: Path, *entries: MirrorEntry) -> tuple[Agent, Clock, Path]:
    plan = tmp_path / "mirrors.json"
    plan.write_text(build_node_plan(list(entries)).to_json())
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"kubernetes.io/hostname": "n1"}))
    root = tmp_path / "host"
    cfg = root / "etc" / "containerd" / "config.toml"
    cfg.parent.mkdir(parents=True)
    cfg.write_text('version = 3\n[plugins."io.containerd.cri.v1.images".registry]\n  config_path = "/etc/containerd/certs.d"\n')
    clock = Clock()
    config = AgentConfig(plan_path=plan, host_root=root, node_labels_file=labels, health_port=0, probe_timeout=0.5)
    agent = Agent(config, tracker=HealthTracker(clock=clock, timeout=0.5, interval=2.0, jitter=0), clock=clock)
    return agent, clock, root / "etc" / "containerd" / "certs.d" / "docker.io" / "hosts.toml"


def test_the_agent_withdraws_a_dead_mirror_from_the_node_files_and_restores_it(tmp_path: Path) -> None:
    port = free_port()
    agent, clock, hosts_toml = make_agent(tmp_path, entry("hub", port))
    with registry_on(port):
        assert agent.step().ready
        assert f"127.0.0.1:{port}" in hosts_toml.read_text()
    clock.now += 2
    agent.step()
    assert hosts_toml.exists(), "one failed probe keeps the mirror"
    clock.now += 2
    outcome = agent.step()
    assert outcome.ready, "a withdrawn mirror is the plan applied as it should be"
    assert not hosts_toml.exists(), "two failed probes withdraw it: containerd goes straight upstream"
    with registry_on(port):
        clock.now += 2
        agent.step()
        assert f"127.0.0.1:{port}" in hosts_toml.read_text()


def test_a_strict_mirror_stays_in_the_files_when_it_is_down(tmp_path: Path) -> None:
    port = free_port()
    agent, clock, hosts_toml = make_agent(tmp_path, entry("vault", port, FallbackPolicy.NEVER_CONTACT_UPSTREAM))
    for _ in range(3):
        agent.step()
        clock.now += 2
    assert agent.tracker.unhealthy() == frozenset({"vault"})
    assert f'server = "http://127.0.0.1:{port}"' in hosts_toml.read_text()
