"""Health probes of the mirrors, so a dead mirror costs pulls (almost) nothing.

A mirror is healthy when `<url>/v2/` answers HTTP at all (401 included: the
registry is there, auth is containerd's business). A connect error, TLS error
or timeout is a failure. Two consecutive failures withdraw the mirror (one
lost packet does not flap the node's files), but the second probe follows the
first one quickly (CONFIRM_DELAY), so a dead mirror is withdrawn about
`timeout * 2 + CONFIRM_DELAY` after its first failed probe, not a whole
interval later. One success restores it. A mirror seen for the first time
takes the state of its first probe, so a node that starts while a mirror is
down never routes pulls to it.

What a probe costs: one new TCP connection and one `GET /v2/` per mirror per
interval (about 200 bytes each way), on every node that mirror selects. At
1,000 nodes and the default 2 s interval that is 500 requests/s per mirror
(spread over its replicas by the Service), and 0.5 req/s per node per mirror.
Each probe is a new connection on purpose: containerd dials a new one too,
and a kept-alive connection would hide a replica that stopped accepting. The
interval is jittered (+-JITTER) so that nodes started together do not probe
in lockstep.

When the agent watches the mirror's EndpointSlices (`Target.ready_endpoints`
is not None), a mirror with no ready endpoint is withdrawn at once without a
probe (its pod was deleted, or its readiness probe failed), and any change in
the count probes at once, so a mirror coming back is restored without waiting
for the interval. On a node whose containerd has no `dial_timeout` (1.x,
2.0.0-2.0.6) the agent also probes each ready endpoint of a plain-http mirror
with two or more (`Target.endpoints`): there a pod whose node died, still
listed for 40 s and more, costs every connection that kube-proxy sends to it
30 s, so one dark endpoint withdraws the mirror on those nodes until it leaves
the Service or answers again. That costs one more request per endpoint per
interval, on those nodes only.
"""

from __future__ import annotations

import http.client
import random
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from regmirror.lowlevel import http_connection, parse_ca_bundle, ssl_context

DEFAULT_TIMEOUT = 0.5
DEFAULT_INTERVAL = 2.0
FAILURES_TO_WITHDRAW = 2
# How soon a failed probe is repeated to confirm the failure.
CONFIRM_DELAY = 0.25
# Each interval is drawn from [interval * (1 - JITTER), interval * (1 + JITTER)].
JITTER = 0.25
NO_ENDPOINTS = "no ready endpoint in the mirror's EndpointSlices"

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
    # Ready endpoints of the mirror's Service as its EndpointSlices say; None
    # when the agent does not watch them (no API access, or an older plan).
    ready_endpoints: int | None = None
    # Endpoint URLs probed one by one besides `url` (nodes whose containerd has no
    # dial_timeout: there a dead pod behind a live ClusterIP costs 30 s per connection).
    endpoints: tuple[str, ...] = ()


