"""Preflight: will the node's runtime actually read the files the agent writes?

Writing a perfect hosts.toml is useless if containerd does not look at the
directory: pulls would then silently bypass the mirror. So the agent reads
containerd's own config and says plainly when it will not work:

- containerd 1.x (config `version = 2`, or 1): the CRI registry table is
  `[plugins."io.containerd.grpc.v1.cri".registry]` (`plugins.cri.registry` in
  version 1). `config_path` has NO default there: unset means hosts.toml is
  never read.
- containerd 2.x (config `version = 3`; 4 from 2.3 on): the table is
  `[plugins."io.containerd.cri.v1.images".registry]`; an empty `config_path`
  defaults to `/etc/containerd/certs.d:/etc/docker/certs.d` on Linux, unless
  the deprecated `mirrors` table is set. 2.x migrates older files on start,
  copying the old table over the new one: a version 2 file works as on 1.x
  (with the 2.x default), and on 2.3+ so does the old table in a version 3
  file, which 2.0-2.2 ignore. The Node's containerRuntimeVersion decides.
- The deprecated `mirrors` table replaces config_path when config_path is
  empty, and containerd refuses a CRI config that sets both.
- containerd 2.1+ pulls for the CRI through its transfer service unless a
  setting the transfer service lacks forces the old local pull. The transfer
  service takes config_path as ONE directory (core/transfer/registry:
  `HostDirFromRoot(config_path)`), so the 2.x default
  `/etc/containerd/certs.d:/etc/docker/certs.d` makes it read nothing and go
  straight to the registries, silently (containerd#12415, #12636; still so in
  2.4.2). The local pull splits the list.
- With a list, the first directory that has a directory for the host (or a
  `_default`) wins: an earlier directory shadows ours.
- CRI-O re-reads registries.conf.d only on SIGHUP (`systemctl reload crio`)
  unless `[crio.image] auto_reload_registries = true`.

Each check returns a result with ok / reason / message; nothing here writes.
"""

from __future__ import annotations

import glob
import re
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from regmirror import constants as c

CONTAINERD_CONFIG = "/etc/containerd/config.toml"
CONTAINERD_SOCKET = "/run/containerd/containerd.sock"
CONTAINERD_2_DEFAULT_CONFIG_PATH = "/etc/containerd/certs.d:/etc/docker/certs.d"
CRIO_CONFIG = "/etc/crio/crio.conf"
CRIO_CONFIG_DIR = "/etc/crio/crio.conf.d"

CRI_V1_PLUGIN = "io.containerd.grpc.v1.cri"
CRI_V2_IMAGES_PLUGIN = "io.containerd.cri.v1.images"


@dataclass(frozen=True)
class PreflightResult:
    """One runtime's verdict."""

    runtime: str
    ok: bool
    reason: str
    message: str


@dataclass(frozen=True)
class PreflightReport:
    """All runtimes' verdicts; ok only if every one is."""

    results: tuple[PreflightResult, ...]

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)

    @property
    def reason(self) -> str:
        failed = [r for r in self.results if not r.ok]
        return failed[0].reason if failed else "Ok"

    @property
    def message(self) -> str:
        return "; ".join(f"{r.runtime}: {r.message}" for r in self.results if not r.ok) or "; ".join(
            f"{r.runtime}: {r.message}" for r in self.results
        )


def _on_host(host_root: Path, path: str) -> Path:
    return host_root / path.lstrip("/")


_VERSION = re.compile(r"v?(?P<major>[0-9]+)(?:\.(?P<minor>[0-9]+))?(?:\.(?P<patch>[0-9]+))?")


def runtime_version_tuple(runtime_version: str | None, name: str) -> tuple[int, int, int] | None:
    """(major, minor, patch) from a Node's containerRuntimeVersion ("containerd://1.7.13",
    "containerd://1.6.20~ds1", "containerd://v2.1.0-rc.1"), if the runtime is `name`; missing parts are 0."""
    if not runtime_version or not runtime_version.startswith(name + "://"):
        return None
    match = _VERSION.match(runtime_version.split("://", 1)[1])
    if match is None:
        return None
    return int(match["major"]), int(match["minor"] or 0), int(match["patch"] or 0)


