"""Data-plane programs: Debian's containerd and docker-registry, and pinned containerd releases.

``ensure_binaries()`` / ``ensure_commands()`` install missing Debian packages when we are
root; ``build_containerd()`` builds other containerd releases (1.7, 2.x) and crictl from
their Go modules into a cache (tests/e2e/build-containerd.sh). Each returns a reason to
skip (this machine cannot run the test) instead of raising.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from harness.cluster import REPO_ROOT

BUILD_CONTAINERD = REPO_ROOT / "tests" / "e2e" / "build-containerd.sh"
APT_PACKAGES = ("containerd", "docker-registry")


def ensure_binaries() -> str | None:
    """Install containerd (Debian's 1.6) and docker-registry if missing; a skip reason or None."""
    missing = [
        p for p, b in (("containerd", "containerd"), ("containerd", "ctr"), ("docker-registry", "docker-registry")) if not shutil.which(b)
    ]
    if not missing:
        return None
    if os.geteuid() != 0:
        return f"not root, and {sorted(set(missing))} are not installed"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *sorted(set(missing))]):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, check=False)
        if proc.returncode != 0:
            return f"cannot install {sorted(set(missing))}: {' '.join(cmd)} failed: {proc.stderr.strip()[-400:]}"
    return None


@dataclass(frozen=True)
class ContainerdBinaries:
    version: str  # "1.6", "1.7", "2.4"
    containerd: str
    ctr: str
    crictl: str | None = None
    release: str = ""  # "1.6.20", "2.0.7": what a Node's containerRuntimeVersion would say

    @property
    def major(self) -> int:
        return int(self.version.split(".")[0])

    @property
    def runtime_version(self) -> str:
        """The Node's status.nodeInfo.containerRuntimeVersion for this release."""
        return f"containerd://{self.release or self.version + '.0'}"


def _release_of(binary: str) -> str:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True).stdout
    # "containerd github.com/containerd/containerd 1.6.20~ds1 ..." -> "1.6.20"
    token = out.split()[2].lstrip("v")
    return re.split(r"[~+-]", token)[0]


def _version_of(binary: str) -> str:
    return ".".join(_release_of(binary).split(".")[:2])


def build_containerd() -> tuple[list[ContainerdBinaries], str | None]:
    """Pinned extra containerd releases and crictl (built once into a cache), and a reason if that failed."""
    proc = subprocess.run(["bash", str(BUILD_CONTAINERD)], capture_output=True, text=True, timeout=1800, check=False)
    if proc.returncode != 0:
        return [], f"building containerd releases failed: {proc.stderr.strip()[-600:]}"
    cache = Path(proc.stdout.strip().splitlines()[-1])
    crictl = cache / "crictl" / "bin" / "crictl"
    found = []
    for bindir in sorted(cache.glob("containerd-*/bin")):
        if not (bindir / "containerd").exists():
            continue  # a build in progress (or one that failed) elsewhere
        binary = str(bindir / "containerd")
        found.append(
            ContainerdBinaries(
                _version_of(binary), binary, str(bindir / "ctr"), str(crictl) if crictl.exists() else None, _release_of(binary)
            )
        )
    return found, None


def system_containerd(crictl: str | None = None) -> ContainerdBinaries | None:
    binary, ctr = shutil.which("containerd"), shutil.which("ctr")
    if not binary or not ctr:
        return None
    return ContainerdBinaries(_version_of(binary), binary, ctr, crictl, _release_of(binary))


def ensure_commands(packages: Mapping[str, str]) -> str | None:
    """Install Debian packages (package -> a command it provides) whose command is missing; a skip reason or None."""
    missing = sorted({pkg for pkg, cmd in packages.items() if not shutil.which(cmd) and not Path(f"/usr/sbin/{cmd}").exists()})
    if not missing:
        return None
    if os.geteuid() != 0:
        return f"not root, and {missing} are not installed"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing]):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, check=False)
        if proc.returncode != 0:
            return f"cannot install {missing}: {' '.join(cmd)} failed: {proc.stderr.strip()[-400:]}"
    return None
