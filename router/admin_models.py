"""The admin API's bodies as typed models: every request it reads, every answer it gives.

``msgspec.Struct`` classes: ``router.admin`` builds and encodes them
(``msgspec.json.encode``, field order = key order), ``router.openapi``
generates the OpenAPI schemas from them, and ``tests/test_admin.py``
validates real answers against those schemas. Docstrings and ``Meta``
descriptions end up in the document.

Answers that other modules report as dicts (``DrainJob.as_dict()``,
``MoveResult.as_dict()``, ``Round.as_dict()``, ``ReloadResult.as_dict()``,
``Reloader.status()``) are converted into these models with
``msgspec.convert``, which checks them. The webhook relay's answers
(``router.webhooks.admin``) and the probes are described here too; those
handlers build their own dicts.

(No ``from __future__ import annotations`` here: msgspec reads the field
types when it builds schemas, and real types spare it an eval per field.)
"""

from typing import Annotated, Any, ClassVar, Literal

from msgspec import UNSET, Meta, Struct, UnsetType

from router.adapters.base import SessionStatus
from router.instances import AdminState

Names = list[str]


def _d(text: str) -> Meta:
    return Meta(description=text)


class Model(Struct):
    """Base of the models. ``open_schema``: what the OpenAPI schema says of
    keys beyond the fields (``additionalProperties``); None says nothing."""

    open_schema: ClassVar[bool | dict[str, Any] | None] = None


# -- requests --------------------------------------------------------------------------


class MoveRequest(Model):
    """Where to move the session."""

    to: Annotated[str, Meta(min_length=1, description="An instance name.")]


class PinRequest(Model):
    """Where the session runs. Omitted: the instance it is mapped to."""

    instance: Annotated[str, Meta(min_length=1)] | UnsetType | None = UNSET


# -- answers ---------------------------------------------------------------------------


class Error(Model):
    """An error, as every part of the router answers one (``router.errors``)."""

    error: Annotated[str, _d("A stable code (unknown_instance, busy, ...).")]
    message: str
    request_id: Annotated[str, _d("The request's X-Request-Id, as the router logs it.")]
    session: Annotated[str, _d("The session it is about, when there is one.")] | UnsetType = UNSET


class Instance(Model):
    name: str
    url: Annotated[str, _d("Without user info or query.")]
    healthy: bool
    admin: AdminState
    placeable: Annotated[bool, _d("Healthy and active: takes new sessions.")]
    sessions: int
    capacity: Annotated[int, _d("max_sessions")]
    weight: float
    load: Annotated[float, _d("sessions / (capacity * weight)")]
    removed: Annotated[bool, _d("Gone from the config; leaves the fleet once its sessions moved.")]
    labels: Annotated[dict[str, str], _d("Its labels, which placement selectors match.")]


class Fleet(Model):
    instances: list[Instance]
    sessions: Annotated[int, _d("Sessions in the map.")]
    orphans: int
    duplicates: int


class MoveResult(Model):
    """One move; ``error`` says why a failed one failed (busy, no_capacity, ...)."""

    session: str
    source: str | None
    target: str | None
    ok: bool
    outcome: Literal["moved", "already_there", "found_elsewhere", "failed"]
    error: str | None
    detail: str
    seconds: float


class DrainJob(Model):
    instance: str
    state: Literal["running", "done", "cancelled"]
    done: bool
    total: int
    moved: int
    skipped: Annotated[int, _d("Gone from the instance by other means (failover, reconcile).")]
    failed: int
    remaining: int
    failures: Annotated[list[MoveResult], _d("The first failures.")]
    started: float
    finished: float | None
    seconds: float


class SessionRow(Model):
    session: str
    instance: str
    pinned: bool


class SessionPage(Model):
    sessions: list[SessionRow]
    next_cursor: Annotated[str | None, _d("Pass as cursor for the next page; null at the end.")]
    scanned: Annotated[int, _d("Map entries this page looked at.")]
    total: Annotated[int, _d("Sessions in the map.")]


# ``Session.status``: the session's state on its instance, or why there is none.
ProbeStatus = Literal[
    "starting", "ready", "needs_auth", "stopped", "failed", "absent", "unreachable"
]


class Session(Model):
    session: str
    instance: str
    known_instance: Annotated[bool, _d("The owner is an instance of the fleet.")]
    instance_healthy: bool | None
    instance_admin: AdminState | None
    status: Annotated[
        ProbeStatus | None,
        _d("Its state on the instance: absent (not there), unreachable (no answer)."),
    ]
    orphan: bool
    duplicate_on: Names
    moving: bool
    recovering: bool
    pinned: bool
    selector: Annotated[
        str, _d("The labels its instance should have (key=value,...; * for any instance).")
    ]
    selector_source: Annotated[
        Literal["header", "rule", "none"],
        _d("Where the selector came from: the create's placement header, a rule, or neither."),
    ]
    selector_strict: Annotated[bool, _d("Never placed outside the selector.")]
    within_selector: Annotated[
        bool | None, _d("Its instance matches the selector (null: not an instance of the fleet).")
    ]


class PacingRule(Model):
    """The pacing rule that applies to a session, as configured (0: no such limit)."""

    sessions: Annotated[str, _d("fnmatch pattern of session ids.")]
    per_minute: int
    per_hour: int
    recipients_per_day: int
    min_gap: float
    jitter: float


class PacingCount(Model):
    limit: Annotated[int, _d("The rule's limit.")]
    used: Annotated[
        int,
        _d(
            "Messages (distinct recipients) in the window ending now, slots reserved ahead"
            " included."
        ),
    ]


