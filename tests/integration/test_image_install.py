"""The image's build stage, step by step, without a container engine: the locked install works.

This machine has no Docker engine that can build images, so this test runs the
Dockerfile's build stage itself: its ENV, WORKDIR, COPY and RUN instructions in
order, in a temporary directory standing in for the container's filesystem
(/src and /opt/regmirror moved there), with this machine's Python 3.11 as the
image's. That proves what `docker build` would: requirements.lock installs
with --require-hashes (from PyPI), the package installs without any other
download, `pip check` is clean, and `regmirror version` runs. pip's download
cache is allowed here (PIP_NO_CACHE_DIR is the image's size concern; hashes are
checked either way).
"""

from __future__ import annotations

import glob
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import regmirror
from harness.operator import REPO

DOCKERFILE = REPO / "Dockerfile"


def build_stage(dockerfile: str) -> list[tuple[str, str]]:
    """(instruction, arguments) of the stage named `build`, continuation lines joined, comments dropped."""
    lines = [line for line in dockerfile.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    steps: list[tuple[str, str]] = []
    in_build = False
    for line in joined.splitlines():
        if not line.strip():
            continue
        instruction, _, args = line.strip().partition(" ")
        if instruction == "FROM":
            in_build = args.split()[-1] == "build"
            continue
        if in_build:
            steps.append((instruction, args.strip()))
    return steps


def test_build_stage_installs_the_lock_and_the_package(tmp_path: Path) -> None:
    if sys.version_info[:2] != (3, 11):
        pytest.fail(f"the image runs Python 3.11 (PYTHON_IMAGE); this is {sys.version.split()[0]}", pytrace=False)
    root = tmp_path / "rootfs"
    shims = tmp_path / "bin"
    shims.mkdir()
    (shims / "python").symlink_to(sys.executable)  # the base image's `python`

    def moved(text: str) -> str:
        return text.replace("/opt/regmirror", str(root / "opt" / "regmirror")).replace("/src", str(root / "src"))

    env = {"PATH": f"{shims}:/usr/bin:/bin", "HOME": str(tmp_path), "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env["PIP_CACHE_DIR"] = os.environ.get("PIP_CACHE_DIR") or str(Path.home() / ".cache" / "pip")
    workdir = root
    steps = build_stage(DOCKERFILE.read_text())
    assert [i for i, _ in steps].count("RUN") >= 2, steps
    for instruction, args in steps:
        if instruction == "ENV":
            for pair in shlex.split(args):
                name, _, value = pair.partition("=")
                if name != "PIP_NO_CACHE_DIR":
                    env[name] = value
        elif instruction == "WORKDIR":
            workdir = Path(moved(args))
            workdir.mkdir(parents=True, exist_ok=True)
        elif instruction == "COPY":
            *sources, dest = shlex.split(args)
            target = workdir / dest
            for pattern in sources:
                for found in glob.glob(str(REPO / pattern.rstrip("/"))):
                    path = Path(found)
                    if path.is_dir():  # Docker copies a directory's contents, not the directory
                        shutil.copytree(path, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
                    else:
                        target.mkdir(parents=True, exist_ok=True)
                        shutil.copy(path, target / path.name)
        elif instruction == "RUN":
            result = subprocess.run(moved(args), shell=True, cwd=workdir, env=env, capture_output=True, text=True, timeout=900)
            assert result.returncode == 0, f"RUN {args}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        else:
            pytest.fail(f"the build stage uses {instruction}, which this test does not emulate")

    venv = root / "opt" / "regmirror"
    version = subprocess.run([str(venv / "bin" / "regmirror"), "version"], capture_output=True, text=True, check=True, timeout=60)
    assert regmirror.__version__ in version.stdout
    # Exactly the locked versions, and nothing the lock does not pin (pip, setuptools and wheel were removed).
    listed = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "list", "--format=freeze", "--exclude-editable"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    ).stdout
    installed = {line.split("==")[0].lower().replace("_", "-"): line.split("==")[1] for line in listed.split() if "==" in line}
    locked = dict(re.findall(r"^([a-z0-9][a-z0-9._-]*)==([^ ;\\]+)", (REPO / "requirements.lock").read_text(), flags=re.M))
    installed.pop("regmirror", None)
    assert installed, listed
    for name, version_ in installed.items():
        assert locked.get(name) == version_, f"{name}=={version_} is installed but the lock pins {locked.get(name)}"
    assert not {"pip", "setuptools", "wheel"} & set(installed)
