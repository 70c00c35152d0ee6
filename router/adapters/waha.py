"""WAHA (devlikeapro/waha): sessions in the path, the JSON body or the query.

Where the session is (see ``shared/upstreams.md``):

- ``/api/{session}/...``            path, unless the first segment is a reserved root
- ``/api/sessions/{session}[/...]`` path; ``GET /api/sessions`` lists (no session);
  ``POST /api/sessions`` creates (body ``name``, else WAHA invents one);
  ``POST /api/sessions/start|stop|logout`` are the legacy calls with body ``name``
- body roots (``sendText``, ``contacts``, ``messages``, ...): JSON ``session`` for
  requests with a body, query ``session`` otherwise, ``"default"`` when absent
- ``/api/files/{session}/{file}``   media
- ``/ws?session=<name|*>``          websocket, ``*`` (WAHA's default) fans out

Reserved roots are matched case-insensitively: WAHA runs on Express, whose
router ignores case, so ``/api/SendText`` reaches the send handler there too.

Session states: ``STARTING`` is STARTING, ``WORKING`` READY, ``SCAN_QR_CODE``
and ``PASSKEY_REQUIRED`` NEEDS_AUTH (a scan is needed), ``FAILED`` FAILED,
``STOPPED`` STOPPED (stopped by an API call: discovery takes it as removed).
A delete, ``stop`` or ``logout`` through the router removes the session
(``removes``); ``POST /api/sessions/{s}/start`` creates it again.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import aiohttp

from router.adapters._http import (
    BODY_METHODS,
    OPTIONS_WHERE,
    ExtractionCache,
    JsonAdapter,
    check_keys,
    checked_id,
    map_status,
    opt_str,
    opt_str_list,
    parse_json,
)
from router.adapters.base import (
    BadSessionId,
    Extraction,
    HealthReport,
    ListFailed,
    ListShape,
    Send,
    SessionInfo,
    SessionStatus,
    UpstreamRequest,
    recipient_of,
    valid_session_id,
)
from router.config import InstanceConfig

# Roots whose session is the JSON body field ``session`` (requests with a
# body) or the query parameter ``session`` (GET), default "default".
DEFAULT_BODY_ROOTS: Final = (
    "sendText",
    "sendImage",
    "sendFile",
    "sendVoice",
    "sendVideo",
    "sendButtons",
    "sendTextButtons",
    "sendList",
    "sendSeen",
    "startTyping",
    "stopTyping",
    "reply",
    "sendPoll",
    "sendPollVote",
    "sendLocation",
    "sendContactVcard",
    "sendLinkPreview",
    "sendLinkCustomPreview",
    "send",  # /api/send/link-custom-preview, /api/send/buttons/reply
    "forwardMessage",
    "reaction",
    "star",
    "messages",
    "contacts",
    "checkNumberStatus",
    "screenshot",
    "chatting",
    "apps",
)
# Roots about no single session (server admin, API keys, ...).
DEFAULT_GLOBAL_ROOTS: Final = (
    "server",
    "version",
    "keys",
    "admin",
    "tenants",
    "ping",
    "health",
    "metrics",
)

# Roots of the calls that send a message to a chat (router.pacing), lower case:
# not sendSeen, typing, reactions or stars. ``send`` is /api/send/link-custom-preview
# and /api/send/buttons/reply.
SEND_ROOTS: Final = frozenset(
    root.lower()
    for root in DEFAULT_BODY_ROOTS
    if (root.startswith("send") and root != "sendSeen") or root in ("reply", "forwardMessage")
)

_FIELD: Final = 1
_GLOBAL: Final = 2
_SESSIONS: Final = 3
_FILES: Final = 4

_NO_SESSION: Final = Extraction(None)
_FANOUT: Final = Extraction(None, fanout=True)
_CREATE_UNNAMED: Final = Extraction(None, create=True)
_LEGACY: Final = frozenset({"start", "stop", "logout"})

_STATUSES: Final[Mapping[str, SessionStatus]] = {
    "WORKING": SessionStatus.READY,
    "STARTING": SessionStatus.STARTING,
    "SCAN_QR_CODE": SessionStatus.NEEDS_AUTH,
    "PASSKEY_REQUIRED": SessionStatus.NEEDS_AUTH,
    "STOPPED": SessionStatus.STOPPED,
    "FAILED": SessionStatus.FAILED,
}
# Statuses of a session that runs on the instance that answered.
_RUNNING: Final = frozenset({"STARTING", "SCAN_QR_CODE", "PASSKEY_REQUIRED", "WORKING"})
# Bodies of WAHA's 404 "no such session here" answers.
_MISSING_404: Final = (b"session not found", b"find a session", b"find a running session")
_MISSING_422: Final = (b"not as expected", b"not running")

_HEADER: Final = "X-Api-Key"
_QUERY_KEY: Final = "x-api-key"


class WahaAdapter(JsonAdapter):
    """WAHA Core / Plus, every engine (WEBJS, NOWEB, GOWS).

    Options (all optional):

    - ``body_roots`` / ``extra_body_roots``: replace / extend the roots whose
      session is the body or query field ``session``
    - ``global_roots`` / ``extra_global_roots``: replace / extend the roots
      about no session
    - ``default_session``: the session WAHA assumes when none is named ("default")
    - ``timeout``: seconds per management call (10)
    """

    name = "waha"
    # NestJS's default body parsers: JSON and urlencoded (``qs``, extended).
    reads_forms = True

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(options)
        opts = check_keys(
            OPTIONS_WHERE,
            self.options,
            self.COMMON_OPTIONS
            | {
                "body_roots",
                "extra_body_roots",
                "global_roots",
                "extra_global_roots",
                "default_session",
            },
        )

        def roots(key: str, default: tuple[str, ...]) -> list[str]:
            base = opt_str_list(f"{OPTIONS_WHERE}.{key}", opts.get(key, list(default)))
            extra = opt_str_list(f"{OPTIONS_WHERE}.extra_{key}", opts.get(f"extra_{key}", []))
            return base + extra

        table: dict[str, int] = {}
        for root in roots("global_roots", DEFAULT_GLOBAL_ROOTS):
            table[root] = _GLOBAL
        for root in roots("body_roots", DEFAULT_BODY_ROOTS):
            table[root] = _FIELD
        # Structural roots: configurable lists cannot take them away.
        table["sessions"] = _SESSIONS
        table["files"] = _FILES
        for root in list(table):
            if "/" in root:
                raise ValueError(f"{OPTIONS_WHERE}: root {root!r} must be one path segment")
            table[root.lower()] = table[root]
        self._roots: dict[str, int] = table
        self._path_ids = ExtractionCache()

        default = opt_str(
            f"{OPTIONS_WHERE}.default_session", opts.get("default_session", "default")
        )
        try:
            valid_session_id(default)
        except ValueError as exc:
            raise ValueError(f"{OPTIONS_WHERE}.default_session: {exc}") from None
        self.default_session = default
        self._default: Extraction = Extraction(default)

    # -- 1. where the session id is ------------------------------------------
    def needs_body(self, method: str, path: str) -> bool:
        if method not in BODY_METHODS:
            return False
        if not path.startswith("/api/"):
            if path[:5].lower() != "/api/":
                return False
            path = "/api/" + path[5:]
        slash = path.find("/", 5)
        first = path[5:] if slash < 0 else path[5:slash]
        kind = self._roots.get(first)
        if kind is None:
            kind = self._roots.get(first.lower())
        if kind == _FIELD:
            return True
        if kind == _SESSIONS and method == "POST":
            rest = "" if slash < 0 else path[slash + 1 :].rstrip("/")
            return not rest or rest.lower() in _LEGACY
        return False

    def extract(self, req: UpstreamRequest) -> Extraction:
        path = req.path
        if not path.startswith("/api/") and path[:5].lower() == "/api/":
            path = "/api/" + path[5:]  # Express routes ignore case (/API/sendText)
        if path.startswith("/api/"):
            slash = path.find("/", 5)
            if slash >= 0:
                first = path[5:slash]
                # the common case: a session seen before in /api/{session}/...
                hit = self._path_ids.peek(first)
                if hit is not None:
                    return hit
            else:
                first = path[5:]
            kind = self._roots.get(first)
            if kind is None:
                kind = self._roots.get(first.lower())
            if kind is None:
                if slash < 0:
                    # "/api/x": no WAHA route has this shape; nothing to route by.
                    return _NO_SESSION
                # only non-reserved segments enter this cache
                return self._path_ids.get(first)
            if kind == _FIELD:
                return self._field(req)
            rest = "" if slash < 0 else path[slash + 1 :]
            if kind == _SESSIONS:
                return self._sessions(req, rest)
            if kind == _FILES:
                return self._files(rest)
            return _NO_SESSION
        if path.lower() in ("/ws", "/ws/"):
            value = req.query.get("session")
            if not value or value == "*":
                return _FANOUT
            return self._ids.get(value)
        return _NO_SESSION

    def _field(self, req: UpstreamRequest) -> Extraction:
        body = req.json
        if body is not None and req.method in BODY_METHODS:
            if "session" not in body:
                return self._default
            value = body["session"]
            if not isinstance(value, str):
                # null, a number, an array (a repeated form field): WAHA does not
                # read that as "default", and the router cannot tell what it does.
                raise BadSessionId("", "the body's session must be a string naming the session")
            return self._ids.get(value)
        value = req.query.get("session")
        if value is None:
            return self._default
        return self._ids.get(value)

    def _sessions(self, req: UpstreamRequest, rest: str) -> Extraction:
        if not rest:
            # /api/sessions, /api/sessions/: list, or create
            if req.method != "POST":
                return _NO_SESSION
            name = req.json.get("name") if req.json is not None else None
            if name is None or name == "":
                return _CREATE_UNNAMED  # WAHA invents the name
            return Extraction(valid_session_id(name), create=True)
        slash = rest.find("/")
        seg = rest if slash < 0 else rest[:slash]
        if (
            seg.lower() in _LEGACY
            and req.method == "POST"
            and (slash < 0 or slash == len(rest) - 1)
        ):
            # POST /api/sessions/start|stop|logout[/] with body {"name"}
            name = req.json.get("name") if req.json is not None else None
            session = self.default_session if name is None else valid_session_id(name)
            # Legacy start is WAHA's "upsert and start": it may create.
            return Extraction(session, create=seg.lower() == "start")
        if req.method == "POST" and rest.rstrip("/").lower().endswith("/start"):
            # Starting a stopped session is how WAHA creates it again (after a
            # stop through the router, which marked it removed: router.removals).
            return Extraction(self._ids.get(seg).session, create=True)
        return self._ids.get(seg)

    def _files(self, rest: str) -> Extraction:
        slash = rest.find("/")
        if slash < 0:
            # Pre-multi-session layout /api/files/{file}: the default session's media.
            return self._default if rest else _NO_SESSION
        return self._ids.get(rest[:slash])

    stopped_is_removed = True

    def needs_ready(self, req: UpstreamRequest) -> bool:
        # Not the session API (/api/sessions/...) nor the QR / pairing routes.
        path = req.path.lower()
        return not (path.startswith("/api/sessions") or "/auth/" in path)

    def removes(self, req: UpstreamRequest) -> bool:
        # DELETE /api/sessions/{s}; POST /api/sessions/{s}/stop|logout and the
        # legacy POST /api/sessions/stop|logout {"name"}.
        path = req.path.rstrip("/")
        if not path.lower().startswith("/api/sessions/"):
            return False
        parts = path[14:].split("/")
        if req.method == "DELETE":
            return len(parts) == 1
        if req.method == "POST":
            return parts[-1].lower() in ("stop", "logout") and len(parts) <= 2
        return False

    # -- sends (router.pacing) -------------------------------------------------------
    def send_of(self, req: UpstreamRequest) -> Send | None:
        # POST /api/sendText etc.: the chat is the body's chatId.
        path = req.path
        if req.method != "POST" or path[:5].lower() != "/api/":
            return None
        slash = path.find("/", 5)
        if (path[5:] if slash < 0 else path[5:slash]).lower() not in SEND_ROOTS:
            return None
        body = req.json
        return Send(recipient_of(body.get("chatId")) if body is not None else ())

    # -- 5. credentials ----------------------------------------------------------
    def client_key(self, req: UpstreamRequest) -> str | None:
        return req.headers.get(_HEADER) or req.query.get(_QUERY_KEY)

    def apply_credential(self, req: UpstreamRequest, inst: InstanceConfig) -> None:
        req.headers.popall(_HEADER, None)
        if _QUERY_KEY in req.query:
            req.query.popall(_QUERY_KEY)
        if inst.api_key:
            req.headers[_HEADER] = inst.api_key

    def auth_headers(self, inst: InstanceConfig) -> dict[str, str]:
        return {_HEADER: inst.api_key} if inst.api_key else {}

    # -- answers -----------------------------------------------------------------
    def session_missing(self, status: int, body: bytes) -> bool:
        if status == 404:
            low = body[:4096].lower()
            return any(p in low for p in _MISSING_404)
        if status == 422:
            low = body[:4096].lower()
            if not any(p in low for p in _MISSING_422):
                return False
            # "Session status is not as expected" also answers a session that
            # runs here but is still STARTING or waiting for its QR scan:
            # recovering it elsewhere would only fight over the phone.
            data = parse_json(body)
            state = data.get("status") if isinstance(data, dict) else None
            return not (isinstance(state, str) and state.upper() in _RUNNING)
        return False

    def created_session(self, status: int, body: bytes) -> str | None:
        if not 200 <= status < 300:
            return None
        data = parse_json(body)
        return checked_id(data.get("name")) if isinstance(data, dict) else None

    # -- 2. / 3. / 4. ------------------------------------------------------------
    def _info(self, item: object) -> SessionInfo | None:
        if not isinstance(item, dict):
            return None
        name = checked_id(item.get("name"))
        if name is None:
            return None
        extra = {k: item[k] for k in ("engine", "config") if item.get(k) is not None}
        return SessionInfo(name, map_status(_STATUSES, item.get("status")), extra)

    async def list_sessions(
        self, http: aiohttp.ClientSession, inst: InstanceConfig, *, strict: bool = False
    ) -> list[SessionInfo]:
        res = await self._call(http, inst, "GET", "/api/sessions", params={"all": "true"})
        if not res.ok or not isinstance(res.data, list):
            if strict:
                raise ListFailed(inst.name, f"HTTP {res.status}, not a session list")
            return []
        return [info for info in map(self._info, res.data) if info is not None]

    async def probe(
        self, http: aiohttp.ClientSession, inst: InstanceConfig, session: str
    ) -> SessionInfo | None:
        res = await self._call(http, inst, "GET", f"/api/sessions/{session}")
        if not res.ok:
            return None
        info = self._info(res.data)
        return info if info is not None and info.session == session else None

    async def start(
        self,
        http: aiohttp.ClientSession,
        inst: InstanceConfig,
        session: str,
        info: SessionInfo | None = None,
    ) -> bool:
        path = f"/api/sessions/{session}/start"
        res = await self._call(http, inst, "POST", path)
        if res.ok:
            return True
        if res.status != 404:
            return False
        # Unknown to this instance (its storage is not shared): create it,
        # with the config another instance reported (webhooks!) when we have it.
        body: dict[str, Any] = {"name": session, "start": True}
        config = info.extra.get("config") if info is not None else None
        if isinstance(config, dict):
            body["config"] = config
        res = await self._call(http, inst, "POST", "/api/sessions", json_body=body)
        if res.ok:
            return True
        if res.status == 422:
            # Created meanwhile (a racing start): start what now exists.
            res = await self._call(http, inst, "POST", path)
            return res.ok
        return False

    async def stop(self, http: aiohttp.ClientSession, inst: InstanceConfig, session: str) -> bool:
        # ``stop`` closes the engine and keeps the session and its login;
        # ``DELETE`` and ``logout`` would unpair the phone.
        res = await self._call(http, inst, "POST", f"/api/sessions/{session}/stop")
        return res.ok or (res.status == 404 and self.session_missing(res.status, res.body))

    async def health(self, http: aiohttp.ClientSession, inst: InstanceConfig) -> HealthReport:
        res = await self._call(http, inst, "GET", "/health")
        state = res.data.get("status") if isinstance(res.data, dict) else None
        detail = str(state) if state is not None else f"HTTP {res.status}"
        return HealthReport(healthy=res.status == 200, detail=detail)

    # -- listings ------------------------------------------------------------------
    def list_shape(self, req: UpstreamRequest) -> ListShape | None:
        # GET /api/sessions[?all=true]: an array of session objects.
        if req.method == "GET" and req.path.rstrip("/").lower() == "/api/sessions":
            return _LIST_SHAPE
        return None


def _listed_name(item: object) -> str | None:
    return checked_id(item.get("name")) if isinstance(item, dict) else None


_LIST_SHAPE: Final = ListShape(_listed_name)
