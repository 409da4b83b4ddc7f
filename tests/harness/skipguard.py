"""A pytest plugin: under CI, a skipped test fails the run unless it may skip there.

`make test` builds and installs everything the suites need (as root), so on this
project's CI machines every test runs. A fixture that skips because its set-up
failed (a package did not install, distribution did not build) would otherwise
hide a regression behind a green run with one more "skipped". Only the kind tests
may skip under CI: they need a Docker engine that runs privileged containers, which
these machines do not have. Outside CI (a developer's non-root run) skips stay skips.
"""

from __future__ import annotations

import os

import pytest

# Test files whose tests may skip under CI, and why.
SKIPPABLE_UNDER_CI: dict[str, str] = {
    "tests/e2e/test_kind.py": "kind nodes need a Docker engine that runs privileged containers",
}

_unexpected: list[str] = []


def _under_ci() -> bool:
    return bool(os.environ.get("CI"))


def _reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if not report.skipped or hasattr(report, "wasxfail") or not _under_ci():
        return
    if report.nodeid.split("::", 1)[0] in SKIPPABLE_UNDER_CI:
        return
    _unexpected.append(f"{report.nodeid}: {_reason(report)}")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _unexpected and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _unexpected:
        return
    terminalreporter.section("skipped under CI, where every test must run", red=True)
    for line in _unexpected:
        terminalreporter.write_line(line)
    allowed = ", ".join(f"{path} ({why})" for path, why in SKIPPABLE_UNDER_CI.items())
    terminalreporter.write_line(f"A skip under CI hides a failed set-up step; only these may skip: {allowed}.")
