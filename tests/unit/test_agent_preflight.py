"""Preflight: does the node's containerd (1.x or 2.x) or CRI-O read the files the agent writes?"""

from __future__ import annotations

from pathlib import Path

import pytest

from regmirror.agent.preflight import check_containerd, check_crio, dial_timeout_supported, run_preflight, runtime_version_tuple

CERTS = "/etc/containerd/certs.d"
V1_TABLE = '[plugins."io.containerd.grpc.v1.cri".registry]'
V2_TABLE = '[plugins."io.containerd.cri.v1.images".registry]'


def write(root: Path, path: str, text: str) -> None:
    target = root / path.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)


def containerd_config(root: Path, text: str) -> None:
    write(root, "/etc/containerd/config.toml", text)


@pytest.mark.parametrize(
    ("config", "ok", "reason"),
    [
        # containerd 1.6 / 1.7 (config version 2)
        (f'version = 2\n{V1_TABLE}\n  config_path = "{CERTS}"\n', True, "Ok"),
        (f'version = 2\n{V1_TABLE}\n  config_path = "/etc/docker/certs.d:{CERTS}/"\n', True, "Ok"),
        (f'version = 2\n{V1_TABLE}\n  config_path = ""\n', False, "ConfigPathUnset"),
        ("version = 2\n", False, "ConfigPathUnset"),
        (f'version = 2\n{V1_TABLE}\n  config_path = "/etc/other"\n', False, "ConfigPathElsewhere"),
        (f'version = 2\n{V2_TABLE}\n  config_path = "{CERTS}"\n', False, "ConfigPathUnset"),  # 2.x table in a 1.x config
        (f'version = 2\n{V1_TABLE[:-1]}.mirrors."docker.io"]\n  endpoint = ["http://m"]\n', False, "DeprecatedMirrors"),
        (
            f'version = 2\n{V1_TABLE}\n  config_path = "{CERTS}"\n{V1_TABLE[:-1]}.mirrors."docker.io"]\n  endpoint = ["http://m"]\n',
            False,
            "DeprecatedMirrors",
        ),
        (f'[plugins.cri.registry]\n  config_path = "{CERTS}"\n', True, "Ok"),  # version 1
        # containerd 2.x (config version 3)
        (f'version = 3\n{V2_TABLE}\n  config_path = "{CERTS}"\n', True, "Ok"),
        ("version = 3\n", True, "Ok"),  # default /etc/containerd/certs.d:/etc/docker/certs.d
        (f'version = 3\n{V2_TABLE}\n  config_path = "/etc/other"\n', False, "ConfigPathElsewhere"),
        (f'version = 4\n{V2_TABLE}\n  config_path = "{CERTS}"\n', True, "Ok"),  # containerd 2.3+
        # 2.0-2.2 ignore the old table in a version 3 file, 2.3+ let it override: unknown release, so say so.
        (f'version = 3\n{V1_TABLE}\n  config_path = "/etc/other"\n', False, "AmbiguousRegistryConfig"),
        ("version = 3\nthis is not toml", False, "ConfigUnreadable"),
    ],
)
def test_containerd_config(tmp_path: Path, config: str, ok: bool, reason: str) -> None:
    containerd_config(tmp_path, config)
    result = check_containerd(tmp_path, CERTS)
    assert (result.ok, result.reason) == (ok, reason), result.message
    if not ok:
        assert "config" in result.message


def test_a_version_2_config_on_containerd_2_gets_the_2x_default(tmp_path: Path) -> None:
    containerd_config(tmp_path, "version = 2\n")
    assert check_containerd(tmp_path, CERTS, runtime_version="containerd://2.0.5").ok
    assert not check_containerd(tmp_path, CERTS, runtime_version="containerd://1.7.27").ok
    # 2.1+: the same default is a list, which the transfer service reads as one directory.
    assert check_containerd(tmp_path, CERTS, runtime_version="containerd://2.1.4").reason == "ConfigPathListIgnored"


