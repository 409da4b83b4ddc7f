"""check_upstream against a real registry: CNCF distribution (Debian's docker-registry) on loopback.

The unit tests script every byte; these make sure the handshake reads what
distribution really says: its htpasswd (Basic) challenge, and its token
(Bearer) challenge pointing at a token service, over https on another host
like Docker Hub's auth.docker.io, or over plain http where the credentials
must not go.
"""

from __future__ import annotations

import base64
import contextlib
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from _dataplane import Registry, ensure_commands, htpasswd_line

from harness.scripted_http import Request, Script, ScriptedServer, TLSMaterials, http_response, make_tls
from regmirror.upstream import check_upstream

USER, PASSWORD = "puller", "s3cret-Pa55"


@pytest.fixture(scope="module")
def tools() -> None:
    reason = ensure_commands({"docker-registry": "docker-registry", "apache2-utils": "htpasswd"})
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TLSMaterials:
    return make_tls(str(tmp_path_factory.mktemp("tls")))


@pytest.fixture(scope="module")
def htpasswd_registry(tools: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    work = tmp_path_factory.mktemp("basic")
    (work / "htpasswd").write_text(htpasswd_line(USER, PASSWORD))
    auth = f"auth:\n  htpasswd:\n    realm: basic-realm\n    path: {work / 'htpasswd'}\n"
    with Registry.start(work / "registry", auth=auth) as registry:
        yield registry


def token_registry(work: Path, realm: str, signer: Path) -> contextlib.AbstractContextManager[Registry]:
    """A registry whose challenge sends clients to `realm` (`signer` would verify the tokens; none reach it here)."""
    auth = f"auth:\n  token:\n    realm: {realm}\n    service: registry.test\n    issuer: test\n    rootcertbundle: {signer}\n"
    return Registry.start(work, auth=auth)


def token_service(req: Request) -> Script:
    """A token service that knows one user: a token for the right Basic credentials, 401 for anything else."""
    query = parse_qs(urlsplit(req.target).query)
    good = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    ok = req.authorization == good and query.get("service") == ["registry.test"]
    return [http_response(200 if ok else 401, [("Content-Type", "application/json")], b'{"token":"t"}' if ok else b"{}")]


@pytest.mark.parametrize(("password", "expected"), [(PASSWORD, (True, "Authenticated")), ("wrong", (False, "CredentialsRejected"))])
def test_htpasswd_registry(htpasswd_registry: Registry, password: str, expected: tuple[bool, str]) -> None:
    check = check_upstream(htpasswd_registry.url, USER, password)
    assert (check.ok, check.reason) == expected, check
    assert password not in check.message and USER not in check.message


def test_htpasswd_registry_without_credentials(htpasswd_registry: Registry) -> None:
    check = check_upstream(htpasswd_registry.url, None, None)
    assert (check.ok, check.reason) == (False, "CredentialsRejected")


@pytest.mark.parametrize("password", [PASSWORD, "wrong"])
def test_token_service_on_another_https_host(tools: None, tls: TLSMaterials, tmp_path: Path, password: str) -> None:
    """Docker Hub's shape: the registry's realm is an https token service elsewhere; it gets the credentials."""
    signer = tmp_path / "signer.crt"
    signer.write_bytes(tls.ca_pem)
    with ScriptedServer(tls.server) as tokens:
        tokens.reply = token_service
        with token_registry(tmp_path / "registry", f"https://localhost:{tokens.port}/token", signer) as registry:
            check = check_upstream(registry.url, USER, password, ca_pem=tls.ca_pem)
        tokens.settle()
    assert (check.ok, check.reason) == ((True, "Authenticated") if password == PASSWORD else (False, "CredentialsRejected")), check
    assert [urlsplit(r.target).path for r in tokens.received] == ["/token"]
    assert tokens.received[0].authorization is not None


def test_plain_http_token_service_elsewhere_gets_no_credentials(tools: None, tls: TLSMaterials, tmp_path: Path) -> None:
    signer = tmp_path / "signer.crt"
    signer.write_bytes(tls.ca_pem)
    with ScriptedServer() as tokens:
        tokens.reply = token_service
        with token_registry(tmp_path / "registry", f"http://127.0.0.1:{tokens.port}/token", signer) as registry:
            check = check_upstream(registry.url, USER, PASSWORD)
        tokens.settle()
    assert (check.ok, check.reason) == (None, "InsecureTokenRealm"), check
    assert tokens.received == []
