"""The grammar of the RegistryMirror API, written once for the API server and for Python.

Two validators judge every RegistryMirror: the API server (OpenAPI schema and
CEL `x-kubernetes-validations`, whose `matches()` is Go's RE2) and
`regmirror render` / the operator (pydantic, Python's `re`). They must give
the same verdict on every input, so each pattern below is written in the
subset where RE2 and Python's `re` agree:

- explicit ASCII character classes only: no `\\s`, `\\d`, `\\w`, `\\b` (RE2's
  are ASCII, Python's match unicode digits and whitespace), no `.` and no
  negated class (both would let any unicode character through);
- no lookaround, backreference or flag; anchored with `^...$` (RE2 `$` is the
  end of the text; Python evaluates the same pattern with `re.fullmatch`, so a
  trailing newline cannot slip through `$`).

The functions that are not patterns (quantities, durations, IP addresses,
image references) reimplement exactly what the Go code behind the API server's
CEL functions does (`resource.ParseQuantity`, `time.ParseDuration`,
`netip.ParseAddr`, `distribution/reference`), so that their corner cases
(rounding, overflow, leading zeros) fall the same way on both sides. A
hypothesis test compares both validators on generated specs against a real
API server.
"""

from __future__ import annotations

import ipaddress
import re
from fractions import Fraction
from functools import cache

from regmirror import constants as c

# ------------------------------------------------------------------ building blocks

#: A TCP port, 1-65535, without leading zeros (a registry host `host:080` would name another directory than `host:80`).
PORT = "(6553[0-5]|655[0-2][0-9]|65[0-4][0-9][0-9]|6[0-4][0-9][0-9][0-9]|[1-5][0-9][0-9][0-9][0-9]|[1-9][0-9]{0,3})"
#: One DNS label of a registry host: letters, digits and inner hyphens, at most 63 characters.
_HOST_LABEL = "[A-Za-z0-9]([-A-Za-z0-9]{0,61}[A-Za-z0-9])?"
#: A host name (or an IPv4 address, which has the same shape); no IPv6 literal.
HOSTNAME = f"{_HOST_LABEL}([.]{_HOST_LABEL})*"
#: Kubernetes' DNS-1123 label (Service names, namespaces): lower case, at most 63 characters (length checked apart).
DNS_LABEL = "[a-z0-9]([-a-z0-9]*[a-z0-9])?"
#: Kubernetes' DNS-1123 subdomain (most object names): at most 253 characters (length checked apart).
DNS_SUBDOMAIN = f"{DNS_LABEL}([.]{DNS_LABEL})*"
#: The name part of a label key, and a non-empty label value (at most 63 characters, checked apart).
_LABEL_NAME = "([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]"

# ------------------------------------------------------------------ anchored patterns

