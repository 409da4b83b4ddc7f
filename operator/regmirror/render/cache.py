"""The cache's own pieces in the mirror pod, rendered with no I/O.

Three containers join distribution in the pod:
- `front`: Varnish with the VCL of render/front.py, on the Service's target
  port, merging concurrent misses (see front.py for why);
- `front-stats`: the same image, writing `varnishstat -j` to a shared
  emptyDir every few seconds, because Varnish serves no counters over HTTP;
- `cache`: `regmirror cache serve` from the operator's image: least-recently-
  pulled eviction under the size cap, TTL as an upper bound, pins, prewarm,
  the upstream health the front reads, and the figures for status.cache.

The sidecar's live inputs (policy, prewarm list, pins, tag invalidations) are
three keys of the mirror's one ConfigMap, beside config.yml, projected into
their own volume and NOT hashed into the pod template (only the registry's and
the front's configuration are): changing them never restarts the cache; the
kubelet refreshes the files within about a minute and the sidecar re-reads them.
(Earlier versions kept them in a second ConfigMap, `regmirror-<mirror>.cache`:
one more write per mirror; the children reconciler deletes it where it remains.)
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from regmirror import constants as c
from regmirror import naming
from regmirror.models import RegistryMirrorSpec
from regmirror.render.front import ACCESS_DIR, ACCESS_FILE, ACCESS_FILE_KEY, CACHE_SIDECAR_PORT, FRONT_CONFIG_KEY, READY_PATH
from regmirror.units import duration_seconds, quantity_bytes

DEFAULT_FRONT_IMAGE = "docker.io/library/varnish:7.6.1"
EVENTS_PATH = "/events"
CACHE_CONFIG_KEY = "cache.json"
PINS_KEY = "pins.json"
INVALIDATE_KEY = "invalidate.json"
CONTROL_DIR = "/etc/regmirror/cache"
FRONT_CONFIG_DIR = "/etc/regmirror/front"
FRONT_WORK_DIR = "/var/lib/varnish/front"
FRONT_STORE_DIR = "/var/cache/regmirror-front"
STATS_DIR = "/var/run/regmirror-stats"
VARNISH_STATS_FILE = "varnish.json"
CLIENTS_FILE = "clients.txt"
STATS_INTERVAL_SECONDS = 5
# Default cap when cache.maxSize is unset: room for distribution's upload
# temp files and the filesystem's own overhead under storage.size.
DEFAULT_CAP_PERCENT = 90
# The front's store holds blobs while they stream to every waiting node: a
# tenth of the volume, within bounds. Blobs over half of it stream uncached.
FRONT_STORE_MIN = 512 << 20
FRONT_STORE_MAX = 4 << 30


def cap_bytes(spec: RegistryMirrorSpec) -> int:
    """The size cap: cache.maxSize, or DEFAULT_CAP_PERCENT of storage.size; 0 (none) on an s3 bucket."""
    if spec.storage.s3 is not None:
        return 0
    if spec.cache.max_size is not None:
        return quantity_bytes(spec.cache.max_size)
    return quantity_bytes(spec.storage.size) * DEFAULT_CAP_PERCENT // 100


def front_store_bytes(spec: RegistryMirrorSpec) -> int:
    """Size of the front's file store (an emptyDir of the pod)."""
    return max(FRONT_STORE_MIN, min(FRONT_STORE_MAX, quantity_bytes(spec.storage.size) // 10))


def cache_policy(spec: RegistryMirrorSpec) -> dict[str, Any]:
    """What the sidecar enforces, as plain JSON (the sidecar imports no pydantic)."""
    return {
        "capBytes": cap_bytes(spec),
        "highWatermarkPercent": spec.cache.high_watermark_percent,
        "lowWatermarkPercent": spec.cache.low_watermark_percent,
        "ttlSeconds": int(duration_seconds(spec.cache.ttl)),
        "upstream": spec.upstream.url,
        "hosts": spec.upstream.effective_hosts(),
        "prewarm": [{"image": p.image, "platforms": list(p.platforms)} for p in spec.prewarm],
    }


CONTROL_KEYS = (CACHE_CONFIG_KEY, PINS_KEY, INVALIDATE_KEY)


def control_data(spec: RegistryMirrorSpec, *, pins: Iterable[str] = (), invalidations: Mapping[str, str] | None = None) -> dict[str, str]:
    """The sidecar's live inputs, as ConfigMap keys (CONTROL_KEYS).

    `pins`: manifest digests of images running pods use (never evicted);
    `invalidations`: image reference -> request id (any string; a new id for the
    same reference invalidates it again). Both come from the operator.
    """
    return {
        CACHE_CONFIG_KEY: json.dumps(cache_policy(spec), sort_keys=True),
        PINS_KEY: json.dumps(sorted(set(pins))),
        INVALIDATE_KEY: json.dumps(dict(sorted((invalidations or {}).items()))),
    }


def _restricted() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
    }


ACCESS_VOLUME = "front-access"


def front_stats_loop() -> str:
    """The front-stats container's shell loop: export varnishstat, and reload the VCL when access.vcl changes.

    The kubelet swaps a Secret volume's files atomically about a minute after
    the Secret changes; a changed checksum loads the whole program again
    (its `include` reads the new file) and switches to it, so the front keeps
    running and keeps its cache. A file that does not compile (a hand-edited
    Secret) leaves the running program in place, and is not retried until it
    changes. Nothing varnishadm prints is shown: a compiler error could quote
    a line of the file, and the file holds credentials.
    """
    adm = f"varnishadm -n {FRONT_WORK_DIR}"
    stats = f"{STATS_DIR}/{VARNISH_STATS_FILE}"
    return (
        'loaded=""; failed=""; '
        "while :; do "
        f"varnishstat -n {FRONT_WORK_DIR} -j > {stats}.tmp 2>/dev/null && mv {stats}.tmp {stats}; "
        # The client addresses of recent pulls (manifest requests: one per pull) from the shared-memory
        # log, for the sidecar's request-side evidence of which nodes use the mirror (cache/clients.py).
        f"varnishncsa -n {FRONT_WORK_DIR} -d -F '%h' -q 'ReqURL ~ \"^/v2/.+/manifests/\"' 2>/dev/null | sort -u "
        f"> {STATS_DIR}/{CLIENTS_FILE}.tmp && mv {STATS_DIR}/{CLIENTS_FILE}.tmp {STATS_DIR}/{CLIENTS_FILE}; "
        f"sum=$(cksum < {ACCESS_FILE} 2>/dev/null); "
        'if [ -n "$sum" ] && [ "$sum" != "$loaded" ] && [ "$sum" != "$failed" ]; then '
        'name="access$(date +%s)"; '
        f'if {adm} vcl.load "$name" {FRONT_CONFIG_DIR}/{FRONT_CONFIG_KEY} >/dev/null 2>&1 && {adm} vcl.use "$name" >/dev/null 2>&1; then '
        'loaded="$sum"; failed=""; echo \'{"event": "front.access.loaded"}\'; '
        f"{adm} vcl.list 2>/dev/null | awk '$1 == \"available\" {{print $NF}}' | "
        f'while read -r old; do {adm} vcl.discard "$old" >/dev/null 2>&1; done; '
        'elif {adm} ping >/dev/null 2>&1; then failed="$sum"; echo \'{"event": "front.access.unloadable", "level": "error"}\'; fi; '
        "fi; "
        f"sleep {STATS_INTERVAL_SECONDS}; "
        "done"
    ).replace("{adm}", adm)


def front_containers(spec: RegistryMirrorSpec, front_image: str, config_volume: str) -> list[dict[str, Any]]:
    """Varnish on the Service's target port, and the loop that exports its counters and reloads access.vcl."""
    store = front_store_bytes(spec)
    front = {
        "name": "front",
        "image": front_image,
        "command": ["varnishd"],
        "args": [
            "-F",
            "-j",
            "none",
            "-a",
            f":{c.REGISTRY_PORT},HTTP",
            "-f",
            f"{FRONT_CONFIG_DIR}/front.vcl",
            "-n",
            FRONT_WORK_DIR,
            "-s",
            f"file,{FRONT_STORE_DIR}/store.bin,{store}",
            # Responses that are not cached (errors, tag lists) are buffered in Transient;
            # bound it so a burst cannot take the container's memory.
            "-s",
            "Transient=malloc,64m",
            # The shared-memory log is only read by varnishstat here: keep it small.
            "-p",
            "vsl_space=16M",
        ],
        "ports": [{"name": "registry", "containerPort": c.REGISTRY_PORT, "protocol": "TCP"}],
        "resources": {"requests": {"cpu": "50m", "memory": "96Mi"}, "limits": {"memory": "384Mi"}},
        "volumeMounts": [
            {"name": config_volume, "mountPath": FRONT_CONFIG_DIR, "readOnly": True},
            {"name": ACCESS_VOLUME, "mountPath": ACCESS_DIR, "readOnly": True},
            {"name": "front-work", "mountPath": "/var/lib/varnish"},
            {"name": "front-store", "mountPath": FRONT_STORE_DIR},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
        "readinessProbe": _http_probe(READY_PATH, "registry", period=5, failures=3),
        "livenessProbe": {"tcpSocket": {"port": "registry"}, "periodSeconds": 10, "timeoutSeconds": 3, "failureThreshold": 6},
        "securityContext": _restricted(),
    }
    stats = {
        "name": "front-stats",
        "image": front_image,
        "command": ["sh", "-c", front_stats_loop()],
        "resources": {"requests": {"cpu": "5m", "memory": "8Mi"}, "limits": {"memory": "32Mi"}},
        "volumeMounts": [
            {"name": "front-work", "mountPath": "/var/lib/varnish", "readOnly": True},
            {"name": "stats", "mountPath": STATS_DIR},
            {"name": ACCESS_VOLUME, "mountPath": ACCESS_DIR, "readOnly": True},
        ],
        "securityContext": _restricted(),
    }
    return [front, stats]


def sidecar_container(spec: RegistryMirrorSpec, image: str, env: list[dict[str, Any]], front: bool) -> dict[str, Any]:
    """`regmirror cache serve`: eviction, pins, prewarm, upstream health and figures."""
    args = [
        "cache",
        "serve",
        "--storage",
        c.REGISTRY_STORAGE_PATH,
        "--control-dir",
        CONTROL_DIR,
        "--listen",
        f":{CACHE_SIDECAR_PORT}",
        "--registry-metrics",
        f"http://127.0.0.1:{c.REGISTRY_DEBUG_PORT}/metrics",
        "--front",
        f"{'http' if front else 'https'}://127.0.0.1:{c.REGISTRY_PORT}",
    ]
    if front:
        args += ["--front-stats", f"{STATS_DIR}/{VARNISH_STATS_FILE}", "--front-clients", f"{STATS_DIR}/{CLIENTS_FILE}"]
    if spec.storage.s3 is not None:
        # The sidecar evicts from distribution's filesystem layout; on a bucket shared by every
        # replica it would need every replica's pull record and one evictor among them. It keeps
        # its other jobs (figures, upstream health, prewarm, invalidation). See docs/deploy.md.
        args += ["--eviction", "off"]
    mounts = [
        {"name": "storage", "mountPath": c.REGISTRY_STORAGE_PATH},
        {"name": "cache-control", "mountPath": CONTROL_DIR, "readOnly": True},
    ]
    if front:
        mounts.append({"name": "stats", "mountPath": STATS_DIR, "readOnly": True})
    return {
        "name": "cache",
        "image": image,
        "command": ["regmirror"],
        "args": args,
        "ports": [{"name": "cache", "containerPort": CACHE_SIDECAR_PORT, "protocol": "TCP"}],
        "env": env,
        "resources": {"requests": {"cpu": "20m", "memory": "48Mi"}, "limits": {"memory": "160Mi"}},
        "volumeMounts": mounts,
        "readinessProbe": _http_probe("/healthz", "cache", period=10, failures=3),
        "securityContext": _restricted(),
    }


def cache_volumes(name: str, spec: RegistryMirrorSpec, front: bool) -> list[dict[str, Any]]:
    """Volumes the front and the sidecar add to the pod."""
    items = [{"key": key, "path": key} for key in CONTROL_KEYS]
    volumes: list[dict[str, Any]] = [{"name": "cache-control", "configMap": {"name": naming.child_name(name), "items": items}}]
    if front:
        # The accepted credentials (render/front.py): the mirror's access Secret, which the operator
        # creates before the Deployment; not optional, so the front never starts without it.
        volumes.append(
            {
                "name": ACCESS_VOLUME,
                "secret": {
                    "secretName": naming.credentials_secret_name(name),
                    "items": [{"key": ACCESS_FILE_KEY, "path": ACCESS_FILE_KEY}],
                    "defaultMode": 0o440,
                },
            }
        )
        volumes += [
            {"name": "front-work", "emptyDir": {"sizeLimit": "256Mi"}},
            {"name": "front-store", "emptyDir": {"sizeLimit": str(front_store_bytes(spec) + (64 << 20))}},
            {"name": "stats", "emptyDir": {"medium": "Memory", "sizeLimit": "4Mi"}},
        ]
    return volumes


def _http_probe(path: str, port: str, *, period: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": port, "scheme": "HTTP"},
        "timeoutSeconds": 3,
        "periodSeconds": period,
        "successThreshold": 1,
        "failureThreshold": failures,
    }
