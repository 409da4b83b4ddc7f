"""Docker Engine nodes: merge our `registry-mirrors` and `insecure-registries` into daemon.json, then reload dockerd.

daemon.json is the admin's file; JSON has no comments, so the entries we add
are remembered in a file of our own next to it (`.regmirror-daemon.json`):
an entry is ours only if we added it when it was not there. Every other key
and every entry we did not add stays as it is (order included); ours come
first in `registry-mirrors` (dockerd tries mirrors in order, then Docker
Hub). A key the admin set in a shape we do not understand, a daemon.json
that is not a JSON object, or a key dockerd also gets as a command-line flag
(dockerd refuses to start when a setting is both in a flag and in the file)
is left alone and reported.

Docker Engine mirrors Docker Hub only, and always falls back to it: only
AllowUpstream mirrors of docker.io are written (the CRD refuses docker with
NeverContactUpstream), withdrawn ones are taken out like anywhere else.

dockerd re-reads `registry-mirrors` and `insecure-registries` on SIGHUP
(verified with Debian's dockerd in tests/e2e/test_dockerd_agent.py). The
agent finds dockerd through its pidfile, or /proc (the agent's pod needs the
host's PID namespace for either), checks that the process is dockerd, and
signals it; when it cannot, the change is reported as needing a reload
(`systemctl reload docker`), and the agent tries again on its next step.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from regmirror.agent.files import atomic_write, on_host
from regmirror.render.nodeinput import Finding

DAEMON_JSON = "/etc/docker/daemon.json"
PIDFILE = "/var/run/docker.pid"
STATE_NAME = ".regmirror-daemon.json"
KEYS = ("registry-mirrors", "insecure-registries")
# The dockerd flags that set the same keys: with one of them on its command line, the key must stay out of the file.
FLAGS = {"registry-mirrors": "--registry-mirror", "insecure-registries": "--insecure-registry"}
MAX_BYTES = 1 << 20


class DaemonJsonError(ValueError):
    """daemon.json (or one of our keys in it) is not something we may rewrite."""


@dataclass(frozen=True)
class Merge:
    """The merged daemon.json and what is ours in it."""

    config: dict[str, Any]
    owned: dict[str, list[str]]
    created: list[str] = field(default_factory=list)  # keys that were not in the file before we added to them
    skipped: dict[str, str] = field(default_factory=dict)  # key -> why it was left alone


def merge_daemon_json(
    current: Mapping[str, Any],
    owned: Mapping[str, Sequence[str]],
    desired: Mapping[str, Sequence[str]],
    flags: Sequence[str] = (),
    created: Sequence[str] = (),
) -> Merge:
    """PURE: `current` with our entries set to `desired` and the admin's kept; `owned` is what we added before.

    An entry present in `current` that we did not add is the admin's: kept,
    never claimed. A key whose last entry of ours goes away stays as `[]`
    (dockerd's SIGHUP reload ignores absent keys; verified on Debian's
    dockerd). Raises DaemonJsonError when `current` is not an object.
    """
    if not isinstance(current, Mapping):
        raise DaemonJsonError("daemon.json is not a JSON object")
    config = dict(current)
    new_owned: dict[str, list[str]] = {}
    new_created: list[str] = []
    skipped: dict[str, str] = {}
    for key in KEYS:
        want = list(dict.fromkeys(desired.get(key, ())))
        existing = current.get(key, [])
        if not isinstance(existing, list) or not all(isinstance(v, str) for v in existing):
            skipped[key] = f"{key} in daemon.json is not a list of strings"
            continue
        if FLAGS[key] in flags or any(f.startswith(FLAGS[key] + "=") for f in flags):
            if want:
                skipped[key] = f"dockerd runs with {FLAGS[key]}, and refuses to start with {key} in daemon.json too"
            ours_before = set(owned.get(key, ()))
            admins = [v for v in existing if v not in ours_before]
            if admins != existing:
                config[key] = admins  # take back what we added before the flag appeared
            continue
        ours_before = set(owned.get(key, ()))
        admins = [v for v in existing if v not in ours_before]
        ours = [v for v in want if v not in admins]
        merged = ours + admins
        if merged or key in current:
            # An emptied key stays as []: dockerd's reload only applies keys present in the file,
            # so a removed key would leave our mirrors in the running daemon until it restarts.
            config[key] = merged
        if ours:
            new_owned[key] = ours
        if (key in created or key not in current) and not admins and merged:
            new_created.append(key)
    return Merge(config, new_owned, new_created, skipped)


def _state(merge: Merge, *, reload_pending: bool) -> str:
    """Our record next to daemon.json: the entries and keys we added, and whether dockerd still has to reload."""
    return (
        json.dumps({"managedBy": "regmirror-agent", **merge.owned, "createdKeys": merge.created, "reloadPending": reload_pending}, indent=2)
        + "\n"
    )


@dataclass
class DockerResult:
    """What one apply did on this node."""

    present: bool = False
    changed: bool = False
    reloaded: bool = False
    reload_pending: bool = False
    findings: list[Finding] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def _read_json(path: Path) -> Any:
    with path.open("rb") as fh:
        data = fh.read(MAX_BYTES + 1)
    if len(data) > MAX_BYTES:
        raise DaemonJsonError(f"{path} is larger than {MAX_BYTES} bytes")
    try:
        return json.loads(data or b"{}")
    except (ValueError, RecursionError) as exc:
        raise DaemonJsonError(f"{path} is not JSON: {exc}") from None


def _cmdline(proc: Path, pid: int) -> list[str] | None:
    try:
        raw = (proc / str(pid) / "cmdline").read_bytes()
    except OSError:
        return None
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def find_dockerd(host_root: Path, pidfile: str, proc: Path = Path("/proc")) -> tuple[int, list[str]] | None:
    """dockerd's pid and command line: from its pidfile if that names a dockerd, else the only dockerd in `proc`.

    `proc` is the host's /proc as the agent sees it (its pod shares the host's
    PID namespace); a pid is trusted only if its command is dockerd.
    """

    def dockerd_cmdline(pid: int) -> list[str] | None:
        cmdline = _cmdline(proc, pid)
        return cmdline if cmdline and os.path.basename(cmdline[0]) == "dockerd" else None

    try:
        pid = int(on_host(host_root, pidfile).read_text().strip())
        found = dockerd_cmdline(pid)
        if found is not None:
            return pid, found
    except (OSError, ValueError):
        pass
    try:
        pids = [int(e) for e in os.listdir(proc) if e.isdigit()]
    except OSError:
        return None
    candidates = [(pid, cmdline) for pid in pids if (cmdline := dockerd_cmdline(pid)) is not None]
    return candidates[0] if len(candidates) == 1 else None


def docker_present(host_root: Path, daemon_json: str, runtime_version: str | None, dockerd: tuple[int, list[str]] | None) -> bool:
    """Whether this node runs Docker Engine: its Node says so (cri-dockerd), or dockerd or its daemon.json is there."""
    return (
        bool(runtime_version and runtime_version.startswith("docker://")) or dockerd is not None or on_host(host_root, daemon_json).exists()
    )


def apply_docker(
    host_root: Path,
    desired: Mapping[str, Sequence[str]],
    *,
    daemon_json: str = DAEMON_JSON,
    pidfile: str = PIDFILE,
    runtime_version: str | None = None,
    reload: bool = True,
    proc: Path = Path("/proc"),
) -> DockerResult:
    """Merge `desired` into the node's daemon.json (atomically) and make dockerd reload it."""
    result = DockerResult()
    dockerd = find_dockerd(host_root, pidfile, proc)
    if not docker_present(host_root, daemon_json, runtime_version, dockerd):
        return result
    result.present = True
    path = on_host(host_root, daemon_json)
    state_path = path.with_name(STATE_NAME)
    try:
        current = _read_json(path) if path.exists() else {}
        state = _read_json(state_path) if state_path.exists() else {}
        state = state if isinstance(state, dict) else {}
        owned = {k: [v for v in state.get(k, []) if isinstance(v, str)] for k in KEYS if isinstance(state.get(k), list)}
        created = [k for k in state.get("createdKeys", []) if k in KEYS] if isinstance(state.get("createdKeys"), list) else []
        merge = merge_daemon_json(current, owned, desired, dockerd[1] if dockerd else (), created)
    except (DaemonJsonError, OSError) as exc:
        result.findings.append(Finding("DaemonJsonUnreadable", f"{daemon_json}: {exc}; left untouched"))
        return result
    for why in merge.skipped.values():
        result.findings.append(Finding("DaemonJsonKeySkipped", f"{daemon_json}: {why}; the mirrors are not written there"))
    pending = bool(state.get("reloadPending"))
    try:
        if merge.config != current or not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
            # What we own first: a crash between the two writes leaves entries recorded as ours
            # that are not in the file (harmless), never ours in the file unrecorded (never removed).
            atomic_write(state_path, _state(merge, reload_pending=True))
            atomic_write(path, json.dumps(merge.config, indent=2) + "\n", mode)
            result.changed = True
            pending = True
        elif merge.owned != owned or merge.created != created:
            atomic_write(state_path, _state(merge, reload_pending=pending))
    except OSError as exc:
        result.errors.append(f"{daemon_json}: {exc.strerror or exc}")
        return result
    if pending:
        why = "no dockerd process found" if dockerd is None else ""
        if reload and dockerd is not None:
            try:
                os.kill(dockerd[0], signal.SIGHUP)
                result.reloaded = True
                pending = False
            except OSError as exc:
                why = f"cannot signal dockerd (pid {dockerd[0]}): {exc.strerror or exc}"
        elif not reload:
            why = "reloading is off (--docker-reload=report)"
        if pending:
            result.reload_pending = True
            result.findings.append(
                Finding(
                    "DockerReloadRequired", f"{daemon_json} changed but dockerd did not reload it ({why}): run `systemctl reload docker`"
                )
            )
        else:
            try:
                atomic_write(state_path, _state(merge, reload_pending=False))
            except OSError as exc:
                result.errors.append(f"{state_path}: {exc.strerror or exc}")
    return result
