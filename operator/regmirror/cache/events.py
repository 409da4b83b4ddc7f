"""distribution's notifications, reduced to "this blob was pulled at this time".

The registry POSTs envelopes `{"events": [...]}`; each pull event names the
repository and the target's digest (a manifest or a blob). Anything else in
the body is ignored; a malformed body yields nothing rather than an error the
registry would retry forever.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

_DIGEST = re.compile(r"^sha256:[a-f0-9]{64}$")


@dataclass(frozen=True)
class Pull:
    """One pull the registry served."""

    repository: str
    digest: str
    size: int
    media_type: str
    at: float


def parse_envelope(body: bytes, now: float) -> list[Pull]:
    """Pull events of a notification body (at most 1,000 per envelope)."""
    try:
        doc = json.loads(body)
    except ValueError:
        return []
    events = doc.get("events") if isinstance(doc, dict) else None
    if not isinstance(events, list):
        return []
    pulls = []
    for event in events[:1000]:
        if not isinstance(event, dict) or event.get("action") != "pull":
            continue
        target = event.get("target")
        if not isinstance(target, dict):
            continue
        digest, repo = target.get("digest"), target.get("repository")
        if not isinstance(digest, str) or not _DIGEST.match(digest) or not isinstance(repo, str):
            continue
        size = target.get("size") if isinstance(target.get("size"), int) else 0
        # Receipt time, not the event's own: the registry posts right after serving, and its
        # clock is the pod's anyway.
        pulls.append(Pull(repo, digest, int(size or 0), str(target.get("mediaType", "")), now))
    return pulls
