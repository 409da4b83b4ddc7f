"""PURE: a mirror's generated credentials and the state machine that rotates them without failing a pull.

Who may pull through a mirror is decided at its front, before its cache (see
render/front.py): a request whose Authorization header is not in the accepted
set gets 401, for content already cached too. This module decides that set and
keeps it safe to change. Every mirror has credentials, also an Open one: the
nodes always carry theirs (the agent writes it into containerd's hosts.toml),
so switching a mirror between Open and Restricted only flips what the front
enforces, and never waits for, or races with, a node rollout.

Three credentials of the nodes exist at any time, each a random 256-bit token
under a username that names its revision:
- `current` (revision N): what the node plan tells the agents to use;
- `next` (N+1): generated one rotation ahead and accepted already, so when a
  rotation hands it to the nodes, every mirror pod has long loaded it (a
  Secret volume reaches a pod about a minute after the Secret changes);
- `retired` (N-1), only while a rotation rolls out: nodes still on the old plan
  keep pulling with it; it is dropped once every node applied revision N.
Clients outside the cluster (spec.access.clients) each have their own
credential in their own Secret, all accepted.

Where the state lives: in the mirror's own Secret `regmirror-<mirror>-auth`
(operator's namespace; `state.json` plus the two derived files the pods
mount, `access.vcl` for the front and `htpasswd` for an HTTPS registry), and a
copy of the node credentials in `regmirror-agent-credentials` (the agent's namespace,
one key per mirror), because a pod can only mount a Secret of its own
namespace. Either copy restores the other: a deleted or corrupted Secret is
recovered without a new credential. Only when both are lost is a new one
generated, and while nodes still send the lost one the mirror is not enforced
(status.access says so) rather than failing their pulls.

`decide_access` is a function of (spec, what the Secrets hold, what the node
rollout reports, now); the operator applies what it returns. Nothing here
does I/O, logs, or puts a credential anywhere but the Secret objects it
renders: the status, events and plan fields it returns carry revisions and
names only.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Final

from regmirror import constants as c
from regmirror import naming
from regmirror.models import AccessPolicy, RegistryMirrorSpec
from regmirror.units import duration_seconds

#: Set to any new value to rotate the nodes' credential at once.
ANNOTATION_ROTATE: Final = f"{c.GROUP}/rotate-credentials"
#: The agent's Secret: one key per mirror, each the JSON of `node_entry`.
#: No mirror's Secret can take this name: a mirror's own ends in -auth, an access client's holds a dot.
NODE_SECRET_NAME: Final = "regmirror-agent-credentials"
STATE_KEY: Final = "state.json"
ACCESS_VCL_KEY: Final = "access.vcl"
HTPASSWD_KEY: Final = "htpasswd"
CLIENT_KEYS: Final = ("username", "password", "auth")
NODE_USER_PREFIX: Final = "regmirror-node-r"
CLIENT_USER_PREFIX: Final = "client-"
#: A rotation waits at least this long after the previous one, unless the mirror's pods report that
#: they loaded the current accepted set: `next` must be in every front before nodes switch to it.
MIN_ROTATION_SPACING: Final = 600.0
# bcrypt cost: the passwords are 256-bit random tokens, so the hash's work factor adds nothing
# against guessing them, while distribution checks it on every request of an HTTPS mirror.
BCRYPT_ROUNDS: Final = 4
STATE_VERSION: Final = 1

_USERNAME_RE = re.compile(r"[a-z0-9][-a-z0-9]{0,99}")
_PASSWORD_RE = re.compile(r"[A-Za-z0-9_-]{32,128}")
_AUTHORIZATION_RE = re.compile(r"Basic [A-Za-z0-9+/]{4,400}={0,2}")


class CredentialError(ValueError):
    """A stored credential or state that does not read as one of ours."""


@dataclass(frozen=True)
class Credential:
    """A username and a random password; `authorization` is what a client sends."""

    username: str
    password: str

    def __post_init__(self) -> None:
        if not _USERNAME_RE.fullmatch(self.username) or not _PASSWORD_RE.fullmatch(self.password):
            raise CredentialError("not a generated credential")

    @property
    def basic(self) -> str:
        """base64(username:password): Docker's `auth`, and the token of a Basic Authorization header."""
        return base64.b64encode(f"{self.username}:{self.password}".encode()).decode()

    @property
    def authorization(self) -> str:
        """The Authorization header value."""
        return f"Basic {self.basic}"

    def __repr__(self) -> str:  # never print the password, even by accident
        return f"Credential({self.username!r}, ***)"

    @classmethod
    def from_authorization(cls, value: str) -> Credential:
        """The credential of a Basic Authorization header value (what the node Secret holds)."""
        if not isinstance(value, str) or not _AUTHORIZATION_RE.fullmatch(value):
            raise CredentialError("not a Basic authorization")
        try:
            username, sep, password = base64.b64decode(value[len("Basic ") :], validate=True).decode("ascii").partition(":")
        except (ValueError, UnicodeDecodeError) as exc:
            raise CredentialError("not a Basic authorization") from exc
        if not sep:
            raise CredentialError("not a Basic authorization")
        return cls(username, password)


