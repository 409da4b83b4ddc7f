"""check_upstream against scripted loopback registries (plain and TLS), one case per answer and per broken input.

The servers record what they received, so the credential rules are asserted
on the wire: who got an Authorization header, over which scheme.
"""

from __future__ import annotations

import asyncio
import base64
import math
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

import pytest
from hypothesis import given
from hypothesis import strategies as st
from yarl import URL

from harness.scripted_http import Request, Script, ScriptedServer, TLSMaterials, http_response, loopback_only, make_tls
from regmirror.upstream import Proxies, UpstreamCheck, bypasses_proxy, check_upstream, check_upstream_async, parse_challenges

USER, PASSWORD = "puller", "s3cret-Pa55"
GOOD = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()


@dataclass
class Servers:
    """`plain` and `secure` can be the upstream or its token service; `elsewhere` is a third, plain host."""

    plain: ScriptedServer
    secure: ScriptedServer
    elsewhere: ScriptedServer
    ca_pem: str

    def settle(self) -> None:
        for server in (self.plain, self.secure, self.elsewhere):
            server.settle()


@pytest.fixture(scope="module", autouse=True)
def _loopback_only() -> Iterator[None]:
    with loopback_only():
        yield


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TLSMaterials:
    return make_tls(str(tmp_path_factory.mktemp("tls")))


@pytest.fixture
def servers(tls: TLSMaterials) -> Iterator[Servers]:
    with ScriptedServer() as plain, ScriptedServer(tls.server) as secure, ScriptedServer() as elsewhere:
        yield Servers(plain, secure, elsewhere, tls.ca_pem.decode())


def registry(
    challenge: str | None, *, anonymous: bool = False, deny: int = 401, token: Callable[[Request], Script] | None = None
) -> Callable[[Request], Script]:
    """/v2/: 200 when open, else 401 with `challenge`; a Basic registry accepts GOOD at /v2/;
    any other path is the token service: 200 for GOOD (or for no credentials when anonymous), else `deny`."""

    def reply(req: Request) -> Script:
        if urlsplit(req.target).path == "/v2/":
            if challenge is None or (challenge.startswith("Basic") and req.authorization == GOOD):
                return [http_response(200)]
            return [http_response(401, [("WWW-Authenticate", challenge)])]
        if token is not None:
            return token(req)
        assert parse_qs(urlsplit(req.target).query)["service"] == ["registry.test"]
        ok = req.authorization == GOOD or (anonymous and req.authorization is None)
        return [http_response(200 if ok else deny, [("Content-Type", "application/json")], b'{"token":"t"}')]

    return reply


def bearer(realm: str) -> str:
    return f'Bearer realm="{realm}",service="registry.test",scope="repository:a/b:pull"'


def assert_discreet(check: UpstreamCheck, *secrets: str) -> None:
    """No credential value in the message, and none was even produced (the last-guard redaction mark is absent)."""
    for secret in (USER, PASSWORD, "wrong-password", GOOD.split()[1], *secrets):
        assert secret not in check.message
    assert "***" not in check.message


# --------------------------------------------------------------------------- the handshake


def test_open_registry_is_anonymous(servers: Servers) -> None:
    servers.plain.reply = registry(None)
    check = check_upstream(servers.plain.url, None, None)
    assert (check.ok, check.reason) == (True, "Anonymous")


def test_basic_auth_right_credentials(servers: Servers) -> None:
    servers.plain.reply = registry('Basic realm="Registry Realm"')
    check = check_upstream(servers.plain.url, USER, PASSWORD)
    assert (check.ok, check.reason) == (True, "Authenticated")
    assert "the configured credentials" in check.message
    assert_discreet(check)


def test_basic_auth_wrong_credentials(servers: Servers) -> None:
    servers.plain.reply = registry('Basic realm="Registry Realm"')
    check = check_upstream(servers.plain.url, USER, "wrong-password")
    assert (check.ok, check.reason) == (False, "CredentialsRejected")
    assert "rejected the configured credentials" in check.message
    assert_discreet(check)


def test_basic_auth_without_credentials(servers: Servers) -> None:
    servers.plain.reply = registry('Basic realm="Registry Realm"')
    check = check_upstream(servers.plain.url, None, None)
    assert (check.ok, check.reason) == (False, "CredentialsRejected")
    assert "no credentials" in check.message


def test_bearer_on_the_users_own_http_upstream(servers: Servers) -> None:
    servers.plain.reply = registry(bearer(f"{servers.plain.url}/token"))
    check = check_upstream(servers.plain.url, USER, PASSWORD)
    assert (check.ok, check.reason) == (True, "Authenticated")
    assert_discreet(check)


