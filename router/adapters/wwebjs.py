"""wwebjs-api / whatsapp-api (Express + whatsapp-web.js).

Every session route is ``/{root}/{action}/{sessionId}[/...]`` with root one
of ``session``, ``client``, ``chat``, ``groupChat``, ``message``,
``contact`` (the id is the last segment except for a few sub-resources such
as ``/session/qr/{id}/image``, hence "the third segment").
``/session/getSessions``, ``/session/terminateAll`` and friends have no id;
``/session/start/{id}`` creates. Credential: header ``x-api-key``.

Session states (whatsapp-web.js ``WAState``): ``CONNECTED`` is READY;
``OPENING``, ``PAIRING``, ``TIMEOUT``, ``CONFLICT``, ``UNLAUNCHED`` STARTING;
``UNPAIRED``, ``UNPAIRED_IDLE`` NEEDS_AUTH; the ``*_BLOCK`` states and
``DEPRECATED_VERSION`` FAILED. ``/session/stop|terminate/{id}`` removes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import aiohttp

from router.adapters._http import (
    OPTIONS_WHERE,
    HeaderCredentialAdapter,
    check_keys,
    checked_id,
    map_status,
    opt_str_list,
)
from router.adapters.base import (
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

DEFAULT_ROOTS: Final = ("session", "client", "chat", "groupChat", "message", "contact")

_NO_SESSION: Final = Extraction(None)

# whatsapp-web.js WAState values (``/session/status`` -> ``state``).
_STATES: Final[Mapping[str, SessionStatus]] = {
    "CONNECTED": SessionStatus.READY,
    "OPENING": SessionStatus.STARTING,
    "PAIRING": SessionStatus.STARTING,
    "TIMEOUT": SessionStatus.STARTING,
    "CONFLICT": SessionStatus.STARTING,
    "UNLAUNCHED": SessionStatus.STARTING,
    "UNPAIRED": SessionStatus.NEEDS_AUTH,
    "UNPAIRED_IDLE": SessionStatus.NEEDS_AUTH,
    "DEPRECATED_VERSION": SessionStatus.FAILED,
    "PROXYBLOCK": SessionStatus.FAILED,
    "SMB_TOS_BLOCK": SessionStatus.FAILED,
    "TOS_BLOCK": SessionStatus.FAILED,
    # wwebjs-api's own answer when the page does not answer getState() in time
    "unresponsive": SessionStatus.FAILED,
}
# The calls that send a message ((root, action), lower case) and the body
# field naming where it goes, for router.pacing.
_SENDS: Final[Mapping[tuple[str, str], str]] = {
    ("client", "sendmessage"): "chatId",
    ("message", "reply"): "chatId",
    ("message", "forward"): "destinationChatId",
    ("channel", "sendmessage"): "channelId",
}
_NOT_FOUND: Final = b"session_not_found"


class WwebjsAdapter(HeaderCredentialAdapter):
    """wwebjs-api. Options: ``roots`` / ``extra_roots`` (first path segments
    whose routes carry the session id as third segment), ``timeout``."""

    credential_header = "x-api-key"

    name = "wwebjs"

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(options)
        opts = check_keys(
            OPTIONS_WHERE, self.options, self.COMMON_OPTIONS | {"roots", "extra_roots"}
        )
        roots = opt_str_list(f"{OPTIONS_WHERE}.roots", opts.get("roots", list(DEFAULT_ROOTS)))
        roots += opt_str_list(f"{OPTIONS_WHERE}.extra_roots", opts.get("extra_roots", []))
        # Express routes ignore case; so do we, for the fixed first segment.
        self._roots = frozenset(roots) | frozenset(r.lower() for r in roots)

    # -- 1. where the session id is ------------------------------------------
    def needs_body(self, method: str, path: str) -> bool:
        return False

    def extract(self, req: UpstreamRequest) -> Extraction:
        # "/{root}/{action}/{id}[/...]" -> ["", root, action, id, ...]
        parts = req.path.split("/", 4)
        if len(parts) < 4:
            # "/ping", "/session/getSessions", "/session/terminateAll": no session
            return _NO_SESSION
        root = parts[1]
        if root not in self._roots and root.lower() not in self._roots:
            return _NO_SESSION
        seg = parts[3]
        if not seg and len(parts) == 4:
            return _NO_SESSION  # "/session/getSessions/"
        if root == "session" and parts[2].lower() == "start":
            return Extraction(valid_session_id(seg), create=True)
        return self._ids.get(seg)

    # -- sends (router.pacing) -------------------------------------------------------
    @staticmethod
    def _send_field(method: str, path: str) -> str | None:
        if method != "POST":
            return None
        # "/client/sendMessage/{id}[/]" -> ["", root, action, id]
        parts = path.rstrip("/").split("/", 4)
        if len(parts) != 4:
            return None
        return _SENDS.get((parts[1].lower(), parts[2].lower()))

    def send_of(self, req: UpstreamRequest) -> Send | None:
        name = self._send_field(req.method, req.path)
        if name is None:
            return None
        body = req.json
        return Send(recipient_of(body.get(name)) if body is not None else ())

    def recipient_in_body(self, method: str, path: str) -> bool:
        return self._send_field(method, path) is not None

    # -- 5. credentials ----------------------------------------------------------
    # -- answers -----------------------------------------------------------------
    def needs_ready(self, req: UpstreamRequest) -> bool:
        return req.path.strip("/").split("/", 1)[0].lower() != "session"

    def removes(self, req: UpstreamRequest) -> bool:
        # /session/stop/{id} and /session/terminate/{id} (terminate also logs out).
        parts = req.path.strip("/").split("/")
        return (
            len(parts) == 3
            and parts[0].lower() == "session"
            and parts[1].lower() in ("stop", "terminate")
        )

    def session_missing(self, status: int, body: bytes) -> bool:
        return status == 404 and _NOT_FOUND in body[:4096]

    # -- 2. / 3. / 4. ------------------------------------------------------------
    async def list_sessions(
        self, http: aiohttp.ClientSession, inst: InstanceConfig, *, strict: bool = False
    ) -> list[SessionInfo]:
        res = await self._call(http, inst, "GET", "/session/getSessions")
        items = res.data.get("result") if res.ok and isinstance(res.data, dict) else None
        if not isinstance(items, list):
            if strict:
                raise ListFailed(inst.name, f"HTTP {res.status}, not a session list")
            return []
        out: list[SessionInfo] = []
        for item in items:
            name = _listed_name(item)
            if name is not None:
                # The list names ids only: STARTING says "known here, not
                # claimed ready" until a probe tells more.
                out.append(SessionInfo(name, SessionStatus.STARTING))
        return out

    async def probe(
        self, http: aiohttp.ClientSession, inst: InstanceConfig, session: str
    ) -> SessionInfo | None:
        res = await self._call(http, inst, "GET", f"/session/status/{session}")
        if not res.ok or _NOT_FOUND in res.body:
            return None
        data = res.data if isinstance(res.data, dict) else {}
        state = data.get("state")
        status = map_status(_STATES, state) if state else SessionStatus.STARTING
        return SessionInfo(session, status)

    async def start(
        self,
        http: aiohttp.ClientSession,
        inst: InstanceConfig,
        session: str,
        info: SessionInfo | None = None,
    ) -> bool:
        res = await self._call(http, inst, "GET", f"/session/start/{session}")
        if res.ok:
            return True
        # wwebjs-api answers 422 "Session already exists" when it runs here.
        return res.status == 422 and b"already exist" in res.body.lower()

    async def stop(self, http: aiohttp.ClientSession, inst: InstanceConfig, session: str) -> bool:
        # ``/session/stop`` destroys the client (closes the browser) and keeps
        # the LocalAuth folder. Never ``/session/terminate``: it logs the phone
        # out and deletes the folder. An API without ``/stop`` (older
        # wwebjs-api) answers 404 "Cannot GET": refused, nothing touched.
        res = await self._call(http, inst, "GET", f"/session/stop/{session}")
        return res.ok and not (isinstance(res.data, dict) and res.data.get("success") is False)

    async def health(self, http: aiohttp.ClientSession, inst: InstanceConfig) -> HealthReport:
        res = await self._call(http, inst, "GET", "/ping")
        return HealthReport(healthy=res.ok, detail=f"HTTP {res.status}")

    # -- listings ------------------------------------------------------------------
    def list_shape(self, req: UpstreamRequest) -> ListShape | None:
        # GET /session/getSessions: {"success": true, "result": [ids]}.
        if req.method == "GET" and req.path.rstrip("/").lower() == "/session/getsessions":
            return _LIST_SHAPE
        return None


def _listed_name(item: object) -> str | None:
    # ids, or (some versions) {"id"} / {"sessionId"} objects: as list_sessions reads them
    if isinstance(item, dict):
        item = item.get("id", item.get("sessionId"))
    return checked_id(item)


_LIST_SHAPE: Final = ListShape(_listed_name, fields=("result",))
