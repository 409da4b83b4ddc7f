"""Real data-plane pieces for e2e tests: a registry, a fake upstream, containerd, ctr, crictl.

Everything listens on loopback only. The helpers are plain context managers so
later data-path tests can reuse them:

    with Registry.start(tmp) as mirror:            # CNCF distribution (`docker-registry`)
        mirror.push_image("library/hello", "v1")   # a tiny image built here, no internet
        with Containerd.start(tmp, binaries, config_path=certs) as ctrd:
            ctrd.pull("docker.io/library/hello:v1", hosts_dir=certs)

`ensure_binaries()` installs the Debian packages (containerd 1.6, docker-registry)
when they are missing and we are root; `build_containerd()` builds other pinned
containerd releases (1.7, 2.x) and crictl from their Go modules into a cache
(tests/e2e/build-containerd.sh). Both return a reason to skip instead of raising.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import tarfile
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
APT_PACKAGES = ("containerd", "docker-registry")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def short_tmpdir(prefix: str) -> Path:
    """A short path under /tmp: containerd's unix socket path must stay under 108 bytes."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def wait_for(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(predicate) and predicate():
            return
        time.sleep(0.05)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


# ------------------------------------------------------------------ binaries


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

    @property
    def major(self) -> int:
        return int(self.version.split(".")[0])


def _version_of(binary: str) -> str:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True).stdout
    # "containerd github.com/containerd/containerd 1.6.20~ds1 ..." -> "1.6"
    token = out.split()[2].lstrip("v")
    return ".".join(token.split(".")[:2])


def build_containerd() -> tuple[list[ContainerdBinaries], str | None]:
    """Pinned extra containerd releases and crictl (built once into a cache), and a reason if that failed."""
    proc = subprocess.run(["bash", str(HERE / "build-containerd.sh")], capture_output=True, text=True, timeout=1800, check=False)
    if proc.returncode != 0:
        return [], f"building containerd releases failed: {proc.stderr.strip()[-600:]}"
    cache = Path(proc.stdout.strip().splitlines()[-1])
    crictl = cache / "crictl" / "bin" / "crictl"
    found = []
    for bindir in sorted(cache.glob("containerd-*/bin")):
        binary = str(bindir / "containerd")
        found.append(ContainerdBinaries(_version_of(binary), binary, str(bindir / "ctr"), str(crictl) if crictl.exists() else None))
    return found, None


def system_containerd(crictl: str | None = None) -> ContainerdBinaries | None:
    binary, ctr = shutil.which("containerd"), shutil.which("ctr")
    if not binary or not ctr:
        return None
    return ContainerdBinaries(_version_of(binary), binary, ctr, crictl)


# ------------------------------------------------------------------ a tiny image


@dataclass(frozen=True)
class Blob:
    media_type: str
    data: bytes

    @property
    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.data).hexdigest()


