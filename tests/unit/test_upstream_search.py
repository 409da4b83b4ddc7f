"""Searching for inputs and upstream behaviours that break check_upstream's contract.

The contract, asserted on every generated case:
- it returns a verdict with a known reason, never an exception, and never the
  catch-all CheckFailed (reaching it means a class of input nobody handled);
- it returns within its deadline, however the upstream trickles or hangs;
- credentials reach only https servers or the plain-http upstream the user
  chose (asserted on what the loopback servers RECEIVED), and no redirect is
  followed;
- no message holds a credential, in any spelling, and a message is printable
  and bounded.

Every secret carries MARK and no other generated value contains MARK or "*",
so a message with MARK or the redaction mark "***" betrays a leak even when the
last-guard redaction hid the secret itself.

UPSTREAM_SEARCH_EXAMPLES=2000 searches deeper than the default run.
"""

from __future__ import annotations

import base64
import binascii
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import urlsplit

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from harness.scripted_http import Request, Script, ScriptedServer, TLSMaterials, http_response, loopback_only, make_tls
from regmirror import upstream
from regmirror.upstream import UpstreamCheck, check_upstream, parse_challenges, trust_context

EXAMPLES = int(os.environ.get("UPSTREAM_SEARCH_EXAMPLES", "60"))
DEADLINE = 1.0
SLACK = 2.0  # scheduling on a shared 2-core machine; a broken deadline overshoots by far more
MARK = "\u00a7"
KNOWN = {v for k, v in vars(upstream).items() if k.startswith("REASON_")} - {upstream.REASON_CHECK_FAILED}
MOVED = "/moved-elsewhere"

search = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

T = TypeVar("T")


def weighted(*options: tuple[int, st.SearchStrategy[T]]) -> st.SearchStrategy[T]:
    """Like one_of, with weights: a search that mostly gets past the first check and sometimes trips it."""

    def pick(n: int) -> st.SearchStrategy[T]:
        for weight, strategy in options:
            if n < weight:
                return strategy
            n -= weight
        raise AssertionError(n)

    return st.integers(0, sum(w for w, _ in options) - 1).flatmap(pick)


plain_text = st.text(st.characters(exclude_characters=MARK + "*"), max_size=12)
odd_text = st.one_of(plain_text, st.sampled_from(["\udcff", "\r\n", "\x00", "ü", "\u2028", '"', "\\", ",", "=", " "]))
# Mostly what a header line can carry (no control characters), so most answers parse and the handshake goes on.
header_text = st.text(st.characters(exclude_characters=MARK + "*", exclude_categories=("Cc", "Cs")), max_size=12)
header_values = weighted((8, header_text), (2, odd_text))
secrets = st.builds(
    lambda a, b: a + MARK + b,
    st.text(st.characters(exclude_characters="*"), max_size=8),
    st.text(max_size=8).map(lambda s: s.replace("*", "")),
)


@dataclass
class Servers:
    plain: ScriptedServer
    secure: ScriptedServer
    elsewhere: ScriptedServer
    ca_pem: bytes
    ca_der: bytes

    def all(self) -> dict[str, ScriptedServer]:
        return {"plain": self.plain, "secure": self.secure, "elsewhere": self.elsewhere}

    def reset(self, reply: object) -> None:
        for server in self.all().values():
            server.received.clear()
            server.errors.clear()
            server.reply = reply  # type: ignore[assignment]

    def fill(self, text: str) -> str:
        """Put the live ports where a strategy left placeholders."""
        for name, server in self.all().items():
            text = text.replace("{" + name + "}", str(server.port))
        return text

    def fill_ca(self, ca: str | bytes | None) -> str | bytes | None:
        """Put the live CA where a strategy left `{ca_pem}` or `{ca_der}`."""
        if isinstance(ca, bytes):
            return self.ca_der if ca == b"{ca_der}" else ca.replace(b"{ca_pem}", self.ca_pem)
        return ca.replace("{ca_pem}", self.ca_pem.decode()) if ca is not None else None


@pytest.fixture(scope="module", autouse=True)
def _loopback_only() -> Iterator[None]:
    with loopback_only():
        yield


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    tls: TLSMaterials = make_tls(str(tmp_path_factory.mktemp("tls")))
    with ScriptedServer() as plain, ScriptedServer(tls.server) as secure, ScriptedServer() as elsewhere:
        yield Servers(plain, secure, elsewhere, tls.ca_pem, tls.ca_der)


