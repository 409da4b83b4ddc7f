"""A lean reader of the node plan JSON, without pydantic.

The operator writes the plan with `regmirror.nodeplan.NodePlan.to_json()`.
Importing pydantic and the API models costs the agent ~20 MiB of its ~30 MiB
budget on every node, so the agent reads the same JSON into these frozen
dataclasses instead. tests/unit/test_nodefiles.py renders both readings of the
same plans and requires identical files, which keeps the two from drifting.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from regmirror.lowlevel import selector_matches


class PlanError(ValueError):
    """The plan file is not a valid node plan."""


@dataclass(frozen=True)
class SelectorRequirement:
    key: str
    operator: str
    values: tuple[str, ...] = ()


@dataclass(frozen=True)
class Selector:
    """A Kubernetes label selector, with the semantics of models.LabelSelector."""

    match_labels: Mapping[str, str] = field(default_factory=dict)
    match_expressions: tuple[SelectorRequirement, ...] = ()

    def matches(self, labels: dict[str, str]) -> bool:
        """Whether a set of labels satisfies this selector."""
        return selector_matches(self.match_labels, self.match_expressions, labels)


@dataclass(frozen=True)
class Mirror:
    name: str
    hosts: tuple[str, ...]
    servers: Mapping[str, str]
    url: str
    priority: int
    capabilities: tuple[str, ...]
    fallback: str
    runtimes: tuple[str, ...]
    node_selector: Selector = Selector()
    ca_pem: str | None = None


@dataclass(frozen=True)
class Plan:
    mirrors: tuple[Mirror, ...] = ()


def _strs(value: Any, what: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise PlanError(f"{what} must be a list of strings")
    return tuple(value)


def _selector(raw: Any) -> Selector:
    if raw is None:
        return Selector()
    if not isinstance(raw, dict):
        raise PlanError("nodeSelector must be an object")
    labels = raw.get("matchLabels") or {}
    exprs = raw.get("matchExpressions") or []
    if not isinstance(labels, dict) or not isinstance(exprs, list):
        raise PlanError("nodeSelector has a bad matchLabels or matchExpressions")
    return Selector(
        match_labels={str(k): str(v) for k, v in labels.items()},
        match_expressions=tuple(
            SelectorRequirement(key=str(e["key"]), operator=str(e["operator"]), values=_strs(e.get("values") or [], "values"))
            for e in exprs
        ),
    )


def _mirror(raw: Any) -> Mirror:
    if not isinstance(raw, dict):
        raise PlanError("each mirror must be an object")
    try:
        servers = raw["servers"]
        if not isinstance(servers, dict):
            raise PlanError("servers must be an object")
        return Mirror(
            name=str(raw["name"]),
            hosts=_strs(raw["hosts"], "hosts"),
            servers={str(k): str(v) for k, v in servers.items()},
            url=str(raw["url"]),
            priority=int(raw["priority"]),
            capabilities=_strs(raw["capabilities"], "capabilities"),
            fallback=str(raw["fallback"]),
            runtimes=_strs(raw["runtimes"], "runtimes"),
            node_selector=_selector(raw.get("nodeSelector")),
            ca_pem=raw.get("caPem") or None,
        )
    except KeyError as exc:
        raise PlanError(f"mirror is missing {exc.args[0]!r}") from None
    except (TypeError, ValueError) as exc:
        raise PlanError(f"mirror {raw.get('name')!r}: {exc}") from None


def parse_plan(text: str) -> Plan:
    """Parse the ConfigMap's JSON (the camelCase wire form of nodeplan.NodePlan)."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PlanError(f"not JSON: {exc}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("mirrors", []), list):
        raise PlanError("the plan must be an object with a mirrors list")
    return Plan(mirrors=tuple(_mirror(m) for m in raw.get("mirrors", [])))
