"""The README stays true: its API reference is the models' own text, its commands exist."""

from __future__ import annotations

import re
from pathlib import Path

from regmirror.offline import with_api_reference

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def test_api_reference_matches_the_models() -> None:
    assert with_api_reference(README) == README, "README's API reference is stale: run `make docs`"


def test_every_make_target_the_readme_names_exists() -> None:
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z-]+):", makefile, flags=re.M))
    named = set(re.findall(r"`?make ([a-z-]+)", README))
    assert named and named <= targets, named - targets


def test_every_linked_file_exists() -> None:
    for link in re.findall(r"\]\(((?:docs|examples)/[^)]+)\)", README):
        assert (ROOT / link).exists(), link