def generate(username: str, token: Callable[[int], str] = secrets.token_urlsafe) -> Credential:
    """A new credential with 256 random bits of password."""
    return Credential(username, token(32))


def node_username(revision: int) -> str:
    """The nodes' username for a revision (distinct per revision: htpasswd keys passwords by username)."""
    return f"{NODE_USER_PREFIX}{revision}"


def client_username(client: str) -> str:
    """The username of an access client."""
    return f"{CLIENT_USER_PREFIX}{client}"


def client_secret_name(mirror: str, client: str) -> str:
    """The Secret holding an access client's credential (operator's namespace).

    The dot keeps it apart from every other mirror's Secrets: mirror and client
    names are DNS labels, so `regmirror-a.client-b-auth` (mirror a, client
    b-auth) can never be `regmirror-a-client-b-auth` (mirror a-client-b).
    """
    return f"{naming.child_name(mirror)}.client-{client}"


def auth_secret_name(mirror: str) -> str:
    """The mirror's own access Secret (operator's namespace)."""
    return naming.credentials_secret_name(mirror)


# ---------------------------------------------------------------- state


@dataclass(frozen=True)
class AccessState:
    """What `state.json` of the mirror's Secret records (credentials inside: never log it)."""

    revision: int
    current: Credential
    next: Credential
    retired: Credential | None = None
    #: Whether every node that may route to the mirror is known to send an accepted credential:
    #: only then may the front refuse the others.
    enforceable: bool = True
    enforced: bool = False
    #: Increases whenever the accepted set or its enforcement changes; the front reports the one it loaded.
    generation: int = 1
    rotated_at: float = 0.0
    rotation_token: str = ""
    #: sha256 of the accepted set with its enforcement, as last rendered (so a change bumps `generation`).
    accepted_digest: str = ""
    #: Set when `current` is new to the fronts (issued after both copies were lost): the node plan keeps
    #: naming the revision nodes have until every front loaded this generation (or, when the fronts
    #: cannot be asked, until `handover_at` + the rotation spacing).
    handover_generation: int | None = None
    handover_at: float = 0.0

    def node_credentials(self) -> dict[int, Credential]:
        """Every node credential the front accepts, by revision."""
        out = {self.revision: self.current, self.revision + 1: self.next}
        if self.retired is not None:
            out[self.revision - 1] = self.retired
        return out

    def to_json(self) -> str:
        """The Secret's state.json."""

        def cred(value: Credential | None) -> dict[str, str] | None:
            return None if value is None else {"username": value.username, "password": value.password}

        return json.dumps(
            {
                "version": STATE_VERSION,
                "revision": self.revision,
                "current": cred(self.current),
                "next": cred(self.next),
                "retired": cred(self.retired),
                "enforceable": self.enforceable,
                "enforced": self.enforced,
                "generation": self.generation,
                "rotatedAt": self.rotated_at,
                "rotationToken": self.rotation_token,
                "acceptedDigest": self.accepted_digest,
                "handoverGeneration": self.handover_generation,
                "handoverAt": self.handover_at,
            },
            sort_keys=True,
        )

    def __repr__(self) -> str:
        return f"AccessState(revision={self.revision}, retired={self.retired is not None}, enforced={self.enforced})"


