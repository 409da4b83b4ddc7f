"""Small stdlib-only helpers shared by the operator and the node agent.

The agent must stay light (no pydantic, no kubernetes client: its memory budget
is per node), so what both sides need lives here, with no imports beyond the
standard library:

- label-selector matching, failing closed on an operator it does not know;
- the grammar of registry hosts and mirror URLs as containerd looks them up
  (`canonical_registry_host`, `parse_endpoint`): everything that becomes a
  directory name or a TOML key passes through here first;
- CA bundles (`parse_ca_bundle`): only certificates that really parse, in
  canonical ASCII PEM, whatever comments, DER or garbage came in;
- an HTTP(S) connection that never raises on bad CA bytes or ports.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import ipaddress
import re
import ssl
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final, Protocol
from urllib.parse import SplitResult, urlsplit

# Docker Hub: the name image references use, the names that mean the same
# registry, and the host that serves it. (constants.py holds the same names for
# the operator; these are the ones the grammar below folds.)
DOCKER_HUB: Final = "docker.io"
DOCKER_HUB_ALIASES: Final = ("index.docker.io", "registry-1.docker.io")
DOCKER_HUB_SERVER: Final = "https://registry-1.docker.io"

SELECTOR_OPERATORS: Final = frozenset({"In", "NotIn", "Exists", "DoesNotExist"})


def mirror_order_key(priority: int, name: str) -> tuple[int, str]:
    """Sort key of mirrors: higher priority first, then name; the one order used everywhere."""
    return (-priority, name)


class Requirement(Protocol):
    """One set-based requirement of a label selector (models' and the agent's both fit)."""

    @property
    def key(self) -> str: ...

    @property
    def operator(self) -> str: ...

    @property
    def values(self) -> Iterable[str]: ...


def selector_matches(match_labels: Mapping[str, str], match_expressions: Iterable[Requirement], labels: Mapping[str, str]) -> bool:
    """Kubernetes label-selector semantics: all matchLabels and all matchExpressions hold.

    An operator other than In, NotIn, Exists and DoesNotExist matches nothing:
    a selector we cannot evaluate must not put a mirror on every node.
    """
    if any(labels.get(k) != v for k, v in match_labels.items()):
        return False
    for req in match_expressions:
        present = req.key in labels
        operator = str(getattr(req.operator, "value", req.operator))
        if operator == "In":
            if not (present and labels[req.key] in req.values):
                return False
        elif operator == "NotIn":
            if present and labels[req.key] in req.values:
                return False
        elif operator == "Exists":
            if not present:
                return False
        elif operator == "DoesNotExist":
            if present:
                return False
        else:
            return False
    return True


# ---------------------------------------------------------------- registry hosts

# The domain of an image reference (distribution/reference grammar): DNS-like
# components of letters, digits and inner hyphens, or a bracketed IPv6
# literal, then an optional port. No underscore, no empty component, no slash:
# so a host can never name another directory.
_COMPONENT = r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?"
_HOST_RE = re.compile(rf"(?:(?P<name>{_COMPONENT}(?:\.{_COMPONENT})*)|\[(?P<ip6>[0-9a-f:.]+)\])(?::(?P<port>[0-9]{{1,5}}))?")
MAX_HOST_LENGTH: Final = 253 + 1 + 5


def canonical_registry_host(host: str) -> str:
    """A registry host as an image reference names it, in the one spelling nodes use.

    ASCII only, lower-cased, validated against the reference grammar, with a
    port in 1-65535 kept as written (containerd looks `host:port` up
    literally, so `example.com:443` is not `example.com`), and Docker Hub's
    other names folded into docker.io. Raises ValueError saying what is wrong.

    Why lower case: DNS names are case-insensitive, but containerd looks the
    host directory up with the exact spelling of the reference, and no number
    of directories covers every mixed-case spelling. One canonical spelling
    (the one every registry documents) gives one directory per registry.
    """
    if not isinstance(host, str) or not host:
        raise ValueError("a registry host must be a non-empty string")
    if len(host) > MAX_HOST_LENGTH or not host.isascii():
        raise ValueError(f"{_shown(host)} is not a registry host (ASCII, at most {MAX_HOST_LENGTH} characters)")
    lowered = host.lower()
    match = _HOST_RE.fullmatch(lowered)
    if match is None:
        raise ValueError(f"{_shown(host)} is not a registry host (host or host:port as in an image reference)")
    name, ip6, port = match.group("name"), match.group("ip6"), match.group("port")
    if name is not None and (len(name) > 253 or any(len(label) > 63 for label in name.split("."))):
        raise ValueError(f"{_shown(host)}: a DNS name has labels of at most 63 and 253 characters in all")
    if ip6 is not None:
        try:
            ipaddress.IPv6Address(ip6)
        except ValueError:
            raise ValueError(f"{_shown(host)}: [{ip6}] is not an IPv6 address") from None
    if port is not None and not 1 <= int(port) <= 65535:
        raise ValueError(f"{_shown(host)}: port {port} is outside 1-65535")
    return DOCKER_HUB if lowered in DOCKER_HUB_ALIASES else lowered


def registry_host_spellings(canonical: str) -> tuple[str, ...]:
    """Every spelling of a canonical host that reaches a node's runtime as a different name.

    distribution's reference parser folds index.docker.io into docker.io,
    but keeps registry-1.docker.io; clients that do not normalise (ctr) keep
    both. So Docker Hub has three names a host directory may be looked up
    under; every other registry has one.
    """
    return (DOCKER_HUB, *DOCKER_HUB_ALIASES) if canonical == DOCKER_HUB else (canonical,)


def default_registry_server(canonical: str) -> str:
    """The endpoint containerd uses for a host it has no configuration for."""
    return DOCKER_HUB_SERVER if canonical == DOCKER_HUB else f"https://{canonical}"


@dataclass(frozen=True)
class Endpoint:
    """A registry endpoint a node connects to: scheme://host[:port], nothing else."""

    scheme: str
    host: str  # host[:port], lower-case, validated (Docker Hub's names not folded)

    @property
    def url(self) -> str:
        """The canonical spelling, used in every file and comparison."""
        return f"{self.scheme}://{self.host}"


