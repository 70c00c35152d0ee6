"""The request path: authenticate, find the session, find its owner, forward.

One streaming path for every method. Request bodies are buffered only when
the adapter needs the JSON (session id or credential in the body) or when
they are small enough to keep for a safe replay; everything else streams.
Responses stream back chunk by chunk (SSE and chunked replies are flushed
as they arrive); small responses with a known length are sent in one write.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, quote_plus, unquote

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, MultiDict

from router import body as body_io
from router import metrics
from router.adapters.base import (
    Adapter,
    Answer,
    BadSessionId,
    Extraction,
    InstanceHealth,
    UpstreamRequest,
)
from router.backoff import backoff
from router.errors import REQUEST_ID_HEADER, RouterError, error_response, request_id_of
from router.idempotency import (
    IDEMPOTENCY_HEADER,
    REPLAYED_HEADER,
    StoredResponse,
    scoped_key,
)
from router.instances import Instance
from router.labels import NO_CHOICE, PLACEMENT_NOTE, Choice, SelectorError
from router.listings import Listings
from router.locks import LockBusy
from router.metrics import (
    IDEMPOTENT_REPLAYS,
    IN_FLIGHT,
    REQUEST_DURATION,
    REQUESTS,
    RETRIES,
    RETRIES_DENIED,
    ROUTER_ERRORS,
    UPSTREAM_DURATION,
    UPSTREAM_ERRORS,
)
from router.pacing import pace
from router.paths import path_problem
from router.placement import labels_of
from router.probe import ProbeState
from router.readiness import Ready
from router.resolver import Unanswered
from router.retry import Replays, may_replay
from router.scoping import Client, Scope, admit, unknown_session
from router.snapshot import Snapshot
from router.store.base import StoreUnavailable
from router.transport import (
    Body,
    ConnectFailed,
    InstanceDown,
    UpstreamError,
    UpstreamResponse,
    UpstreamTimeout,
    error_kind,
)
from router.upstream import (
    add_forwarded,
    filtered_request_headers,
    is_websocket_handshake,
    response_headers,
    upstream_path_qs,
)
from router.websocket import proxy_websocket, proxy_websocket_fanout

if TYPE_CHECKING:
    from router.runtime import Runtime

log = logging.getLogger(__name__)

# Bodies up to this size are read whole even when the adapter does not need
# them: one write upstream instead of a stream, and replayable after a
# connection failure that provably happened before the upstream got it.
SMALL_BODY = 64 * 1024
# Responses up to this size with a known length go back in one write.
SMALL_RESPONSE = 256 * 1024

_METHODS_WITHOUT_BODY = frozenset({"GET", "HEAD", "OPTIONS", "DELETE", "TRACE"})


@dataclass(slots=True, eq=False)
class Call:
    """One client request on its way through the steps of ``ProxyHandler``."""

    request: web.BaseRequest
    request_id: str
    # The config, adapter, fleet and keys in force when it arrived, for all
    # of its life: a reload meanwhile never mixes two of them in one request.
    snap: Snapshot
    ureq: UpstreamRequest
    body: bytes | None
    ext: Extraction
    websocket: bool
    # The sessions the client's key may reach (router.scoping); None: all.
    scope: Scope | None = None
    # A create's selector (router.labels), once placed: kept with the session
    # when the client's header chose it, and kept to by a re-placement.
    placement: Choice | None = None

    @property
    def session(self) -> str | None:
        return self.ext.session

    @property
    def streamed(self) -> bool:
        """The body goes upstream as it comes (it was not read whole)."""
        return self.body is None and self.request.body_exists


@dataclass(frozen=True, slots=True)
class Route:
    """Where a call goes: the session's owner, or a new placement (a create,
    with a reservation held while it is in flight, and never recovered)."""

    instance: Instance
    placed: bool = False


class ProxyHandler:
    """The aiohttp handler for every client request (the steps are in
    docs/architecture.md, one method each)."""

    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime
        self.live = runtime.live
        # Request bodies held in memory, all requests together (limits).
        self.budget = body_io.BodyBudget(runtime.config.limits.max_buffered_bytes)
        # One create per session name at a time in this process (the session
        # lock covers replicas); an entry lives while a create uses it.
        self._creates: dict[str, _CreateLock] = {}
        self.listings = Listings(runtime.smap, runtime.events)

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        request_id = request_id_of(request)
        request[_STARTED] = time.monotonic()
        body_io.begin(request)
        IN_FLIGHT.value += 1
        try:
            return await self._handle(request, request_id)
        except RouterError as exc:
            ROUTER_ERRORS.labels(exc.error).inc()
            return error_response(exc, request_id)
        except body_io.ClientGone:
            # It left mid-body: nobody reads this answer, and it is no error of ours.
            return web.Response(status=400)
        except Exception:
            # A bug must still answer JSON, never a traceback.
            log.exception("unexpected error handling request %s", request_id)
            ROUTER_ERRORS.labels("internal").inc()
            return error_response(
                RouterError(500, "internal_error", "the router failed to handle this request"),
                request_id,
            )
        finally:
            IN_FLIGHT.value -= 1
            body_io.release(request, self.budget)

    async def _handle(self, request: web.BaseRequest, request_id: str) -> web.StreamResponse:
        snap = self.live.snap
        adapter = snap.adapter
        path = request.path
        if path in adapter.health_paths and request.method in ("GET", "HEAD"):
            fleet = [InstanceHealth(i.name, i.healthy, i.last_health) for i in snap.fleet]
            return _answer_json(adapter.health_answer(path, fleet), request_id)
        call = await self._intake(request, request_id, snap)
        if call.ext.fanout and call.websocket:
            allows = call.scope.allows if call.scope is not None else None
            return await proxy_websocket_fanout(
                self.rt, request, call.ureq, request_id, allows=allows
            )
        idem = request.headers.get(IDEMPOTENCY_HEADER)
        if idem is not None:
            return await self._idempotent(call, idem)
        return await self._dispatch(call)

    # -- 1. intake: what the request is, and who may send it --------------------------

    async def _intake(self, request: web.BaseRequest, request_id: str, snap: Snapshot) -> Call:
        """Path checks, the router key (before the body wherever it is outside
        it), the body (bounded, decoded, parsed as the upstream would), the
        session."""
        adapter = snap.adapter
        method = request.method
        path = request.path
        problem = path_problem(request.raw_path.partition("?")[0])
        if problem is not None:
            raise _bad_path(request, adapter, *problem)
        config = snap.config
        if not config.routes.permits(path):
            raise RouterError(403, "route_denied", "this path is not open to clients")
        keys = snap.api_keys
        ureq = UpstreamRequest(
            method=method,
            path=path,
            query=MultiDict(request.query),
            headers=filtered_request_headers(request),
        )
        key_in_body = adapter.key_in_body(method, path)
        client: Client | None = None
        if keys and not key_in_body:
            # Before a byte of the body is read: an unauthenticated client
            # costs the router nothing whatever it sends.
            client = _client(snap, adapter.client_key(ureq))
        body = await self._read_body(request, ureq, snap, key_in_body)
        ureq.has_body = bool(body) or (body is None and request.body_exists)
        key = ureq.client_key = adapter.client_key(ureq)
        if keys and key_in_body:
            client = _client(snap, key)
        try:
            ext = adapter.extract(ureq)
        except BadSessionId as exc:
            raise RouterError(400, "bad_session_id", str(exc)) from None
        websocket = is_websocket_handshake(request)
        scope = client.scope if client is not None else None
        if scope is not None:
            # From the name alone, before any owner lookup (router.scoping).
            admit(scope, ext, websocket, adapter.list_shape(ureq) is not None)
        return Call(request, request_id, snap, ureq, body, ext, websocket, scope)

    async def _read_body(
        self, request: web.BaseRequest, ureq: UpstreamRequest, snap: Snapshot, key_in_body: bool
    ) -> bytes | None:
        """The body, when the adapter reads it or it is small enough to keep
        for a safe replay (the rest streams through, bounded)."""
        adapter = snap.adapter
        limits = snap.config.limits
        method = ureq.method
        length = request.content_length
        if length is not None and length > limits.max_body_bytes:
            raise RouterError(
                413,
                "body_too_large",
                f"request body of {length} bytes exceeds the {limits.max_body_bytes} byte cap",
            )
        budget = self.budget
        budget.cap = limits.max_buffered_bytes
        pacing = snap.config.pacing
        if adapter.needs_body(method, ureq.path) or (
            # A send's recipient, in a body read only while pacing counts them.
            pacing.enabled
            and pacing.counts_recipients
            and adapter.recipient_in_body(method, ureq.path)
        ):
            body = await body_io.read(
                request, cap=limits.max_body_bytes, budget=budget, progress=limits.body_timeout
            )
            if "Content-Encoding" in ureq.headers:
                del ureq.headers["Content-Encoding"]  # forwarded as read: decoded
            keys = snap.api_keys
            # A large body is parsed only if a router key appears in it:
            # parsing is the expensive part, and nobody without a key can
            # make it happen.
            if (
                key_in_body
                and keys
                and len(body) > _SCAN_FIRST
                and not any(k.encode() in body for k in keys)
            ):
                raise RouterError(401, "unauthorized", "missing or invalid router API key")
            ureq.json = body_io.parse(body, body_io.mime(request), forms=adapter.reads_forms)
            return body
        if (
            (method not in _METHODS_WITHOUT_BODY or request.body_exists)
            and length is not None
            and length <= SMALL_BODY
        ):
            return await body_io.read(
                request,
                cap=limits.max_body_bytes,
                budget=budget,
                progress=limits.body_timeout,
                decoded=False,  # not read by the router: forwarded as sent
            )
        return None

    # -- 2. Idempotency-Key: a repeat is answered from the first result ---------------

    async def _idempotent(self, call: Call, idem: str) -> web.StreamResponse:
        """Before routing, so that a repeat gets its first answer even when
        the session has moved or gone since."""
        rt = self.rt
        config = call.snap.config
        ttl = config.idempotency.window
        key = scoped_key(call.ureq.client_key, call.ureq.method, call.request.path, idem)
        # A claim outlives its request only this long: a router that crashed
        # mid-request must not leave the key "in progress" for the whole window.
        claim_ttl = min(ttl, config.timeouts.read + config.failover.wait + 30)
        try:
            prior = await rt.idempotency.begin(key, claim_ttl)
        except StoreUnavailable:
            raise RouterError(
                503,
                "idempotency_unavailable",
                "the idempotency store is unreachable; retry later",
                session=call.session,
                headers={"Retry-After": "5"},
            ) from None
        if isinstance(prior, StoredResponse):
            IDEMPOTENT_REPLAYS.inc()
            headers = [
                *prior.headers,
                (REPLAYED_HEADER, "true"),
                (REQUEST_ID_HEADER, call.request_id),
            ]
            return web.Response(status=prior.status, body=prior.body, headers=headers)
        if prior is not None:
            raise RouterError(
                409,
                "idempotency_key_in_use",
                "a request with this Idempotency-Key is still being processed",
                session=call.session,
                headers={"Retry-After": "1"},
            )
        try:
            resp = await self._dispatch(call)
        except RouterError as exc:
            if exc.request_sent:
                # Outcome unknown: remember the error so a repeat is told, not resent.
                stored = error_response(exc, call.request_id)
                await self._remember(call, key, stored.status, stored.headers.items(), stored.body)
            else:
                with contextlib.suppress(StoreUnavailable):
                    await rt.idempotency.abandon(key)
            raise
        # Cancelled mid-flight (client gone): the upstream may have acted, so
        # the claim is kept until it expires rather than allow a second send.
        payload = resp.body if isinstance(resp, web.Response) else None
        if isinstance(payload, bytes) and len(payload) <= config.idempotency.max_body_bytes:
            await self._remember(call, key, resp.status, resp.headers.items(), payload)
        else:
            note = json.dumps(
                {
                    "error": "idempotent_result_not_kept",
                    "message": "the first request was processed; its response was too large "
                    "to remember (or was streamed)",
                    "status": resp.status,
                }
            ).encode()
            await self._remember(call, key, 200, [("Content-Type", "application/json")], note)
        return resp

    async def _remember(
        self, call: Call, key: str, status: int, headers: Any, payload: Any
    ) -> None:
        config = call.snap.config
        if not isinstance(payload, bytes) or len(payload) > config.idempotency.max_body_bytes:
            payload = b""
        kept = tuple(
            (str(k), str(v)) for k, v in headers if str(k).lower() != REQUEST_ID_HEADER.lower()
        )
        try:
            await self.rt.idempotency.complete(
                key, StoredResponse(status, kept, payload), config.idempotency.window
            )
        except StoreUnavailable:
            log.warning("could not remember an Idempotency-Key result (store unavailable)")

    # -- 3. route: the session's owner, or a placement for a create ---------------------

    async def _dispatch(self, call: Call) -> web.StreamResponse:
        if call.ext.create and call.session is not None:
            return await self._create(call)
        if call.session is None and not call.ext.create and not call.websocket:
            # A list call: answered from every instance, not one (router.listings).
            shape = call.snap.adapter.list_shape(call.ureq)
            if shape is not None:
                return await self.listings.answer(
                    call.snap, call.request, call.ureq, shape, call.scope, call.request_id
                )
        return await self._send(call, await self._route(call))

    async def _route(self, call: Call) -> Route:
        """The owner of the call's session (cache, store, then asking every
        instance: never a guess), any instance for a session-less call, or a
        new placement for a create."""
        rt = self.rt
        snap = call.snap
        fleet = snap.fleet
        session = call.session
        if session is not None:
            inst = await rt.resolver.owner(session, fleet, snap.adapter)
            if inst is not None:
                return Route(inst)
            if not call.ext.create:
                # The very answer a scoped key gets outside its scope.
                raise unknown_session(session)
        elif not call.ext.create:
            inst = rt.placer.any_instance()
            if inst is None:
                raise RouterError(503, "no_healthy_instance", "no healthy instance is available")
            return Route(inst)
        inst = rt.placer.place()
        if inst is None:
            raise _no_room(snap, session)
        return Route(inst, placed=True)

    async def _create(self, call: Call) -> web.StreamResponse:
        """One create per session name at a time: in this process (an asyncio
        lock, so concurrent creates queue) and across replicas (the session
        lock, so two routers cannot place the same new session twice)."""
        rt = self.rt
        session = call.session
        assert session is not None
        # Already running somewhere: answered from what the router knows, or
        # forwarded to its owner (adapter.create_answer); no lock, so a
        # recovery on the way cannot wait on a lock this request holds.
        owner = await rt.resolver.owner(session, call.snap.fleet, call.snap.adapter)
        if owner is not None:
            return await self._create_existing(call, owner)
        with self._create_lock(session) as lock:
            async with lock:
                try:
                    async with rt.locks.hold(session, call.snap.config.failover.lock_ttl):
                        route = await self._create_route(call, session)
                        if route.placed:
                            # A new placement: forward under the lock. A placed
                            # request is never recovered, so it cannot deadlock.
                            return await self._send(call, route)
                except LockBusy:
                    raise RouterError(
                        409,
                        "session_busy",
                        f"session {session!r} is being created or restored; retry shortly",
                        session=session,
                        headers={"Retry-After": "2"},
                    ) from None
                except StoreUnavailable:
                    raise RouterError(
                        503,
                        "store_unavailable",
                        "cannot lock the new session while the shared store is unreachable",
                        session=session,
                        headers={"Retry-After": "5"},
                    ) from None
        # Someone placed it meanwhile: like any create of a running session.
        return await self._create_existing(call, route.instance)

    @contextlib.contextmanager
    def _create_lock(self, session: str) -> Iterator[asyncio.Lock]:
        entry = self._creates.get(session)
        if entry is None:
            entry = self._creates[session] = _CreateLock()
        entry.users += 1
        try:
            yield entry.lock
        finally:
            entry.users -= 1
            if entry.users == 0 and self._creates.get(session) is entry:
                del self._creates[session]

    async def _create_existing(self, call: Call, owner: Instance) -> web.StreamResponse:
        """A create for a session that runs on ``owner``: a retry of a create,
        or a second client. Never a second start where the upstream would
        harm the running copy (Blazz): the adapter answers it instead."""
        rt = self.rt
        adapter = call.snap.adapter
        session = call.session
        assert session is not None
        info = await rt.resolver.probe.info(adapter, owner, session)
        answer = adapter.create_answer(session, info)
        if answer is None:
            return await self._send(call, Route(owner))
        _count(owner.name, call.ureq.method, answer.status)
        return _answer_json(answer, call.request_id)

    async def _create_route(self, call: Call, session: str) -> Route:
        """Under the session lock: where a create goes. Every instance is asked
        first (healthy or not); one that cannot answer blocks the placement.
        A new session goes to an instance matching its selector (the create's
        placement header, else the rules: router.labels)."""
        rt = self.rt
        choice = self._placement_choice(call, session)
        try:
            running = await rt.resolver.confirm_absent(session, call.snap.fleet, call.snap.adapter)
        except Unanswered as exc:
            raise RouterError(
                503,
                "session_unknown",
                f"instance(s) {exc} did not say whether they run session {session!r}; "
                "not creating it elsewhere",
                session=session,
                headers={"Retry-After": "5"},
            ) from None
        if running is not None:
            return Route(running)
        call.placement = choice
        where = await rt.removals.removed_from(session)
        if isinstance(where, str):
            # Created again after a removal: where its stopped copy may still be.
            inst = call.snap.fleet.get(where)
            if inst is not None and inst.placeable and choice.selector.matches(labels_of(inst)):
                return Route(inst, placed=True)
        placed = rt.placer.place_for(choice, action="create", session=session)
        if placed.instance is not None:
            return Route(placed.instance, placed=True)
        if placed.refused:
            raise RouterError(
                503,
                "selector_full",
                f"no healthy instance matching {choice.selector} has room for a new session "
                "(the selector is strict)",
                session=session,
                headers={"Retry-After": "30"},
            )
        raise _no_room(call.snap, session)

    def _placement_choice(self, call: Call, session: str) -> Choice:
        """The new session's selector; a placement header that does not parse,
        or that no instance of the fleet matches, is the client's error (400)."""
        policy = self.rt.placer.policy(call.snap.config)
        header = policy.header
        value: str | None = None
        if header is not None:
            value = call.request.headers.get(header)
            # An instruction to the router, not to the instance.
            call.ureq.headers.popall(header, None)
        try:
            choice = policy.for_create(session, value)
        except SelectorError as exc:
            raise RouterError(400, "bad_placement", f"{header}: {exc}", session=session) from None
        if choice.source == "header" and not any(
            choice.selector.matches(labels_of(i)) for i in call.snap.fleet
        ):
            raise RouterError(
                400,
                "bad_placement",
                f"{header}: no instance has the labels {choice.selector}",
                session=session,
            )
        return choice

    # -- 4. send: attempts, recovery and replays ---------------------------------------

    async def _send(self, call: Call, route: Route) -> web.StreamResponse:
        rt = self.rt
        inst = route.instance
        add_forwarded(call.ureq.headers, call.request, call.request_id)
        if call.websocket:
            call.snap.adapter.apply_credential(call.ureq, inst.config)
            return await proxy_websocket(rt, call.request, call.ureq, inst, call.request_id)
        if not route.placed:
            pacing = call.snap.config.pacing
            if pacing.enabled and call.session is not None:
                # A send waits for its session's slot (router.pacing), once:
                # the replays of _attempts take none.
                await pace(
                    rt.pacer, pacing, call.snap.adapter, call.ureq, call.session, call.request
                )
            return await self._attempts(call, route)
        with rt.placer.reserved(inst):
            try:
                return await self._attempts(call, route)
            except RouterError as exc:
                if exc.request_sent and call.session is not None:
                    await self._settle_create(call, inst, exc)
                raise

    async def _attempts(self, call: Call, route: Route) -> web.StreamResponse:
        """Send, and on a failure that allows it, recover the session and send again.

        What may be replayed is ``router.retry.may_replay``; how often is bounded
        by ``failover.max_tries`` and the fleet-wide retry budget (a replay
        holds a budget slot while it is in flight, not while recovery runs).
        """
        rt = self.rt
        snap = call.snap
        adapter = snap.adapter
        cfg = snap.config.failover
        request = call.request
        ureq = call.ureq
        method = ureq.method
        session = call.session
        streamed = call.streamed
        inst = route.instance
        recoverable = session is not None and not route.placed and cfg.enabled
        # Credentials are the instance's own: rendered again whenever an
        # attempt goes to another instance (a replay after failover).
        rendered_for: Instance | None = None
        path_qs = ""
        data: Body = None
        read_timeout = adapter.request_timeout(method, ureq.path)
        with rt.budget.request() as replays:
            tries = 0
            while True:
                tries += 1
                if recoverable and not inst.healthy:
                    assert session is not None
                    inst = await self._recover(call, inst, "owner_down", exclude_failed=True)
                if (
                    session is not None
                    and rt.failover.readiness.pending(session)
                    and adapter.needs_ready(ureq)
                ):
                    inst = await self._until_ready(call, inst)
                if inst is not rendered_for:
                    path_qs, data = self._render(call, inst)
                    rendered_for = inst
                started = time.monotonic()
                try:
                    up = await inst.transport.request(
                        method, path_qs, ureq.headers, data, read_timeout=read_timeout
                    )
                except UpstreamError as exc:
                    replays.done()
                    cause = request.get(_BODY_FAILED)
                    if cause is not None:
                        # The client's body failed, not the instance.
                        raise cause from exc
                    kind = error_kind(exc)
                    UPSTREAM_ERRORS.labels(inst.name, kind).inc()
                    rt.outliers.failure(inst, kind)
                    if isinstance(exc, InstanceDown) and recoverable and not streamed:
                        # Released from a hung instance: a request that may be
                        # repeated goes to the session's recovered copy; one
                        # that may have been acted on is answered at once.
                        if tries >= cfg.max_tries or not may_replay(
                            method, request_sent=exc.request_sent
                        ):
                            RETRIES_DENIED.labels("unsafe").inc()
                            raise _transport_error(exc, inst, session) from exc
                        inst = await self._recover(call, inst, "owner_down", exclude_failed=True)
                    elif streamed or tries >= cfg.max_tries or isinstance(exc, UpstreamTimeout):
                        # A timeout is not retried: the instance is slow or hung,
                        # and waiting again doubles the client's wait.
                        RETRIES_DENIED.labels("exhausted").inc()
                        raise _transport_error(exc, inst, session) from exc
                    elif not may_replay(method, request_sent=exc.request_sent):
                        RETRIES_DENIED.labels("unsafe").inc()
                        raise _transport_error(exc, inst, session) from exc
                    elif exc.request_sent:
                        # Same instance, idempotent method: back off first.
                        await asyncio.sleep(backoff(tries - 1, cfg.backoff))
                    else:
                        inst = await self._elsewhere(call, route, inst, exc)
                    if not await self._replay_slot(replays, call, kind):
                        raise _transport_error(exc, inst, session) from exc
                    continue
                replays.done()
                if metrics.HOT_PATH:
                    _durations(inst.name, request[_STARTED], started, time.monotonic())

                if recoverable and up.status in _MAYBE_MISSING:
                    payload = await self._read_upstream(up, inst, call)
                    up.release()
                    assert session is not None
                    if not adapter.session_missing(up.status, payload):
                        return self._answer(up, inst, call, payload)
                    if await self._still_there(call, inst):
                        # Not about this session after all (the instance read
                        # another name from the request, or it was starting):
                        # restoring it elsewhere would make two copies.
                        return self._answer(up, inst, call, payload)
                    UPSTREAM_ERRORS.labels(inst.name, "session_missing").inc()
                    if tries >= cfg.max_tries:
                        raise RouterError(
                            503,
                            "session_unavailable",
                            f"session {session!r} keeps disappearing; retry later",
                            session=session,
                            headers={"Retry-After": str(cfg.retry_after)},
                        )
                    # The instance did not act on it: safe to send again, any method.
                    inst = await self._recover(call, inst, "session_missing", exclude_failed=False)
                    if streamed:
                        # The body was streamed and (partly) consumed: it cannot
                        # be sent again. The session is back; the client resends.
                        raise RouterError(
                            503,
                            "session_moved",
                            f"session {session!r} was recovered on {inst.name}; send again",
                            session=session,
                            headers={"Retry-After": "1"},
                        )
                    if not await self._replay_slot(replays, call, "session_missing"):
                        raise RouterError(
                            503,
                            "retry_budget_exhausted",
                            "too many requests are being replayed; retry shortly",
                            session=session,
                            headers={"Retry-After": "1"},
                        )
                    continue
                try:
                    return await self._answered(call, route, up, inst)
                finally:
                    up.release()

    async def _still_there(self, call: Call, inst: Instance) -> bool:
        """Whether ``inst`` may still run the call's session after answering
        that it does not: asked the one way the adapter names it (its probe).
        An instance that cannot say counts as running it: never guess."""
        assert call.session is not None
        state = await self.rt.resolver.probe.state(call.snap.adapter, inst, call.session)
        return state in (ProbeState.RUNNING, ProbeState.UNKNOWN)

    async def _replay_slot(self, replays: Replays, call: Call, reason: str) -> bool:
        """A retry-budget slot for one replay (bounded wait), counted in the metrics."""
        if await replays.take(call.snap.config.timeouts.connect):
            RETRIES.labels(reason).inc()
            return True
        RETRIES_DENIED.labels("budget").inc()
        return False

    async def _until_ready(self, call: Call, inst: Instance) -> Instance:
        """Hold a request for a copy the router is starting until it is READY
        (bounded by ``failover.wait``): the client never gets the upstream's
        "not connected" from a copy the router itself started."""
        rt = self.rt
        session = call.session
        assert session is not None
        cfg = call.snap.config.failover
        outcome = await rt.failover.readiness.wait(session, cfg.wait)
        if outcome is Ready.NEEDS_AUTH:
            raise RouterError(
                503,
                "session_needs_auth",
                f"session {session!r} was restored but its instance asks for a new QR scan",
                session=session,
                headers={"Retry-After": str(cfg.retry_after)},
            )
        if outcome is Ready.TIMEOUT:
            raise RouterError(
                503,
                "session_unavailable",
                f"session {session!r} is starting on {inst.name}; not ready yet",
                session=session,
                instance=inst.name,
                reason="starting",
                headers={"Retry-After": str(cfg.retry_after)},
            )
        # READY, or the copy went (the request then finds out where it is).
        owner = await rt.resolver.owner(session, call.snap.fleet, call.snap.adapter)
        return owner if owner is not None else inst

    def _render(self, call: Call, inst: Instance) -> tuple[str, Body]:
        """The target and body of an attempt on ``inst``, with its credential."""
        ureq = call.ureq
        call.snap.adapter.apply_credential(ureq, inst.config)
        body = call.body
        if ureq.json_dirty and ureq.json is not None:
            body = json.dumps(ureq.json, separators=(",", ":")).encode()
            ureq.headers["Content-Type"] = "application/json"
        data: Body = body
        if call.streamed:
            limits = call.snap.config.limits
            data = _streamed(call.request, limits.body_timeout, limits.max_body_bytes)
        return upstream_path_qs(call.request.rel_url.raw_path, ureq), data

    async def _recover(
        self, call: Call, failed: Instance, reason: str, *, exclude_failed: bool
    ) -> Instance:
        """The session's new owner after a failover."""
        rt = self.rt
        session = call.session
        assert session is not None
        new = await rt.failover.recover(session, failed, reason, exclude_failed=exclude_failed)
        if new is not None:
            return new
        if await rt.removals.is_removed(session):
            raise RouterError(
                404,
                "unknown_session",
                f"session {session!r} was removed; create it again to use it",
                session=session,
            )
        raise RouterError(
            503,
            "session_unavailable",
            f"session {session!r} could not be brought back on a healthy instance yet",
            session=session,
            instance=failed.name,
            reason=reason,
            headers={"Retry-After": str(call.snap.config.failover.retry_after)},
        )

    async def _elsewhere(
        self, call: Call, route: Route, failed: Instance, exc: UpstreamError
    ) -> Instance:
        """Where to send a request again after its instance could not be reached."""
        rt = self.rt
        session = call.session
        if session is not None and not route.placed:
            if not call.snap.config.failover.enabled:
                raise _transport_error(exc, failed, session) from exc
            return await self._recover(call, failed, "connect_failed", exclude_failed=True)
        # A placement or a session-less request: any other instance will do.
        placer = rt.placer
        other = (
            placer.place(frozenset({failed.name}), call.placement or NO_CHOICE, session=session)
            if route.placed
            else placer.any_instance(exclude=failed)
        )
        if other is None:
            raise _transport_error(exc, failed, session) from exc
        return other

    # -- 5. answer: what the instance said, and what the router learns from it ----------

    async def _answered(
        self, call: Call, route: Route, up: UpstreamResponse, inst: Instance
    ) -> web.StreamResponse:
        rt = self.rt
        adapter = call.snap.adapter
        session = call.session
        if (
            200 <= up.status < 300
            and session is not None
            and call.ureq.method != "GET"
            and adapter.removes(call.ureq)
        ):
            await rt.removals.mark(session, by="client", instance=inst.name)
        if adapter.unwell(up.status):
            # The instance says it is unwell (a gateway or overload answer),
            # not that one session's call failed (a 500).
            UPSTREAM_ERRORS.labels(inst.name, "status_5xx").inc()
            rt.outliers.failure(inst, "status_5xx")
        else:
            rt.outliers.success(inst)
        return await self._relay(call, route, up, inst)

    def _answer(
        self, up: UpstreamResponse, inst: Instance, call: Call, payload: bytes
    ) -> web.Response:
        _count(inst.name, call.ureq.method, up.status)
        key = inst.config.api_key
        if key and up.status >= 400 and payload:
            payload = _scrub(payload, key, up)
        return web.Response(
            status=up.status,
            reason=up.reason,
            body=payload,
            headers=response_headers(up, call.request_id),
        )

    async def _relay(
        self, call: Call, route: Route, up: UpstreamResponse, inst: Instance
    ) -> web.StreamResponse:
        length = up.content_length
        if route.placed:
            # Read the create answer whole: we may need the session name from it.
            payload = await self._read_upstream(up, inst, call)
            await self._record_placement(call, up.status, payload, inst)
            return self._answer(up, inst, call, payload)
        if length is not None and length <= SMALL_RESPONSE:
            payload = await self._read_upstream(up, inst, call)
            return self._answer(up, inst, call, payload)

        request = call.request
        _count(inst.name, call.ureq.method, up.status)
        headers = response_headers(up, call.request_id)
        resp = web.StreamResponse(status=up.status, reason=up.reason, headers=headers)
        if length is not None:
            resp.content_length = length
        await resp.prepare(request)
        try:
            async for chunk in up.iter_chunks():
                await resp.write(chunk)
        except (UpstreamError, aiohttp.ClientError, TimeoutError, OSError) as exc:
            # Headers are gone already: all we can do is cut the client off
            # so it sees a truncated body rather than a "complete" one.
            log.warning("upstream %s broke off a streamed response: %r", inst.name, exc)
            if request.transport is not None:
                request.transport.close()
            return resp
        await resp.write_eof()
        return resp

    async def _read_upstream(self, up: UpstreamResponse, inst: Instance, call: Call) -> bytes:
        try:
            return await up.read()
        except UpstreamTimeout as exc:
            raise RouterError(
                504,
                "upstream_timeout",
                f"instance {inst.name} stopped answering mid-response",
                session=call.session,
                instance=inst.name,
                request_sent=True,
            ) from exc
        except UpstreamError as exc:
            raise RouterError(
                502,
                "upstream_error",
                f"instance {inst.name} broke off its response",
                session=call.session,
                instance=inst.name,
                request_sent=True,
            ) from exc

    async def _record_placement(
        self, call: Call, status: int, payload: bytes, inst: Instance
    ) -> None:
        if not 200 <= status < 300:
            return
        session = call.session or call.snap.adapter.created_session(status, payload)
        if session is None:
            log.warning("instance %s created a session the router cannot name", inst.name)
            return
        await self.rt.resolver.record(session, inst)
        await self._keep_notes(call, session)

    async def _settle_create(self, call: Call, inst: Instance, exc: RouterError) -> None:
        """A create whose answer never came (timeout, reset) is not left half
        known: mapped if the instance runs the session after all, else said."""
        rt = self.rt
        session = call.session
        assert session is not None
        state = await rt.resolver.probe.state(call.snap.adapter, inst, session)
        if state is ProbeState.RUNNING:
            await rt.resolver.record(session, inst)
            await self._keep_notes(call, session)
        exc.extra["session_state"] = state.value
        exc.extra["instance"] = inst.name
        rt.events.add("create_unsettled", session=session, instance=inst.name, state=state.value)
        log.warning(
            "create of %s on %s got no answer; the session is %s there",
            session,
            inst.name,
            state.value,
        )

    async def _keep_notes(self, call: Call, session: str) -> None:
        """Remember what the create said that the upstream's listings forget."""
        notes = dict(call.snap.adapter.create_notes(call.ureq))
        if call.placement is not None and call.placement.source == "header":
            # Nothing but this note can tell failover and drain the selector later.
            notes[PLACEMENT_NOTE] = call.placement.note()
        store = self.rt.smap.store
        try:
            # A create also ends a removal (router.removals): its note goes.
            if notes:
                await store.set_note(session, notes)
            else:
                await store.delete_note(session)
        except StoreUnavailable:
            log.warning("could not keep the create notes of %s (store unavailable)", session)


