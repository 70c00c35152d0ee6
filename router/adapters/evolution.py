"""Evolution API: the instance name is the last path segment.

Evolution builds every per-instance route as ``/{root}/{action}[/{param}]/{instanceName}``
(``/message/sendText/{i}``, ``/typebot/fetch/{botId}/{i}``, ...), so any path
of three or more segments names its instance last, except under a few
non-API roots (manager UI, docs, static assets). Two-segment paths are about
no instance (``/instance/fetchInstances``) except ``POST /instance/create``,
a create with body ``instanceName``. Credential: header ``apikey``.

Session states (``connectionState``): ``open`` is READY, ``connecting``
STARTING (a QR may be pending: Evolution does not say), ``close`` STOPPED (a
dropped connection too, so never taken as removed), ``refused`` FAILED.
``DELETE /instance/logout|delete/{i}`` removes.
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
    dig,
    map_status,
    opt_str_list,
    parse_json,
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

# First segments that are not instance routes even with three segments.
DEFAULT_RESERVED_ROOTS: Final = ("manager", "assets", "docs", "socket.io", "favicon.ico")

_NO_SESSION: Final = Extraction(None)
_CREATE_UNNAMED: Final = Extraction(None, create=True)
_CREATE_PATH: Final = "/instance/create"

_STATES: Final[Mapping[str, SessionStatus]] = {
    "open": SessionStatus.READY,
    "connecting": SessionStatus.STARTING,
    "close": SessionStatus.STOPPED,
    "closed": SessionStatus.STOPPED,
    "refused": SessionStatus.FAILED,
}


class EvolutionAdapter(HeaderCredentialAdapter):
    """Evolution API v1 / v2. Options: ``reserved_roots`` / ``extra_reserved_roots``
    (first segments that are not instance routes), ``timeout``."""

    credential_header = "apikey"

    name = "evolution"
    # Its main.ts: express urlencoded({extended: true}) and json().
    reads_forms = True

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(options)
        opts = check_keys(
            OPTIONS_WHERE,
            self.options,
            self.COMMON_OPTIONS | {"reserved_roots", "extra_reserved_roots"},
        )
        roots = opt_str_list(
            f"{OPTIONS_WHERE}.reserved_roots",
            opts.get("reserved_roots", list(DEFAULT_RESERVED_ROOTS)),
        )
        roots += opt_str_list(
            f"{OPTIONS_WHERE}.extra_reserved_roots", opts.get("extra_reserved_roots", [])
        )
        self._reserved = frozenset(r.lower() for r in roots)

    # -- 1. where the session id is ------------------------------------------
    def needs_body(self, method: str, path: str) -> bool:
        # Express routes ignore case and a trailing slash.
        return method == "POST" and path.rstrip("/").lower() == _CREATE_PATH

    def extract(self, req: UpstreamRequest) -> Extraction:
        path = req.path
        if path.endswith("/"):
            path = path.rstrip("/")
        parts = path.split("/")  # "/a/b/c" -> ["", "a", "b", "c"]
        n = len(parts)
        if n < 4 or parts[0]:
            if n == 3 and path.lower() == _CREATE_PATH and req.method == "POST":
                name = req.json.get("instanceName") if req.json is not None else None
                if name is None or name == "":
                    return _CREATE_UNNAMED
                return Extraction(valid_session_id(name), create=True)
            # "/", "/manager", "/instance/fetchInstances": about no instance
            return _NO_SESSION
        root = parts[1]
        if root in self._reserved or root.lower() in self._reserved:
            return _NO_SESSION
        return self._ids.get(parts[-1])

    # -- sends (router.pacing) -------------------------------------------------------
    @staticmethod
    def _is_send(method: str, path: str) -> bool:
        # POST /message/send{Text,Media,WhatsAppAudio,Location,Poll,...}/{instance};
        # not sendReaction (a reaction to a message, not a message).
        if method != "POST":
            return False
        parts = path.rstrip("/").split("/", 4)
        if len(parts) != 4 or parts[1].lower() != "message":
            return False
        action = parts[2].lower()
        return action.startswith("send") and action != "sendreaction"

    def send_of(self, req: UpstreamRequest) -> Send | None:
        if not self._is_send(req.method, req.path):
            return None
        body = req.json
        return Send(recipient_of(body.get("number")) if body is not None else ())

    def recipient_in_body(self, method: str, path: str) -> bool:
        return self._is_send(method, path)

    # -- 5. credentials ----------------------------------------------------------
    # -- answers -----------------------------------------------------------------
    def needs_ready(self, req: UpstreamRequest) -> bool:
        return req.path.strip("/").split("/", 1)[0].lower() != "instance"

    def removes(self, req: UpstreamRequest) -> bool:
        # DELETE /instance/logout/{i} (unpairs) and /instance/delete/{i}.
        parts = req.path.strip("/").split("/")
        return (
            req.method == "DELETE"
            and len(parts) == 3
            and parts[0].lower() == "instance"
            and parts[1].lower() in ("logout", "delete")
        )

    def session_missing(self, status: int, body: bytes) -> bool:
        # Evolution answers 404 '{"response":{"message":["The \"x\" instance
        # does not exist"]}}' for an instance it does not hold; any other 404
        # (a wrong path, an unknown chat) passes through untouched.
        return status == 404 and b"does not exist" in body[:4096]

    def created_session(self, status: int, body: bytes) -> str | None:
        if not 200 <= status < 300:
            return None
        data = parse_json(body)
        return checked_id(dig(data, "instance.instanceName"))

    # -- 2. / 3. / 4. ------------------------------------------------------------
    @staticmethod
    def _info(item: object) -> SessionInfo | None:
        # v2: {"name", "connectionStatus", "integration", ...}
        # v1: {"instance": {"instanceName", "status", ...}}
        if not isinstance(item, dict):
            return None
        inner = item.get("instance")
        if isinstance(inner, dict) and inner.get("instanceName") is not None:
            name = inner.get("instanceName")
            state = inner.get("status", inner.get("state"))
        else:
            name = item.get("name", item.get("instanceName"))
            state = item.get("connectionStatus", item.get("status"))
        session = checked_id(name)
        if session is None:
            return None
        extra: dict[str, Any] = {}
        integration = item.get("integration")
        if isinstance(integration, str):
            extra["integration"] = integration
        return SessionInfo(session, map_status(_STATES, state), extra)

    async def list_sessions(
        self, http: aiohttp.ClientSession, inst: InstanceConfig, *, strict: bool = False
    ) -> list[SessionInfo]:
        res = await self._call(http, inst, "GET", "/instance/fetchInstances")
        items = res.data if res.ok else None
        if isinstance(items, dict):
            # some versions wrap the list: {"instances": [...]} / {"response": [...]}
            items = items.get("instances", items.get("response"))
        if not isinstance(items, list):
            if strict:
                raise ListFailed(inst.name, f"HTTP {res.status}, not an instance list")
            return []
        return [info for info in map(self._info, items) if info is not None]

    async def probe(
        self, http: aiohttp.ClientSession, inst: InstanceConfig, session: str
    ) -> SessionInfo | None:
        res = await self._call(http, inst, "GET", f"/instance/connectionState/{session}")
        if not res.ok:
            return None
        state = dig(res.data, "instance.state")
        if state is None:
            state = dig(res.data, "state")
        return SessionInfo(session, map_status(_STATES, state))

    async def start(
        self,
        http: aiohttp.ClientSession,
        inst: InstanceConfig,
        session: str,
        info: SessionInfo | None = None,
    ) -> bool:
        res = await self._call(http, inst, "GET", f"/instance/connect/{session}")
        return res.ok

    can_stop = False

    async def stop(self, http: aiohttp.ClientSession, inst: InstanceConfig, session: str) -> bool:
        # Evolution has no stop that keeps the login: ``DELETE /instance/logout``
        # unpairs the phone, ``DELETE /instance/delete`` removes the instance,
        # ``POST /instance/restart`` keeps it running. So: refuse, call nothing.
        # A move then fails cleanly with the session left where it runs.
        return False

    async def health(self, http: aiohttp.ClientSession, inst: InstanceConfig) -> HealthReport:
        res = await self._call(http, inst, "GET", "/")
        return HealthReport(healthy=res.status == 200, detail=f"HTTP {res.status}")

    # -- listings ------------------------------------------------------------------
    def list_shape(self, req: UpstreamRequest) -> ListShape | None:
        # GET /instance/fetchInstances[?instanceName=]: an array (some versions
        # wrap it in "instances" or "response"), items as ``_info`` reads them.
        if req.method == "GET" and req.path.rstrip("/").lower() == "/instance/fetchinstances":
            return _LIST_SHAPE
        return None


def _listed_name(item: object) -> str | None:
    info = EvolutionAdapter._info(item)
    return info.session if info is not None else None


_LIST_SHAPE: Final = ListShape(_listed_name, fields=("", "instances", "response"))