def test_a_version_3_file_with_the_old_table_depends_on_the_release(tmp_path: Path) -> None:
    containerd_config(tmp_path, f'version = 3\n{V1_TABLE}\n  config_path = "/etc/other"\n')
    assert check_containerd(tmp_path, CERTS, runtime_version="containerd://2.0.5").ok  # old table ignored, default applies
    result = check_containerd(tmp_path, CERTS, runtime_version="containerd://2.4.2")  # migrated over the new one
    assert (result.ok, result.reason) == (False, "ConfigPathElsewhere")
    assert V1_TABLE in result.message


IMAGES = '[plugins."io.containerd.cri.v1.images"]'
LIST = f"{CERTS}:/etc/docker/certs.d"


@pytest.mark.parametrize("release", ["2.1.0", "2.1.5", "2.2.1", "2.3.4", "2.4.2"])
@pytest.mark.parametrize(
    ("config", "ok"),
    [
        (f'version = 3\n{V2_TABLE}\n  config_path = "{LIST}"\n', False),
        (f'version = 3\n{V2_TABLE}\n  config_path = "{CERTS}"\n', True),
        ("version = 3\n", False),  # the default is the list
        # Each setting that makes containerd pull without the transfer service (CheckLocalImagePullConfigs):
        (f'version = 3\n{IMAGES}\n  use_local_image_pull = true\n{V2_TABLE}\n  config_path = "{LIST}"\n', True),
        (f'version = 3\n{IMAGES}\n  disable_snapshot_annotations = false\n{V2_TABLE}\n  config_path = "{LIST}"\n', True),
        (f'version = 3\n{IMAGES}\n  discard_unpacked_layers = true\n{V2_TABLE}\n  config_path = "{LIST}"\n', True),
        (f'version = 3\n{IMAGES}\n  max_concurrent_downloads = 5\n{V2_TABLE}\n  config_path = "{LIST}"\n', True),
        (f'version = 3\n{IMAGES}\n  image_pull_with_sync_fs = true\n{V2_TABLE}\n  config_path = "{LIST}"\n', True),
        (f'version = 3\n{IMAGES}\n  max_concurrent_downloads = 3\n{V2_TABLE}\n  config_path = "{LIST}"\n', False),
        (f'version = 3\n{V2_TABLE}\n  config_path = "{LIST}"\n{V2_TABLE[:-1]}.configs."r.example".auth]\n  username = "u"\n', True),
        # A version 2 file is migrated: discard_unpacked_layers moves only with a runtimes table (migrateConfig).
        (
            f'version = 2\n{V1_TABLE}\n  config_path = "{LIST}"\n[plugins."io.containerd.grpc.v1.cri".containerd]\n'
            "  discard_unpacked_layers = true\n",
            False,
        ),
        (
            f'version = 2\n{V1_TABLE}\n  config_path = "{LIST}"\n[plugins."io.containerd.grpc.v1.cri".containerd]\n'
            '  discard_unpacked_layers = true\n[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]\n  runtime_type = "x"\n',
            True,
        ),
    ],
)
def test_a_config_path_list_is_ignored_by_the_transfer_service_of_21_and_later(tmp_path: Path, release: str, config: str, ok: bool) -> None:
    containerd_config(tmp_path, config)
    result = check_containerd(tmp_path, CERTS, runtime_version=f"containerd://{release}")
    assert (result.ok, result.reason) == (ok, "Ok" if ok else "ConfigPathListIgnored"), result.message
    # containerd 2.0 has no transfer service in the CRI: the list always works there.
    if "version = 3" in config:
        assert check_containerd(tmp_path, CERTS, runtime_version="containerd://2.0.7").ok


