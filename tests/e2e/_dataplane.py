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

import base64
import contextlib
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _images import Descriptor

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
    proc = subprocess.run(["bash", str(HERE / "build-containerd.sh")], capture_output=True, text=True, timeout=1800, check=False)
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


# ------------------------------------------------------------------ a tiny image


# A blob with its media type and digest: the same record the image builder uses.
Blob = Descriptor


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
    """A `docker-registry` (CNCF distribution) process on loopback.

    `start` runs a plain registry with its own config (access log on, optional
    htpasswd auth); `launch` runs one from a given argv and environment (the
    mirror, with the config the operator rendered). Either can be stopped and
    restarted in place (`stopped()`): same port, same storage, same log file.
    """

    host: str
    port: int
    proc: subprocess.Popen[bytes]
    workdir: Path
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "registry.log"

    def requests_log(self) -> str:
        return self.log_path.read_text(errors="replace")

    @classmethod
    @contextlib.contextmanager
    def start(cls, workdir: Path, host: str = "127.0.0.1", port: int | None = None, *, auth: str = "") -> Iterator[Registry]:
        """A registry with its own config; `auth` is an `auth:` YAML block (e.g. TokenService.registry_auth())."""
        port = port or free_port(host)
        workdir.mkdir(parents=True, exist_ok=True)
        config = workdir / "config.yml"
        config.write_text(
            "version: 0.1\n"
            "log:\n  level: info\n  accesslog:\n    disabled: false\n"
            f"storage:\n  filesystem:\n    rootdirectory: {workdir / 'data'}\n  delete:\n    enabled: true\n"
            f"http:\n  addr: {host}:{port}\n  debug:\n    addr: ''\n" + auth
        )
        with cls.launch(workdir, ["docker-registry", "serve", str(config)], None, host, port) as registry:
            yield registry

    @classmethod
    @contextlib.contextmanager
    def launch(cls, workdir: Path, argv: list[str], env: dict[str, str] | None, host: str, port: int) -> Iterator[Registry]:
        """Run `argv` (a docker-registry command line) that serves on host:port; stop it on exit."""
        workdir.mkdir(parents=True, exist_ok=True)
        registry = cls(host, port, None, workdir, list(argv), env)  # type: ignore[arg-type]
        registry._spawn()
        try:
            yield registry
        finally:
            registry.stop()

    def _spawn(self) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        wait_for(lambda: self.proc.poll() is not None or self.answers(), 15, f"docker-registry on {self.address}")
        if self.proc.poll() is not None:
            raise RuntimeError(f"docker-registry exited {self.proc.returncode}:\n{self.requests_log()[-2000:]}")

    @contextlib.contextmanager
    def stopped(self) -> Iterator[None]:
        """Stop the registry for the duration of the block, then start it again as it was."""
        self.stop()
        try:
            yield
        finally:
            self._spawn()

    def answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/v2/", timeout=1) as resp:
                return bool(resp.status == 200)
        except urllib.error.HTTPError:
            return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
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


# ------------------------------------------------------------------ dead mirrors


class HangingListener:
    """A TCP port that accepts connections and never answers (a wedged mirror)."""

    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(64)
        self.sock.settimeout(0.2)
        self.conns: list[socket.socket] = []
        self._halt = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self._halt.is_set():
            try:
                conn, _ = self.sock.accept()
                self.conns.append(conn)
            except (TimeoutError, OSError):
                continue

    def close(self) -> None:
        self._halt.set()
        self.thread.join(2)
        for conn in self.conns:
            conn.close()
        self.sock.close()


def iptables_usable() -> bool:
    """Whether this process may add iptables rules (root, and the tool works in this network namespace)."""
    return bool(shutil.which("iptables")) and subprocess.run(["iptables", "-S", "OUTPUT"], capture_output=True, check=False).returncode == 0


@contextlib.contextmanager
def blackholed(host: str, port: int) -> Iterator[None]:
    """Drop every packet to host:port (a dead node behind a still-listed endpoint): connects hang until they time out."""
    rule = ["OUTPUT", "-d", host, "-p", "tcp", "--dport", str(port), "-j", "DROP"]
    subprocess.run(["iptables", "-I", *rule], check=True, capture_output=True)
    try:
        yield
    finally:
        subprocess.run(["iptables", "-D", *rule], check=False, capture_output=True)


