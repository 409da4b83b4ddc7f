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
- CRI-O re-reads registries.conf.d only on SIGHUP (`systemctl reload crio`)
  unless `[crio.image] auto_reload_registries = true`.

Each check returns a result with ok / reason / message; nothing here writes.
"""

from __future__ import annotations

import glob
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


def runtime_release(runtime_version: str | None, name: str) -> tuple[int, int] | None:
    """(major, minor) from a Node's containerRuntimeVersion ("containerd://1.7.13"), if the runtime is `name`."""
    if not runtime_version or not runtime_version.startswith(name + "://"):
        return None
    parts = runtime_version.split("://", 1)[1].lstrip("v").split(".")
    try:
        return int(parts[0]), int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    except ValueError:
        return None


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
) -> PreflightResult:
    """Whether containerd on this node reads hosts.toml from `config_path`."""
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
    if config_path.rstrip("/") not in paths:
        return PreflightResult(
            name,
            False,
            "ConfigPathElsewhere",
            f"{table} config_path is {configured!r}, not {config_path!r}: containerd does not read the files the agent writes",
        )
    note = " (the deprecated configs table is ignored for hosts)" if configs else ""
    return PreflightResult(name, True, "Ok", f"config version {version}: {table} config_path includes {config_path}{note}")


def _crio_auto_reload(host_root: Path) -> bool | None:
    """auto_reload_registries from crio.conf and its drop-ins (later wins); None if unreadable."""
    files = [_on_host(host_root, CRIO_CONFIG)]
    drop_dir = _on_host(host_root, CRIO_CONFIG_DIR)
    if drop_dir.is_dir():
        files += sorted(drop_dir.glob("*.conf"))
    value: bool | None = None
    seen = False
    for f in files:
        try:
            with f.open("rb") as fh:
                data = tomllib.load(fh)
        except (OSError, tomllib.TOMLDecodeError):
            continue
        seen = True
        image = data.get("crio", {}).get("image", {})
        if "auto_reload_registries" in image:
            value = bool(image["auto_reload_registries"])
    return (value or False) if seen else None


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
) -> PreflightReport:
    """Check every runtime the node's files are written for."""
    wanted = set(runtimes)
    results = []
    if "containerd" in wanted:
        results.append(
            check_containerd(host_root, containerd_config_path, runtime_version=runtime_version, config_file=containerd_config_file)
        )
    if "crio" in wanted:
        results.append(check_crio(host_root))
    return PreflightReport(tuple(results))