@pytest.mark.parametrize("deny", [401, 403])
def test_bearer_wrong_credentials(servers: Servers, deny: int) -> None:
    servers.plain.reply = registry(bearer(f"{servers.plain.url}/token"), deny=deny)
    check = check_upstream(servers.plain.url, USER, "wrong-password")
    assert (check.ok, check.reason) == (False, "CredentialsRejected")
    assert f"HTTP {deny}" in check.message
    assert_discreet(check)


def test_bearer_anonymous_token(servers: Servers) -> None:
    servers.plain.reply = registry(bearer(f"{servers.plain.url}/token"), anonymous=True)
    check = check_upstream(servers.plain.url, None, None)
    assert (check.ok, check.reason) == (True, "Anonymous")


def test_token_service_on_another_https_host_gets_the_credentials(servers: Servers) -> None:
    """Docker Hub's shape (registry-1.docker.io sends clients to auth.docker.io), here with a private CA."""
    servers.plain.reply = registry(bearer(f"https://localhost:{servers.secure.port}/token"))
    servers.secure.reply = servers.plain.reply
    check = check_upstream(servers.plain.url, USER, PASSWORD, ca_pem=servers.ca_pem)
    assert (check.ok, check.reason) == (True, "Authenticated")
    servers.settle()
    assert [r.authorization for r in servers.secure.received] == [GOOD]


def test_unreachable_cannot_tell() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    check = check_upstream(f"http://127.0.0.1:{port}", USER, PASSWORD)
    assert (check.ok, check.reason) == (None, "Unreachable")
    assert_discreet(check)


def test_server_error_is_unexpected(servers: Servers) -> None:
    servers.plain.reply = lambda _req: [http_response(503)]
    check = check_upstream(servers.plain.url, USER, PASSWORD)
    assert (check.ok, check.reason) == (None, "UnexpectedResponse")
    assert "503" in check.message


def test_untrusted_certificate_is_a_tls_error(servers: Servers) -> None:
    servers.secure.reply = registry(None)
    check = check_upstream(servers.secure.url, USER, PASSWORD)
    assert (check.ok, check.reason) == (None, "TLSError")
    assert "certificate" in check.message


@pytest.mark.parametrize("where", ["upstream", "token service"])
def test_redirects_are_not_followed(servers: Servers, where: str) -> None:
    moved = [http_response(307, [("Location", f"{servers.elsewhere.url}/v2/")])]
    if where == "upstream":
        servers.secure.reply = lambda _req: moved
    else:
        servers.secure.reply = registry(bearer(f"{servers.secure.url}/token"), token=lambda _req: moved)
    check = check_upstream(servers.secure.url, USER, PASSWORD, ca_pem=servers.ca_pem)
    assert (check.ok, check.reason) == (None, "UnexpectedResponse")
    assert f"redirects to {servers.elsewhere.url}/v2/" in check.message
    servers.settle()
    assert servers.elsewhere.received == []


def test_unknown_challenge_is_unexpected(servers: Servers) -> None:
    servers.plain.reply = lambda _req: [http_response(401, [("WWW-Authenticate", 'Negotiate realm="x"')])]
    check = check_upstream(servers.plain.url, USER, PASSWORD)
    assert (check.ok, check.reason) == (None, "UnexpectedResponse")
    assert "negotiate" in check.message


def test_userinfo_in_url_is_neither_used_nor_echoed(servers: Servers) -> None:
    servers.plain.reply = lambda _req: [http_response(500)]
    check = check_upstream(servers.plain.url.replace("http://", f"http://{USER}:{PASSWORD}@"), None, None)
    assert_discreet(check)
    servers.settle()
    assert [r.authorization for r in servers.plain.received] == [None]


def test_async_form_and_blocking_form_inside_a_running_loop(servers: Servers) -> None:
    servers.plain.reply = registry('Basic realm="r"')

    async def both() -> tuple[UpstreamCheck, UpstreamCheck]:
        return await check_upstream_async(servers.plain.url, USER, PASSWORD), check_upstream(servers.plain.url, USER, PASSWORD)

    first, second = asyncio.run(both())
    assert first == second
    assert first.reason == "Authenticated"


# --------------------------------------------------------------------------- 1. inputs that used to raise


NON_ASCII_COMMENT = "# Corporate root CA, Zürich \u2014 ünïcødé\n"


