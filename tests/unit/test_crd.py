"""The CRD: committed file in sync, structural, documented, and shaped for kubectl."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from regmirror import constants as c
from regmirror import crd
from regmirror.offline import dump_yaml

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "crds" / f"{c.CRD_NAME}.yaml"


@pytest.fixture(scope="module")
def rendered() -> dict[str, Any]:
    return crd.render_crd()


def _schema(rendered: dict[str, Any]) -> dict[str, Any]:
    schema: dict[str, Any] = rendered["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def test_committed_crd_matches_the_models(rendered: dict[str, Any]) -> None:
    hint = f"{COMMITTED.relative_to(ROOT)} is stale: run `make crd` (regmirror crd > {COMMITTED.relative_to(ROOT)})"
    assert COMMITTED.exists(), hint
    text = COMMITTED.read_text()
    assert yaml.safe_load(text) == rendered, hint
    assert text == dump_yaml([rendered]), hint


def test_schema_is_structural(rendered: dict[str, Any]) -> None:
    assert crd.structural_violations(_schema(rendered)) == []


@pytest.mark.parametrize(
    ("plant", "expected"),
    [
        (lambda s: s["properties"]["spec"]["properties"]["replicas"].update(anyOf=[{"type": "integer"}, {"type": "null"}]), "anyOf"),
        (lambda s: s["properties"]["spec"]["properties"]["image"].update(const="x"), "const"),
        (lambda s: s["properties"]["spec"]["properties"]["image"].update(title="Image"), "title"),
        (lambda s: s["properties"]["spec"]["properties"]["tolerations"].update(uniqueItems=True), "uniqueItems"),
        (lambda s: s["properties"]["spec"]["properties"]["upstream"].update(additionalProperties=False), "additionalProperties"),
        (lambda s: s["properties"]["spec"]["properties"]["storage"].pop("type"), "missing type"),
    ],
)
def test_structural_checker_catches_planted_violations(rendered: dict[str, Any], plant: Any, expected: str) -> None:
    schema = copy.deepcopy(_schema(rendered))
    plant(schema)
    problems = crd.structural_violations(schema)
    assert any(expected in p for p in problems), problems


def test_every_property_has_a_description(rendered: dict[str, Any]) -> None:
    assert crd.missing_descriptions(_schema(rendered)) == []


def test_names_scope_and_subresources(rendered: dict[str, Any]) -> None:
    spec = rendered["spec"]
    assert spec["scope"] == "Cluster"
    assert spec["names"]["shortNames"] == ["rmir"]
    assert "regmirror" in spec["names"]["categories"]
    version = spec["versions"][0]
    assert version["subresources"] == {"status": {}}
    assert version["served"] and version["storage"]


def test_printer_columns(rendered: dict[str, Any]) -> None:
    columns = {col["name"]: col for col in rendered["spec"]["versions"][0]["additionalPrinterColumns"]}
    assert {"Upstream", "Ready", "Nodes", "Endpoint", "Age"} <= columns.keys()
    assert columns["Ready"]["jsonPath"] == '.status.conditions[?(@.type=="Ready")].status'
    assert columns["Age"]["type"] == "date"


def test_spec_requires_upstream_url(rendered: dict[str, Any]) -> None:
    spec = _schema(rendered)["properties"]["spec"]
    assert "upstream" in spec["required"]
    assert "url" in spec["properties"]["upstream"]["required"]
