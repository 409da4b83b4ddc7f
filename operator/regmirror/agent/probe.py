"""Health probes of the mirrors, so a dead mirror costs pulls nothing.

A mirror is healthy when `<url>/v2/` answers HTTP at all (401 included: the
registry is there, auth is containerd's business). A connect error, TLS error
or timeout is a failure. Two consecutive failures withdraw the mirror (one
lost packet does not flap the node's files); one success restores it. A
mirror seen for the first time takes the state of its first probe, so a node
that starts while a mirror is down never routes pulls to it.
"""

from __future__ import annotations

import http.client
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from regmirror.lowlevel import http_connection, parse_ca_bundle, ssl_context

DEFAULT_TIMEOUT = 1.0
DEFAULT_INTERVAL = 2.0
FAILURES_TO_WITHDRAW = 2

# (url, timeout, ca_pem) -> None when the mirror answered, else why not.
ProbeFn = Callable[[str, float, str | None], str | None]


# TLS contexts are built once and shared by every probe: building one that
# loads the system's trust store costs milliseconds of CPU and about 1 MiB of
# resident memory, per context, on every node. So a mirror with a CA bundle
# (the plan's, from the mirror's own TLS Secret) is verified against exactly
# that bundle, in a small context of its own; only mirrors without one share
# the single system-roots context. (containerd trusts system roots plus the
# bundle: the probe can only be stricter, for a mirror whose certificate
# chains to a public root although the plan gave it a private bundle.)
_CONTEXTS: dict[str | None, ssl.SSLContext] = {}
_CONTEXTS_LOCK = threading.Lock()
MAX_CONTEXTS = 256


def tls_context(ca_pem: str | None) -> ssl.SSLContext:
    """The shared verifying context for this CA bundle (or the system roots without one). Raises CAError."""
    with _CONTEXTS_LOCK:
        context = _CONTEXTS.get(ca_pem)
        if context is None:
            if ca_pem:
                context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies certificate and host name
                context.load_verify_locations(cadata=parse_ca_bundle(ca_pem).pem)
            else:
                context = ssl_context(None)
            if len(_CONTEXTS) >= MAX_CONTEXTS:
                _CONTEXTS.clear()
            _CONTEXTS[ca_pem] = context
        return context


def http_probe(url: str, timeout: float, ca_pem: str | None = None) -> str | None:
    """GET <url>/v2/: None if any HTTP response came back, else the error."""
    try:
        context = tls_context(ca_pem) if url.startswith("https://") else None
        conn, parts = http_connection(url, timeout, context=context)
    except ValueError as exc:  # bad CA bytes or port: this mirror cannot be reached, nothing else is affected
        return f"{type(exc).__name__}: {exc}"
    try:
        conn.request("GET", parts.path.rstrip("/") + "/v2/", headers={"User-Agent": "regmirror-agent"})
        conn.getresponse().read(1024)
        return None
    except (OSError, http.client.HTTPException) as exc:
        return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    finally:
        conn.close()


@dataclass(frozen=True)
class Target:
    """What to probe for one mirror."""

    url: str
    ca_pem: str | None = None


@dataclass
class MirrorHealth:
    healthy: bool
    failures: int = 0
    last_error: str | None = None
    next_probe: float = 0.0


@dataclass(frozen=True)
class Transition:
    """A mirror changed state: withdrawn (healthy=False) or restored (healthy=True)."""

    name: str
    url: str
    healthy: bool
    error: str | None


class HealthTracker:
    """Per-mirror health from periodic probes; `unhealthy()` feeds render_node_files."""

    def __init__(
        self,
        probe: ProbeFn = http_probe,
        clock: Callable[[], float] = time.monotonic,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        interval: float = DEFAULT_INTERVAL,
        failures_to_withdraw: int = FAILURES_TO_WITHDRAW,
    ) -> None:
        self._probe = probe
        self._clock = clock
        self.timeout = timeout
        self.interval = interval
        self.failures_to_withdraw = failures_to_withdraw
        self._state: dict[str, MirrorHealth] = {}

    def state(self, name: str) -> MirrorHealth | None:
        return self._state.get(name)

    def unhealthy(self) -> frozenset[str]:
        """Names of the mirrors currently withdrawn."""
        return frozenset(name for name, s in self._state.items() if not s.healthy)

    def _probe_one(self, target: Target) -> str | None:
        """One mirror's probe; whatever it raises is that mirror's failure, never the step's."""
        try:
            return self._probe(target.url, self.timeout, target.ca_pem)
        except Exception as exc:  # isolation: one mirror's data must not stop the others' probes
            return f"probe failed: {type(exc).__name__}: {exc}"

    def update(self, targets: Mapping[str, Target]) -> list[Transition]:
        """Probe the mirrors that are due (all of them in parallel) and return state changes."""
        for gone in set(self._state) - set(targets):
            del self._state[gone]
        now = self._clock()
        due = [name for name in targets if name not in self._state or self._state[name].next_probe <= now]
        if not due:
            return []
        if len(due) == 1:
            errors = [self._probe_one(targets[due[0]])]
        else:
            with ThreadPoolExecutor(max_workers=min(len(due), 8)) as pool:
                errors = list(pool.map(lambda n: self._probe_one(targets[n]), due))
        now = self._clock()
        transitions = []
        for name, error in zip(due, errors, strict=True):
            state = self._state.get(name)
            if state is None:
                self._state[name] = MirrorHealth(healthy=error is None, failures=0 if error is None else 1, last_error=error)
                if error is not None:
                    transitions.append(Transition(name, targets[name].url, False, error))
            elif error is None:
                if not state.healthy:
                    transitions.append(Transition(name, targets[name].url, True, None))
                state.healthy, state.failures, state.last_error = True, 0, None
            else:
                state.failures += 1
                state.last_error = error
                if state.healthy and state.failures >= self.failures_to_withdraw:
                    state.healthy = False
                    transitions.append(Transition(name, targets[name].url, False, error))
            self._state[name].next_probe = now + self.interval
        return transitions
