"""The controller's own state: results, keys, and one record per mirror.

All of it lives on the operator's event loop and is touched only there (the
informers' callbacks and the reconcilers run on that loop), so there is no
lock. Everything the controller remembers about a mirror is one
`MirrorRecord`: deleting a mirror is one `pop`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from regmirror.controller.queue import HIGH, NORMAL, WorkQueue
from regmirror.controller.store import Store
from regmirror.kube import ApiError, KubeClient
from regmirror.metrics import Metrics
from regmirror.models import BootstrapConflict, CacheStatus, RegistryMirrorSpec
from regmirror.nodeplan import MirrorEntry, NodePlan
from regmirror.observe import RepairError
from regmirror.rollout import NodeIndex, NodeRollout, PlanHistory, entry_digest
from regmirror.settings import Settings

# ------------------------------------------------------------------ results


@dataclass(frozen=True)
class Done:
    """Nothing more to do until something changes."""


@dataclass(frozen=True)
class RequeueAfter:
    """Look again after `seconds` (a grace period ends, a write is due)."""

    seconds: float


@dataclass(frozen=True)
class Transient:
    """Failed in a way that may pass (API unavailable, 429, conflict): retry with per-key backoff."""

    error: str
    # The API server's Retry-After (429, 503), when it gave one: the key is not retried sooner than that.
    after: float | None = None


@dataclass(frozen=True)
class Terminal:
    """Failed in a way only a change can fix (invalid spec, rejected object): no retry until an event."""

    error: str


Result = Done | RequeueAfter | Transient | Terminal

# ------------------------------------------------------------------ keys

Key = tuple[str, str]
CHILDREN = "children"  # per mirror: its Deployment, Service, PVC, ConfigMap, and its finalizer
STATUS = "status"  # per mirror: gather -> evaluate -> write
PLAN = "plan"  # singleton: the node plan ConfigMap and the agent DaemonSet
ROLLOUT = "rollout"  # singleton: node accounting after node or agent pod changes
HOSTS = "hosts"  # singleton: each mirror's place among the mirrors of its hosts
ACCESS = "access"  # per mirror: its credentials, accepted set and access Secrets (controller/access.py)
PINS = "pins"  # singleton: which mirrors' pins changed after pod changes (controller/cache.py)


def key_priority(key: Key) -> int:
    """The singletons (one pass each, for every mirror) overtake the per-mirror keys.

    Status keys share the children's priority: when they overtook children, a storm of
    status writes starved the children applies (and so the node plan) in a burst. Only a
    status whose Ready the nodes' flip can change is queued as urgent, for its next turn
    (controller/rollout.py): at most one per mirror per rollout.
    """
    return NORMAL if key[0] in (CHILDREN, STATUS, ACCESS) else HIGH


@dataclass(frozen=True)
class ConfigError:
    """A problem with the user's configuration: reported as Stalled (Ready=False)."""

    reason: str
    message: str


def failure(exc: ApiError, message: str) -> RepairError:
    """A failing request as the status names it: APIUnavailable (429, 5xx, no answer: retried), ApplyForbidden
    (403: someone must grant it), else ApplyFailed."""
    reason = "APIUnavailable" if exc.transient else "ApplyForbidden" if exc.status == 403 else "ApplyFailed"
    return RepairError(exc.transient, reason, message)


def logged(exc: ApiError) -> str:
    """What the operator's log says about a failed request: a rejection with the fields and the API server's
    words about them (which `str(exc)` leaves out), else the error. Not for statuses: see `said`."""
    return f"{exc.status} {exc.reason}: {exc.field_error()}" if exc.invalid else str(exc)


def said(exc: ApiError) -> str:
    """What a status may say about a failed request: a rejection by the fields it names only (the API server's
    words about a Secret's data may quote the values we sent, credentials among them), else the error."""
    if not exc.invalid:
        return str(exc)
    fields = ", ".join(sorted({f for f, _ in exc.causes if f}))
    return f"{exc.status} {exc.reason}" + (f" ({fields})" if fields else "")