def assert_contract(check: UpstreamCheck, elapsed: float, deadline: float, secret_values: list[str | None]) -> None:
    assert isinstance(check, UpstreamCheck)
    event(check.reason)  # --hypothesis-show-statistics: how much of the handshake the search reaches
    assert check.reason in KNOWN, check
    assert check.ok in (True, False, None)
    assert elapsed < deadline + SLACK, f"{elapsed:.1f} s with a {deadline} s deadline: {check}"
    assert len(check.message) <= upstream.MAX_MESSAGE and check.message.isprintable(), check
    for secret in secret_values:
        if secret:
            assert secret not in check.message
            assert "".join(c if c.isprintable() else "?" for c in secret) not in check.message


# --------------------------------------------------------------------------- any input


# Each strategy mixes live, well-formed values with odd ones, so the search gets past validation as often as it tests it.
ports = st.one_of(
    st.sampled_from(["{plain}", "{secure}"]), st.sampled_from(["", "0", "65536", "99999", "-1", "80a"]), st.integers(0, 999_999).map(str)
)
hosts = st.one_of(
    st.sampled_from(["127.0.0.1", "localhost"]),
    st.sampled_from(["[::1]", "::1", "[::1", "[fe80::1%eth0]", "\u00fc.invalid", "xn--zz", "%zz", "", " 127.0.0.1"]),
)


@st.composite
def odd_urls(draw: st.DrawFn) -> str:
    """URL-shaped, each part possibly wrong: scheme, separator, userinfo, host, port, path, stray whitespace."""
    scheme = draw(st.one_of(st.sampled_from(["http", "https"]), st.sampled_from(["HTTP", "Https", "ftp", "file", "", "javascript"])))
    sep = draw(st.sampled_from(["://"] * 5 + [":", ":/", "//"]))
    userinfo = draw(st.sampled_from(["", "", "", "u:p@", "\u00fc:@"]))
    port = draw(ports)
    url = f"{scheme}{sep}{userinfo}{draw(hosts)}{':' + port if port else ''}{draw(st.sampled_from(['', '/', '/v2', '/prefix/']))}"
    if draw(st.integers(0, 5)) == 0:
        at = draw(st.integers(0, len(url)))
        url = url[:at] + draw(st.sampled_from([" ", "\t", "\n", "\u00a0", "\u3000"])) + url[at:]
    return url


live_urls = st.builds(
    "{}://{}127.0.0.1:{}{}".format,
    st.sampled_from(["http", "https"]),
    st.sampled_from(["", "u:p@"]),
    st.sampled_from(["{plain}", "{secure}"]),
    st.sampled_from(["", "/", "/prefix/"]),
)
urls = weighted((4, live_urls), (4, odd_urls()), (2, odd_text))


@st.composite
def cas(draw: st.DrawFn) -> str | bytes | None:
    """None, random bytes or text, DER, empty, or the real PEM inside noise (non-ASCII comments, broken blocks).

    `{ca_pem}` and `{ca_der}` stand for the live CA (see Servers.fill_ca).
    """
    kind = draw(st.sampled_from(["none", "none", "pem", "pem", "bytes", "text", "der", "empty"]))
    if kind in ("none", "bytes", "der", "empty", "text"):
        return {"none": None, "der": b"{ca_der}", "empty": b"", "bytes": draw(st.binary(max_size=200)), "text": draw(odd_text)}[kind]
    noise = st.one_of(
        odd_text,
        st.just("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----"),
        st.binary(max_size=20).map(lambda b: b.decode("latin-1")),
    )
    text = draw(noise) + "\n{ca_pem}" + draw(noise)
    return text.encode("utf-8", "surrogatepass") if draw(st.booleans()) else text


@search
@given(url=urls, ca=cas(), username=st.one_of(st.none(), odd_text), password=st.one_of(st.none(), odd_text))
# issue 11, as reported: each raised out of the check
@example(url="http://127.0.0.1:99999", ca=None, username="u", password="p")
@example(url="https://127.0.0.1:{secure}", ca="# caf\u00e9\n{ca_pem}", username="u", password="p")
@example(url="https://127.0.0.1:{secure}", ca=b"{ca_der}", username="u", password="p")
def test_any_input_gives_a_verdict(servers: Servers, url: str, ca: str | bytes | None, username: str | None, password: str | None) -> None:
    servers.reset(lambda req: [http_response(200 if req.authorization else 401, [("WWW-Authenticate", 'Basic realm="r"')])])
    started = time.monotonic()
    check = check_upstream(servers.fill(url), username, password, ca_pem=servers.fill_ca(ca), deadline=DEADLINE)
    assert_contract(check, time.monotonic() - started, DEADLINE, [username, password])
    for server in servers.all().values():
        server.settle()
        # (an https client at the plain server leaves its TLS hello, not a GET)
        assert all(urlsplit(r.target).path.endswith("/v2/") for r in server.received if r.method == "GET"), server.received


# --------------------------------------------------------------------------- any upstream behaviour


