"""Router configuration: immutable value objects that also declare the YAML schema.

A loaded ``RouterConfig`` is never mutated. A reload builds a new one and the
server swaps its single reference, so a request in flight always sees one
consistent config. Load a file with ``router.config_loader.load(path)``.

How to add a setting
--------------------
Add one field to the section's dataclass below, and its line (with the
default and what it does) to ``config/router.example.yaml``. The loader
(``router.config_loader``) reads every field from its type; nothing else to
write. The YAML key is the field name; a field without a default is required.

* ``bool``, ``str`` (non-empty), ``int`` (>= 0) and ``float`` (>= 0) need no
  marker. Narrow them with markers inside ``Annotated``:
  ``Annotated[float, Seconds]`` (a duration > 0), ``Annotated[float,
  SecondsOrOff]`` (0 turns it off), ``Annotated[float, Number(ge=0, le=1)]``,
  ``Annotated[int, Count(lo=1)]``, ``Annotated[int, Size]`` (bytes, "64MiB"),
  ``Annotated[str | None, Secret]`` (never echoed; null or an empty
  ``${VAR:-}`` is None), ``Annotated[str, Choice(("a", "b"))]``,
  ``Annotated[str, HttpUrl()]``, ``Annotated[str, Regex]``,
  ``Annotated[str, NAME]`` (like an instance name), ``Annotated[str, Lower]``,
  and any check of your own: ``Valid(fn)``, ``fn(value)`` returning why the
  value is wrong or None. ``X | None`` accepts null (-> None).
* ``tuple[X, ...]``: a YAML list of X (one X alone is a one-item list when X
  is a scalar); an entry whose ``${...}`` expands to "" is skipped.
* ``Mapping[str, X]``: a mapping (``labels: {k: v}`` is
  ``Mapping[str, str]``; give it ``field(default_factory=dict, hash=False)``).
  ``Mapping[str, Any]`` is free-form data.
* A nested dataclass is a sub-section (a mapping); ``tuple[Rule, ...]`` of a
  dataclass is a list of mappings. Mark one field of such a dataclass
  ``Shorthand`` and a plain string is accepted in place of the mapping (it
  fills that field), e.g. a key that is either ``"k"`` or ``{key: k,
  sessions: [...]}``. ``Unique("noun")`` on a field of a list item rejects
  two items with the same value; ``Ref("instances", "instance")`` on a str
  requires the name of a configured instance.
* Rules between fields: a ``CHECKS: ClassVar[tuple[Check, ...]]`` on the
  dataclass, each ``Check(fields, ok, why)``: ``ok(obj)`` must be true; else
  ``why`` (``{path}`` and ``{field}`` placeholders, shown with their values)
  is reported at the line of the first of ``fields`` the file sets.
  ``DefaultFrom(fn)`` computes a field's default from the others.

How to add a section: write its frozen dataclass, then add a field of that
type to ``RouterConfig`` (``X | None = None`` for an optional feature). For
example, a list of rules keyed by session pattern::

    @dataclass(frozen=True, slots=True)
    class PacingRule:
        sessions: Annotated[str, Regex]
        per_minute: Annotated[int, Count(lo=1)] = 20


    @dataclass(frozen=True, slots=True)
    class PacingConfig:
        rules: tuple[PacingRule, ...] = ()
        burst: Annotated[int, Count(lo=1)] = 5

        CHECKS: ClassVar[tuple[Check, ...]] = (
            Check(("burst",), lambda p: p.burst <= 100, "{path}.burst ({burst}) must be <= 100"),
        )

    # in RouterConfig:
    pacing: PacingConfig = PacingConfig()

A key that is a string or a mapping::

    @dataclass(frozen=True, slots=True)
    class ApiKey:
        key: Annotated[str, Secret, Shorthand] = field(repr=False)
        sessions: tuple[str, ...] = ()

    api_keys: tuple[ApiKey, ...] = field(default=(), repr=False)

Only a section whose reading is truly special (``adapter``: options checked
by building the adapter) gets a hook in ``config_loader._HOOKS``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Annotated, Any, ClassVar
from urllib.parse import urlsplit

from router.backoff import exponential
from router.labels import LABEL_KEY_PATTERN, LABEL_VALUE_PATTERN

# Session ids travel into upstream URLs; anything outside this pattern is
# rejected with a 400 before a byte reaches an instance.
SESSION_ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,127}"

MIB = 1024 * 1024


# --------------------------------------------------------------------------
# markers: how a field is read and checked (see the module docstring)
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Number:
    """A finite number (an integer or a decimal in YAML) within bounds."""

    gt: float | None = None
    ge: float | None = None
    le: float | None = None

    def rule(self) -> str:
        if self.ge is not None and self.le is not None:
            return f"a number in {self.ge:g}..{self.le:g}"
        if self.gt is not None:
            return f"a number > {self.gt:g}"
        return f"a number >= {self.ge or 0:g}"

    def admits(self, x: float) -> bool:
        return (
            (self.gt is None or x > self.gt)
            and (self.ge is None or x >= self.ge)
            and (self.le is None or x <= self.le)
        )


Seconds = Number(gt=0)
SecondsOrOff = Number(ge=0)
Fraction = Number(ge=0, le=1)


@dataclass(frozen=True, slots=True)
class Count:
    """An integer in ``lo..hi`` (``hi`` None: no upper bound)."""

    lo: int = 0
    hi: int | None = None


class Size:
    """Bytes: an integer, or a string like ``64MiB`` / ``512KB``; at least 1."""


class Secret:
    """Never echoed in an error; no surrounding whitespace. Optional: null or
    a ``${VAR:-}`` left empty means None."""


class Lower:
    """Kept in lower case."""


class Shorthand:
    """The field a plain string fills when one is given instead of the mapping."""


class Internal:
    """Not read from the file (set by the loader)."""


@dataclass(frozen=True, slots=True)
class Choice:
    """One of ``values`` (compared ignoring case, kept in lower case)."""

    values: tuple[str, ...]
    # "unknown <noun> 'x'; did you mean ...?" instead of "must be 'a' or 'b'".
    noun: str | None = None


@dataclass(frozen=True, slots=True)
class Valid:
    """``problem(value)`` says why the value is wrong, or None when it is fine."""

    problem: Callable[[Any], str | None]


def matches(pattern: str, what: str) -> Valid:
    """A string that fully matches ``pattern``; ``what`` describes it."""
    compiled = re.compile(pattern)
    return Valid(lambda s: None if compiled.fullmatch(s) else f"must be {what}")


def _regex_problem(s: str) -> str | None:
    try:
        re.compile(s)
    except re.error as exc:
        return f"not a valid regular expression: {exc}"
    return None


Regex = Valid(_regex_problem)
NAME = matches(
    r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}",
    "1-63 characters of letters, digits, '_', '.', '-' starting with a letter or digit",
)
NO_SPACE = Valid(lambda s: "must not contain whitespace" if any(c.isspace() for c in s) else None)


@dataclass(frozen=True, slots=True)
class HttpUrl:
    """An http(s) URL with a host and no credentials, fragment or whitespace.
    Without ``query`` it may not have a query either, and is normalised
    (scheme in lower case, no trailing slash)."""

    query: bool = False
    # Appended to the "must not contain credentials" error.
    hint: str = ""


@dataclass(frozen=True, slots=True)
class Unique:
    """No two items of a list have the same value (or ``key(value)``)."""

    noun: str
    key: Callable[[Any], object] | None = None


@dataclass(frozen=True, slots=True)
class Numbered:
    """Default of a list item's field: ``template`` with ``{n}`` its 1-based position."""

    template: str