def runtime_release(runtime_version: str | None, name: str) -> tuple[int, int] | None:
    """(major, minor) from a Node's containerRuntimeVersion ("containerd://1.7.13"), if the runtime is `name`."""
    version = runtime_version_tuple(runtime_version, name)
    return version[:2] if version else None


def dial_timeout_supported(runtime_version: str | None) -> bool:
    """Whether this node's containerd reads hosts.toml's `dial_timeout`.

    containerd PR #11106 added it in 2.1.0; its backport to release/2.0
    (#12136, merged 2025-07-31) first shipped in v2.0.7 (v2.0.6 was tagged the
    day before). 1.x never had it. Older releases ignore the unknown key
    (go-toml decodes leniently; tests/e2e/test_failopen.py runs 1.6, 1.7 and
    2.0.5 with it), so this is about writing only what the runtime reads, and
    about knowing which nodes have the sub-second fallback.
    """
    version = runtime_version_tuple(runtime_version, "containerd")
    if version is None:
        return False
    return version >= (2, 1, 0) or (version[:2] == (2, 0) and version[2] >= 7)


def runtime_major(runtime_version: str | None, name: str) -> int | None:
    """Major version from a Node's containerRuntimeVersion, if the runtime is `name`."""
    release = runtime_release(runtime_version, name)
    return release[0] if release else None


def _merge(into: dict[str, Any], other: dict[str, Any]) -> None:
    for key, value in other.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def load_containerd_config(host_root: Path, path: str = CONTAINERD_CONFIG) -> dict[str, Any]:
    """config.toml with its `imports` merged in (imported files override, as in containerd)."""
    config_file = _on_host(host_root, path)
    with config_file.open("rb") as fh:
        config = tomllib.load(fh)
    imports = config.get("imports") or []
    for pattern in imports if isinstance(imports, list) else []:
        absolute = pattern if str(pattern).startswith("/") else str(Path(path).parent / str(pattern))
        for match in sorted(glob.glob(str(_on_host(host_root, absolute)))):
            with open(match, "rb") as fh:
                _merge(config, tomllib.load(fh))
    return config


# The keys containerd 2.x's config migration copies from the old CRI plugin
# table into the images plugin (plugins/cri/images/plugin.go `migrateConfig`);
# the `containerd` sub-table's keys move only when it has `runtimes`.
_MIGRATED_IMAGE_KEYS = ("registry", "max_concurrent_downloads", "image_pull_with_sync_fs")
_MIGRATED_CONTAINERD_KEYS = ("snapshotter", "disable_snapshot_annotations", "discard_unpacked_layers")


def images_plugin_settings(config: dict[str, Any], release: tuple[int, int]) -> dict[str, Any]:
    """The `[plugins."io.containerd.cri.v1.images"]` settings containerd 2.x ends up with after migrating the file."""
    version = int(config.get("version", 1))
    plugins = config.get("plugins", {})
    images = plugins.get(CRI_V2_IMAGES_PLUGIN)
    settings = dict(images) if isinstance(images, dict) else {}
    legacy = plugins.get(CRI_V1_PLUGIN if version >= 2 else "cri")
    if version < _latest_config_version(release) and isinstance(legacy, dict):
        settings.update({k: legacy[k] for k in _MIGRATED_IMAGE_KEYS if k in legacy})
        ctrd = legacy.get("containerd")
        if isinstance(ctrd, dict) and isinstance(ctrd.get("runtimes"), dict):
            settings.update({k: ctrd[k] for k in _MIGRATED_CONTAINERD_KEYS if k in ctrd})
    return settings


