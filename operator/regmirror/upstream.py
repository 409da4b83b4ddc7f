"""Does the upstream accept the mirror's credentials? The registry auth handshake, done once.

distribution in proxy mode does not tell anyone that the upstream rejected its
credentials: it answers the node's pull with an error, and under
AllowUpstream the node's runtime quietly falls back to the upstream, so a
wrong password looks like "the mirror does nothing". The operator therefore
performs the same handshake `docker login` does and reports the verdict as a
condition:

1. GET <url>/v2/ without credentials. 200: the upstream is open.
2. 401 with `WWW-Authenticate: Basic ...`: repeat with basic auth.
3. 401 with `WWW-Authenticate: Bearer realm=...,service=...`: GET the realm
   (with `service` and `scope` as query parameters) with basic auth; a token
   (200) means the credentials are good, 401/403 means they are not.

The contract: whatever the URL, CA bytes, credentials or upstream answers, the
check returns a verdict (never raises) within `deadline` seconds in total.
Credentials travel only over https, or over plain http to the very upstream
the user chose (same scheme, host and port as an http `upstream.url`).
Redirects are never followed. The check goes the way the mirror goes: through
`spec.proxy` (HTTP_PROXY / HTTPS_PROXY / NO_PROXY with Go's matching rules),
so a cluster whose egress needs a proxy does not read "Unreachable". Nothing
here logs, and no message contains the password or the username (status is
readable by more people than Secrets).
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import re
import ssl
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.request import parse_http_list

import aiohttp
from yarl import URL

REASON_AUTHENTICATED = "Authenticated"
REASON_ANONYMOUS = "Anonymous"
REASON_CREDENTIALS_REJECTED = "CredentialsRejected"
REASON_INSECURE_TOKEN_REALM = "InsecureTokenRealm"
REASON_INVALID_URL = "InvalidURL"
REASON_INVALID_CA = "InvalidCA"
REASON_INVALID_TOKEN_REALM = "InvalidTokenRealm"
REASON_TLS_ERROR = "TLSError"
REASON_UNREACHABLE = "Unreachable"
REASON_UNEXPECTED_RESPONSE = "UnexpectedResponse"
# The last guard of the contract; the tests search for inputs that reach it.
REASON_CHECK_FAILED = "CheckFailed"

USER_AGENT = "regmirror-operator"
DEFAULT_DEADLINE = 10.0
MAX_CHALLENGE_HEADERS = 32
MAX_MESSAGE = 1024
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 token: what an auth scheme is made of
_PEM_CERTIFICATE = re.compile(r"-----BEGIN CERTIFICATE-----([A-Za-z0-9+/=\s]*)-----END CERTIFICATE-----")


@dataclass(frozen=True)
class UpstreamCheck:
    """The verdict: ok None means the check could not tell (unreachable, odd answer, unusable input)."""

    ok: bool | None
    reason: str
    message: str


@dataclass(frozen=True)
class Challenge:
    """One `WWW-Authenticate` challenge: scheme (lower-case) and its parameters (keys lower-case)."""

    scheme: str
    params: dict[str, str]


@dataclass(frozen=True)
class _Response:
    status: int
    challenges: tuple[Challenge, ...]
    location: str | None


def parse_challenges(headers: list[str]) -> list[Challenge]:
    """Parse `WWW-Authenticate` values, several challenges per value allowed; total: junk is skipped, never raised.

    `parse_http_list` splits at commas outside quoted strings (and unescapes
    them); an item with a space before its first `=` starts a new challenge.
    """
    challenges: list[Challenge] = []
    for header in headers:
        current: Challenge | None = None
        for item in parse_http_list(header):
            head, eq, _ = item.partition("=")
            if not eq or len(head.split()) > 1:  # "Basic" or "Bearer realm=...": a new challenge
                scheme, item = [*item.split(None, 1), "", ""][:2]
                current = Challenge(scheme.lower(), {}) if _TOKEN.fullmatch(scheme) else None
                if current is not None:
                    challenges.append(current)
            key, eq, value = item.partition("=")
            key, value = key.strip().lower(), value.strip()
            if eq and key and current is not None:
                if len(value) >= 2 and value[0] == value[-1] == '"':
                    value = value[1:-1]
                current.params[key] = value
    return challenges


def trust_context(ca_pem: str | bytes | None) -> ssl.SSLContext | None:
    """The system roots plus the extra CA's certificates; None when an extra CA is given but holds none.

    Like Go's AppendCertsFromPEM (what the mirror itself uses), only PEM
    CERTIFICATE blocks count and anything around or between them (comments,
    non-ASCII bytes, broken blocks) is skipped.
    """
    context = ssl.create_default_context()
    if ca_pem is None:
        return context
    text = ca_pem.decode("latin-1") if isinstance(ca_pem, bytes) else ca_pem
    loaded = 0
    for body in _PEM_CERTIFICATE.findall(text):
        pem = "-----BEGIN CERTIFICATE-----\n" + "".join(body.split()) + "\n-----END CERTIFICATE-----\n"
        try:
            context.load_verify_locations(cadata=pem)
            loaded += 1
        except (ssl.SSLError, ValueError):
            continue
    return context if loaded else None


def http_url(raw: str) -> URL | None:
    """`raw` as an absolute http(s) URL with a host and a port in 1-65535, without userinfo; None otherwise."""
    if any(ord(ch) <= 32 or ord(ch) == 127 for ch in raw):
        return None
    try:
        url = URL(raw)
        port = url.port
        if url.scheme not in ("http", "https") or not url.host or port is None or not 0 < port < 65536:
            return None
        return url.with_user(None).with_fragment(None)
    except ValueError:  # includes UnicodeError (IDNA), bad ports, unbalanced IPv6 brackets
        return None


def may_carry_credentials(target: URL, upstream: URL) -> bool:
    """Credentials go over https, or over plain http only to the plain-http upstream the user chose."""
    if target.scheme == "https":
        return True
    return upstream.scheme == "http" and (target.host or "").lower() == (upstream.host or "").lower() and target.port == upstream.port


def _shown(value: str | URL) -> str:
    """An upstream-supplied value for a message: a URL without its userinfo (`_clean` bounds the message)."""
    if isinstance(value, str):
        value = http_url(value) or value
    return str(value)


def _printable(text: str) -> str:
    return "".join(ch if ch.isprintable() else "?" for ch in text)


def _clean(message: str, secrets: tuple[str, ...]) -> str:
    """Printable, free of every secret (also in its printable spelling), then bounded.

    Redaction runs to a fixed point (replacing one secret could form another)
    and before truncation (a cut could otherwise leave a secret's prefix).
    """
    message = _printable(message)
    variants = {_printable(s) for s in secrets if s}
    mark = "" if any("*" in v for v in variants) else "***"
    while any(v in message for v in variants):
        for variant in variants:
            message = message.replace(variant, mark)
    return message[:MAX_MESSAGE]


@dataclass(frozen=True)
class Proxies:
    """The mirror's outbound proxy (spec.proxy), chosen per request URL the way Go's net/http does."""

    http: str | None = None
    https: str | None = None
    no_proxy: str | None = None

    def for_url(self, url: URL) -> str | None:
        """The proxy for `url`, or None to connect directly (no proxy for its scheme, or NO_PROXY matches)."""
        proxy = self.https if url.scheme == "https" else self.http
        if not proxy or url.host is None or bypasses_proxy(url.host, url.explicit_port or url.port, self.no_proxy or ""):
            return None
        return proxy


def bypasses_proxy(host: str, port: int | None, no_proxy: str) -> bool:
    """Whether NO_PROXY sends `host:port` direct, by Go's rules (golang.org/x/net/http/httpproxy).

    `*` matches everything; an IP or CIDR matches addresses in it (hosts that
    are names never match an IP entry); `name` matches it and its subdomains;
    `.name` and `*.name` match subdomains only; an entry with `:port` matches
    only that port. Loopback is always direct, as in Go.
    """
    host = host.strip("[]").lower().rstrip(".")
    try:
        address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(host)
    except ValueError:
        address = None
    if host == "localhost" or (address is not None and address.is_loopback):
        return True
    for raw in no_proxy.split(","):
        entry = raw.strip().lower()
        if not entry:
            continue
        if entry == "*":
            return True
        try:
            network = ipaddress.ip_network(entry, strict=False)
        except ValueError:
            network = None
        if network is not None:
            if address is not None and address in network:
                return True
            continue
        name, _, entry_port = entry.rpartition(":") if re.fullmatch(r".+:[0-9]+", entry) else (entry, "", "")
        if entry_port and port is not None and int(entry_port) != port:
            continue
        name = name.strip("[]").rstrip(".")
        if name.startswith("*."):
            name = name[1:]
        if name.startswith("."):
            if host.endswith(name):
                return True
        elif host == name or host.endswith("." + name):
            return True
    return False


class _Client:
    """GETs without redirects; every failure becomes a verdict naming what was asked (`step`, for the deadline)."""

    def __init__(self, session: aiohttp.ClientSession, proxies: Proxies) -> None:
        self.session = session
        self.proxies = proxies
        self.step = "the upstream"

    async def get(self, url: URL, what: str, authorization: str | None = None) -> _Response | UpstreamCheck:
        self.step = what
        headers = {"User-Agent": USER_AGENT, "Accept": "application/json"}
        if authorization:
            headers["Authorization"] = authorization
        proxy = self.proxies.for_url(url)
        if proxy is not None and not proxy.startswith(("http://", "https://")):
            # aiohttp speaks HTTP proxies only; the registry (Go) does SOCKS5 too, so this says nothing about the mirror.
            return UpstreamCheck(None, REASON_UNREACHABLE, f"{what} is reached through the SOCKS proxy {proxy}, which the check cannot use")
        try:
            async with self.session.get(url, headers=headers, allow_redirects=False, proxy=proxy) as resp:
                values = resp.headers.getall("WWW-Authenticate", [])[:MAX_CHALLENGE_HEADERS]
                return _Response(resp.status, tuple(parse_challenges(values)), resp.headers.get("Location"))
        except aiohttp.ClientSSLError as exc:
            return UpstreamCheck(None, REASON_TLS_ERROR, f"TLS with {what} failed: {exc}")
        except (aiohttp.ClientConnectionError, OSError) as exc:
            via = f" (through the proxy {proxy})" if proxy else ""
            return UpstreamCheck(None, REASON_UNREACHABLE, f"{what} did not answer{via}: {type(exc).__name__}: {exc}")
        except aiohttp.ClientError as exc:
            return UpstreamCheck(None, REASON_UNEXPECTED_RESPONSE, f"{what} did not answer valid HTTP: {type(exc).__name__}: {exc}")


def _unexpected(what: str, resp: _Response) -> UpstreamCheck:
    detail = f" (redirects to {_shown(resp.location)}; use the final URL)" if resp.location and 300 <= resp.status < 400 else ""
    return UpstreamCheck(None, REASON_UNEXPECTED_RESPONSE, f"{what} answered HTTP {resp.status}{detail}")


async def _token(client: _Client, upstream: URL, challenge: Challenge, auth: str | None) -> UpstreamCheck:
    """Step 3: ask the Bearer realm for a token, with the credentials only where they may go."""
    shown = _shown(upstream)
    realm = http_url(challenge.params["realm"])
    if realm is None:
        return UpstreamCheck(
            None,
            REASON_INVALID_TOKEN_REALM,
            f"{shown} names the token service {_shown(challenge.params['realm'])!r}, which is not an http(s) URL with a valid host and port",
        )
    service = f"the token service {_shown(realm)} of {shown}"
    if auth is not None and not may_carry_credentials(realm, upstream):
        # Unknown, not False: the mirror may well work; it is the clear text the admin must hear about.
        return UpstreamCheck(
            None,
            REASON_INSECURE_TOKEN_REALM,
            f"{shown} sends clients to its token service {_shown(realm)} over plain http, so the check did not send the "
            "configured credentials there; the mirror does, in clear text. The token service must use https "
            "(or be the plain-http upstream itself)",
        )
    query = {key: challenge.params[key] for key in ("service", "scope") if challenge.params.get(key)}
    token = await client.get(realm.extend_query(query), service, auth)
    if isinstance(token, UpstreamCheck):
        return token
    if token.status == 200:
        if auth is not None:
            return UpstreamCheck(True, REASON_AUTHENTICATED, f"{service} accepted the configured credentials")
        return UpstreamCheck(True, REASON_ANONYMOUS, f"{service} grants anonymous tokens")
    if token.status in (401, 403):
        if auth is not None:
            return UpstreamCheck(
                False,
                REASON_CREDENTIALS_REJECTED,
                f"{service} rejected the configured credentials (HTTP {token.status}); pulls through the mirror fail for anything not already cached",
            )
        return UpstreamCheck(
            False, REASON_CREDENTIALS_REJECTED, f"{shown} requires credentials (token service HTTP {token.status}) and none are configured"
        )
    return _unexpected(service, token)


async def _handshake(client: _Client, upstream: URL, auth: str | None) -> UpstreamCheck:
    shown = _shown(upstream)
    ping = upstream.with_path(upstream.path.rstrip("/") + "/v2/").with_query(None)
    first = await client.get(ping, f"{shown}/v2/")
    if isinstance(first, UpstreamCheck):
        return first
    if first.status == 200:
        needless = "; the configured credentials were not needed" if auth is not None else ""
        return UpstreamCheck(True, REASON_ANONYMOUS, f"{shown} answers without authentication{needless}")
    if first.status != 401:
        return _unexpected(f"{shown}/v2/", first)
    bearer = next((c for c in first.challenges if c.scheme == "bearer" and c.params.get("realm")), None)
    if bearer is not None:
        return await _token(client, upstream, bearer, auth)
    if any(c.scheme == "basic" for c in first.challenges):
        if auth is None:
            return UpstreamCheck(
                False, REASON_CREDENTIALS_REJECTED, f"{shown} requires basic authentication and no credentials are configured"
            )
        second = await client.get(ping, f"{shown}/v2/ with credentials", auth)
        if isinstance(second, UpstreamCheck):
            return second
        if second.status == 200:
            return UpstreamCheck(True, REASON_AUTHENTICATED, f"{shown} accepted the configured credentials (basic authentication)")
        if second.status in (401, 403):
            return UpstreamCheck(
                False,
                REASON_CREDENTIALS_REJECTED,
                f"{shown} rejected the configured credentials (basic authentication, HTTP {second.status}); "
                "pulls through the mirror fail for anything not already cached",
            )
        return _unexpected(f"{shown}/v2/ with credentials", second)
    offered = ", ".join(sorted({c.scheme for c in first.challenges})) or "no WWW-Authenticate challenge"
    return UpstreamCheck(None, REASON_UNEXPECTED_RESPONSE, f"{shown}/v2/ answered HTTP 401 with {offered}; expected Basic or Bearer")


async def _check(url: str, auth: str | None, ca_pem: str | bytes | None, deadline: float, proxies: Proxies) -> UpstreamCheck:
    upstream = http_url(url)
    if upstream is None:
        return UpstreamCheck(None, REASON_INVALID_URL, "spec.upstream.url is not an http(s) URL with a valid host and a port in 1-65535")
    context = trust_context(ca_pem)
    if context is None:
        return UpstreamCheck(
            None,
            REASON_INVALID_CA,
            "the upstream CA (spec.upstream.tls.caSecretRef) holds no usable PEM certificate "
            "(a DER file? convert it: openssl x509 -inform der -in ca.der -out ca.crt)",
        )
    connector = aiohttp.TCPConnector(ssl=context, force_close=True)
    async with aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=False) as session:
        client = _Client(session, proxies)
        try:
            async with asyncio.timeout(deadline):
                return await _handshake(client, upstream, auth)
        except TimeoutError:
            return UpstreamCheck(None, REASON_UNREACHABLE, f"{client.step} did not answer within the {deadline:g} s the check may take")


async def check_upstream_async(
    url: str,
    username: str | None,
    password: str | None,
    ca_pem: str | bytes | None = None,
    deadline: float = DEFAULT_DEADLINE,
    proxies: Proxies | None = None,
) -> UpstreamCheck:
    """Perform the registry auth handshake against `url` and say whether the credentials work; never raises.

    Without credentials (no username, or password None) it says whether
    anonymous access works. `ca_pem` is the extra CA bundle (text or bytes).
    `proxies`: the mirror's spec.proxy. Returns within `deadline` seconds, all
    requests together.
    """
    encoded = ""
    if username and password is not None:
        encoded = base64.b64encode(f"{username}:{password}".encode(errors="surrogatepass")).decode()
    auth = f"Basic {encoded}" if encoded else None
    try:
        result = await _check(url, auth, ca_pem, deadline, proxies or Proxies())
    except Exception as exc:  # the contract is a verdict, whatever happens; the tests search for this branch
        result = UpstreamCheck(None, REASON_CHECK_FAILED, f"the check failed unexpectedly: {type(exc).__name__}")
    # A hostile upstream may echo what it received; none of it reaches status, not even base64-encoded.
    return UpstreamCheck(result.ok, result.reason, _clean(result.message, (password or "", username or "", encoded)))


def check_upstream(
    url: str,
    username: str | None,
    password: str | None,
    ca_pem: str | bytes | None = None,
    deadline: float = DEFAULT_DEADLINE,
    proxies: Proxies | None = None,
) -> UpstreamCheck:
    """The blocking form of `check_upstream_async`, for worker threads (it runs its own event loop)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        loop = asyncio.new_event_loop()
        try:
            return loop.run_until_complete(check_upstream_async(url, username, password, ca_pem, deadline, proxies))
        finally:
            # Not asyncio.run: it waits for the default executor, where a hung DNS lookup may outlive the deadline.
            loop.run_until_complete(asyncio.sleep(0))  # one more turn: closed connections release their sockets
            loop.close()
    with ThreadPoolExecutor(1) as pool:  # called on an event loop's thread: run on a fresh loop elsewhere
        return pool.submit(check_upstream, url, username, password, ca_pem, deadline, proxies).result()
