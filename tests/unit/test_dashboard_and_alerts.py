"""The dashboard and the alert rules are well formed, and name only metrics someone exports.

Pure file reading. PromQL validity and the rules' behaviour (promtool) and the
names against a real operator are tests/integration/test_monitoring.py; the
registry's names against distribution itself tests/e2e/test_registry_metrics.py.
"""

from __future__ import annotations

import itertools

import yaml

from monitoring import queries

# The alerts issue 15 asks for, by what they watch.
REQUIRED_ALERTS = {
    "RegmirrorMirrorNotReady",
    "RegmirrorNodesNotConfigured",
    "RegmirrorCacheDiskNearlyFull",
    "RegmirrorUpstreamFailing",
    "RegmirrorAgentCrashLooping",
}


def test_required_alerts_exist_with_severity_and_text() -> None:
    rules = [rule for group in queries.rule_groups() for rule in group["rules"]]
    assert {rule.get("alert") for rule in rules} >= REQUIRED_ALERTS
    for rule in rules:
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
        assert "for" in rule, f"{rule['alert']} would fire on a single scrape"


def test_rules_name_no_namespace() -> None:
    """The chart lets namespaces change; the rules must hold for any (they select by object names instead)."""
    for name, expr in queries.rule_queries().items():
        assert "namespace=" not in expr.replace(" ", ""), name


def test_dashboard_panels_are_well_formed() -> None:
    dashboard = queries.dashboard()
    panels = dashboard["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    assert dashboard["uid"] == "regmirror"
    assert {v["name"] for v in dashboard["templating"]["list"]} == {"datasource", "mirror"}
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"] and all(t["expr"].strip() for t in panel["targets"]), panel["title"]
        assert panel["description"], panel["title"]
    # No two panels overlap on Grafana's 24-column grid.
    cells = [
        {
            (x, y)
            for x in range(p["gridPos"]["x"], p["gridPos"]["x"] + p["gridPos"]["w"])
            for y in range(p["gridPos"]["y"], p["gridPos"]["y"] + p["gridPos"]["h"])
        }
        for p in panels
    ]
    for (i, a), (j, b) in itertools.combinations(enumerate(cells), 2):
        assert not a & b, f"{panels[i]['title']} overlaps {panels[j]['title']}"
    assert all(p["gridPos"]["x"] + p["gridPos"]["w"] <= 24 for p in panels)


def test_dashboard_covers_mirrors_and_operator() -> None:
    """Ready, nodes configured, hit ratio, bytes saved, disk used and cap, upstream, prewarm, pins, errors, latency, reconciles."""
    used = queries.metric_names(queries.dashboard_queries())
    for metric in (
        "regmirror_mirrors_ready",
        "kube_daemonset_status_number_ready",
        "regmirror_cache_hits_total",
        "regmirror_cache_misses_total",
        "regmirror_cache_served_bytes_total",
        "regmirror_cache_upstream_bytes_total",
        "regmirror_cache_disk_used_bytes",
        "regmirror_cache_disk_cap_bytes",
        "regmirror_cache_upstream_up",
        "regmirror_cache_prewarm_images",
        "regmirror_cache_pinned_images",
        "kubelet_volume_stats_used_bytes",
        "registry_http_requests_total",
        "registry_http_request_duration_seconds_bucket",
        "regmirror_reconciles_total",
        "regmirror_reconcile_duration_seconds_bucket",
    ):
        assert metric in used, metric


def test_cache_figures_come_from_the_sidecar_not_the_registry() -> None:
    """Hits the Varnish front serves never reach distribution: its registry_proxy_* counters understate hits and savings."""
    everything = queries.depended_on("")
    assert not {name for name in everything if name.startswith("registry_proxy_")}
    # Every name has an exporter a test checks, or is a documented outside one.
    assert {name for name in everything if queries.exporter(name) is None} <= queries.EXTERNAL_METRICS
    assert queries.exporter("regmirror_cache_hits_total") == "sidecar"
    assert queries.exporter("regmirror_reconciles_total") == "operator"


def test_the_mirror_variable_lists_every_mirror() -> None:
    """The `mirror` variable reads a series the sidecar exports from its first scrape, with or without a front, prewarm or pins."""
    assert queries.variable_metrics() == {"regmirror_cache_upstream_up"}


def test_metrics_from_outside_regmirror_are_known_names() -> None:
    """kube-state-metrics and kubelet names cannot be scraped here: each must be one of the documented ones."""
    outside = queries.depended_on("kube") | queries.depended_on("up")
    assert outside <= queries.EXTERNAL_METRICS, outside - queries.EXTERNAL_METRICS


def test_dashboard_configmap_is_generated_from_the_json() -> None:
    kustomization = yaml.safe_load((queries.MONITORING / "kustomization.yaml").read_text())
    generator = kustomization["configMapGenerator"][0]
    assert generator["files"] == [queries.DASHBOARD.name]
    assert generator["options"]["labels"]["grafana_dashboard"] == "1"
