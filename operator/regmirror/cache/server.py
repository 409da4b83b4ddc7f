"""`regmirror cache serve`: the sidecar next to distribution and the front in a mirror pod.

HTTP API (one port, see render/cache.py; read-only except /events):
- POST /events            distribution's notifications (pull -> "last pulled" of the digest)
- GET  /upstream/health   200 while the upstream answers, else 503 (the front's probe)
- GET  /stats             the figures for status.cache, JSON (camelCase, as in the CRD)
- GET  /metrics           the same for Prometheus
- GET  /healthz           the sidecar itself

Loops: the janitor (every JANITOR_SECONDS, sooner after pulls) scans the volume
and evicts per policy.py; the probe asks the upstream every PROBE_SECONDS; the
prewarmer works through spec.prewarm; control files (cache.json, pins.json,
invalidate.json, mounted from the mirror's ConfigMap) are re-read when they change.
State that must survive a restart (last pulled per digest, invalidations
applied, prewarm digests, the last eviction) is a JSON file on the volume.
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import json
import os
import re
import signal
import sys
import threading
import time
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from regmirror.cache import clients, events, policy, prewarm, stats, store, upstream

JANITOR_SECONDS = 5.0
PROBE_SECONDS = 5.0
PROBE_TIMEOUT = 2.0
PREWARM_SECONDS = 2.0
SAVE_SECONDS = 30.0
EXPECT_SECONDS = 600.0
STATE_DIR = "regmirror-cache"
CACHE_CONFIG, PINS, INVALIDATE = "cache.json", "pins.json", "invalidate.json"
_TAG_REF = re.compile(r"^(?P<repo>[a-z0-9._/-]+):(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})$")


def log(event: str, **fields: Any) -> None:
    """One JSON line per event on stdout."""
    print(json.dumps({"event": event, **fields}, sort_keys=True), flush=True)


def rfc3339(ts: float) -> str:
    """UTC time stamp for status."""
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Cache:
    """The sidecar's state and loops."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.root = Path(args.storage)
        self.control = Path(args.control_dir)
        self.front = args.front.rstrip("/")
        self.registry_metrics = args.registry_metrics
        self.front_stats = Path(args.front_stats) if args.front_stats else None
        # The client addresses of recent pulls, as the front-stats container lists them (clients.py).
        self.front_clients = Path(args.front_clients) if getattr(args, "front_clients", None) else None
        self._clients_mtime: float | None = None
        self.clients = clients.ClientsSeen()
        # Off on shared object storage (render/cache.py says why): no scan, no eviction.
        self.evicts = getattr(args, "eviction", "on") == "on"
        self.state_file = self.root / STATE_DIR / "state.json"
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.stop = threading.Event()
        self.last_pulled: dict[str, float] = {}
        # Blobs a just-pulled manifest references that are not on the volume yet: digest -> (size, since).
        self.expected: dict[str, tuple[int, float]] = {}
        self.applied_invalidations: dict[str, str] = {}
        self.last_eviction: dict[str, Any] | None = None
        self.upstream_ok: bool | None = None
        self.policy = policy.Policy(cap_bytes=0)
        self.doc: dict[str, Any] = {}
        self.pins: set[str] = set()
        self.pinned_images = 0
        self.disk_used = 0
        self.over_cap_pinned = False
        self._mtimes: dict[str, float] = {}
        self._dirty = False
        self.client: upstream.UpstreamClient | None = None
        self.prewarmer = prewarm.Prewarmer(self.front, self._head, self.ban_tag)
        self._load_state()
        self.reload_control()

    # ------------------------------------------------------------ state

    def _load_state(self) -> None:
        try:
            doc = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return
        self.last_pulled = {k: float(v) for k, v in (doc.get("lastPulled") or {}).items() if isinstance(v, (int, float))}
        self.applied_invalidations = {k: str(v) for k, v in (doc.get("invalidations") or {}).items()}
        self.last_eviction = doc.get("lastEviction")
        raw_clients = doc.get("clients")
        self.clients = clients.ClientsSeen(raw_clients if isinstance(raw_clients, dict) else None)
        for image, digest in (doc.get("prewarmed") or {}).items():
            self.prewarmer.states[image] = prewarm.ImageState(status=prewarm.PENDING, digest=digest)

    def save_state(self) -> None:
        """Write the state file atomically (temp + rename) when something changed."""
        with self.lock:
            if not self._dirty:
                return
            doc = {
                "lastPulled": self.last_pulled,
                "invalidations": self.applied_invalidations,
                "lastEviction": self.last_eviction,
                "prewarmed": {k: s.digest for k, s in self.prewarmer.states.items() if s.digest},
                "clients": dict(self.clients.seen),
            }
            self._dirty = False
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, self.state_file)

    # ------------------------------------------------------------ control files

    def _changed(self, name: str) -> bool:
        try:
            mtime = (self.control / name).stat().st_mtime
        except OSError:
            return False
        if self._mtimes.get(name) == mtime:
            return False
        self._mtimes[name] = mtime
        return True

    def _read_json(self, name: str, default: Any) -> Any:
        try:
            return json.loads((self.control / name).read_text())
        except (OSError, ValueError) as exc:
            log("control.unreadable", file=name, error=str(exc)[:200])
            return default

    def reload_control(self) -> None:
        """Re-read the mounted control files that changed (the kubelet swaps them atomically)."""
        if self._changed(CACHE_CONFIG):
            doc = self._read_json(CACHE_CONFIG, {})
            try:
                new_policy = policy.Policy.from_json(doc)
            except ValueError as exc:
                log("control.invalid", file=CACHE_CONFIG, error=str(exc))
            else:
                self.policy, self.doc = new_policy, doc
                url = doc.get("upstream")
                if isinstance(url, str) and (self.client is None or self.client.url != url.rstrip("/")):
                    self.client = upstream.UpstreamClient(url)
                hosts = [h for h in doc.get("hosts") or [] if isinstance(h, str)]
                wanted = []
                for entry in doc.get("prewarm") or []:
                    if isinstance(entry, dict) and isinstance(entry.get("image"), str):
                        platforms = [p for p in entry.get("platforms") or [] if isinstance(p, str)]
                        wanted.append(prewarm.parse_wanted(entry["image"], hosts, platforms))
                self.prewarmer.set_wanted(wanted)
                log("control.loaded", file=CACHE_CONFIG, capBytes=new_policy.cap_bytes, prewarm=len(wanted))
                self.wake.set()
        if self._changed(PINS):
            pins = self._read_json(PINS, [])
            self.pins = {p for p in pins if isinstance(p, str) and p.startswith(store.DIGEST_PREFIX)} if isinstance(pins, list) else set()
            log("control.loaded", file=PINS, pins=len(self.pins))
        if self._changed(INVALIDATE):
            wanted_inv = self._read_json(INVALIDATE, {})
            if isinstance(wanted_inv, dict):
                self.apply_invalidations({str(k): str(v) for k, v in wanted_inv.items()})

    # ------------------------------------------------------------ invalidation

    def _ban(self, pattern: str) -> int:
        parts = urllib.parse.urlsplit(self.front)
        conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=5)
        try:
            conn.request("BAN", "/", headers={"x-regmirror-ban": pattern})
            return conn.getresponse().status
        finally:
            conn.close()

    def ban_tag(self, repository: str, tag: str) -> None:
        """Make the front forget one tag (every Accept variant); the next pull revalidates it."""
        if self.front_stats is None:
            return  # no front: distribution revalidates every tag anyway
        status = self._ban(f"^/v2/{re.escape(repository)}/manifests/{re.escape(tag)}$")
        log("tag.invalidated", repository=repository, tag=tag, status=status)

    def ban_digests(self, digests: list[str]) -> None:
        """Make the front forget evicted blobs too, so "evicted" means fetched again, not served from the front."""
        if self.front_stats is None:
            return
        for start in range(0, len(digests), 50):
            batch = "|".join(d.removeprefix(store.DIGEST_PREFIX) for d in digests[start : start + 50])
            try:
                self._ban(f"/(blobs|manifests)/sha256:({batch})$")
            except OSError as exc:
                log("front.ban_failed", error=str(exc)[:200])

    def apply_invalidations(self, wanted: dict[str, str]) -> None:
        """Ban every listed tag whose request id was not applied yet."""
        hosts = [h for h in self.doc.get("hosts") or [] if isinstance(h, str)]
        for ref, request_id in sorted(wanted.items()):
            if self.applied_invalidations.get(ref) == request_id:
                continue
            target = prewarm.parse_wanted(ref, hosts)
            if target.is_digest or not _TAG_REF.match(f"{target.repository}:{target.reference}"):
                log("tag.invalidate_rejected", ref=ref, reason="not a repository:tag reference")
                continue
            try:
                self.ban_tag(target.repository, target.reference)
            except OSError as exc:
                log("tag.invalidate_failed", ref=ref, error=str(exc)[:200])
                continue
            with self.lock:
                self.applied_invalidations[ref] = request_id
                self._dirty = True

    # ------------------------------------------------------------ pulls, janitor

    def record(self, pulls: list[events.Pull]) -> None:
        """Note what the registry served; make room ahead for what a pulled manifest will bring."""
        incoming = {}
        for pull in pulls:
            if "manifest" in pull.media_type or "index" in pull.media_type:
                incoming.update(store.missing_references(self.root, pull.digest))
        with self.lock:
            for pull in pulls:
                self.last_pulled[pull.digest] = max(pull.at, self.last_pulled.get(pull.digest, 0.0))
            for digest, size in incoming.items():
                self.expected.setdefault(digest, (size, time.time()))
            self._dirty = True
        self.wake.set()

    def janitor_pass(self, now: float) -> None:
        """Scan the volume, evict per policy, refresh the disk figures."""
        blobs = store.scan_blobs(self.root)
        with self.lock:
            # What a pull in progress is about to write counts now, so room is made before it lands
            # (a manifest is pulled before its layers). Forgotten once stored, or after EXPECT_SECONDS.
            self.expected = {d: v for d, v in self.expected.items() if d not in blobs and now - v[1] < EXPECT_SECONDS}
            expected = sum(size for size, _ in self.expected.values())
        in_flight = max(store.uploads_bytes(self.root), expected)
        pinned: set[str] = set()
        for digest in self.pins:
            pinned |= store.referenced_digests(self.root, digest)
        with self.lock:
            candidates = [policy.Candidate(d, b.size, self.last_pulled.get(d, b.mtime)) for d, b in blobs.items()]
        plan = policy.plan_eviction(candidates, pinned, self.policy, now, in_flight)
        freed = 0
        for digest in plan.victims:
            freed += store.evict_blob(self.root, digest)
        if plan.victims:
            self.ban_digests(plan.victims)
        with self.lock:
            for digest in plan.victims:
                self.last_pulled.pop(digest, None)
            known = set(blobs)
            for digest in [d for d in self.last_pulled if d not in known]:
                del self.last_pulled[digest]
            if plan.victims:
                self.last_eviction = {"time": rfc3339(now), "reason": plan.reason, "blobs": len(plan.victims), "bytes": freed}
                self._dirty = True
            self.disk_used = sum(b.size for b in blobs.values()) + in_flight - freed
            self.pinned_images = sum(1 for d in self.pins if d in blobs)
            self.over_cap_pinned = plan.over_cap_pinned
        if plan.victims:
            log("cache.evicted", reason=plan.reason, blobs=len(plan.victims), bytes=freed, diskUsed=self.disk_used)
        if plan.over_cap_pinned:
            log("cache.over_cap", diskUsed=self.disk_used, capBytes=self.policy.cap_bytes, reason="pinned images fill the cap")

    def clients_pass(self, now: float) -> None:
        """Record the addresses in the front's client list, when it changed since the last read."""
        if self.front_clients is None:
            return
        try:
            mtime = self.front_clients.stat().st_mtime
            if mtime == self._clients_mtime:
                return
            text = self.front_clients.read_text(errors="replace")
        except OSError:
            return
        self._clients_mtime = mtime
        with self.lock:
            if self.clients.observe(clients.parse_addresses(text), now):
                self._dirty = True

    # ------------------------------------------------------------ upstream

    def _head(self, repository: str, reference: str) -> upstream.Head:
        if self.client is None:
            return upstream.Head(0, None, None)
        return self.client.head_manifest(repository, reference)

    def probe_pass(self) -> None:
        """Ask the upstream whether it serves; log flips only."""
        if self.client is None:
            return
        ok = upstream.probe(self.client.url, PROBE_TIMEOUT)
        if ok != self.upstream_ok:
            log("upstream.reachable" if ok else "upstream.unreachable", upstream=self.client.url)
        self.upstream_ok = ok

    # ------------------------------------------------------------ figures

    def figures(self) -> dict[str, Any]:
        """status.cache as the sidecar sees it (camelCase, the CRD's field names)."""
        registry_text = _fetch_text(self.registry_metrics)
        front_text = None
        if self.front_stats is not None:
            try:
                front_text = self.front_stats.read_text()
            except OSError:
                front_text = "{}"
        figures = stats.combine(registry_text, front_text)
        with self.lock:
            doc: dict[str, Any] = {
                **figures.as_dict(),
                "diskUsed": self.disk_used,
                "diskCap": self.policy.cap_bytes,
                "pinnedImages": self.pinned_images,
                "overCap": self.over_cap_pinned,
                "eviction": "on" if self.evicts else "off",
                "upstreamReachable": self.upstream_ok,
                "lastEviction": self.last_eviction,
                "observedAt": rfc3339(time.time()),
            }
            if self.prewarmer.wanted:
                doc["prewarm"] = self.prewarmer.summary()
            if self.front_clients is not None:
                doc["clients"] = self.clients.summary(time.time(), rfc3339)
        return doc

    # ------------------------------------------------------------ loops

    def run_loops(self) -> list[threading.Thread]:
        """Start the janitor, probe and prewarm loops."""

        def janitor() -> None:
            last_save = 0.0
            while not self.stop.is_set():
                self.reload_control()
                try:
                    if self.evicts:
                        self.janitor_pass(time.time())
                except OSError as exc:
                    log("janitor.error", error=str(exc)[:300])
                self.clients_pass(time.time())
                if time.monotonic() - last_save > SAVE_SECONDS:
                    self.save_state()
                    last_save = time.monotonic()
                self.wake.wait(JANITOR_SECONDS)
                self.wake.clear()
            self.save_state()

        def prober() -> None:
            while not self.stop.is_set():
                self.probe_pass()
                self.stop.wait(PROBE_SECONDS)

        def prewarmer() -> None:
            while not self.stop.is_set():
                try:
                    busy = self.prewarmer.step(time.time())
                except Exception as exc:  # one bad image must not stop the loop
                    log("prewarm.error", error=str(exc)[:300])
                    busy = False
                if busy:
                    with self.lock:
                        self._dirty = True
                    self.wake.set()
                    log("prewarm.progress", **self.prewarmer.summary())
                self.stop.wait(0.1 if busy else PREWARM_SECONDS)

        threads = [threading.Thread(target=f, name=f.__name__, daemon=True) for f in (janitor, prober, prewarmer)]
        for t in threads:
            t.start()
        return threads


