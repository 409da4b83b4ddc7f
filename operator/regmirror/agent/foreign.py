"""What other people left where containerd looks for a host: found before our files go there.

containerd picks ONE directory per registry host (`host_port_`, then
`host:port`, then `_default`; remotes/docker/config/hosts.go). Without a
hosts.toml in it, it loads the directory's Docker-style certificate files
(*.crt as CAs, *.cert + *.key as client certificates) for the registry. Once
a hosts.toml exists, it reads ONLY what that file names. So writing our
hosts.toml into a host's directory, or into one containerd tries earlier,
would silently drop an admin's CA or client certificate. This module finds
those files so the renderer can carry them into our hosts.toml by path, or
refuse the host and say why.

Files are read only to check that containerd will load them (a CA that
parses, a certificate/key pair that matches); nothing is copied, logged or
kept. A symlink is carried as it is (its target is a path on the host, not
in the agent's view of it), unchecked, exactly as containerd would use it.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable, Iterable
from pathlib import Path

from regmirror.agent import files as agentfiles
from regmirror.lowlevel import CAError, parse_ca_bundle, registry_host_spellings
from regmirror.render.nodefiles import HOSTS_TOML, ForeignCerts, containerd_host_dir

MAX_CERT_BYTES = 1024 * 1024


def _foreign_entries(directory: Path) -> list[os.DirEntry[str]] | None:
    """The directory's entries that are not ours (None: no such directory)."""
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return None
    except OSError:
        return []
    ours = {agentfiles.DIR_MARKER}
    return [
        e
        for e in entries
        if e.name not in ours
        and agentfiles.TEMP_INFIX not in e.name
        and not (e.is_file(follow_symlinks=False) and agentfiles.is_owned(Path(e.path)))
    ]


# Verdicts on files, by (path, size, mtime): the scan runs every step, the
# checks (a TLS load each) only when a file changed.
_VERDICTS: dict[tuple[str, ...], str | None] = {}
MAX_VERDICTS = 1024


def _stamp(*paths: Path) -> tuple[str, ...] | None:
    try:
        return tuple(f"{p}:{st.st_size}:{st.st_mtime_ns}" for p in paths for st in [p.stat()])
    except OSError:
        return None


def _remembered(paths: tuple[Path, ...], check: Callable[[], str | None]) -> str | None:
    key = _stamp(*paths)
    if key is not None and key in _VERDICTS:
        return _VERDICTS[key]
    verdict = check()
    if key is not None:
        if len(_VERDICTS) >= MAX_VERDICTS:
            _VERDICTS.clear()
        _VERDICTS[key] = verdict
    return verdict


def _ca_problem(path: Path) -> str | None:
    def check() -> str | None:
        try:
            if path.stat().st_size > MAX_CERT_BYTES:
                return "larger than 1 MiB"
            parse_ca_bundle(path.read_bytes())
        except CAError as exc:
            return str(exc)
        except OSError as exc:
            return f"unreadable: {exc.strerror or exc}"
        return None

    return _remembered((path,), check)


def _client_problem(cert: Path, key: Path | None) -> str | None:
    def check() -> str | None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        try:
            # An encrypted key fails here, as it does in Go's tls.X509KeyPair.
            context.load_cert_chain(str(cert), str(key) if key else None, password=lambda: b"")
        except (ssl.SSLError, OSError, ValueError) as exc:
            return f"not a certificate and key that load together ({type(exc).__name__})"
        return None

    return _remembered((cert,) if key is None else (cert, key), check)


def _certs_in(directory: Path, host_path: str, entries: list[os.DirEntry[str]]) -> ForeignCerts:
    ca: list[str] = []
    client: list[tuple[str, str | None]] = []
    unusable: list[str] = []
    names = {e.name for e in entries}
    for entry in sorted(entries, key=lambda e: e.name):
        if entry.is_dir(follow_symlinks=True):
            continue
        link = entry.is_symlink()
        path = Path(entry.path)
        if entry.name.endswith(".crt"):
            problem = None if link else _ca_problem(path)
            if problem:
                unusable.append(f"{host_path}/{entry.name}: {problem}")
            else:
                ca.append(f"{host_path}/{entry.name}")
        elif entry.name.endswith(".cert"):
            key_name = entry.name[: -len(".cert")] + ".key"
            key = directory / key_name if key_name in names else None
            problem = None if link or (key is not None and key.is_symlink()) else _client_problem(path, key)
            if problem:
                unusable.append(f"{host_path}/{entry.name}: {problem}")
            else:
                client.append((f"{host_path}/{entry.name}", f"{host_path}/{key_name}" if key else None))
    return ForeignCerts(directory=host_path, ca=tuple(ca), client=tuple(client), unusable=tuple(unusable))


def scan_host(host_root: Path, root: str, dir_name: str, spelling: str) -> ForeignCerts | None:
    """What is not ours where containerd looks for `spelling` (whose directory we write is `dir_name`).

    A foreign hosts.toml in our directory or in one containerd tries after
    it for the same spelling is returned as `hosts_toml` (we must not shadow
    it). Otherwise the certificates of the directory containerd used before
    us (ours if someone else's files are in it, else the next spelling).
    """
    lookups = [dir_name] + ([spelling] if spelling != dir_name else [])
    found: ForeignCerts | None = None
    for name in lookups:
        directory = agentfiles.on_host(host_root, f"{root}/{name}")
        if directory.is_symlink():
            return ForeignCerts(directory=f"{root}/{name}", hosts_toml=f"{root}/{name}")
        entries = _foreign_entries(directory)
        if not entries:
            continue
        if any(e.name == HOSTS_TOML for e in entries):
            return ForeignCerts(directory=f"{root}/{name}", hosts_toml=f"{root}/{name}/{HOSTS_TOML}")
        if found is None:
            found = _certs_in(directory, f"{root}/{name}", entries)
    return found


def scan(host_root: Path, root: str, hosts: Iterable[str]) -> dict[str, ForeignCerts]:
    """Foreign files for every directory our routes for these canonical hosts would use, keyed by our directory's host path."""
    root = root.rstrip("/")
    found = {}
    for host in hosts:
        for spelling in registry_host_spellings(host):
            dir_name = containerd_host_dir(spelling)
            foreign = scan_host(host_root, root, dir_name, spelling)
            if foreign is not None and (foreign.hosts_toml or foreign.ca or foreign.client or foreign.unusable):
                found[f"{root}/{dir_name}"] = foreign
    return found
