"""The CI skip guard (harness/skipguard.py), run as pytest runs it: a skip under CI fails the run."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

TESTS = Path(__file__).resolve().parents[1]

SKIPPING = """
import pytest

def test_needs_a_tool():
    pytest.skip("the tool did not build")

@pytest.mark.xfail(reason="a known bug, tracked")
def test_known_bug():
    assert False

def test_runs():
    pass
"""


def run(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, *, ci: bool) -> pytest.RunResult:
    monkeypatch.setenv("PYTHONPATH", str(TESTS))
    if ci:
        monkeypatch.setenv("CI", "true")
    else:
        monkeypatch.delenv("CI", raising=False)
    return pytester.runpytest_subprocess("-p", "harness.skipguard", "-p", "no:cacheprovider", "-rs")


def test_a_skip_under_ci_fails_the_run_and_names_the_test(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    pytester.makepyfile(test_setup=SKIPPING)
    result = run(pytester, monkeypatch, ci=True)
    result.assert_outcomes(passed=1, skipped=1, xfailed=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*skipped under CI*", "test_setup.py::test_needs_a_tool: *the tool did not build*"])
    assert "test_known_bug" not in result.stdout.str().split("skipped under CI")[1]


def test_outside_ci_a_skip_is_only_a_skip(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    pytester.makepyfile(test_setup=SKIPPING)
    result = run(pytester, monkeypatch, ci=False)
    result.assert_outcomes(passed=1, skipped=1, xfailed=1)
    assert result.ret == pytest.ExitCode.OK


def test_the_kind_tests_may_skip_under_ci(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    pytester.makepyfile(**{"tests/e2e/test_kind": 'import pytest\n\ndef test_cluster():\n    pytest.skip("no privileged Docker")\n'})
    result = run(pytester, monkeypatch, ci=True)
    result.assert_outcomes(skipped=1)
    assert result.ret == pytest.ExitCode.OK
    assert "skipped under CI" not in result.stdout.str()


def test_a_failing_run_keeps_its_failure(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    pytester.makepyfile(test_setup=SKIPPING + "\ndef test_broken():\n    assert False\n")
    result = run(pytester, monkeypatch, ci=True)
    result.assert_outcomes(passed=1, failed=1, skipped=1, xfailed=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