@dataclass
class Failing:
    """One concern's failing requests (the children's applies, the access pass's reads and writes)."""

    error: RepairError | None = None
    since: float | None = None  # the first failure in a row

    def failed(self, error: RepairError, now: float) -> float:
        """Another failure: keep the latest error; returns the time of the first failure in this row."""
        if self.since is None:
            self.since = now
        self.error = error
        return self.since

    def cleared(self) -> bool:
        """The concern succeeded; whether it had been failing (the status then changes)."""
        was = self.error is not None
        self.error, self.since = None, None
        return was

    def shown(self, now: float, grace: float) -> RepairError | None:
        """The error as the status shows it: a transient one only once it lasted `grace` seconds."""
        if self.error is not None and self.error.transient and self.since is not None and now - self.since < grace:
            return None
        return self.error


@dataclass
class MirrorRecord:
    """Everything the controller remembers about one mirror."""

    first_seen: float
    generation: int | None = None
    spec: RegistryMirrorSpec | ConfigError | None = None
    secret_names: frozenset[str] = frozenset()
    credentials: str | None = None  # fingerprint of every Secret value the pods use
    config_error: ConfigError | None = None  # from the children reconcile (Secret missing, apply rejected)
    rejected: tuple[int | None, str | None] | None = None  # (generation, credentials) the API server rejected
    repair: Failing = field(default_factory=Failing)  # the children's failing applies (controller/children.py)
    access_repair: Failing = field(default_factory=Failing)  # the access pass's failing reads and writes (controller/access.py)
    last_good: MirrorEntry | None = None  # the entry nodes keep while the spec is broken
    entry_inputs: tuple[Any, ...] | None = None  # (spec, ClusterIP, CA, credential revision) `last_good` was built from
    applied: dict[str, str] = field(default_factory=dict)  # "kind/name" -> digest of the rendering we last applied
    rendered: tuple[Any, str, tuple[str, ...]] | None = None  # (inputs, JSON of the children, their digests) last rendered
    drift_repairs: dict[str, tuple[int, float]] = field(default_factory=dict)  # "kind/name" -> (repairs in a row, last)
    last_status_write: float | None = None
    progress_scheduled: bool = False
    progress_writes: int = 0  # progress-only status writes since the last one a reader acts on
    progress_turn: float | None = None  # when its reserved place in the progress budget comes (clock time)
    announced: str | None = None  # "status/reason" of the Ready condition last announced by an Event
    rollout: NodeRollout | None = None
    access: Any = None  # controller.access.AccessView: the plan's revision, enforcement, status.access (no credential)
    access_written: dict[str, dict[str, str]] = field(default_factory=dict)  # access Secret -> hashes of what we applied
    pins: frozenset[str] | None = None  # the pins the mirror's ConfigMap was last rendered with (controller/cache.py)
    cache_reports: dict[str, Any] = field(default_factory=dict)  # mirror pod -> its sidecar's last /stats
    cache_status: CacheStatus | None = None  # to write as status.cache (None: keep what the status holds)
    cache_decided: float | None = None  # when cache_status last changed (the counters' rate rule)
    cache_clients: dict[str, frozenset[str]] = field(default_factory=dict)  # mirror pod -> nodes its front saw pulling (24 h)

    def spec_of(self, mirror: dict[str, Any]) -> RegistryMirrorSpec | ConfigError:
        """The typed spec (memoized per generation), or a ConfigError naming the invalid field."""
        generation = mirror["metadata"].get("generation")
        if self.spec is None or generation != self.generation or generation is None:
            try:
                self.spec = RegistryMirrorSpec.model_validate(mirror.get("spec") or {})
            except ValidationError as exc:
                first = exc.errors()[0]
                where = ".".join(str(p) for p in first["loc"])
                self.spec = ConfigError("InvalidSpec", f"spec.{where}: {first['msg']}"[:600])
            self.generation = generation
            self.secret_names = secret_names(self.spec) if isinstance(self.spec, RegistryMirrorSpec) else frozenset()
        return self.spec


def secret_names(spec: RegistryMirrorSpec) -> frozenset[str]:
    """Every Secret a mirror's pods or nodes read."""
    names = set()
    if spec.upstream.credentials_secret_ref is not None:
        names.add(spec.upstream.credentials_secret_ref.name)
    if spec.upstream.tls is not None and spec.upstream.tls.ca_secret_ref is not None:
        names.add(spec.upstream.tls.ca_secret_ref.name)
    if spec.service.tls is not None:
        names.add(spec.service.tls.secret_name)
    return frozenset(names)


