"""Small stdlib-only helpers shared by the operator and the node agent.

The agent must stay light (no pydantic, no kubernetes client: its memory budget
is per node), so what both sides need lives here, with no imports beyond the
standard library.
"""

from __future__ import annotations

import http.client
import ssl
from collections.abc import Iterable, Mapping
from typing import Protocol
from urllib.parse import SplitResult, urlsplit


class Requirement(Protocol):
    """One set-based requirement of a label selector (models' and the agent's both fit)."""

    @property
    def key(self) -> str: ...

    @property
    def operator(self) -> str: ...

    @property
    def values(self) -> Iterable[str]: ...


def selector_matches(match_labels: Mapping[str, str], match_expressions: Iterable[Requirement], labels: Mapping[str, str]) -> bool:
    """Kubernetes label-selector semantics: all matchLabels and all matchExpressions hold."""
    if any(labels.get(k) != v for k, v in match_labels.items()):
        return False
    for req in match_expressions:
        present = req.key in labels
        if req.operator == "In" and not (present and labels[req.key] in req.values):
            return False
        if req.operator == "NotIn" and present and labels[req.key] in req.values:
            return False
        if req.operator == "Exists" and not present:
            return False
        if req.operator == "DoesNotExist" and present:
            return False
    return True


def http_connection(url: str, timeout: float, ca_pem: str | None = None) -> tuple[http.client.HTTPConnection, SplitResult]:
    """A connection to the URL's host (TLS with an optional extra CA for https), and the parsed URL."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.scheme == "https":
        context = ssl.create_default_context(cadata=ca_pem) if ca_pem else ssl.create_default_context()
        return http.client.HTTPSConnection(host, parts.port or 443, timeout=timeout, context=context), parts
    return http.client.HTTPConnection(host, parts.port or 80, timeout=timeout), parts
