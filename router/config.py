"""Router configuration: small immutable value objects and one ``load()``.

A loaded ``RouterConfig`` is never mutated. A reload builds a new one and the
server swaps its single reference, so a request in flight always sees one
consistent config.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

from router.backoff import exponential

# Session ids travel into upstream URLs; anything outside this pattern is
# rejected with a 400 before a byte reaches an instance.
SESSION_ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,127}"


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Upstream timeouts, in seconds."""

    connect: float = 2.0
    # Longest silence while waiting for (a chunk of) the upstream response.
    read: float = 30.0
    # Pooled upstream connections idle longer than this are closed by us.
    # Must stay below Node's 5 s ``keepAliveTimeout`` so that we, not the
    # upstream, close idle sockets (the classic stale keep-alive race).
    idle_keepalive: float = 4.0


@dataclass(frozen=True, slots=True)
class Limits:
    # Largest request body (buffered for JSON session extraction and
    # credential injection, or streamed through). A larger body gets a 413.
    max_body_bytes: int = 10 * 1024 * 1024
    # Open connections kept per upstream instance (0 means unlimited).
    max_connections_per_instance: int = 512
    # Request bodies held in memory at once, all requests together; beyond
    # it a request gets 503 with Retry-After (router.body.BodyBudget).
    max_buffered_bytes: int = 128 * 1024 * 1024
    # Seconds a client may take to send its request head, and may stay
    # silent while sending its body, before its connection is closed.
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    # Seconds an idle client connection (no request) stays open.
    idle_timeout: float = 60.0
    # Client connections open at once; more are closed at once (with one
    # log line a second). The open-file limit is raised to fit at start.
    max_client_connections: int = 10000