@dataclass(slots=True, eq=False)
class _CreateLock:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0


def _no_room(snap: Snapshot, session: str | None) -> RouterError:
    """The error for a create no instance can take."""
    healthy = bool(snap.fleet.healthy())
    return RouterError(
        503,
        "fleet_full" if healthy else "no_healthy_instance",
        "no instance has capacity for a new session"
        if healthy
        else "no healthy instance is available",
        session=session,
        headers={"Retry-After": "30"},
    )


def _scrub(payload: bytes, key: str, up: UpstreamResponse) -> bytes:
    """An error answer without the instance's key. Some upstreams echo the
    request in their errors (Blazz's 404 repeats the URL, query and all,
    where the router put the instance's api_key); instance keys never reach
    clients. A compressed body is left as it is (nothing echoes into those)."""
    for k, _ in up.headers:
        if k.lower() == "content-encoding":
            return payload
    for form in {key, quote_plus(key), quote(key, safe="")}:
        raw = form.encode()
        if raw in payload:
            payload = payload.replace(raw, b"***")
    return payload


async def _streamed(request: web.BaseRequest, progress: float, cap: int) -> AsyncIterator[bytes]:
    """The client's body as it comes, bounded; why it stopped is kept on the
    request, so the answer says so (413, 408) rather than "upstream error"."""
    try:
        async for chunk in body_io.chunks_of(request, progress=progress, cap=cap):
            yield chunk
    except (RouterError, body_io.ClientGone) as exc:
        request[_BODY_FAILED] = exc
        raise


