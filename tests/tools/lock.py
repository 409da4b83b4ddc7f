"""The dependency locks: what the image installs and what the tests run with.

Two files, both written by `make lock` with uv and hashes for every file of every
pinned version (so `pip install --require-hashes` accepts them on any platform):

- ``requirements.lock``: the runtime dependencies and the build backend. The
  Dockerfile installs exactly this with ``--require-hashes``.
- ``requirements-dev.lock``: the same pins (it is compiled with the first as a
  constraint) plus the test and lint extras. ``make install`` builds .venv from
  it, so the tests run the versions that ship.

Each lock's first line records a digest of the pyproject.toml entries it was
compiled from. ``check()`` compares it (stdlib only, so ``make install`` can run
it before the venv exists): a dependency added to pyproject.toml without
``make lock`` stops the install with that command, instead of testing one set of
versions and shipping another.

    python3 tests/tools/lock.py check     # exit 1 naming the stale lock
    python3 tests/tools/lock.py compile   # what `make lock` runs (needs uv)
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = ROOT / "pyproject.toml"
DIGEST_PREFIX = "# pyproject-digest: "
#: The image's interpreter (Dockerfile PYTHON_IMAGE) and the lowest one pyproject allows.
PYTHON_VERSION = "3.11"


@dataclass(frozen=True)
class Lock:
    """One lock file and the pyproject.toml extras it covers."""

    path: Path
    extras: tuple[str, ...]
    constraint: Path | None = None


RUNTIME = Lock(ROOT / "requirements.lock", ())
DEV = Lock(ROOT / "requirements-dev.lock", ("test", "lint"), constraint=RUNTIME.path)
LOCKS = (RUNTIME, DEV)


def _pyproject() -> dict[str, object]:
    return tomllib.loads(PYPROJECT.read_text())


def build_requirements(pyproject: dict[str, object] | None = None) -> list[str]:
    """The build backend's requirements (build-system.requires): locked too, the image builds the wheel offline."""
    data = pyproject or _pyproject()
    return list(data["build-system"]["requires"])  # type: ignore[index]


def locked_inputs(lock: Lock, pyproject: dict[str, object] | None = None) -> dict[str, object]:
    """Everything in pyproject.toml that decides a lock's content, as one JSON-able value."""
    data = pyproject or _pyproject()
    project = data["project"]
    assert isinstance(project, dict)
    extras = project.get("optional-dependencies", {})
    return {
        "requires-python": project["requires-python"],
        "dependencies": sorted(project["dependencies"]),
        "extras": {name: sorted(extras[name]) for name in lock.extras},
        "build-system": sorted(build_requirements(data)),
    }


def digest(lock: Lock, pyproject: dict[str, object] | None = None) -> str:
    """sha256 of the lock's inputs: changes exactly when a dependency line it covers changes."""
    text = json.dumps(locked_inputs(lock, pyproject), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def recorded_digest(path: Path) -> str | None:
    """The digest a lock file was compiled from (its first line), or None for a file without one."""
    if not path.exists():
        return None
    first = path.read_text().split("\n", 1)[0]
    return first[len(DIGEST_PREFIX) :].strip() if first.startswith(DIGEST_PREFIX) else None


def stale_locks(pyproject: dict[str, object] | None = None) -> list[Path]:
    """The lock files whose recorded digest differs from pyproject.toml's current one."""
    return [lock.path for lock in LOCKS if recorded_digest(lock.path) != digest(lock, pyproject)]


def check() -> int:
    """Exit status for `lock.py check`: 0 when every lock is current, else 1 with the fix."""
    stale = stale_locks()
    for path in stale:
        print(f"{path.name} is stale: pyproject.toml's dependencies changed since it was compiled; run `make lock`", file=sys.stderr)
    return 1 if stale else 0


def compile_lock(lock: Lock, uv: str, upgrade: bool = False) -> None:
    """Run `uv pip compile` for one lock and write it with its digest line first."""
    with tempfile.TemporaryDirectory() as tmp:
        build_in = Path(tmp) / "build-system.in"
        build_in.write_text("\n".join(build_requirements()) + "\n")
        argv = [
            uv,
            "pip",
            "compile",
            "pyproject.toml",
            str(build_in),
            "--universal",
            "--python-version",
            PYTHON_VERSION,
            "--generate-hashes",
            "--no-header",
            "--quiet",
            "--output-file",
            lock.path.name,
        ]
        argv += [f"--extra={extra}" for extra in lock.extras]
        if lock.constraint is not None:
            argv += ["--constraints", lock.constraint.name]
        if upgrade:
            argv.append("--upgrade")
        # uv reads the existing output file as preferences: pins move only when they must (or with --upgrade).
        subprocess.run(argv, check=True, cwd=ROOT)
    body = lock.path.read_text().replace(str(Path(tmp) / "build-system.in"), "build-system.requires")
    header = (
        f"{DIGEST_PREFIX}{digest(lock)}\n"
        f"# Written by `make lock` (tests/tools/lock.py) from pyproject.toml; do not edit.\n"
        f"# Python >= {PYTHON_VERSION}, any platform; install with pip install --require-hashes -r {lock.path.name}\n"
    )
    lock.path.write_text(header + body)


def main(argv: Sequence[str]) -> int:
    """`check`, or `compile [--upgrade]` (uv from $UV or PATH)."""
    if argv[:1] == ["check"]:
        return check()
    if argv[:1] == ["compile"]:
        import os

        uv = os.environ.get("UV", "uv")
        for lock in LOCKS:
            compile_lock(lock, uv, upgrade="--upgrade" in argv)
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