live_realms = st.builds(
    "{}://{}:{}/token".format,
    st.sampled_from(["http", "https"]),
    st.sampled_from(["127.0.0.1", "localhost"]),
    st.sampled_from(["{plain}", "{secure}", "{elsewhere}"]),
)
odd_realms = st.builds(
    "{}://{}{}{}".format,
    st.sampled_from(["http", "https", "HTTP", "ftp", "file", "gopher", "javascript", ""]),
    st.sampled_from(["127.0.0.1", "localhost", "[::1]", "[::1", "\u00fc.invalid", ""]),
    st.one_of(st.sampled_from([":{plain}", ":{secure}", ":{elsewhere}", ""]), st.integers(0, 999_999).map(lambda p: f":{p}")),
    st.sampled_from(["/token", "/token?a=b", "", "/t,x", '/t"q']),
)
realm_urls = weighted((5, live_realms), (3, odd_realms), (2, header_values))
statuses = weighted(
    (6, st.sampled_from([200, 401, 403])), (2, st.sampled_from([301, 302, 307, 308, 404, 500, 503])), (2, st.integers(100, 599))
)
answers = weighted((4, st.just(200)), (3, st.sampled_from([401, 403])), (3, statuses))  # to credentials
header_names = st.one_of(
    st.sampled_from(["X-Junk", "Content-Type", "Set-Cookie", "Content-Length", "Transfer-Encoding", "Content-Encoding", "Connection"]),
    st.text(st.sampled_from("abcXYZ-_!~"), min_size=1, max_size=8),
)