#: A registry host as image references spell it: host or host:port.
REGISTRY_HOST_PATTERN = f"^{HOSTNAME}(:{PORT})?$"
#: The upstream: scheme, host, optional port, optional path. No userinfo (it would reach status and the
#: nodes' files in clear), no query or fragment (distribution appends /v2/... to the path).
_URL_PATH = "(/([-A-Za-z0-9._~!$&'()*+,;=:@]|%[0-9A-Fa-f][0-9A-Fa-f])*)*"
UPSTREAM_URL_PATTERN = f"^https?://{HOSTNAME}(:{PORT})?{_URL_PATH}$"
#: An outbound proxy: http, https or socks5, host and port, nothing else (no credentials in clear).
PROXY_URL_PATTERN = f"^(https?|socks5)://{HOSTNAME}(:{PORT})?/?$"
#: NO_PROXY: comma-separated `*`, hosts and domains (optionally `.` or `*.` prefixed, optionally with a port),
#: IPv4 CIDRs and IPv6 addresses or CIDRs; ASCII spaces around commas are tolerated, as Go trims them.
_IPV4 = "[0-9]{1,3}([.][0-9]{1,3}){3}"
_IPV6ISH = "[0-9A-Fa-f]{0,4}(:[0-9A-Fa-f]{0,4}){2,7}"
_NO_PROXY_ENTRY = f"([*]|[.]?([*][.])?{HOSTNAME}(:{PORT})?|{_IPV4}/[0-9]{{1,2}}|{_IPV6ISH}(/[0-9]{{1,3}})?|\\[{_IPV6ISH}\\](:{PORT})?)"
NO_PROXY_PATTERN = f"^ *{_NO_PROXY_ENTRY} *(, *{_NO_PROXY_ENTRY} *)*$"
#: A Kubernetes quantity as this API accepts it: plain decimal, optional SI or binary suffix.
QUANTITY_PATTERN = "^[0-9]+([.][0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|m|k|M|G|T|P|E)?$"
#: A Go duration without sign, or 0.
DURATION_PATTERN = "^(0|([0-9]+([.][0-9]+)?(ns|us|ms|s|m|h))+)$"
#: A RegistryMirror's name: a DNS-1123 label, because every child is named `regmirror-<name>` and a Service
#: name must be a DNS-1035 label (the prefix supplies the leading letter); the name is also a label value.
MIRROR_NAME_PATTERN = f"^{DNS_LABEL}$"
DNS_LABEL_PATTERN = f"^{DNS_LABEL}$"
DNS_SUBDOMAIN_PATTERN = f"^{DNS_SUBDOMAIN}$"
#: A label key (Kubernetes' "qualified name"): optional DNS-subdomain prefix and `/`, then the name.
QUALIFIED_NAME_PATTERN = f"^({DNS_SUBDOMAIN}/)?{_LABEL_NAME}$"
LABEL_VALUE_PATTERN = f"^({_LABEL_NAME})?$"
#: A key of a Secret or ConfigMap.
CONFIG_KEY_PATTERN = "^[-._a-zA-Z0-9]+$"
#: A whole number that fits an int64 (node affinity Gt/Lt values).
INT64_VALUE_PATTERN = "^[0-9]{1,18}$"

# An image reference, as distribution/reference (kubelet and containerd) parses it. The first path
# element is a registry host when it contains `.` or `:`, is `localhost`, or has upper case;
# otherwise the reference is on docker.io. So a first element with a dot that is followed by `/`
# must be a valid host, never a path component.
_PATH_COMPONENT = "[a-z0-9]+(([._]|__|[-]+)[a-z0-9]+)*"
_PATH_COMPONENT_NO_DOT = "[a-z0-9]+((_|__|[-]+)[a-z0-9]+)*"
_IMAGE_DOMAIN = f"({HOSTNAME}|\\[[a-fA-F0-9:]+\\])(:{PORT})?"
_IMAGE_NAME = f"({_IMAGE_DOMAIN}/{_PATH_COMPONENT}(/{_PATH_COMPONENT})*|{_PATH_COMPONENT_NO_DOT}(/{_PATH_COMPONENT})+|{_PATH_COMPONENT})"
_IMAGE_TAG = "[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
_IMAGE_DIGEST = "(sha256:[a-f0-9]{64}|sha384:[a-f0-9]{96}|sha512:[a-f0-9]{128})"
IMAGE_PATTERN = f"^{_IMAGE_NAME}(:{_IMAGE_TAG})?(@{_IMAGE_DIGEST})?$"
#: distribution/reference refuses a bare 64-hex string (it would read as an image ID).
IMAGE_ID_PATTERN = "^[a-f0-9]{64}$"
#: Longest image reference: the repository path may have 255 characters after docker.io's
#: implicit `library/` (8 characters), so 247 keeps every accepted reference parseable.
IMAGE_MAX_LENGTH = 247

#: An image to prewarm, on the mirror's own upstream: [host[:port]/]repository[:tag][@sha256:digest], lower case.
PREWARM_IMAGE_PATTERN = (
    f"^([a-z0-9]+([._-][a-z0-9]+)*(:{PORT})?/)?[a-z0-9]+([._-]+[a-z0-9]+)*(/[a-z0-9]+([._-]+[a-z0-9]+)*)*"
    "(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(@sha256:[a-f0-9]{64})?$"
)
#: A platform of a multi-platform image: os/arch[/variant].
PLATFORM_PATTERN = "^[a-z0-9]+/[a-z0-9_]+(/[a-z0-9.]+)?$"