def tiny_image(text: str = "hello from regmirror\n") -> tuple[Blob, Blob, Blob]:
    """(layer, config, manifest) of a one-file linux/amd64 image, Docker schema 2."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        info = tarfile.TarInfo("hello.txt")
        payload = text.encode()
        info.size, info.mode, info.mtime = len(payload), 0o644, 0
        tar.addfile(info, io.BytesIO(payload))
    layer = Blob("application/vnd.docker.image.rootfs.diff.tar.gzip", gzip.compress(raw.getvalue(), mtime=0))
    config = Blob(
        "application/vnd.docker.container.image.v1+json",
        json.dumps(
            {
                "architecture": "amd64",
                "os": "linux",
                "config": {"Cmd": ["/hello.txt"]},
                "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(raw.getvalue()).hexdigest()]},
            }
        ).encode(),
    )
    manifest = Blob(
        "application/vnd.docker.distribution.manifest.v2+json",
        json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                "config": {"mediaType": config.media_type, "size": len(config.data), "digest": config.digest},
                "layers": [{"mediaType": layer.media_type, "size": len(layer.data), "digest": layer.digest}],
            }
        ).encode(),
    )
    return layer, config, manifest


# ------------------------------------------------------------------ registry


@dataclass
class Registry:
    """A `docker-registry` (CNCF distribution) process on loopback."""

    host: str
    port: int
    proc: subprocess.Popen[bytes]
    workdir: Path

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def requests_log(self) -> str:
        return (self.workdir / "registry.log").read_text(errors="replace")

    @classmethod
    @contextlib.contextmanager
    def start(cls, workdir: Path, host: str = "127.0.0.1", port: int | None = None) -> Iterator[Registry]:
        port = port or free_port(host)
        workdir.mkdir(parents=True, exist_ok=True)
        config = workdir / "config.yml"
        config.write_text(
            "version: 0.1\n"
            "log:\n  level: info\n  accesslog:\n    disabled: false\n"
            f"storage:\n  filesystem:\n    rootdirectory: {workdir / 'data'}\n  delete:\n    enabled: true\n"
            f"http:\n  addr: {host}:{port}\n  debug:\n    addr: ''\n"
        )
        log = (workdir / "registry.log").open("wb")
        proc = subprocess.Popen(["docker-registry", "serve", str(config)], stdout=log, stderr=subprocess.STDOUT)
        registry = cls(host, port, proc, workdir)
        try:
            wait_for(registry.answers, 15, f"docker-registry on {host}:{port}")
            yield registry
        finally:
            registry.stop()
            log.close()

    def answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/v2/", timeout=1) as resp:
                return bool(resp.status == 200)
        except urllib.error.HTTPError:
            return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def _put_blob(self, repo: str, blob: Blob) -> None:
        req = urllib.request.Request(f"{self.url}/v2/{repo}/blobs/uploads/", method="POST")
        with urllib.request.urlopen(req, timeout=10) as resp:
            location = resp.headers["Location"]
        if location.startswith("/"):
            location = self.url + location
        sep = "&" if "?" in location else "?"
        req = urllib.request.Request(
            f"{location}{sep}digest={blob.digest}", data=blob.data, method="PUT", headers={"Content-Type": "application/octet-stream"}
        )
        with urllib.request.urlopen(req, timeout=10):
            pass

    def push_image(self, repo: str, tag: str, text: str = "hello from regmirror\n") -> str:
        """Push a tiny image; returns its manifest digest."""
        layer, config, manifest = tiny_image(text)
        self._put_blob(repo, layer)
        self._put_blob(repo, config)
        req = urllib.request.Request(
            f"{self.url}/v2/{repo}/manifests/{tag}", data=manifest.data, method="PUT", headers={"Content-Type": manifest.media_type}
        )
        with urllib.request.urlopen(req, timeout=10):
            pass
        return manifest.digest


# ------------------------------------------------------------------ fake upstream


@dataclass
class ConnectionRecorder:
    """A TCP listener standing in for an upstream registry: it counts who connects, and answers nothing."""

    host: str
    port: int
    connections: list[str] = field(default_factory=list)
    _sock: socket.socket | None = None
    _stop: threading.Event = field(default_factory=threading.Event)

    @classmethod
    @contextlib.contextmanager
    def start(cls, host: str = "127.0.0.2", port: int | None = None) -> Iterator[ConnectionRecorder]:
        rec = cls(host, port or free_port(host))
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((rec.host, rec.port))
        sock.listen(16)
        sock.settimeout(0.2)
        rec._sock = sock
        thread = threading.Thread(target=rec._serve, daemon=True)
        thread.start()
        try:
            yield rec
        finally:
            rec._stop.set()
            thread.join(2)
            sock.close()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def _serve(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                conn, peer = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections.append(f"{peer[0]}:{peer[1]}")
            conn.close()


# ------------------------------------------------------------------ containerd


CRI_V1_REGISTRY = '[plugins."io.containerd.grpc.v1.cri".registry]'
CRI_V2_REGISTRY = '[plugins."io.containerd.cri.v1.images".registry]'


def registry_table(config_version: int) -> str:
    """The CRI registry table of a config version (2: containerd 1.x layout, 3: 2.x)."""
    return CRI_V2_REGISTRY if config_version >= 3 else CRI_V1_REGISTRY


def containerd_config(binaries: ContainerdBinaries, workdir: Path, registry_toml: str, *, config_version: int | None = None) -> str:
    """A self-contained config (own root, state, socket; native snapshotter) plus `registry_toml` verbatim.

    `config_version` defaults to the binary's own format (2 for 1.x, 3 for 2.x).
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
        lines += ['[plugins."io.containerd.cri.v1.images"]', '  snapshotter = "native"']
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
    ) -> Iterator[Containerd]:
        """Start containerd; CRI reads `config_path`, or whatever `registry_toml` says instead."""
        workdir = short_tmpdir("rm-ctrd-")
        version = config_version or (3 if binaries.major >= 2 else 2)
        if registry_toml is None:
            registry_toml = config_path_toml(version, config_path) if config_path else ""
        config = workdir / "config.toml"
        config.write_text(containerd_config(binaries, workdir, registry_toml, config_version=version))
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
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
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