@contextlib.contextmanager
def dead_mirror(kind: str, registry: Registry) -> Iterator[None]:
    """Take a running mirror down: refused (process gone), blackholed (packets dropped), hanging (accepts, never answers)."""
    registry.stop()
    listener = HangingListener(registry.host, registry.port) if kind == "hanging" else None
    try:
        if kind == "blackholed":
            with blackholed(registry.host, registry.port):
                yield
        else:
            yield
    finally:
        if listener is not None:
            listener.close()


# ------------------------------------------------------------------ containerd


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


# ------------------------------------------------------------------ what a registry served


_ACCESS_LINE = re.compile(r'"(?P<method>[A-Z]+) (?P<uri>\S+) HTTP/[0-9.]+" (?P<status>\d{3}) \S+ "[^"]*" "(?P<agent>[^"]*)"')


@dataclass(frozen=True)
class Served:
    method: str
    uri: str
    status: int
    agent: str = ""


def served_requests(log_text: str) -> list[Served]:
    """Requests a registry answered, from its log.

    Reads distribution's JSON "response completed" lines (the operator's
    config: JSON formatter, access log off) and Apache access-log lines (the
    upstreams started here); the text formatter's own "response completed"
    lines are skipped, so nothing is counted twice.
    """
    served = []
    for line in log_text.splitlines():
        if line.startswith("{"):
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("msg") == "response completed":
                served.append(
                    Served(
                        record["http.request.method"],
                        record["http.request.uri"],
                        int(record["http.response.status"]),
                        record.get("http.request.useragent", ""),
                    )
                )
        elif not line.startswith("time=") and (match := _ACCESS_LINE.search(line)):
            served.append(Served(match["method"], match["uri"], int(match["status"]), match["agent"]))
    return served


def blob_gets(log_text: str, digests: Iterable[str], status: int = 200) -> dict[str, int]:
    """How many times each blob was served (GET .../blobs/<digest> answered `status`)."""
    counts = dict.fromkeys(digests, 0)
    for req in served_requests(log_text):
        if req.method == "GET" and req.status == status and "/blobs/" in req.uri:
            digest = req.uri.split("/blobs/", 1)[1].split("?", 1)[0]
            if digest in counts:
                counts[digest] += 1
    return counts