def _client(snap: Snapshot, key: str | None) -> Client:
    """Who presents ``key`` (every configured key compared), else 401."""
    client = snap.clients.find(key)
    if client is None:
        raise RouterError(401, "unauthorized", "missing or invalid router API key")
    return client


def _bad_path(request: web.BaseRequest, adapter: Adapter, segment: str, reason: str) -> RouterError:
    """400 for a path the upstream would read differently (router.paths):
    ``bad_session_id`` when the odd segment is where the session id is."""
    code = "bad_path"
    req = UpstreamRequest(request.method, request.path, MultiDict(request.query), CIMultiDict())
    try:
        ext = adapter.extract(req)
        if ext.session and unquote(segment).startswith(ext.session):
            code = "bad_session_id"
    except BadSessionId:
        code = "bad_session_id"
    shown = segment[:64]
    return RouterError(400, code, f"path segment {shown!r}: {reason}")


def _answer_json(answer: Answer, request_id: str) -> web.Response:
    """An answer the router gives in the upstream API's own shape."""
    return web.Response(
        status=answer.status,
        body=json.dumps(answer.body).encode(),
        content_type="application/json",
        headers={REQUEST_ID_HEADER: request_id},
    )


# Where the proxy notes which instance answered, for the duration metric.
# When the request arrived (monotonic), for the request duration metric.
_STARTED: web.RequestKey[float] = web.RequestKey("wa_router.started", float)
# Why a streamed client body stopped (router.body), if it did.
_BODY_FAILED: web.RequestKey[Exception] = web.RequestKey("wa_router.body_failed", Exception)
# Bodies larger than this are parsed only when a router key appears in them
# (adapters whose key is in the body): nobody without a key makes us parse MBs.
_SCAN_FIRST = 64 * 1024
# Answers that may mean "this session does not run here" (the adapter decides).
_MAYBE_MISSING = frozenset({404, 410, 422})

