"""The node agent evicted or killed: the node's files stay, and a restarted agent resumes without rewriting them.

The agent runs as in its DaemonSet (`regmirror agent`, a loop) against a
temporary host root, with mirrors that answer on loopback (and one that
refuses, which the agent withdraws). Killing it (SIGTERM as kubelet's
eviction sends, or SIGKILL as the OOM killer or a forced eviction does) must
tear nothing down: containerd keeps pulling through the files already there.
A new agent must find the files as it would write them and leave them alone
(same inode, same mtime): a restart costs the node no rewrite and no flap.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from threading import Thread
from typing import Any

import pytest
from _dataplane import AgentNode, free_port, wait_for

from regmirror.models import RegistryMirrorSpec
from regmirror.nodeplan import build_node_plan, mirror_entry


@contextlib.contextmanager
def answering_registry() -> Iterator[tuple[int, list[str]]]:
    """A loopback port answering /v2/ like a registry (what the agent's probe asks), and the paths it was asked."""
    asked: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            asked.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        do_HEAD = do_GET

        def log_message(self, format: str, *args: Any) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], asked
    finally:
        server.shutdown()
        server.server_close()


def plan(live_port: int, dead_port: int) -> str:
    """Three mirrors that answer and one that refuses, on loopback addresses only."""
    entries = []
    for i, port in enumerate([live_port, live_port, live_port, dead_port]):
        spec = RegistryMirrorSpec.model_validate(
            {
                "upstream": {"url": f"https://reg{i}.example.com"},
                "service": {"port": port},
                "nodeConfig": {"runtimes": ["containerd", "crio"]},
            }
        )
        entries.append(mirror_entry(f"m{i}", spec, "127.0.0.1"))
    return build_node_plan(entries).to_json()


def snapshot(node: AgentNode) -> dict[str, tuple[int, int, str]]:
    """Every file the agent manages: inode, mtime (ns) and content."""
    out = {}
    for base in (node.certs_dir, node.crio_dir):
        for path in sorted(base.rglob("*")):
            if path.is_file():
                st = path.stat()
                out[str(path.relative_to(node.root))] = (st.st_ino, st.st_mtime_ns, path.read_text())
    return out


def settled(loop: Any) -> None:
    """Until the agent is Ready and has withdrawn the refusing mirror."""
    loop.wait_event("mirror.withdrawn", timeout=30, mirror="m3")
    loop.wait_event("readiness", timeout=30)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_killed_agent_leaves_the_files_and_its_successor_does_not_rewrite_them(sig: signal.Signals, tmp_path: Path) -> None:
    node = AgentNode("node-a", tmp_path / "node", {}, runtime_version="containerd://1.7.0")
    node.write_containerd_config()
    with answering_registry() as (live, probes):
        the_plan = plan(live, free_port())
        with node.agent_loop(the_plan, interval=0.3) as first:
            settled(first)
            before = snapshot(node)
            hosts = [p for p in before if p.endswith("hosts.toml")]
            assert len(hosts) == 3, f"three answering mirrors configured, the refusing one withdrawn: {sorted(before)}"
            assert not any("reg3.example.com" in p for p in before)
            os.kill(first.proc.pid, sig)
            assert first.proc.wait(15) == (0 if sig == signal.SIGTERM else -signal.SIGKILL)
            if sig == signal.SIGTERM:
                assert first.wait_event("agent.stopped")["note"] == "files left in place"
        assert snapshot(node) == before, "nothing was torn down"
        assert not list(node.certs_dir.rglob("*.tmp*")) and not list(node.crio_dir.rglob("*.tmp*")), "no half-written file left"

        (node.root / "agent.log").rename(node.root / "agent-1.log")
        with node.agent_loop(the_plan, interval=0.3) as second:
            settled(second)
            # Several more passes (each probes the three live mirrors), so a late rewrite would show.
            seen = len(probes)
            wait_for(lambda: len(probes) >= seen + 3 * 5, 30, "five more probe rounds")
            applied = [e for e in second.events() if e.get("event") == "files.applied"]
            after = snapshot(node)
        print(f"\nafter {sig.name}: {len(before)} files kept; the new agent logged {len(applied)} files.applied event(s)")
        assert applied == [], f"the restarted agent rewrote files: {json.dumps(applied)[:800]}"
        assert after == before, "same inodes, mtimes and contents: nothing rewritten, no withdrawn mirror flapped back"
