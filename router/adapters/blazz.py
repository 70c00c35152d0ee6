"""Blazz ``whatsapp-service`` (Express + whatsapp-web.js).

Where the session is:

- ``POST /api/messages/send|send-media|bulk-send``: JSON ``session_id`` only
- ``POST /api/sessions``: a create, JSON ``session_id``
- ``/api/sessions/{id}[/...]`` and ``/api/messages/{id}/...``: path
- ``GET /api/sessions``: the list, no session
- any other ``/api/...`` route: JSON ``session_id``, else query ``session_id``

The credential is ``api_key`` in the JSON body (requests with a JSON body) or
the query string; Blazz accepts no header, but clients may send the router
key as ``X-Api-Key`` and it is removed before the request goes upstream.
The real service's ``POST /api/sessions/{id}/restore`` is broken, so
``start`` re-creates the session with its ``workspace_id`` instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import aiohttp

from router.adapters._http import (
    BODY_METHODS,
    OPTIONS_WHERE,
    JsonAdapter,
    check_keys,
    checked_id,
    map_status,
    parse_json,
)
from router.adapters.base import (
    Extraction,
    HealthReport,
    ListFailed,
    SessionInfo,
    SessionStatus,
    UpstreamRequest,
    valid_session_id,
)
from router.config import InstanceConfig

_NO_SESSION: Final = Extraction(None)
_CREATE_UNNAMED: Final = Extraction(None, create=True)
# /api/messages/{x}: these x are actions with the session in the body.
_BODY_ACTIONS: Final = frozenset({"send", "send-media", "bulk-send"})

_STATUSES: Final[Mapping[str, SessionStatus]] = {
    "connected": SessionStatus.READY,
    "ready": SessionStatus.READY,
    "authenticated": SessionStatus.STARTING,
    "initializing": SessionStatus.STARTING,
    "qr_scanning": SessionStatus.NEEDS_AUTH,
    "disconnected": SessionStatus.STOPPED,
    "failed": SessionStatus.FAILED,
}
# What ``SessionInfo.extra`` keeps from Blazz's session records.
_EXTRA_FIELDS: Final = ("workspace_id", "account_id", "phone_number", "priority")

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
    """Blazz whatsapp-service. Options: ``timeout`` (seconds per management call)."""

    name = "blazz"

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(options)
        check_keys(OPTIONS_WHERE, self.options, self.COMMON_OPTIONS)

    # -- 1. where the session id is ------------------------------------------
    def needs_body(self, method: str, path: str) -> bool:
        # Every /api/* route checks api_key, which lives in the body of
        # POST / PUT / DELETE requests.
        return method in BODY_METHODS and path.startswith("/api/")

    def extract(self, req: UpstreamRequest) -> Extraction:
        path = req.path
        if path.startswith("/api/sessions"):
            rest = path[13:]
            if not rest or rest == "/":
                if req.method == "POST":
                    value = self._body_field(req)
                    if value is None:
                        return _CREATE_UNNAMED
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
            if seg not in _BODY_ACTIONS:
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

    # -- answers -----------------------------------------------------------------
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
        res = await self._call(http, inst, "POST", "/api/sessions", json_body=body)
        return res.ok

    async def stop(self, http: aiohttp.ClientSession, inst: InstanceConfig, session: str) -> bool:
        # Blazz's DELETE disconnects the client and keeps the LocalAuth files
        # in the shared storage; an unknown session answers 200
        # ``alreadyDisconnected``.
        # The key goes in both places: Blazz reads a DELETE's key from the body
        # or the query depending on its version.
        params = self._key_params(inst)
        res = await self._call(
            http, inst, "DELETE", f"/api/sessions/{session}", params=params, json_body=params
        )
        return res.ok or self.session_missing(res.status, res.body)

    async def health(self, http: aiohttp.ClientSession, inst: InstanceConfig) -> HealthReport:
        res = await self._call(http, inst, "GET", "/health")
        data = res.data if isinstance(res.data, dict) else {}
        state = data.get("status")
        sessions = data.get("sessions")
        total = sessions.get("total") if isinstance(sessions, dict) else None
        return HealthReport(
            healthy=res.ok and state == "healthy",
            sessions=total if isinstance(total, int) and not isinstance(total, bool) else None,
            detail=str(state) if state is not None else f"HTTP {res.status}",
        )
