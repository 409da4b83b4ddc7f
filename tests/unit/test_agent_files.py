"""The agent's file writer on a temporary host root: atomic, idempotent, and never touches foreign files."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import tomllib
from pathlib import Path

from regmirror import constants as c
from regmirror.agent.files import DIR_MARKER, TEMP_INFIX, apply_files, atomic_write

CERTS = c.CONTAINERD_CONFIG_PATH
CRIO = c.CRIO_DROPIN_DIR
MANAGED = [CERTS, CRIO]
M = c.OWNERSHIP_MARKER + "\n"


def hosts(server: str) -> str:
    return f'{M}server = "{server}"\n\n[host."http://10.96.0.1:5000"]\n  capabilities = ["pull", "resolve"]\n'


def apply(root: Path, desired: dict[str, str]):  # type: ignore[no-untyped-def]
    return apply_files(desired, host_root=root, managed_dirs=MANAGED)


def stat(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns


def test_writes_files_and_a_second_apply_changes_nothing(tmp_path: Path) -> None:
    desired = {f"{CERTS}/docker.io/hosts.toml": hosts("https://registry-1.docker.io"), f"{CRIO}/{c.CRIO_DROPIN_FILE}": M + "[[registry]]\n"}
    first = apply(tmp_path, desired)
    assert sorted(first.written) == sorted(desired)
    target = tmp_path / CERTS.lstrip("/") / "docker.io" / "hosts.toml"
    assert target.read_text() == desired[f"{CERTS}/docker.io/hosts.toml"]
    assert oct(target.stat().st_mode & 0o777) == "0o644"
    # An old mtime: any rewrite, in place or by rename, would show as a change (no sleep needed).
    os.utime(target, ns=(1_000_000_000, 1_000_000_000))
    before = stat(target)
    second = apply(tmp_path, desired)
    assert not second.changed and sorted(second.unchanged) == sorted(desired)
    assert stat(target) == before, "no rewrite when the content is equal (same inode, same mtime)"


def test_changed_content_replaces_the_file(tmp_path: Path) -> None:
    path = f"{CERTS}/docker.io/hosts.toml"
    apply(tmp_path, {path: hosts("https://a")})
    result = apply(tmp_path, {path: hosts("https://b")})
    assert result.written == [path]
    assert 'server = "https://b"' in (tmp_path / path.lstrip("/")).read_text()


def test_a_foreign_file_is_left_untouched_and_reported(tmp_path: Path) -> None:
    foreign = tmp_path / CERTS.lstrip("/") / "docker.io" / "hosts.toml"
    foreign.parent.mkdir(parents=True)
    foreign.write_text('server = "https://my-own-mirror.example"\n')
    before = stat(foreign)
    result = apply(tmp_path, {f"{CERTS}/docker.io/hosts.toml": hosts("https://registry-1.docker.io")})
    assert [x.path for x in result.conflicts] == [f"{CERTS}/docker.io/hosts.toml"]
    assert "ownership marker" in result.conflicts[0].reason
    assert foreign.read_text() == 'server = "https://my-own-mirror.example"\n'
    assert stat(foreign) == before
    # ...and it is not deleted when we no longer want that path either.
    assert apply(tmp_path, {}).removed == []
    assert foreign.exists()


def test_a_symlink_in_the_way_is_a_conflict(tmp_path: Path) -> None:
    d = tmp_path / CERTS.lstrip("/") / "quay.io"
    d.mkdir(parents=True)
    (tmp_path / "elsewhere").write_text(M + "x\n")
    (d / "hosts.toml").symlink_to(tmp_path / "elsewhere")
    result = apply(tmp_path, {f"{CERTS}/quay.io/hosts.toml": hosts("https://quay.io")})
    assert result.conflicts and not result.written
    assert (tmp_path / "elsewhere").read_text() == M + "x\n"


def test_own_files_are_removed_when_a_mirror_goes_away_with_the_dirs_we_made(tmp_path: Path) -> None:
    certs = tmp_path / CERTS.lstrip("/")
    (certs / "ghcr.io").mkdir(parents=True)  # an admin's directory, pre-existing
    (certs / "other.io").mkdir()
    (certs / "other.io" / "hosts.toml").write_text('server = "https://other.io"\n')
    desired = {
        f"{CERTS}/docker.io/hosts.toml": hosts("https://registry-1.docker.io"),
        f"{CERTS}/docker.io/hub-ca.crt": M + "-----BEGIN CERTIFICATE-----\n",
        f"{CERTS}/ghcr.io/hosts.toml": hosts("https://ghcr.io"),
    }
    apply(tmp_path, desired)
    assert (certs / "docker.io" / DIR_MARKER).exists()
    assert not (certs / "ghcr.io" / DIR_MARKER).exists()
    result = apply(tmp_path, {})
    assert sorted(result.removed) == sorted(desired)
    assert not (certs / "docker.io").exists(), "the directory we created is gone"
    assert (certs / "ghcr.io").is_dir(), "the admin's directory stays"
    assert (certs / "other.io" / "hosts.toml").exists(), "foreign files stay"
    assert certs.is_dir()


def test_a_directory_we_made_stays_while_someone_else_put_a_file_in_it(tmp_path: Path) -> None:
    path = f"{CERTS}/docker.io/hosts.toml"
    apply(tmp_path, {path: hosts("https://registry-1.docker.io")})
    extra = tmp_path / CERTS.lstrip("/") / "docker.io" / "client.cert"
    extra.write_text("admin's\n")
    assert apply(tmp_path, {}).removed == [path]
    assert extra.exists()


def test_stale_temp_files_are_cleaned_and_none_are_left(tmp_path: Path) -> None:
    d = tmp_path / CERTS.lstrip("/") / "docker.io"
    d.mkdir(parents=True)
    stale = d / f".hosts.toml{TEMP_INFIX}123-abcd"
    stale.write_text("half a fi")
    apply(tmp_path, {f"{CERTS}/docker.io/hosts.toml": hosts("https://registry-1.docker.io")})
    assert not stale.exists()
    assert [p.name for p in d.iterdir() if TEMP_INFIX in p.name] == []


def test_paths_outside_the_managed_directories_are_refused(tmp_path: Path) -> None:
    result = apply(tmp_path, {"/etc/passwd": M + "nope\n", f"{CERTS}/x/hosts.toml": "no marker\n"})
    assert len(result.errors) == 2 and not result.written
    assert not (tmp_path / "etc" / "passwd").exists()


WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from regmirror.agent.files import atomic_write
    target, a, b = Path(sys.argv[1]), Path(sys.argv[2]).read_text(), Path(sys.argv[3]).read_text()
    print("ready", flush=True)
    i = 0
    while True:
        atomic_write(target, a if i % 2 else b)
        i += 1
    """
)


