"""`regmirror cache serve | invalidate`.

`invalidate MIRROR IMAGE...` asks a mirror to forget the cached tags: it
records each reference with a fresh request id in the RegistryMirror's
`regmirror.dev/invalidate` annotation (a JSON object), through kubectl and the
caller's own credentials (so RBAC decides who may). The operator copies the
annotation into the mirror's ConfigMap, and the sidecar bans each
(reference, id) pair it has not applied yet. Why an annotation: it is an
action, not desired state (a spec field would make GitOps tools fight over it),
and `kubectl annotate` works without this CLI too.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from regmirror import constants as c

ANNOTATION_INVALIDATE = c.ANNOTATION_INVALIDATE
# Entries older than this are dropped when a new one is added, so the annotation stays small.
KEEP_SECONDS = 7 * 24 * 3600


def merged_invalidations(current: str | None, refs: list[str], now: float) -> dict[str, str]:
    """The annotation's new value: old entries still recent, plus each ref with the id `now`."""
    try:
        doc = json.loads(current) if current else {}
    except ValueError:
        doc = {}
    kept = {}
    if isinstance(doc, dict):
        for ref, request_id in doc.items():
            try:
                if now - float(str(request_id)) < KEEP_SECONDS:
                    kept[str(ref)] = str(request_id)
            except ValueError:
                continue
    for ref in refs:
        kept[ref] = f"{now:.3f}"
    return kept


def invalidate(mirror: str, refs: list[str], kubectl: str) -> int:
    """Add the refs to the mirror's invalidate annotation."""
    got = subprocess.run([kubectl, "get", c.CRD_NAME, mirror, "-o", "json"], capture_output=True, text=True, check=False)
    if got.returncode != 0:
        print(f"regmirror cache invalidate: {got.stderr.strip()}", file=sys.stderr)
        return 1
    annotations = (json.loads(got.stdout).get("metadata") or {}).get("annotations") or {}
    value = json.dumps(merged_invalidations(annotations.get(ANNOTATION_INVALIDATE), refs, time.time()), sort_keys=True)
    done = subprocess.run(
        [kubectl, "annotate", "--overwrite", c.CRD_NAME, mirror, f"{ANNOTATION_INVALIDATE}={value}"],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        print(f"regmirror cache invalidate: {done.stderr.strip()}", file=sys.stderr)
        return 1
    print(f"{mirror}: invalidation of {', '.join(refs)} requested; the cache applies it within about a minute")
    return 0


def main(argv: list[str]) -> int:
    """Entry point of `regmirror cache`."""
    from regmirror.cache import server

    parser = argparse.ArgumentParser(prog="regmirror cache", description="The cache sidecar, and actions on a mirror's cache.")
    sub = parser.add_subparsers(dest="verb", required=True)
    serve = sub.add_parser("serve", help="run the cache sidecar (in the mirror pod)")
    server.add_arguments(serve)
    inv = sub.add_parser("invalidate", help="make a mirror check the listed tags against the upstream on their next pull")
    inv.add_argument("mirror", help="name of the RegistryMirror")
    inv.add_argument("images", nargs="+", help="repository:tag on the mirror's upstream, e.g. library/nginx:1.27")
    inv.add_argument("--kubectl", default="kubectl", help="kubectl binary (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.verb == "serve":
        return server.serve(args)
    return invalidate(args.mirror, args.images, args.kubectl)
