"""docs/troubleshooting.md names every reason an admin can meet: found by reading the source, not by a list kept by hand.

A reason is a CamelCase word the operator or the agent puts where an admin reads
it: a `REASON_*` constant, the reason argument of a condition, Finding,
ConfigError, RepairError or UpstreamCheck, a `reason=` keyword, or a reason
returned next to a condition's status in observe.py. A reason built with an
f-string (`f"{what}SecretMissing"`) counts by its constant part. A new reason
without a line in the docs fails here with its file.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SOURCE = REPO / "operator" / "regmirror"
DOC = REPO / "docs" / "troubleshooting.md"
REASON = re.compile(r"[A-Z][a-z0-9]+(?:[A-Z][A-Za-z0-9]*)*|TTL")
#: call name -> position of its reason argument
REASON_ARGUMENT = {"Finding": 0, "ConfigError": 0, "RepairError": 0, "UpstreamCheck": 1, "condition": 2}
#: modules whose tuple returns are (status, reason, message) of a condition
CONDITION_MODULES = {"observe.py"}


def _called(node: ast.Call) -> str | None:
    if isinstance(node.func, ast.Name):
        return node.func.id
    return node.func.attr if isinstance(node.func, ast.Attribute) else None


def _words(node: ast.AST | None) -> Iterator[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str) and REASON.fullmatch(node.value):
        yield node.value
    elif isinstance(node, ast.JoinedStr):
        for part in node.values:
            if isinstance(part, ast.Constant) and isinstance(part.value, str) and REASON.fullmatch(part.value):
                yield part.value


def reasons_in(path: Path) -> Iterator[str]:
    """Every reason the module at `path` can report."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id.startswith("REASON") for t in targets):
                yield from _words(node.value)
            if path.name in CONDITION_MODULES and isinstance(node.value, ast.Tuple):
                for element in node.value.elts[1:2]:
                    yield from _words(element)
        elif isinstance(node, ast.Return) and path.name in CONDITION_MODULES and isinstance(node.value, ast.Tuple):
            if node.value.elts and isinstance(node.value.elts[0], ast.Constant) and isinstance(node.value.elts[0].value, bool):
                for element in node.value.elts[1:2]:
                    yield from _words(element)
        elif isinstance(node, ast.Call):
            position = REASON_ARGUMENT.get(_called(node) or "")
            if position is not None and len(node.args) > position:
                yield from _words(node.args[position])
            for keyword in node.keywords:
                if keyword.arg == "reason":
                    yield from _words(keyword.value)


def test_the_scan_finds_reasons_of_every_kind() -> None:
    found = {reason for path in SOURCE.rglob("*.py") for reason in reasons_in(path)}
    # One of each source the scan reads, so a scan that silently finds nothing cannot pass.
    assert {"MirrorReady", "NoReadyReplicas", "InsecureTokenRealm", "ForeignFileSkipped", "ApplyRejected", "SecretMissing"} <= found


def test_every_reason_has_a_line_in_the_troubleshooting_guide() -> None:
    doc = DOC.read_text()
    missing = sorted(
        f"{reason} ({path.relative_to(REPO)})"
        for path in sorted(SOURCE.rglob("*.py"))
        for reason in set(reasons_in(path))
        if not re.search(rf"`[A-Za-z]*{re.escape(reason)}[A-Za-z]*`", doc)
    )
    assert not missing, f"reasons an admin can meet but {DOC.name} does not explain: {missing}"


def test_every_admission_rule_has_a_row_in_the_troubleshooting_guide() -> None:
    from regmirror.models import RegistryMirrorSpec, iter_rules

    doc = DOC.read_text()
    section = doc[doc.index("## Refused at admission") : doc.index("## Node agent")]
    fields = set()
    for rule in iter_rules(RegistryMirrorSpec):
        # Rules say which field they refuse first ("cache.maxSize must ...", "access.clients: ..."); generic ones
        # ("must be a Secret key ...") are reported under the field's own path by the API server.
        head = re.match(r"([a-z][A-Za-z]*(?:\[\])?(?:\.[a-zA-Z]+(?:\[\])?)*)[: ]", rule.message)
        if head and not rule.message.startswith(("must ", "every ")):
            fields.add(head.group(1))
    assert len(fields) > 30, "the scan found the rules"
    missing = sorted(
        f for f in fields if f not in section and not re.search(rf"`[^`]*\b{re.escape(f.replace('[]', '').split('.')[-1])}\b", section)
    )
    assert not missing, f"admission rules of these fields have no row under 'Refused at admission': {missing}"
