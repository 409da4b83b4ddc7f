"""A Docker token service: the ``Bearer realm=...`` of a private registry, users from htpasswd, over https."""

from __future__ import annotations

import base64
import contextlib
import datetime
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

from harness.scripted_http import make_tls


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

    It serves https with a certificate from a throwaway CA (`ca_pem`), like auth.docker.io on another host than the
    registry: the mirror's upstream check sends credentials to a realm on
    another host only over https, so a private upstream's CA reaches the
    mirror the way a user gives it (spec.upstream.tls.caSecretRef).
    """

    workdir: Path
    htpasswd: Path
    host: str = "127.0.0.1"
    port: int = 0
    service: str = "regmirror-test"
    issuer: str = "regmirror-test-issuer"
    ca_pem: bytes = b""  # the CA that signed the serving certificate (PEM)
    requests: list[tuple[str, int]] = field(default_factory=list)  # (user or "", status)

    @property
    def realm(self) -> str:
        """The token endpoint registries send their clients to."""
        return f"https://{self.host}:{self.port}/token"

    def registry_auth(self) -> str:
        """The `auth:` block of a registry config that sends clients here for tokens."""
        return (
            "auth:\n  token:\n"
            f"    realm: {self.realm}\n    service: {self.service}\n    issuer: {self.issuer}\n"
            f"    rootcertbundle: {self.workdir / 'token.crt'}\n"
        )

    @classmethod
    @contextlib.contextmanager
    def start(cls, workdir: Path, htpasswd: Path) -> Iterator[TokenService]:
        """Serve on a free loopback port until the block ends."""
        workdir.mkdir(parents=True, exist_ok=True)
        tls = make_tls(str(workdir))
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
        svc = cls(workdir, htpasswd, ca_pem=tls.ca_pem)

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
            def setup(self) -> None:
                # The handshake runs here, in the connection's own thread, so a client that
                # stalls or rejects the certificate never holds up the accept loop.
                self.request.settimeout(10)
                self.request = tls.server.wrap_socket(self.request, server_side=True)
                super().setup()

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

        class Server(ThreadingHTTPServer):
            def handle_error(self, request: socket.socket | tuple[bytes, socket.socket], client_address: Any) -> None:
                # A client that does not trust the CA (a node falling back to the upstream
                # itself) fails its handshake: expected here, not a traceback on stderr.
                if not isinstance(sys.exc_info()[1], ssl.SSLError | OSError):
                    super().handle_error(request, client_address)

        httpd = Server((svc.host, 0), Handler)
        svc.port = int(httpd.server_address[1])
        thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        try:
            yield svc
        finally:
            httpd.shutdown()
            httpd.server_close()
            thread.join(5)