class Pacing(Model):
    """A session's send pacing (router.pacing), as every replica shares it on redis."""

    session: str
    enabled: Annotated[bool, _d("pacing.enabled")]
    max_wait: Annotated[float, _d("pacing.max_wait, seconds.")]
    rule: Annotated[PacingRule | None, _d("The first rule matching the session (null: not paced).")]
    per_minute: Annotated[PacingCount | None, _d("null when the rule sets no such limit.")]
    per_hour: PacingCount | None
    recipients_per_day: PacingCount | None
    queued: Annotated[int, _d("Slots reserved ahead of now: sends waiting, on any replica.")]
    next_slot_in: Annotated[float, _d("Seconds until a new send would have its slot.")]
    held_by: Annotated[
        str | None,
        _d("The limit setting that slot: min_gap, per_minute or per_hour (null: none)."),
    ]


class Forgotten(Model):
    session: str
    forgotten: bool
    instance: Annotated[str, _d("Where it was mapped.")]


class Pin(Model):
    session: str
    instance: str
    previous: Annotated[str | None, _d("Where it was mapped before.")]
    status: SessionStatus
    pinned: bool


class Unpin(Model):
    session: str
    pinned: bool
    was_pinned: bool


# Events carry fields of their own kind (session, instance, cause, ...).
Event = Annotated[
    dict[str, Any],
    Meta(
        extra_json_schema={
            "required": ["ts", "kind"],
            "properties": {"ts": {"type": "number"}, "kind": {"type": "string"}},
            "additionalProperties": True,
        }
    ),
]


class Events(Model):
    events: Annotated[list[Event], _d("Oldest first.")]


class OwnerChange(Model):
    session: str
    old: str
    new: str


class Duplicate(Model):
    session: str
    instances: Names
    owner: str


class ReconcileRound(Model):
    """What one reconcile round saw and did (lists cut to their first entries)."""

    round: int
    initial: bool
    started: float
    seconds: float
    listed: Annotated[dict[str, int], _d("Instance -> sessions it listed.")]
    failed: Annotated[dict[str, str], _d("Instance -> why its list failed.")]
    assigned: Annotated[int, _d("Sessions mapped that were not.")]
    changed: int
    changes: list[OwnerChange]
    duplicates: list[Duplicate]
    orphans: Names
    orphan_count: int
    forgotten: Names
    forgotten_count: int
    skipped: Annotated[int, _d("Sessions being moved or recovered, left alone.")]


class Reload(Model):
    """One reload attempt: what changed, or why the file was rejected."""

    ok: bool
    cause: Literal["api", "sighup", "file", "manual"]
    source: str | None
    started: float
    seconds: float
    error: Annotated[str | None, _d("file:line: reason")]
    file: str | None
    line: int | None
    reason: str | None
    changed: bool
    added: Names
    removed: Annotated[Names, _d("Draining; leave the fleet once empty.")]
    dropped: Annotated[Names, _d("Removed; owned no session.")]
    readdressed: Names
    updated: dict[str, Names]
    repooled: Names
    readded: Names
    adapter_changed: bool
    settings: Names
    restart_required: Annotated[
        Names, _d("Sections changed in the file that apply only after a restart.")
    ]


class ReloadRejected(Reload):
    """A rejected reload (422): the attempt, with an error code and the reason."""

    error: Annotated[str, _d("config_rejected")]
    message: Annotated[str, _d("file:line: reason")]


class ReloadStatus(Model):
    source: Annotated[str | None, _d("The config file (null: built in code).")]
    loaded_at: float
    attempts: int
    applied: int
    watching: bool
    watch_interval: float | None
    retiring: Names
    last: Reload | None


class ClientKeyInfo(Model):
    """One entry of ``api_keys``, without the key."""

    fingerprint: Annotated[
        str, _d("The first 12 hex digits of the key's SHA-256: tells keys apart, reveals none.")
    ]
    sessions: Annotated[
        Names | None,
        _d("The session names / fnmatch patterns it is limited to; null: every session."),
    ]


class ClientKeys(Model):
    authentication: Annotated[bool, _d("False: no api_keys, anyone may call the router.")]
    keys: list[ClientKeyInfo]


# -- the webhook relay (router.webhooks.admin) ------------------------------------------


class WebhookStats(Model):
    """The queue; backends add counters of their own."""

    open_schema = {"type": "integer"}

    backend: Annotated[str, _d("sqlite or redis.")]
    pending: int
    oldest_pending_age: Annotated[float, _d("Seconds.")]
    lanes: int
    dead_letters: int


class DeadLetterSummary(Model):
    id: str
    event_id: str
    target: str
    instance: str
    dialect: str
    type: str
    session: str | None
    received: float
    dead_at: float
    reason: str
    rounds: int
    size: Annotated[int, _d("Bytes of the body.")]


class DeadLetter(DeadLetterSummary):
    body: Annotated[str | None, _d("The body as text; null when it is not UTF-8.")]
    body_base64: Annotated[str, _d("The body when it is not UTF-8.")] | UnsetType = UNSET


class DeadLetterPage(Model):
    dead_letters: list[DeadLetterSummary]
    next: Annotated[str | None, _d("after= of the next page; null at the end.")]


class Purged(Model):
    purged: int


class Replayed(Model):
    replayed: int


# -- probes (no key) ------------------------------------------------------------------


class Healthz(Model):
    status: Literal["ok"]


class Readyz(Model):
    ready: bool
    config: bool
    store: bool
    healthy_instances: Names