def _credential(raw: Any) -> Credential:
    if not isinstance(raw, dict) or not isinstance(raw.get("username"), str) or not isinstance(raw.get("password"), str):
        raise CredentialError("a credential must be an object with a username and a password")
    return Credential(raw["username"], raw["password"])


def _int(raw: Any, what: str, low: int = 0) -> int:
    if not isinstance(raw, int) or isinstance(raw, bool) or not low <= raw < 2**53:
        raise CredentialError(f"{what} must be an integer")
    return raw


def parse_state(text: str | None) -> AccessState:
    """state.json as the operator wrote it; CredentialError for anything else (a hand edit, a truncation)."""
    if not text:
        raise CredentialError("missing")
    try:
        raw = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise CredentialError("not JSON") from exc
    if not isinstance(raw, dict) or raw.get("version") != STATE_VERSION:
        raise CredentialError("unknown state version")
    revision = _int(raw.get("revision"), "revision", 1)
    current, nxt = _credential(raw.get("current")), _credential(raw.get("next"))
    retired = None if raw.get("retired") is None else _credential(raw.get("retired"))
    if current.username != node_username(revision) or nxt.username != node_username(revision + 1):
        raise CredentialError("credentials do not match their revision")
    if retired is not None and retired.username != node_username(revision - 1):
        raise CredentialError("the retired credential does not match its revision")
    for key in ("enforceable", "enforced"):
        if not isinstance(raw.get(key), bool):
            raise CredentialError(f"{key} must be true or false")
    rotated_at = raw.get("rotatedAt")
    if not isinstance(rotated_at, int | float) or isinstance(rotated_at, bool):
        raise CredentialError("rotatedAt must be a number")
    token = raw.get("rotationToken")
    if not isinstance(token, str) or len(token) > 256:
        raise CredentialError("rotationToken must be a string")
    digest = raw.get("acceptedDigest", "")
    if not isinstance(digest, str) or len(digest) > 128:
        raise CredentialError("acceptedDigest must be a string")
    handover = raw.get("handoverGeneration")
    if handover is not None:
        handover = _int(handover, "handoverGeneration", 1)
    handover_at = raw.get("handoverAt", 0.0)
    if not isinstance(handover_at, int | float) or isinstance(handover_at, bool):
        raise CredentialError("handoverAt must be a number")
    return AccessState(
        revision=revision,
        current=current,
        next=nxt,
        retired=retired,
        enforceable=raw["enforceable"],
        enforced=raw["enforced"],
        generation=_int(raw.get("generation"), "generation", 1),
        rotated_at=float(rotated_at),
        rotation_token=token,
        accepted_digest=digest,
        handover_generation=handover,
        handover_at=float(handover_at),
    )


def node_entry(state: AccessState, plan_revision: int) -> str:
    """This mirror's key in the agent's Secret: the revision handed to nodes and every accepted node credential's header.

    The agent picks the revision the node plan names, so the plan and this
    Secret may reach a node in either order. `revision` is what the plan
    names (during a handover, a revision whose credential is lost, so this
    copy cannot restore a state the fronts have not loaded yet).
    """
    creds = state.node_credentials()
    return json.dumps(
        {"revision": plan_revision, "authorizations": {str(r): creds[r].authorization for r in sorted(creds)}}, sort_keys=True
    )


def parse_node_entry(text: str | None) -> tuple[int, dict[int, Credential]]:
    """The agent Secret's entry of one mirror: (revision in use, node credentials by revision); CredentialError if unusable."""
    if not text:
        raise CredentialError("missing")
    try:
        raw = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise CredentialError("not JSON") from exc
    if not isinstance(raw, dict) or not isinstance(raw.get("authorizations"), dict):
        raise CredentialError("not a node credentials entry")
    revision = _int(raw.get("revision"), "revision", 1)
    creds: dict[int, Credential] = {}
    for key, value in raw["authorizations"].items():
        if not isinstance(key, str) or not key.isdigit():
            raise CredentialError("revisions must be numbers")
        cred = Credential.from_authorization(value)
        if cred.username != node_username(int(key)):
            raise CredentialError("a credential does not match its revision")
        creds[int(key)] = cred
    return revision, creds


