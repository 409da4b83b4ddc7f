"""check_upstream against a tiny local registry stand-in (http.server on loopback), one case per answer."""

from __future__ import annotations

import base64
import socket
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest

from regmirror.upstream import UpstreamCheck, check_upstream, parse_challenges

USER, PASSWORD = "puller", "s3cret-Pa55"

Route = Callable[[BaseHTTPRequestHandler], tuple[int, dict[str, str]]]


def _authorized(req: BaseHTTPRequestHandler) -> bool:
    return req.headers.get("Authorization") == "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()


@pytest.fixture
def server() -> Iterator[Callable[[Route], str]]:
    """Start a server whose every GET is answered by `route`; returns its base URL."""
    started: list[ThreadingHTTPServer] = []

    def start(route: Route) -> str:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                status, headers = route(self)
                body = b"{}"
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                return

        httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True).start()
        started.append(httpd)
        return f"http://127.0.0.1:{httpd.server_address[1]}"

    yield start
    for httpd in started:
        httpd.shutdown()
        httpd.server_close()


def basic_registry(req: BaseHTTPRequestHandler) -> tuple[int, dict[str, str]]:
    if _authorized(req):
        return 200, {}
    return 401, {"WWW-Authenticate": 'Basic realm="Registry Realm"'}


def bearer_registry(base: list[str], *, anonymous: bool = False, deny: int = 401) -> Route:
    """/v2/ asks for a token from /token; the token service wants the right basic auth (or none if anonymous)."""

    def route(req: BaseHTTPRequestHandler) -> tuple[int, dict[str, str]]:
        parts = urlsplit(req.path)
        if parts.path == "/v2/":
            return 401, {"WWW-Authenticate": f'Bearer realm="{base[0]}/token",service="registry.test",scope="repository:a/b:pull"'}
        if parts.path == "/token":
            query = parse_qs(parts.query)
            assert query["service"] == ["registry.test"], query
            if _authorized(req) or (anonymous and "Authorization" not in req.headers):
                return 200, {"Content-Type": "application/json"}
            return deny, {}
        return 404, {}

    return route


def assert_no_password(check: UpstreamCheck) -> None:
    assert PASSWORD not in check.message
    assert "wrong-password" not in check.message


def test_open_registry_is_anonymous(server: Callable[[Route], str]) -> None:
    url = server(lambda _req: (200, {}))
    check = check_upstream(url, None, None)
    assert (check.ok, check.reason) == (True, "Anonymous")


def test_basic_auth_right_credentials(server: Callable[[Route], str]) -> None:
    check = check_upstream(server(basic_registry), USER, PASSWORD)
    assert (check.ok, check.reason) == (True, "Authenticated")
    assert USER in check.message
    assert_no_password(check)


def test_basic_auth_wrong_credentials(server: Callable[[Route], str]) -> None:
    check = check_upstream(server(basic_registry), USER, "wrong-password")
    assert (check.ok, check.reason) == (False, "CredentialsRejected")
    assert "rejected" in check.message
    assert_no_password(check)


def test_basic_auth_without_credentials(server: Callable[[Route], str]) -> None:
    check = check_upstream(server(basic_registry), None, None)
    assert (check.ok, check.reason) == (False, "CredentialsRejected")
    assert "no credentials" in check.message


def test_bearer_right_credentials(server: Callable[[Route], str]) -> None:
    base: list[str] = []
    base.append(server(bearer_registry(base)))
    check = check_upstream(base[0], USER, PASSWORD)
    assert (check.ok, check.reason) == (True, "Authenticated")
    assert_no_password(check)


@pytest.mark.parametrize("deny", [401, 403])
def test_bearer_wrong_credentials(server: Callable[[Route], str], deny: int) -> None:
    base: list[str] = []
    base.append(server(bearer_registry(base, deny=deny)))
    check = check_upstream(base[0], USER, "wrong-password")
    assert (check.ok, check.reason) == (False, "CredentialsRejected")
    assert f"HTTP {deny}" in check.message
    assert_no_password(check)


def test_bearer_anonymous_token(server: Callable[[Route], str]) -> None:
    base: list[str] = []
    base.append(server(bearer_registry(base, anonymous=True)))
    check = check_upstream(base[0], None, None)
    assert (check.ok, check.reason) == (True, "Anonymous")


def test_unreachable_cannot_tell() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    check = check_upstream(f"http://127.0.0.1:{port}", USER, PASSWORD, timeout=1)
    assert (check.ok, check.reason) == (None, "Unreachable")
    assert_no_password(check)


def test_server_error_is_unexpected(server: Callable[[Route], str]) -> None:
    check = check_upstream(server(lambda _req: (503, {})), USER, PASSWORD)
    assert (check.ok, check.reason) == (None, "UnexpectedResponse")
    assert "503" in check.message


def test_redirect_is_not_followed_with_credentials(server: Callable[[Route], str]) -> None:
    seen: list[str] = []

    def record(req: BaseHTTPRequestHandler) -> tuple[int, dict[str, str]]:
        seen.append(req.headers.get("Authorization", ""))
        return 200, {}

    elsewhere = server(record)
    check = check_upstream(server(lambda _req: (301, {"Location": f"{elsewhere}/v2/"})), USER, PASSWORD)
    assert (check.ok, check.reason) == (None, "UnexpectedResponse")
    assert seen == []


def test_unknown_challenge_is_unexpected(server: Callable[[Route], str]) -> None:
    check = check_upstream(server(lambda _req: (401, {"WWW-Authenticate": 'Negotiate realm="x"'})), USER, PASSWORD)
    assert (check.ok, check.reason) == (None, "UnexpectedResponse")
    assert "negotiate" in check.message


def test_userinfo_in_url_is_not_echoed(server: Callable[[Route], str]) -> None:
    url = server(lambda _req: (500, {}))
    check = check_upstream(url.replace("http://", f"http://{USER}:{PASSWORD}@"), None, None)
    assert_no_password(check)


def test_parse_challenges_quoted_commas() -> None:
    [bearer] = parse_challenges(['Bearer realm="https://auth.example/token",service="a,b",scope="repository:x/y:pull,push"'])
    assert bearer.scheme == "bearer"
    assert bearer.params == {"realm": "https://auth.example/token", "service": "a,b", "scope": "repository:x/y:pull,push"}
    [basic] = parse_challenges(['Basic realm="Registry Realm"'])
    assert (basic.scheme, basic.params) == ("basic", {"realm": "Registry Realm"})
