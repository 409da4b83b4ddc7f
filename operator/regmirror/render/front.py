"""The cache's front: Varnish in front of distribution, rendered as VCL with no I/O.

Why a front at all: distribution's proxy does not merge concurrent misses (a
blob already in flight is fetched from the upstream once more per waiting
client, registry/proxy/proxyblobstore.go `inflight`), so N nodes pulling one
image at once cost the upstream N copies. Varnish coalesces identical requests
on a busy object and streams the body to every waiter while it arrives, so the
registry (and the upstream) sees one request. See docs/performance.md for the
numbers against bare distribution and nginx's proxy_cache_lock.

What the front caches, and for how long:
- blobs and manifests by digest (immutable): a short while, just long enough to
  merge a rollout's burst; distribution keeps the durable copy on the volume,
  and pulls that reach it are what the cache sidecar sees as "last pulled";
- manifests by tag: `tag_freshness` (0 = revalidate on every pull, kept for one
  second only so that a burst still shares one revalidation). When the
  sidecar reports the upstream unhealthy (down, blackholed, 429, 5xx), a stale
  tag is served for up to TAG_STALE_HORIZON instead of waiting on the upstream;
- everything else (`/v2/` itself, tag lists, the catalog, pushes) passes.

Invalidating a tag is a BAN request from inside the pod (the sidecar sends it);
anything else that sends BAN gets 403.

Who may pull (regmirror/access.py) is decided here too, in vcl_recv before the
cache lookup: an object the front already holds would otherwise be served to
anyone, and distribution's own auth would only ever see the misses behind
it. The accepted Authorization values come from `access.vcl`, a file of the
mirror's Secret mounted into the pod (never the ConfigMap this program lives
in) and compiled in with `include`. `include` is read when a VCL is loaded,
so the front-stats container loads the program again (varnishadm vcl.load,
vcl.use) when the kubelet updates the file; the running front never
restarts and keeps its cache. (std.fileread would not do: it caches a file's
content for as long as any loaded VCL references that name.) Requests from
inside the pod (the sidecar's prewarm and BAN) need no credential; the
kubelet's readiness probe has its own path that only ever answers /v2/.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

FRONT_CONFIG_KEY = "front.vcl"
# The accepted credentials: a key of the mirror's access Secret, mounted here.
ACCESS_DIR = "/etc/regmirror/front-access"
ACCESS_FILE_KEY = "access.vcl"
ACCESS_FILE = f"{ACCESS_DIR}/{ACCESS_FILE_KEY}"
# The kubelet's readiness probe (answered by the registry's /v2/, never with a credential)
# and the accepted-set generation this front loaded (no credential in it), both unauthenticated.
READY_PATH = "/_regmirror/ready"
ACCESS_INFO_PATH = "/_regmirror/access"
REALM = "regmirror"
# What an accepted value may look like: a Basic credential of base64 characters only, so that
# nothing taken from a Secret can ever end a VCL string.
_AUTHORIZATION_RE = re.compile(r"Basic [A-Za-z0-9+/]{4,400}={0,2}")
# distribution's body for a 401, as a VCL long string ("""...""": the JSON holds quotes).
_UNAUTHORIZED_SYNTHETIC = 'synthetic("""{"errors":[{"code":"UNAUTHORIZED","message":"authentication required","detail":null}]}""");'
# Ports inside the mirror pod: the front takes the Service's target (5000),
# distribution moves behind it, the cache sidecar answers next to it.
REGISTRY_BACKEND_PORT = 5002
CACHE_SIDECAR_PORT = 5003
# How long a blob or manifest by digest stays in the front after its fetch.
DIGEST_TTL_SECONDS = 600
# How long a stale tag may be served while the upstream is unhealthy.
TAG_STALE_HORIZON = "30d"
# A burst of pulls within this window shares one tag revalidation even when
# every pull revalidates (cache.tagFreshness 0).
TAG_COALESCE_SECONDS = 1
BAN_HEADER = "x-regmirror-ban"
URL_HEADER = "x-regmirror-url"
ACCESS_INFO_HEADER = "x-regmirror-access"
# Accept headers that list both index types are treated as one (every current
# containerd, CRI-O and Docker sends both); anything else keys its own object.
INDEX_TYPES = ("application/vnd.oci.image.index.v1+json", "application/vnd.docker.distribution.manifest.list.v2+json")


@dataclass(frozen=True)
class FrontSettings:
    """What the VCL depends on; every field has the value the operator uses in the pod."""

    tag_freshness_seconds: int = 0
    registry_host: str = "127.0.0.1"
    registry_port: int = REGISTRY_BACKEND_PORT
    sidecar_host: str = "127.0.0.1"
    sidecar_port: int = CACHE_SIDECAR_PORT
    # Objects bigger than this are streamed uncached (the store could not hold them whole).
    max_object_bytes: int = 1 << 30
    access_file: str = ACCESS_FILE


def render_access_vcl(accepted: Sequence[str], *, enforced: bool, generation: int) -> str:
    """The front's access.vcl: who may pull (`regmirror_authorize`) and what it reports (`regmirror_access_info`).

    Not enforced: every request passes (Open, or Restricted while nodes still
    receive their credential). Raises ValueError for a value that is not a
    Basic credential: the file is compiled into the front.
    """
    for value in accepted:
        if not isinstance(value, str) or not _AUTHORIZATION_RE.fullmatch(value):
            raise ValueError("an accepted value is not a Basic credential")
    if not isinstance(generation, int) or generation < 0:
        raise ValueError("generation must be a non-negative integer")
    info = f'{{"generation": {generation}, "enforced": {"true" if enforced else "false"}, "accepted": {len(accepted)}}}'
    lines = [
        "# Rendered by regmirror (regmirror/access.py) into the mirror's access Secret; edits are overwritten.",
        "sub regmirror_access_info {",
        f'    set resp.http.{ACCESS_INFO_HEADER} = """{info}""";',
        "}",
        "",
        "sub regmirror_authorize {",
    ]
    if enforced and accepted:
        tests = " ||\n        ".join(f'req.http.Authorization == "{value}"' for value in accepted)
        lines += [f"    if ({tests}) {{", "        return;", "    }", '    return (synth(401, "Unauthorized"));']
    elif enforced:
        lines.append('    return (synth(401, "Unauthorized"));')
    lines.append("}")
    return "\n".join(lines) + "\n"


def render_front_vcl(settings: FrontSettings) -> str:
    """The VCL 4.1 program of the front (Varnish 7)."""
    tag_ttl = max(settings.tag_freshness_seconds, TAG_COALESCE_SECONDS)
    index_match = " && ".join(f'req.http.Accept ~ "{t.replace("+", "[+]")}"' for t in INDEX_TYPES)
    return f"""vcl 4.1;