#: An S3 bucket name (3-63 characters, lower case).
S3_BUCKET_PATTERN = "^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$"
#: A key prefix in the bucket.
S3_ROOT_PATTERN = "^/?([A-Za-z0-9_.-]+/)*[A-Za-z0-9_.-]*$"
#: An S3 region (or what an S3-compatible endpoint accepts).
S3_REGION_PATTERN = "^[a-z0-9-]{1,32}$"

DNS_LABEL_MAX = 63
DNS_SUBDOMAIN_MAX = 253
LABEL_VALUE_MAX = 63
QUALIFIED_NAME_MAX = DNS_SUBDOMAIN_MAX + 1 + 63
CONFIG_KEY_MAX = 253
#: A containerd hosts directory is named after the host (`host_port_`), and a file name has at most 255 bytes.
REGISTRY_HOST_MAX = 253

# ------------------------------------------------------------------ Python side of the same patterns


@cache
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def matches(pattern: str, value: str) -> bool:
    """Whether `value` matches an anchored pattern of this module, as RE2 would decide."""
    return _compiled(pattern).fullmatch(value) is not None


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def lower_ascii(value: str) -> str:
    """CEL's `lowerAscii()`: only A-Z change (Python's `lower()` also folds other scripts)."""
    return value.translate(_ASCII_LOWER)


def is_qualified_name(value: str) -> bool:
    """A label key: Kubernetes' IsQualifiedName (prefix at most 253, name at most 63 characters)."""
    prefix, _, name = value.rpartition("/")
    return (
        len(value) <= QUALIFIED_NAME_MAX and matches(QUALIFIED_NAME_PATTERN, value) and len(name) <= 63 and len(prefix) <= DNS_SUBDOMAIN_MAX
    )


def is_label_value(value: str) -> bool:
    """Kubernetes' IsValidLabelValue."""
    return len(value) <= LABEL_VALUE_MAX and matches(LABEL_VALUE_PATTERN, value)


def is_config_key(value: str) -> bool:
    """Kubernetes' IsConfigMapKey: the key of a Secret or ConfigMap entry."""
    return len(value) <= CONFIG_KEY_MAX and matches(CONFIG_KEY_PATTERN, value) and not value.startswith("..") and value != "."


def is_dns_subdomain(value: str) -> bool:
    """Kubernetes' IsDNS1123Subdomain."""
    return len(value) <= DNS_SUBDOMAIN_MAX and matches(DNS_SUBDOMAIN_PATTERN, value)


def is_dns_label(value: str) -> bool:
    """Kubernetes' IsDNS1123Label."""
    return len(value) <= DNS_LABEL_MAX and matches(DNS_LABEL_PATTERN, value)


def normalize_registry_host(host: str) -> str:
    """Lower-case a registry name (ASCII, as containerd compares it) and fold Docker Hub's aliases into docker.io."""
    host = lower_ascii(host)
    return c.DOCKER_HUB_NAME if host in c.DOCKER_HUB_HOSTS else host


def url_authority(url: str) -> str:
    """host[:port] of an http(s) URL that matched UPSTREAM_URL_PATTERN (CEL: `url.split('/')[2]`)."""
    parts = url.split("/")
    return parts[2] if len(parts) > 2 else ""


def registry_host_from_url(url: str) -> str:
    """The registry name an image reference uses for this URL (docker.io for Docker Hub; default ports dropped)."""
    authority = lower_ascii(url_authority(url))
    default_port = ":443" if url.startswith("https://") else ":80"
    if authority.endswith(default_port):
        authority = authority[: -len(default_port)]
    return normalize_registry_host(authority)


def image_registry_host(image: str) -> str:
    """The registry a node pulls `image` from, as distribution/reference splits it (normalised)."""
    first, slash, _ = image.partition("/")
    if not slash:
        return c.DOCKER_HUB_NAME
    if first == "localhost" or "." in first or ":" in first or lower_ascii(first) != first:
        return normalize_registry_host(first)
    return c.DOCKER_HUB_NAME


def is_image_reference(image: str) -> bool:
    """An image reference kubelet and containerd can parse (and that is not a bare image ID)."""
    return len(image) <= IMAGE_MAX_LENGTH and matches(IMAGE_PATTERN, image) and not matches(IMAGE_ID_PATTERN, image)


