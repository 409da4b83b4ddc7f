"""The sidecar's own requests to the upstream: a health probe and rate-limit reads, never pulls.

Only `GET /v2/` and `HEAD .../manifests/<ref>` are sent: Docker Hub counts a
manifest GET as a pull and a HEAD as none, and a HEAD carries the
`ratelimit-limit` / `ratelimit-remaining` headers prewarming paces itself by.
Credentials (the registry container's REGISTRY_PROXY_USERNAME / _PASSWORD) are
sent only to the upstream or the token realm it names, and never logged.
"""

from __future__ import annotations

import base64
import json
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

MANIFEST_ACCEPT = ", ".join(
    (
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    )
)
USER_AGENT = "regmirror-cache"
_CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')


def healthy_status(status: int) -> bool:
    """Whether a `GET /v2/` answer means the upstream serves: 200, or 401 (it wants a token)."""
    return status in (200, 401)


def probe(url: str, timeout: float) -> bool:
    """GET <upstream>/v2/ once; True when it answers as a working registry does."""
    req = urllib.request.Request(f"{url}/v2/", headers={"User-Agent": USER_AGENT})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return healthy_status(resp.status)
    except urllib.error.HTTPError as err:
        return healthy_status(err.code)
    except (OSError, ValueError):
        return False


@dataclass(frozen=True)
class RateLimit:
    """The upstream's pull budget, when it says (Docker Hub: `100;w=21600`)."""

    limit: int
    remaining: int
    window_seconds: int


def parse_rate_limit(limit: str | None, remaining: str | None) -> RateLimit | None:
    """RateLimit from the two headers; None when the upstream sends none (no limit to respect)."""
    if remaining is None:
        return None

    def parts(value: str) -> tuple[int, int]:
        count, _, rest = value.partition(";")
        window = re.search(r"w=(\d+)", rest)
        return int(count.strip()), int(window.group(1)) if window else 0

    try:
        left, window = parts(remaining)
        total, total_window = parts(limit) if limit else (left, window)
    except ValueError:
        return None
    return RateLimit(total, left, window or total_window)


@dataclass(frozen=True)
class Head:
    """What a HEAD of a manifest told."""

    status: int
    digest: str | None
    rate_limit: RateLimit | None


class UpstreamClient:
    """HEADs of manifests on the upstream, answering its token challenge like a registry client."""

    def __init__(self, url: str, timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        user, password = os.environ.get("REGISTRY_PROXY_USERNAME"), os.environ.get("REGISTRY_PROXY_PASSWORD")
        self._basic = base64.b64encode(f"{user}:{password}".encode()).decode() if user and password else None

    def head_manifest(self, repository: str, reference: str) -> Head:
        """HEAD /v2/<repository>/manifests/<reference>, authenticating when challenged."""
        target = f"{self.url}/v2/{repository}/manifests/{reference}"
        status, headers = self._head(target, None)
        if status == 401:
            auth = self._authorization(headers.get("www-authenticate", ""), repository)
            if auth is not None:
                status, headers = self._head(target, auth)
        return Head(
            status,
            headers.get("docker-content-digest"),
            parse_rate_limit(headers.get("ratelimit-limit"), headers.get("ratelimit-remaining")),
        )

    def _head(self, url: str, authorization: str | None) -> tuple[int, dict[str, str]]:
        headers = {"Accept": MANIFEST_ACCEPT, "User-Agent": USER_AGENT}
        if authorization:
            headers["Authorization"] = authorization
        req = urllib.request.Request(url, method="HEAD", headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return resp.status, {k.lower(): v for k, v in resp.headers.items()}
        except urllib.error.HTTPError as err:
            return err.code, {k.lower(): v for k, v in err.headers.items()}
        except (OSError, ValueError):
            return 0, {}

    def _authorization(self, challenge: str, repository: str) -> str | None:
        scheme, _, params_text = challenge.partition(" ")
        if scheme.lower() == "basic":
            return f"Basic {self._basic}" if self._basic else None
        if scheme.lower() != "bearer":
            return None
        params = dict(_CHALLENGE_PARAM.findall(params_text))
        realm = params.get("realm", "")
        if not realm.startswith(("https://", "http://")):
            return None
        query = {"scope": f"repository:{repository}:pull"}
        if params.get("service"):
            query["service"] = params["service"]
        headers = {"User-Agent": USER_AGENT}
        if self._basic:
            headers["Authorization"] = f"Basic {self._basic}"
        req = urllib.request.Request(f"{realm}?{urllib.parse.urlencode(query)}", headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                doc = json.loads(resp.read(1 << 20))
        except (OSError, ValueError):
            return None
        token = doc.get("token") or doc.get("access_token") if isinstance(doc, dict) else None
        return f"Bearer {token}" if isinstance(token, str) else None
