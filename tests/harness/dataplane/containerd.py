"""containerd daemons of any release, each with its own root, state, socket and config."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from harness.dataplane.binaries import ContainerdBinaries
from harness.processes import stop_process
from harness.waiting import wait_for


def short_tmpdir(prefix: str) -> Path:
    """A short path under /tmp: containerd's unix socket path must stay under 108 bytes."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


CRI_V1_REGISTRY = '[plugins."io.containerd.grpc.v1.cri".registry]'
CRI_V2_REGISTRY = '[plugins."io.containerd.cri.v1.images".registry]'


def registry_table(config_version: int) -> str:
    """The CRI registry table of a config version (2: containerd 1.x layout, 3: 2.x)."""
    return CRI_V2_REGISTRY if config_version >= 3 else CRI_V1_REGISTRY


def containerd_config(
    binaries: ContainerdBinaries, workdir: Path, registry_toml: str, *, config_version: int | None = None, images_toml: str = ""
) -> str:
    """A self-contained config (own root, state, socket; native snapshotter) plus `registry_toml` verbatim.

    `config_version` defaults to the binary's own format (2 for 1.x, 3 for 2.x);
    `images_toml` are extra lines of 2.x's `[plugins."io.containerd.cri.v1.images"]`.
    """
    version = config_version or (3 if binaries.major >= 2 else 2)
    lines = [
        f"version = {version}",
        f'root = "{workdir}/root"',
        f'state = "{workdir}/state"',
        "[grpc]",
        f'  address = "{workdir}/containerd.sock"',
        "[debug]",
        '  address = ""',
        "[metrics]",
        '  address = ""',
    ]
    if binaries.version != "1.6":
        lines += ['[plugins."io.containerd.nri.v1.nri"]', "  disable = true"]
    if binaries.major >= 2:
        # 2.x unpacks through the transfer service, whose default snapshotter
        # (overlayfs) may not work in a sandbox.
        lines += [
            '[[plugins."io.containerd.transfer.v1.local".unpack_config]]',
            '  platform = "linux/amd64"',
            '  snapshotter = "native"',
        ]
    if binaries.major >= 2:
        # Also for a version 2 file: 2.x migrates the old CRI snapshotter
        # setting only when runtimes are configured.
        lines += ['[plugins."io.containerd.cri.v1.images"]', '  snapshotter = "native"', *images_toml.splitlines()]
    if version < 3:
        lines += ['[plugins."io.containerd.grpc.v1.cri".containerd]', '  snapshotter = "native"']
    return "\n".join(lines) + "\n" + registry_toml


def config_path_toml(config_version: int, config_path: str) -> str:
    """The registry table that points CRI at `config_path`, in the layout of `config_version`."""
    return f'{registry_table(config_version)}\n  config_path = "{config_path}"\n'


@dataclass
class Containerd:
    """A containerd daemon with its own root, state and socket."""

    binaries: ContainerdBinaries
    workdir: Path
    proc: subprocess.Popen[bytes]

    @property
    def socket(self) -> str:
        return f"{self.workdir}/containerd.sock"

    @property
    def config_file(self) -> Path:
        return self.workdir / "config.toml"

    def log(self) -> str:
        return (self.workdir / "containerd.log").read_text(errors="replace")

    @classmethod
    @contextlib.contextmanager
    def start(
        cls,
        binaries: ContainerdBinaries,
        config_path: str | None = None,
        *,
        registry_toml: str | None = None,
        config_version: int | None = None,
        images_toml: str = "",
    ) -> Iterator[Containerd]:
        """Start containerd; CRI reads `config_path`, or whatever `registry_toml` says instead."""
        workdir = short_tmpdir("rm-ctrd-")
        version = config_version or (3 if binaries.major >= 2 else 2)
        if registry_toml is None:
            registry_toml = config_path_toml(version, config_path) if config_path else ""
        config = workdir / "config.toml"
        config.write_text(containerd_config(binaries, workdir, registry_toml, config_version=version, images_toml=images_toml))
        log = (workdir / "containerd.log").open("wb")
        proc = subprocess.Popen(
            [binaries.containerd, "--config", str(config), "--log-level", "debug"], stdout=log, stderr=subprocess.STDOUT
        )
        daemon = cls(binaries, workdir, proc)
        try:
            wait_for(lambda: proc.poll() is not None or daemon._serving(), 30, f"containerd {binaries.version} socket")
            if proc.poll() is not None:
                raise RuntimeError(f"containerd {binaries.version} exited {proc.returncode}:\n{daemon.log()[-3000:]}")
            yield daemon
        finally:
            stop_process(proc, 15)
            log.close()
            subprocess.run(["umount", "-R", str(workdir)], capture_output=True, check=False)
            shutil.rmtree(workdir, ignore_errors=True)

    def _serving(self) -> bool:
        if not Path(self.socket).exists():
            return False
        return subprocess.run([self.binaries.ctr, "--address", self.socket, "version"], capture_output=True, check=False).returncode == 0

    def ctr(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.binaries.ctr, "--address", self.socket, *args], capture_output=True, text=True, timeout=timeout, check=False
        )

    def pull(self, ref: str, hosts_dir: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """`ctr images pull` (client-side resolver, reading `hosts_dir` like CRI reads config_path)."""
        args = ["images", "pull", "--snapshotter", "native"]
        if hosts_dir is not None:
            args += ["--hosts-dir", hosts_dir]
        return self.ctr(*args, ref, timeout=timeout)

    def cri_pull(self, ref: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """A pull through the CRI plugin (kubelet's path), which reads config.toml's config_path."""
        if not self.binaries.crictl:
            raise RuntimeError("no crictl")
        return subprocess.run(
            [
                self.binaries.crictl,
                "--runtime-endpoint",
                f"unix://{self.socket}",
                "--image-endpoint",
                f"unix://{self.socket}",
                "--timeout",
                f"{int(timeout)}s",
                "pull",
                ref,
            ],
            capture_output=True,
            text=True,
            timeout=timeout + 10,
            check=False,
        )

    def remove_image(self, ref: str) -> None:
        self.ctr("images", "rm", "--sync", ref)
        self.ctr("-n", "k8s.io", "images", "rm", "--sync", ref)