@pytest.mark.parametrize(
    "ca",
    [
        NON_ASCII_COMMENT,
        NON_ASCII_COMMENT + "-----BEGIN CERTIFICATE-----\nnot base64 ü\n-----END CERTIFICATE-----\n",
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        "",
        b"\x00\xff\xfe garbage",
        "der",
    ],
)
def test_unusable_ca_is_a_verdict(servers: Servers, tls: TLSMaterials, ca: str | bytes) -> None:
    servers.secure.reply = registry(None)
    check = check_upstream(servers.secure.url, USER, PASSWORD, ca_pem=tls.ca_der if ca == "der" else ca)
    assert (check.ok, check.reason) == (None, "InvalidCA")
    assert "spec.upstream.tls.caSecretRef" in check.message
    servers.settle()
    assert servers.secure.received == []


@pytest.mark.parametrize("as_bytes", [False, True])
def test_ca_with_non_ascii_comments_trusts_its_certificate(servers: Servers, as_bytes: bool) -> None:
    servers.secure.reply = registry('Basic realm="r"')
    ca = NON_ASCII_COMMENT + servers.ca_pem + NON_ASCII_COMMENT
    check = check_upstream(servers.secure.url, USER, PASSWORD, ca_pem=ca.encode() if as_bytes else ca)
    assert (check.ok, check.reason) == (True, "Authenticated")


@pytest.mark.parametrize(
    "realm",
    [
        "http://127.0.0.1:99999/token",
        "https://[::1/token",
        "http://[::1]:99999/token",
        "http://[not-an-ip]/token",
        "http://xn--zz/token",
        "http://127.0.0.1:PORT/to ken",
        "http:///token",
        "/token",
        "ftp://127.0.0.1:PORT/token",
        "file:///etc/passwd",
        "gopher://127.0.0.1:PORT/token",
        "data:,token",
        "javascript:alert(1)",
    ],
)
def test_unusable_token_realm_is_a_verdict(servers: Servers, realm: str) -> None:
    servers.plain.reply = registry(bearer(realm.replace("PORT", str(servers.plain.port))))
    check = check_upstream(servers.plain.url, USER, PASSWORD)
    assert (check.ok, check.reason) == (None, "InvalidTokenRealm")
    servers.settle()
    assert [r.authorization for r in servers.plain.received] == [None]
    assert_discreet(check)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:99999",
        "https://[::1]:99999",
        "http://127.0.0.1:0",
        "http://[::1",
        "ftp://127.0.0.1",
        "",
        "http://",
        "https://ü\udcff/",
    ],
)
def test_unusable_upstream_url_is_a_verdict(url: str) -> None:
    check = check_upstream(url, USER, PASSWORD)
    assert (check.ok, check.reason) == (None, "InvalidURL")
    assert "spec.upstream.url" in check.message


# --------------------------------------------------------------------------- 2. credentials never in clear text


def test_https_upstream_with_plain_http_realm_gets_no_credentials(servers: Servers) -> None:
    servers.secure.reply = registry(bearer(f"{servers.plain.url}/token"))
    servers.plain.reply = servers.secure.reply
    check = check_upstream(servers.secure.url, USER, PASSWORD, ca_pem=servers.ca_pem)
    assert (check.ok, check.reason) == (None, "InsecureTokenRealm")
    assert "plain http" in check.message
    servers.settle()
    assert servers.plain.received == []
    assert_discreet(check)


@pytest.mark.parametrize("realm_host", ["elsewhere", "localhost"])
def test_http_upstream_gives_credentials_to_no_other_http_host(servers: Servers, realm_host: str) -> None:
    """Only the very upstream the user chose may get them in clear text: not another port, not another name."""
    realm = f"{servers.elsewhere.url}/token" if realm_host == "elsewhere" else f"http://localhost:{servers.plain.port}/token"
    servers.plain.reply = servers.elsewhere.reply = registry(bearer(realm))
    check = check_upstream(servers.plain.url, USER, PASSWORD)
    assert (check.ok, check.reason) == (None, "InsecureTokenRealm")
    servers.settle()
    assert servers.elsewhere.received == []
    assert [r.authorization for r in servers.plain.received] == [None]


def test_plain_http_realm_is_fine_without_credentials(servers: Servers) -> None:
    servers.secure.reply = registry(bearer(f"{servers.plain.url}/token"), anonymous=True)
    servers.plain.reply = servers.secure.reply
    check = check_upstream(servers.secure.url, None, None, ca_pem=servers.ca_pem)
    assert (check.ok, check.reason) == (True, "Anonymous")


# --------------------------------------------------------------------------- 3. messages name no credential


