"""Docker Engine nodes and the cluster-wide settings: daemon.json merged without losing a key, CRI-O search order, blocked registries."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

from hypothesis import example, given
from hypothesis import strategies as st

from regmirror.agent import docker
from regmirror.agent.plan import parse_plan
from regmirror.models import Capability, FallbackPolicy, NodeSettings, Runtime
from regmirror.nodeplan import MirrorEntry, build_node_plan
from regmirror.render.nodefiles import docker_daemon_entries, plan_node_files
from regmirror.render.nodeinput import check_plan

KEYS = docker.KEYS
values = st.sampled_from(["http://10.96.0.1:5000", "http://10.96.0.2:5000", "https://mirror.corp", "10.96.0.1:5000", "admin.corp:5000"])


def entry(
    name: str, url: str, *, hosts: list[str] | None = None, runtimes: list[Runtime] | None = None, strict: bool = False
) -> MirrorEntry:
    hosts = hosts or ["docker.io"]
    return MirrorEntry(
        name=name,
        hosts=hosts,
        servers={h: "https://registry-1.docker.io" if h == "docker.io" else f"https://{h}" for h in hosts},
        url=url,
        priority=100,
        capabilities=[Capability.PULL, Capability.RESOLVE],
        fallback=FallbackPolicy.NEVER_CONTACT_UPSTREAM if strict else FallbackPolicy.ALLOW_UPSTREAM,
        runtimes=runtimes or [Runtime.DOCKER],
    )


# ------------------------------------------------------------------ the merge


@given(
    admin=st.dictionaries(st.sampled_from(KEYS), st.lists(values, unique=True, max_size=3)),
    first=st.dictionaries(st.sampled_from(KEYS), st.lists(values, unique=True, max_size=3)),
    second=st.dictionaries(st.sampled_from(KEYS), st.lists(values, unique=True, max_size=3)),
)
@example(admin={"registry-mirrors": ["http://10.96.0.1:5000"]}, first={"registry-mirrors": ["http://10.96.0.1:5000"]}, second={})
@example(admin={"registry-mirrors": []}, first={}, second={"registry-mirrors": ["http://10.96.0.1:5000"]})  # the admin's empty key stays
def test_the_admins_entries_and_keys_survive_any_sequence_of_plans(
    admin: dict[str, list[str]], first: dict[str, list[str]], second: dict[str, list[str]]
) -> None:
    """Apply plan 1 then plan 2 then nothing: the admin's entries stay in order, ours are exactly the plan's, then gone."""
    current = {"log-level": "warn", "features": {"buildkit": True}, **admin}
    one = docker.merge_daemon_json(current, {}, first)
    two = docker.merge_daemon_json(one.config, one.owned, second, (), one.created)
    gone = docker.merge_daemon_json(two.config, two.owned, {}, (), two.created)
    for merged, plan in ((one, first), (two, second), (gone, {})):
        assert merged.config["log-level"] == "warn" and merged.config["features"] == {"buildkit": True}
        for key in KEYS:
            listed = merged.config.get(key, [])
            assert [v for v in listed if v in admin.get(key, [])] == admin.get(key, []), "the admin's entries, in their order"
            assert set(listed) == set(admin.get(key, [])) | set(plan.get(key, [])), "nothing else, nothing missing"
            assert not set(merged.owned.get(key, [])) & set(admin.get(key, [])), "an entry the admin had is never claimed"
    added = {k: [] for k in KEYS if k not in current and (first.get(k) or second.get(k))}
    assert gone.config == {**current, **added}, "withdrawing everything gives the admin's file back (keys we added stay empty)"
    again = docker.merge_daemon_json(two.config, two.owned, second, (), two.created)
    assert again == two, "idempotent"


def test_ours_come_first_and_keys_dockerd_gets_as_flags_stay_out() -> None:
    merged = docker.merge_daemon_json({"registry-mirrors": ["https://admin.corp"]}, {}, {"registry-mirrors": ["http://10.96.0.1:5000"]})
    assert merged.config["registry-mirrors"] == ["http://10.96.0.1:5000", "https://admin.corp"]
    flags = ["/usr/bin/dockerd", "--registry-mirror=https://flag.corp", "-H", "fd://"]
    blocked = docker.merge_daemon_json(
        {}, {}, {"registry-mirrors": ["http://10.96.0.1:5000"], "insecure-registries": ["10.96.0.1:5000"]}, flags
    )
    assert "registry-mirrors" not in blocked.config and "dockerd runs with --registry-mirror" in blocked.skipped["registry-mirrors"]
    assert blocked.config["insecure-registries"] == ["10.96.0.1:5000"]
    odd = docker.merge_daemon_json({"registry-mirrors": "not a list"}, {}, {"registry-mirrors": ["http://10.96.0.1:5000"]})
    assert odd.config["registry-mirrors"] == "not a list" and "registry-mirrors" in odd.skipped


def test_the_plan_gives_docker_only_allow_upstream_docker_hub_mirrors_that_answer() -> None:
    plan = build_node_plan(
        [
            entry("hub", "http://10.96.0.1:5000"),
            entry("tls", "https://10.96.0.2:5443"),
            entry("quay", "http://10.96.0.3:5000", hosts=["quay.io"]),
            entry("vault", "http://10.96.0.4:5000", strict=True),
            entry("other", "http://10.96.0.5:5000", runtimes=[Runtime.CONTAINERD]),
            entry("down", "http://10.96.0.6:5000"),
        ]
    )
    desired, findings = docker_daemon_entries(check_plan(parse_plan(plan.to_json())), {}, frozenset({"down"}))
    assert desired == {"registry-mirrors": ["http://10.96.0.1:5000", "https://10.96.0.2:5443"], "insecure-registries": ["10.96.0.1:5000"]}
    assert sorted((f.reason, f.mirror) for f in findings) == [("DockerCannotBeStrict", "vault"), ("DockerHubOnly", "quay")]


def fake_dockerd(tmp_path: Path) -> subprocess.Popen[bytes]:
    """A process whose command line says dockerd and that records every SIGHUP it gets."""
    script = (
        "import signal, sys, time\n"
        f"log = open({str(tmp_path / 'hups')!r}, 'a', buffering=1)\n"
        "signal.signal(signal.SIGHUP, lambda *a: log.write('hup\\n'))\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen(["dockerd", "-c", script], executable=sys.executable, stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
    return proc


def test_apply_writes_atomically_keeps_the_mode_and_reloads_dockerd_once(tmp_path: Path) -> None:
    root = tmp_path / "host"
    daemon_json = root / "etc/docker/daemon.json"
    daemon_json.parent.mkdir(parents=True)
    daemon_json.write_text(json.dumps({"storage-driver": "overlay2", "insecure-registries": ["admin.corp:5000"]}))
    daemon_json.chmod(0o600)
    proc = fake_dockerd(tmp_path)
    try:
        (root / "var/run").mkdir(parents=True)
        (root / "var/run/docker.pid").write_text(f"{proc.pid}\n")
        desired = {"registry-mirrors": ["http://10.96.0.1:5000"], "insecure-registries": ["10.96.0.1:5000"]}
        result = docker.apply_docker(root, desired)
        assert result.present and result.changed and result.reloaded and not result.reload_pending
        written = json.loads(daemon_json.read_text())
        assert written == {
            "storage-driver": "overlay2",
            "insecure-registries": ["10.96.0.1:5000", "admin.corp:5000"],
            "registry-mirrors": ["http://10.96.0.1:5000"],
        }
        assert daemon_json.stat().st_mode & 0o777 == 0o600
        again = docker.apply_docker(root, desired)
        assert not again.changed and not again.reloaded, "nothing changed: no reload"
        gone = docker.apply_docker(root, {})
        assert gone.changed and gone.reloaded
        assert json.loads(daemon_json.read_text()) == {
            "storage-driver": "overlay2",
            "insecure-registries": ["admin.corp:5000"],
            "registry-mirrors": [],
        }
        deadline = time.monotonic() + 5
        while (tmp_path / "hups").read_text().count("hup") < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert (tmp_path / "hups").read_text().count("hup") == 2
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(5)


def test_without_a_dockerd_to_signal_the_reload_is_reported_and_retried(tmp_path: Path) -> None:
    root = tmp_path / "host"
    (root / "etc/docker").mkdir(parents=True)
    (root / "etc/docker/daemon.json").write_text("{}")
    empty_proc = tmp_path / "proc"
    empty_proc.mkdir()
    result = docker.apply_docker(root, {"registry-mirrors": ["http://10.96.0.1:5000"]}, proc=empty_proc)
    assert result.changed and result.reload_pending
    assert [f.reason for f in result.findings] == ["DockerReloadRequired"]
    still = docker.apply_docker(root, {"registry-mirrors": ["http://10.96.0.1:5000"]}, proc=empty_proc)
    assert not still.changed and still.reload_pending, "remembered across steps (and restarts): the state file says so"
    broken = root / "etc/docker/daemon.json"
    broken.write_text("{not json")
    unreadable = docker.apply_docker(root, {"registry-mirrors": ["http://10.96.0.1:5000"]}, proc=empty_proc)
    assert [f.reason for f in unreadable.findings] == ["DaemonJsonUnreadable"] and broken.read_text() == "{not json"


def test_a_node_without_docker_gets_no_daemon_json(tmp_path: Path) -> None:
    empty_proc = tmp_path / "proc"
    empty_proc.mkdir()
    result = docker.apply_docker(tmp_path, {"registry-mirrors": ["http://10.96.0.1:5000"]}, proc=empty_proc)
    assert not result.present and not (tmp_path / "etc/docker").exists()
    on_cri_dockerd = docker.apply_docker(
        tmp_path, {"registry-mirrors": ["http://10.96.0.1:5000"]}, proc=empty_proc, runtime_version="docker://27.5.1"
    )
    assert on_cri_dockerd.present and (tmp_path / "etc/docker/daemon.json").exists()


# ------------------------------------------------------------------ cluster-wide settings


def test_crio_gets_the_search_order_and_blocked_registries_and_containerd_blocks_them_too() -> None:
    settings = NodeSettings(unqualified_search_registries=["quay.io", "docker.io"], blocked_registries=["evil.example:5000", "ghcr.io"])
    plan = build_node_plan(
        [
            entry("hub", "http://10.96.0.1:5000", runtimes=[Runtime.CRIO, Runtime.CONTAINERD]),
            entry("gh", "http://10.96.0.2:5000", hosts=["ghcr.io"], runtimes=[Runtime.CRIO, Runtime.CONTAINERD]),
        ],
        settings,
    )
    for reader in (plan, parse_plan(plan.to_json())):
        node = plan_node_files(reader, {})
        dropin = tomllib.loads(node.files["/etc/containers/registries.conf.d/50-regmirror.conf"])
        assert dropin["unqualified-search-registries"] == ["quay.io", "docker.io"]
        by_prefix = {r["prefix"]: r for r in dropin["registry"]}
        assert by_prefix["evil.example:5000"]["blocked"] is True and by_prefix["ghcr.io"]["blocked"] is True
        assert "mirror" not in by_prefix["ghcr.io"], "a blocked registry's mirrors are not used"
        assert by_prefix["docker.io"]["mirror"][0]["location"] == "10.96.0.1:5000"
        blocked = tomllib.loads(node.files["/etc/containerd/certs.d/evil.example_5000_/hosts.toml"])
        assert all(set(t.get("capabilities", [])) <= {"push"} for t in [blocked, *blocked["host"].values()]), "nothing may pull or resolve"
        assert [f.reason for f in node.findings] == ["MirrorOfBlockedRegistry"]
    # A containerd-only node that no CRI-O mirror selects gets no drop-in; a CRI-O node gets the settings alone.
    containerd_only = build_node_plan([entry("hub", "http://10.96.0.1:5000", runtimes=[Runtime.CONTAINERD])], settings)
    assert not any("registries.conf.d" in p for p in plan_node_files(containerd_only, {}).files)
    crio = plan_node_files(containerd_only, {}, crio_node=True).files["/etc/containers/registries.conf.d/50-regmirror.conf"]
    assert tomllib.loads(crio)["unqualified-search-registries"] == ["quay.io", "docker.io"]
    # Without settings the plan's JSON (and digest) is what it was before settings existed.
    assert "settings" not in build_node_plan([entry("hub", "http://10.96.0.1:5000")]).to_json()


def test_a_bad_setting_is_left_out_and_reported() -> None:
    raw = json.loads(build_node_plan([]).to_json())
    raw["settings"] = {"unqualifiedSearchRegistries": ["quay.io", "not a host!"], "blockedRegistries": "ghcr.io"}
    checked = check_plan(parse_plan(json.dumps(raw)))
    assert checked.search_registries == ("quay.io",)
    assert checked.blocked == ()
    assert sorted(f.reason for f in checked.findings) == ["MirrorRejected", "SettingRejected"]