def parse_client_secret(data: Mapping[str, str] | None, mirror: str, client: str) -> Credential:
    """An access client's Secret (decoded values); CredentialError when it is missing or not ours any more."""
    if not data:
        raise CredentialError("missing")
    cred = Credential(data.get("username", ""), data.get("password", ""))
    if cred.username != client_username(client) or data.get("auth") != cred.basic:
        raise CredentialError("the keys do not agree")
    return cred


def client_secret_data(cred: Credential) -> dict[str, str]:
    """The values of an access client's Secret."""
    return {"username": cred.username, "password": cred.password, "auth": cred.basic}


# ---------------------------------------------------------------- what the mirror's pods mount


def accepted_authorizations(state: AccessState, clients: Mapping[str, Credential]) -> list[str]:
    """Every Authorization value the front accepts, in a stable order (nodes by revision, then clients by name)."""
    creds = state.node_credentials()
    return [creds[r].authorization for r in sorted(creds)] + [clients[n].authorization for n in sorted(clients)]


def render_htpasswd(
    state: AccessState,
    clients: Mapping[str, Credential],
    previous: str | None = None,
    hash_password: Callable[[str], str] | None = None,
) -> str:
    """distribution's htpasswd (bcrypt) of every accepted credential.

    A line of `previous` whose hash still matches its user's password is kept
    as it is: bcrypt salts are random, and a new salt for an unchanged
    password would rewrite the Secret (and the registry's file) on every
    reconcile.
    """
    import bcrypt

    known: dict[str, str] = {}
    for line in (previous or "").splitlines():
        user, sep, hashed = line.partition(":")
        if sep and user not in known:
            known[user] = hashed

    def hashed_for(cred: Credential) -> str:
        old = known.get(cred.username)
        if old is not None:
            try:
                if bcrypt.checkpw(cred.password.encode(), old.encode()):
                    return old
            except ValueError:
                pass
        if hash_password is not None:
            return hash_password(cred.password)
        return bcrypt.hashpw(cred.password.encode(), bcrypt.gensalt(rounds=BCRYPT_ROUNDS)).decode()

    creds = [state.node_credentials()[r] for r in sorted(state.node_credentials())] + [clients[n] for n in sorted(clients)]
    return "".join(f"{cred.username}:{hashed_for(cred)}\n" for cred in creds)


# ---------------------------------------------------------------- the state machine


@dataclass(frozen=True)
class Published:
    """What the node plan currently published says about this mirror, and how far it rolled out."""

    #: The credential revision the published plan entry names; None: the entry carries none (a plan
    #: rendered before access existed), so nodes routing to the mirror send no credential.
    revision: int | None
    #: Every node the mirror selects applied the published entry.
    rolled_out: bool


@dataclass(frozen=True)
class AccessInputs:
    """Everything `decide_access` reads. Secret values are decoded strings."""

    mirror: str
    spec: RegistryMirrorSpec
    now: float
    #: state.json of regmirror-<mirror>-auth (None: the Secret or the key is missing).
    stored_state: str | None = None
    #: htpasswd of regmirror-<mirror>-auth, to keep its bcrypt lines.
    stored_htpasswd: str | None = None
    #: This mirror's key of regmirror-agent-credentials in the agent's namespace.
    node_copy: str | None = None
    #: Decoded data of each access client's Secret that exists, by client name.
    client_secrets: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    #: None: the published node plan does not list the mirror (no node routes to it).
    published: Published | None = None
    #: The accepted-set generation every ready mirror pod reports loaded (GET /_regmirror/access); None: unknown.
    fronts_loaded: int | None = None
    #: The value of the regmirror.dev/rotate-credentials annotation.
    rotate_request: str = ""
    min_rotation_spacing: float = MIN_ROTATION_SPACING