def test_messages_never_name_the_user(servers: Servers) -> None:
    for challenge, password in [
        ('Basic realm="r"', PASSWORD),
        ('Basic realm="r"', "wrong-password"),
        (bearer(f"{servers.plain.url}/t"), "x"),
    ]:
        servers.plain.reply = registry(challenge)
        check = check_upstream(servers.plain.url, USER, password)
        assert check.reason in ("Authenticated", "CredentialsRejected")
        assert_discreet(check, password)


def test_echoed_credentials_are_redacted(servers: Servers) -> None:
    """A hostile upstream reflecting what it received (decoded or not) into a message shown in status."""

    def echo(req: Request) -> Script:
        if req.authorization is None:
            return [http_response(401, [("WWW-Authenticate", 'Basic realm="r"')])]
        decoded = base64.b64decode(req.authorization.split()[1]).decode()
        return [http_response(302, [("Location", f"https://127.0.0.1/{decoded}/{req.authorization}")])]

    servers.plain.reply = echo
    check = check_upstream(servers.plain.url, USER, PASSWORD)
    assert check.reason == "UnexpectedResponse"
    for secret in (USER, PASSWORD, GOOD.split()[1]):
        assert secret not in check.message


# --------------------------------------------------------------------------- 4. bounded time


def trickle(_req: Request) -> Script:
    """Slow-loris: a valid status line, then one header byte every 50 ms, for ever."""
    yield b"HTTP/1.1 200 OK\r\n"
    while True:
        yield b"X"
        yield 0.05


@pytest.mark.parametrize("where", ["upstream", "token service"])
@pytest.mark.parametrize("how", ["silent", "trickle"])
def test_hanging_upstream_is_bounded_by_one_deadline(servers: Servers, where: str, how: str) -> None:
    hang: Callable[[Request], Script] = trickle if how == "trickle" else (lambda _req: [math.inf])
    servers.plain.reply = hang if where == "upstream" else registry(bearer(f"{servers.plain.url}/token"), token=hang)
    started = time.monotonic()
    check = check_upstream(servers.plain.url, USER, PASSWORD, deadline=1.0)
    elapsed = time.monotonic() - started
    assert (check.ok, check.reason) == (None, "Unreachable")
    assert "within the 1 s" in check.message
    assert ("token service" in check.message) == (where == "token service")
    assert elapsed < 1.0 + 2.0, f"the check took {elapsed:.1f} s with a 1 s deadline"


def endless_body(_req: Request) -> Script:
    """A 401 with its challenge, then a body announced as 10 GB that keeps coming."""
    yield http_response(401, [("WWW-Authenticate", 'Basic realm="r"')])[: -len(b"\r\n")].replace(
        b"Content-Length: 0", b"Content-Length: 10000000000"
    )
    yield b"\r\n"
    while True:
        yield b"x" * 65536


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        (endless_body, "CredentialsRejected"),  # decided on the headers; the body is never read
        (lambda _req: [http_response(401, [("WWW-Authenticate", f"Basic realm={i}") for i in range(5000)])], "UnexpectedResponse"),
        (lambda _req: [http_response(401, [("WWW-Authenticate", "Bearer realm=" + "a" * 100_000)])], "UnexpectedResponse"),
        (
            lambda _req: [http_response(401, [("WWW-Authenticate", 'Bearer realm="https://127.0.0.1:1/' + "\u00fc" * 3000 + '"')])],
            "Unreachable",
        ),
    ],
    ids=["endless-body", "5000-challenges", "100k-header", "long-unicode-realm"],
)
def test_huge_answers_are_bounded(servers: Servers, reply: Callable[[Request], Script], reason: str) -> None:
    servers.plain.reply = reply
    started = time.monotonic()
    check = check_upstream(servers.plain.url, None, None, deadline=2.0)
    assert check.reason == reason, check
    assert len(check.message) <= 1024
    assert time.monotonic() - started < 2.0 + 2.0


# --------------------------------------------------------------------------- parse_challenges


def test_parse_challenges_quoted_commas() -> None:
    [bearer_ch] = parse_challenges(['Bearer realm="https://auth.example/token",service="a,b",scope="repository:x/y:pull,push"'])
    assert bearer_ch.scheme == "bearer"
    assert bearer_ch.params == {"realm": "https://auth.example/token", "service": "a,b", "scope": "repository:x/y:pull,push"}
    [basic] = parse_challenges(['Basic realm="Registry Realm"'])
    assert (basic.scheme, basic.params) == ("basic", {"realm": "Registry Realm"})