# Rendered by regmirror (regmirror/render/front.py); edits are overwritten.
import std;

# Who may pull: regmirror_authorize and regmirror_access_info, from the mirror's access Secret.
include "{settings.access_file}";

# distribution in proxy mode, in the same pod. A miss may wait on the upstream:
# distribution dials it for up to 30 s before it falls back to its local copy.
backend registry {{
    .host = "{settings.registry_host}";
    .port = "{settings.registry_port}";
    .connect_timeout = 2s;
    .first_byte_timeout = 90s;
    .between_bytes_timeout = 60s;
}}

# Never sent requests: the regmirror cache sidecar answers 200 here while the
# upstream answers, so the front knows when to serve stale tags.
backend upstream_health {{
    .host = "{settings.sidecar_host}";
    .port = "{settings.sidecar_port}";
    .probe = {{
        .url = "/upstream/health";
        .interval = 2s;
        .timeout = 1s;
        .window = 3;
        .threshold = 2;
        .initial = 2;
    }}
}}

acl pod_local {{
    "127.0.0.1";
    "::1";
}}

sub vcl_recv {{
    set req.backend_hint = registry;
    if (req.method == "BAN") {{
        if (client.ip !~ pod_local) {{
            return (synth(403, "Forbidden"));
        }}
        ban("obj.http.{URL_HEADER} ~ " + req.http.{BAN_HEADER});
        return (synth(200, "Banned"));
    }}
    if (req.url == "{READY_PATH}") {{
        # The kubelet's readiness probe: the registry's /v2/, never cached, never with a credential.
        set req.url = "/v2/";
        unset req.http.Authorization;
        return (pass);
    }}
    if (req.url == "{ACCESS_INFO_PATH}") {{
        return (synth(200, "regmirror-access"));
    }}
    # Before any lookup: a cached object is served only to whom the registry itself would serve it.
    if (client.ip !~ pod_local) {{
        call regmirror_authorize;
    }}
    unset req.http.Authorization;
    if (req.method != "GET" && req.method != "HEAD") {{
        return (pass);
    }}
    # containerd appends ?ns=<registry>; the answer does not depend on it.
    set req.url = regsub(req.url, "[?].*$", "");
    unset req.http.Cookie;
    if (req.url ~ "^/v2/.+/blobs/sha256:[a-f0-9]{{64}}$") {{
        set req.http.x-regmirror-kind = "blob";
    }} elsif (req.url ~ "^/v2/.+/manifests/sha256:[a-f0-9]{{64}}$") {{
        set req.http.x-regmirror-kind = "manifest";
    }} elsif (req.url ~ "^/v2/.+/manifests/[A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}}$") {{
        set req.http.x-regmirror-kind = "tag";
        if (std.healthy(upstream_health)) {{
            set req.grace = 0s;
        }} else {{
            set req.grace = {TAG_STALE_HORIZON};
        }}
    }} else {{
        return (pass);
    }}
    if ({index_match}) {{
        set req.http.x-regmirror-accept = "all";
    }} else {{
        set req.http.x-regmirror-accept = req.http.Accept;
    }}
    return (hash);
}}