@dataclass(frozen=True)
class AccessDecision:
    """What the operator applies: Secret values, the plan's revision, status and events (no credential outside `*_data`)."""

    mirror: str
    state: AccessState
    #: regmirror-<mirror>-auth data (operator's namespace).
    auth_data: dict[str, str]
    #: regmirror-agent-credentials[<mirror>] (agent's namespace).
    node_entry: str
    #: Data of each access client's Secret, by client name (all of them, created or kept).
    client_data: dict[str, dict[str, str]]
    #: The credential revision the node plan entry names.
    plan_revision: int
    policy: AccessPolicy
    events: tuple[tuple[str, str], ...] = ()

    def status(self, network_policy: bool) -> dict[str, Any]:
        """status.access, as the API stores it."""
        s = self.state
        if self.policy == AccessPolicy.OPEN:
            message = "Open: anyone who can connect to the mirror pulls through it"
        elif s.enforced:
            message = "Restricted: only the nodes and the access clients pull; anything else gets 401"
        else:
            message = "Restricted, not yet enforced: waiting until every node that uses the mirror has its credential"
        if s.retired is not None:
            message += f"; rotating to revision {s.revision}, revision {s.revision - 1} still accepted until every node has the new one"
        return {
            "policy": self.policy.value,
            "enforced": s.enforced,
            "revision": s.revision,
            "rotating": s.retired is not None,
            "clients": [client_secret_name(self.mirror, n) for n in sorted(self.client_data)],
            "networkPolicy": network_policy,
            "message": message,
        }


def _next_generation(previous: int, now: float) -> int:
    """A generation above `previous` and above every generation issued before `now`.

    Generations follow the clock (milliseconds), so one issued after a lost
    state was restored or regenerated is above anything the fronts may still
    report from the lost one.
    """
    return max(previous + 1, int(now * 1000))


def _fresh_state(revision: int, now: float, token: Callable[[int], str], *, enforceable: bool, rotation_token: str) -> AccessState:
    return AccessState(
        revision=revision,
        current=generate(node_username(revision), token),
        next=generate(node_username(revision + 1), token),
        enforceable=enforceable,
        generation=_next_generation(0, now),
        rotated_at=now,
        rotation_token=rotation_token,
    )


def _recover(inputs: AccessInputs, token: Callable[[int], str], events: list[tuple[str, str]]) -> AccessState:
    """The state when the mirror's Secret does not hold a usable one: from the agent's copy, or new."""
    try:
        revision, creds = parse_node_entry(inputs.node_copy)
    except CredentialError:
        revision, creds = 0, {}
    if revision and revision in creds:
        nxt = creds.get(revision + 1) or generate(node_username(revision + 1), token)
        events.append(
            ("CredentialsRecovered", f"access Secret {auth_secret_name(inputs.mirror)} restored from the nodes' copy (revision {revision})")
        )
        return AccessState(
            revision=revision,
            current=creds[revision],
            next=nxt,
            retired=creds.get(revision - 1),
            # What nodes hold is known again, but whether they all hold it is what the rollout says.
            enforceable=False,
            generation=_next_generation(0, inputs.now) + 1,
            rotated_at=inputs.now,
            rotation_token=inputs.rotate_request,
        )
    published = inputs.published
    if published is None:
        # No node routes to the mirror: a first creation (or one nothing uses). Safe to enforce at once:
        # a node gets the mirror's route and its credential in the same plan.
        return _fresh_state(1, inputs.now, token, enforceable=True, rotation_token=inputs.rotate_request)
    start = max(published.revision or 0, revision) + 1
    # Generations must keep increasing past whatever the fronts loaded from the lost state.
    generation = _next_generation(0, inputs.now) + 1
    events.append(
        (
            "CredentialsRegenerated",
            f"no usable credential in {auth_secret_name(inputs.mirror)} nor in {NODE_SECRET_NAME}: new ones issued (revision {start}); "
            "the mirror is not enforced until every node has them",
        )
    )
    fresh = _fresh_state(start, inputs.now, token, enforceable=False, rotation_token=inputs.rotate_request)
    return replace(fresh, generation=generation, handover_generation=generation, handover_at=inputs.now)


def _clients(inputs: AccessInputs, token: Callable[[int], str], events: list[tuple[str, str]]) -> dict[str, Credential]:
    out: dict[str, Credential] = {}
    for client in inputs.spec.access.clients:
        try:
            out[client.name] = parse_client_secret(inputs.client_secrets.get(client.name), inputs.mirror, client.name)
        except CredentialError as exc:
            out[client.name] = generate(client_username(client.name), token)
            what = "issued" if str(exc) == "missing" else "reissued (its Secret no longer held a valid one)"
            events.append(
                (
                    "ClientCredentialIssued",
                    f"access client {client.name}: credential {what} in {client_secret_name(inputs.mirror, client.name)}",
                )
            )
    return out


