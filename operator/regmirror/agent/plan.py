"""A lean reader of the node plan JSON, without pydantic, that trusts nothing in it.

The operator writes the plan with `regmirror.nodeplan.NodePlan.to_json()`.
Importing pydantic and the API models costs the agent ~20 MiB of its ~30 MiB
budget on every node, so the agent reads the same JSON into these frozen
dataclasses instead. tests/unit/test_nodefiles.py renders both readings of the
same plans and requires identical files, which keeps the two from drifting.

The plan is a ConfigMap: whoever can edit it steers a root process on every
node. So this reader checks the shape of every value and records what is
wrong with each entry (`Mirror.defects`) instead of failing the whole plan;
`render.nodefiles.check_mirror` then decides what a defective entry may
still do (nothing, or, for a strict one, block its hosts). Only a file that
is not a JSON object with a `mirrors` list is refused as a whole, and then
the node keeps the files it has.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from regmirror.lowlevel import SELECTOR_OPERATORS, selector_matches
from regmirror.render.nodeinput import shown

MAX_PLAN_BYTES = 8 * 1024 * 1024  # a ConfigMap holds at most 1 MiB


class PlanError(ValueError):
    """The plan file is not a valid node plan."""


@dataclass(frozen=True)
class SelectorRequirement:
    key: str
    operator: str
    values: tuple[str, ...] = ()


@dataclass(frozen=True)
class Selector:
    """A Kubernetes label selector, with the semantics of models.LabelSelector.

    A selector that did not read as one (`valid` False) matches no node: a
    mirror whose selector we cannot evaluate must not land everywhere.
    """

    match_labels: Mapping[str, str] = field(default_factory=dict)
    match_expressions: tuple[SelectorRequirement, ...] = ()
    valid: bool = True

    def matches(self, labels: dict[str, str]) -> bool:
        """Whether a set of labels satisfies this selector."""
        return self.valid and selector_matches(self.match_labels, self.match_expressions, labels)


@dataclass(frozen=True)
class Mirror:
    """One plan entry as read; `defects` lists what is wrong with its shape."""

    name: str
    hosts: tuple[str, ...]
    servers: Mapping[str, str]
    url: str
    priority: int | None
    capabilities: tuple[str, ...]
    fallback: str
    runtimes: tuple[str, ...]
    node_selector: Selector = Selector()
    ca_pem: str | None = None
    upstream_host: str | None = None
    service: str | None = None
    defects: tuple[str, ...] = ()


@dataclass(frozen=True)
class Settings:
    """The plan's cluster-wide node settings as read (names as models.NodeSettings)."""

    unqualified_search_registries: tuple[str, ...] = ()
    blocked_registries: tuple[str, ...] = ()


@dataclass(frozen=True)
class Plan:
    mirrors: tuple[Mirror, ...] = ()
    # Entries that were not even objects (nothing to name them by), and what is wrong with the settings.
    defects: tuple[str, ...] = ()
    settings: Settings = Settings()


def _strs(value: Any, what: str, defects: list[str]) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        defects.append(f"{what} must be a list of strings")
        return tuple(v for v in value if isinstance(v, str)) if isinstance(value, list) else ()
    return tuple(value)


def _str(raw: dict[str, Any], key: str, defects: list[str], *, required: bool = True) -> str:
    value = raw.get(key)
    if isinstance(value, str):
        return value
    if value is not None or required:
        defects.append(f"{key} must be a string")
    return ""


def _requirement(raw: Any, defects: list[str]) -> SelectorRequirement | None:
    if not isinstance(raw, dict) or not isinstance(raw.get("key"), str) or not isinstance(raw.get("operator"), str):
        defects.append("nodeSelector: a matchExpressions entry needs a string key and operator")
        return None
    operator = raw["operator"]
    values = _strs(raw.get("values"), "nodeSelector values", defects)
    if operator not in SELECTOR_OPERATORS:
        defects.append(f"nodeSelector: unknown operator {shown(operator)}")
    elif (operator in ("In", "NotIn")) != bool(values):
        defects.append(f"nodeSelector: {operator} {'needs' if operator in ('In', 'NotIn') else 'takes no'} values")
    return SelectorRequirement(key=raw["key"], operator=operator, values=values)


