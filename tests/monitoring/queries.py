"""The PromQL of manifests/monitoring/ (dashboard and alert rules), and the metric names it depends on.

One place for the tests that check those names against the components that
export them (EXPORTERS): the operator (tests/integration/test_monitoring.py),
each mirror's cache sidecar (tests/e2e/test_cache_metrics.py), distribution
(tests/e2e/test_registry_metrics.py), and, named here with their sources,
kube-state-metrics and the kubelet, which this machine does not run.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "manifests" / "monitoring"
DASHBOARD = MONITORING / "regmirror-dashboard.json"
PROMETHEUS_RULE = MONITORING / "prometheusrule.yaml"

# Grafana's variables, replaced by values that keep the query valid PromQL.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__range": "1h", "$mirror": ".*"}

# Names from outside regmirror and distribution, as their projects document them:
# kube-state-metrics docs/metrics/workload/{daemonset,pod}-metrics.md; kubelet volume stats
# (pkg/kubelet/metrics/collectors/volume_stats.go); Prometheus' own `up`.
EXTERNAL_METRICS = frozenset(
    {
        "kube_daemonset_status_desired_number_scheduled",
        "kube_daemonset_status_number_ready",
        "kube_pod_container_status_restarts_total",
        "kube_pod_container_status_waiting_reason",
        "kubelet_volume_stats_available_bytes",
        "kubelet_volume_stats_capacity_bytes",
        "kubelet_volume_stats_used_bytes",
        "up",
    }
)

# Who exports a metric, by the longest prefix of its name that is listed here.
EXPORTERS = {
    "regmirror_cache_": "sidecar",  # `regmirror cache serve` in each mirror pod, Service port `cache`
    "regmirror_": "operator",  # the operator's metrics port
    "registry_": "distribution",  # each mirror's registry, debug port `metrics`
}

_METRIC = re.compile(r"\b(regmirror_[a-z0-9_]+|registry_[a-z0-9_]+|kube_[a-z0-9_]+|kubelet_[a-z0-9_]+|up)\b(?=\s*[{\[)])")


def dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def rule_groups() -> list[dict[str, Any]]:
    """spec.groups of the PrometheusRule: a plain Prometheus rule file's content."""
    return list(yaml.safe_load(PROMETHEUS_RULE.read_text())["spec"]["groups"])


def dashboard_queries() -> dict[str, str]:
    """'panel title / refId' -> PromQL with Grafana's variables substituted; the variable queries too."""
    out: dict[str, str] = {}
    for panel in dashboard()["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            out[f"{panel['title']} / {target['refId']}"] = expr
    return out


def variable_metrics() -> set[str]:
    """Metrics named by the dashboard's variables (label_values(metric, label))."""
    names = set()
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            names.update(re.findall(r"label_values\(([a-z_:][a-z0-9_:]*)", variable["definition"]))
    return names


def rule_queries() -> dict[str, str]:
    return {rule.get("alert") or rule["record"]: rule["expr"] for group in rule_groups() for rule in group["rules"]}


def metric_names(queries: dict[str, str]) -> set[str]:
    """Every metric a set of queries selects (a name followed by a selector, a range or a closing parenthesis)."""
    return {name for expr in queries.values() for name in _METRIC.findall(expr)}


def depended_on(prefix: str) -> set[str]:
    """The metric names starting with `prefix` that the dashboard or the alerts read."""
    names = metric_names(dashboard_queries()) | metric_names(rule_queries()) | variable_metrics()
    return {name for name in names if name.startswith(prefix)}


def exporter(name: str) -> str | None:
    """The component that exports metric `name` (EXPORTERS, longest prefix first), or None for an outside one."""
    for prefix in sorted(EXPORTERS, key=len, reverse=True):
        if name.startswith(prefix):
            return EXPORTERS[prefix]
    return None


def read_from(component: str) -> set[str]:
    """The metric names the dashboard or the alerts read that `component` exports."""
    return {name for name in depended_on("") if exporter(name) == component}
