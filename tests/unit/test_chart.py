"""The Helm chart's copied files stay equal to their sources, and its metadata to the package.

Pure file reading. Rendering, linting and installing the chart (against the
kustomize base and a real API server) is tests/integration/test_helm.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import regmirror
from regmirror import constants as c

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "manifests" / "helm" / "regmirror"

# (copy in the chart, its source, the command that refreshes the copy)
COPIES = [
    (CHART / "crds" / f"{c.CRD_NAME}.yaml", ROOT / "crds" / f"{c.CRD_NAME}.yaml", "make crd"),
    (CHART / "files" / "prometheusrule.yaml", ROOT / "manifests" / "monitoring" / "prometheusrule.yaml", "make chart-files"),
    (CHART / "files" / "regmirror-dashboard.json", ROOT / "manifests" / "monitoring" / "regmirror-dashboard.json", "make chart-files"),
]


@pytest.mark.parametrize(("copy", "source", "command"), COPIES, ids=lambda v: v.name if isinstance(v, Path) else "")
def test_chart_copy_equals_its_source(copy: Path, source: Path, command: str) -> None:
    """Helm reads only files inside the chart, so it holds copies; one source each."""
    assert copy.read_bytes() == source.read_bytes(), f"{copy.relative_to(ROOT)} is stale: run `{command}`"


def test_chart_holds_only_the_crds_it_should() -> None:
    """Helm installs every file under crds/ (and never upgrades or deletes them): nothing else may be there."""
    assert sorted(p.name for p in (CHART / "crds").iterdir()) == [f"{c.CRD_NAME}.yaml"]


def test_chart_versions_follow_the_package() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["appVersion"] == regmirror.__version__
    assert chart["version"] == regmirror.__version__
    assert chart["apiVersion"] == "v2"


def test_default_values_name_the_code_defaults() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    repository, _tag = c.DEFAULT_OPERATOR_IMAGE.rsplit(":", 1)
    assert values["image"]["repository"] == repository
    assert values["namespaces"] == {"create": True, "operator": c.DEFAULT_NAMESPACE, "agent": c.AGENT_NAMESPACE}
    # Monitoring objects need the Prometheus Operator's CRDs: off unless asked for.
    assert not values["serviceMonitor"]["enabled"] and not values["prometheusRule"]["enabled"] and not values["dashboard"]["enabled"]
