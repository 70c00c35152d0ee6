"""The admin API: ``/admin/...``, JSON in and out, behind its own key.

Authentication: ``RouterConfig.admin_key``, sent as ``X-Admin-Key: KEY`` or
``Authorization: Bearer KEY`` and compared in constant time. Without it,
401; with no ``admin_key`` configured the admin API does not exist (404 for
every ``/admin`` path). Client keys (``api_keys``) never open it, and no
answer ever carries an instance's api key (instance URLs are shown without
user info or query string).

Endpoints (``ROUTES`` below; add a line there, and its description in
``router.openapi``, to add one; ``GET /admin/openapi.json`` serves the
OpenAPI 3.1 document of them all):

====== ==================================== ==========================================
GET    /admin/instances                     every instance: health, admin state, load
POST   /admin/instances/{name}/drain        start draining (202 + job; ``?wait=S``
                                            waits up to S seconds, 200 once done)
GET    /admin/instances/{name}/drain        the instance's last drain job
POST   /admin/instances/{name}/undrain      back to active (a running drain stops
                                            starting moves)
POST   /admin/instances/{name}/maintenance  no new sessions; existing ones stay
GET    /admin/sessions?q=&prefix=&instance= the map, paged (``limit``, ``cursor``)
GET    /admin/sessions/{s}                  where it is mapped, and its state there
POST   /admin/sessions/{s}/move             body ``{"to": NAME}``; synchronous
POST   /admin/sessions/{s}/pin              body ``{"instance": NAME}``: map it there
                                            (it must run there) and keep it there
DELETE /admin/sessions/{s}/pin              unpin
DELETE /admin/sessions/{s}                  forget the map entry (instances untouched)
GET    /admin/events?limit=&kind=           recent events, oldest first
POST   /admin/reconcile                     one reconcile round now; its report
POST   /admin/reload                        reload the config file (422 + reason if bad)
GET    /admin/reload                        the last reload and the file watch
GET    /admin/openapi.json                  this API as an OpenAPI 3.1 document
====== ==================================== ==========================================

Errors are ``{"error": code, "message": text}`` with a fitting status.

**Listing sessions** must stay cheap with a million of them: a page scans
the map in its own order (the order sessions were mapped, not sorted) and
stops after ``limit`` matches or 200,000 ids, whichever comes first (a rare
match may need several pages; ``scanned`` says how far a page got). The
first page scans the live map; when more remain, the ids are snapshotted
once (a list of pointers, ~30 ms per million) and ``next_cursor`` walks that
snapshot, so a session mapped for the whole listing is listed exactly once
and no page sorts or copies the map again. A few snapshots are kept, each
for 2 minutes after its last use; an expired cursor answers 410. ``q`` is a
case-insensitive substring, ``prefix`` a case-sensitive prefix, ``instance``
an owner. With a redis store this is the replica's cache, which the change
feed keeps complete.

**Pinning** a session records where it runs (after probing that instance:
409 ``not_running`` if it does not run it there) and keeps rebalancing from
moving it. A drain, an explicit move and a failover still move a pinned
session (the pin stays with it); forgetting it unpins it. Pins live in the
router process, like admin state.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
from aiohttp import web

from router.adapters.base import BadSessionId, SessionInfo, valid_session_id
from router.discovery import RUNNING, peek_owner
from router.instances import Instance
from router.locks import LockBusy
from router.migration import MoveError
from router.openapi import document
from router.placement import load_ratio
from router.reload import ReloadUnavailable
from router.store.base import StoreUnavailable

if TYPE_CHECKING:
    from router.discovery import Discovery
    from router.migration import Migration
    from router.runtime import Runtime

_JSON = "application/json"
_MAX_BODY = 64 * 1024
# Longest ``?wait=`` on a drain request, seconds.
MAX_WAIT = 300.0
# Session listing: largest page, ids scanned per page at most, snapshots kept.
MAX_PAGE = 1000
SCAN_BUDGET = 200_000
_LISTINGS = 4
_LISTING_TTL = 120.0
_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")

Params = dict[str, str]
Handler = Callable[["AdminAPI", web.BaseRequest, Params], Awaitable[web.StreamResponse]]


class AdminError(Exception):
    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def json_response(
    data: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        status=status,
        body=json.dumps(data, separators=(",", ":")).encode(),
        content_type=_JSON,
        headers=headers,
    )


def error_response(exc: AdminError) -> web.Response:
    return json_response(
        {"error": exc.code, "message": exc.message}, status=exc.status, headers=exc.headers
    )


def public_url(url: str) -> str:
    """``url`` without user info, query or fragment: nothing secret can remain."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    netloc = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def instance_summary(rt: Runtime, inst: Instance) -> dict[str, Any]:
    n = rt.smap.counts().get(inst.name, 0)
    reloader = rt.reloader
    return {
        "name": inst.name,
        "url": public_url(inst.config.url),
        "healthy": inst.healthy,
        "admin": inst.admin.value,
        "placeable": inst.placeable,
        "sessions": n,
        "capacity": inst.config.max_sessions,
        "weight": inst.config.weight,
        "load": round(load_ratio(inst, n), 4),
        # Gone from the config; leaves the fleet once its sessions have moved.
        "removed": reloader is not None and inst.name in reloader.retiring,
    }


