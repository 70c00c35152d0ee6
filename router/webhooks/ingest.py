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

1. signature headers, when a key applies to the instance (``instance_keys``
   or the dialect's key), **before a byte of the body is read**: missing or
   malformed (Blazz ``X-HMAC-Signature`` not 64 hex digits or ``X-Timestamp``
   not digits; WAHA ``X-Webhook-Hmac`` not 128 hex digits, or no
   ``X-Webhook-Timestamp`` while ``waha_require_timestamp``) -> 401;
2. body size (``max_body_bytes``, declared or as read, and once decoded) -> 413;
3. memory: every body byte the ingest holds counts, as it arrives, against
   ``max_buffered_bytes`` (all requests together) until its request is
   answered -> 429 beyond it (at once when the declared length cannot fit);
   no byte for ``body_timeout`` seconds -> 408;
4. ``Content-Encoding`` gzip / deflate is decoded here (the server does not
   decompress: router/connections.py), bounded by ``max_body_bytes``;
   garbage -> 400, another encoding -> 415;
5. signature: bad -> 401, timestamp outside ``max_age_skew`` -> 401;
6. JSON: not an object, or no string ``event`` -> 400.

Event ids: WAHA's own ``id`` when it sent one; otherwise (every Blazz event)
``evt_`` + 24 hex digits of sha256(instance name, NUL, body): the same event
sent again (a replay, or an instance's retry: Blazz signs each retry with a
new ``X-Timestamp``, so the timestamp is not part of it) has the same id.

Then the event is copied once per matching target and appended to the
queue; the 200 goes out only after the queue says the copies are durable.
A target that already has the event's id (within ``dedup_window``) is not
given a second copy; when every target has it the answer is 200
``"status": "duplicate"`` with the same id. A target whose queue would
exceed ``max_queued_bytes`` gets no copy and the answer is 429 with
``Retry-After`` (the other targets' copies are stored: the retry is a
duplicate for them). A queue that cannot store (redis down, disk full)
gives 503, and the instance's own retry tries again. An event no target
wants is answered 200 and counted (``outcome="unrouted"``), not stored.

Nothing here logs a header value or a body (keys and messages live there).

Session-announcing events (Blazz ``session_ready``, or a status event with a
connected status; WAHA ``session.status`` with ``WORKING``) call the
relay's ``on_session_hint(session, instance)`` after the answer: a hint that
the session map checks before trusting it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from router.body import BodyBudget, ClientGone, chunks_of, decode
from router.config import SESSION_ID_PATTERN, InstanceConfig, WebhookConfig
from router.errors import REQUEST_ID_HEADER, RouterError, error_response, request_id_of
from router.webhooks import metrics
from router.webhooks.delivery import TargetRouter
from router.webhooks.queue import Appended, Event, EventQueue, QueueUnavailable
from router.webhooks.signatures import (
    SignatureError,
    StaleTimestamp,
    check_headers,
    verify_blazz,
    verify_waha,
)

__all__ = ["DIALECTS", "Ingest", "SessionHint", "event_id_for", "session_hint"]

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


# 429, not 503, when the router cannot take an event now: Blazz's
# webhookNotifier retries 429 (after 1, 2, 4 s) and network errors only, and
# drops an event answered 503 at once; WAHA retries both. Seconds:
BUSY_RETRY_AFTER = 1  # the ingest's memory is full: frees as requests finish
FULL_RETRY_AFTER = 5  # a target's queue is full: frees at delivery speed
# Seconds between two log lines about full queues or a full ingest.
_LOG_EVERY = 30.0


def event_id_for(instance: str, body: bytes) -> str:
    """``evt_`` + 24 hex digits of sha256(instance, NUL, body): the same for the
    same event sent again, whatever its signature or timestamp headers."""
    digest = hashlib.sha256(instance.encode() + b"\0" + body).hexdigest()
    return f"evt_{digest[:24]}"


class _Held:
    """The body bytes one request holds from the ingest's budget (given back at its end)."""

    __slots__ = ("budget", "dialect", "n")

    def __init__(self, budget: BodyBudget, dialect: str) -> None:
        self.budget = budget
        self.dialect = dialect
        self.n = 0

    def check(self, n: int) -> None:
        """429 unless ``n`` more bytes fit in the budget now (nothing is taken)."""
        if not self.budget.fits(n):
            metrics.RECEIVED.labels(self.dialect, "busy").inc()
            raise RouterError(
                429,
                "ingest_busy",
                "the router holds too many webhook bodies right now; retry shortly",
                headers={"Retry-After": str(BUSY_RETRY_AFTER)},
            )

    def take(self, n: int) -> None:
        self.check(n)
        self.budget.take(n)
        self.n += n

    def give_back(self, n: int) -> None:
        n = min(n, self.n)
        self.budget.give_back(n)
        self.n -= n

    def release(self) -> None:
        self.give_back(self.n)


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
        body_timeout: float = 30.0,
    ) -> None:
        self.cfg = cfg
        # Seconds a body may go without a byte (the router's limits.body_timeout).
        self.body_timeout = body_timeout
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
        # Bytes of request bodies held at once, all requests together.
        self.budget = BodyBudget(cfg.ingest.max_buffered_bytes)
        self._logged: dict[str, float] = {}

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
        request_id = request_id_of(request)
        started = time.perf_counter()
        held = _Held(self.budget, dialect)
        try:
            body = await self._accept(request, dialect, name, held)
        except RouterError as exc:
            return error_response(exc, request_id)
        finally:
            held.release()
        metrics.INGEST_SECONDS.observe(time.perf_counter() - started)
        return web.Response(
            body=body, content_type="application/json", headers={REQUEST_ID_HEADER: request_id}
        )

    def _log_sometimes(self, what: str, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._logged.get(what, -_LOG_EVERY) >= _LOG_EVERY:
            self._logged[what] = now
            log.warning(msg, *args)

    def _refuse(
        self, request: web.BaseRequest, dialect: str, instance: str, exc: SignatureError
    ) -> RouterError:
        stale = isinstance(exc, StaleTimestamp)
        metrics.RECEIVED.labels(dialect, "stale" if stale else "bad_signature").inc()
        # The reason names a header and a rule, never its value. A flood of
        # them is counted (wa_router_webhook_received_total), not logged.
        self._log_sometimes(
            f"refused:{instance}",
            "webhook from %s (%s) refused: %s (more refusals from it are counted, not"
            " logged, for %g s)",
            instance,
            request.remote or "?",
            exc,
            _LOG_EVERY,
        )
        return RouterError(401, "bad_signature", str(exc))

    async def _accept(
        self, request: web.BaseRequest, dialect: str, name: str, held: _Held
    ) -> bytes:
        if request.method != "POST":
            raise RouterError(
                405, "method_not_allowed", "webhooks are POSTed", headers={"Allow": "POST"}
            )
        instance = self._instance(request, dialect, name)
        ing = self.cfg.ingest
        key = self.key_for(dialect, instance)
        if key is not None:
            # Before the body: an unsigned flood costs headers, not memory.
            try:
                check_headers(
                    dialect, request.headers, require_timestamp=ing.waha_require_timestamp
                )
            except SignatureError as exc:
                raise self._refuse(request, dialect, instance, exc) from None
        raw = await self._read(request, dialect, held)
        if key is not None:
            try:
                if dialect == "blazz":
                    verify_blazz(
                        key, request.headers, raw, now=self._clock(), skew=ing.max_age_skew
                    )
                else:
                    verify_waha(
                        key,
                        request.headers,
                        raw,
                        now=self._clock(),
                        skew=ing.max_age_skew,
                        require_timestamp=ing.waha_require_timestamp,
                    )
            except SignatureError as exc:
                raise self._refuse(request, dialect, instance, exc) from None
        try:
            doc = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError):
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

        event_id = given_id or event_id_for(instance, raw)
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
        result = Appended()
        if events:
            try:
                result = await self.queue.append(
                    events, dedup_window=ing.dedup_window, max_bytes=ing.max_queued_bytes
                )
            except QueueUnavailable as exc:
                metrics.RECEIVED.labels(dialect, "unavailable").inc()
                log.error("webhook from %s not stored: %s", instance, exc)
                raise RouterError(
                    503,
                    "queue_unavailable",
                    "the event could not be stored; retry",
                    headers={"Retry-After": "1"},
                ) from None
            if result.full:
                metrics.RECEIVED.labels(dialect, "queue_full").inc()
                full = ", ".join(sorted(set(result.full)))
                self._log_sometimes(
                    "full",
                    "webhooks refused (429): the queue of target(s) %s holds"
                    " webhooks.ingest.max_queued_bytes (%d); more of these are not logged"
                    " for %g s",
                    full,
                    ing.max_queued_bytes,
                    _LOG_EVERY,
                )
                # The copies for the other targets are stored: the instance's
                # retry is a duplicate for them and fills only the full ones.
                raise RouterError(
                    429,
                    "queue_full",
                    f"the webhook queue of target(s) {full} is full; retry later",
                    headers={"Retry-After": str(FULL_RETRY_AFTER)},
                )
            metrics.RECEIVED.labels(dialect, "queued" if result.stored else "duplicate").inc()
        else:
            metrics.RECEIVED.labels(dialect, "unrouted").inc()

        # A duplicate taught nothing new: its first copy ran the hints.
        if result.stored or not events:
            if self.on_session_hint is not None and session_hint(dialect, event_type, session, doc):
                assert session is not None
                self._hint(session, instance)
            if self.on_qr is not None and asks_for_qr(dialect, event_type, session, doc):
                assert session is not None
                self.on_qr(session, instance)
        status = "unrouted"
        if events:
            status = "queued" if result.stored else "duplicate"
        answer: dict[str, Any] = {
            "status": status,
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

    async def _read(self, request: web.BaseRequest, dialect: str, held: _Held) -> bytes:
        """The body, decoded, within ``max_body_bytes``; every byte held counts in ``held``.

        Bytes count as they arrive, not as declared: a sender that announces
        8 MB and trickles reserves nothing (a declared length that does not
        fit now is refused at once, though). No byte for ``body_timeout``
        seconds is a 408.
        """
        limit = self.cfg.ingest.max_body_bytes
        declared = request.content_length
        if declared is not None and declared > limit:
            metrics.RECEIVED.labels(dialect, "too_large").inc()
            raise RouterError(
                413, "body_too_large", f"webhook body of {declared} bytes exceeds {limit}"
            )
        if declared:
            held.check(declared)
        chunks: list[bytes] = []
        size = 0
        try:
            async for chunk in chunks_of(request, progress=self.body_timeout):
                size += len(chunk)
                if size > limit:
                    metrics.RECEIVED.labels(dialect, "too_large").inc()
                    raise RouterError(413, "body_too_large", f"webhook body exceeds {limit} bytes")
                held.take(len(chunk))
                chunks.append(chunk)
        except ClientGone:
            metrics.RECEIVED.labels(dialect, "malformed").inc()
            raise RouterError(
                400, "body_incomplete", "the connection ended before the body did"
            ) from None
        except RouterError as exc:
            if exc.status == 408:
                metrics.RECEIVED.labels(dialect, "slow").inc()
            elif exc.status == 400:
                metrics.RECEIVED.labels(dialect, "malformed").inc()
            raise
        raw = b"".join(chunks)
        del chunks
        encoding = request.headers.get("Content-Encoding", "").strip().lower()
        if encoding and encoding != "identity" and raw:
            try:
                plain = decode(raw, encoding, limit)
            except RouterError as exc:
                outcome = "too_large" if exc.status == 413 else "malformed"
                metrics.RECEIVED.labels(dialect, outcome).inc()
                raise
            held.take(len(plain))
            held.give_back(len(raw))  # the compressed bytes are dropped now
            raw = plain
        if not raw:
            metrics.RECEIVED.labels(dialect, "malformed").inc()
            raise RouterError(400, "empty_body", "the webhook body is empty")
        return raw

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