def htpasswd_line(user: str, password: str) -> str:
    """A bcrypt htpasswd entry (`htpasswd -Bbn`, from Debian's apache2-utils)."""
    proc = subprocess.run(["htpasswd", "-Bbn", user, password], capture_output=True, text=True, check=True)
    return proc.stdout.strip() + "\n"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class TokenService:
    """A Docker token service (the `Bearer realm=...` of a private registry), checking users against htpasswd.

    distribution 2.8 in proxy mode authenticates to its upstream only through a
    token service (Basic-auth upstreams arrived in 3.0), so the private upstream
    here is built like Docker Hub, GHCR or Quay: a registry with `auth.token`,
    whose realm hands out RS256 JWTs (signed with a throwaway self-signed key,
    sent as x5c) to users whose password `htpasswd -vb` accepts.
    """

    workdir: Path
    htpasswd: Path
    host: str = "127.0.0.1"
    port: int = 0
    service: str = "regmirror-test"
    issuer: str = "regmirror-test-issuer"
    requests: list[tuple[str, int]] = field(default_factory=list)  # (user or "", status)

    @property
    def realm(self) -> str:
        return f"http://{self.host}:{self.port}/token"

    def registry_auth(self) -> str:
        return (
            "auth:\n  token:\n"
            f"    realm: {self.realm}\n    service: {self.service}\n    issuer: {self.issuer}\n"
            f"    rootcertbundle: {self.workdir / 'token.crt'}\n"
        )

    @classmethod
    @contextlib.contextmanager
    def start(cls, workdir: Path, htpasswd: Path) -> Iterator[TokenService]:
        import datetime
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import parse_qs, urlsplit

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import padding, rsa
        from cryptography.x509.oid import NameOID

        workdir.mkdir(parents=True, exist_ok=True)
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "regmirror-test-token-signer")])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256())
        )
        (workdir / "token.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        x5c = base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()
        svc = cls(workdir, htpasswd)

        def token_for(user: str, scopes: list[str]) -> str:
            access = []
            for scope in scopes:
                kind, _, rest = scope.partition(":")
                repo, _, actions = rest.rpartition(":")
                access.append({"type": kind, "name": repo, "actions": [a for a in actions.split(",") if a]})
            issued = int(time.time())
            header = {"typ": "JWT", "alg": "RS256", "x5c": [x5c]}
            claims = {
                "iss": svc.issuer,
                "sub": user,
                "aud": svc.service,
                "exp": issued + 300,
                "nbf": issued - 10,
                "iat": issued,
                "jti": os.urandom(8).hex(),
                "access": access,
            }
            signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
            signature = key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
            return f"{signing_input}.{_b64url(signature)}"

        def verified(user: str, password: str) -> bool:
            argv = ["htpasswd", "-vb", str(svc.htpasswd), user, password]
            return subprocess.run(argv, capture_output=True, check=False).returncode == 0

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                parts = urlsplit(self.path)
                user, password = "", None
                header = self.headers.get("Authorization", "")
                if header.startswith("Basic "):
                    user, _, password = base64.b64decode(header[6:]).decode().partition(":")
                ok = parts.path == "/token" and password is not None and verified(user, password)
                svc.requests.append((user, 200 if ok else 401))
                scopes = parse_qs(parts.query).get("scope", [])
                payload = {"token": token_for(user, scopes), "expires_in": 300} if ok else {"details": "unauthorized"}
                body = json.dumps(payload).encode()
                self.send_response(200 if ok else 401)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return

        httpd = ThreadingHTTPServer((svc.host, 0), Handler)
        svc.port = int(httpd.server_address[1])
        thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        try:
            yield svc
        finally:
            httpd.shutdown()
            httpd.server_close()
            thread.join(5)


# ------------------------------------------------------------------ the cluster's objects, on loopback


@dataclass(frozen=True)
class LoopbackMap:
    """The ONLY differences between what the operator wrote and what runs here: addresses and paths.

    `addresses`: cluster address -> loopback address. Keys are host:port (the
    Service's ClusterIP:port in the node plan), bare listen addresses (":5000"
    in config.yml), or whole URLs ("https://registry-1.docker.io", the server
    containerd falls back to for docker.io, which has no stand-in but our local
    upstream). `paths`: container or host path prefix -> temporary directory.
    """

    addresses: Mapping[str, str]
    paths: Mapping[str, str]


def map_to_loopback(value: Any, mapping: LoopbackMap) -> Any:
    """Map every string inside `value` (nested dicts and lists, e.g. parsed YAML or JSON).

    A string equal to a mapped address or URL is replaced; a URL whose
    host:port is mapped gets the new host:port (scheme and path kept); a path
    under a mapped prefix is moved. Anything else, including
    `proxy.remoteurl`, stays exactly as the operator wrote it.
    """
    if isinstance(value, dict):
        return {k: map_to_loopback(v, mapping) for k, v in value.items()}
    if isinstance(value, list):
        return [map_to_loopback(v, mapping) for v in value]
    if not isinstance(value, str):
        return value
    if value in mapping.addresses:
        return mapping.addresses[value]
    if "://" in value:
        scheme, rest = value.split("://", 1)
        netloc, slash, path = rest.partition("/")
        if netloc in mapping.addresses:
            return f"{scheme}://{mapping.addresses[netloc]}{slash}{path}"
        return value
    for prefix, target in mapping.paths.items():
        if value == prefix or value.startswith(prefix.rstrip("/") + "/"):
            return target.rstrip("/") + value[len(prefix.rstrip("/")) :]
    return value


@dataclass(frozen=True)
class MirrorObjects:
    """What the operator wrote for one RegistryMirror, as read back from the API server."""

    name: str
    config_yml: str  # the ConfigMap's config.yml
    container: dict[str, Any]  # the Deployment's registry container
    secrets: dict[str, dict[str, str]]  # Secrets its env refers to: name -> decoded data
    cluster_ip: str
    port: int  # the Service port nodes use

    @property
    def endpoint(self) -> str:
        return f"{self.cluster_ip}:{self.port}"


def resolve_env(container: dict[str, Any], secrets: Mapping[str, Mapping[str, str]]) -> dict[str, str]:
    """The container's env as the kubelet would set it (value, or secretKeyRef resolved)."""
    env = {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        else:
            ref = var["valueFrom"]["secretKeyRef"]
            env[var["name"]] = secrets[ref["name"]][ref["key"]]
    return env


@dataclass
class LoopbackMirror:
    """The operator's mirror as a real docker-registry process: argv and env from the Deployment."""

    objects: MirrorObjects
    mapping: LoopbackMap
    workdir: Path
    host: str
    port: int
    debug_port: int

    @classmethod
    def plan(cls, objects: MirrorObjects, workdir: Path, *, docker_hub: str | None = None) -> LoopbackMirror:
        """Choose the loopback ports and directories and the one mapping of this mirror."""
        from regmirror import constants as c
        from regmirror.render import mirror as render_mirror

        host, port, debug_port = "127.0.0.1", free_port(), free_port()
        addresses = {
            objects.endpoint: f"{host}:{port}",  # Service ClusterIP:port (node plan)
            f":{c.REGISTRY_PORT}": f"{host}:{port}",  # container listen address (config.yml)
            ":5002": f"{host}:{port}",  # the registry's listen address behind the cache front (render/front.py)
            f":{c.REGISTRY_DEBUG_PORT}": f"{host}:{debug_port}",  # metrics / debug listener
        }
        if docker_hub:
            addresses[c.DOCKER_HUB_SERVER] = docker_hub
        paths = {
            c.REGISTRY_STORAGE_PATH: str(workdir / "storage"),
            render_mirror.CONFIG_DIR: str(workdir / "etc"),
        }
        return cls(objects, LoopbackMap(addresses, paths), workdir, host, port, debug_port)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def argv_env(self) -> tuple[list[str], dict[str, str]]:
        """Write the mapped config.yml where the mapped args expect it; return (argv, env)."""
        import yaml

        from regmirror.render import mirror as render_mirror

        config = map_to_loopback(yaml.safe_load(self.objects.config_yml), self.mapping)
        config_file = Path(map_to_loopback(render_mirror.CONFIG_PATH, self.mapping))
        config_file.parent.mkdir(parents=True, exist_ok=True)
        config_file.write_text(yaml.safe_dump(config, sort_keys=False))
        args = map_to_loopback(list(self.objects.container.get("args", [])), self.mapping)
        env = map_to_loopback(resolve_env(self.objects.container, self.objects.secrets), self.mapping)
        return ["docker-registry", *args], {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env}

    @contextlib.contextmanager
    def run(self, env_override: Mapping[str, str] | None = None) -> Iterator[Registry]:
        argv, env = self.argv_env()
        env.update(env_override or {})
        with Registry.launch(self.workdir, argv, env, self.host, self.port) as registry:
            yield registry

    def debug_vars(self) -> dict[str, Any]:
        """distribution's expvar counters (2.8 keeps its proxy hit/miss counters there, not in /metrics)."""
        with urllib.request.urlopen(f"http://{self.host}:{self.debug_port}/debug/vars", timeout=5) as resp:
            return dict(json.loads(resp.read()))

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://{self.host}:{self.debug_port}/metrics", timeout=5) as resp:
            return str(resp.read().decode())


# ------------------------------------------------------------------ a simulated node: agent + containerd


CONTAINERD_NODE_CONFIG = "/etc/containerd/config.toml"
CONTAINERD_NODE_CERTS = "/etc/containerd/certs.d"
CRIO_NODE_DROPINS = "/etc/containers/registries.conf.d"
OPERATOR_SRC = str(HERE.parents[1] / "operator")


@dataclass
class AgentNode:
    """A node for `regmirror agent`: a temporary host root, its labels, and the plan the agent reads."""

    name: str
    root: Path
    labels: dict[str, str]
    runtime_version: str = "containerd://1.6.0"

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "etc" / "regmirror").mkdir(parents=True, exist_ok=True)
        self.node_file.write_text(
            json.dumps(
                {
                    "metadata": {
                        "name": self.name,
                        "uid": f"uid-{self.name}",
                        "labels": {"kubernetes.io/hostname": self.name, **self.labels},
                    },
                    "status": {"nodeInfo": {"containerRuntimeVersion": self.runtime_version}},
                }
            )
        )

    @property
    def node_file(self) -> Path:
        return self.root / "etc" / "regmirror" / "node.json"

    @property
    def plan_file(self) -> Path:
        return self.root / "etc" / "regmirror" / "mirrors.json"

    @property
    def certs_dir(self) -> Path:
        """containerd's config_path as the real daemon sees it (the node's /etc/containerd/certs.d)."""
        return self.root / CONTAINERD_NODE_CERTS.lstrip("/")

    @property
    def crio_dir(self) -> Path:
        return self.root / CRIO_NODE_DROPINS.lstrip("/")

    def write_containerd_config(self, config_path: str = CONTAINERD_NODE_CERTS) -> None:
        """The node's own config.toml (read by the agent's preflight): config_path set, as documented."""
        path = self.root / CONTAINERD_NODE_CONFIG.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"version = 2\n{config_path_toml(2, config_path)}")

    def agent_argv(self, *, once: bool, interval: float = 2.0) -> list[str]:
        argv = [
            sys.executable,
            "-m",
            "regmirror",
            "agent",
            "--plan",
            str(self.plan_file),
            "--host-root",
            str(self.root),
            "--node-labels-file",
            str(self.node_file),
            "--health-port",
            "0",
            "--interval",
            str(interval),
            "--probe-timeout",
            "0.5",
        ]
        return [*argv, "--once"] if once else argv

    def agent_once(self, plan_json: str) -> tuple[int, list[dict[str, Any]]]:
        """`regmirror agent --once` with this plan; returns its exit code and JSON events."""
        self.plan_file.write_text(plan_json)
        proc = subprocess.run(
            self.agent_argv(once=True),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env={**os.environ, "PYTHONPATH": OPERATOR_SRC},
        )
        if proc.returncode not in (0, 1):
            raise RuntimeError(f"agent failed ({proc.returncode}): {proc.stderr[-2000:]}")
        return proc.returncode, [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]

    @contextlib.contextmanager
    def agent_loop(self, plan_json: str, interval: float = 0.5) -> Iterator[AgentLoop]:
        """The agent as it runs in its DaemonSet (a loop), stopped with SIGTERM on exit."""
        self.plan_file.write_text(plan_json)
        out = (self.root / "agent.log").open("wb")
        proc = subprocess.Popen(
            self.agent_argv(once=False, interval=interval),
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": OPERATOR_SRC},
        )
        loop = AgentLoop(proc, self.root / "agent.log")
        try:
            yield loop
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            out.close()


