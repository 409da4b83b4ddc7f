"""A real Kubernetes control plane on loopback, with kwok standing in for kubelets.

``LocalCluster`` runs etcd, kube-apiserver, kube-controller-manager, kube-scheduler and
kwok from the binaries that ``tests/controlplane/build.sh`` builds (once, cached by
version). Nothing here needs Docker or the network: certificates and keys are generated
in-process, every component listens on 127.0.0.1 on a free port, and all state lives in
one temporary directory that ``stop()`` removes.

The API server runs with real authentication and ``Node,RBAC`` authorization, so code
under test can be run with nothing but its own ServiceAccount's rights
(``service_account_kubeconfig``). Every request is written to a JSON-lines audit log
(``audit_events``), so tests and benchmarks can count the writes each user made.

Components run in their own process groups (a Ctrl-C in a terminal reaches only the
Python process, which then shuts the cluster down in order) and are asked by the kernel
to die with the thread that started them, so a killed test run leaves no strays.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import ctypes
import datetime
import http.client
import ipaddress
import json
import logging
import os
import secrets
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from harness.proxy import TcpRelay
from harness.waiting import WaitTimeout, free_ports, wait_for

REPO_ROOT = Path(__file__).resolve().parents[2]
CONTROLPLANE_SRC = REPO_ROOT / "tests" / "controlplane"
BUILD_SCRIPT = CONTROLPLANE_SRC / "build.sh"
VERSIONS_FILE = CONTROLPLANE_SRC / "versions.env"

#: Service CIDR of the cluster; its first address is the ``kubernetes`` Service.
SERVICE_CIDR = "10.96.0.0/16"
#: Each fake node gets its own /24 pod CIDR out of this range, so pod IPs are unique
#: across any realistic number of nodes (kwok's global default pool is one /24).
POD_CIDR = "10.128.0.0/9"
#: Fake node InternalIPs are handed out from here, one per node.
NODE_IP_BASE = ipaddress.ip_address("172.16.0.1")
#: kwok manages exactly the nodes carrying this annotation.
FAKE_NODE_ANNOTATION = ("kwok.x-k8s.io/node", "fake")
#: The StorageClass kwok's volume stages act on (their CEL selectors name it).
KWOK_STORAGE_CLASS = "kwok-volume"
ZONES = ("local-1a", "local-1b", "local-1c")
REGION = "local-1"
INSTANCE_TYPE = "kwok.32xlarge"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
ADMIN_USER = "regmirror-admin"
KWOK_USER = "kwok-controller"

_log = logging.getLogger("harness.cluster")

# Logged at Metadata (who did what to which object, no bodies), once per request at
# ResponseComplete (and ResponseStarted for watches): enough to count writes per user.
# A mirror's status writes also carry their body (status holds no secret), so a test that
# counts too many can say what each one changed (audit.summary).
AUDIT_POLICY = """\
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived"]
rules:
- level: Request
  verbs: ["patch", "update"]
  resources:
  - group: "regmirror.dev"
    resources: ["registrymirrors/status"]