def path_regex(path: str) -> re.Pattern[str]:
    """``/admin/x/{name}`` -> a full-match regex with one named group per parameter."""
    out, pos = [], 0
    for m in _PARAM.finditer(path):
        out.append(re.escape(path[pos : m.start()]))
        out.append(f"(?P<{m.group(1)}>[^/]+)")
        pos = m.end()
    out.append(re.escape(path[pos:]))
    return re.compile("".join(out))


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    pattern: re.Pattern[str]
    handler: Handler
    # The OpenAPI path template (``/admin/sessions/{session}``).
    path: str = ""
    # Its OpenAPI operation object; None: described from the handler's docstring.
    spec: dict[str, Any] | None = None


class AdminAPI:
    """The ``/admin`` handler: authenticate, match a route, answer JSON."""

    def __init__(self, get_runtime: Callable[[], Runtime]) -> None:
        self._get_runtime = get_runtime
        self.routes: list[Route] = [Route(m, path_regex(p), h, p) for m, p, h in ROUTES]
        self.listings = _Listings()

    def add_route(
        self, method: str, path: str, handler: Handler, spec: dict[str, Any] | None = None
    ) -> None:
        """Register one more endpoint: ``path`` is a template (``/admin/x/{name}``),
        ``spec`` its OpenAPI operation object (default: a summary from the handler)."""
        self.routes.append(Route(method, path_regex(path), handler, path, spec))

    @property
    def rt(self) -> Runtime:
        return self._get_runtime()

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        try:
            key = self.rt.config.admin_key
            if not key:
                raise AdminError(404, "not_found", "the admin API is disabled (no admin_key)")
            if not _authorized(request, key):
                raise AdminError(
                    401,
                    "unauthorized",
                    "missing or invalid admin key",
                    {"WWW-Authenticate": 'Bearer realm="session-router admin"'},
                )
            path = request.path.rstrip("/") or "/"
            allowed: list[str] = []
            for route in self.routes:
                match = route.pattern.fullmatch(path)
                if match is None:
                    continue
                if route.method != request.method:
                    allowed.append(route.method)
                    continue
                return await route.handler(self, request, match.groupdict())
            if allowed:
                raise AdminError(
                    405,
                    "method_not_allowed",
                    f"{request.method} is not allowed here",
                    {"Allow": ", ".join(sorted(set(allowed)))},
                )
            raise AdminError(404, "not_found", f"no admin endpoint {request.path}")
        except AdminError as exc:
            return error_response(exc)
        except MoveError as exc:
            return error_response(AdminError(exc.status, exc.code, exc.message))

    # -- helpers -----------------------------------------------------------------

    def discovery(self) -> Discovery:
        found = self.rt.discovery
        if found is None:
            raise AdminError(503, "unavailable", "discovery is not running")
        return found

    def migration(self) -> Migration:
        found = self.rt.migration
        if found is None:
            raise AdminError(503, "unavailable", "migration is not running")
        return found

    def instance(self, name: str) -> Instance:
        inst = self.rt.fleet.get(name)
        if inst is None:
            raise AdminError(404, "unknown_instance", f"no instance named {name!r}")
        return inst


