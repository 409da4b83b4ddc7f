"""The upstream credentials check inside the real operator: odd inputs give a condition, never a missing mirror.

Issue 11 found that a CA bundle with non-ASCII bytes, or an upstream whose
Bearer realm has a bad port, made the check raise inside the reconcile: no
Deployment was ever created and the status said `ApplyFailed`. Here the
upstream is a scripted loopback server (the operator runs on this host) and
each case must end with the mirror's children applied and a verdict an admin
can act on, without the credentials anywhere in the resource.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from harness import LocalCluster
from harness.operator import OPERATOR_NS, OperatorProcess, apply, delete_mirror, mirror_body, wait_condition, wait_for
from harness.scripted_http import Request, Script, ScriptedServer, TLSMaterials, http_response, make_tls

USER, PASSWORD = "robot-puller", "s3cret-Pa55-wd"
NON_ASCII = "# Corporate root CA, Z\u00fcrich \u2014 \u00fcn\u00efc\u00f8d\u00e9\n"


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TLSMaterials:
    return make_tls(str(tmp_path_factory.mktemp("tls")))


@pytest.fixture
def upstream(tls: TLSMaterials) -> Iterator[tuple[ScriptedServer, ScriptedServer]]:
    """(plain, secure) loopback upstreams; each test sets their replies."""
    with ScriptedServer() as plain, ScriptedServer(tls.server) as secure:
        yield plain, secure


@pytest.fixture
def make_mirror(cluster: LocalCluster, operator: OperatorProcess) -> Iterator[Callable[..., None]]:
    """Create a mirror with credentials (and a CA Secret when given); all of it is deleted in teardown."""
    made: list[tuple[str, list[str]]] = []

    def make(name: str, url: str, ca: str | None = None) -> None:
        secrets = [f"{name}-creds"]
        apply(cluster, secret(secrets[0], {"username": USER, "password": PASSWORD}))
        upstream_spec: dict[str, Any] = {"url": url, "credentialsSecretRef": {"name": secrets[0]}}
        if ca is not None:
            secrets.append(f"{name}-ca")
            apply(cluster, secret(secrets[1], {"ca.crt": ca}))
            upstream_spec["tls"] = {"caSecretRef": {"name": secrets[1], "key": "ca.crt"}}
        made.append((name, secrets))
        apply(cluster, mirror_body(name, upstream=upstream_spec))

    yield make
    for name, secrets in made:
        delete_mirror(cluster, name)
        for s in secrets:
            cluster.kubectl("delete", "secret", s, "-n", OPERATOR_NS, "--ignore-not-found", check=False)


def secret(name: str, data: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": OPERATOR_NS}, "stringData": data}


def basic_registry(req: Request) -> Script:
    good = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    if req.authorization == good:
        return [http_response(200)]
    return [http_response(401, [("WWW-Authenticate", 'Basic realm="r"')])]


def assert_children_and_verdict(cluster: LocalCluster, name: str, status: str, reason: str) -> None:
    body = wait_condition(cluster, name, "UpstreamAuthenticated", status, reason=reason)
    wait_for(
        lambda: cluster.kubectl("get", "deployment", f"regmirror-{name}", "-n", OPERATOR_NS, check=False).returncode == 0,
        timeout=60,
        what=f"the Deployment of {name}",
    )
    text = json.dumps(body)
    assert PASSWORD not in text and USER not in text, "no credential value in the resource"
    assert "ApplyFailed" not in text


def test_ca_with_non_ascii_comments_is_read_like_the_mirror_reads_it(
    cluster: LocalCluster, make_mirror: Callable[..., None], upstream: tuple[ScriptedServer, ScriptedServer], tls: TLSMaterials
) -> None:
    _, secure = upstream
    secure.reply = basic_registry
    make_mirror("ca-unicode", secure.url, ca=NON_ASCII + tls.ca_pem.decode())
    assert_children_and_verdict(cluster, "ca-unicode", "True", "Authenticated")


def test_ca_without_a_certificate_is_invalid_ca(
    cluster: LocalCluster, make_mirror: Callable[..., None], upstream: tuple[ScriptedServer, ScriptedServer]
) -> None:
    _, secure = upstream
    secure.reply = basic_registry
    make_mirror("ca-garbage", secure.url, ca=NON_ASCII + "not a certificate \u00ff\n")
    assert_children_and_verdict(cluster, "ca-garbage", "Unknown", "InvalidCA")
    secure.settle()
    assert secure.received == [], "nothing is sent when the CA cannot be read"


@pytest.mark.parametrize("realm", ["http://127.0.0.1:99999/token", "http://[::1/token"])
def test_token_realm_with_a_bad_url_is_invalid_token_realm(
    cluster: LocalCluster, make_mirror: Callable[..., None], upstream: tuple[ScriptedServer, ScriptedServer], realm: str
) -> None:
    plain, _ = upstream
    plain.reply = lambda _req: [http_response(401, [("WWW-Authenticate", f'Bearer realm="{realm}",service="s"')])]
    name = "realm-port" if "99999" in realm else "realm-ipv6"
    make_mirror(name, plain.url)
    assert_children_and_verdict(cluster, name, "Unknown", "InvalidTokenRealm")
    plain.settle()
    assert [r.authorization for r in plain.received] == [None] * len(plain.received)