@dataclass(frozen=True, slots=True)
class DefaultFrom:
    """Default computed from the rest of the section, when the file does not set it."""

    fn: Callable[[Any], Any]


@dataclass(frozen=True, slots=True)
class Ref:
    """The ``name`` of an item of ``RouterConfig.<collection>``."""

    collection: str
    noun: str


@dataclass(frozen=True, slots=True)
class ItemDefaults:
    """On a list of dataclasses: the sibling key ``key`` holds fields every
    item gets unless it sets them itself."""

    key: str


@dataclass(frozen=True, slots=True)
class TextForm:
    """On a list of dataclasses: one string of ``A=B`` entries (split on
    ``split``) is accepted as well, ``A`` and ``B`` filling ``fields``."""

    fields: tuple[str, str]
    split: str = r"[\s,]+"


@dataclass(frozen=True, slots=True)
class Check:
    """A rule between fields of one dataclass (``CHECKS``), see the docstring."""

    fields: tuple[str, ...]
    ok: Callable[[Any], bool]
    why: str


# --------------------------------------------------------------------------
# helpers used by the declarations
# --------------------------------------------------------------------------


def redact_url(url: str) -> str:
    """``url`` safe for logs, reprs and summaries: the password masked
    (``***``), query and fragment dropped; scheme, user, host, port and path kept."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return "<unparseable url>"
    netloc = parts.netloc
    if "@" in netloc:
        user = "" if parts.username is None else parts.username
        host = netloc.rpartition("@")[2]
        netloc = f"{user}:***@{host}" if password is not None else f"{user}@{host}"
    # Not urlunsplit: it writes unix:///x as unix:/x.
    return f"{parts.scheme}://{netloc}{parts.path}" if parts.scheme else parts.path


LABEL_KEY = matches(
    LABEL_KEY_PATTERN,
    "a label key: up to 63 of [A-Za-z0-9_.-] starting and ending with a letter or digit, "
    "optionally after a DNS prefix and '/'",
)
LABEL_VALUE = matches(
    LABEL_VALUE_PATTERN,
    "a label value: up to 63 of [A-Za-z0-9_.-] starting and ending with a letter or digit",
)
# Instance labels, and a selector (the labels an instance must have).
Labels = Mapping[Annotated[str, LABEL_KEY], Annotated[str, LABEL_VALUE]]
HEADER_NAME = matches(r"[A-Za-z0-9][A-Za-z0-9-]{0,63}", "an HTTP header name (letters, digits, -)")


def _rules_select_instances(cfg: RouterConfig) -> bool:
    labels = [inst.labels for inst in cfg.instances]
    return all(
        any(all(lab.get(k) == v for k, v in rule.select.items()) for lab in labels)
        for rule in cfg.placement.rules
    )


def url_identity(url: str) -> str:
    """Two instance URLs that reach the same place compare equal."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"{parts.scheme}://{(parts.hostname or '').lower()}:{port}{parts.path.rstrip('/')}"


