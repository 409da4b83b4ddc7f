"""The alerts and the dashboard: valid PromQL, rules that fire when they should, and metric names a real operator exports.

promtool is Debian's (`make system-packages`). The alert rules' behaviour is
specified in tests/monitoring/alerts_test.yaml (promtool test rules). The
other exporters' names are checked against the real thing elsewhere: the
registry's (registry_*) against distribution in tests/e2e/test_registry_metrics.py,
the cache sidecar's (regmirror_cache_*) in tests/e2e/test_cache_metrics.py.
"""

from __future__ import annotations

import shutil
import subprocess
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from harness import LocalCluster
from harness.operator import OperatorProcess, apply, delete_mirror, mirror_body, wait_condition
from monitoring import queries

ALERTS_TEST = Path(queries.__file__).with_name("alerts_test.yaml")


@pytest.fixture(scope="module")
def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.fail("promtool is missing: run `sudo make system-packages` (Debian's prometheus package)", pytrace=False)
    return found


def _promtool(promtool: str, *args: str, cwd: Path) -> str:
    result = subprocess.run([promtool, *args], capture_output=True, text=True, cwd=cwd, timeout=120, check=False)
    assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def test_alert_rules_pass_promtool_check(promtool: str, tmp_path: Path) -> None:
    (tmp_path / "regmirror.rules.yaml").write_text(yaml.safe_dump({"groups": queries.rule_groups()}))
    out = _promtool(promtool, "check", "rules", "regmirror.rules.yaml", cwd=tmp_path)
    assert f"SUCCESS: {len(queries.rule_queries())} rules found" in out


def test_alert_rules_fire_as_specified(promtool: str, tmp_path: Path) -> None:
    """promtool test rules: each alert quiet before its `for`, firing after with the rendered annotations."""
    (tmp_path / "regmirror.rules.yaml").write_text(yaml.safe_dump({"groups": queries.rule_groups()}))
    shutil.copy(ALERTS_TEST, tmp_path / ALERTS_TEST.name)
    out = _promtool(promtool, "test", "rules", ALERTS_TEST.name, cwd=tmp_path)
    assert "SUCCESS" in out
    tested = {case["alertname"] for test in yaml.safe_load(ALERTS_TEST.read_text())["tests"] for case in test.get("alert_rule_test", [])}
    assert tested == set(queries.rule_queries()), f"alerts without a unit test: {set(queries.rule_queries()) - tested}"


def test_every_dashboard_query_is_valid_promql(promtool: str, tmp_path: Path) -> None:
    """Each panel's query (Grafana variables filled in) checked by Prometheus' own parser, as a recording rule."""
    dashboard = queries.dashboard_queries()
    rules = [{"record": f"regmirror:dashboard:{i}", "expr": expr} for i, expr in enumerate(dashboard.values())]
    (tmp_path / "dashboard.rules.yaml").write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    out = _promtool(promtool, "check", "rules", "dashboard.rules.yaml", cwd=tmp_path)
    assert f"SUCCESS: {len(rules)} rules found" in out


@pytest.fixture
def reconciled_mirror(cluster: LocalCluster, operator: OperatorProcess) -> Iterator[str]:
    """A Ready mirror, so the operator has reconciled at least once; deleted afterwards."""
    name = f"metrics-{uuid.uuid4().hex[:6]}"
    apply(cluster, mirror_body(name))
    try:
        wait_condition(cluster, name, "Ready", "True", timeout=120)
        yield name
    finally:
        delete_mirror(cluster, name)


def test_the_operator_exports_every_metric_the_dashboard_and_alerts_read(operator: OperatorProcess, reconciled_mirror: str) -> None:
    with urllib.request.urlopen(f"http://127.0.0.1:{operator.metrics_port}/metrics", timeout=5) as response:
        exposition = response.read().decode()
    samples = {sample.name for family in text_string_to_metric_families(exposition) for sample in family.samples}
    needed = queries.read_from("operator")  # regmirror_*, not the sidecar's regmirror_cache_*
    assert needed, "the dashboard and alerts read no operator metric"
    assert not any(name.startswith("regmirror_cache_") for name in needed)
    assert needed <= samples, f"the operator no longer exports {sorted(needed - samples)}"
    outcomes = {
        s.labels.get("outcome")
        for f in text_string_to_metric_families(exposition)
        for s in f.samples
        if s.name == "regmirror_reconciles_total"
    }
    assert "success" in outcomes