def decide_access(inputs: AccessInputs, token: Callable[[int], str] = secrets.token_urlsafe) -> AccessDecision:
    """The mirror's credentials, accepted set and enforcement after this reconcile (pure, given `token`).

    Invariants (tests/unit/test_access.py searches event sequences for a counterexample):
    - the front never refuses a credential a node may still send: enforcement
      only while every node that may route to the mirror holds an accepted one;
    - a rotation hands nodes a credential the front accepted a rotation ago,
      and retires the old one only once every node applied the new revision;
    - a lost Secret is restored from the other copy before anything new is made.
    """
    spec = inputs.spec
    policy = spec.effective_access_policy()
    events: list[tuple[str, str]] = []
    try:
        state = parse_state(inputs.stored_state)
    except CredentialError:
        state = _recover(inputs, token, events)
    published = inputs.published

    if published is None:
        if state.retired is not None:
            state = replace(state, retired=None)  # no node routes here (any more): nothing to wait for
    elif published.revision is None or published.revision not in state.node_credentials():
        # Nodes may send no credential (a plan rendered before access existed) or one this state does not know.
        state = replace(state, enforceable=False)
    elif published.revision == state.revision and published.rolled_out:
        # Every node applied the current revision: the retired credential goes, and what nodes hold is known.
        state = replace(state, retired=None, enforceable=True)

    # Rotation: due by age, or asked for; one at a time, and only once `next` is in every front.
    period = duration_seconds(spec.access.rotate_every)
    due = period > 0 and inputs.now - state.rotated_at >= period
    asked = bool(inputs.rotate_request) and inputs.rotate_request != state.rotation_token
    front_ready = (
        inputs.fronts_loaded >= state.generation
        if inputs.fronts_loaded is not None
        else inputs.now - state.rotated_at >= inputs.min_rotation_spacing
    )
    if (due or asked) and state.retired is None and front_ready and state.enforceable and state.handover_generation is None:
        revision = state.revision + 1
        state = replace(
            state,
            revision=revision,
            retired=state.current,
            current=state.next,
            next=generate(node_username(revision + 1), token),
            rotated_at=inputs.now,
            rotation_token=inputs.rotate_request,
        )
        events.append(
            (
                "CredentialsRotated",
                f"nodes' credential rotated to revision {revision}; revision {revision - 1} accepted until every node has it",
            )
        )

    clients = _clients(inputs, token, events)
    enforced = policy == AccessPolicy.RESTRICTED and state.enforceable
    accepted = accepted_authorizations(state, clients)
    digest = hashlib.sha256(json.dumps([accepted, enforced]).encode()).hexdigest()
    if digest != state.accepted_digest:
        generation = _next_generation(state.generation, inputs.now) if state.accepted_digest else state.generation
        state = replace(state, accepted_digest=digest, generation=generation)
    state = replace(state, enforced=enforced)

    # A credential the fronts have not loaded yet is not handed to the nodes: the plan keeps naming
    # the revision they hold (their files stay as they are) until every front accepts the new one.
    plan_revision = state.revision
    if state.handover_generation is not None:
        loaded = inputs.fronts_loaded
        if (loaded is not None and loaded >= state.handover_generation) or (
            loaded is None and inputs.now - state.handover_at >= inputs.min_rotation_spacing
        ):
            state = replace(state, handover_generation=None)
        elif published is not None and published.revision is not None:
            plan_revision = published.revision

    from regmirror.render.front import render_access_vcl

    auth_data = {
        STATE_KEY: state.to_json(),
        ACCESS_VCL_KEY: render_access_vcl(accepted, enforced=enforced, generation=state.generation),
        HTPASSWD_KEY: render_htpasswd(state, clients, inputs.stored_htpasswd),
    }
    return AccessDecision(
        mirror=inputs.mirror,
        state=state,
        auth_data=auth_data,
        node_entry=node_entry(state, plan_revision),
        client_data={name: client_secret_data(cred) for name, cred in clients.items()},
        plan_revision=plan_revision,
        policy=policy,
        events=tuple(events),
    )
