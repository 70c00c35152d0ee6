"""The admin API: ``/admin/...``, JSON in and out, behind its own key.

Authentication: ``RouterConfig.admin_key``, sent as ``X-Admin-Key: KEY`` or
``Authorization: Bearer KEY`` and compared in constant time. Without it,
401; with no ``admin_key`` configured the admin API does not exist (404 for
every ``/admin`` path). Client keys (``api_keys``) never open it, and no
answer ever carries an instance's api key (instance URLs are shown without
user info or query string).

Endpoints: each handler below is declared with ``@route(method, path
template, Operation)``; the operation names the models of its body and of
each answer (``router.admin_models``), from which ``router.openapi``
generates the OpenAPI 3.1 document (``GET /admin/openapi.json``). Requests
are routed by aiohttp's ``UrlDispatcher`` (path templates; a known path with
another method answers 405 with ``Allow``). Errors are ``{"error": code,
"message": text}`` with a fitting status.

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
import json
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, cast
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import msgspec
from aiohttp import web

from router import admin_models as m
from router.adapters.base import BadSessionId, SessionInfo, valid_session_id
from router.errors import RouterError, error_response, request_id_of
from router.instances import Instance
from router.keys import admin_key_of, matches
from router.locks import LockBusy
from router.openapi import Operation, Param, bounded, describe, document
from router.pacing import plan_of
from router.placement import labels_of, load_ratio
from router.probe import RUNNING
from router.reload import ReloadUnavailable
from router.store.base import StoreUnavailable

if TYPE_CHECKING:
    from aiohttp.web_urldispatcher import AbstractRoute, UrlMappingMatchInfo

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

Params = Mapping[str, str]
Handler = Callable[["AdminAPI", web.BaseRequest, Params], Awaitable[web.StreamResponse]]
_M = TypeVar("_M", bound=m.Model)
_encode = msgspec.json.Encoder().encode


def json_response(
    data: m.Model | dict[str, Any], status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(status=status, body=_encode(data), content_type=_JSON, headers=headers)


def public_url(url: str) -> str:
    """``url`` without user info, query or fragment: nothing secret can remain."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    netloc = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def instance_summary(rt: Runtime, inst: Instance) -> m.Instance:
    n = rt.smap.counts().get(inst.name, 0)
    reloader = rt.reloader
    return m.Instance(
        name=inst.name,
        url=public_url(inst.config.url),
        healthy=inst.healthy,
        admin=inst.admin,
        placeable=inst.placeable,
        sessions=n,
        capacity=inst.config.max_sessions,
        weight=inst.config.weight,
        load=round(load_ratio(inst, n), 4),
        # Gone from the config; leaves the fleet once its sessions have moved.
        removed=reloader is not None and inst.name in reloader.retiring,
        labels=dict(labels_of(inst)),
    )


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    # An aiohttp path template (``/admin/sessions/{session}``), also the OpenAPI path.
    path: str
    handler: Handler
    operation: Operation


# The admin API's routes, in the order of the handlers below (``@route``).
ROUTES: list[Route] = []


def route(method: str, path: str, operation: Operation) -> Callable[[Handler], Handler]:
    def register(handler: Handler) -> Handler:
        ROUTES.append(Route(method, path, handler, operation))
        return handler

    return register


async def _called_by_admin_api(request: web.Request) -> web.StreamResponse:
    # UrlDispatcher wants an aiohttp handler per route; AdminAPI calls the Route's own.
    raise NotImplementedError