def store_url_problem(url: str) -> str | None:
    """Why ``url`` is not a usable store URL, without echoing it (passwords)."""
    if url == "memory":
        return None
    expected = "must be 'memory' or a redis://, rediss:// or unix:// URL"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - validates the port
    except ValueError:
        return f"{expected}; the URL does not parse"
    scheme = parts.scheme.lower()
    if scheme in ("redis", "rediss"):
        if not parts.hostname:
            return f"{scheme}:// URL has no host (write {scheme}://HOST:6379/0)"
        db = parts.path.lstrip("/")
        if db and not db.isdigit():
            return f"{scheme}:// URL path must be a database number (like /0)"
        return None
    if scheme == "unix":
        return (
            None if parts.path else "unix:// URL has no socket path (write unix:///run/redis.sock)"
        )
    if not scheme:
        return f"{expected}, got a value without a scheme"
    return f"{expected}, got scheme {scheme!r}"


def _path_glob(p: str) -> str | None:
    return None if p.startswith("/") else "must start with '/'"


# --------------------------------------------------------------------------
# sections
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Upstream timeouts, in seconds."""

    connect: Annotated[float, Seconds] = 2.0
    # Longest silence while waiting for (a chunk of) the upstream response.
    read: Annotated[float, Seconds] = 30.0
    # Pooled upstream connections idle longer than this are closed by us.
    # Must stay below Node's 5 s ``keepAliveTimeout`` so that we, not the
    # upstream, close idle sockets (the classic stale keep-alive race).
    idle_keepalive: Annotated[float, Seconds] = 4.0


@dataclass(frozen=True, slots=True)
class Limits:
    # Largest request body (buffered for JSON session extraction and
    # credential injection, or streamed through). A larger body gets a 413.
    max_body_bytes: Annotated[int, Size] = 10 * MIB
    # Open connections kept per upstream instance (0 means unlimited).
    max_connections_per_instance: Annotated[int, Count(lo=0)] = 512
    # Request bodies held in memory at once, all requests together; beyond
    # it a request gets 503 with Retry-After (router.body.BodyBudget).
    max_buffered_bytes: Annotated[int, Size] = 128 * MIB
    # Seconds a client may take to send its request head, and may stay
    # silent while sending its body, before its connection is closed.
    header_timeout: Annotated[float, Seconds] = 10.0
    body_timeout: Annotated[float, Seconds] = 30.0
    # Seconds an idle client connection (no request) stays open.
    idle_timeout: Annotated[float, Seconds] = 60.0
    # Client connections open at once; more are closed at once (with one
    # log line a second). The open-file limit is raised to fit at start.
    max_client_connections: Annotated[int, Count(lo=0)] = 10000


@dataclass(frozen=True, slots=True)
class InstanceConfig:
    name: Annotated[str, NAME, Unique("instance name")]
    url: Annotated[str, HttpUrl(hint="; use api_key"), Unique("URL", key=url_identity)]
    max_sessions: Annotated[int, Count(lo=1)] = 100
    weight: Annotated[float, Number(gt=0)] = 1.0
    api_key: Annotated[str | None, Secret] = field(default=None, repr=False)
    # What placement selectors match (router.labels): {region: eu, engine: webjs}.
    labels: Labels = field(default_factory=dict, hash=False)


@dataclass(frozen=True, slots=True)
class AdapterConfig:
    # One of the kinds in router.adapters.ADAPTERS (the loader checks it).
    kind: str = "waha"
    # Checked by building the adapter (config_loader's hook for this type).
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class StoreConfig:
    # "memory" (embedded default) or a redis:// / rediss:// / unix:// URL.
    url: Annotated[str, Secret, Valid(store_url_problem)] = "memory"
    key_prefix: Annotated[str, NO_SPACE] = "wa-router:"

    @property
    def is_memory(self) -> bool:
        return self.url == "memory"

    def __repr__(self) -> str:
        # The URL may carry a Redis password: never show it.
        return f"StoreConfig(url={redact_url(self.url)!r}, key_prefix={self.key_prefix!r})"


@dataclass(frozen=True, slots=True)
class ListenConfig:
    host: Annotated[str, NO_SPACE] = "127.0.0.1"
    port: Annotated[int, Count(0, 65535)] = 8080


@dataclass(frozen=True, slots=True)
class HealthConfig:
    # A hung instance is down within about interval + fall x timeout (2 s),
    # sooner when requests to it are stalled too (router.health); a slow but
    # alive one still answers /health within the timeout.
    interval: Annotated[float, Seconds] = 1.0
    timeout: Annotated[float, Seconds] = 0.5
    rise: Annotated[int, Count(lo=1)] = 2
    fall: Annotated[int, Count(lo=1)] = 2

    CHECKS: ClassVar[tuple[Check, ...]] = (
        Check(
            ("timeout", "interval"),
            lambda h: h.timeout < h.interval,
            "{path}.timeout ({timeout}) must be less than {path}.interval ({interval}),"
            " so one check ends before the next begins",
        ),
    )


@dataclass(frozen=True, slots=True)
class OutlierConfig:
    """Passive health: eject an instance that fails live traffic."""

    # Consecutive connect failures, resets or 5xx answers that eject.
    consecutive_failures: int = 5
    # First ejection lasts this long; each repeated ejection multiplies it.
    base_ejection: float = 10.0
    max_ejection: float = 300.0
    # Never eject more than this share of the fleet (percent).
    max_ejected_percent: Annotated[int, Count(0, 100)] = 50
    # A recovered instance takes new sessions at a rate ramping up over this
    # many seconds, so it is not flooded the moment it is back.
    slow_start: Annotated[float, SecondsOrOff] = 30.0


@dataclass(frozen=True, slots=True)
class FailoverConfig:
    enabled: bool = True
    # Longest a request waits for its session to be recovered elsewhere.
    wait: float = 20.0
    # Longest to wait for a restored session to report ready.
    ready_timeout: float = 15.0
    # Expiry of the cross-replica restore lock (redis store).
    lock_ttl: float = 30.0
    # At most this share of requests in flight may be retries.
    retry_budget: Annotated[float, Fraction] = 0.2
    # Tries per request, the first one included.
    max_tries: int = 3
    # Base of the jittered exponential backoff between tries, seconds.
    backoff: float = 0.05
    # Retry-After (seconds) on a 503 when recovery did not finish in time.
    retry_after: int = 5
    # When active health checks mark an instance down, recover all of its
    # sessions (not only those that get requests): a session that only
    # receives messages must not stay offline until the main app calls it.
    evacuate_down: bool = True
    # Sessions recovered at once while evacuating a down instance.
    evacuate_concurrency: int = 8


@dataclass(frozen=True, slots=True)
class DiscoveryConfig:
    # List every instance's sessions before serving.
    on_start: bool = True
    # Reconcile the map with the instances every this many seconds (0: never).
    interval: Annotated[float, SecondsOrOff] = 30.0
    # Stop the extra copy of a session found running on two instances.
    stop_duplicates: bool = False
    # Sessions moved at once when draining an instance.
    migrate_concurrency: int = 4
    # Opt-in: move sessions when the load spread exceeds the threshold.
    rebalance: bool = False
    rebalance_threshold: Annotated[float, Fraction] = 0.25


@dataclass(frozen=True, slots=True)
class IdempotencyConfig:
    # How long a response to an Idempotency-Key is remembered, seconds.
    window: float = 3600.0
    # Larger responses are not remembered (the key is released instead).
    max_body_bytes: int = MIB


# What a pattern of session ids may hold: their characters and fnmatch's
# (pacing rules, key scopes).
_SESSION_GLOB = re.compile(r"[A-Za-z0-9_.@\-*?\[\]!]{1,128}")


def _session_glob(p: str) -> str | None:
    if _SESSION_GLOB.fullmatch(p) is None:
        return "must be an fnmatch pattern of session ids (letters, digits, _.@- and *?[]!)"
    return None


@dataclass(frozen=True, slots=True)
class PacingRule:
    """Send pacing limits of the sessions whose id matches ``sessions``
    (router.pacing). A rule setting no limit exempts its sessions."""

    # fnmatch pattern of session ids, case-sensitive ("webjs_*", "*").
    sessions: Annotated[str, Valid(_session_glob), Unique("sessions pattern")] = "*"
    # Messages per rolling minute / hour; 0: no such limit.
    per_minute: int = 0
    per_hour: int = 0
    # Distinct recipients per rolling 24 hours; 0: no such limit.
    recipients_per_day: int = 0
    # Seconds between two messages of a session, plus a random 0..jitter more.
    min_gap: Annotated[float, Number(ge=0, le=3600)] = 0.0
    jitter: Annotated[float, Number(ge=0, le=3600)] = 0.0

    @property
    def limits_anything(self) -> bool:
        return bool(
            self.per_minute
            or self.per_hour
            or self.recipients_per_day
            or self.min_gap
            or self.jitter
        )


@dataclass(frozen=True, slots=True)
class PacingConfig:
    """Per-session send pacing across every replica (router.pacing)."""

    enabled: bool = False
    # Longest a send waits for its slot, seconds; a send whose slot is
    # further away is refused (429 send_paced with Retry-After).
    max_wait: Annotated[float, Number(ge=0, le=3600)] = 10.0
    # The first rule whose ``sessions`` matches a session applies; none: not paced.
    rules: tuple[PacingRule, ...] = ()

    CHECKS: ClassVar[tuple[Check, ...]] = (
        Check(
            ("enabled", "rules"),
            lambda p: not p.enabled or any(r.limits_anything for r in p.rules),
            "{path}.enabled: no rule sets a limit, so nothing would be paced",
        ),
        Check(
            ("rules",),
            lambda p: all(r.sessions != "*" for r in p.rules[:-1]),
            "{path}.rules: a rule for sessions '*' matches every session: the rules after"
            " it would never apply (put it last)",
        ),
    )

    def rule_for(self, session: str) -> PacingRule | None:
        """The first rule matching ``session``, if any."""
        for rule in self.rules:
            if fnmatchcase(session, rule.sessions):
                return rule
        return None

    @property
    def counts_recipients(self) -> bool:
        """Some rule limits recipients: the proxy reads sends' bodies for them."""
        return self.enabled and any(r.recipients_per_day > 0 for r in self.rules)