- level: Metadata
"""

WRITE_VERBS = frozenset({"create", "update", "patch", "delete", "deletecollection"})


class ControlPlaneError(RuntimeError):
    """The control plane could not be built, found, started or queried."""


class ApiError(ControlPlaneError):
    """The API server answered a harness request with an error status."""

    def __init__(self, method: str, path: str, status: int, body: str) -> None:
        super().__init__(f"{method} {path} -> HTTP {status}: {body[:2000]}")
        self.status = status
        self.body = body


class KubectlError(subprocess.CalledProcessError):
    """``kubectl`` failed; unlike CalledProcessError, ``str()`` shows its stderr."""

    def __str__(self) -> str:
        return f"{super().__str__()}\nstdout: {self.stdout}\nstderr: {self.stderr}"


# --------------------------------------------------------------------------- binaries


def read_versions() -> dict[str, str]:
    """The pinned component versions from ``tests/controlplane/versions.env``."""
    versions: dict[str, str] = {}
    for line in VERSIONS_FILE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            versions[key.strip()] = value.strip().strip("'\"")
    return versions


_controlplane_dir: Path | None = None


def find_controlplane_dir() -> Path:
    """Directory holding ``bin/`` and ``stages/``: ``$REGMIRROR_CONTROLPLANE_DIR``, or
    whatever ``build.sh`` prints last (it builds on first use, then returns at once)."""
    global _controlplane_dir
    if _controlplane_dir is not None:
        return _controlplane_dir
    override = os.environ.get("REGMIRROR_CONTROLPLANE_DIR")
    if override:
        found = Path(override)
    else:
        try:
            # stderr is inherited: a cold build takes many minutes and says what it does.
            result = subprocess.run(["bash", str(BUILD_SCRIPT)], stdout=subprocess.PIPE, text=True, check=False)
        except OSError as exc:
            raise ControlPlaneError(f"cannot run {BUILD_SCRIPT}: {exc}") from exc
        lines = result.stdout.strip().splitlines()
        if result.returncode != 0 or not lines:
            raise ControlPlaneError(
                f"{BUILD_SCRIPT} failed (exit {result.returncode}); its output is above. "
                "It needs Go and access to the Go module proxy on first use."
            )
        found = Path(lines[-1])
    missing = [
        p
        for p in (
            "bin/etcd",
            "bin/kube-apiserver",
            "bin/kube-controller-manager",
            "bin/kube-scheduler",
            "bin/kubectl",
            "bin/kwok",
            "stages",
        )
        if not (found / p).exists()
    ]
    if missing:
        raise ControlPlaneError(f"control plane dir {found} lacks {', '.join(missing)}")
    _controlplane_dir = found
    return found


# --------------------------------------------------------------------------- certificates


def _generate_pki(directory: Path) -> dict[str, Path]:
    """CA, API server serving cert and ServiceAccount signing key pair, as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    not_before = now - datetime.timedelta(hours=1)
    not_after = now + datetime.timedelta(days=30)

    def private_pem(key: Any) -> bytes:
        pem: bytes = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return pem

    # ECDSA for the TLS keys: generating them is instant, unlike RSA.
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "regmirror-local-ca")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    first_service_ip = ipaddress.IPv4Network(SERVICE_CIDR)[1]
    serving_key = ec.generate_private_key(ec.SECP256R1())
    serving_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]))
        .issuer_name(ca_name)
        .public_key(serving_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.DNSName("kubernetes"),
                    x509.DNSName("kubernetes.default"),
                    x509.DNSName("kubernetes.default.svc"),
                    x509.DNSName("kubernetes.default.svc.cluster.local"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.IPAddress(first_service_ip),
                ]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )

    # ServiceAccount tokens are signed with RSA (RS256), what every real cluster uses.
    sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    files = {
        "ca.crt": ca_cert.public_bytes(serialization.Encoding.PEM),
        "ca.key": private_pem(ca_key),
        "apiserver.crt": serving_cert.public_bytes(serialization.Encoding.PEM),
        "apiserver.key": private_pem(serving_key),
        "sa.key": private_pem(sa_key),
        "sa.pub": sa_key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
    }
    paths: dict[str, Path] = {}
    for name, data in files.items():
        path = directory / name
        path.write_bytes(data)
        path.chmod(0o600 if name.endswith(".key") else 0o644)
        paths[name] = path
    return paths


# --------------------------------------------------------------------------- processes


def _die_with_parent_hook() -> Callable[[], None] | None:
    """preexec_fn asking Linux to SIGKILL the child when the starting thread dies."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return None
    pr_set_pdeathsig = 1

    def hook() -> None:
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)

    return hook


_DIE_WITH_PARENT = _die_with_parent_hook()


@dataclass
class _Component:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    log_file: IO[bytes]
    argv: list[str]
    env: dict[str, str]

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, sig)

    def reap(self, deadline: float) -> None:
        """Wait (until ``deadline``) for the exit a signal asked for, then SIGKILL the group and close the log."""
        try:
            self.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _log.warning("%s ignored SIGTERM; killing it", self.name)
        # The whole group, in case a component ever forks helpers.
        self.signal_group(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=5)
        self.log_file.close()


def _kubeconfig_yaml(server: str, ca_pem: bytes, user: str, token: str) -> str:
    ca_data = base64.b64encode(ca_pem).decode()
    return f"""\
apiVersion: v1
kind: Config
clusters:
- name: regmirror-local
  cluster:
    server: {server}
    certificate-authority-data: {ca_data}
users:
- name: {user}
  user:
    token: {token}
contexts:
- name: regmirror-local
  context:
    cluster: regmirror-local
    user: {user}
