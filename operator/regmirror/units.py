"""Kubernetes quantities and Go durations as numbers (stdlib only).

The CRD validates their shape (QUANTITY_PATTERN, DURATION_PATTERN in models);
these turn a valid string into bytes or seconds for the operator and the cache
sidecar alike.
"""

from __future__ import annotations

import re

_BINARY = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "Pi": 1 << 50, "Ei": 1 << 60}
_DECIMAL = {"m": 10**-3, "": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18}
_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|Ei|m|k|M|G|T|P|E)?$")
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ns|us|ms|s|m|h)")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def quantity_bytes(quantity: str) -> int:
    """Bytes of a Kubernetes quantity such as 10Gi, 500M or 1.5Gi (rounded down)."""
    match = _QUANTITY.fullmatch(quantity.strip())
    if not match:
        raise ValueError(f"not a quantity: {quantity!r}")
    number, suffix = match.group(1), match.group(2) or ""
    scale = _BINARY.get(suffix) or _DECIMAL[suffix]
    whole, _, fraction = number.partition(".")
    # Integer arithmetic: 1.5Gi must be exactly 1610612736, not a float's approximation.
    value = int(whole) * scale
    if fraction:
        value += int(fraction) * scale // 10 ** len(fraction)
    return int(value)


def duration_seconds(duration: str) -> float:
    """Seconds of a Go duration such as 168h, 1h30m or 0."""
    text = duration.strip()
    if text == "0":
        return 0.0
    pos, total = 0, 0.0
    for match in _DURATION_PART.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos = match.end()
    if pos != len(text) or not text:
        raise ValueError(f"not a duration: {duration!r}")
    return total