def local_pull_reason(images: dict[str, Any]) -> str | None:
    """Why containerd 2.1+ pulls for the CRI without the transfer service, or None when it uses it.

    The same list as containerd's CheckLocalImagePullConfigs (internal/cri/config/config.go).
    """
    raw = images.get("registry")
    registry: dict[str, Any] = raw if isinstance(raw, dict) else {}
    checks = (
        ("use_local_image_pull = true", images.get("use_local_image_pull") is True),
        ("disable_snapshot_annotations = false", images.get("disable_snapshot_annotations") is False),
        ("discard_unpacked_layers = true", images.get("discard_unpacked_layers") is True),
        ("a registry mirrors/configs/auths table", any(bool(registry.get(k)) for k in ("mirrors", "configs", "auths"))),
        ("max_concurrent_downloads other than 3", images.get("max_concurrent_downloads", 3) != 3),
        ("image_pull_with_sync_fs = true", images.get("image_pull_with_sync_fs") is True),
    )
    return next((why for why, present in checks if present), None)


def _first_found(host_root: Path, roots: list[str], dir_names: Iterable[str]) -> str | None:
    """The first `<root>/<name>` (or `<root>/_default`) that exists under the host root, in containerd's lookup order."""
    names = [*dir_names, "_default"]
    for root in roots:
        for name in names:
            if _on_host(host_root, f"{root}/{name}").exists():
                return f"{root}/{name}"
    return None


def _latest_config_version(release: tuple[int, int]) -> int:
    # containerd 2.0-2.2 write config version 3, 2.3+ version 4 (RELEASES.md).
    return 4 if release >= (2, 3) else 3


def _registry_table(config: dict[str, Any], release: tuple[int, int] | None) -> tuple[int, str, dict[str, Any]]:
    """(config version, the table's TOML name, the table) of the CRI registry settings containerd will use.

    containerd 2.x migrates any config older than its latest version, and the
    migration copies `[plugins."io.containerd.grpc.v1.cri".registry]` over
    `[plugins."io.containerd.cri.v1.images".registry]`: so on 2.3+ even a
    version 3 file's old table wins, while 2.0-2.2 ignore it (both seen on
    the real daemons in tests/e2e/test_agent_containerd.py).
    """
    version = int(config.get("version", 1))
    plugins = config.get("plugins", {})

    def table(key: str) -> dict[str, Any] | None:
        plugin = plugins.get(key)
        registry = plugin.get("registry") if isinstance(plugin, dict) else None
        return registry if isinstance(registry, dict) else None

    legacy_key = CRI_V1_PLUGIN if version >= 2 else "cri"
    legacy, images = table(legacy_key), table(CRI_V2_IMAGES_PLUGIN)
    legacy_name, images_name = f'[plugins."{legacy_key}".registry]', f'[plugins."{CRI_V2_IMAGES_PLUGIN}".registry]'
    if version < 3 and (release is None or release[0] < 2):
        return version, legacy_name, legacy or {}
    if release is not None:
        if version < _latest_config_version(release) and legacy is not None:
            return version, legacy_name, legacy
        return version, images_name, images or {}
    # A version 3 file on a containerd of unknown release: 2.0-2.2 read only
    # the images table, 2.3+ let the old table override it.
    if version == 3 and legacy is not None and legacy != (images or {}):
        raise AmbiguousConfig(f"{legacy_name} and {images_name} differ: containerd 2.3+ uses the first, 2.0-2.2 the second")
    return version, images_name, images or {}


class AmbiguousConfig(ValueError):
    """The effective registry settings depend on the containerd release, which is unknown."""