@dataclass
class MirrorHealth:
    healthy: bool
    failures: int = 0
    last_error: str | None = None
    next_probe: float = 0.0
    ready_endpoints: int | None = None
    endpoints: tuple[str, ...] = ()


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
        confirm_delay: float = CONFIRM_DELAY,
        jitter: float = JITTER,
        rng: random.Random | None = None,
    ) -> None:
        self._probe = probe
        self._clock = clock
        self.timeout = timeout
        self.interval = interval
        self.failures_to_withdraw = failures_to_withdraw
        self.confirm_delay = confirm_delay
        self.jitter = max(0.0, min(jitter, 0.9))
        self._rng = rng or random.Random()
        self._state: dict[str, MirrorHealth] = {}

    def state(self, name: str) -> MirrorHealth | None:
        return self._state.get(name)

    def unhealthy(self) -> frozenset[str]:
        """Names of the mirrors currently withdrawn."""
        return frozenset(name for name, s in self._state.items() if not s.healthy)

    def next_due(self) -> float | None:
        """When the next probe is due (clock time), or None when no mirror is tracked."""
        return min((s.next_probe for s in self._state.values()), default=None)

    def _next_interval(self) -> float:
        return self.interval * self._rng.uniform(1 - self.jitter, 1 + self.jitter)

    def _probe_one(self, target: Target, timeout: float | None = None) -> str | None:
        """One mirror's probe (its URL, then each endpoint it lists); whatever it raises is that mirror's failure, never the step's."""
        timeout = self.timeout if timeout is None else timeout
        try:
            error = self._probe(target.url, timeout, target.ca_pem)
            for endpoint in target.endpoints if error is None else ():
                failed = self._probe(endpoint, timeout, target.ca_pem)
                if failed is not None:
                    return f"endpoint {endpoint} of its Service: {failed}"
            return error
        except Exception as exc:  # isolation: one mirror's data must not stop the others' probes
            return f"probe failed: {type(exc).__name__}: {exc}"

    def probe_all(self, names: list[str], targets: Mapping[str, Target], timeout: float | None = None) -> list[str | None]:
        """Probe these mirrors (in parallel), touching no state: safe on another thread."""
        if len(names) == 1:
            return [self._probe_one(targets[names[0]], timeout)]
        with ThreadPoolExecutor(max_workers=min(len(names), 8)) as pool:
            return list(pool.map(lambda n: self._probe_one(targets[n], timeout), names))

    def stalled(self, name: str, url: str, reason: str) -> Transition | None:
        """A stalled request to a mirror whose last probe failed: two failures, so it is withdrawn now, with no more probing."""
        state = self._state.get(name)
        if state is None or not state.healthy or state.failures < 1:
            return None
        state.healthy = False
        state.failures = max(state.failures + 1, self.failures_to_withdraw)
        state.last_error = f"{reason}, and its last probe failed too ({state.last_error})"
        state.next_probe = self._clock() + self._next_interval()
        return Transition(name, url, False, state.last_error)

    def suspects_to_probe(self, names: Iterable[str]) -> list[str]:
        """Of these mirrors, those a stall makes worth a probe: tracked and healthy (a withdrawn one is probed on schedule)."""
        return [n for n in names if (state := self._state.get(n)) is not None and state.healthy]

    def probe_suspects(self, targets: Mapping[str, Target], names: list[str], timeout: float) -> list[str | None]:
        """The probes of `suspect`, touching no state: safe on another thread while the loop goes on."""
        return self.probe_all(names, targets, timeout)

    def confirm_suspects(
        self, targets: Mapping[str, Target], reasons: Mapping[str, str], errors: Mapping[str, str | None]
    ) -> list[Transition]:
        """Apply suspect probes' outcomes: a failed one withdraws its mirror at once (the stall was the first failure)."""
        now = self._clock()
        transitions = []
        for name in self.suspects_to_probe(errors):
            error = errors[name]
            if error is None or name not in targets:
                continue  # it answers: only slow (a cache miss fetched from its upstream)
            state = self._state[name]
            state.healthy = False
            state.failures = max(state.failures + 1, self.failures_to_withdraw)
            state.last_error = f"{reasons.get(name, 'a request stalled')}, and /v2/ did not answer either ({error})"
            state.next_probe = now + self._next_interval()
            transitions.append(Transition(name, targets[name].url, False, state.last_error))
        return transitions

    def suspect(self, targets: Mapping[str, Target], reasons: Mapping[str, str], timeout: float) -> list[Transition]:
        """Probe these healthy mirrors now, because a connection to them stalled (agent/guard.py), and apply the outcome.

        The stall counts as the first failure: a probe that fails too
        withdraws the mirror at once, without the confirming second probe.
        A mirror that answers is only slow: nothing changes.
        """
        names = [n for n in self.suspects_to_probe(reasons) if n in targets]
        if not names:
            return []
        errors = dict(zip(names, self.probe_suspects(targets, names, timeout), strict=True))
        return self.confirm_suspects(targets, reasons, errors)

    def update(self, targets: Mapping[str, Target]) -> list[Transition]:
        """Probe the mirrors that are due (all of them in parallel) and return state changes."""
        transitions, due = self.plan(targets)
        if due:
            transitions += self.record(targets, due, self.probe_all(due, targets))
        return transitions

    def plan(self, targets: Mapping[str, Target]) -> tuple[list[Transition], list[str]]:
        """The first half of `update`: forget gone mirrors, act on EndpointSlice counts, and say which mirrors are due."""
        for gone in set(self._state) - set(targets):
            del self._state[gone]
        now = self._clock()
        transitions: list[Transition] = []
        due = []
        for name, target in targets.items():
            state = self._state.get(name)
            if target.ready_endpoints == 0:
                # The Service routes nowhere: no probe needed to know that.
                if state is None or state.healthy:
                    transitions.append(Transition(name, target.url, False, NO_ENDPOINTS))
                self._state[name] = MirrorHealth(
                    healthy=False, failures=self.failures_to_withdraw, last_error=NO_ENDPOINTS, next_probe=now + self._next_interval()
                )
                self._state[name].ready_endpoints = 0
                continue
            if state is not None and (state.ready_endpoints, state.endpoints) != (target.ready_endpoints, target.endpoints):
                state.ready_endpoints, state.endpoints = target.ready_endpoints, target.endpoints
                state.next_probe = now  # endpoints changed: look now
            if state is None or state.next_probe <= now:
                due.append(name)
        return transitions, due

    def known(self, names: Iterable[str]) -> bool:
        """Whether every one of these mirrors has been probed before (a first probe decides before any file is written)."""
        return all(n in self._state for n in names)

    def in_flight(self, names: Iterable[str]) -> None:
        """These mirrors' probes run elsewhere (agent/loop.py): not due again until their results are recorded."""
        later = self._clock() + self.timeout * 4 + 1.0
        for name in names:
            if name in self._state:
                self._state[name].next_probe = later

    def record(self, targets: Mapping[str, Target], due: list[str], errors: list[str | None]) -> list[Transition]:
        """The second half of `update`: apply the probes' outcomes."""
        now = self._clock()
        transitions: list[Transition] = []
        for name, error in zip(due, errors, strict=True):
            if name not in targets:
                continue
            state = self._state.get(name)
            url = targets[name].url
            if state is None:
                state = self._state[name] = MirrorHealth(
                    healthy=error is None,
                    failures=0 if error is None else 1,
                    last_error=error,
                    ready_endpoints=targets[name].ready_endpoints,
                    endpoints=targets[name].endpoints,
                )
                if error is not None:
                    transitions.append(Transition(name, url, False, error))
            elif error is None:
                if not state.healthy:
                    transitions.append(Transition(name, url, True, None))
                state.healthy, state.failures, state.last_error = True, 0, None
            else:
                state.failures += 1
                state.last_error = error
                if state.healthy and state.failures >= self.failures_to_withdraw:
                    state.healthy = False
                    transitions.append(Transition(name, url, False, error))
            confirming = state.healthy and state.failures > 0
            state.next_probe = now + (self.confirm_delay if confirming else self._next_interval())
        return transitions
