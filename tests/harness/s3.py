"""A real S3-compatible server on loopback for the HA tests: versitygw with its posix back-end.

`S3Server.start(workdir)` builds versitygw once (`make versitygw`,
cached by version under ~/.cache/regmirror), runs it on a free loopback port
with a root key, and creates a bucket through the S3 API itself. The small
SigV4 client here (CreateBucket, ListObjectsV2) is only for the tests' own
set-up and checks; the registry talks to the server through distribution's
s3 driver (aws-sdk-go), as in a cluster.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import hmac
import os
import shutil
import signal
import subprocess
import urllib.error
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

BUILD_TOOL = Path(__file__).resolve().parents[1] / "tools" / "build.sh"
REGION = "us-east-1"
S3_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"


def versitygw_binary() -> tuple[str | None, str]:
    """(path of the versitygw binary, or None) and why not; builds it once (cached)."""
    override = os.environ.get("REGMIRROR_VERSITYGW")
    if override and Path(override).exists():
        return override, ""
    if not shutil.which("go"):
        return None, "no Go toolchain to build versitygw (make versitygw)"
    proc = subprocess.run(["bash", str(BUILD_TOOL), "versitygw"], capture_output=True, text=True, timeout=3000, check=False)
    if proc.returncode != 0:
        return None, f"building versitygw failed: {proc.stderr.strip()[-600:]}"
    return proc.stdout.strip().splitlines()[-1], ""


def _sign(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


@dataclass
class S3Client:
    """Just enough SigV4 for the tests' own requests (path-style, unsigned-payload hashes computed)."""

    endpoint: str
    access_key: str
    secret_key: str
    region: str = REGION

    def request(self, method: str, path: str, query: dict[str, str] | None = None, body: bytes = b"") -> tuple[int, bytes]:
        """One signed request; returns (status, body)."""
        parts = urllib.parse.urlsplit(self.endpoint)
        now = datetime.datetime.now(datetime.UTC)
        amz_date, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
        payload_hash = hashlib.sha256(body).hexdigest()
        canonical_query = "&".join(
            f"{urllib.parse.quote(k, safe='-_.~')}={urllib.parse.quote(v, safe='-_.~')}" for k, v in sorted((query or {}).items())
        )
        headers = {"host": parts.netloc, "x-amz-content-sha256": payload_hash, "x-amz-date": amz_date}
        signed = ";".join(sorted(headers))
        canonical = "\n".join(
            [
                method,
                urllib.parse.quote(path, safe="/-_.~"),
                canonical_query,
                "".join(f"{k}:{headers[k]}\n" for k in sorted(headers)),
                signed,
                payload_hash,
            ]
        )
        scope = f"{day}/{self.region}/s3/aws4_request"
        to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
        key = _sign(_sign(_sign(_sign(f"AWS4{self.secret_key}".encode(), day), self.region), "s3"), "aws4_request")
        signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
        headers["authorization"] = f"AWS4-HMAC-SHA256 Credential={self.access_key}/{scope}, SignedHeaders={signed}, Signature={signature}"
        url = f"{self.endpoint}{urllib.parse.quote(path, safe='/-_.~')}" + (f"?{canonical_query}" if canonical_query else "")
        req = urllib.request.Request(url, data=body if method in ("PUT", "POST") else None, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def create_bucket(self, bucket: str) -> None:
        """CreateBucket; fails the caller with the server's answer."""
        status, body = self.request("PUT", f"/{bucket}")
        if status != 200:
            raise RuntimeError(f"CreateBucket {bucket}: {status} {body[:300]!r}")

    def list_keys(self, bucket: str, prefix: str = "") -> dict[str, int]:
        """Every key under `prefix` with its size (ListObjectsV2, all pages)."""
        keys: dict[str, int] = {}
        token: str | None = None
        while True:
            query = {"list-type": "2", "prefix": prefix}
            if token:
                query["continuation-token"] = token
            status, body = self.request("GET", f"/{bucket}", query)
            if status != 200:
                raise RuntimeError(f"ListObjectsV2 {bucket}: {status} {body[:300]!r}")
            doc = ET.fromstring(body)
            for item in doc.iter(f"{S3_NS}Contents"):
                keys[item.findtext(f"{S3_NS}Key") or ""] = int(item.findtext(f"{S3_NS}Size") or 0)
            if (doc.findtext(f"{S3_NS}IsTruncated") or "false") != "true":
                return keys
            token = doc.findtext(f"{S3_NS}NextContinuationToken")


@dataclass
class S3Server:
    """versitygw serving a posix directory on loopback."""

    binary: str
    workdir: Path
    port: int
    access_key: str = "regmirror-e2e"
    secret_key: str = field(default_factory=lambda: hashlib.sha256(os.urandom(16)).hexdigest()[:40])
    proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def client(self) -> S3Client:
        return S3Client(self.endpoint, self.access_key, self.secret_key)

    @property
    def access_log(self) -> Path:
        return self.workdir / "access.log"

    def requests(self) -> list[str]:
        """Lines of the server's access log (one per S3 request)."""
        return self.access_log.read_text(errors="replace").splitlines() if self.access_log.exists() else []

    def _answers(self) -> bool:
        try:
            status, _ = self.client.request("GET", "/")
        except OSError:
            return False
        return status == 200

    def start_process(self) -> None:
        """Run versitygw (again, after stop(): the same data)."""
        data, meta = self.workdir / "data", self.workdir / "meta"
        data.mkdir(parents=True, exist_ok=True)
        meta.mkdir(parents=True, exist_ok=True)
        log = (self.workdir / "versitygw.log").open("ab")
        argv = [
            self.binary,
            "--port",
            f"127.0.0.1:{self.port}",
            "--region",
            REGION,
            "--access-log",
            str(self.access_log),
            "--quiet",
            "posix",
            # Metadata (ETags, content types, owners) in files beside the data: no xattr support needed.
            "--sidecar",
            str(meta),
            str(data),
        ]
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "ROOT_ACCESS_KEY": self.access_key, "ROOT_SECRET_KEY": self.secret_key}
        self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        from harness.cachepath import wait_for

        wait_for(lambda: self._answers() or self.proc is None or self.proc.poll() is not None, 30, "versitygw")
        if self.proc.poll() is not None:
            raise RuntimeError(f"versitygw exited:\n{(self.workdir / 'versitygw.log').read_text(errors='replace')[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None

    @classmethod
    @contextlib.contextmanager
    def start(cls, workdir: Path, binary: str, bucket: str) -> Iterator[S3Server]:
        """A running server with `bucket` created; stopped (data left in workdir) on exit."""
        from harness.cachepath import free_port

        server = cls(binary, workdir, free_port())
        try:
            server.start_process()
            server.client.create_bucket(bucket)
            yield server
        finally:
            server.stop()