def big_hosts_toml(tag: str) -> str:
    entries = "".join(f'\n[host."http://10.{tag}.{i // 250}.{i % 250}:5000"]\n  capabilities = ["pull", "resolve"]\n' for i in range(4000))
    return f'{M}server = "https://registry-1.docker.io"\n{entries}'


def test_sigkill_mid_write_leaves_the_old_or_the_new_file_never_a_partial_one(tmp_path: Path) -> None:
    old, new = big_hosts_toml("1"), big_hosts_toml("2")
    assert len(old) > 200_000
    (tmp_path / "a").write_text(old)
    (tmp_path / "b").write_text(new)
    target = tmp_path / CERTS.lstrip("/") / "docker.io" / "hosts.toml"
    target.parent.mkdir(parents=True)
    atomic_write(target, old)
    rng = random.Random(1234)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    for _ in range(25):
        child = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(target), str(tmp_path / "a"), str(tmp_path / "b")], stdout=subprocess.PIPE, env=env
        )
        assert child.stdout is not None and child.stdout.readline() == b"ready\n"
        time.sleep(rng.uniform(0.0, 0.05))
        child.send_signal(signal.SIGKILL)
        child.wait()
        content = target.read_text()
        assert content in (old, new), f"partial file of {len(content)} bytes"
        tomllib.loads(content)
    leftovers = [p.name for p in target.parent.iterdir() if TEMP_INFIX in p.name]
    # A kill between creating and renaming the temp file leaves one behind; the next apply removes it.
    apply_files({f"{CERTS}/docker.io/hosts.toml": old}, host_root=tmp_path, managed_dirs=MANAGED)
    assert [p.name for p in target.parent.iterdir() if TEMP_INFIX in p.name] == []
    assert target.read_text() == old
    print(f"{len(leftovers)} temp file(s) left by kills were cleaned")
