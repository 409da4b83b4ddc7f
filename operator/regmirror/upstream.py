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

Nothing here logs, and no message ever contains the password. Redirects are
not followed: credentials must not travel to a host the user did not name.
"""

from __future__ import annotations

import base64
import http.client
from dataclasses import dataclass
from urllib.parse import urlencode, urlsplit, urlunsplit

from regmirror.lowlevel import http_connection

REASON_AUTHENTICATED = "Authenticated"
REASON_ANONYMOUS = "Anonymous"
REASON_CREDENTIALS_REJECTED = "CredentialsRejected"
REASON_UNREACHABLE = "Unreachable"
REASON_UNEXPECTED_RESPONSE = "UnexpectedResponse"

USER_AGENT = "regmirror-operator"
MAX_BODY = 64 * 1024


@dataclass(frozen=True)
class UpstreamCheck:
    """The verdict: ok None means the check could not tell (unreachable, odd answer)."""

    ok: bool | None
    reason: str
    message: str


@dataclass(frozen=True)
class Challenge:
    """One `WWW-Authenticate` challenge: scheme (lower-case) and its parameters."""

    scheme: str
    params: dict[str, str]


@dataclass(frozen=True)
class _Response:
    status: int
    challenges: tuple[Challenge, ...]
    location: str | None


def parse_challenges(headers: list[str]) -> list[Challenge]:
    """Parse `WWW-Authenticate` values (RFC 7235 auth-params, quoted strings with commas allowed)."""
    challenges: list[Challenge] = []
    for header in headers:
        i, n = 0, len(header)
        current: Challenge | None = None
        while i < n:
            while i < n and header[i] in " ,\t":
                i += 1
            start = i
            while i < n and header[i] not in " =,\t":
                i += 1
            token = header[start:i]
            if not token:
                break
            j = i
            while j < n and header[j] in " \t":
                j += 1
            if j < n and header[j] == "=" and current is not None:
                # key=value (value a token or a quoted string)
                i = j + 1
                while i < n and header[i] in " \t":
                    i += 1
                if i < n and header[i] == '"':
                    i += 1
                    chars: list[str] = []
                    while i < n and header[i] != '"':
                        if header[i] == "\\" and i + 1 < n:
                            i += 1
                        chars.append(header[i])
                        i += 1
                    i += 1
                    value = "".join(chars)
                else:
                    start = i
                    while i < n and header[i] not in ",":
                        i += 1
                    value = header[start:i].strip()
                current.params[token.lower()] = value
            else:
                current = Challenge(token.lower(), {})
                challenges.append(current)
    return challenges


def _basic(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


def _redact(url: str) -> str:
    """The URL without any userinfo, for messages."""
    parts = urlsplit(url)
    netloc = parts.hostname or ""
    if parts.port:
        netloc = f"{netloc}:{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))


def _get(url: str, authorization: str | None, ca_pem: str | None, timeout: float) -> _Response:
    """One GET, no redirects followed; raises OSError / HTTPException when nothing answers."""
    conn, parts = http_connection(url, timeout, ca_pem)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    headers = {"User-Agent": USER_AGENT, "Accept": "application/json"}
    if authorization:
        headers["Authorization"] = authorization
    try:
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        resp.read(MAX_BODY)
        return _Response(resp.status, tuple(parse_challenges(resp.headers.get_all("WWW-Authenticate") or [])), resp.headers.get("Location"))
    finally:
        conn.close()


def _unexpected(what: str, resp: _Response) -> UpstreamCheck:
    detail = f" (redirects to {_redact(resp.location)}; use the final URL)" if resp.location and 300 <= resp.status < 400 else ""
    return UpstreamCheck(None, REASON_UNEXPECTED_RESPONSE, f"{what} answered HTTP {resp.status}{detail}")


def _check(url: str, username: str | None, password: str | None, ca_pem: str | None, timeout: float) -> UpstreamCheck:
    base = url.rstrip("/")
    shown = _redact(base)
    has_creds = bool(username) and password is not None
    auth = _basic(username or "", password or "") if has_creds else None
    ping = f"{base}/v2/"
    try:
        first = _get(ping, None, ca_pem, timeout)
    except (OSError, http.client.HTTPException) as exc:
        return UpstreamCheck(None, REASON_UNREACHABLE, f"{shown}/v2/ did not answer: {type(exc).__name__}: {exc}")
    if first.status == 200:
        if has_creds:
            return UpstreamCheck(True, REASON_ANONYMOUS, f"{shown} answers without authentication; the credentials were not needed")
        return UpstreamCheck(True, REASON_ANONYMOUS, f"{shown} answers without authentication")
    if first.status != 401:
        return _unexpected(f"{shown}/v2/", first)

    schemes = {c.scheme: c for c in first.challenges}
    if "bearer" in schemes and schemes["bearer"].params.get("realm"):
        challenge = schemes["bearer"]
        query = {k: challenge.params[k] for k in ("service", "scope") if challenge.params.get(k)}
        realm = challenge.params["realm"]
        token_url = realm + (("&" if "?" in realm else "?") + urlencode(query) if query else "")
        shown_realm = _redact(realm)
        try:
            token = _get(token_url, auth, ca_pem, timeout)
        except (OSError, http.client.HTTPException) as exc:
            return UpstreamCheck(
                None, REASON_UNREACHABLE, f"the token service {shown_realm} of {shown} did not answer: {type(exc).__name__}: {exc}"
            )
        if token.status == 200:
            if has_creds:
                return UpstreamCheck(True, REASON_AUTHENTICATED, f"the token service {shown_realm} of {shown} accepted user {username!r}")
            return UpstreamCheck(True, REASON_ANONYMOUS, f"the token service {shown_realm} of {shown} grants anonymous tokens")
        if token.status in (401, 403):
            if has_creds:
                return UpstreamCheck(
                    False,
                    REASON_CREDENTIALS_REJECTED,
                    f"the token service {shown_realm} of {shown} rejected user {username!r} (HTTP {token.status}); "
                    "pulls through the mirror fail for anything not already cached",
                )
            return UpstreamCheck(
                False,
                REASON_CREDENTIALS_REJECTED,
                f"{shown} requires credentials (token service HTTP {token.status}) and none are configured",
            )
        return _unexpected(f"the token service {shown_realm} of {shown}", token)

    if "basic" in schemes:
        if not has_creds:
            return UpstreamCheck(
                False, REASON_CREDENTIALS_REJECTED, f"{shown} requires basic authentication and no credentials are configured"
            )
        try:
            second = _get(ping, auth, ca_pem, timeout)
        except (OSError, http.client.HTTPException) as exc:
            return UpstreamCheck(None, REASON_UNREACHABLE, f"{shown}/v2/ did not answer: {type(exc).__name__}: {exc}")
        if second.status == 200:
            return UpstreamCheck(True, REASON_AUTHENTICATED, f"{shown} accepted user {username!r} (basic authentication)")
        if second.status in (401, 403):
            return UpstreamCheck(
                False,
                REASON_CREDENTIALS_REJECTED,
                f"{shown} rejected user {username!r} (basic authentication, HTTP {second.status}); "
                "pulls through the mirror fail for anything not already cached",
            )
        return _unexpected(f"{shown}/v2/ with credentials", second)

    offered = ", ".join(sorted(schemes)) or "no WWW-Authenticate challenge"
    return UpstreamCheck(None, REASON_UNEXPECTED_RESPONSE, f"{shown}/v2/ answered HTTP 401 with {offered}; expected Basic or Bearer")


def check_upstream(
    url: str,
    username: str | None,
    password: str | None,
    ca_pem: str | None = None,
    timeout: float = 5.0,
) -> UpstreamCheck:
    """Perform the registry auth handshake against `url` and say whether the credentials work.

    Without credentials the check says whether anonymous access works. The
    returned message never contains the password (it is redacted as a last
    guard should a server echo it back).
    """
    result = _check(url, username, password, ca_pem, timeout)
    if password and password in result.message:
        result = UpstreamCheck(result.ok, result.reason, result.message.replace(password, "***"))
    return result