def _authorized(request: web.BaseRequest, key: str) -> bool:
    given = request.headers.get("X-Admin-Key")
    if given is None:
        auth = request.headers.get("Authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer":
            return False
        given = token.strip()
    return hmac.compare_digest(given.encode(), key.encode())


def _session_param(params: Params) -> str:
    try:
        return valid_session_id(params["session"])
    except BadSessionId as exc:
        raise AdminError(400, "bad_session_id", str(exc)) from None


async def _read_json(request: web.BaseRequest) -> dict[str, Any]:
    if request.content_length is not None and request.content_length > _MAX_BODY:
        raise AdminError(413, "body_too_large", f"admin bodies are at most {_MAX_BODY} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > _MAX_BODY:
            raise AdminError(413, "body_too_large", f"admin bodies are at most {_MAX_BODY} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    if not body.strip():
        return {}
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise AdminError(400, "bad_json", "the body is not valid JSON") from None
    if not isinstance(data, dict):
        raise AdminError(400, "bad_json", "the body must be a JSON object")
    return data


def _number(request: web.BaseRequest, name: str, default: float, high: float) -> float:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise AdminError(400, "bad_parameter", f"{name} must be a number") from None
    if not 0 <= value <= high:
        raise AdminError(400, "bad_parameter", f"{name} must be between 0 and {high:g}")
    return value


# -- instances ---------------------------------------------------------------------


async def list_instances(api: AdminAPI, request: web.BaseRequest, p: Params) -> web.Response:
    rt = api.rt
    discovery = rt.discovery
    return json_response(
        {
            "instances": [instance_summary(rt, inst) for inst in rt.fleet],
            "sessions": len(rt.smap),
            "orphans": len(discovery.orphans) if discovery is not None else 0,
            "duplicates": len(discovery.duplicates) if discovery is not None else 0,
        }
    )


async def start_drain(api: AdminAPI, request: web.BaseRequest, p: Params) -> web.Response:
    inst = api.instance(p["name"])
    wait = _number(request, "wait", 0.0, MAX_WAIT)
    job = await api.migration().drain(inst.name)
    if wait > 0:
        await job.wait(wait)
    location = {"Location": f"/admin/instances/{inst.name}/drain"}
    return json_response(job.as_dict(), status=200 if job.done else 202, headers=location)


async def get_drain(api: AdminAPI, request: web.BaseRequest, p: Params) -> web.Response:
    inst = api.instance(p["name"])
    job = api.migration().jobs.get(inst.name)
    if job is None:
        raise AdminError(404, "no_drain", f"instance {inst.name!r} was not drained")
    wait = _number(request, "wait", 0.0, MAX_WAIT)
    if wait > 0:
        await job.wait(wait)
    return json_response(job.as_dict())


async def undrain(api: AdminAPI, request: web.BaseRequest, p: Params) -> web.Response:
    inst = api.migration().undrain(api.instance(p["name"]).name)
    return json_response(instance_summary(api.rt, inst))


async def maintenance(api: AdminAPI, request: web.BaseRequest, p: Params) -> web.Response:
    inst = api.migration().maintenance(api.instance(p["name"]).name)
    return json_response(instance_summary(api.rt, inst))


# -- sessions ---------------------------------------------------------------------


@dataclass(slots=True)
class _Listing:
    ids: list[str]
    used: float


class _Listings:
    """Snapshots of the map's ids that session-listing cursors walk (see module doc)."""

    def __init__(self) -> None:
        self._by_id: OrderedDict[str, _Listing] = OrderedDict()

    def _expire(self, now: float) -> None:
        for key in [k for k, v in self._by_id.items() if now - v.used > _LISTING_TTL]:
            del self._by_id[key]

    def add(self, ids: list[str]) -> str:
        now = time.monotonic()
        self._expire(now)
        while len(self._by_id) >= _LISTINGS:
            self._by_id.popitem(last=False)
        key = secrets.token_urlsafe(9)
        self._by_id[key] = _Listing(ids, now)
        return key

    def get(self, key: str) -> _Listing | None:
        now = time.monotonic()
        self._expire(now)
        listing = self._by_id.get(key)
        if listing is not None:
            listing.used = now
            self._by_id.move_to_end(key)
        return listing


async def list_sessions(api: AdminAPI, request: web.BaseRequest, p: Params) -> web.Response:
    rt = api.rt
    smap = rt.smap
    limit = int(_number(request, "limit", 100, MAX_PAGE))
    if limit < 1:
        raise AdminError(400, "bad_parameter", f"limit must be between 1 and {MAX_PAGE}")
    q = (request.query.get("q") or "").lower()
    prefix = request.query.get("prefix") or ""
    owner_filter = request.query.get("instance") or None
    cursor = request.query.get("cursor") or None

    listing_id: str | None = None
    ids: Iterable[str]
    if cursor is None:
        ids, offset = smap.ids(), 0
    else:
        listing_id, _, pos = cursor.rpartition(".")
        listing = api.listings.get(listing_id)
        if listing is None or not pos.isdigit():
            raise AdminError(410, "cursor_expired", "the cursor expired: start the listing again")
        offset = int(pos)
        snapshot = listing.ids
        # By index: neither a copy of the rest nor a walk past the first ``offset``.
        ids = (snapshot[i] for i in range(offset, len(snapshot)))

    pins = rt.pins
    peek = smap.peek
    found: list[dict[str, Any]] = []
    scanned = 0
    more = False
    # No await in this loop: the live view cannot change under it.
    for session in ids:
        if len(found) >= limit or scanned >= SCAN_BUDGET:
            more = True
            break
        scanned += 1
        if prefix and not session.startswith(prefix):
            continue
        if q and q not in session.lower():
            continue
        owner = peek(session)
        if owner is None or (owner_filter is not None and owner != owner_filter):
            continue
        found.append({"session": session, "instance": owner, "pinned": session in pins})
    next_cursor: str | None = None
    if more:
        if listing_id is None:
            # Same order as the scan above (nothing ran in between).
            listing_id = api.listings.add(list(smap.ids()))
        next_cursor = f"{listing_id}.{offset + scanned}"
    return json_response(
        {
            "sessions": found,
            "next_cursor": next_cursor,
            "scanned": scanned,
            "total": len(smap),
        }
    )


async def get_session(api: AdminAPI, request: web.BaseRequest, p: Params) -> web.Response:
    rt = api.rt
    session = _session_param(p)
    owner = peek_owner(rt.smap, session)
    if owner is None:
        try:
            owner = await rt.smap.fetch(session)
        except StoreUnavailable:
            owner = None
    if owner is None:
        raise AdminError(404, "unknown_session", f"session {session!r} is not mapped")
    inst = rt.fleet.get(owner)
    status: str | None = None
    if inst is not None:
        try:
            async with asyncio.timeout(rt.resolver.probe_timeout):
                info = await rt.adapter.probe(inst.http, inst.config, session)
            status = info.status.value if info is not None else "absent"
        except (aiohttp.ClientError, TimeoutError, OSError):
            status = "unreachable"
    discovery, migration = rt.discovery, rt.migration
    failover = getattr(rt, "failover", None)
    return json_response(
        {
            "session": session,
            "instance": owner,
            "known_instance": inst is not None,
            "instance_healthy": inst.healthy if inst is not None else None,
            "instance_admin": inst.admin.value if inst is not None else None,
            "status": status,
            "orphan": discovery is not None and session in discovery.orphans,
            "duplicate_on": list(discovery.duplicates.get(session, ()))
            if discovery is not None
            else [],
            "moving": migration is not None and migration.active(session),
            "recovering": bool(failover is not None and failover.recovering(session)),
            "pinned": session in rt.pins,
        }
    )


async def move_session(api: AdminAPI, request: web.BaseRequest, p: Params) -> web.Response:
    session = _session_param(p)
    body = await _read_json(request)
    to = body.get("to")
    if not isinstance(to, str) or not to:
        raise AdminError(400, "bad_request", 'the body must be {"to": "<instance name>"}')
    result = await api.migration().move(session, to)
    if result.ok:
        status = 200
    else:
        status = 409 if result.error in ("busy", "moved_meanwhile", "no_capacity") else 502
    return json_response(result.as_dict(), status=status)


async def forget_session(api: AdminAPI, request: web.BaseRequest, p: Params) -> web.Response:
    rt = api.rt
    session = _session_param(p)
    owner = peek_owner(rt.smap, session)
    if owner is None:
        raise AdminError(404, "unknown_session", f"session {session!r} is not mapped")
    await rt.smap.forget(session)
    rt.pins.discard(session)
    rt.events.add("forget", session=session, instance=owner, cause="admin")
    return json_response({"session": session, "forgotten": True, "instance": owner})


async def pin_session(api: AdminAPI, request: web.BaseRequest, p: Params) -> web.Response:
    rt = api.rt
    session = _session_param(p)
    body = await _read_json(request)
    name = body.get("instance", peek_owner(rt.smap, session))
    if name is None:
        raise AdminError(
            404, "unknown_session", f"session {session!r} is not mapped: name an instance"
        )
    if not isinstance(name, str) or not name:
        raise AdminError(400, "bad_request", 'the body must be {"instance": "<instance name>"}')
    inst = api.instance(name)
    migration = rt.migration
    if (migration is not None and migration.active(session)) or rt.failover.recovering(session):
        raise AdminError(409, "busy", f"session {session!r} is being moved or recovered")
    try:
        async with rt.locks.hold(session, rt.config.failover.lock_ttl):
            info = await _probe(rt, inst, session)
            if info is None or info.status not in RUNNING:
                there = f" (it is {info.status.value} there)" if info is not None else ""
                raise AdminError(
                    409, "not_running", f"session {session!r} does not run on {name!r}{there}"
                )
            previous = peek_owner(rt.smap, session)
            if previous != inst.name:
                await rt.resolver.record(session, inst)
    except LockBusy:
        raise AdminError(
            409, "busy", f"session {session!r} is locked by a move or a failover"
        ) from None
    except StoreUnavailable:
        raise AdminError(503, "store_unavailable", "cannot take the session's lock") from None
    rt.pins.add(session)
    rt.events.add("pin", session=session, instance=inst.name, previous=previous)
    return json_response(
        {
            "session": session,
            "instance": inst.name,
            "previous": previous,
            "status": info.status.value,
            "pinned": True,
        }
    )


async def unpin_session(api: AdminAPI, request: web.BaseRequest, p: Params) -> web.Response:
    rt = api.rt
    session = _session_param(p)
    was = session in rt.pins
    rt.pins.discard(session)
    if was:
        rt.events.add("unpin", session=session)
    return json_response({"session": session, "pinned": False, "was_pinned": was})


async def _probe(rt: Runtime, inst: Instance, session: str) -> SessionInfo | None:
    try:
        async with asyncio.timeout(rt.resolver.probe_timeout):
            return await rt.adapter.probe(inst.http, inst.config, session)
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        raise AdminError(
            502, "instance_unreachable", f"instance {inst.name!r} did not answer: {exc!r}"
        ) from None


# -- fleet-wide ---------------------------------------------------------------------


async def events(api: AdminAPI, request: web.BaseRequest, p: Params) -> web.Response:
    limit = int(_number(request, "limit", 100, 10_000))
    kind = request.query.get("kind") or None
    return json_response({"events": api.rt.events.recent(limit, kind)})


async def reconcile(api: AdminAPI, request: web.BaseRequest, p: Params) -> web.Response:
    result = await api.discovery().reconcile_now()
    return json_response(result.as_dict())


async def reload_config(api: AdminAPI, request: web.BaseRequest, p: Params) -> web.Response:
    reloader = api.rt.reloader
    if reloader is None:
        raise AdminError(503, "unavailable", "reload is not available")
    try:
        result = await reloader.reload("api")
    except ReloadUnavailable as exc:
        raise AdminError(409, "no_config_file", str(exc)) from None
    if not result.ok:
        return json_response(
            {**result.as_dict(), "error": "config_rejected", "message": result.error},
            status=422,
        )
    return json_response(result.as_dict())


async def reload_status(api: AdminAPI, request: web.BaseRequest, p: Params) -> web.Response:
    reloader = api.rt.reloader
    if reloader is None:
        raise AdminError(503, "unavailable", "reload is not available")
    return json_response(reloader.status())


async def openapi(api: AdminAPI, request: web.BaseRequest, p: Params) -> web.Response:
    return json_response(document(api.routes, webhooks=api.rt.config.webhooks is not None))


ROUTES: list[tuple[str, str, Handler]] = [
    ("GET", "/admin/instances", list_instances),
    ("POST", "/admin/instances/{name}/drain", start_drain),
    ("GET", "/admin/instances/{name}/drain", get_drain),
    ("POST", "/admin/instances/{name}/undrain", undrain),
    ("POST", "/admin/instances/{name}/maintenance", maintenance),
    ("GET", "/admin/sessions", list_sessions),
    ("GET", "/admin/sessions/{session}", get_session),
    ("DELETE", "/admin/sessions/{session}", forget_session),
    ("POST", "/admin/sessions/{session}/move", move_session),
    ("POST", "/admin/sessions/{session}/pin", pin_session),
    ("DELETE", "/admin/sessions/{session}/pin", unpin_session),
    ("GET", "/admin/events", events),
    ("POST", "/admin/reconcile", reconcile),
    ("POST", "/admin/reload", reload_config),
    ("GET", "/admin/reload", reload_status),
    ("GET", "/admin/openapi.json", openapi),
]