WEBHOOK_FORMATS: tuple[str, ...] = ("auto", "blazz", "waha", "raw")


@dataclass(frozen=True, slots=True)
class WebhookTarget:
    """Where events go (the main app), and which events go there."""

    url: Annotated[str, HttpUrl(query=True)]
    # Unique; stored with every queued event. Defaults to "target-<n>".
    name: Annotated[str, NAME, Numbered("target-{n}"), Unique("target name")] = "target-1"
    # fnmatch patterns of event types ("message*", "session.status"); empty = all.
    events: tuple[str, ...] = ()
    # Regex the session id must fully match; None = every session (and none).
    sessions: Annotated[str | None, Regex] = None
    # Key the router signs deliveries with (never logged).
    hmac_key: Annotated[str | None, Secret] = field(default=None, repr=False)
    # How deliveries are signed: auto (like the sending instance), blazz, waha, raw.
    format: Annotated[str, Choice(WEBHOOK_FORMATS, noun="format")] = "auto"


@dataclass(frozen=True, slots=True)
class WebhookIngest:
    # When a key applies to an instance, its events must carry a valid signature.
    blazz_hmac_key: Annotated[str | None, Secret] = field(default=None, repr=False)
    waha_hmac_key: Annotated[str | None, Secret] = field(default=None, repr=False)
    # Per-instance keys (instance name -> key), overriding the dialect's key.
    instance_keys: Mapping[Annotated[str, Ref("instances", "instance")], Annotated[str, Secret]] = (
        field(default_factory=dict, repr=False)
    )
    # Seconds a signed timestamp may differ from our clock.
    max_age_skew: Annotated[float, Seconds] = 300.0
    max_body_bytes: Annotated[int, Size] = 8 * MIB
    # Body bytes the ingest holds in memory at once, every request together
    # (counted as they arrive); beyond it a request gets 429 + Retry-After.
    # Unset, at least one largest event fits.
    max_buffered_bytes: Annotated[
        int, Size, DefaultFrom(lambda i: max(i.max_buffered_bytes, i.max_body_bytes))
    ] = 64 * MIB
    # With a WAHA key: X-Webhook-Timestamp is required (401 without), so an
    # old signed event cannot be replayed forever. False accepts events without it.
    waha_require_timestamp: bool = True
    # Bytes of event bodies queued per target; an event that would exceed it
    # for a target is refused with 429 + Retry-After (the instance retries).
    max_queued_bytes: Annotated[
        int, Size, DefaultFrom(lambda i: max(i.max_queued_bytes, i.max_body_bytes))
    ] = 256 * MIB
    # Seconds an accepted event id is remembered per target: the same id again
    # (a replay, an instance's retry) is answered 200 and not queued twice.
    # Unset, long enough that a captured signed event cannot be replayed once
    # its id is forgotten (it went stale after max_age_skew).
    dedup_window: Annotated[
        float, SecondsOrOff, DefaultFrom(lambda i: max(i.dedup_window, 2 * i.max_age_skew))
    ] = 600.0

    CHECKS: ClassVar[tuple[Check, ...]] = (
        Check(
            ("max_buffered_bytes", "max_body_bytes"),
            lambda i: i.max_buffered_bytes >= i.max_body_bytes,
            "{path}.max_buffered_bytes ({max_buffered_bytes}) must be >= max_body_bytes"
            " ({max_body_bytes}), or the largest event could never be accepted",
        ),
        Check(
            ("max_queued_bytes", "max_body_bytes"),
            lambda i: i.max_queued_bytes >= i.max_body_bytes,
            "{path}.max_queued_bytes ({max_queued_bytes}) must be >= max_body_bytes"
            " ({max_body_bytes}), or the largest event could never be accepted",
        ),
        Check(
            ("dedup_window", "max_age_skew"),
            lambda i: i.dedup_window == 0 or i.dedup_window >= i.max_age_skew,
            "{path}.dedup_window ({dedup_window}) must be 0 (off) or >= max_age_skew"
            " ({max_age_skew}): a replay still fresh after the window would be queued twice",
        ),
    )


