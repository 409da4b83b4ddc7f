"""The dependency locks match pyproject.toml: what the image installs is what the tests ran.

`make lock` writes requirements.lock (the image) and requirements-dev.lock (.venv).
These tests fail when pyproject.toml's dependencies changed without `make lock`,
and check that the locks can be installed with --require-hashes as they are.
That they really install is tests/integration/test_image_install.py.
"""

from __future__ import annotations

import copy
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tools import lock

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^ ;\\]+)(?: ; ([^\\]+?))?\s*\\?$")


def _pins(path: Path) -> dict[str, tuple[Version, str | None]]:
    """name -> (version, marker) for every requirement line of a lock."""
    out = {}
    for line in path.read_text().splitlines():
        match = PIN.match(line)
        if match:
            out[canonicalize_name(match[1])] = (Version(match[2]), match[3])
    return out


def _requirement_blocks(path: Path) -> list[list[str]]:
    """Each requirement with its continuation lines (hashes), comments dropped."""
    blocks: list[list[str]] = []
    for line in path.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line.startswith(" "):
            blocks[-1].append(line.strip())
        else:
            blocks.append([line.strip()])
    return blocks


@pytest.mark.parametrize("which", lock.LOCKS, ids=lambda lk: lk.path.name)
def test_lock_was_compiled_from_the_current_pyproject(which: lock.Lock) -> None:
    assert lock.recorded_digest(which.path) == lock.digest(which), f"{which.path.name} is stale: run `make lock`"


@pytest.mark.parametrize("which", lock.LOCKS, ids=lambda lk: lk.path.name)
def test_every_declared_requirement_is_pinned_within_its_range(which: lock.Lock) -> None:
    """Independent of the digest: the pins themselves satisfy what pyproject.toml asks for."""
    pins = _pins(which.path)
    inputs = lock.locked_inputs(which, PYPROJECT)
    declared = [*inputs["dependencies"], *inputs["build-system"]]  # type: ignore[misc]
    declared += [req for reqs in inputs["extras"].values() for req in reqs]  # type: ignore[attr-defined]
    env = {**default_environment(), "python_version": lock.PYTHON_VERSION, "python_full_version": f"{lock.PYTHON_VERSION}.0"}
    for text in declared:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is declared in pyproject.toml but not in {which.path.name}: run `make lock`"
        assert req.specifier.contains(pins[name][0], prereleases=True), f"{name}=={pins[name][0]} does not satisfy {text}"


def test_dev_lock_pins_the_shipped_versions() -> None:
    """The tests run the exact versions the image installs (the dev lock is compiled with the image's as constraint)."""
    runtime, dev = _pins(lock.RUNTIME.path), _pins(lock.DEV.path)
    assert runtime, "requirements.lock pins nothing"
    differing = {name: (v, dev.get(name, (None,))[0]) for name, (v, _) in runtime.items() if dev.get(name, (None,))[0] != v}
    assert not differing, f"requirements-dev.lock differs from requirements.lock: {differing}"


@pytest.mark.parametrize("which", lock.LOCKS, ids=lambda lk: lk.path.name)
def test_every_pin_is_exact_and_hashed(which: lock.Lock) -> None:
    """What pip --require-hashes demands: == pins only, each with at least one sha256."""
    blocks = _requirement_blocks(which.path)
    assert blocks
    for block in blocks:
        assert PIN.match(block[0]), f"not an exact pin: {block[0]}"
        hashes = [part for part in block[1:] if part.startswith("--hash=sha256:")]
        assert hashes, f"{block[0]} has no hash"
        assert all(re.fullmatch(r"--hash=sha256:[0-9a-f]{64}( \\)?", h) for h in hashes), block


def test_the_image_installs_from_the_lock_with_hashes() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"pip install --require-hashes [^\n]*-r requirements\.lock", dockerfile)
    # The package itself: no dependency resolution and no index, so nothing unlocked can slip in.
    assert "pip install --no-deps --no-build-isolation --no-index ." in dockerfile
    assert "!requirements.lock" in (ROOT / ".dockerignore").read_text()


_requirement_text = st.from_regex(r"[a-z][a-z0-9-]{0,12}(>=[1-9](\.[0-9]){0,2})?", fullmatch=True)


@settings(deadline=None)  # a loaded machine must not fail a digest comparison
@given(st.data())
def test_any_change_to_a_covered_dependency_list_marks_the_lock_stale(data: st.DataObject) -> None:
    """The digest covers every list a lock is compiled from: adding, removing or changing a line changes it."""
    which = data.draw(st.sampled_from(lock.LOCKS))
    changed: dict[str, Any] = copy.deepcopy(PYPROJECT)
    targets: list[list[str]] = [changed["project"]["dependencies"], changed["build-system"]["requires"]]
    targets += [changed["project"]["optional-dependencies"][extra] for extra in which.extras]
    target = data.draw(st.sampled_from(targets))
    action = data.draw(st.sampled_from(["add", "remove", "replace"]))
    new = data.draw(_requirement_text.filter(lambda text: text not in target))
    if action == "add" or not target:
        target.append(new)
    elif action == "remove":
        target.pop(data.draw(st.integers(0, len(target) - 1)))
    else:
        target[data.draw(st.integers(0, len(target) - 1))] = new
    assert lock.digest(which, changed) != lock.digest(which, PYPROJECT)


def test_an_extra_the_lock_does_not_cover_leaves_it_current() -> None:
    """The bench extra is not locked: changing it must not demand `make lock`."""
    changed: dict[str, Any] = copy.deepcopy(PYPROJECT)
    changed["project"]["optional-dependencies"]["bench"].append("numpy>=2")
    assert all(lock.digest(which, changed) == lock.digest(which, PYPROJECT) for which in lock.LOCKS)