def test_an_earlier_directory_of_the_list_shadows_ours(tmp_path: Path) -> None:
    containerd_config(tmp_path, f'version = 2\n{V1_TABLE}\n  config_path = "/etc/docker/certs.d:{CERTS}"\n')
    hosts = [["registry.example_5000_", "registry.example:5000"], ["docker.io"]]
    assert check_containerd(tmp_path, CERTS, runtime_version="containerd://1.7.27", host_dirs=hosts).ok
    (tmp_path / "etc/docker/certs.d/registry.example:5000").mkdir(parents=True)  # Docker's layout: host:port
    result = check_containerd(tmp_path, CERTS, runtime_version="containerd://1.7.27", host_dirs=hosts)
    assert (result.ok, result.reason) == (False, "ConfigPathShadowed")
    assert "/etc/docker/certs.d/registry.example:5000" in result.message
    (tmp_path / "etc/docker/certs.d/registry.example:5000").rmdir()
    (tmp_path / "etc/docker/certs.d/_default").mkdir()  # shadows every host
    assert (
        check_containerd(tmp_path, CERTS, runtime_version="containerd://1.7.27", host_dirs=[["docker.io"]]).reason == "ConfigPathShadowed"
    )
    # Ours first: nothing after it matters.
    containerd_config(tmp_path, f'version = 2\n{V1_TABLE}\n  config_path = "{CERTS}:/etc/docker/certs.d"\n')
    assert check_containerd(tmp_path, CERTS, runtime_version="containerd://1.7.27", host_dirs=hosts).ok


@pytest.mark.parametrize(
    ("version", "parsed", "dial_timeout"),
    [
        ("containerd://1.6.20~ds1", (1, 6, 20), False),
        ("containerd://1.7.35", (1, 7, 35), False),
        ("containerd://2.0.0", (2, 0, 0), False),
        ("containerd://2.0.6", (2, 0, 6), False),
        ("containerd://v2.0.7", (2, 0, 7), True),
        ("containerd://2.0.14", (2, 0, 14), True),
        ("containerd://2.1.0-rc.1", (2, 1, 0), True),
        ("containerd://2.1", (2, 1, 0), True),
        ("containerd://2.4.2", (2, 4, 2), True),
        ("containerd://3.0.0", (3, 0, 0), True),
        ("cri-o://1.31.0", None, False),
        ("containerd://garbage", None, False),
        (None, None, False),
    ],
)
def test_dial_timeout_only_where_containerd_reads_it(version: str | None, parsed: tuple[int, int, int] | None, dial_timeout: bool) -> None:
    assert runtime_version_tuple(version, "containerd") == parsed
    assert dial_timeout_supported(version) is dial_timeout


def test_imports_are_merged(tmp_path: Path) -> None:
    containerd_config(tmp_path, 'version = 2\nimports = ["/etc/containerd/conf.d/*.toml"]\n')
    write(tmp_path, "/etc/containerd/conf.d/10-registry.toml", f'version = 2\n{V1_TABLE}\n  config_path = "{CERTS}"\n')
    assert check_containerd(tmp_path, CERTS).ok


@pytest.mark.parametrize(
    ("runtime_version", "socket", "ok", "reason"),
    [
        ("containerd://2.0.7", True, True, "DefaultConfigPath"),
        ("containerd://2.1.4", True, False, "ConfigPathListIgnored"),
        ("containerd://1.7.27", True, False, "ConfigMissing"),
        ("containerd://1.6.20", True, False, "ConfigMissing"),
        (None, True, False, "ConfigMissing"),
        (None, False, True, "ContainerdNotPresent"),
        ("cri-o://1.33.0", False, True, "ContainerdNotPresent"),
    ],
)
def test_missing_config(tmp_path: Path, runtime_version: str | None, socket: bool, ok: bool, reason: str) -> None:
    if socket:
        write(tmp_path, "/run/containerd/containerd.sock", "")
    result = check_containerd(tmp_path, CERTS, runtime_version=runtime_version)
    assert (result.ok, result.reason) == (ok, reason), result.message


def test_crio_reload(tmp_path: Path) -> None:
    assert check_crio(tmp_path).reason == "CrioConfigNotVisible"
    write(tmp_path, "/etc/crio/crio.conf", "[crio.image]\npause_image = 'x'\n")
    result = check_crio(tmp_path)
    assert not result.ok and "systemctl reload crio" in result.message
    write(tmp_path, "/etc/crio/crio.conf.d/10-reload.conf", "[crio.image]\nauto_reload_registries = true\n")
    assert check_crio(tmp_path).ok


def test_report_combines_runtimes(tmp_path: Path) -> None:
    containerd_config(tmp_path, "version = 2\n")
    report = run_preflight(tmp_path, runtimes=["containerd", "crio"])
    assert not report.ok and report.reason == "ConfigPathUnset"
    assert report.message.startswith("containerd: ")
    assert run_preflight(tmp_path, runtimes=[]).ok
