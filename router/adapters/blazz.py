"""Blazz ``whatsapp-service`` (Express + whatsapp-web.js).

Where the session is:

- ``POST /api/messages/send|send-media|bulk-send``: JSON ``session_id`` only
- ``POST /api/sessions``: a create, JSON ``session_id``
- ``/api/sessions/{id}[/...]`` and ``/api/messages/{id}/...``: path
- ``GET /api/sessions``: the list, no session
- any other ``/api/...`` route: JSON ``session_id``, else query ``session_id``

The credential is ``api_key``: each Blazz handler reads it from the JSON body
(POST, PUT, DELETE; ``express.json()`` parses a body only with
``Content-Type: application/json``) or from the query string (GET), never both
and never a header. The router takes the client's key from any of those
places (or ``X-Api-Key``) and puts the instance's key where that handler
reads it, creating a JSON body for a bodiless DELETE.

The real service's ``POST /api/sessions/{id}/restore`` is broken, so
``start`` re-creates the session with its ``workspace_id`` instead, and a
500 ``SingletonLock`` answer means a browser elsewhere still holds the
profile (``HeldElsewhere``). A second create for a running session makes
Blazz launch a second browser on the same profile, fail, and drop its own
record of the running one: the router answers such creates itself
(``create_answer``). ``/api/sessions*`` calls get Blazz's own 60 s budget.

Session states (``SessionStatus``), as ``SessionManager.js`` sets them:

| Blazz | router | meaning |
|---|---|---|
| ``qr_scanning`` | STARTING | browser up: restoring the login or awaiting a scan [1] |
| ``authenticated`` | STARTING | login accepted, not ready yet |
| ``connected`` | READY | the only state that can send |
| ``error`` | FAILED | ready but no phone number: final |
| ``disconnected`` | STOPPED | the client dropped (the service may reconnect it) |

[1] A ``qr_code_generated`` webhook says which: then NEEDS_AUTH.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Final

import aiohttp

from router.adapters._http import (
    BODY_METHODS,
    OPTIONS_WHERE,
    JsonAdapter,
    check_keys,
    checked_id,
    map_status,
    opt_timeout,
    parse_json,
)
from router.adapters.base import (
    Answer,
    BadSessionId,
    Extraction,
    HealthReport,
    HeldElsewhere,
    InstanceHealth,
    ListFailed,
    ListShape,
    Send,
    SessionInfo,
    SessionStatus,
    UpstreamRequest,
    bulk_send,
    recipient_of,
    valid_session_id,
)
from router.config import InstanceConfig

_NO_SESSION: Final = Extraction(None)
# /api/messages/{x}: these x are actions with the session in the body.
_BODY_ACTIONS: Final = frozenset({"send", "send-media", "bulk-send"})

# Seconds between the messages of one bulk-send, as router.pacing counts
# them: Blazz pauses 1 s after each recipient (MessageController.js) on top
# of the send itself. Counted later than they go, never earlier: that errs
# on the safe side of every window.
BULK_SEND_SPACING: Final = 1.5

_STATUSES: Final[Mapping[str, SessionStatus]] = {
    "connected": SessionStatus.READY,
    "ready": SessionStatus.READY,
    "authenticated": SessionStatus.STARTING,
    "initializing": SessionStatus.STARTING,
    # Both "restoring the stored login" and "waiting for a scan": only QR
    # webhooks tell them apart (router.readiness.Readiness.auth_needed).
    "qr_scanning": SessionStatus.STARTING,
    "disconnected": SessionStatus.STOPPED,
    "failed": SessionStatus.FAILED,
    "error": SessionStatus.FAILED,
}
# What ``SessionInfo.extra`` keeps from Blazz's session records.
_EXTRA_FIELDS: Final = ("workspace_id", "account_id", "phone_number", "priority", "status")
# What a create says that Blazz's own listings forget (restores need it).
_CREATE_NOTES: Final = ("workspace_id", "account_id", "priority")
# Blazz gives every /api/sessions* call 60 s (its timeout middleware); wait a
# little longer so that its own answer, not ours, ends the call.
DEFAULT_SESSIONS_TIMEOUT: Final = 65.0
# Unauthenticated in Blazz; the router answers them for the whole fleet.
_HEALTH_PATHS: Final = frozenset({"/health", "/health/ready", "/health/live"})
_STARTED_AT: Final = time.time()

_KEY: Final = "api_key"
_HEADER: Final = "X-Api-Key"
_FIELD: Final = "session_id"


def workspace_from_id(session: str) -> int | str | None:
    """``12`` from ``webjs_12_1700000000_ab12cd34``; None for other shapes.

    Numeric workspaces come back as ``int`` (Blazz's workspace ids are
    database ids and it sends them as JSON numbers).
    """
    parts = session.split("_")
    if len(parts) < 4 or parts[0] != "webjs" or not parts[1]:
        return None
    workspace = parts[1]
    return int(workspace) if workspace.isdigit() else workspace


class BlazzAdapter(JsonAdapter):
    """Blazz whatsapp-service. Options: ``timeout`` (seconds per management
    call), ``sessions_timeout`` (seconds for ``/api/sessions*`` calls, which
    start browsers: default 65, above Blazz's own 60)."""

    name = "blazz"

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(options)
        check_keys(OPTIONS_WHERE, self.options, self.COMMON_OPTIONS | {"sessions_timeout"})
        self.sessions_timeout = opt_timeout(
            OPTIONS_WHERE,
            {"timeout": self.options.get("sessions_timeout", DEFAULT_SESSIONS_TIMEOUT)},
        )

    # -- 1. where the session id is ------------------------------------------
    def needs_body(self, method: str, path: str) -> bool:
        # Every /api/* route checks api_key, which lives in the body of
        # POST / PUT / DELETE requests.
        return method in BODY_METHODS and path[:5].lower() == "/api/"

    reads_forms = True

    def key_in_body(self, method: str, path: str) -> bool:
        return self.needs_body(method, path)

    def extract(self, req: UpstreamRequest) -> Extraction:
        path = req.path
        if not path.startswith("/api/"):
            # Express routes ignore case: /API/Sessions/{id} reaches Blazz's
            # handlers too. The fixed parts only: ids keep their case.
            head = path[:15].lower()
            if not head.startswith("/api/"):
                return _NO_SESSION
            if head.startswith("/api/sessions"):
                path = "/api/sessions" + path[13:]
            elif head.startswith("/api/messages/"):
                path = "/api/messages/" + path[14:]
            else:
                path = "/api/" + path[5:]
        if path.startswith("/api/sessions"):
            rest = path[13:]
            if not rest or rest == "/":
                if req.method == "POST":
                    value = self._body_field(req)
                    if value is None:
                        # Blazz would start a session named "undefined", which a
                        # second such create elsewhere fights over: refused.
                        raise BadSessionId("", "a create needs a session_id in its JSON body")
                    return Extraction(valid_session_id(value), create=True)
                return _NO_SESSION
            if rest[0] == "/":
                slash = rest.find("/", 1)
                return self._ids.get(rest[1:] if slash < 0 else rest[1:slash])
            # "/api/sessionsX": some other route
        elif path.startswith("/api/messages/"):
            rest = path[14:]
            slash = rest.find("/")
            seg = rest if slash < 0 else rest[:slash]
            if seg.lower() not in _BODY_ACTIONS:
                if slash >= 0:
                    return self._ids.get(seg)
                # "/api/messages/{x}" alone is no documented route
                return self._fallback(req)
            value = self._body_field(req)
            return _NO_SESSION if value is None else self._ids.get(value)
        if path.startswith("/api/"):
            return self._fallback(req)
        return _NO_SESSION

    @staticmethod
    def _body_field(req: UpstreamRequest) -> object:
        body = req.json
        return body.get(_FIELD) if body is not None else None

    def _fallback(self, req: UpstreamRequest) -> Extraction:
        value = self._body_field(req)
        if value is None:
            value = req.query.get(_FIELD)
        return _NO_SESSION if value is None else self._ids.get(value)

    # -- sends (router.pacing) -------------------------------------------------------
    def send_of(self, req: UpstreamRequest) -> Send | None:
        # send / send-media: recipient_phone; bulk-send: one message per
        # entry of recipients, sent one after the other by Blazz.
        if req.method != "POST" or req.path[:14].lower() != "/api/messages/":
            return None
        action = req.path[14:].rstrip("/").lower()
        body = req.json or {}
        if action in ("send", "send-media"):
            return Send(recipient_of(body.get("recipient_phone")))
        if action == "bulk-send":
            return bulk_send(body.get("recipients"), BULK_SEND_SPACING)
        return None

    # -- 5. credentials ----------------------------------------------------------
    def client_key(self, req: UpstreamRequest) -> str | None:
        if req.json is not None:
            value = req.json.get(_KEY)
            if isinstance(value, str) and value:
                return value
        return req.query.get(_KEY) or req.headers.get(_HEADER)

    def apply_credential(self, req: UpstreamRequest, inst: InstanceConfig) -> None:
        req.headers.popall(_HEADER, None)
        if _KEY in req.query:
            req.query.popall(_KEY)
        body = req.json
        if body is None and req.method in BODY_METHODS and not req.has_body and inst.api_key:
            # Handlers of POST / PUT / DELETE read the key from the body only.
            body = req.json = {}
        if body is not None:
            if inst.api_key:
                body[_KEY] = inst.api_key
                req.json_dirty = True
            elif _KEY in body:
                del body[_KEY]
                req.json_dirty = True
        elif inst.api_key:
            req.query[_KEY] = inst.api_key

    def _key_params(self, inst: InstanceConfig) -> dict[str, str]:
        return {_KEY: inst.api_key} if inst.api_key else {}

    def needs_ready(self, req: UpstreamRequest) -> bool:
        # /api/messages/* sends and reads; /api/sessions/* is management.
        return req.path[:14].lower() == "/api/messages/"

    def removes(self, req: UpstreamRequest) -> bool:
        # DELETE /api/sessions/{id}: disconnects it (the login stays on disk).
        parts = req.path.rstrip("/").split("/")
        return req.method == "DELETE" and len(parts) == 4 and parts[2].lower() == "sessions"

    def request_timeout(self, method: str, path: str) -> float | None:
        return self.sessions_timeout if path.startswith("/api/sessions") else None

    # -- answers -----------------------------------------------------------------
    def create_answer(self, session: str, info: SessionInfo | None) -> Answer:
        # What Blazz answers a create, for the copy that already runs.
        raw = info.extra.get("status") if info is not None else None
        status = raw if isinstance(raw, str) else "qr_scanning"
        return Answer(200, {"success": True, "session_id": session, "status": status})

    def create_notes(self, req: UpstreamRequest) -> Mapping[str, Any]:
        body = req.json or {}
        return {k: body[k] for k in _CREATE_NOTES if body.get(k) is not None}

    health_paths = _HEALTH_PATHS

    def health_answer(self, path: str, fleet: list[InstanceHealth]) -> Answer:
        up = [i for i in fleet if i.healthy]
        if path == "/health/live":
            return Answer(200, {"status": "alive", "timestamp": _now()})
        if path == "/health/ready":
            ready = bool(up)
            return Answer(
                200 if ready else 503,
                {"status": "ready" if ready else "not_ready", "timestamp": _now()},
            )
        total = sum(i.report.sessions or 0 for i in up if i.report is not None)
        connected = sum(i.report.connected or 0 for i in up if i.report is not None)
        state = "healthy" if len(up) == len(fleet) else "degraded" if up else "unhealthy"
        rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
        return Answer(
            200 if up else 503,
            {
                "status": state,
                "uptime": round(time.time() - _STARTED_AT, 3),
                "sessions": {
                    "total": total,
                    "connected": connected,
                    "disconnected": total - connected,
                },
                "memory": {"used": rss_mb, "total": rss_mb, "unit": "MB"},
                "instances": {
                    "total": len(fleet),
                    "healthy": len(up),
                    "down": [i.name for i in fleet if not i.healthy],
                },
                "timestamp": _now(),
            },
        )

    def session_missing(self, status: int, body: bytes) -> bool:
        return status == 404 and b"session not found" in body[:4096].lower()

    def created_session(self, status: int, body: bytes) -> str | None:
        if not 200 <= status < 300:
            return None
        data = parse_json(body)
        if not isinstance(data, dict):
            return None
        value = data.get(_FIELD)
        if value is None and isinstance(data.get("session"), dict):
            value = data["session"].get(_FIELD)
        return checked_id(value)

    # -- 2. / 3. / 4. ------------------------------------------------------------
    @staticmethod
    def _info(item: object, session: str | None = None) -> SessionInfo | None:
        if not isinstance(item, dict):
            return None
        name = checked_id(item.get(_FIELD, session))
        if name is None:
            return None
        extra = {k: item[k] for k in _EXTRA_FIELDS if item.get(k) is not None}
        return SessionInfo(name, map_status(_STATUSES, item.get("status")), extra)

    async def list_sessions(
        self, http: aiohttp.ClientSession, inst: InstanceConfig, *, strict: bool = False
    ) -> list[SessionInfo]:
        res = await self._call(http, inst, "GET", "/api/sessions", params=self._key_params(inst))
        items = res.data.get("sessions") if res.ok and isinstance(res.data, dict) else None
        if not isinstance(items, list):
            if strict:
                raise ListFailed(inst.name, f"HTTP {res.status}, not a session list")
            return []
        return [info for info in map(self._info, items) if info is not None]

    async def probe(
        self, http: aiohttp.ClientSession, inst: InstanceConfig, session: str
    ) -> SessionInfo | None:
        res = await self._call(
            http, inst, "GET", f"/api/sessions/{session}/status", params=self._key_params(inst)
        )
        if not res.ok:
            return None
        data = res.data
        if isinstance(data, dict) and isinstance(data.get("session"), dict):
            data = data["session"]
        info = self._info(data, session)
        return info if info is not None and info.session == session else None

    async def start(
        self,
        http: aiohttp.ClientSession,
        inst: InstanceConfig,
        session: str,
        info: SessionInfo | None = None,
    ) -> bool:
        extra: Mapping[str, Any] = info.extra if info is not None else {}
        workspace = extra.get("workspace_id")
        if workspace is None:
            workspace = workspace_from_id(session)
        if workspace is None:
            # Blazz cannot open a session without its workspace (that is the
            # very bug of /restore); a call would only earn a 500.
            return False
        body: dict[str, Any] = {_FIELD: session, "workspace_id": workspace}
        for key in ("account_id", "priority"):
            if extra.get(key) is not None:
                body[key] = extra[key]
        if inst.api_key:
            body[_KEY] = inst.api_key
        res = await self._call(
            http, inst, "POST", "/api/sessions", json_body=body, call_timeout=self.sessions_timeout
        )
        if res.status == 500 and b"singletonlock" in res.body[:4096].lower():
            # Chromium's profile lock in the shared storage: a browser of a
            # crashed instance still runs this session's profile.
            raise HeldElsewhere(inst.name, "SingletonLock: its browser profile is in use")
        return res.ok

    async def stop(self, http: aiohttp.ClientSession, inst: InstanceConfig, session: str) -> bool:
        # Blazz's DELETE disconnects the client and keeps the LocalAuth files
        # in the shared storage; an unknown session answers 200
        # ``alreadyDisconnected``. Its key is read from the JSON body only.
        res = await self._call(
            http,
            inst,
            "DELETE",
            f"/api/sessions/{session}",
            json_body=self._key_params(inst),
            call_timeout=self.sessions_timeout,
        )
        return res.ok or self.session_missing(res.status, res.body)

    async def health(self, http: aiohttp.ClientSession, inst: InstanceConfig) -> HealthReport:
        res = await self._call(http, inst, "GET", "/health")
        data = res.data if isinstance(res.data, dict) else {}
        state = data.get("status")
        sessions = data.get("sessions")
        counts = sessions if isinstance(sessions, dict) else {}
        return HealthReport(
            healthy=res.ok and state == "healthy",
            sessions=_count(counts.get("total")),
            detail=str(state) if state is not None else f"HTTP {res.status}",
            connected=_count(counts.get("connected")),
        )

    # -- listings ------------------------------------------------------------------
    def list_shape(self, req: UpstreamRequest) -> ListShape | None:
        # GET /api/sessions?api_key=K: {"success", "sessions": [...], "total"}.
        if req.method == "GET" and req.path.rstrip("/").lower() == "/api/sessions":
            return _LIST_SHAPE
        return None


def _listed_name(item: object) -> str | None:
    return checked_id(item.get(_FIELD)) if isinstance(item, dict) else None


_LIST_SHAPE: Final = ListShape(_listed_name, fields=("sessions",), total="total")


def _count(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")
