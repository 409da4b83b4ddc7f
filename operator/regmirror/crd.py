"""Turn the pydantic models into a structural CustomResourceDefinition.

pydantic emits JSON Schema draft 2020-12; the API server accepts only a
structural subset of OpenAPI v3. This module inlines every `$ref`, turns
`anyOf: [X, null]` into plain X (an absent field is the null), drops `title`,
and reduces model defaults to `{}` so the API server fills the nested defaults
itself. `structural_violations` is the check the tests run over the result.
"""

from __future__ import annotations

import copy
from typing import Any

from regmirror import constants as c
from regmirror.models import UNWRITTEN_STATUS, RegistryMirror, RegistryMirrorSpec, RegistryMirrorStatus

_DROP_KEYS = frozenset({"title", "$defs", "examples"})
_FORBIDDEN_KEYS = frozenset({"$ref", "anyOf", "oneOf", "const", "uniqueItems", "title", "$defs", "definitions", "allOf"})


def _inline(node: Any, defs: dict[str, Any]) -> Any:
    """Recursively inline `$ref`s and strip what a structural schema may not hold."""
    if isinstance(node, list):
        return [_inline(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = copy.deepcopy(defs[node["$ref"].rsplit("/", 1)[-1]])
        merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        return _inline(merged, defs)
    if "anyOf" in node:
        options = [o for o in node["anyOf"] if o.get("type") != "null"]
        if len(options) != 1:
            raise ValueError(f"cannot express anyOf with {len(options)} non-null options structurally: {node}")
        merged = {**options[0], **{k: v for k, v in node.items() if k != "anyOf"}}
        if merged.get("default", "absent") is None:
            del merged["default"]
        return _inline(merged, defs)
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP_KEYS:
            continue
        if key == "properties":
            out[key] = {name: _inline(prop, defs) for name, prop in value.items()}
        else:
            out[key] = _inline(value, defs)
    if out.get("type") == "object" and "properties" in out:
        out.pop("additionalProperties", None)
        if isinstance(out.get("default"), dict):
            # The API server applies nested defaults inside an empty object.
            out["default"] = {}
    if out.get("type") == "object" and out.get("additionalProperties") is True:
        del out["additionalProperties"]
        out["x-kubernetes-preserve-unknown-fields"] = True
    if out.get("type") == "array" and isinstance(out.get("default"), list):
        out["default"] = [d.value if hasattr(d, "value") else d for d in out["default"]]
    return out


def openapi_schema(model: type[Any]) -> dict[str, Any]:
    """The structural OpenAPI v3 schema of one pydantic model."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    schema: dict[str, Any] = _inline(raw, raw.get("$defs", {}))
    return schema


def _ready_column() -> dict[str, Any]:
    return {
        "name": "Ready",
        "type": "string",
        "jsonPath": '.status.conditions[?(@.type=="Ready")].status',
        "description": "Whether the mirror serves and its nodes are configured.",
    }


def render_crd() -> dict[str, Any]:
    """The RegistryMirror CustomResourceDefinition."""
    spec_schema = openapi_schema(RegistryMirrorSpec)
    # A new mirror reads `status.observedGeneration: 0` until the operator's first status (the API
    # server defaults it on every read; nothing is stored). kstatus (Flux, kpt) would otherwise call a
    # mirror with no status Current: healthy before the operator has even seen it.
    status_schema = {**openapi_schema(RegistryMirrorStatus), "default": dict(UNWRITTEN_STATUS)}
    root = {
        "type": "object",
        "description": "RegistryMirror runs a pull-through cache for one upstream registry and routes the selected nodes' pulls of that registry through it.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": "APIVersion of this object: regmirror.dev/v1alpha1."},
            "kind": {"type": "string", "description": "Kind of this object: RegistryMirror."},
            "metadata": {"type": "object"},
            "spec": spec_schema,
            "status": status_schema,
        },
        "x-kubernetes-validations": [rule.validation() for rule in RegistryMirror.ROOT_RULES],
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": c.CRD_NAME,
            "labels": {c.LABEL_NAME: c.APP_NAME, c.LABEL_PART_OF: c.APP_NAME},
        },
        "spec": {
            "group": c.GROUP,
            "scope": "Cluster",
            "names": {
                "kind": c.KIND,
                "listKind": f"{c.KIND}List",
                "plural": c.PLURAL,
                "singular": c.SINGULAR,
                "shortNames": list(c.SHORT_NAMES),
                "categories": list(c.CATEGORIES),
            },
            "versions": [
                {
                    "name": c.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [
                        {"name": "Upstream", "type": "string", "jsonPath": ".spec.upstream.url", "description": "The upstream registry."},
                        _ready_column(),
                        {
                            "name": "Nodes",
                            "type": "string",
                            "jsonPath": ".status.nodesRatio",
                            "description": "Configured nodes: ready/desired.",
                        },
                        {"name": "Endpoint", "type": "string", "jsonPath": ".status.endpoint", "description": "ClusterIP:port nodes use."},
                        {"name": "Phase", "type": "string", "jsonPath": ".status.phase", "priority": 1, "description": "Short summary."},
                        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                    ],
                    "schema": {"openAPIV3Schema": root},
                }
            ],
        },
    }


def structural_violations(schema: Any, path: str = "") -> list[str]:
    """Everything in a schema that breaks the structural-schema rules (empty when fine)."""
    problems: list[str] = []
    if isinstance(schema, list):
        for i, item in enumerate(schema):
            problems += structural_violations(item, f"{path}[{i}]")
        return problems
    if not isinstance(schema, dict):
        return problems
    for key in _FORBIDDEN_KEYS & schema.keys():
        problems.append(f"{path}: forbidden key {key}")
    if isinstance(schema.get("exclusiveMinimum"), (int, float)) and not isinstance(schema.get("exclusiveMinimum"), bool):
        problems.append(f"{path}: numeric exclusiveMinimum")
    if isinstance(schema.get("exclusiveMaximum"), (int, float)) and not isinstance(schema.get("exclusiveMaximum"), bool):
        problems.append(f"{path}: numeric exclusiveMaximum")
    if "properties" in schema and "additionalProperties" in schema:
        problems.append(f"{path}: additionalProperties beside properties")
    is_schema_node = any(
        k in schema for k in ("type", "properties", "items", "x-kubernetes-preserve-unknown-fields", "x-kubernetes-int-or-string")
    )
    if (
        is_schema_node
        and "type" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
        and not schema.get("x-kubernetes-int-or-string")
    ):
        problems.append(f"{path}: missing type")
    for key, value in schema.items():
        if key == "properties":
            for name, prop in value.items():
                problems += structural_violations(prop, f"{path}.{name}")
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            problems += structural_violations(value, f"{path}.{key}")
    return problems


def missing_descriptions(schema: dict[str, Any], path: str = "") -> list[str]:
    """Properties without a description (each becomes `kubectl explain` text)."""
    missing: list[str] = []
    for name, prop in schema.get("properties", {}).items():
        here = f"{path}.{name}"
        if "description" not in prop and name not in {"metadata"}:
            missing.append(here)
        missing += missing_descriptions(prop, here)
        if isinstance(prop.get("items"), dict):
            missing += missing_descriptions(prop["items"], here + "[]")
    return missing


def api_reference_markdown() -> str:
    """The spec and status fields as a Markdown table (the README's API reference is generated from this)."""
    schema = render_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]
    rows = ["| Field | Type | Default | Description |", "|---|---|---|---|"]

    def default_text(value: Any) -> str:
        if value is None or value == {} or value == []:
            return ""
        if isinstance(value, bool):
            return f"`{str(value).lower()}`"
        if isinstance(value, list):
            return f"`{', '.join(map(str, value))}`"
        return f"`{value}`"

    def walk(node: dict[str, Any], path: str) -> None:
        for name, prop in node.get("properties", {}).items():
            here = f"{path}.{name}"
            kind = prop.get("type", "object")
            items = prop.get("items", {})
            if kind == "array":
                kind = f"[]{items.get('type', 'object')}"
            text = prop.get("description", "").replace("|", "\\|").replace("\n", " ")
            if "enum" in prop:
                text += f" One of: {', '.join(prop['enum'])}."
            if "enum" in items:
                text += f" Items: {', '.join(items['enum'])}."
            rows.append(f"| `{here}` | {kind} | {default_text(prop.get('default'))} | {text} |")
            walk(prop, here)
            if items.get("properties"):
                walk(items, here + "[]")

    walk(schema["spec"], "spec")
    walk(schema["status"], "status")
    return "\n".join(rows) + "\n"