def check_containerd(
    host_root: Path,
    config_path: str = c.CONTAINERD_CONFIG_PATH,
    *,
    runtime_version: str | None = None,
    config_file: str = CONTAINERD_CONFIG,
    host_dirs: Iterable[Iterable[str]] = (),
) -> PreflightResult:
    """Whether containerd on this node reads hosts.toml from `config_path`.

    `host_dirs` are, per routed registry host, the directory names containerd
    looks it up under (ours first), for the check that no earlier directory of
    a config_path list shadows ours.
    """
    name = "containerd"
    release = runtime_release(runtime_version, name)
    major = release[0] if release else None
    other_runtime = bool(runtime_version) and major is None and not str(runtime_version).startswith(name + "://")
    cfg = _on_host(host_root, config_file)
    if not cfg.exists():
        if other_runtime or (runtime_version is None and not _on_host(host_root, CONTAINERD_SOCKET).exists()):
            return PreflightResult(
                name, True, "ContainerdNotPresent", f"no {config_file} and no containerd socket: this node runs no containerd"
            )
        if major is not None and major >= 2:
            ok = config_path.rstrip("/") in CONTAINERD_2_DEFAULT_CONFIG_PATH.split(":")
            if ok and release is not None and release >= (2, 1):
                return PreflightResult(
                    name,
                    False,
                    "ConfigPathListIgnored",
                    f"no {config_file}: containerd {release[0]}.{release[1]} defaults config_path to the list "
                    f"{CONTAINERD_2_DEFAULT_CONFIG_PATH}, which its transfer service reads as one directory (containerd#12415, "
                    f"#12636): no hosts.toml is read; write a config.toml with config_path = {config_path!r}",
                )
            return PreflightResult(
                name,
                ok,
                "DefaultConfigPath" if ok else "ConfigPathElsewhere",
                f"no {config_file}: containerd {major}.x defaults config_path to {CONTAINERD_2_DEFAULT_CONFIG_PATH}"
                + ("" if ok else f", which does not include {config_path}"),
            )
        return PreflightResult(
            name,
            False,
            "ConfigMissing",
            f"no {config_file}: containerd 1.x has no default config_path, so it would ignore {config_path} "
            f"(containerd 2.x would read it by default; the node's runtime version is {runtime_version or 'unknown'})",
        )
    try:
        config = load_containerd_config(host_root, config_file)
        version, table, registry = _registry_table(config, release)
    except AmbiguousConfig as exc:
        return PreflightResult(
            name, False, "AmbiguousRegistryConfig", f"{config_file}: {exc}; keep one of them (the node's runtime version is unknown)"
        )
    except (OSError, tomllib.TOMLDecodeError, ValueError, TypeError) as exc:
        return PreflightResult(name, False, "ConfigUnreadable", f"cannot read {config_file}: {exc}")
    configured = str(registry.get("config_path") or "")
    mirrors = registry.get("mirrors") or {}
    configs = registry.get("configs") or {}
    if mirrors and configured:
        return PreflightResult(
            name,
            False,
            "DeprecatedMirrors",
            f"{table} sets both config_path and the deprecated mirrors table: containerd's CRI plugin refuses this",
        )
    if mirrors:
        return PreflightResult(
            name,
            False,
            "DeprecatedMirrors",
            f"{table} uses the deprecated mirrors table, which replaces config_path: remove mirrors and set config_path = {config_path!r}",
        )
    is_v2 = version >= 3 or (major is not None and major >= 2)
    if not configured:
        if is_v2:
            configured = CONTAINERD_2_DEFAULT_CONFIG_PATH
        else:
            where = (
                "containerd 1.x has no default" if major == 1 else "containerd 1.x has no default; 2.x would use /etc/containerd/certs.d"
            )
            return PreflightResult(
                name,
                False,
                "ConfigPathUnset",
                f"{table} config_path is not set in {config_file} ({where}): hosts.toml files are ignored; set config_path = {config_path!r}",
            )
    paths = [p.rstrip("/") for p in configured.split(":") if p]
    ours = config_path.rstrip("/")
    if ours not in paths:
        return PreflightResult(
            name,
            False,
            "ConfigPathElsewhere",
            f"{table} config_path is {configured!r}, not {config_path!r}: containerd does not read the files the agent writes",
        )
    if len(paths) > 1 and release is not None and release >= (2, 1):
        images = images_plugin_settings(config, release)
        if local_pull_reason(images) is None:
            return PreflightResult(
                name,
                False,
                "ConfigPathListIgnored",
                f"{table} config_path is the list {configured!r}: containerd {release[0]}.{release[1]} pulls for the CRI through "
                "its transfer service, which reads config_path as one directory (containerd#12415, #12636), so it reads no "
                f"hosts.toml at all and pulls go straight to the registries; set config_path = {ours!r} (one directory), or "
                f'use_local_image_pull = true in [plugins."{CRI_V2_IMAGES_PLUGIN}"]',
            )
    for dir_names in host_dirs:
        names = list(dir_names)
        found = _first_found(host_root, paths[: paths.index(ours)], names)
        if found is not None:
            return PreflightResult(
                name,
                False,
                "ConfigPathShadowed",
                f"{table} config_path is {configured!r}: containerd finds {found} before {ours}/{names[0]}, so it never reads "
                f"the agent's file for {names[0]}; put {ours} first in config_path, or remove {found}",
            )
    note = " (the deprecated configs table is ignored for hosts)" if configs else ""
    return PreflightResult(name, True, "Ok", f"config version {version}: {table} config_path includes {config_path}{note}")