# ------------------------------------------------------------------ quantities (resource.ParseQuantity)

_BINARY_SUFFIXES = {"Ki": 10, "Mi": 20, "Gi": 30, "Ti": 40, "Pi": 50, "Ei": 60}
_DECIMAL_SUFFIXES = {"m": -3, "": 0, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}
_NANO = Fraction(1, 10**9)
_MAX_INT64 = 2**63 - 1


def parse_quantity(value: str) -> Fraction | None:
    """The value of a quantity as the API server holds it, or None when the pattern refuses it.

    resource.ParseQuantity rounds a non-zero amount up to the next nano unit
    and caps binary-suffixed amounts at the largest int64; a comparison of two
    quantities (requests <= limits) sees those rounded values, so this does too.
    """
    found = _compiled(QUANTITY_PATTERN).fullmatch(value)
    if found is None:
        return None
    number, suffix = value, ""
    for candidate in (*_BINARY_SUFFIXES, *_DECIMAL_SUFFIXES):
        if candidate and value.endswith(candidate):
            number, suffix = value[: -len(candidate)], candidate
            break
    amount = Fraction(number)
    if suffix in _BINARY_SUFFIXES:
        amount *= 2 ** _BINARY_SUFFIXES[suffix]
    else:
        amount *= Fraction(10) ** _DECIMAL_SUFFIXES[suffix]
    if amount and amount.denominator != 1:
        nanos = amount / _NANO
        amount = Fraction(-(-nanos.numerator // nanos.denominator)) * _NANO
    if suffix in _BINARY_SUFFIXES and amount > _MAX_INT64:
        amount = Fraction(_MAX_INT64)
    return amount


# ------------------------------------------------------------------ durations (time.ParseDuration)

_DURATION_UNITS = {"ns": 1, "us": 10**3, "µs": 10**3, "μs": 10**3, "ms": 10**6, "s": 10**9, "m": 60 * 10**9, "h": 3600 * 10**9}
_U63 = 1 << 63


def parse_go_duration(value: str) -> int | None:
    """Nanoseconds, exactly as Go's time.ParseDuration computes them (None where Go returns an error).

    Go accumulates in uint64, adds fractions through float64 and stops reading
    fraction digits once they would overflow; this follows it step by step, so
    the overflow boundary is the same as the API server's `duration()`.
    """
    s = value
    if s[:1] in ("+", "-"):
        if s[0] == "-":
            return None  # negative durations are not valid here (and the pattern refuses them)
        s = s[1:]
    if s == "0":
        return 0
    if not s:
        return None
    total = 0
    while s:
        if not (s[0] == "." or "0" <= s[0] <= "9"):
            return None
        i, whole = 0, 0
        while i < len(s) and "0" <= s[i] <= "9":
            if whole > _U63 // 10:
                return None
            whole = whole * 10 + ord(s[i]) - 48
            if whole > _U63:
                return None
            i += 1
        pre = i > 0
        s = s[i:]
        frac, scale, post = 0, 1.0, False
        if s[:1] == ".":
            s = s[1:]
            i, overflow = 0, False
            while i < len(s) and "0" <= s[i] <= "9":
                if not overflow:
                    if frac > (_U63 - 1) // 10:
                        overflow = True
                    else:
                        candidate = frac * 10 + ord(s[i]) - 48
                        if candidate > _U63:
                            overflow = True
                        else:
                            frac, scale = candidate, scale * 10
                i += 1
            post = i > 0
            s = s[i:]
        if not pre and not post:
            return None
        i = 0
        while i < len(s) and not (s[i] == "." or "0" <= s[i] <= "9"):
            i += 1
        unit = _DURATION_UNITS.get(s[:i])
        if unit is None:
            return None
        s = s[i:]
        if whole > _U63 // unit:
            return None
        whole *= unit
        if frac > 0:
            whole += int(float(frac) * (float(unit) / scale))
            if whole > _U63:
                return None
        total += whole
        if total > _U63:
            return None
    return total if total <= _U63 - 1 else None


# ------------------------------------------------------------------ IP addresses (netip.ParseAddr, CEL isIP)


def parse_ip(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An address as the API server's CEL `isIP()` accepts it: no zone, no IPv4-mapped IPv6, no leading zeros."""
    if "%" in value or not value.isascii():
        return None
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return None
    return address


_LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
_MULTICAST = (ipaddress.ip_network("224.0.0.0/4"), ipaddress.ip_network("ff00::/8"))
_LINK_LOCAL = (ipaddress.ip_network("169.254.0.0/16"), ipaddress.ip_network("fe80::/10"))
_NOT_UNICAST = {ipaddress.ip_address("0.0.0.0"), ipaddress.ip_address("255.255.255.255"), ipaddress.ip_address("::")}


def is_global_unicast(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Go's netip.Addr.IsGlobalUnicast (private ranges count as global unicast, as in Go)."""
    if address in _NOT_UNICAST:
        return False
    return not any(address in net for net in (*_LOOPBACK, *_MULTICAST, *_LINK_LOCAL) if net.version == address.version)


# ------------------------------------------------------------------ CEL text


def cel_string(value: str) -> str:
    """A CEL string literal holding `value` exactly (double-quoted, backslashes and quotes escaped)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def cel_matches(expr: str, pattern: str) -> str:
    """CEL: `expr` matches an anchored pattern of this module."""
    return f"{expr}.matches({cel_string(pattern)})"


def cel_normalized_host(expr: str) -> str:
    """CEL twin of normalize_registry_host for a string expression."""
    aliases = ", ".join(cel_string(h) for h in sorted(c.DOCKER_HUB_HOSTS))
    return f"({expr}.lowerAscii() in [{aliases}] ? {cel_string(c.DOCKER_HUB_NAME)} : {expr}.lowerAscii())"


def cel_qualified_name(expr: str) -> str:
    """CEL twin of is_qualified_name (indexOf/lastIndexOf: cheaper for the cost estimate than split)."""
    return (
        f"({expr}.size() <= {QUALIFIED_NAME_MAX} && {cel_matches(expr, QUALIFIED_NAME_PATTERN)}"
        f" && {expr}.size() - {expr}.lastIndexOf('/') - 1 <= 63 && {expr}.indexOf('/') <= {DNS_SUBDOMAIN_MAX})"
    )


def cel_label_value(expr: str) -> str:
    """CEL twin of is_label_value."""
    return f"({expr}.size() <= {LABEL_VALUE_MAX} && {cel_matches(expr, LABEL_VALUE_PATTERN)})"


def cel_config_key(expr: str) -> str:
    """CEL twin of is_config_key."""
    return f"({expr}.size() <= {CONFIG_KEY_MAX} && {cel_matches(expr, CONFIG_KEY_PATTERN)} && !{expr}.startsWith('..') && {expr} != '.')"


def cel_dns_subdomain(expr: str) -> str:
    """CEL twin of is_dns_subdomain."""
    return f"({expr}.size() <= {DNS_SUBDOMAIN_MAX} && {cel_matches(expr, DNS_SUBDOMAIN_PATTERN)})"


def cel_dns_label(expr: str) -> str:
    """CEL twin of is_dns_label."""
    return f"({expr}.size() <= {DNS_LABEL_MAX} && {cel_matches(expr, DNS_LABEL_PATTERN)})"


def cel_image_registry_host(expr: str) -> str:
    """CEL twin of image_registry_host."""
    first = f"{expr}.split('/')[0]"
    domain_like = f"({first} == 'localhost' || {first}.contains('.') || {first}.contains(':') || {first}.lowerAscii() != {first})"
    return f"({expr}.contains('/') && {domain_like} ? {cel_normalized_host(first)} : {cel_string(c.DOCKER_HUB_NAME)})"


def cel_registry_host_from_url(expr: str) -> str:
    """CEL twin of registry_host_from_url (a one-element map() binds the authority: CRD rules have no cel.bind)."""
    stripped = (
        f"({expr}.startsWith('https://') ? (a.endsWith(':443') ? a.substring(0, a.size() - 4) : a)"
        " : (a.endsWith(':80') ? a.substring(0, a.size() - 3) : a))"
    )
    return f"[{expr}.split('/')[2].lowerAscii()].map(a, {cel_normalized_host(stripped)})[0]"