def test_parse_challenges_several_in_one_header() -> None:
    parsed = parse_challenges(['Negotiate, Basic realm="a, b", Bearer realm=https://t/x , service = "s \\"q\\""', "Basic"])
    assert [(c.scheme, c.params) for c in parsed] == [
        ("negotiate", {}),
        ("basic", {"realm": "a, b"}),
        ("bearer", {"realm": "https://t/x", "service": 's "q"'}),
        ("basic", {}),
    ]


def test_parse_challenges_skips_junk() -> None:
    assert parse_challenges(["", ",,,", 'realm="orphan"', "=", '"']) == []


# ------------------------------------------------------------------ spec.proxy: the check goes the way the mirror goes


def test_the_check_reaches_an_upstream_only_its_proxy_can(servers: Servers) -> None:
    # registry.invalid resolves nowhere here; only the proxy (a scripted HTTP proxy answering as the registry) reaches it.
    servers.plain.reply = registry('Basic realm="Registry Realm"')
    upstream = "http://registry.invalid:5000"
    direct = check_upstream(upstream, USER, PASSWORD, deadline=3)
    assert (direct.ok, direct.reason) == (None, "Unreachable")
    proxied = check_upstream(upstream, USER, PASSWORD, deadline=3, proxies=Proxies(http=servers.plain.url))
    assert (proxied.ok, proxied.reason) == (True, "Authenticated"), proxied
    servers.settle()
    assert [r.target for r in servers.plain.received] == [f"{upstream}/v2/"] * 2, "absolute-form requests: a proxy was asked"
    assert_discreet(proxied)


def test_no_proxy_sends_the_check_direct(servers: Servers) -> None:
    servers.plain.reply = registry(None)
    bypassed = check_upstream(
        "http://registry.invalid:5000", None, None, deadline=3, proxies=Proxies(http=servers.plain.url, no_proxy="example.com,.invalid")
    )
    assert (bypassed.ok, bypassed.reason) == (None, "Unreachable")
    assert "through the proxy" not in bypassed.message
    servers.settle()
    assert servers.plain.received == []


def test_a_socks_proxy_is_an_unknown_verdict_not_a_failure() -> None:
    check = check_upstream("https://registry.invalid", USER, PASSWORD, deadline=3, proxies=Proxies(https="socks5://127.0.0.1:1080"))
    assert (check.ok, check.reason) == (None, "Unreachable")
    assert "SOCKS" in check.message
    assert_discreet(check)


@pytest.mark.parametrize(
    ("host", "port", "no_proxy", "direct"),
    [
        ("quay.io", 443, "", False),
        ("quay.io", 443, "*", True),
        ("quay.io", 443, "quay.io", True),
        ("cdn.quay.io", 443, "quay.io", True),
        ("notquay.io", 443, "quay.io", False),
        ("quay.io", 443, ".quay.io", False),
        ("cdn.quay.io", 443, ".quay.io", True),
        ("cdn.quay.io", 443, "*.quay.io", True),
        ("quay.io", 443, "quay.io:5000", False),
        ("quay.io", 5000, "quay.io:5000", True),
        ("10.1.2.3", 5000, "10.0.0.0/8", True),
        ("10.1.2.3", 5000, "192.168.0.0/16, 10.1.2.3", True),
        ("registry.corp", 443, "10.0.0.0/8", False),
        ("fd00::5", 443, "fd00::/8", True),
        ("127.0.0.1", 5000, "", True),
        ("localhost", 5000, "", True),
        ("QUAY.IO.", 443, " quay.io ", True),
    ],
)
def test_no_proxy_follows_go(host: str, port: int, no_proxy: str, direct: bool) -> None:
    assert bypasses_proxy(host, port, no_proxy) is direct


@given(
    host=st.from_regex(r"[a-z]([a-z0-9-]{0,20}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?){0,3}", fullmatch=True),
    others=st.lists(st.from_regex(r"[a-z0-9.*:/-]{0,30}", fullmatch=True), max_size=4),
    port=st.integers(1, 65535),
)
def test_a_host_named_in_no_proxy_is_always_direct(host: str, others: list[str], port: int) -> None:
    # Names (an IP entry matches addresses only, as in Go; the table above covers those).
    entries = [*others, host]
    assert bypasses_proxy(host, port, ",".join(entries))
    assert bypasses_proxy(f"sub.{host}", port, ",".join(entries))
    assert Proxies(http="http://proxy:3128", no_proxy=",".join(entries)).for_url(URL(f"http://{host}:{port}/v2/")) is None
