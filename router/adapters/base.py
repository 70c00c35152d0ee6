"""The one narrow interface between the router and an upstream WhatsApp API.

Everything that differs between WAHA, Blazz, wwebjs-api, Evolution and a
YAML-described API lives behind ``Adapter``. The proxy, placement, failover
and discovery code never test which API they talk to.

An adapter answers five questions (see ``shared/upstreams.md``):

1. where is the session id in a request        -> ``needs_body`` / ``extract``
2. which sessions run on an instance           -> ``list_sessions``
3. does this one session run on an instance    -> ``probe``
4. start / restore a session on an instance    -> ``start``
   (and stop it, keeping its login, to move it) -> ``stop``
5. auth and health                             -> ``client_key`` / ``apply_credential`` / ``health``

plus two answers about responses: ``session_missing`` (the instance says the
session is not here, which triggers recovery) and ``created_session`` (learn
the name of a session the upstream invented on create).
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import aiohttp
from multidict import CIMultiDict, MultiDict

from router.config import SESSION_ID_PATTERN, InstanceConfig

_SESSION_RE = re.compile(SESSION_ID_PATTERN)
_UNWELL = frozenset({502, 503, 504})


class ListFailed(Exception):
    """``list_sessions(..., strict=True)``: the instance answered, but not with a list.

    Rediscovery must tell "runs nothing" from "could not say" (an error
    status, a wrong key, an unexpected body, no list call configured): only
    the first may ever make it forget a session.
    """

    def __init__(self, instance: str, detail: str) -> None:
        self.instance = instance
        self.detail = detail
        super().__init__(f"{instance}: cannot list sessions: {detail}")


class HeldElsewhere(Exception):
    """``start``: the session's auth storage is locked by another process (a
    browser that outlived its crashed instance still holds the profile). Not a
    refusal: the lock goes when that browser dies, so the start is retried."""

    def __init__(self, instance: str, detail: str) -> None:
        self.instance = instance
        self.detail = detail
        super().__init__(f"{instance}: session storage held elsewhere: {detail}")


class BadSessionId(ValueError):
    """The request names a session id outside ``SESSION_ID_PATTERN`` (-> 400)."""

    def __init__(self, value: str, reason: str | None = None) -> None:
        self.value = value
        super().__init__(reason or f"invalid session id {value[:64]!r}")


def valid_session_id(value: object) -> str:
    """Return ``value`` if it is a well-formed session id, else raise ``BadSessionId``."""
    if isinstance(value, str) and _SESSION_RE.fullmatch(value):
        return value
    raise BadSessionId(str(value))


@dataclass(frozen=True, slots=True)
class Send:
    """A request that sends WhatsApp messages, as ``router.pacing`` paces it.

    ``recipients`` are as the request names them (a phone number, a chat id);
    empty when the request names none the router can read. ``messages`` is
    how many messages the one request sends (a bulk send: one per
    recipient), ``spacing`` the seconds the upstream itself waits between
    them (Blazz's bulk-send pauses 1 s after each recipient).
    """

    recipients: tuple[str, ...] = ()
    messages: int = 1
    spacing: float = 0.0


def recipient_of(value: object) -> tuple[str, ...]:
    """A recipient field's value as ``Send.recipients`` (a string or a number; else none)."""
    if isinstance(value, str) and value:
        return (value,)
    if isinstance(value, int) and not isinstance(value, bool):
        return (str(value),)
    return ()


def bulk_send(listed: object, spacing: float = 0.0) -> Send:
    """A bulk send over ``listed`` (a list, else none): one message per entry."""
    items = listed if isinstance(listed, list) else []
    recipients = tuple(r for item in items for r in recipient_of(item))
    return Send(recipients, messages=max(1, len(items)), spacing=spacing)


@dataclass(slots=True)
class UpstreamRequest:
    """A request on its way upstream, as the adapter may read and rewrite it.

    ``json`` is the parsed body, present only when the adapter asked for the
    body (``needs_body``) and it was a JSON object. When an adapter changes
    ``json`` it sets ``json_dirty`` so the proxy re-serialises the body.
    """

    method: str
    path: str
    query: MultiDict[str]
    headers: CIMultiDict[str]
    json: dict[str, Any] | None = None
    json_dirty: bool = False
    # The credential the client presented (read before apply_credential
    # replaces it); scopes Idempotency-Keys per client.
    client_key: str | None = None
    # The client sent a body (bytes), whether or not it parsed as JSON.
    has_body: bool = False


@dataclass(frozen=True, slots=True)
class Extraction:
    """Where a request goes.

    ``session`` is None for requests that are about no single session (list
    all sessions, server status, ...); ``fanout`` marks those that should
    reach every instance (WAHA ``/ws?session=*``); ``create`` marks a
    create-session call that may be placed on a new instance.
    """

    session: str | None
    create: bool = False
    fanout: bool = False


class SessionStatus(StrEnum):
    STARTING = "starting"
    READY = "ready"  # connected / WORKING: can send
    NEEDS_AUTH = "needs_auth"  # QR / pairing: runs here but not logged in
    STOPPED = "stopped"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """One session as an instance reports it.

    ``extra`` keeps what ``start`` needs to restore the session elsewhere
    (Blazz: ``workspace_id``).
    """

    session: str
    status: SessionStatus
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class HealthReport:
    healthy: bool
    sessions: int | None = None  # as the instance counts them, when it says
    detail: str = ""
    connected: int | None = None  # of those, logged in and able to send


@dataclass(frozen=True, slots=True)
class InstanceHealth:
    """One instance as the router sees it, for fleet-wide health answers."""

    name: str
    healthy: bool
    report: HealthReport | None  # the last active check's answer, if any


@dataclass(frozen=True, slots=True)
class Answer:
    """An answer the router gives itself, in the upstream API's own shape."""

    status: int
    body: Mapping[str, Any] | list[Any]


@dataclass(frozen=True, slots=True)
class ListShape:
    """Where the sessions are in an answer to one of the API's list calls, so
    that the router can ask every instance and merge their answers into one
    in the API's own shape (router.listings).

    The merged answer is the first answering instance's, with the sessions
    of all of them at ``field`` (and ``total``, when named, counting them).
    """

    #: the session name of one list item (None: it names none the router reads)
    name: Callable[[Any], str | None]
    #: dotted paths to the array (or ``{id: ...}`` mapping), tried in order;
    #: "" is the answer itself
    fields: tuple[str, ...] = ("",)
    #: a field beside the array that counts it (Blazz ``total``)
    total: str | None = None
    #: the sessions may come as a mapping keyed by session id (generic)
    keyed: bool = False


class Adapter(ABC):
    """Base class of every upstream API adapter.

    ``options`` come from the ``adapter.options`` mapping in the YAML config.
    Network methods receive the pooled ``aiohttp.ClientSession`` of the
    instance and its config; they must not raise on an upstream error answer
    (return the negative result instead) but may let ``aiohttp.ClientError``
    and ``TimeoutError`` through for unreachable instances.
    """

    name: str = "base"

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        self.options: Mapping[str, Any] = dict(options or {})

    # -- 1. where the session id is ------------------------------------------
    @abstractmethod
    def needs_body(self, method: str, path: str) -> bool:
        """True when ``extract`` or credentials need the parsed JSON body.

        Called on the hot path: keep it to string tests, no allocation.
        """

    #: The upstream also parses ``application/x-www-form-urlencoded`` bodies
    #: (Blazz: ``express.urlencoded()``): the router reads them the same way.
    reads_forms: bool = False

    def key_in_body(self, method: str, path: str) -> bool:
        """True when this request's credential is in its body (Blazz POST / PUT
        / DELETE), so it cannot be checked before the body is read. Default:
        it is in a header or the query, checked before a byte of body is read."""
        return False

    @abstractmethod
    def extract(self, req: UpstreamRequest) -> Extraction:
        """Find the session of a request. Raise ``BadSessionId`` on a malformed id."""

    # -- sends (router.pacing) -------------------------------------------------------
    def send_of(self, req: UpstreamRequest) -> Send | None:
        """The messages this request sends to WhatsApp contacts, or None when
        it sends none (reads, session management, typing, read receipts).
        Only sends are paced; called only while pacing is enabled, before
        ``apply_credential``, on the body ``needs_body`` had parsed. Keep
        the "is it a send" test to string tests. Default: nothing is a send."""
        return None

    def recipient_in_body(self, method: str, path: str) -> bool:
        """True when this is a send whose recipient is in a body that
        ``needs_body`` does not ask for (the session is in the path): the
        proxy then reads and parses it, but only while pacing counts
        recipients, so that otherwise such bodies still stream untouched.
        Called on the hot path then: string tests only. Default: False."""
        return False

    # -- 2. / 3. / 4. sessions on an instance ----------------------------------
    @abstractmethod
    async def list_sessions(
        self, http: aiohttp.ClientSession, inst: InstanceConfig, *, strict: bool = False
    ) -> list[SessionInfo]:
        """Every session the instance runs now (rediscovery).

        An error answer gives ``[]``, unless ``strict``: then it raises
        ``ListFailed`` (discovery must not mistake it for an empty instance).
        """

    @abstractmethod
    async def probe(
        self, http: aiohttp.ClientSession, inst: InstanceConfig, session: str
    ) -> SessionInfo | None:
        """The session on this instance, or None when it does not run there."""

    @abstractmethod
    async def start(
        self,
        http: aiohttp.ClientSession,
        inst: InstanceConfig,
        session: str,
        info: SessionInfo | None = None,
    ) -> bool:
        """Start or restore ``session`` on ``inst`` from shared auth storage.

        Returns True when the instance accepted the start (it may still be
        STARTING). ``info`` is what another instance last reported of it.
        """

    #: False when the API has no stop that keeps the login (``stop`` always
    #: refuses): such sessions cannot be moved, and a copy left running on an
    #: instance that comes back cannot be fenced off.
    can_stop: bool = True

    @abstractmethod
    async def stop(self, http: aiohttp.ClientSession, inst: InstanceConfig, session: str) -> bool:
        """Stop ``session`` on ``inst`` *keeping its login* (auth files), so that
        another instance can start it (migration, duplicate clean-up).

        True when the session no longer runs there afterwards (stopped now, or
        it was not running there). False when the instance refused, or when
        the API has no stop that keeps the login: never log a session out.
        """

    # -- 5. auth and health ----------------------------------------------------
    @abstractmethod
    def client_key(self, req: UpstreamRequest) -> str | None:
        """The credential the client sent, in this API's usual place."""

    @abstractmethod
    def apply_credential(self, req: UpstreamRequest, inst: InstanceConfig) -> None:
        """Remove the client's credential and insert ``inst.api_key``.

        Clients never learn instance keys; instances never see router keys.
        """

    @abstractmethod
    async def health(self, http: aiohttp.ClientSession, inst: InstanceConfig) -> HealthReport:
        """Ask the instance whether it is healthy."""

    # -- answers ------------------------------------------------------------------
    @abstractmethod
    def session_missing(self, status: int, body: bytes) -> bool:
        """True when an upstream answer means "this session does not run here"."""

    def request_timeout(self, method: str, path: str) -> float | None:
        """Seconds to wait for this request's answer when the upstream itself
        allows it longer than ``timeouts.read`` (None: the configured one)."""
        return None

    def create_answer(self, session: str, info: SessionInfo | None) -> Answer | None:
        """The answer to a create for a session that already runs (``info``:
        its state on its owner, when known), or None to forward the create to
        that owner. An API whose second create harms the running session
        (Blazz) answers here; one that answers "already exists" itself
        (WAHA's 422) forwards."""
        return None

    #: True when STOPPED in this API's listings means "stopped on purpose"
    #: (WAHA keeps a stopped session until it is started again), so that
    #: discovery may take it as removed (router.removals). False where STOPPED
    #: also covers a dropped connection that the upstream will retry.
    stopped_is_removed: bool = False

    def needs_ready(self, req: UpstreamRequest) -> bool:
        """True when this request needs its session logged in (a send, a chat
        read): such requests wait for a copy the router is starting. Session
        management (status, QR, delete) goes through at once: a client must
        be able to fetch the QR of a session that asks for one. Default: all."""
        return True

    def removes(self, req: UpstreamRequest) -> bool:
        """True when this request, answered 2xx, removes its session on purpose
        (delete, stop, logout): the router then never brings it back until it
        is created again. Default: none."""
        return False

    def create_notes(self, req: UpstreamRequest) -> Mapping[str, Any]:
        """What to remember from a create request for later restores
        (``SessionInfo.extra``), when the upstream's own listings lose it."""
        return {}

    #: Unauthenticated health routes of this API (GET), which the router
    #: answers itself for the whole fleet (``health_answer``): a client that
    #: calls them without a key must not get a 401, nor one instance's view.
    health_paths: frozenset[str] = frozenset()

    def health_answer(self, path: str, fleet: list[InstanceHealth]) -> Answer:
        """The router's answer to ``path``, one of ``health_paths``."""
        raise NotImplementedError

    def unwell(self, status: int) -> bool:
        """True when an answer says the *instance* is unwell, so it counts
        toward passive outlier ejection. An application's 500 for one session
        (a failed send, a failed create) does not: the instance is alive and
        ejecting it would move healthy sessions. Default: 502, 503, 504."""
        return status in _UNWELL

    def created_session(self, status: int, body: bytes) -> str | None:
        """Name of the session a successful create call made, when the
        request did not name it (WAHA invents names). Default: unknown."""
        return None

    def auth_headers(self, inst: InstanceConfig) -> dict[str, str]:
        """Headers for the router's own management calls (list, probe, start, health)."""
        return {}

    # -- listings -------------------------------------------------------------------
    def list_shape(self, req: UpstreamRequest) -> ListShape | None:
        """The shape of the answer when ``req`` (about no session) is one of
        the API's list calls, which the router answers from every instance
        (router.listings); None for any other request. Default: none."""
        return None