def _selector(raw: Any, defects: list[str]) -> Selector:
    if raw is None:
        return Selector()
    before = len(defects)
    if not isinstance(raw, dict):
        defects.append("nodeSelector must be an object")
        return Selector(valid=False)
    labels = raw.get("matchLabels") or {}
    exprs = raw.get("matchExpressions") or []
    if not isinstance(labels, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        defects.append("nodeSelector: matchLabels must map strings to strings")
        labels = {}
    if not isinstance(exprs, list):
        defects.append("nodeSelector: matchExpressions must be a list")
        exprs = []
    requirements = tuple(r for r in (_requirement(e, defects) for e in exprs) if r is not None)
    return Selector(match_labels=dict(labels), match_expressions=requirements, valid=len(defects) == before)


def _mirror(raw: dict[str, Any]) -> Mirror:
    defects: list[str] = []
    servers = raw.get("servers")
    if not isinstance(servers, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in servers.items()):
        defects.append("servers must map strings to strings")
        servers = {}
    priority = raw.get("priority")
    if not isinstance(priority, int) or isinstance(priority, bool):
        defects.append("priority must be an integer")
        priority = None
    ca_pem = raw.get("caPem")
    if ca_pem is not None and not isinstance(ca_pem, str):
        defects.append("caPem must be a string")
        ca_pem = None
    upstream_host = raw.get("upstreamHost")
    if upstream_host is not None and not isinstance(upstream_host, str):
        defects.append("upstreamHost must be a string")
        upstream_host = None
    service = raw.get("service")
    if service is not None and not isinstance(service, str):
        defects.append("service must be a string")
        service = None
    return Mirror(
        name=_str(raw, "name", defects),
        hosts=_strs(raw.get("hosts"), "hosts", defects),
        servers=servers,
        url=_str(raw, "url", defects),
        priority=priority,
        capabilities=_strs(raw.get("capabilities"), "capabilities", defects),
        fallback=_str(raw, "fallback", defects),
        runtimes=_strs(raw.get("runtimes"), "runtimes", defects),
        node_selector=_selector(raw.get("nodeSelector"), defects),
        ca_pem=ca_pem or None,
        upstream_host=upstream_host,
        service=service,
        defects=tuple(defects),
    )


def parse_plan(text: str) -> Plan:
    """Parse the ConfigMap's JSON (the camelCase wire form of nodeplan.NodePlan)."""
    if len(text) > MAX_PLAN_BYTES:
        raise PlanError(f"the plan is {len(text)} bytes, more than {MAX_PLAN_BYTES}")
    try:
        raw = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise PlanError(f"not JSON: {shown(str(exc), 200)}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("mirrors", []), list):
        raise PlanError("the plan must be an object with a mirrors list")
    mirrors = []
    defects: list[str] = []
    for i, entry in enumerate(raw.get("mirrors", [])):
        if isinstance(entry, dict):
            mirrors.append(_mirror(entry))
        else:
            defects.append(f"mirrors[{i}] is not an object; ignored")
    raw_settings = raw.get("settings") or {}
    if not isinstance(raw_settings, dict):
        defects.append("settings must be an object; ignored")
        raw_settings = {}
    settings = Settings(
        unqualified_search_registries=_strs(
            raw_settings.get("unqualifiedSearchRegistries"), "settings.unqualifiedSearchRegistries", defects
        ),
        blocked_registries=_strs(raw_settings.get("blockedRegistries"), "settings.blockedRegistries", defects),
    )
    return Plan(mirrors=tuple(mirrors), defects=tuple(defects), settings=settings)