@dataclass(frozen=True, slots=True)
class InstanceConfig:
    name: str
    url: str
    max_sessions: int = 100
    weight: float = 1.0
    api_key: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class AdapterConfig:
    # One of: waha, blazz, wwebjs, evolution, generic.
    kind: str = "waha"
    options: Mapping[str, Any] = field(default_factory=dict)


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (for logs, reprs, summaries)."""
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return "<unparseable url>"
    if password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


@dataclass(frozen=True, slots=True)
class StoreConfig:
    # "memory" (embedded default) or a redis:// / rediss:// / unix:// URL.
    url: str = "memory"
    key_prefix: str = "wa-router:"

    @property
    def is_memory(self) -> bool:
        return self.url == "memory"

    def __repr__(self) -> str:
        # The URL may carry a Redis password: never show it.
        return f"StoreConfig(url={redact_url(self.url)!r}, key_prefix={self.key_prefix!r})"


@dataclass(frozen=True, slots=True)
class ListenConfig:
    host: str = "127.0.0.1"
    port: int = 8080


@dataclass(frozen=True, slots=True)
class HealthConfig:
    # A hung instance is down within about interval + fall x timeout (2 s),
    # sooner when requests to it are stalled too (router.health); a slow but
    # alive one still answers /health within the timeout.
    interval: float = 1.0
    timeout: float = 0.5
    rise: int = 2
    fall: int = 2


@dataclass(frozen=True, slots=True)
class OutlierConfig:
    """Passive health: eject an instance that fails live traffic."""

    # Consecutive connect failures, resets or 5xx answers that eject.
    consecutive_failures: int = 5
    # First ejection lasts this long; each repeated ejection multiplies it.
    base_ejection: float = 10.0
    max_ejection: float = 300.0
    # Never eject more than this share of the fleet (percent).
    max_ejected_percent: int = 50
    # A recovered instance takes new sessions at a rate ramping up over this
    # many seconds, so it is not flooded the moment it is back.
    slow_start: float = 30.0


@dataclass(frozen=True, slots=True)
class FailoverConfig:
    enabled: bool = True
    # Longest a request waits for its session to be recovered elsewhere.
    wait: float = 20.0
    # Longest to wait for a restored session to report ready.
    ready_timeout: float = 15.0
    # Expiry of the cross-replica restore lock (redis store).
    lock_ttl: float = 30.0
    # At most this share of requests in flight may be retries (0..1).
    retry_budget: float = 0.2
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
    interval: float = 30.0
    # Stop the extra copy of a session found running on two instances.
    stop_duplicates: bool = False
    # Sessions moved at once when draining an instance.
    migrate_concurrency: int = 4
    # Opt-in: move sessions when the load spread exceeds the threshold.
    rebalance: bool = False
    rebalance_threshold: float = 0.25


@dataclass(frozen=True, slots=True)
class IdempotencyConfig:
    # How long a response to an Idempotency-Key is remembered, seconds.
    window: float = 3600.0
    # Larger responses are not remembered (the key is released instead).
    max_body_bytes: int = 1024 * 1024


WEBHOOK_FORMATS: tuple[str, ...] = ("auto", "blazz", "waha", "raw")


@dataclass(frozen=True, slots=True)
class WebhookTarget:
    """Where events go (the main app), and which events go there."""

    url: str
    # Unique; stored with every queued event. Defaults to "target-<n>".
    name: str = "target-1"
    # fnmatch patterns of event types ("message*", "session.status"); empty = all.
    events: tuple[str, ...] = ()
    # Regex the session id must fully match; None = every session (and none).
    sessions: str | None = None
    # Key the router signs deliveries with (never logged).
    hmac_key: str | None = field(default=None, repr=False)
    # How deliveries are signed: auto (like the sending instance), blazz, waha, raw.
    format: str = "auto"


@dataclass(frozen=True, slots=True)
class WebhookIngest:
    # When a key applies to an instance, its events must carry a valid signature.
    blazz_hmac_key: str | None = field(default=None, repr=False)
    waha_hmac_key: str | None = field(default=None, repr=False)
    # Per-instance keys (instance name -> key), overriding the dialect's key.
    instance_keys: Mapping[str, str] = field(default_factory=dict, repr=False)
    # Seconds a signed timestamp may differ from our clock.
    max_age_skew: float = 300.0
    max_body_bytes: int = 8 * 1024 * 1024
    # Body bytes the ingest holds in memory at once, every request together
    # (counted as they arrive); beyond it a request gets 429 + Retry-After.
    max_buffered_bytes: int = 64 * 1024 * 1024
    # With a WAHA key: X-Webhook-Timestamp is required (401 without), so an
    # old signed event cannot be replayed forever. False accepts events without it.
    waha_require_timestamp: bool = True
    # Bytes of event bodies queued per target; an event that would exceed it
    # for a target is refused with 429 + Retry-After (the instance retries).
    max_queued_bytes: int = 256 * 1024 * 1024
    # Seconds an accepted event id is remembered per target: the same id again
    # (a replay, an instance's retry) is answered 200 and not queued twice.
    dedup_window: float = 600.0


@dataclass(frozen=True, slots=True)
class WebhookDelivery:
    # HTTP attempts in one delivery round (aiohttp-retry), and the first wait between them.
    attempts_per_round: int = 3
    round_backoff: float = 0.2
    # Durable retries between rounds: min(backoff_max, backoff_base * 2**(round-1)), jittered.
    backoff_base: float = 1.0
    backoff_max: float = 300.0
    # An event still undelivered this many seconds after it arrived is dead-lettered.
    max_age: float = 86400.0
    # Lanes (target x session) delivered at once by one router.
    concurrency: int = 64
    # Seconds for one HTTP attempt (connect + answer).
    timeout: float = 10.0
    # "session": events of one session arrive in order; "none": no ordering.
    ordering: str = "session"
    # Target answers that mean "this event will never be accepted": dead-letter at once.
    dead_letter_statuses: tuple[int, ...] = (400, 413, 415, 422)
    # Seconds a lane claimed by one router stays invisible to the others (redis).
    lease: float = 60.0

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
    sqlite_synchronous: str = "full"
    # Stable name of this replica in the redis consumer group; default host:port.
    consumer_name: str | None = None
    # Where Blazz instances' other calls to their LARAVEL_URL go (accounts,
    # chat sync): the main app's base URL. None: those calls get a 404.
    main_app_url: str | None = None
    # The router's URL as the main app reaches it, sent as X-Instance-Url with
    # Blazz events (Blazz's main app calls that URL for the session later).
    # None: the scheme and Host the instance used to reach the router.
    public_url: str | None = None


@dataclass(frozen=True, slots=True)
class RoutesConfig:
    """Which upstream paths clients may reach (glob patterns, ``*`` matches
    anything including ``/``, compared ignoring case as Express routes are).
    Empty ``allow``: every path not denied. Evaluated before anything else of
    a request; a refused path is a 403 ``route_denied``."""

    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()

    def permits(self, path: str) -> bool:
        if not self.allow and not self.deny:
            return True
        low = path.lower()
        if self.allow and not any(fnmatchcase(low, p) for p in self.allow):
            return False
        return not any(fnmatchcase(low, p) for p in self.deny)


@dataclass(frozen=True, slots=True)
class RouterConfig:
    instances: tuple[InstanceConfig, ...]
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
    admin_key: str | None = field(default=None, repr=False)
    # Keys clients (the main app) present to the router. Empty means the
    # router does not authenticate clients (only sensible on a private net).
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    # The durable webhook relay (router/webhooks); None = disabled.
    webhooks: WebhookConfig | None = None
    # Upstream paths clients may reach.
    routes: RoutesConfig = RoutesConfig()
    # Where this config came from, for error messages and reload.
    source: str | None = None

    def instance(self, name: str) -> InstanceConfig | None:
        for inst in self.instances:
            if inst.name == name:
                return inst
        return None

    @classmethod
    def load(cls, path: str) -> RouterConfig:
        """Parse, interpolate ``${ENV}`` and validate a YAML file.

        Raises ``ConfigError`` naming the file, line and reason.
        """
        from router.config_loader import load_file

        return load_file(path)


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
