"""A CNCF distribution registry (Debian's ``docker-registry``) on loopback, and what it served.

``Registry.start`` runs a plain registry (access log on, optional token auth);
``Registry.launch`` runs one from a given command line (the operator's mirror).
``served_requests``/``blob_gets`` read its log; ``ConnectionRecorder`` is an upstream
that only counts who connects.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import re
import socket
import subprocess
import tarfile
import threading
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from harness.dataplane.images import Descriptor
from harness.processes import stop_process
from harness.waiting import WaitTimeout, free_port, wait_for

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

    def blob_gets_logged(self, digests: Iterable[str], at_least: int, *, since: int = 0, timeout: float = 30) -> dict[str, int]:
        """`blob_gets` of the log after offset `since`, once each digest shows at least `at_least` GETs (or at `timeout`).

        A registry logs a request when its handler returns, which can be after
        the client has read the whole body; distribution 2.8 also stores a
        missed blob with a second upstream GET of its own, after the client's
        pull ended. Counting right after a pull can miss those lines. This
        waits for the lines a test expects and returns the counts; the caller
        asserts them (a count above `at_least` is returned as it is).
        """
        wanted = list(digests)

        def counts() -> dict[str, int]:
            return blob_gets(self.requests_log()[since:], wanted)

        with contextlib.suppress(WaitTimeout):
            wait_for(lambda: all(n >= at_least for n in counts().values()), timeout, f"{self.address} to log {at_least} GET(s) per blob")
        return counts()

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
        if self.proc is not None:
            stop_process(self.proc, 10)

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