def quoted(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


@st.composite
def challenges(draw: st.DrawFn) -> str:
    """One WWW-Authenticate value: 1-3 challenges with fuzzed schemes and parameters, quoted or bare."""
    parts = []
    for _ in range(draw(st.integers(1, 3))):
        scheme = draw(
            weighted((6, st.sampled_from(["Bearer", "Basic"])), (2, st.sampled_from(["bearer", "BASIC", "Negotiate"])), (2, header_values))
        )
        keys = st.lists(
            st.one_of(st.sampled_from(["realm", "service", "scope"]), st.sampled_from(["Realm", "SCOPE"]), header_values), max_size=4
        )
        params = []
        for key in draw(weighted((6, st.just(["realm", "service", "scope"])), (4, keys))):
            value = draw(realm_urls) if key.lower() == "realm" else draw(header_values)
            params.append(f"{key}={quoted(value) if draw(st.booleans()) else value}")
        parts.append(f"{scheme} {','.join(params)}".strip())
    return draw(st.sampled_from([", ", ",", " , "])).join(parts)


@st.composite
def replies(draw: st.DrawFn, status: st.SearchStrategy[int] = statuses) -> tuple[list[bytes | float], bool]:
    """(script, reflects): an HTTP answer with fuzzed status and headers, garbage, a trickle, a hang or a close.

    A script that reflects puts the credentials it received into a Location
    header: `{user}`, `{password}` and `{auth}` are filled in by the server.
    """
    kind = draw(st.sampled_from(["http"] * 12 + ["garbage", "trickle", "hang", "close"]))
    if kind == "garbage":
        return [draw(st.binary(min_size=1, max_size=300))], False
    if kind == "trickle":
        return [b"HTTP/1.1 200 OK\r\n", *[b"X-Slow: y\r\n", 0.3] * 20], False
    if kind == "hang":
        return [float("inf")], False
    if kind == "close":
        return [], False
    status = draw(status)
    headers = [("WWW-Authenticate", draw(challenges())) for _ in range(draw(st.sampled_from([1, 1, 0, 2])))]
    reflects = draw(st.booleans()) and draw(st.booleans())
    location = (
        "https://127.0.0.1:{secure}/{user}/{password}/{auth}"
        if reflects
        else draw(st.sampled_from([MOVED, f"http://127.0.0.1:{{elsewhere}}{MOVED}"]))
    )
    if draw(st.booleans()):
        headers.append(("Location", location))
    headers += draw(st.lists(st.tuples(header_names, header_values), max_size=2))
    return [http_response(status, headers, draw(st.binary(max_size=50)))], reflects


def decoded_credentials(req: Request) -> tuple[str, str, str]:
    """(user, password, base64) of the request's Basic credentials, empty when it sent none."""
    token = (req.authorization or " ").split()[-1] if req.authorization else ""
    try:
        user, _, password = base64.b64decode(token).decode("utf-8", "surrogateescape").partition(":")
    except binascii.Error:
        return "", "", token
    return user, password, token


@search
@given(
    upstream_is=st.sampled_from(["plain", "secure"]),
    with_ca=st.sampled_from([True] * 7 + [False]),
    username=weighted((1, st.none()), (4, secrets)),
    password=weighted((1, st.none()), (4, secrets)),
    first=replies(weighted((6, st.just(401)), (4, statuses))),
    again=replies(answers),
    token=replies(answers),
)
# Found by the search: a lone surrogate in the password (the check keeps it, as surrogatepass).
@example(
    upstream_is="plain",
    with_ca=True,
    username="\u00a7",
    password="\ud800\u00a7",
    first=(
        [
            b"HTTP/1.1 401 Scripted\r\nWWW-Authenticate: Bearer realm=http://127.0.0.1:{plain}/token\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        ],
        False,
    ),
    again=([b"HTTP/1.1 200 Scripted\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"], False),
    token=([b"HTTP/1.1 200 Scripted\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"], False),
)
def test_any_upstream_behaviour_gives_a_safe_verdict(
    servers: Servers,
    upstream_is: str,
    with_ca: bool,
    username: str | None,
    password: str | None,
    first: tuple[list[bytes | float], bool],
    again: tuple[list[bytes | float], bool],
    token: tuple[list[bytes | float], bool],
) -> None:
    """`first` answers /v2/ without credentials, `again` /v2/ with them, `token` every other path (the token services)."""

    def reply(req: Request) -> Script:
        script = (first if req.authorization is None else again) if urlsplit(req.target).path == "/v2/" else token
        user, pw, auth = decoded_credentials(req)
        for step in script[0]:
            if isinstance(step, bytes):
                filled = servers.fill(step.decode("utf-8", "surrogateescape"))
                filled = filled.replace("{user}", user).replace("{password}", pw).replace("{auth}", auth)
                yield filled.encode("utf-8", "surrogateescape")
            else:
                yield step

    servers.reset(reply)
    server = servers.all()[upstream_is]
    started = time.monotonic()
    check = check_upstream(server.url, username, password, ca_pem=servers.ca_pem if with_ca else None, deadline=DEADLINE)
    elapsed = time.monotonic() - started
    assert_contract(check, elapsed, DEADLINE, [username, password])
    if username and password is not None:
        # Encoded as the check encodes it (a lone surrogate is kept, not refused).
        assert base64.b64encode(f"{username}:{password}".encode(errors="surrogatepass")).decode() not in check.message
    if not (again[1] or token[1]):
        assert MARK not in check.message and "***" not in check.message, check

    for name, seen in servers.all().items():
        seen.settle()
        for req in seen.received:
            assert urlsplit(req.target).path != MOVED, f"{name} got a redirect followed: {req.target}"
            if req.authorization is not None:
                own_upstream = name == upstream_is == "plain" and req.headers.get("host") == f"127.0.0.1:{servers.plain.port}"
                assert name == "secure" or own_upstream, f"credentials reached {name} over plain http: {req.head!r}"
    # One destination; a GET the server drops unanswered is retried once (aiohttp, as RFC 9112 9.3.1 allows).
    sent = {(name, r.target) for name, s in servers.all().items() for r in s.received if r.authorization is not None}
    assert len(sent) <= 1, f"the credentials went to several places: {sent}"


# --------------------------------------------------------------------------- the pure parts


@search
@given(st.lists(odd_text, max_size=4))
def test_parse_challenges_is_total(headers: list[str]) -> None:
    for challenge in parse_challenges(headers):
        assert challenge.scheme and challenge.scheme == challenge.scheme.lower()
        assert all(key == key.lower() and key == key.strip() for key in challenge.params)


tokens = st.text(st.sampled_from("abcxyzABC019-._~+!#$%&'^`|"), min_size=1, max_size=8)


@search
@given(st.lists(st.tuples(tokens, st.dictionaries(tokens.map(str.lower), plain_text, max_size=4)), min_size=1, max_size=4))
def test_parse_challenges_reads_back_what_was_written(written: list[tuple[str, dict[str, str]]]) -> None:
    """Several challenges in one header, quoted values with commas, quotes and backslashes: all read back."""
    header = ", ".join(f"{scheme} {', '.join(f'{k}={quoted(v)}' for k, v in params.items())}".strip() for scheme, params in written)
    assert [(c.scheme, c.params) for c in parse_challenges([header])] == [(s.lower(), p) for s, p in written]


@search
@given(before=st.one_of(odd_text, st.binary(max_size=40).map(lambda b: b.decode("latin-1"))), after=odd_text, as_bytes=st.booleans())
def test_the_real_certificate_is_found_in_any_noise(servers: Servers, before: str, after: str, as_bytes: bool) -> None:
    text = before + "\n" + servers.ca_pem.decode() + "\n" + after
    assert trust_context(text.encode("utf-8", "surrogatepass") if as_bytes else text) is not None


@search
@given(st.one_of(st.binary(max_size=300), odd_text))
def test_noise_alone_is_no_ca(noise: str | bytes) -> None:
    assert trust_context(noise) is None