def parse_endpoint(url: str) -> Endpoint:
    """An http(s) URL with a host and optional port, and no user, path, query or fragment.

    Raises ValueError. Mirror URLs and `server` values in a node's files pass
    through here, so what is written is always a plain origin.
    """
    if not isinstance(url, str) or len(url) > 2048 or not url.isascii() or any(ch.isspace() or ord(ch) < 32 for ch in url):
        raise ValueError(f"{_shown(url)} is not an http(s) URL")
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise ValueError(f"{_shown(url)} is not an http(s) URL: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise ValueError(f"{_shown(url)}: the scheme must be http or https")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise ValueError(f"{_shown(url)}: credentials do not belong in a URL")
    if parts.path not in ("", "/") or parts.query or parts.fragment or url.endswith(("?", "#")):
        raise ValueError(f"{_shown(url)}: only scheme://host[:port] is allowed")
    host = parts.netloc.lower()
    # Through the same grammar as registry hosts, without folding Docker Hub's names.
    if not host or host.endswith(":") or _HOST_RE.fullmatch(host) is None:
        raise ValueError(f"{_shown(url)}: {_shown(host)} is not a host[:port]")
    canonical_registry_host(host)
    return Endpoint(scheme=scheme, host=host)


def _shown(value: object, limit: int = 80) -> str:
    """A value for an error message: repr'd (newlines and quotes escaped) and cut short."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------- CA bundles

_PEM_BLOCK = re.compile(rb"-----BEGIN CERTIFICATE-----\r?\n(?P<body>[A-Za-z0-9+/=\r\n]*?)-----END CERTIFICATE-----")


class CAError(ValueError):
    """CA bytes from which no certificate can be loaded."""


@dataclass(frozen=True)
class CABundle:
    """The certificates of a CA bundle that really load, as canonical ASCII PEM."""

    pem: str
    certificates: int
    skipped: int  # PEM blocks that did not parse (dropped)


def _one_der_sequence(der: bytes) -> bool:
    """Whether `der` is exactly one DER SEQUENCE (a certificate), with nothing after it.

    OpenSSL loads several concatenated DER certificates from one buffer, but
    Go's x509 parser refuses trailing data; one certificate per PEM block is
    what both accept.
    """
    if len(der) < 2 or der[0] != 0x30:
        return False
    first = der[1]
    if first < 0x80:
        return len(der) == 2 + first
    count = first & 0x7F
    if not 1 <= count <= 4 or len(der) < 2 + count:
        return False
    return len(der) == 2 + count + int.from_bytes(der[2 : 2 + count], "big")


def _loads(der: bytes) -> bool:
    if not _one_der_sequence(der):
        return False
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=der)
    except (ssl.SSLError, ValueError, TypeError):
        return False
    return True


def parse_ca_bundle(data: str | bytes) -> CABundle:
    """Every certificate in a PEM bundle (or one DER certificate) that loads; raises CAError if none does.

    Comments, headers and any non-ASCII text between PEM blocks are dropped,
    as Go's PEM reader (containerd) skips them, but Python's ssl refuses
    them outright. Blocks that do not parse are dropped too (Go's
    AppendCertsFromPEM skips those). What comes out is plain ASCII that both
    readers accept: containerd gets exactly the certificates the probe trusts.
    """
    raw = data.encode("utf-8", "surrogateescape") if isinstance(data, str) else bytes(data)
    blocks = list(_PEM_BLOCK.finditer(raw))
    ders: list[bytes] = []
    skipped = 0
    for block in blocks:
        try:
            der = base64.b64decode(re.sub(rb"\s+", b"", block.group("body")), validate=True)
        except (binascii.Error, ValueError):
            skipped += 1
            continue
        if der and _loads(der):
            ders.append(der)
        else:
            skipped += 1
    if not blocks and raw and b"-----BEGIN" not in raw and _loads(raw):
        ders.append(raw)  # one DER certificate, as a Secret may hold it
    if not ders:
        what = f"{len(blocks)} PEM block(s), none a certificate that loads" if blocks else "no PEM certificate and no DER certificate"
        raise CAError(f"unusable CA bundle: {what}")
    pem = "".join(ssl.DER_cert_to_PEM_cert(der) for der in ders)
    return CABundle(pem=pem, certificates=len(ders), skipped=skipped)


def ssl_context(ca_pem: str | bytes | None = None) -> ssl.SSLContext:
    """A verifying client context: system roots, plus the bundle's certificates. Raises CAError."""
    context = ssl.create_default_context()
    if ca_pem:
        context.load_verify_locations(cadata=parse_ca_bundle(ca_pem).pem)
    return context


def http_connection(
    url: str, timeout: float, ca_pem: str | bytes | None = None, *, context: ssl.SSLContext | None = None
) -> tuple[http.client.HTTPConnection, SplitResult]:
    """A connection to the URL's host (TLS with an optional extra CA for https), and the parsed URL.

    `context` (for https) replaces the one built from `ca_pem`, so a caller
    that probes often can build it once. Raises ValueError (CAError for CA
    bytes that hold no certificate, or a bad port) before any connection is
    made; never a TypeError or an SSLError.
    """
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port  # ValueError for a port outside 0-65535 or not a number
    if parts.scheme == "https":
        tls = context if context is not None else ssl_context(ca_pem)
        return http.client.HTTPSConnection(host, port or 443, timeout=timeout, context=tls), parts
    return http.client.HTTPConnection(host, port or 80, timeout=timeout), parts
