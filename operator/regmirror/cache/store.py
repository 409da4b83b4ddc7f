"""distribution's filesystem layout, read and pruned from outside the registry process.

    <root>/docker/registry/v2/blobs/sha256/<2 hex>/<64 hex>/data   content (layers, configs, manifests)
    <root>/docker/registry/v2/repositories/<name>/_manifests/...   tag and revision links
    <root>/docker/registry/v2/repositories/<name>/_uploads/<id>/   blobs being fetched

Eviction deletes a blob's directory the way distribution's own TTL scheduler
does (storage/vacuum.go RemoveBlob), leaving repository links behind: with the
blobdescriptor cache off, a link to a missing blob reads as "unknown", and the
proxy fetches it from the upstream again. The directory is first renamed into
a trash directory on the same filesystem, so it disappears in one step; a
reader that already opened `data` keeps reading the unlinked inode to the end.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

V2 = Path("docker") / "registry" / "v2"
TRASH = ".regmirror-trash"
DIGEST_PREFIX = "sha256:"
MANIFEST_MEDIA_HINTS = ("manifests", "layers", "config")


@dataclass(frozen=True)
class BlobFile:
    """One stored blob."""

    digest: str
    size: int
    mtime: float


def blob_dir(root: Path, digest: str) -> Path:
    """Directory of a blob (holds `data`)."""
    hexdigest = digest.removeprefix(DIGEST_PREFIX)
    return root / V2 / "blobs" / "sha256" / hexdigest[:2] / hexdigest


def scan_blobs(root: Path) -> dict[str, BlobFile]:
    """Every complete blob on the volume (a blob whose `data` is missing is not counted)."""
    found: dict[str, BlobFile] = {}
    base = root / V2 / "blobs" / "sha256"
    try:
        prefixes = list(os.scandir(base))
    except FileNotFoundError:
        return found
    for prefix in prefixes:
        if not prefix.is_dir():
            continue
        for entry in os.scandir(prefix.path):
            try:
                st = os.stat(os.path.join(entry.path, "data"))
            except (FileNotFoundError, NotADirectoryError):
                continue
            digest = DIGEST_PREFIX + entry.name
            found[digest] = BlobFile(digest, st.st_size, st.st_mtime)
    return found


def uploads_bytes(root: Path) -> int:
    """Bytes of blobs being fetched right now (distribution writes them under _uploads first)."""
    total = 0
    repos = root / V2 / "repositories"
    for dirpath, dirnames, filenames in os.walk(repos):
        if os.path.basename(dirpath) == "_manifests" or os.path.basename(dirpath) == "_layers":
            dirnames[:] = []
            continue
        if "_uploads" in Path(dirpath).parts:
            for name in filenames:
                try:
                    total += os.stat(os.path.join(dirpath, name)).st_size
                except FileNotFoundError:
                    continue
    return total


def referenced_digests(root: Path, digest: str, limit: int = 64) -> set[str]:
    """A manifest or index and every blob it references, transitively (what pinning an image keeps).

    Absent or unparsable blobs contribute only themselves: a layer is not JSON,
    and a manifest that is not on the volume pins nothing further.
    """
    seen: set[str] = set()
    todo = [digest]
    while todo and len(seen) < limit * 16:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        data = blob_dir(root, current) / "data"
        try:
            if data.stat().st_size > 4 << 20:  # manifests are small; never parse a layer
                continue
            doc = json.loads(data.read_bytes())
        except (OSError, ValueError):
            continue
        if not isinstance(doc, dict):
            continue
        for child in doc.get("manifests") or []:
            if isinstance(child, dict) and isinstance(child.get("digest"), str):
                todo.append(child["digest"])
        config = doc.get("config")
        if isinstance(config, dict) and isinstance(config.get("digest"), str):
            seen.add(config["digest"])
        for layer in doc.get("layers") or []:
            if isinstance(layer, dict) and isinstance(layer.get("digest"), str):
                seen.add(layer["digest"])
    return seen


def missing_references(root: Path, digest: str) -> dict[str, int]:
    """Blobs (with their sizes) a stored manifest references directly that are not on the volume yet."""
    data = blob_dir(root, digest) / "data"
    try:
        if data.stat().st_size > 4 << 20:
            return {}
        doc = json.loads(data.read_bytes())
    except (OSError, ValueError):
        return {}
    if not isinstance(doc, dict):
        return {}
    refs = [doc.get("config"), *(doc.get("layers") or [])]
    missing = {}
    for ref in refs:
        present = isinstance(ref, dict) and isinstance(ref.get("digest"), str) and (blob_dir(root, ref["digest"]) / "data").exists()
        if isinstance(ref, dict) and isinstance(ref.get("digest"), str) and isinstance(ref.get("size"), int) and not present:
            missing[ref["digest"]] = max(0, ref["size"])
    return missing


def evict_blob(root: Path, digest: str) -> int:
    """Remove one blob; returns the bytes freed (0 if it was already gone)."""
    source = blob_dir(root, digest)
    try:
        size = (source / "data").stat().st_size
    except FileNotFoundError:
        size = 0
    trash = root / V2 / TRASH
    trash.mkdir(parents=True, exist_ok=True)
    target = trash / f"{digest.removeprefix(DIGEST_PREFIX)}.{time.time_ns()}"
    try:
        os.rename(source, target)
    except FileNotFoundError:
        return 0
    shutil.rmtree(target, ignore_errors=True)
    return size


def tag_digest(root: Path, repository: str, tag: str) -> str | None:
    """The digest a tag points to in the local store, if the registry recorded it."""
    link = root / V2 / "repositories" / repository / "_manifests" / "tags" / tag / "current" / "link"
    try:
        text = link.read_text().strip()
    except OSError:
        return None
    return text if text.startswith(DIGEST_PREFIX) else None