@dataclass(frozen=True, slots=True)
class WebhookDelivery:
    # HTTP attempts in one delivery round (aiohttp-retry), and the first wait between them.
    attempts_per_round: Annotated[int, Count(1, 10_000)] = 3
    round_backoff: Annotated[float, Seconds] = 0.2
    # Durable retries between rounds: min(backoff_max, backoff_base * 2**(round-1)), jittered.
    backoff_base: Annotated[float, Seconds] = 1.0
    backoff_max: Annotated[float, Seconds] = 300.0
    # An event still undelivered this many seconds after it arrived is dead-lettered.
    max_age: Annotated[float, Seconds] = 86400.0
    # Lanes (target x session) delivered at once by one router.
    concurrency: Annotated[int, Count(1, 10_000)] = 64
    # Seconds for one HTTP attempt (connect + answer).
    timeout: Annotated[float, Seconds] = 10.0
    # "session": events of one session arrive in order; "none": no ordering.
    ordering: Annotated[str, Choice(("session", "none"))] = "session"
    # Target answers that mean "this event will never be accepted": dead-letter at once.
    dead_letter_statuses: tuple[Annotated[int, Count(400, 499)], ...] = (400, 413, 415, 422)
    # Seconds a lane claimed by one router stays invisible to the others (redis).
    lease: Annotated[float, Seconds] = 60.0

    CHECKS: ClassVar[tuple[Check, ...]] = (
        Check(
            ("backoff_max", "backoff_base"),
            lambda d: d.backoff_max >= d.backoff_base,
            "{path}.backoff_max ({backoff_max}) must be >= backoff_base ({backoff_base})",
        ),
        # A delivery round signs once, then makes up to attempts_per_round
        # attempts: the signed timestamp must still be fresh on the last one.
        Check(
            ("attempts_per_round", "timeout"),
            lambda d: d.round_seconds <= 240,
            "{path}: one delivery round may take {round_seconds} s (attempts_per_round x"
            " timeout + waits); keep it under 240 s, because a round is signed once and"
            " receivers reject timestamps older than 300 s",
        ),
        Check(
            ("lease",),
            lambda d: d.lease > d.round_seconds,
            "{path}.lease ({lease}) must be longer than one delivery round ({round_seconds} s),"
            " or another replica would take over a lane mid-delivery",
        ),
    )

    def round_wait(self, attempt: int) -> float:
        """Longest wait after in-round attempt ``attempt`` (1-based) failed."""
        return exponential(attempt - 1, self.round_backoff, self.backoff_max)

    @property
    def round_seconds(self) -> float:
        """Longest one delivery round can take: every attempt times out, every wait is full."""
        waits = sum(self.round_wait(i) for i in range(1, self.attempts_per_round))
        return self.attempts_per_round * self.timeout + waits