def _fetch_text(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=3) as resp:
            return str(resp.read(8 << 20).decode(errors="replace"))
    except (OSError, ValueError):
        return ""


def prometheus_text(doc: dict[str, Any]) -> str:
    """The /stats figures as Prometheus gauges and counters."""
    lines = []
    for key, metric, kind in (
        ("hits", "regmirror_cache_hits_total", "counter"),
        ("misses", "regmirror_cache_misses_total", "counter"),
        ("bytesServed", "regmirror_cache_served_bytes_total", "counter"),
        ("bytesFromUpstream", "regmirror_cache_upstream_bytes_total", "counter"),
        ("diskUsed", "regmirror_cache_disk_used_bytes", "gauge"),
        ("diskCap", "regmirror_cache_disk_cap_bytes", "gauge"),
        ("pinnedImages", "regmirror_cache_pinned_images", "gauge"),
    ):
        lines += [f"# TYPE {metric} {kind}", f"{metric} {int(doc.get(key) or 0)}"]
    lines += ["# TYPE regmirror_cache_upstream_up gauge", f"regmirror_cache_upstream_up {1 if doc.get('upstreamReachable') else 0}"]
    pre = doc.get("prewarm")
    if pre:
        lines += ["# TYPE regmirror_cache_prewarm_images gauge"]
        lines += [f'regmirror_cache_prewarm_images{{state="{k}"}} {pre[k]}' for k in ("ready", "pending")]
    return "\n".join(lines) + "\n"