sub vcl_hash {{
    # Not the Host header: nodes, the sidecar and probes reach the front by different names.
    hash_data(req.url);
    if (req.http.x-regmirror-kind != "blob") {{
        hash_data(req.http.x-regmirror-accept);
    }}
    return (lookup);
}}

sub vcl_backend_response {{
    set beresp.http.{URL_HEADER} = bereq.url;
    if (beresp.status != 200) {{
        # An error is never kept, and never replaces a stale tag that still works.
        if (bereq.is_bgfetch) {{
            return (abandon);
        }}
        set beresp.ttl = 0s;
        set beresp.grace = 0s;
        set beresp.uncacheable = true;
        return (deliver);
    }}
    if (bereq.http.x-regmirror-kind == "tag") {{
        set beresp.ttl = {tag_ttl}s;
        set beresp.grace = {TAG_STALE_HORIZON};
    }} else {{
        set beresp.ttl = {DIGEST_TTL_SECONDS}s;
        set beresp.grace = 0s;
        if (std.integer(beresp.http.Content-Length, 0) > {settings.max_object_bytes}) {{
            set beresp.uncacheable = true;
            set beresp.ttl = 60s;
        }}
    }}
    return (deliver);
}}

sub vcl_backend_error {{
    if (bereq.is_bgfetch) {{
        return (abandon);
    }}
}}

sub vcl_synth {{
    if (resp.reason == "regmirror-access") {{
        call regmirror_access_info;
        set resp.http.Content-Type = "application/json";
        synthetic(resp.http.{ACCESS_INFO_HEADER});
        unset resp.http.{ACCESS_INFO_HEADER};
        return (deliver);
    }}
    if (resp.status == 401) {{
        # What distribution's own auth answers, so every client knows to send its credential.
        set resp.http.WWW-Authenticate = {{"Basic realm="{REALM}""}};
        set resp.http.Docker-Distribution-API-Version = "registry/2.0";
        set resp.http.Content-Type = "application/json";
        {_UNAUTHORIZED_SYNTHETIC}
        return (deliver);
    }}
}}

sub vcl_deliver {{
    unset resp.http.{URL_HEADER};
    unset resp.http.Via;
    unset resp.http.X-Varnish;
}}
"""