@dataclass(frozen=True, slots=True)
class WebhookConfig:
    targets: tuple[WebhookTarget, ...]
    ingest: WebhookIngest = WebhookIngest()
    delivery: WebhookDelivery = WebhookDelivery()
    # Embedded queue file, used when the store is "memory".
    sqlite_path: str = "./var/webhooks.db"
    # "full" (survives power loss) or "normal" (survives a process crash).
    sqlite_synchronous: Annotated[str, Choice(("full", "normal"))] = "full"
    # Stable name of this replica in the redis consumer group; default host:port.
    consumer_name: Annotated[
        str | None,
        matches(
            r"[A-Za-z0-9_.:@-]{1,100}",
            "1-100 characters of letters, digits, '_', '.', ':', '@', '-'",
        ),
    ] = None
    # Where Blazz instances' other calls to their LARAVEL_URL go (accounts,
    # chat sync): the main app's base URL. None: those calls get a 404.
    main_app_url: Annotated[str | None, HttpUrl()] = None
    # The router's URL as the main app reaches it, sent as X-Instance-Url with
    # Blazz events (Blazz's main app calls that URL for the session later).
    # None: the scheme and Host the instance used to reach the router.
    public_url: Annotated[str | None, HttpUrl()] = None


@dataclass(frozen=True, slots=True)
class RoutesConfig:
    """Which upstream paths clients may reach (glob patterns, ``*`` matches
    anything including ``/``, compared ignoring case as Express routes are).
    Empty ``allow``: every path not denied. Evaluated before anything else of
    a request; a refused path is a 403 ``route_denied``."""

    allow: tuple[Annotated[str, Lower, Valid(_path_glob)], ...] = ()
    deny: tuple[Annotated[str, Lower, Valid(_path_glob)], ...] = ()

    def permits(self, path: str) -> bool:
        if not self.allow and not self.deny:
            return True
        low = path.lower()
        if self.allow and not any(fnmatchcase(low, p) for p in self.allow):
            return False
        return not any(fnmatchcase(low, p) for p in self.deny)