class AdminAPI:
    """The ``/admin`` handler: authenticate, route (aiohttp's UrlDispatcher), answer JSON."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.routes: list[Route] = []
        self._dispatcher = web.UrlDispatcher()
        self._by_route: dict[AbstractRoute, Route] = {}
        self.listings = _Listings()
        for r in ROUTES:
            self._register(r)

    def add_route(
        self, method: str, path: str, handler: Handler, operation: Operation | None = None
    ) -> None:
        """Register one more endpoint: ``path`` is a template (``/admin/x/{name}``),
        ``operation`` its OpenAPI description (default: a summary from the handler)."""
        self._register(Route(method, path, handler, operation or describe(handler, path)))

    def _register(self, r: Route) -> None:
        self._by_route[self._dispatcher.add_route(r.method, r.path, _called_by_admin_api)] = r
        self.routes.append(r)

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        try:
            key = self.rt.config.admin_key
            if not key:
                raise RouterError(404, "not_found", "the admin API is disabled (no admin_key)")
            if not matches(admin_key_of(request), (key,)):
                raise RouterError(
                    401,
                    "unauthorized",
                    "missing or invalid admin key",
                    headers={"WWW-Authenticate": 'Bearer realm="session-router admin"'},
                )
            match = await self._resolve(request)
            exc = match.http_exception
            if isinstance(exc, web.HTTPMethodNotAllowed):
                raise RouterError(
                    405,
                    "method_not_allowed",
                    f"{request.method} is not allowed here",
                    headers={"Allow": ", ".join(sorted(exc.allowed_methods))},
                )
            if exc is not None:
                raise RouterError(404, "not_found", f"no admin endpoint {request.path}")
            r = self._by_route[match.route]
            return await r.handler(self, request, match)
        except RouterError as exc:
            # One envelope for proxy, admin and webhook errors (router.errors).
            return error_response(exc, request_id_of(request))

    async def _resolve(self, request: web.BaseRequest) -> UrlMappingMatchInfo:
        # ``resolve`` reads only ``method`` and ``rel_url``, which a BaseRequest (what
        # the low-level server makes) has too. A trailing slash is ignored, as ever.
        url = request.rel_url
        if len(url.raw_path) > 1 and url.raw_path.endswith("/"):
            request = request.clone(rel_url=url.with_path(url.raw_path.rstrip("/"), encoded=True))
        return await self._dispatcher.resolve(cast(web.Request, request))

    def document(self) -> dict[str, Any]:
        """The OpenAPI document of every route (and the relay's when it runs)."""
        routes = [(r.method, r.path, r.operation) for r in self.routes]
        return document(routes, webhooks=self.rt.config.webhooks is not None)

    # -- helpers -----------------------------------------------------------------

    def instance(self, name: str) -> Instance:
        inst = self.rt.fleet.get(name)
        if inst is None:
            raise RouterError(404, "unknown_instance", f"no instance named {name!r}")
        return inst


def _session_param(params: Params) -> str:
    try:
        return valid_session_id(params["session"])
    except BadSessionId as exc:
        raise RouterError(400, "bad_session_id", str(exc)) from None


async def _read_json(request: web.BaseRequest) -> dict[str, Any]:
    if request.content_length is not None and request.content_length > _MAX_BODY:
        raise RouterError(413, "body_too_large", f"admin bodies are at most {_MAX_BODY} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > _MAX_BODY:
            raise RouterError(413, "body_too_large", f"admin bodies are at most {_MAX_BODY} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    if not body.strip():
        return {}
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise RouterError(400, "bad_json", "the body is not valid JSON") from None
    if not isinstance(data, dict):
        raise RouterError(400, "bad_json", "the body must be a JSON object")
    return data


async def _read(request: web.BaseRequest, model: type[_M], usage: str) -> _M:
    """The body as ``model`` (an empty body is ``{}``); 400 ``usage`` when it does not fit."""
    data = await _read_json(request)
    try:
        return msgspec.convert(data, model)
    except msgspec.ValidationError:
        raise RouterError(400, "bad_request", f"the body must be {usage}") from None


def _number(request: web.BaseRequest, name: str, default: float, high: float) -> float:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise RouterError(400, "bad_parameter", f"{name} must be a number") from None
    if not 0 <= value <= high:
        raise RouterError(400, "bad_parameter", f"{name} must be between 0 and {high:g}")
    return value


# Answers several endpoints share.
_UNKNOWN_INSTANCE = "No such instance."
_NOT_MAPPED = "Not mapped."
_BAD_PARAMETER = "Bad parameter."
_BAD_SESSION = "Invalid session id."
_TOO_LARGE = "The body is over 64 KiB."
_WAIT = Param(
    "wait",
    bounded(float, 0, MAX_WAIT, 0),
    f"Seconds to wait for the drain to finish before answering (0..{MAX_WAIT:g}).",
)

# -- instances ---------------------------------------------------------------------


@route(
    "GET",
    "/admin/instances",
    Operation(
        "Every instance with health, admin state and load",
        {200: ("The fleet.", m.Fleet)},
        tag="instances",
        operation_id="listInstances",
    ),
)
async def list_instances(api: AdminAPI, request: web.BaseRequest, p: Params) -> web.Response:
    rt = api.rt
    discovery = rt.discovery
    return json_response(
        m.Fleet(
            instances=[instance_summary(rt, inst) for inst in rt.fleet],
            sessions=len(rt.smap),
            orphans=len(discovery.orphans),
            duplicates=len(discovery.duplicates),
        )
    )


@route(
    "POST",
    "/admin/instances/{name}/drain",
    Operation(
        "Move every session off an instance and keep it empty",
        {
            200: ("The drain finished.", m.DrainJob),
            202: ("The drain is running (Location: where to follow it).", m.DrainJob),
            400: _BAD_PARAMETER,
            404: _UNKNOWN_INSTANCE,
        },
        tag="instances",
        operation_id="drainInstance",
        description="Runs in the background; `wait` waits for it up to that many seconds.",
        query=(_WAIT,),
    ),
)
async def start_drain(api: AdminAPI, request: web.BaseRequest, p: Params) -> web.Response:
    inst = api.instance(p["name"])
    wait = _number(request, "wait", 0.0, MAX_WAIT)
    job = await api.rt.migration.drain(inst.name)
    if wait > 0:
        await job.wait(wait)
    location = {"Location": f"/admin/instances/{inst.name}/drain"}
    body = msgspec.convert(job.as_dict(), m.DrainJob)
    return json_response(body, status=200 if job.done else 202, headers=location)


@route(
    "GET",
    "/admin/instances/{name}/drain",
    Operation(
        "The instance's last drain",
        {
            200: ("The drain job.", m.DrainJob),
            400: _BAD_PARAMETER,
            404: "No such instance, or it was never drained.",
        },
        tag="instances",
        operation_id="getDrain",
        query=(_WAIT,),
    ),
)
async def get_drain(api: AdminAPI, request: web.BaseRequest, p: Params) -> web.Response:
    inst = api.instance(p["name"])
    job = api.rt.migration.jobs.get(inst.name)
    if job is None:
        raise RouterError(404, "no_drain", f"instance {inst.name!r} was not drained")
    wait = _number(request, "wait", 0.0, MAX_WAIT)
    if wait > 0:
        await job.wait(wait)
    return json_response(msgspec.convert(job.as_dict(), m.DrainJob))


@route(
    "POST",
    "/admin/instances/{name}/undrain",
    Operation(
        "Back to active (a running drain starts no further moves)",
        {200: ("The instance.", m.Instance), 404: _UNKNOWN_INSTANCE},
        tag="instances",
        operation_id="undrainInstance",
    ),
)
async def undrain(api: AdminAPI, request: web.BaseRequest, p: Params) -> web.Response:
    inst = api.rt.migration.undrain(api.instance(p["name"]).name)
    return json_response(instance_summary(api.rt, inst))


@route(
    "POST",
    "/admin/instances/{name}/maintenance",
    Operation(
        "No new sessions; existing ones stay",
        {200: ("The instance.", m.Instance), 404: _UNKNOWN_INSTANCE},
        tag="instances",
        operation_id="maintenanceInstance",
    ),
)
async def maintenance(api: AdminAPI, request: web.BaseRequest, p: Params) -> web.Response:
    inst = api.rt.migration.maintenance(api.instance(p["name"]).name)
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


@route(
    "GET",
    "/admin/sessions",
    Operation(
        "The session map, paged and searchable",
        {
            200: ("One page.", m.SessionPage),
            400: _BAD_PARAMETER,
            410: "The cursor expired (2 minutes unused): start again.",
        },
        tag="sessions",
        operation_id="listSessions",
        description=(
            "Pages follow the map's own order (not sorted). A page stops after `limit` "
            f"matches or {SCAN_BUDGET:,} scanned entries; follow `next_cursor` until null."
        ),
        query=(
            Param("q", str, "Case-insensitive substring of the session id."),
            Param("prefix", str, "Case-sensitive prefix of the session id."),
            Param("instance", str, "Only sessions mapped to this instance."),
            Param("limit", bounded(int, 1, MAX_PAGE, 100), "Sessions per page."),
            Param("cursor", str, "next_cursor of the previous page."),
        ),
    ),
)
async def list_sessions(api: AdminAPI, request: web.BaseRequest, p: Params) -> web.Response:
    rt = api.rt
    smap = rt.smap
    limit = int(_number(request, "limit", 100, MAX_PAGE))
    if limit < 1:
        raise RouterError(400, "bad_parameter", f"limit must be between 1 and {MAX_PAGE}")
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
            raise RouterError(410, "cursor_expired", "the cursor expired: start the listing again")
        offset = int(pos)
        snapshot = listing.ids
        # By index: neither a copy of the rest nor a walk past the first ``offset``.
        ids = (snapshot[i] for i in range(offset, len(snapshot)))

    pins = rt.pins
    peek = smap.peek
    found: list[m.SessionRow] = []
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
        found.append(m.SessionRow(session, owner, session in pins))
    next_cursor: str | None = None
    if more:
        if listing_id is None:
            # Same order as the scan above (nothing ran in between).
            listing_id = api.listings.add(list(smap.ids()))
        next_cursor = f"{listing_id}.{offset + scanned}"
    return json_response(m.SessionPage(found, next_cursor, scanned, len(smap)))


@route(
    "GET",
    "/admin/sessions/{session}",
    Operation(
        "Where a session is mapped, and its state there",
        {200: ("The session.", m.Session), 400: _BAD_SESSION, 404: _NOT_MAPPED},
        tag="sessions",
        operation_id="getSession",
    ),
)
async def get_session(api: AdminAPI, request: web.BaseRequest, p: Params) -> web.Response:
    rt = api.rt
    session = _session_param(p)
    owner = rt.smap.peek(session)
    if owner is None:
        try:
            owner = await rt.smap.fetch(session)
        except StoreUnavailable:
            owner = None
    if owner is None:
        raise RouterError(404, "unknown_session", f"session {session!r} is not mapped")
    inst = rt.fleet.get(owner)
    status: m.ProbeStatus | None = None
    if inst is not None:
        try:
            async with asyncio.timeout(rt.resolver.probe.timeout):
                info = await rt.adapter.probe(inst.http, inst.config, session)
            status = info.status.value if info is not None else "absent"
        except (aiohttp.ClientError, TimeoutError, OSError):
            status = "unreachable"
    discovery, migration = rt.discovery, rt.migration
    choice = await rt.placer.choice_of(session)
    return json_response(
        m.Session(
            session=session,
            instance=owner,
            known_instance=inst is not None,
            instance_healthy=inst.healthy if inst is not None else None,
            instance_admin=inst.admin if inst is not None else None,
            status=status,
            orphan=session in discovery.orphans,
            duplicate_on=list(discovery.duplicates.get(session, ())),
            moving=migration.active(session),
            recovering=rt.failover.recovering(session),
            pinned=session in rt.pins,
            selector=str(choice.selector),
            selector_source=choice.source,
            selector_strict=choice.strict,
            within_selector=choice.selector.matches(labels_of(inst)) if inst is not None else None,
        )
    )


@route(
    "POST",
    "/admin/sessions/{session}/move",
    Operation(
        "Move a session to a named instance (stop there, start here)",
        {
            200: ("Moved (or already there).", m.MoveResult),
            400: "Bad body or session id.",
            404: "Unknown session or instance.",
            409: "Target not healthy / active / full, or the session is busy.",
            413: _TOO_LARGE,
            502: ("The move ran and failed.", m.MoveResult),
        },
        tag="sessions",
        operation_id="moveSession",
        body=m.MoveRequest,
    ),
)
async def move_session(api: AdminAPI, request: web.BaseRequest, p: Params) -> web.Response:
    session = _session_param(p)
    body = await _read(request, m.MoveRequest, '{"to": "<instance name>"}')
    result = await api.rt.migration.move(session, body.to)
    if result.ok:
        status = 200
    else:
        status = 409 if result.error in ("busy", "moved_meanwhile", "no_capacity") else 502
    return json_response(msgspec.convert(result.as_dict(), m.MoveResult), status=status)


@route(
    "DELETE",
    "/admin/sessions/{session}",
    Operation(
        "Forget the map entry (the instances are not touched)",
        {200: ("Forgotten.", m.Forgotten), 400: _BAD_SESSION, 404: _NOT_MAPPED},
        tag="sessions",
        operation_id="forgetSession",
    ),
)
async def forget_session(api: AdminAPI, request: web.BaseRequest, p: Params) -> web.Response:
    rt = api.rt
    session = _session_param(p)
    owner = rt.smap.peek(session)
    if owner is None:
        raise RouterError(404, "unknown_session", f"session {session!r} is not mapped")
    await rt.smap.forget(session)
    rt.pins.discard(session)
    rt.events.add("forget", session=session, instance=owner, cause="admin")
    return json_response(m.Forgotten(session, True, owner))


@route(
    "POST",
    "/admin/sessions/{session}/pin",
    Operation(
        "Map a session to the instance it runs on and keep rebalancing off it",
        {
            200: ("Pinned.", m.Pin),
            400: "Bad body or session id.",
            404: "Unknown instance, or no instance named and the session is not mapped.",
            409: "It does not run there (not_running), or it is being moved (busy).",
            413: _TOO_LARGE,
            502: "The instance did not answer.",
            503: "The session's lock is out of reach (store_unavailable).",
        },
        tag="sessions",
        operation_id="pinSession",
        description=(
            "The instance is probed first. Without a body, the mapped owner is pinned. "
            "Drains, moves and failovers still move a pinned session."
        ),
        body=m.PinRequest,
        body_required=False,
    ),
)
async def pin_session(api: AdminAPI, request: web.BaseRequest, p: Params) -> web.Response:
    rt = api.rt
    session = _session_param(p)
    body = await _read(request, m.PinRequest, '{"instance": "<instance name>"}')
    name = rt.smap.peek(session) if body.instance is msgspec.UNSET else body.instance
    if name is None:
        raise RouterError(
            404, "unknown_session", f"session {session!r} is not mapped: name an instance"
        )
    inst = api.instance(name)
    if rt.migration.active(session) or rt.failover.recovering(session):
        raise RouterError(409, "busy", f"session {session!r} is being moved or recovered")
    try:
        async with rt.locks.hold(session, rt.config.failover.lock_ttl):
            info = await _probe(rt, inst, session)
            if info is None or info.status not in RUNNING:
                there = f" (it is {info.status.value} there)" if info is not None else ""
                raise RouterError(
                    409, "not_running", f"session {session!r} does not run on {name!r}{there}"
                )
            previous = rt.smap.peek(session)
            if previous != inst.name:
                await rt.resolver.record(session, inst)
    except LockBusy:
        raise RouterError(
            409, "busy", f"session {session!r} is locked by a move or a failover"
        ) from None
    except StoreUnavailable:
        raise RouterError(503, "store_unavailable", "cannot take the session's lock") from None
    rt.pins.add(session)
    rt.events.add("pin", session=session, instance=inst.name, previous=previous)
    return json_response(m.Pin(session, inst.name, previous, info.status, True))


@route(
    "DELETE",
    "/admin/sessions/{session}/pin",
    Operation(
        "Unpin a session",
        {200: ("Unpinned.", m.Unpin), 400: _BAD_SESSION},
        tag="sessions",
        operation_id="unpinSession",
    ),
)
async def unpin_session(api: AdminAPI, request: web.BaseRequest, p: Params) -> web.Response:
    rt = api.rt
    session = _session_param(p)
    was = session in rt.pins
    rt.pins.discard(session)
    if was:
        rt.events.add("unpin", session=session)
    return json_response(m.Unpin(session, False, was))


@route(
    "GET",
    "/admin/sessions/{session}/pacing",
    Operation(
        "A session's send pacing: its rule, the sends in each window, its next slot",
        {
            200: ("Its pacing state.", m.Pacing),
            400: _BAD_SESSION,
            503: "The pacing store is out of reach (pacing_unavailable).",
        },
        tag="sessions",
        operation_id="getSessionPacing",
        description=(
            "Counts include slots reserved ahead of now (sends still waiting, on any "
            "replica). Asking reserves nothing; the session need not be mapped."
        ),
    ),
)
async def session_pacing(api: AdminAPI, request: web.BaseRequest, p: Params) -> web.Response:
    rt = api.rt
    session = _session_param(p)
    cfg = rt.config.pacing
    rule = cfg.rule_for(session)
    answer = m.Pacing(session, cfg.enabled, cfg.max_wait, None, None, None, None, 0, 0.0, None)
    if rule is None:
        return json_response(answer)
    answer.rule = msgspec.convert(rule, m.PacingRule, from_attributes=True)
    if not rule.limits_anything:
        return json_response(answer)
    try:
        usage = await rt.pacer.usage(session, plan_of(rule))
    except StoreUnavailable:
        raise RouterError(
            503,
            "pacing_unavailable",
            "the pacing store is unreachable",
            session=session,
            headers={"Retry-After": "5"},
        ) from None

    def count(limit: int, used: int) -> m.PacingCount | None:
        return m.PacingCount(limit, used) if limit else None

    answer.per_minute = count(rule.per_minute, usage.counts.get("per_minute", 0))
    answer.per_hour = count(rule.per_hour, usage.counts.get("per_hour", 0))
    answer.recipients_per_day = count(rule.recipients_per_day, usage.recipients)
    answer.queued = usage.queued
    answer.next_slot_in = round(usage.next_slot_in, 3)
    answer.held_by = usage.held_by
    return json_response(answer)


async def _probe(rt: Runtime, inst: Instance, session: str) -> SessionInfo | None:
    try:
        async with asyncio.timeout(rt.resolver.probe.timeout):
            return await rt.adapter.probe(inst.http, inst.config, session)
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        raise RouterError(
            502, "instance_unreachable", f"instance {inst.name!r} did not answer: {exc!r}"
        ) from None


# -- fleet-wide ---------------------------------------------------------------------


@route(
    "GET",
    "/admin/events",
    Operation(
        "Recent failovers, health changes, moves and reloads, oldest first",
        {200: ("The events.", m.Events), 400: _BAD_PARAMETER},
        tag="fleet",
        operation_id="listEvents",
        query=(
            Param("limit", bounded(int, 0, 10_000, 100), "At most this many (the latest)."),
            Param(
                "kind",
                str,
                "Only kinds starting with this (failover, down, healthy, ejected, move, "
                "drain, config_reload, ...).",
            ),
        ),
    ),
)
async def events(api: AdminAPI, request: web.BaseRequest, p: Params) -> web.Response:
    limit = int(_number(request, "limit", 100, 10_000))
    kind = request.query.get("kind") or None
    return json_response(m.Events(api.rt.events.recent(limit, kind)))


@route(
    "POST",
    "/admin/reconcile",
    Operation(
        "One reconcile round now (list every instance, fix the map)",
        {200: ("The round's report.", m.ReconcileRound)},
        tag="fleet",
        operation_id="reconcile",
    ),
)
async def reconcile(api: AdminAPI, request: web.BaseRequest, p: Params) -> web.Response:
    result = await api.rt.discovery.reconcile_now()
    return json_response(msgspec.convert(result.as_dict(), m.ReconcileRound))


_NO_RELOAD = "Reload is not available."


@route(
    "POST",
    "/admin/reload",
    Operation(
        "Reload the config file",
        {
            200: ("Applied.", m.Reload),
            409: "The config did not come from a file.",
            422: ("Rejected; the config in force stays.", m.ReloadRejected),
            503: _NO_RELOAD,
        },
        tag="config",
        operation_id="reload",
        description=(
            "Parsed and validated first; a bad file changes nothing (422 with file:line: "
            "reason). listen, store and webhooks changes wait for a restart "
            "(restart_required)."
        ),
    ),
)
async def reload_config(api: AdminAPI, request: web.BaseRequest, p: Params) -> web.Response:
    reloader = api.rt.reloader
    if reloader is None:
        raise RouterError(503, "unavailable", "reload is not available")
    try:
        result = await reloader.reload("api")
    except ReloadUnavailable as exc:
        raise RouterError(409, "no_config_file", str(exc)) from None
    if not result.ok:
        rejected = {**result.as_dict(), "error": "config_rejected", "message": result.error}
        return json_response(msgspec.convert(rejected, m.ReloadRejected), status=422)
    return json_response(msgspec.convert(result.as_dict(), m.Reload))


@route(
    "GET",
    "/admin/reload",
    Operation(
        "The config file, the last reload and the file watch",
        {200: ("Reload status.", m.ReloadStatus), 503: _NO_RELOAD},
        tag="config",
        operation_id="reloadStatus",
    ),
)
async def reload_status(api: AdminAPI, request: web.BaseRequest, p: Params) -> web.Response:
    reloader = api.rt.reloader
    if reloader is None:
        raise RouterError(503, "unavailable", "reload is not available")
    return json_response(msgspec.convert(reloader.status(), m.ReloadStatus))


@route(
    "GET",
    "/admin/keys",
    Operation(
        "The client keys in force: a fingerprint each, and the sessions it may reach",
        {200: ("The keys, in config order (never a key itself).", m.ClientKeys)},
        tag="config",
        operation_id="listClientKeys",
    ),
)
async def client_keys(api: AdminAPI, request: web.BaseRequest, p: Params) -> web.Response:
    clients = api.rt.snap.clients.clients
    keys = [
        m.ClientKeyInfo(c.fingerprint, list(c.scope.entries) if c.scope is not None else None)
        for c in clients
    ]
    return json_response(m.ClientKeys(bool(clients), keys))


@route(
    "GET",
    "/admin/openapi.json",
    Operation(
        "This document",
        {200: ("An OpenAPI 3.1 document.", dict[str, Any])},
        tag="meta",
        operation_id="openapi",
    ),
)
async def openapi(api: AdminAPI, request: web.BaseRequest, p: Params) -> web.Response:
    return json_response(api.document())
