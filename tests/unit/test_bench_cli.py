"""`python -m bench`'s flags for the node-safety parts: a wrong release stops the run at once, before minutes of control plane."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from bench.__main__ import main
from bench.nodesafety import RELEASES, parse_releases


def test_releases_are_checked_against_the_ones_the_bench_knows() -> None:
    assert parse_releases("2.4, 1.6") == ["2.4", "1.6"]
    assert parse_releases(",".join(RELEASES)) == list(RELEASES)
    for wrong in ("2.x", "2.4,9.9", "", " , "):
        with pytest.raises(SystemExit, match="--releases"):
            parse_releases(wrong)


def test_a_wrong_release_stops_the_bench_before_any_part_runs(tmp_path: Path) -> None:
    # The control plane and the data path are not skipped: reaching them would start a cluster.
    with pytest.raises(SystemExit, match=re.escape("--releases: 2.x; choose from 1.6, 1.7, 2.0.5, 2.4")):
        main(["--releases", "2.x", "--out-dir", str(tmp_path)])
    assert list(tmp_path.iterdir()) == []  # no result written