_SESSION_ID = re.compile(SESSION_ID_PATTERN)


def _session_entry_problem(s: str) -> str | None:
    """A session name, or an fnmatch pattern of them (``webjs_12_*``)."""
    if any(c in s for c in "*?["):
        ok = _SESSION_GLOB.fullmatch(s) is not None
    else:
        ok = _SESSION_ID.fullmatch(s) is not None
    return None if ok else "must be a session name or an fnmatch pattern of session names"


@dataclass(frozen=True, slots=True)
class ClientKey:
    """One entry of ``api_keys``: a key (a plain string in the file), or a
    key limited to some sessions (router.scoping)."""

    key: Annotated[str, Secret, Shorthand] = field(repr=False)
    # Session names or fnmatch patterns (``webjs_12_*``) the key may reach,
    # create, list and receive events of; not set: every session.
    sessions: tuple[Annotated[str, Valid(_session_entry_problem)], ...] | None = None

    CHECKS: ClassVar[tuple[Check, ...]] = (
        Check(
            ("sessions",),
            lambda k: k.sessions is None or bool(k.sessions),
            "{path}.sessions: names no session, so the key could reach none;"
            " leave sessions out for a key that reaches every session",
        ),
    )


def _keys_agree(cfg: RouterConfig) -> bool:
    """No key is listed twice with different sessions (which would apply?)."""
    seen: dict[str, tuple[str, ...] | None] = {}
    for entry in cfg.api_keys:
        if seen.setdefault(entry.key, entry.sessions) != entry.sessions:
            return False
    return True


