"""Ingest: the endpoints instances call instead of the main app.

Paths (``POST`` only):

* ``/webhooks/blazz/{instance}``: Blazz ``whatsapp-service`` (set its
  ``LARAVEL_URL`` webhook URL to this). ``/webhooks/blazz`` without a name
  is accepted too: the sender is then found from ``X-Instance-Url``.
* ``/webhooks/waha/{instance}``: WAHA (a session's ``config.webhooks[].url``,
  or ``WHATSAPP_HOOK_URL``).

``{instance}`` is the instance's name in the router config: it identifies
the sender (unknown names get 404, so a typo shows up at once instead of as
wrong session hints).

Checks, in order, each failing with a JSON 4xx and nothing stored:

1. body size (``max_body_bytes``) -> 413;
2. signature, when a key applies to the instance (``instance_keys`` or the
   dialect's key): missing or bad -> 401, timestamp outside ``max_age_skew``
   -> 401;
3. JSON: not an object, or no string ``event`` -> 400.

Then the event is copied once per matching target and appended to the
queue; the 200 goes out only after the queue says the copies are durable.
A queue that cannot store (redis down, disk full) gives 503, and the
instance's own retry tries again. An event no target wants is answered 200
and counted (``outcome="unrouted"``), not stored.

Session-announcing events (Blazz ``session_ready``, or a status event with a
connected status; WAHA ``session.status`` with ``WORKING``) call the
relay's ``on_session_hint(session, instance)`` after the answer: a hint that
the session map checks before trusting it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from router.config import SESSION_ID_PATTERN, InstanceConfig, WebhookConfig
from router.errors import REQUEST_ID_HEADER, RouterError, error_response
from router.webhooks import metrics
from router.webhooks.delivery import TargetRouter
from router.webhooks.queue import Event, EventQueue, QueueUnavailable
from router.webhooks.signatures import SignatureError, verify_blazz, verify_waha

__all__ = ["DIALECTS", "Ingest", "SessionHint", "session_hint"]

log = logging.getLogger(__name__)

DIALECTS = ("blazz", "waha")
SessionHint = Callable[[str, str], Awaitable[None]]

_SESSION_RE = re.compile(SESSION_ID_PATTERN)
_EVENT_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")
_BLAZZ_READY_EVENTS = frozenset({"session_ready", "session.ready"})
_BLAZZ_STATUS_EVENTS = frozenset(
    {"session.status", "session_status", "session_status_changed", "status"}
)
_BLAZZ_CONNECTED = frozenset({"connected", "ready"})
_BLAZZ_QR_EVENTS = frozenset({"qr_code_generated"})


def new_event_id() -> str:
    """``evt_`` + 12 hex digits of milliseconds + 16 random: unique, roughly time-ordered."""
    return f"evt_{int(time.time() * 1000):012x}{secrets.token_hex(8)}"


def _url_key(url: str) -> str | None:
    try:
        parts = urlsplit(url.strip())
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return None
    if not parts.hostname:
        return None
    return f"{parts.hostname.lower()}:{port}"


def extract(dialect: str, doc: Mapping[str, Any]) -> tuple[str, str | None, str | None]:
    """``(event type, session id or None, instance-given event id or None)``."""
    event = doc.get("event")
    if not isinstance(event, str) or not event or len(event) > 200:
        raise RouterError(400, "malformed_event", "the body has no string 'event' field")
    session: Any = None
    given_id: str | None = None
    if dialect == "waha":
        session = doc.get("session")
        eid = doc.get("id")
        if isinstance(eid, str) and _EVENT_ID_RE.fullmatch(eid):
            given_id = eid
    else:
        data = doc.get("data")
        if isinstance(data, Mapping):
            session = data.get("session_id")
        if session is None:
            session = doc.get("session_id")
    if not isinstance(session, str) or not session or len(session) > 256:
        session = None
    return event, session, given_id


def asks_for_qr(dialect: str, event: str, session: str | None, doc: Mapping[str, Any]) -> bool:
    """Does this event say ``session`` needs a new QR scan (its login is gone)?
    (Blazz reports ``qr_scanning`` both while restoring and when waiting for a
    scan; only its QR events tell the two apart.)"""
    if session is None or not _SESSION_RE.fullmatch(session):
        return False
    if dialect == "waha":
        payload = doc.get("payload")
        status = payload.get("status") if isinstance(payload, Mapping) else None
        return event == "session.status" and status == "SCAN_QR_CODE"
    return event in _BLAZZ_QR_EVENTS


def session_hint(dialect: str, event: str, session: str | None, doc: Mapping[str, Any]) -> bool:
    """Does this event announce that ``session`` now runs on the sending instance?"""
    if session is None or not _SESSION_RE.fullmatch(session):
        return False
    if dialect == "waha":
        payload = doc.get("payload")
        status = payload.get("status") if isinstance(payload, Mapping) else None
        return event == "session.status" and status == "WORKING"
    if event in _BLAZZ_READY_EVENTS:
        return True
    if event in _BLAZZ_STATUS_EVENTS:
        data = doc.get("data")
        status = data.get("status") if isinstance(data, Mapping) else None
        return isinstance(status, str) and status.lower() in _BLAZZ_CONNECTED
    return False


class Ingest:
    def __init__(
        self,
        cfg: WebhookConfig,
        instances: tuple[InstanceConfig, ...],
        queue: EventQueue,
        *,
        ordering: str = "session",
        on_session_hint: SessionHint | None = None,
        on_qr: Callable[[str, str], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.cfg = cfg
        self.queue = queue
        self.router = TargetRouter(cfg.targets)
        self.instances: dict[str, InstanceConfig] = {}
        self._by_url: dict[str, str] = {}
        self.set_instances(instances)
        self.ordering = ordering
        self.on_session_hint = on_session_hint
        # (session, instance): the instance asks for a QR for it (router.readiness).
        self.on_qr = on_qr
        self._clock = clock
        self._hint_tasks: set[asyncio.Task[None]] = set()

    def set_instances(self, instances: tuple[InstanceConfig, ...]) -> None:
        """The instances allowed to send (swapped whole: a request sees old or new)."""
        self.instances = {i.name: i for i in instances}
        self._by_url = {k: i.name for i in instances if (k := _url_key(i.url)) is not None}

    def key_for(self, dialect: str, instance: str) -> str | None:
        ing = self.cfg.ingest
        key = ing.instance_keys.get(instance)
        if key is not None:
            return key
        return ing.blazz_hmac_key if dialect == "blazz" else ing.waha_hmac_key

    async def handle(self, request: web.BaseRequest, dialect: str, name: str) -> web.Response:
        request_id = request.headers.get(REQUEST_ID_HEADER) or uuid.uuid4().hex
        started = time.perf_counter()
        try:
            body = await self._accept(request, dialect, name)
        except RouterError as exc:
            return error_response(exc, request_id)
        metrics.INGEST_SECONDS.observe(time.perf_counter() - started)
        return web.Response(
            body=body, content_type="application/json", headers={REQUEST_ID_HEADER: request_id}
        )

    async def _accept(self, request: web.BaseRequest, dialect: str, name: str) -> bytes:
        if request.method != "POST":
            raise RouterError(
                405, "method_not_allowed", "webhooks are POSTed", headers={"Allow": "POST"}
            )
        instance = self._instance(request, dialect, name)
        raw = await self._read(request, dialect)
        key = self.key_for(dialect, instance)
        if key is not None:
            verify = verify_blazz if dialect == "blazz" else verify_waha
            try:
                verify(
                    key,
                    request.headers,
                    raw,
                    now=self._clock(),
                    skew=self.cfg.ingest.max_age_skew,
                )
            except SignatureError as exc:
                stale = "old" in str(exc) or "future" in str(exc)
                metrics.RECEIVED.labels(dialect, "stale" if stale else "bad_signature").inc()
                log.warning(
                    "webhook from %s (%s) refused: %s", instance, request.remote or "?", exc
                )
                raise RouterError(401, "bad_signature", str(exc)) from None
        try:
            doc = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            metrics.RECEIVED.labels(dialect, "malformed").inc()
            raise RouterError(400, "malformed_json", "the body is not valid JSON") from None
        if not isinstance(doc, dict):
            metrics.RECEIVED.labels(dialect, "malformed").inc()
            raise RouterError(400, "malformed_event", "the body must be a JSON object")
        try:
            event_type, session, given_id = extract(dialect, doc)
        except RouterError:
            metrics.RECEIVED.labels(dialect, "malformed").inc()
            raise

        event_id = given_id or new_event_id()
        targets = self.router.route(event_type, session)
        now = self._clock()
        # Blazz's main app keeps X-Instance-Url (on session_ready) and calls
        # that URL for the session afterwards: it must be the router's, or
        # the main app bypasses it (and the URL Blazz sends is always
        # http://localhost:PORT, useless to tell instances apart anyway).
        iurl = self._router_url(request) if dialect == "blazz" else None
        events = [
            Event(
                id=event_id,
                target=t.name,
                lane=self._lane(t.name, session, event_id),
                instance=instance,
                dialect=dialect,
                type=event_type,
                session=session,
                received=now,
                body=raw,
                instance_url=iurl[:500] if iurl else None,
            )
            for t in targets
        ]
        if events:
            try:
                await self.queue.append(events)
            except QueueUnavailable as exc:
                metrics.RECEIVED.labels(dialect, "unavailable").inc()
                log.error("webhook from %s not stored: %s", instance, exc)
                raise RouterError(
                    503,
                    "queue_unavailable",
                    "the event could not be stored; retry",
                    headers={"Retry-After": "1"},
                ) from None
            metrics.RECEIVED.labels(dialect, "queued").inc()
        else:
            metrics.RECEIVED.labels(dialect, "unrouted").inc()

        if self.on_session_hint is not None and session_hint(dialect, event_type, session, doc):
            assert session is not None
            self._hint(session, instance)
        if self.on_qr is not None and asks_for_qr(dialect, event_type, session, doc):
            assert session is not None
            self.on_qr(session, instance)
        answer: dict[str, Any] = {
            "status": "queued" if events else "unrouted",
            "id": event_id,
            "targets": [t.name for t in targets],
        }
        return json.dumps(answer).encode()

    def _router_url(self, request: web.BaseRequest) -> str:
        if self.cfg.public_url:
            return self.cfg.public_url
        return f"{request.scheme}://{request.host}"

    def _lane(self, target: str, session: str | None, event_id: str) -> str:
        if self.ordering == "none":
            return f"{target}#{event_id}"
        return f"{target}|{session or ''}"

    def _instance(self, request: web.BaseRequest, dialect: str, name: str) -> str:
        if name:
            if name not in self.instances:
                metrics.RECEIVED.labels(dialect, "unknown_instance").inc()
                raise RouterError(
                    404,
                    "unknown_instance",
                    f"no instance named {name[:64]!r} in the router config;"
                    " the path is /webhooks/<dialect>/<instance name>",
                )
            return name
        url = request.headers.get("X-Instance-Url")
        found = self._by_url.get(_url_key(url) or "") if url else None
        if found is None:
            metrics.RECEIVED.labels(dialect, "unknown_instance").inc()
            raise RouterError(
                404,
                "unknown_instance",
                "cannot tell which instance sent this: call /webhooks/"
                f"{dialect}/<instance name>"
                + (" (X-Instance-Url matches no configured instance)" if url else ""),
            )
        return found

    async def _read(self, request: web.BaseRequest, dialect: str) -> bytes:
        limit = self.cfg.ingest.max_body_bytes
        declared = request.content_length
        if declared is not None and declared > limit:
            metrics.RECEIVED.labels(dialect, "too_large").inc()
            raise RouterError(
                413, "body_too_large", f"webhook body of {declared} bytes exceeds {limit}"
            )
        chunks: list[bytes] = []
        size = 0
        while True:
            chunk = await request.content.read(65536)
            if not chunk:
                break
            size += len(chunk)
            if size > limit:
                metrics.RECEIVED.labels(dialect, "too_large").inc()
                raise RouterError(413, "body_too_large", f"webhook body exceeds {limit} bytes")
            chunks.append(chunk)
        if not chunks:
            metrics.RECEIVED.labels(dialect, "malformed").inc()
            raise RouterError(400, "empty_body", "the webhook body is empty")
        return b"".join(chunks)

    def _hint(self, session: str, instance: str) -> None:
        cb = self.on_session_hint
        assert cb is not None

        async def run() -> None:
            try:
                await cb(session, instance)
            except Exception:
                log.exception("session hint (%s on %s) failed", session, instance)

        task = asyncio.create_task(run())
        self._hint_tasks.add(task)
        task.add_done_callback(self._hint_tasks.discard)

    async def close(self) -> None:
        tasks = list(self._hint_tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