def crio_image_settings(host_root: Path) -> dict[str, Any] | None:
    """CRI-O's [crio.image] table from crio.conf and its drop-ins (later files win, key by key); None if none is readable."""
    files = [_on_host(host_root, CRIO_CONFIG)]
    drop_dir = _on_host(host_root, CRIO_CONFIG_DIR)
    if drop_dir.is_dir():
        files += sorted(drop_dir.glob("*.conf"))
    merged: dict[str, Any] = {}
    seen = False
    for f in files:
        try:
            with f.open("rb") as fh:
                data = tomllib.load(fh)
        except (OSError, tomllib.TOMLDecodeError):
            continue
        seen = True
        image = data.get("crio", {}).get("image", {})
        if isinstance(image, dict):
            merged.update(image)
    return merged if seen else None


def _crio_auto_reload(host_root: Path) -> bool | None:
    """auto_reload_registries from crio.conf and its drop-ins (later wins); None if unreadable."""
    image = crio_image_settings(host_root)
    return None if image is None else bool(image.get("auto_reload_registries", False))


def check_crio(host_root: Path) -> PreflightResult:
    """Whether CRI-O will pick up a changed registries.conf.d drop-in by itself."""
    auto = _crio_auto_reload(host_root)
    if auto:
        return PreflightResult("crio", True, "Ok", "auto_reload_registries = true: CRI-O re-reads registries.conf.d on change")
    if auto is None:
        return PreflightResult(
            "crio",
            True,
            "CrioConfigNotVisible",
            f"cannot read {CRIO_CONFIG}: unless [crio.image] auto_reload_registries = true, run `systemctl reload crio` (SIGHUP) after changes",
        )
    return PreflightResult(
        "crio",
        False,
        "CrioReloadRequired",
        "CRI-O reads registries.conf.d only on SIGHUP: set [crio.image] auto_reload_registries = true or run `systemctl reload crio`",
    )


def run_preflight(
    host_root: Path,
    *,
    containerd_config_path: str = c.CONTAINERD_CONFIG_PATH,
    containerd_config_file: str = CONTAINERD_CONFIG,
    runtimes: Iterable[str] = ("containerd",),
    runtime_version: str | None = None,
    host_dirs: Iterable[Iterable[str]] = (),
) -> PreflightReport:
    """Check every runtime the node's files are written for."""
    wanted = set(runtimes)
    results = []
    if "containerd" in wanted:
        results.append(
            check_containerd(
                host_root,
                containerd_config_path,
                runtime_version=runtime_version,
                config_file=containerd_config_file,
                host_dirs=host_dirs,
            )
        )
    if "crio" in wanted:
        results.append(check_crio(host_root))
    return PreflightReport(tuple(results))