@dataclass
class PlanState:
    """The node plan the controller last applied, and what recent plans carried."""

    plan: NodePlan | None = None
    digest: str | None = None  # plan.digest(), computed once
    checked: dict[str, str | None] = field(default_factory=dict)  # kind -> resourceVersion last found matching `plan`
    entries: dict[str, str] = field(default_factory=dict)  # mirror -> entry digest in `plan`
    history: PlanHistory = field(default_factory=PlanHistory)
    seeded: bool = False
    last_apply: float = float("-inf")
    waiting_since: float | None = None  # first time a plan waited for Services
    waiting: int = 0  # how many Services it waited for at the last look
    last_progress: float = 0.0  # when that number last went down
    failing: Failing = field(default_factory=Failing)  # the plan pass's failing requests
    blocked: frozenset[str] = frozenset()  # mirrors whose entries the failing plan would change (their statuses show it)

    def set(self, plan: NodePlan, digest: str) -> None:
        """The plan nodes now get, with its digest (its entry digests computed once, not per status)."""
        self.plan, self.digest = plan, digest
        self.entries = {e.name: entry_digest(e) for e in plan.mirrors}


@dataclass
class TokenBucket:
    """At most `rate` events per second on average, `burst` at once (progress-only status writes).

    Places are reserved, as golang.org/x/time/rate's Reserve does: a caller that finds no
    token takes the next one to come (the bucket goes into debt) and is told when. Answering
    only "not yet, try in 0.2 s" woke every waiting mirror for each token: in a 500-mirror
    burst, about 170 status passes per mirror."""

    rate: float
    burst: float
    tokens: float = 0.0
    stamp: float | None = None

    def reserve(self, now: float) -> float:
        """Take a token: 0 if one was there now, else the seconds until the one taken is due."""
        if self.stamp is None:
            self.tokens, self.stamp = self.burst, now
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        self.tokens -= 1
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


@dataclass
class NodeState:
    """Per node, the plan digest of the last agent pod that was Ready there (its files are in place)."""

    applied: dict[str, str | None] = field(default_factory=dict)
    index: NodeIndex | None = None


@dataclass
class Context:
    """What every reconciler gets: the store, the client, the settings and the controller's state."""

    store: Store
    client: KubeClient
    settings: Settings
    queue: WorkQueue[Key]
    metrics: Metrics
    records: dict[str, MirrorRecord] = field(default_factory=dict)
    plan: PlanState = field(default_factory=PlanState)
    nodes: NodeState = field(default_factory=NodeState)
    # host -> (position, head) per mirror, recomputed by the HOSTS key.
    routes: dict[str, dict[str, tuple[int, list[str]]]] = field(default_factory=dict)
    # mirror -> its image's dependency on strict mirrors (models.bootstrap_conflicts), also recomputed by HOSTS.
    bootstrap: dict[str, BootstrapConflict] = field(default_factory=dict)
    # Progress-only status writes, all mirrors together (set from the settings by the manager).
    progress_budget: TokenBucket = field(default_factory=lambda: TokenBucket(rate=5.0, burst=5.0))
    # mirror -> (ok, reason, message) of the upstream credentials check.
    upstream_verdicts: dict[str, tuple[bool | None, str, str]] = field(default_factory=dict)
    # Called when a mirror's credentials change (the upstream check runs off the reconcile path).
    on_credentials: Callable[[str, RegistryMirrorSpec, str | None], None] = lambda _name, _spec, _creds: None
    clock: Callable[[], float] = time.monotonic
    # mirror -> its key of regmirror-agent-credentials (credentials: only ever written into that Secret), and
    # whether the live Secret seeded it after a start.
    node_auth: dict[str, str] = field(default_factory=dict, repr=False)
    node_auth_seeded: bool = False
    # Registry host -> digests of running pods' images (controller/cache.py); None: rebuild from the store.
    pin_index: dict[str, set[str]] | None = None

    def record(self, name: str) -> MirrorRecord:
        """The mirror's record (created on first use)."""
        rec = self.records.get(name)
        if rec is None:
            rec = self.records[name] = MirrorRecord(first_seen=self.clock())
        return rec

    def enqueue(self, kind: str, name: str = "", *, after: float = 0.0, urgent: bool = False) -> None:
        """Queue a key (after a delay; `urgent`: ahead of the other per-mirror keys)."""
        self.queue.add_after((kind, name), after, urgent=urgent)