_STATUS_CLASS = {1: "1xx", 2: "2xx", 3: "3xx", 4: "4xx", 5: "5xx"}


# Methods outside this set are counted as OTHER: a client must not be able
# to grow the metric's label sets without bound.
_METHOD_LABELS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def _durations(instance: str, arrived: float, sent: float, now: float) -> None:
    REQUEST_DURATION.labels(instance).observe(now - arrived)
    UPSTREAM_DURATION.labels(instance).observe(now - sent)


def _count(instance: str, method: str, status: int) -> None:
    if metrics.HOT_PATH:
        REQUESTS.labels(
            instance,
            method if method in _METHOD_LABELS else "OTHER",
            _STATUS_CLASS.get(status // 100, "other"),
        ).inc()


def _transport_error(exc: UpstreamError, inst: Instance, session: str | None) -> RouterError:
    """The JSON answer for an upstream that failed at the transport level."""
    if isinstance(exc, ConnectFailed) and not exc.timeout:
        return RouterError(
            502,
            "upstream_unreachable",
            f"instance {inst.name} refused the connection",
            session=session,
            instance=inst.name,
        )
    # The instance may have acted on it: the client must not assume either way
    # (and a repeat with its Idempotency-Key is told so, not resent).
    outcome: dict[str, Any] = {"outcome": "unknown"} if exc.request_sent else {}
    if isinstance(exc, InstanceDown):
        return RouterError(
            504,
            "upstream_timeout",
            f"instance {inst.name} stopped answering and was taken out of service",
            session=session,
            instance=inst.name,
            request_sent=exc.request_sent,
            **outcome,
        )
    if isinstance(exc, UpstreamTimeout | ConnectFailed):
        return RouterError(
            504,
            "upstream_timeout",
            f"instance {inst.name} did not answer in time",
            session=session,
            instance=inst.name,
            request_sent=exc.request_sent,
            **outcome,
        )
    return RouterError(
        502,
        "upstream_error",
        f"instance {inst.name} closed or reset the connection",
        session=session,
        instance=inst.name,
        request_sent=exc.request_sent,
        **outcome,
    )
