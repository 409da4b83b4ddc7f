"""dockerd (Debian's docker.io) with its own data root, exec root and socket; no networking."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.dataplane.containerd import short_tmpdir
from harness.processes import stop_process
from harness.waiting import wait_for


def docker_cli() -> str | None:
    """The docker CLI that matches Debian's dockerd (/usr/bin/docker), else any on PATH."""
    return "/usr/bin/docker" if Path("/usr/bin/docker").exists() else shutil.which("docker")


@dataclass
class Dockerd:
    """dockerd (Debian's docker.io) with its own data root, exec root, pidfile and socket; no networking."""

    workdir: Path
    proc: subprocess.Popen[bytes]

    @property
    def socket(self) -> str:
        return f"unix://{self.workdir}/docker.sock"

    def log(self) -> str:
        return (self.workdir / "dockerd.log").read_text(errors="replace")

    def docker(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        cli = docker_cli()
        assert cli
        return subprocess.run([cli, "-H", self.socket, *args], capture_output=True, text=True, timeout=timeout, check=False)

    @classmethod
    @contextlib.contextmanager
    def start(cls, daemon_json: Mapping[str, Any]) -> Iterator[Dockerd]:
        workdir = short_tmpdir("rm-dockerd-")
        config = workdir / "daemon.json"
        config.write_text(json.dumps(daemon_json))
        argv = [
            "dockerd",
            "--config-file",
            str(config),
            "--bridge=none",
            "--iptables=false",
            "--ip6tables=false",
            "--ip-masq=false",
            "--storage-driver=vfs",
            "--data-root",
            str(workdir / "data"),
            "--exec-root",
            str(workdir / "exec"),
            "--pidfile",
            str(workdir / "docker.pid"),
            "-H",
            f"unix://{workdir}/docker.sock",
        ]
        log = (workdir / "dockerd.log").open("wb")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        daemon = cls(workdir, proc)
        try:
            wait_for(lambda: proc.poll() is not None or daemon.docker("version", timeout=10).returncode == 0, 60, "dockerd")
            if proc.poll() is not None:
                raise RuntimeError(f"dockerd exited {proc.returncode}:\n{daemon.log()[-3000:]}")
            yield daemon
        finally:
            stop_process(proc, 30, group=True)
            log.close()
            subprocess.run(["umount", "-R", str(workdir)], capture_output=True, check=False)
            shutil.rmtree(workdir, ignore_errors=True)
