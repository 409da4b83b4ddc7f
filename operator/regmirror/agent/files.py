"""Apply a desired set of files on the host, safely.

Rules, each for a reason:
- Writes are atomic (temp file in the same directory, fsync, rename, fsync
  the directory): containerd reads hosts.toml on every pull, and a reader
  must see the old file or the new one, never half of one, even if the agent
  is killed mid-write.
- A file is ours only if its first line is the ownership marker. A file
  without it (an admin's hosts.toml) is never overwritten or deleted: it is
  skipped and reported as a conflict.
- Equal content is not rewritten (no mtime churn, no needless reloads).
- Our files that are no longer desired are removed, and so are the
  directories we created for them once empty (we mark those with a marker
  file, so a directory an admin made is never removed), except in the
  directories we are told to keep (their new rendering failed its check).
- Every path stays inside its managed directory: a path with `..`, `.`,
  `//`, a NUL or anything not under a managed directory is refused, and no
  write goes through a symlinked directory (a path is resolved after the
  directories are made, and must still be inside the managed directory).
  The renderer never produces such paths; this is the last line, because
  the agent runs as root on every node.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import secrets
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from regmirror import constants as c

TEMP_INFIX = ".regmirror-tmp-"
# Dropped into every directory the agent creates, so it knows it may remove
# that directory again; containerd ignores files that are not hosts.toml,
# *.crt, *.cert or *.key.
DIR_MARKER = ".regmirror-dir"
MARKER_LINE = c.OWNERSHIP_MARKER + "\n"


@dataclass(frozen=True)
class Conflict:
    """A desired file we did not write because a file we do not own is in the way."""

    path: str
    reason: str


@dataclass
class ApplyResult:
    written: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    conflicts: list[Conflict] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.written or self.removed)


def on_host(host_root: Path, path: str) -> Path:
    """A host path as the agent sees it under its host root."""
    return host_root / path.lstrip("/")


def is_owned(path: Path) -> bool:
    """Whether `path` is a regular file (not a symlink) whose first line is our marker."""
    try:
        if not path.is_file() or path.is_symlink():
            return False
        with path.open("rb") as fh:
            return fh.read(len(MARKER_LINE.encode())) == MARKER_LINE.encode()
    except OSError:
        return False


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, content: str, mode: int = 0o644) -> None:
    """Replace `path` with `content` so that readers see the old or the new file, never a mix."""
    tmp = path.with_name(f".{path.name}{TEMP_INFIX}{os.getpid()}-{secrets.token_hex(4)}")
    data = content.encode()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fchmod(fd, mode)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def unsafe_path(host_path: str, managed: Iterable[str]) -> str | None:
    """Why a desired host path must not be written (None: it is a plain path inside a managed directory)."""
    if not isinstance(host_path, str) or "\0" in host_path or not host_path.startswith("/"):
        return "not an absolute path"
    if posixpath.normpath(host_path) != host_path or any(part in (".", "..") for part in host_path.split("/")):
        return "not a normalised path ('..', '.' or '//')"
    if not any(host_path.startswith(d.rstrip("/") + "/") and host_path != d for d in managed):
        return "outside the managed directories"
    return None


def symlink_on_the_way(target: Path, root: Path) -> Path | None:
    """The first component between `root` and `target` that is a symlink or not a directory, if any."""
    current = root
    for part in target.relative_to(root).parts[:-1]:
        current = current / part
        if current.is_symlink() or (current.exists() and not current.is_dir()):
            return current
    return None


def _inside(directory: Path, root: Path) -> bool:
    """Whether `directory`, symlinks resolved, is `root` or below it."""
    real_root, real = os.path.realpath(root), os.path.realpath(directory)
    return real == real_root or real.startswith(real_root.rstrip("/") + "/")


def _make_dirs(directory: Path, stop: Path) -> None:
    """Create `directory` (and parents below `stop`), marking each one we create as ours."""
    stop.mkdir(parents=True, exist_ok=True)  # the runtime's own directory: never marked, never removed
    missing = []
    current = directory
    while not current.exists() and current != stop and current != current.parent:
        missing.append(current)
        current = current.parent
    for new in reversed(missing):
        with contextlib.suppress(FileExistsError):
            new.mkdir(mode=0o755)
        atomic_write(new / DIR_MARKER, MARKER_LINE)


def _walk_files(root: Path, max_depth: int = 2) -> Iterator[Path]:
    """Regular files under `root`, at most `max_depth` levels deep, without following symlinks."""
    if not root.is_dir():
        return
    stack = [(root, 0)]
    while stack:
        directory, depth = stack.pop()
        try:
            entries = list(os.scandir(directory))
        except OSError:
            continue
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                if depth + 1 < max_depth:
                    stack.append((Path(entry.path), depth + 1))
            elif entry.is_file(follow_symlinks=False):
                yield Path(entry.path)


def clean_stale_temp_files(host_root: Path, managed_dirs: Iterable[str]) -> list[str]:
    """Remove temp files a killed agent left behind (ours only: they carry our infix)."""
    removed = []
    for managed in managed_dirs:
        for path in _walk_files(on_host(host_root, managed)):
            if path.name.startswith(".") and TEMP_INFIX in path.name:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    removed.append(str(path))
    return removed


def owned_files(host_root: Path, managed_dirs: Iterable[str]) -> set[Path]:
    """Files we own under the managed directories (directory markers excluded)."""
    found = set()
    for managed in managed_dirs:
        for path in _walk_files(on_host(host_root, managed)):
            if path.name != DIR_MARKER and TEMP_INFIX not in path.name and is_owned(path):
                found.add(path)
    return found


def _remove_dir_if_ours_and_empty(directory: Path, stop: Path) -> None:
    while directory != stop and stop in directory.parents:
        marker = directory / DIR_MARKER
        if not is_owned(marker):
            return
        try:
            if any(entry.name != DIR_MARKER for entry in os.scandir(directory)):
                return
            marker.unlink()
            directory.rmdir()
        except OSError:
            return
        directory = directory.parent


PRIVATE_MODE = 0o600


def apply_files(
    desired: Mapping[str, str], *, host_root: Path, managed_dirs: Iterable[str], keep: Iterable[str] = (), private: Iterable[str] = ()
) -> ApplyResult:
    """Make the managed directories hold exactly our desired files, leaving everyone else's alone.

    `desired` maps host paths to contents (each starting with the ownership
    marker); every desired path must lie under one of `managed_dirs`. Our
    files in the directories of `keep` (host paths) stay as they are. The
    paths in `private` carry a credential: they are written (or put back to)
    mode 0600, readable by root only.
    """
    private_paths = set(private)
    managed = [d.rstrip("/") or "/" for d in managed_dirs]
    kept = [k.rstrip("/") + "/" for k in keep]
    result = ApplyResult()
    clean_stale_temp_files(host_root, managed)

    def managed_root_of(path: str) -> Path | None:
        for d in managed:
            if path.startswith(d + "/"):
                return on_host(host_root, d)
        return None

    for host_path in sorted(desired):
        content = desired[host_path]
        unsafe = unsafe_path(host_path, managed)
        root = managed_root_of(host_path) if unsafe is None else None
        if unsafe is not None or root is None:
            result.errors.append(f"{host_path!r}: refused: {unsafe or 'outside the managed directories'}")
            continue
        target = on_host(host_root, host_path)
        if not content.startswith(MARKER_LINE):
            result.errors.append(f"{host_path}: desired content lacks the ownership marker")
            continue
        try:
            blocker = symlink_on_the_way(target, root) if root.exists() else None
            if blocker is not None:
                result.conflicts.append(Conflict(host_path, f"{blocker} is a symlink or not a directory; nothing is written through it"))
                continue
            if target.is_symlink() or (target.exists() and not target.is_file()):
                result.conflicts.append(Conflict(host_path, "a symlink or directory we do not own is in the way"))
                continue
            if target.exists():
                if not is_owned(target):
                    result.conflicts.append(Conflict(host_path, "a file without the regmirror ownership marker exists; left untouched"))
                    continue
                mode = PRIVATE_MODE if host_path in private_paths else 0o644
                if target.read_bytes() == content.encode() and (target.stat().st_mode & 0o777) == mode:
                    result.unchanged.append(host_path)
                    continue
            _make_dirs(target.parent, root)
            if not _inside(target.parent, root):
                result.errors.append(f"{host_path}: resolves outside {root}; refused")
                continue
            atomic_write(target, content, PRIVATE_MODE if host_path in private_paths else 0o644)
            result.written.append(host_path)
        except OSError as exc:
            result.errors.append(f"{host_path}: {exc.strerror or exc}")

    wanted = {on_host(host_root, p) for p in desired}
    kept_on_host = [str(on_host(host_root, k)).rstrip("/") + "/" for k in kept]
    for path in sorted(owned_files(host_root, managed) - wanted):
        if any(str(path).startswith(k) for k in kept_on_host):
            continue
        try:
            path.unlink()
            _fsync_dir(path.parent)
        except FileNotFoundError:
            continue
        except OSError as exc:
            result.errors.append(f"{path}: cannot remove: {exc.strerror or exc}")
            continue
        result.removed.append("/" + str(path.relative_to(host_root)))
        root = next((on_host(host_root, d) for d in managed if on_host(host_root, d) in path.parents), None)
        if root is not None:
            _remove_dir_if_ours_and_empty(path.parent, root)
    return result