current-context: regmirror-local
"""


TMP_ROOT = "/tmp"
DIR_PREFIX = "regmirror-cluster-"
OWNER_FILE = "owner.pid"
KEPT_FILE = "KEPT"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sweep_abandoned_dirs() -> None:
    """Remove cluster dirs whose owning process is gone without cleaning up (it was
    SIGKILLed: its components died with it, its files did not). Kept dirs stay."""
    for path in Path(TMP_ROOT).glob(DIR_PREFIX + "*"):
        owner = path / OWNER_FILE
        if (path / KEPT_FILE).exists() or not owner.is_file():
            continue
        try:
            pid = int(owner.read_text().strip())
        except (OSError, ValueError):
            continue
        if not _pid_alive(pid):
            shutil.rmtree(path, ignore_errors=True)


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


# --------------------------------------------------------------------------- the cluster


class LocalCluster:
    """etcd + kube-apiserver + kube-controller-manager + kube-scheduler + kwok on loopback.

    Use as a context manager, or call ``start()``/``stop()``. ``nodes`` fake nodes are
    added (and Ready) before ``start()`` returns. ``keep`` (or ``REGMIRROR_KEEP_CLUSTER=1``)
    leaves the temporary directory with all logs behind after ``stop()``.

    Start it from the thread that will outlive it (normally the main thread): the
    components are told to die with the thread that started them.
    """

    def __init__(
        self,
        nodes: int = 0,
        *,
        keep: bool | None = None,
        controlplane_dir: Path | str | None = None,
        start_timeout: float = 60.0,
        stop_grace: float = 5.0,
    ) -> None:
        self.initial_nodes = nodes
        self.keep = _truthy(os.environ.get("REGMIRROR_KEEP_CLUSTER")) if keep is None else keep
        self._controlplane_dir = Path(controlplane_dir) if controlplane_dir else None
        self.start_timeout = start_timeout
        self.stop_grace = stop_grace
        self.versions = read_versions()

        self.dir: Path | None = None
        self.server = ""
        self.port = 0
        self._components: list[_Component] = []
        self._paused: dict[str, _Component] = {}  # stopped on purpose by stop_component
        self._relays: list[TcpRelay] = []
        self._admin_token = ""
        self._ssl: ssl.SSLContext | None = None
        self._connections = threading.local()
        self._node_seq = 0
        self._node_counts: dict[str, int] = {}
        self._started = False
        self._stopped = False
        self.startup_seconds = 0.0

    # ----------------------------------------------------------------- paths and env

    @property
    def controlplane_dir(self) -> Path:
        if self._controlplane_dir is None:
            self._controlplane_dir = find_controlplane_dir()
        return self._controlplane_dir

    @property
    def bin_dir(self) -> Path:
        return self.controlplane_dir / "bin"

    @property
    def kubectl_path(self) -> Path:
        return self.bin_dir / "kubectl"

    def _path(self, *parts: str) -> Path:
        if self.dir is None:
            raise ControlPlaneError("cluster not started")
        return self.dir.joinpath(*parts)

    @property
    def kubeconfig(self) -> Path:
        """Admin kubeconfig (group system:masters, bearer token)."""
        return self._path("kubeconfig")

    @property
    def log_dir(self) -> Path:
        return self._path("logs")

    @property
    def audit_log(self) -> Path:
        return self._path("logs", "audit.jsonl")

    @property
    def ca_cert(self) -> Path:
        return self._path("pki", "ca.crt")

    def env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """Environment for subprocesses: admin ``KUBECONFIG`` and the matching kubectl
        first on ``PATH``; loopback never goes through a proxy."""
        env = dict(os.environ if base is None else base)
        env["KUBECONFIG"] = str(self.kubeconfig)
        env["PATH"] = os.pathsep.join(filter(None, [str(self.bin_dir), env.get("PATH")]))
        for key in ("NO_PROXY", "no_proxy"):
            env[key] = ",".join(filter(None, [env.get(key), "127.0.0.1,localhost"]))
        return env

    # ----------------------------------------------------------------- lifecycle

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<LocalCluster {self.server or 'not started'} dir={self.dir}>"

    def start(self) -> LocalCluster:
        """Start every component and wait until the cluster does real work."""
        if self._started:
            raise ControlPlaneError("LocalCluster.start() called twice")
        self._started = True
        began = time.monotonic()
        atexit.register(self.stop)
        try:
            self._start()
            if self.initial_nodes:
                self.add_nodes(self.initial_nodes)
        except BaseException as exc:
            # Includes KeyboardInterrupt: never leave half a cluster behind. A real
            # failure keeps the directory, so the logs named in the error still exist.
            if isinstance(exc, ControlPlaneError):
                self.keep = True
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - began
        _log.info("cluster ready at %s in %.1fs (%s)", self.server, self.startup_seconds, self.dir)
        return self

    def _start(self) -> None:
        bin_dir = self.bin_dir
        _sweep_abandoned_dirs()
        self.dir = Path(tempfile.mkdtemp(prefix=DIR_PREFIX, dir=TMP_ROOT))
        self._path(OWNER_FILE).write_text(f"{os.getpid()}\n")
        for sub in ("pki", "logs", "etcd", "apiserver", "kcm", "scheduler", "kwok-home"):
            self._path(sub).mkdir()
        pki = _generate_pki(self._path("pki"))
        etcd_port, etcd_peer_port, api_port, kcm_port, sched_port = free_ports(5)
        self.port = api_port
        self.server = f"https://127.0.0.1:{api_port}"
        ca_pem = pki["ca.crt"].read_bytes()
        self._ssl = ssl.create_default_context(cafile=str(pki["ca.crt"]))

        # One bearer token per identity. The scheduler and controller-manager use their
        # standard usernames, so the bootstrap RBAC roles (not system:masters) apply.
        identities = {
            "admin": (ADMIN_USER, "system:masters"),
            "kcm": ("system:kube-controller-manager", ""),
            "scheduler": ("system:kube-scheduler", ""),
            "kwok": (KWOK_USER, "system:masters"),
        }
        tokens = {key: secrets.token_hex(24) for key in identities}
        self._admin_token = tokens["admin"]
        self._path("tokens.csv").write_text(
            "".join(f'{tokens[key]},{user},{user},"{groups}"\n' for key, (user, groups) in identities.items())
        )
        self._path("tokens.csv").chmod(0o600)
        kubeconfigs = {}
        for key, (user, _) in identities.items():
            path = self._path("kubeconfig" if key == "admin" else f"{key}.kubeconfig")
            path.write_text(_kubeconfig_yaml(self.server, ca_pem, user, tokens[key]))
            path.chmod(0o600)
            kubeconfigs[key] = path
        self._path("audit-policy.yaml").write_text(AUDIT_POLICY)

        etcd_url = f"http://127.0.0.1:{etcd_port}"
        peer_url = f"http://127.0.0.1:{etcd_peer_port}"
        etcd_args = [
            "--name=default",
            f"--data-dir={self._path('etcd')}",
            f"--listen-client-urls={etcd_url}",
            f"--advertise-client-urls={etcd_url}",
            f"--listen-peer-urls={peer_url}",
            f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=default={peer_url}",
            "--initial-cluster-state=new",
            "--log-level=warn",
        ]
        if self._etcd_supports("--unsafe-no-fsync"):
            etcd_args.append("--unsafe-no-fsync")  # throwaway data: trade durability for speed
        self._spawn("etcd", [str(bin_dir / "etcd"), *etcd_args])
        self._wait("etcd /health", lambda: self._http_ok(f"{etcd_url}/health"))

        self._spawn(
            "kube-apiserver",
            [
                str(bin_dir / "kube-apiserver"),
                f"--etcd-servers={etcd_url}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                # 1.37 refuses a loopback advertise address with the lease endpoint
                # reconciler; nothing in-cluster dials the `kubernetes` Service here.
                "--endpoint-reconciler-type=none",
                f"--secure-port={api_port}",
                f"--cert-dir={self._path('apiserver')}",
                f"--tls-cert-file={pki['apiserver.crt']}",
                f"--tls-private-key-file={pki['apiserver.key']}",
                f"--client-ca-file={pki['ca.crt']}",
                f"--token-auth-file={self._path('tokens.csv')}",
                f"--service-account-key-file={pki['sa.pub']}",
                f"--service-account-signing-key-file={pki['sa.key']}",
                f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
                "--authorization-mode=Node,RBAC",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                # The default plugin set (incl. PodSecurity, DefaultStorageClass,
                # ServiceAccount, ResourceQuota, webhooks) plus what real clusters add.
                "--enable-admission-plugins=NodeRestriction",
                "--allow-privileged=true",
                f"--audit-policy-file={self._path('audit-policy.yaml')}",
                f"--audit-log-path={self.audit_log}",
                "--audit-log-format=json",
                "--audit-log-mode=blocking",  # written before the response: no lag to count
                "--audit-log-maxsize=0",
                "--profiling=false",
            ],
        )
        self._wait("kube-apiserver /readyz", lambda: self._api_ok("/readyz"))

        self._ensure_storage_class()

        qps = ["--kube-api-qps=1000", "--kube-api-burst=2000"]  # never the bottleneck
        self._spawn(
            "kube-controller-manager",
            [
                str(bin_dir / "kube-controller-manager"),
                f"--kubeconfig={kubeconfigs['kcm']}",
                f"--service-account-private-key-file={pki['sa.key']}",
                f"--root-ca-file={pki['ca.crt']}",
                "--use-service-account-credentials=true",
                f"--cluster-signing-cert-file={pki['ca.crt']}",
                f"--cluster-signing-key-file={pki['ca.key']}",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                f"--secure-port={kcm_port}",
                f"--cert-dir={self._path('kcm')}",
                "--cluster-name=regmirror-local",
                # kwok marks a pod Ready only once, while it is Pending: a pod the node lifecycle
                # controller marks NotReady (its node's lease went stale for 50 s, e.g. while
                # kube-apiserver was stopped on purpose or the machine was starved) would stay
                # NotReady for good. Fake nodes never fail, so give them far longer than any
                # outage a test makes.
                "--node-monitor-grace-period=15m",
                *qps,
            ],
        )
        self._spawn(
            "kube-scheduler",
            [
                str(bin_dir / "kube-scheduler"),
                f"--kubeconfig={kubeconfigs['scheduler']}",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                f"--secure-port={sched_port}",
                f"--cert-dir={self._path('scheduler')}",
                *qps,
            ],
        )
        kwok_args = [
            str(bin_dir / "kwok"),
            f"--kubeconfig={kubeconfigs['kwok']}",
            "--manage-all-nodes=false",
            "--manage-nodes-with-annotation-selector={}={}".format(*FAKE_NODE_ANNOTATION),
            # Fallback only: every fake node gets its own spec.podCIDR (see add_nodes).
            "--cidr=10.0.0.0/16",
            "--node-lease-duration-seconds=40",
        ]
        kwok_args += [f"--config={path}" for path in self._kwok_stage_files()]
        # kwok also reads ~/.kwok/kwok.yaml when present; give it an empty home.
        self._spawn("kwok", kwok_args, env={"HOME": str(self._path("kwok-home"))})

        self._wait(
            "kube-controller-manager (default ServiceAccount)",
            lambda: self._api_ok("/api/v1/namespaces/default/serviceaccounts/default"),
        )
        self._wait(
            "kube-scheduler /healthz",
            lambda: self._http_ok(f"https://127.0.0.1:{sched_port}/healthz", insecure=True),
        )

    def stop(self) -> None:
        """Stop every component (SIGTERM, then SIGKILL) and remove the temporary dir."""
        if self._stopped:
            return
        self._stopped = True
        atexit.unregister(self.stop)
        for relay in self._relays:
            relay.stop()
        # Clients first, then the API server, then etcd: an API server whose etcd is
        # already gone spends its whole grace period retrying instead of exiting (~1 s).
        servers = {"kube-apiserver": 1, "etcd": 2}
        for phase in (0, 1, 2):
            batch = [c for c in self._components if servers.get(c.name, 0) == phase]
            for component in batch:
                component.signal_group(signal.SIGTERM)
            deadline = time.monotonic() + self.stop_grace
            for component in batch:
                component.reap(deadline)
        if self.dir is not None:
            if self.keep:
                self._path(KEPT_FILE).touch()
                print(
                    f"harness: kept cluster dir {self.dir} (logs in {self.dir / 'logs'})",
                    file=sys.stderr,
                )
            else:
                shutil.rmtree(self.dir, ignore_errors=True)

    # ----------------------------------------------------------------- process helpers

    def _etcd_supports(self, flag: str) -> bool:
        result = subprocess.run(
            [str(self.bin_dir / "etcd"), "--help"],
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        )
        return flag in result.stdout + result.stderr

    def _spawn(self, name: str, argv: list[str], env: Mapping[str, str] | None = None) -> None:
        log_path = self._path("logs", f"{name}.log")
        log_file = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        log_file.write(("$ " + " ".join(argv) + "\n").encode())
        log_file.flush()
        proc_env = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG",)}
        proc_env.update(env or {})
        self._launch(name, argv, proc_env, log_path, log_file)

    def _launch(self, name: str, argv: list[str], proc_env: dict[str, str], log_path: Path, log_file: IO[bytes]) -> None:
        popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=proc_env,
            cwd=self.dir,
            start_new_session=True,
            preexec_fn=_DIE_WITH_PARENT,
        )
        self._components.append(_Component(name, popen, log_path, log_file, argv, proc_env))

    # ----------------------------------------------------------------- faults

    def _component(self, name: str) -> _Component:
        for component in self._components:
            if component.name == name:
                return component
        raise ControlPlaneError(f"no running component {name!r}")

    def stop_component(self, name: str, sig: int = signal.SIGTERM) -> None:
        """Stop one component (``sig``, then SIGKILL after the grace period); ``start_component`` brings it back."""
        component = self._component(name)
        self._components.remove(component)
        self._paused[name] = component
        component.signal_group(sig)
        component.reap(time.monotonic() + self.stop_grace)

    def start_component(self, name: str) -> None:
        """Start a component stopped by ``stop_component`` again, with the same command line and ports."""
        stopped = self._paused.pop(name, None)
        if stopped is None:
            raise ControlPlaneError(f"{name} was not stopped by stop_component")
        log_file = open(stopped.log_path, "ab")  # noqa: SIM115 - closed in stop()
        log_file.write(f"$ restarted at {time.strftime('%H:%M:%S')}\n".encode())
        log_file.flush()
        self._launch(name, stopped.argv, stopped.env, stopped.log_path, log_file)

    def open_relay(self) -> TcpRelay:
        """A TCP relay to the API server for one client (see ``harness.proxy``); stopping
        and starting the API server closes and reopens it, as it would the API server's port."""
        relay = TcpRelay("127.0.0.1", self.port)
        self._relays.append(relay)
        return relay

    def stop_apiserver(self, sig: int = signal.SIGTERM) -> None:
        """Stop kube-apiserver alone (etcd, controllers, scheduler and kwok keep running)."""
        self.stop_component("kube-apiserver", sig)
        self._connections.conn = None
        for relay in self._relays:
            relay.upstream_down()

    def start_apiserver(self, timeout: float = 60.0) -> None:
        """Start the stopped kube-apiserver on its old port and wait until it is ready."""
        self.start_component("kube-apiserver")
        self._wait("kube-apiserver /readyz after a restart", lambda: self._api_ok("/readyz"), timeout=timeout)
        for relay in self._relays:
            relay.upstream_up()

    def restart_apiserver(self, sig: int = signal.SIGTERM) -> None:
        """Stop kube-apiserver and start it again at once; returns when it is ready."""
        self.stop_apiserver(sig)
        self.start_apiserver()

    @property
    def apiserver_running(self) -> bool:
        """Whether kube-apiserver runs (False between ``stop_apiserver`` and ``start_apiserver``)."""
        return "kube-apiserver" not in self._paused

    def check_alive(self) -> None:
        """Raise ``ControlPlaneError`` (with its log tail) if any component has exited."""
        for component in self._components:
            if not component.alive():
                raise ControlPlaneError(
                    f"{component.name} exited with code {component.popen.returncode}; "
                    f"last lines of {component.log_path}:\n{component.log_tail()}"
                )

    def _wait(self, what: str, ready: Callable[[], bool], timeout: float | None = None) -> None:
        """Poll ``ready`` until true, failing fast (``ControlPlaneError``) if any component dies."""
        try:
            self.wait_until(ready, timeout=timeout or self.start_timeout, what=what)
        except WaitTimeout as exc:
            raise ControlPlaneError(str(exc)) from None

    def _log_tails(self) -> str:
        return "\n".join(f"--- {c.name} ({c.log_path}):\n{c.log_tail(15)}" for c in self._components)

    def wait_until(self, predicate: Callable[[], Any], *, timeout: float = 60.0, what: str = "condition") -> Any:
        """Poll ``predicate`` until it returns something truthy, and return that; raise
        ``WaitTimeout`` (with every component's log tail) on timeout, or
        ``ControlPlaneError`` as soon as a component dies."""

        def alive_and(predicate: Callable[[], Any]) -> Any:
            self.check_alive()
            return predicate()

        return wait_for(lambda: alive_and(predicate), timeout, what, diagnose=self._log_tails)

    def component_pids(self) -> dict[str, int]:
        """PID of every running component, by name (for RSS measurements)."""
        return {c.name: c.popen.pid for c in self._components if c.alive()}

    def _kwok_stage_files(self) -> list[Path]:
        # kwok v0.8.0 takes each Stage file with its own --config (a directory would
        # need a kustomization.yaml, which build.sh drops). Non-Stage documents (the
        # volume stage's StorageClass) are created through the API instead.
        stages = sorted((self.controlplane_dir / "stages").rglob("*.yaml"))
        return [p for p in stages if "kind: Stage" in p.read_text()]

    def _ensure_storage_class(self) -> None:
        """``kwok-volume`` as the default StorageClass: kwok's volume stages provision
        and bind PVCs of this class, so PVCs become Bound with no real provisioner."""
        body = {
            "apiVersion": "storage.k8s.io/v1",
            "kind": "StorageClass",
            "metadata": {
                "name": KWOK_STORAGE_CLASS,
                "annotations": {"storageclass.kubernetes.io/is-default-class": "true"},
            },
            "provisioner": "kwok.x-k8s.io/volume",
            "reclaimPolicy": "Delete",
            "volumeBindingMode": "Immediate",
            "allowVolumeExpansion": True,
        }
        self.api("POST", "/apis/storage.k8s.io/v1/storageclasses", body)

    # ----------------------------------------------------------------- HTTP

    def _http_ok(self, url: str, insecure: bool = False) -> bool:
        context = None
        if url.startswith("https"):
            context = ssl.create_default_context()
            if insecure:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
        try:
            handler = urllib.request.HTTPSHandler(context=context)
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), handler)
            with opener.open(url, timeout=2) as response:
                return bool(response.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    def _api_ok(self, path: str) -> bool:
        try:
            self.api("GET", path)
            return True
        except (ApiError, OSError, http.client.HTTPException):
            return False

    def api(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        content_type: str = "application/json",
        token: str | None = None,
        timeout: float = 30.0,
    ) -> Any:
        """One raw API request as admin (or with ``token``); returns the decoded JSON
        (or text). Raises ``ApiError`` on an HTTP error status."""
        data = None
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers = {"Authorization": f"Bearer {token or self._admin_token}", "Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = content_type
        # One kept-alive connection per thread: a TLS handshake per request would make
        # creating a thousand nodes take ~20 s instead of a few.
        for attempt in (1, 2):
            conn = getattr(self._connections, "conn", None)
            reused = conn is not None
            if conn is None:
                conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=self._ssl, timeout=timeout)
                self._connections.conn = conn
            try:
                if conn.sock is not None:
                    conn.sock.settimeout(timeout)
                conn.request(method, path, body=data, headers=headers)
                response = conn.getresponse()
                raw = response.read()
                break
            except (http.client.HTTPException, OSError):
                conn.close()
                self._connections.conn = None
                # Retry only when the server closed an idle kept-alive connection.
                if not reused or attempt == 2:
                    raise
        text = raw.decode(errors="replace")
        if response.status >= 400:
            raise ApiError(method, path, response.status, text)
        try:
            return json.loads(text)
        except ValueError:
            return text

    def stream(self, path: str, *, timeout: float = 330.0) -> Iterator[bytes]:
        """Lines of a streaming GET as admin (a watch: ``...?watch=1``), on a connection of its own.

        Ends when the server ends the response; raises ``ApiError`` for an error status and
        ``OSError`` when the connection fails (e.g. the API server is down).
        """
        conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=self._ssl, timeout=timeout)
        try:
            conn.request("GET", path, headers={"Authorization": f"Bearer {self._admin_token}", "Accept": "application/json"})
            response = conn.getresponse()
            if response.status >= 400:
                raise ApiError("GET", path, response.status, response.read().decode(errors="replace"))
            while line := response.readline():
                yield line
        finally:
            conn.close()

    def api_client(self) -> Any:
        """An admin ``kubernetes.client.ApiClient`` (needs the ``kubernetes`` package)."""
        from kubernetes import config

        return config.new_client_from_config(config_file=str(self.kubeconfig))

    # ----------------------------------------------------------------- kubectl

    def kubectl(
        self,
        *args: str,
        check: bool = True,
        input: str | bytes | Mapping[str, Any] | list[Any] | None = None,
        timeout: float = 120.0,
    ) -> subprocess.CompletedProcess[str]:
        """Run the version-matched kubectl as admin. ``input`` may be text or an object
        (sent as JSON, e.g. to ``apply -f -``). Raises ``KubectlError`` if ``check``."""
        if isinstance(input, (Mapping, list)):
            input = json.dumps(input)
        elif isinstance(input, bytes):
            input = input.decode()
        argv = [str(self.kubectl_path), *args]
        result = subprocess.run(
            argv,
            input=input,
            capture_output=True,
            text=True,
            env=self.env(),
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise KubectlError(result.returncode, argv, result.stdout, result.stderr)
        return result

    def kubectl_json(self, *args: str) -> Any:
        """``kubectl <args> -o json``, decoded."""
        return json.loads(self.kubectl(*args, "-o", "json").stdout)

    # ----------------------------------------------------------------- nodes

    def add_nodes(
        self,
        n: int,
        prefix: str = "kwok-node-",
        labels: Mapping[str, str] | None = None,
        *,
        wait: bool = True,
        timeout: float = 120.0,
    ) -> list[str]:
        """Create ``n`` fake nodes that kwok runs, spread over three zones, and (by
        default) wait until all are Ready and schedulable. Returns their names."""
        names = []
        first = self._node_counts.get(prefix, 0)
        for i in range(first, first + n):
            name = f"{prefix}{i}"
            seq = self._node_seq
            self._node_seq += 1
            body = self._node_body(name, seq, self._pod_cidr(seq), labels)
            self.api("POST", "/api/v1/nodes", body)
            names.append(name)
        self._node_counts[prefix] = first + n
        if wait:
            self.wait_nodes_ready(names, timeout=timeout)
        return names

    @staticmethod
    def _pod_cidr(seq: int) -> str:
        network = ipaddress.ip_network(POD_CIDR)
        return f"{network.network_address + seq * 256}/24"

    def _node_body(self, name: str, seq: int, pod_cidr: str, labels: Mapping[str, str] | None) -> dict[str, Any]:
        resources = {"cpu": "32", "memory": "256Gi", "pods": "110", "ephemeral-storage": "1Ti"}
        return {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": name,
                "annotations": {
                    FAKE_NODE_ANNOTATION[0]: FAKE_NODE_ANNOTATION[1],
                    "node.alpha.kubernetes.io/ttl": "0",
                },
                "labels": {
                    "kubernetes.io/hostname": name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                    "node.kubernetes.io/instance-type": INSTANCE_TYPE,
                    "topology.kubernetes.io/region": REGION,
                    "topology.kubernetes.io/zone": ZONES[seq % len(ZONES)],
                    **(labels or {}),
                },
            },
            "spec": {"podCIDR": pod_cidr, "podCIDRs": [pod_cidr]},
            "status": {
                "allocatable": resources,
                "capacity": resources,
                "addresses": [
                    {"type": "InternalIP", "address": str(NODE_IP_BASE + seq)},
                    {"type": "Hostname", "address": name},
                ],
                "nodeInfo": {
                    "architecture": "amd64",
                    "operatingSystem": "linux",
                    "kubeletVersion": self.versions.get("KUBERNETES_VERSION", ""),
                },
            },
        }

    def delete_nodes(self, names: Iterable[str], timeout: float = 120.0) -> None:
        """Delete fake nodes and wait until they and the pods bound to them are gone."""
        wanted = set(names)
        for name in wanted:
            with contextlib.suppress(ApiError):
                self.api("DELETE", f"/api/v1/nodes/{name}")
        # No kubelet will confirm these pods are gone, and the pod GC waits 40 s before it
        # collects a deleted node's pods: remove them at once, as an admin would.
        for pod in self.api("GET", "/api/v1/pods")["items"]:
            if pod.get("spec", {}).get("nodeName") in wanted:
                meta = pod["metadata"]
                with contextlib.suppress(ApiError):
                    self.api("DELETE", f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}?gracePeriodSeconds=0")

        def gone() -> bool:
            nodes = {n["metadata"]["name"] for n in self.api("GET", "/api/v1/nodes")["items"]}
            pods = self.api("GET", "/api/v1/pods")["items"]
            return not (wanted & nodes) and not any(p.get("spec", {}).get("nodeName") in wanted for p in pods)

        self._wait(f"{len(wanted)} node(s) and their pods to be gone", gone, timeout=timeout)

    def fake_nodes(self) -> list[dict[str, Any]]:
        """All nodes kwok manages."""
        items = self.api("GET", "/api/v1/nodes")["items"]
        key, value = FAKE_NODE_ANNOTATION
        return [n for n in items if n["metadata"].get("annotations", {}).get(key) == value]

    def wait_nodes_ready(self, names: Iterable[str], timeout: float = 120.0) -> None:
        """Wait until the named nodes are Ready and carry no not-ready taint."""
        wanted = set(names)

        def all_ready() -> bool:
            items = self.api("GET", "/api/v1/nodes")["items"]
            ready = {n["metadata"]["name"] for n in items if _node_schedulable(n)}
            return wanted <= ready

        self._wait(f"{len(wanted)} node(s) Ready", all_ready, timeout=timeout)

    # ----------------------------------------------------------------- identities

    def service_account_kubeconfig(self, namespace: str, name: str, *, expiration_seconds: int = 86400, server: str | None = None) -> Path:
        """A kubeconfig acting as ServiceAccount ``namespace/name`` (token from the
        TokenRequest API), to run code with exactly that account's RBAC rights.
        ``server`` replaces the API server's URL (e.g. a relay in between)."""
        request = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {"expirationSeconds": expiration_seconds},
        }
        path = f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token"
        token = self.api("POST", path, request)["status"]["token"]
        out = self._path(f"kubeconfig-{namespace}-{name}" + ("-relayed" if server else ""))
        user = f"system:serviceaccount:{namespace}:{name}"
        out.write_text(_kubeconfig_yaml(server or self.server, self.ca_cert.read_bytes(), user, token))
        out.chmod(0o600)
        return out

    # ----------------------------------------------------------------- audit

    def audit_events(
        self,
        *,
        user: str | None = None,
        verbs: Iterable[str] | None = None,
        since: str | None = None,
    ) -> list[dict[str, Any]]:
        """Audit events so far (one per request; watches also log ResponseStarted),
        optionally only those of ``user``, with a verb in ``verbs``, or whose
        ``requestReceivedTimestamp`` is at or after ``since`` (RFC 3339)."""
        verb_set = set(verbs) if verbs is not None else None
        events = []
        with open(self.audit_log, encoding="utf-8") as f:
            for line in f:
                try:
                    event = json.loads(line)
                except ValueError:
                    continue  # a line still being written
                if user is not None and event.get("user", {}).get("username") != user:
                    continue
                if verb_set is not None and event.get("verb") not in verb_set:
                    continue
                if since is not None and event.get("requestReceivedTimestamp", "") < since:
                    continue
                events.append(event)
        return events

    def write_events(self, user: str, since: str | None = None) -> list[dict[str, Any]]:
        """Completed mutating requests made by ``user``."""
        return [e for e in self.audit_events(user=user, verbs=WRITE_VERBS, since=since) if e.get("stage") == "ResponseComplete"]

    # ----------------------------------------------------------------- debugging

    def logs(self, component: str) -> str:
        """The full log of one component (``etcd``, ``kube-apiserver``, ..., ``kwok``)."""
        return self._path("logs", f"{component}.log").read_text(errors="replace")

    def iter_components(self) -> Iterator[tuple[str, int, Path]]:
        for c in self._components:
            yield c.name, c.popen.pid, c.log_path


def _node_schedulable(node: Mapping[str, Any]) -> bool:
    conditions = node.get("status", {}).get("conditions") or []
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)
    taints = node.get("spec", {}).get("taints") or []
    not_ready_taint = any(t.get("key") == "node.kubernetes.io/not-ready" for t in taints)
    return ready and not not_ready_taint