@dataclass
class AgentLoop:
    proc: subprocess.Popen[bytes]
    log_path: Path

    def events(self) -> list[dict[str, Any]]:
        text = self.log_path.read_text(errors="replace")
        return [json.loads(line) for line in text.splitlines() if line.startswith("{")]

    def wait_event(self, event: str, timeout: float = 20, **fields: str) -> dict[str, Any]:
        found: list[dict[str, Any]] = []

        def seen() -> bool:
            found[:] = [e for e in self.events() if e.get("event") == event and all(e.get(k) == v for k, v in fields.items())]
            return bool(found)

        wait_for(seen, timeout, f"agent event {event} {fields}")
        return found[0]


# ------------------------------------------------------------------ dockerd


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
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, 9)
                    proc.wait()
            log.close()
            subprocess.run(["umount", "-R", str(workdir)], capture_output=True, check=False)
            shutil.rmtree(workdir, ignore_errors=True)


# ------------------------------------------------------------------ reading the operator's objects back
# `cluster` is a harness.LocalCluster and `operator` a harness.operator.OperatorProcess
# (typed loosely: this module also serves tests that need no control plane).

OPERATOR_NS = "regmirror-system"
AGENT_NS = "regmirror-node"


def _kubectl_json(cluster: Any, *args: str) -> dict[str, Any] | None:
    result = cluster.kubectl(*args, "-o", "json", check=False)
    return dict(json.loads(result.stdout)) if result.returncode == 0 else None