def make_handler(cache: Cache) -> type[BaseHTTPRequestHandler]:
    """The request handler bound to one Cache."""

    class Handler(BaseHTTPRequestHandler):
        server_version = "regmirror-cache"

        def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:
            if self.path != "/events":
                self._send(404, b"{}")
                return
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(min(length, 8 << 20))
            cache.record(events.parse_envelope(body, time.time()))
            self._send(200, b"{}")

        def do_GET(self) -> None:
            if self.path == "/upstream/health":
                ok = cache.upstream_ok is True
                self._send(200 if ok else 503, json.dumps({"reachable": ok}).encode())
            elif self.path == "/stats":
                self._send(200, json.dumps(cache.figures()).encode())
            elif self.path == "/metrics":
                self._send(200, prometheus_text(cache.figures()).encode(), "text/plain; version=0.0.4")
            elif self.path == "/healthz":
                self._send(200, b'{"ok": true}')
            else:
                self._send(404, b"{}")

        def log_message(self, format: str, *args: Any) -> None:
            return

    return Handler


def parse_listen(value: str) -> tuple[str, int]:
    """ ":5003" or "127.0.0.1:5003" -> (host, port)."""
    host, _, port = value.rpartition(":")
    return host or "0.0.0.0", int(port)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `regmirror cache serve`."""
    parser.add_argument("--storage", required=True, help="distribution's storage root (the cache volume)")
    parser.add_argument(
        "--control-dir", required=True, help="the mounted keys of the mirror's ConfigMap: cache.json, pins.json, invalidate.json"
    )
    parser.add_argument("--listen", default=":5003", help="address of the sidecar's HTTP API")
    parser.add_argument("--registry-metrics", required=True, help="distribution's Prometheus endpoint")
    parser.add_argument("--front", required=True, help="URL of the front (or of the registry when there is no front)")
    parser.add_argument("--front-stats", default=None, help="varnishstat -j output the front-stats container writes")
    parser.add_argument(
        "--front-clients", default=None, help="client addresses of recent pulls, one per line, that the front-stats container writes"
    )
    parser.add_argument(
        "--eviction",
        choices=("on", "off"),
        default="on",
        help="off: never scan or evict the storage (object storage shared by several replicas)",
    )


def serve(args: argparse.Namespace) -> int:
    """Run until SIGTERM."""
    cache = Cache(args)
    host, port = parse_listen(args.listen)
    server = ThreadingHTTPServer((host, port), make_handler(cache))
    server.daemon_threads = True

    def stop(*_: Any) -> None:
        cache.stop.set()
        cache.wake.set()
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    threads = cache.run_loops()
    log("cache.serving", listen=f"{host}:{port}", storage=str(cache.root), eviction="on" if cache.evicts else "off")
    server.serve_forever(poll_interval=0.2)
    for t in threads:
        t.join(5)
    server.server_close()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point for `python -m regmirror.cache.server` (the CLI's `cache serve` calls serve())."""
    parser = argparse.ArgumentParser(prog="regmirror cache serve")
    add_arguments(parser)
    return serve(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