@dataclass(frozen=True, slots=True)
class PlacementRule:
    """Sessions whose id matches ``sessions`` (an fnmatch pattern, case
    sensitive) go to instances whose labels match ``select``; ``weight``
    percent of them (chosen by a hash of the id), the others fall through to
    the next rule (router.labels)."""

    select: Labels = field(hash=False)
    sessions: str = "*"
    weight: Annotated[float, Number(ge=0.01, le=100)] = 100.0
    # Never outside the selector: no room in it fails a create (503), a
    # failover or a drain of the session, rather than place it elsewhere.
    strict: bool = False

    CHECKS: ClassVar[tuple[Check, ...]] = (
        Check(
            ("select",), lambda rule: bool(rule.select), "{path}.select: name at least one label"
        ),
    )


@dataclass(frozen=True, slots=True)
class PlacementConfig:
    """Placement by labels (router.labels, router.placement)."""

    # Request header of a create naming the new session's selector
    # ("region=eu"); None: clients cannot choose.
    header: Annotated[str | None, HEADER_NAME] = None
    # A header-chosen selector is strict (never placed outside it).
    header_strict: bool = True
    # In order; the first that matches (and whose weight takes the session) applies.
    rules: tuple[PlacementRule, ...] = ()


@dataclass(frozen=True, slots=True)
class RouterConfig:
    # At least one; also one string of NAME=URL entries; ``instance_defaults``
    # holds fields every instance gets unless it sets them.
    instances: Annotated[
        tuple[InstanceConfig, ...], ItemDefaults("instance_defaults"), TextForm(("name", "url"))
    ]
    listen: ListenConfig = ListenConfig()
    adapter: AdapterConfig = AdapterConfig()
    store: StoreConfig = StoreConfig()
    timeouts: Timeouts = Timeouts()
    limits: Limits = Limits()
    health: HealthConfig = HealthConfig()
    outlier: OutlierConfig = OutlierConfig()
    failover: FailoverConfig = FailoverConfig()
    discovery: DiscoveryConfig = DiscoveryConfig()
    idempotency: IdempotencyConfig = IdempotencyConfig()
    # Key for /admin (separate from client keys). None disables the admin API.
    admin_key: Annotated[str | None, Secret] = field(default=None, repr=False)
    # Keys clients (the main app) present to the router, each maybe limited
    # to some sessions. Empty means the router does not authenticate clients
    # (only sensible on a private net).
    api_keys: tuple[ClientKey, ...] = field(default=(), repr=False)
    # The durable webhook relay (router/webhooks); None = disabled.
    webhooks: WebhookConfig | None = None
    # Upstream paths clients may reach.
    routes: RoutesConfig = RoutesConfig()
    # Per-session send pacing (router.pacing); off by default.
    pacing: PacingConfig = PacingConfig()
    # Placement by labels: rules and a create header giving sessions a selector.
    placement: PlacementConfig = PlacementConfig()
    # Where this config came from, for error messages and reload.
    source: Annotated[str | None, Internal] = None

    CHECKS: ClassVar[tuple[Check, ...]] = (
        Check(
            ("api_keys",),
            _keys_agree,
            "api_keys: a key is listed twice with different sessions",
        ),
        Check(
            ("placement",),
            _rules_select_instances,
            "placement.rules: a rule selects labels no instance has (a typo?)",
        ),
    )

    def instance(self, name: str) -> InstanceConfig | None:
        for inst in self.instances:
            if inst.name == name:
                return inst
        return None


class ConfigError(Exception):
    """A config file was rejected: ``file:line: reason``, one line per problem.

    ``line`` and ``reason`` are the first problem's; ``problems`` lists them
    all (a file is checked whole, so one run reports every problem it has).
    """

    def __init__(
        self,
        file: str,
        line: int | None,
        reason: str,
        *,
        more: tuple[tuple[int | None, str], ...] = (),
        column: int | None = None,
    ) -> None:
        self.file = file
        # Where on the line (0-based), to tell two problems of one line apart.
        self.column = column
        self.line = line
        self.reason = reason
        self.problems: tuple[tuple[int | None, str], ...] = ((line, reason), *more)
        super().__init__(
            "\n".join(
                f"{file}:{ln}: {why}" if ln is not None else f"{file}: {why}"
                for ln, why in self.problems
            )
        )

    @classmethod
    def combine(cls, errors: list[ConfigError]) -> ConfigError:
        """One error carrying every problem of ``errors`` (in order, non-empty)."""
        first = errors[0]
        more = tuple(p for e in errors for p in e.problems)[1:]
        return cls(first.file, first.line, first.reason, more=more)