def _wait_or_fail(predicate: Any, timeout: float, what: str, operator: Any) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; operator log (tail):\n{operator.logs()[-6000:]}")


def read_mirror_objects(cluster: Any, operator: Any, name: str, timeout: float = 90) -> MirrorObjects:
    """Wait for the operator to write a mirror's ConfigMap, Service (with a ClusterIP) and Deployment."""
    from regmirror import naming

    child = naming.child_name(name)

    def children() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]] | None:
        cm = _kubectl_json(cluster, "get", "configmap", child, "-n", OPERATOR_NS)
        svc = _kubectl_json(cluster, "get", "service", child, "-n", OPERATOR_NS)
        deploy = _kubectl_json(cluster, "get", "deployment", child, "-n", OPERATOR_NS)
        if cm and svc and deploy and svc["spec"].get("clusterIP"):
            return cm, svc, deploy
        return None

    cm, svc, deploy = _wait_or_fail(children, timeout, f"the operator's children of {name}", operator)
    container = deploy["spec"]["template"]["spec"]["containers"][0]
    secrets: dict[str, dict[str, str]] = {}
    for var in container.get("env", []):
        ref = (var.get("valueFrom") or {}).get("secretKeyRef")
        if ref and ref["name"] not in secrets:
            secret = _kubectl_json(cluster, "get", "secret", ref["name"], "-n", OPERATOR_NS)
            assert secret is not None, f"Secret {ref['name']} referenced by {child} is missing"
            secrets[ref["name"]] = {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
    port = next(p["port"] for p in svc["spec"]["ports"] if p["name"] == "registry")
    return MirrorObjects(name, cm["data"]["config.yml"], container, secrets, svc["spec"]["clusterIP"], int(port))


def read_node_plan(cluster: Any, operator: Any, names: list[str], timeout: float = 90) -> str:
    """The node plan (ConfigMap regmirror-node/regmirror-node-config, key mirrors.json) once it lists `names`."""
    from regmirror import constants as c

    def plan() -> str | None:
        cm = _kubectl_json(cluster, "get", "configmap", c.NODE_CONFIG_NAME, "-n", AGENT_NS)
        text = ((cm or {}).get("data") or {}).get(c.NODE_CONFIG_KEY)
        if text and set(names) <= {m["name"] for m in json.loads(text).get("mirrors", [])}:
            return str(text)
        return None

    return str(_wait_or_fail(plan, timeout, f"the node plan listing {names}", operator))


def map_plan(plan_json: str, mirrors: Iterable[LoopbackMirror], keep: Iterable[str] | None = None) -> str:
    """The node plan with every mirror's addresses mapped to loopback (and only the mirrors in `keep`)."""
    plan = json.loads(plan_json)
    wanted = set(keep) if keep is not None else None
    for mirror in mirrors:
        plan = map_to_loopback(plan, mirror.mapping)
    plan["mirrors"] = [m for m in plan["mirrors"] if wanted is None or m["name"] in wanted]
    return json.dumps(plan)


def delete_mirrors(cluster: Any, names: list[str], timeout: float = 60) -> None:
    """Delete mirrors and wait (best effort: a stuck finalizer is printed, not fatal, at teardown)."""
    for name in names:
        cluster.kubectl("delete", "registrymirror", name, "--wait=false", "--ignore-not-found", check=False)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(cluster.kubectl("get", "registrymirror", n, check=False).returncode != 0 for n in names):
            return
        time.sleep(0.5)
    print(f"teardown: {names} still present after {timeout}s")


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
