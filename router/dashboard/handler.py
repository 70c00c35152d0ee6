"""``/dashboard``: one live page over the fleet, behind the admin key.

Endpoints (every one 404 when no ``admin_key`` is configured):

====== =============================== ================================================
GET    /dashboard                      the page; ``?key=KEY`` once sets the cookie and
                                       redirects to the bare URL; without a valid
                                       cookie, a login form (401)
POST   /dashboard/login                form field ``key``: sets the cookie (303)
POST   /dashboard/logout               revokes and clears the cookie (303)
GET    /dashboard/api/snapshot         fleet snapshot (JSON), as the stream sends it
GET    /dashboard/api/stream           server-sent events: ``hello`` (recent events),
                                       ``snapshot`` every second and right after
                                       changes, ``fleet`` for each event as it happens
*      /dashboard/api/admin/...        what the page needs of the admin API: drain,
                                       undrain, maintenance, session search
                                       (``sessions?q=&limit=&cursor=``), a
                                       session, events
====== =============================== ================================================

Authentication: the admin key, compared in constant time, as ``X-Admin-Key``
or ``Authorization: Bearer`` (scripts), or the dashboard cookie. A request
authenticated by cookie that changes something must also carry
``X-Dashboard-Request: 1`` (a header no cross-site form can send). No answer
carries an instance's api key or URL credentials, and nothing here logs a key.

The cookie holds no key: it is ``expires.nonce.HMAC-SHA256(admin_key,
expires.nonce)``, with a random nonce per login. So changing the admin key
logs every browser out, a stolen cookie expires (``SESSION_TTL``), and any
replica with the same admin key accepts it. Its attributes: ``HttpOnly``,
``SameSite=Strict``, ``Path=/dashboard``, ``Max-Age`` = ``SESSION_TTL``, and
``Secure`` when the login came over HTTPS (below).

Logout revokes the cookie on the server, not only in the browser: its nonce
is remembered until the cookie would have expired anyway (``Revocations``).
That memory is bounded (``MAX_REVOKED``; past it every cookie issued so far is
revoked at once: everyone logs in again, no revoked cookie comes back) and it
is **per process**: another replica behind the same load balancer, or this
one after a restart, still accepts a logged-out cookie until it expires.
Changing the admin key is the way to revoke every cookie everywhere.

HTTPS: a login is over HTTPS when the connection itself is TLS, or when the
peer is a trusted proxy that says so (the last value of
``X-Forwarded-Proto``, or the last ``proto=`` of ``Forwarded``). A trusted
proxy is a peer on loopback, on an RFC 1918 private network (10/8,
172.16/12, 192.168/16), an IPv6 unique-local network (fc00::/7), or a Unix
socket: where reverse proxies run, and no setting to keep right. A public
peer's header is ignored. Trusting too much could only put ``Secure`` on the
sender's own cookie, never take it off anyone else's.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import html
import ipaddress
import json
import logging
import re
import secrets
import time
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING, Any, NamedTuple

from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from router.admin import public_url
from router.dashboard.stats import StatsSampler
from router.errors import RouterError, error_response, request_id_of
from router.keys import admin_key_of, as_bytes, matches
from router.placement import load_ratio

if TYPE_CHECKING:
    from router.admin import AdminAPI
    from router.runtime import Runtime

log = logging.getLogger(__name__)

PREFIX = "/dashboard"
COOKIE = "wa_router_dashboard"
# How long a login lasts, seconds.
SESSION_TTL = 12 * 3600
# Logouts remembered at once (per process); see ``Revocations``.
MAX_REVOKED = 10_000
# The header a cookie-authenticated change must carry (CSRF defence).
CSRF_HEADER = "X-Dashboard-Request"
# Events of these kinds are shown on the page (the stream sends every kind).
FAILOVER_KINDS = ("failover",)
_RECENT_FAILOVERS = 20
_RECENT_EVENTS = 50
_JSON = "application/json"
_DRAIN_FIELDS = ("state", "done", "total", "moved", "skipped", "failed", "remaining")
# What the page may do through ``/dashboard/api/admin/...`` (method, path after /admin/).
_BRIDGE: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (method, re.compile(pattern))
    for method, pattern in (
        ("GET", r"instances"),
        ("GET", r"instances/[^/]+/drain"),
        ("POST", r"instances/[^/]+/(drain|undrain|maintenance)"),
        ("GET", r"sessions"),
        ("GET", r"sessions/[^/]+"),
        ("GET", r"events"),
    )
)
_SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
}
# Put into a stream's queue by ``close()``: the stream ends.
_CLOSE: dict[str, Any] = {"kind": "__close__"}


@cache
def _static(name: str) -> str:
    return resources.files("router.dashboard").joinpath("static", name).read_text("utf-8")


def _csp(nonce: str) -> str:
    return (
        "default-src 'none'; "
        f"script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
        "connect-src 'self'; img-src 'self' data:; form-action 'self'; "
        "base-uri 'none'; frame-ancestors 'none'"
    )


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(
        status=status,
        body=json.dumps(data, separators=(",", ":"), default=str).encode(),
        content_type=_JSON,
        headers=_SECURITY_HEADERS,
    )


def _see_other(location: str) -> web.Response:
    return web.Response(status=303, headers={**_SECURITY_HEADERS, "Location": location})


def _error(request: web.BaseRequest, status: int, code: str, message: str) -> web.Response:
    resp = error_response(RouterError(status, code, message), request_id_of(request))
    resp.headers.update(_SECURITY_HEADERS)
    return resp


# -- the cookie -----------------------------------------------------------------------


class Token(NamedTuple):
    """A valid dashboard cookie's content."""

    expires: int
    nonce: str


# ``expires.nonce.mac``: ASCII digits and lowercase hex only (a hostile cookie
# is refused here, before any arithmetic or encoding).
_TOKEN = re.compile(r"([0-9]{1,12})\.([0-9a-f]{32})\.([0-9a-f]{64})")


def make_token(key: str, now: float | None = None, ttl: float = SESSION_TTL) -> str:
    expires = str(int((now if now is not None else time.time()) + ttl))
    nonce = secrets.token_hex(16)
    return f"{expires}.{nonce}.{_mac(key, expires, nonce)}"


def parse_token(key: str, token: str, now: float | None = None) -> Token | None:
    """The token's expiry and nonce if ``key`` signed it and it has not expired
    (revocation is ``Revocations``' business)."""
    m = _TOKEN.fullmatch(token)
    if m is None:
        return None
    expires, nonce, mac = m.groups()
    if not hmac.compare_digest(mac, _mac(key, expires, nonce)):
        return None
    if int(expires) <= (now if now is not None else time.time()):
        return None
    return Token(int(expires), nonce)


def token_valid(key: str, token: str, now: float | None = None) -> bool:
    return parse_token(key, token, now) is not None


def _mac(key: str, expires: str, nonce: str) -> str:
    msg = f"dashboard:{expires}.{nonce}".encode()
    return hmac.new(as_bytes(key), msg, hashlib.sha256).hexdigest()


class Revocations:
    """The cookies logged out of, until they would have expired anyway.

    Per process (see the module docstring). At most ``limit`` nonces: when a
    logout finds it full even after forgetting expired ones, every cookie
    issued so far is revoked (``cutoff``) and the list starts again, so memory
    stays bounded and nothing revoked becomes valid again."""

    def __init__(self, limit: int = MAX_REVOKED, ttl: int = SESSION_TTL) -> None:
        self.limit = limit
        self.ttl = ttl
        self._nonces: dict[str, int] = {}  # nonce -> expires
        # Tokens expiring at or before this (issued by then) are revoked.
        self.cutoff = 0

    def __len__(self) -> int:
        return len(self._nonces)

    def revoke(self, token: Token, now: float | None = None) -> None:
        now = now if now is not None else time.time()
        if self.revoked(token):
            return
        if len(self._nonces) >= self.limit:
            self._nonces = {n: e for n, e in self._nonces.items() if e > now}
        if len(self._nonces) >= self.limit:
            log.warning(
                "more than %d dashboard logouts in %d s: every dashboard login so far is revoked",
                self.limit,
                self.ttl,
            )
            latest = max(self._nonces.values(), default=0)
            self.cutoff = max(self.cutoff, int(now) + self.ttl, token.expires, latest)
            self._nonces.clear()
            return
        self._nonces[token.nonce] = token.expires

    def revoked(self, token: Token) -> bool:
        return token.expires <= self.cutoff or token.nonce in self._nonces


# The networks a proxy in front of the router is trusted from (X-Forwarded-Proto).
_TRUSTED_NETS = tuple(
    ipaddress.ip_network(n)
    for n in ("127.0.0.0/8", "::1/128", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")
)


def trusted_proxy(request: web.BaseRequest) -> bool:
    """Whether the connection's peer (the socket's, never a header's) may tell
    the scheme: loopback, a private network, or a Unix socket."""
    transport = request.transport
    peer = transport.get_extra_info("peername") if transport is not None else None
    if isinstance(peer, str | bytes):
        return True  # a Unix socket: only a local process reaches it
    if not isinstance(peer, tuple) or not peer:
        return False
    try:
        ip = ipaddress.ip_address(str(peer[0]).partition("%")[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in _TRUSTED_NETS)


def request_is_https(request: web.BaseRequest) -> bool:
    """Whether the browser reached us over HTTPS: a TLS connection, or a trusted
    proxy's ``X-Forwarded-Proto``/``Forwarded: proto=`` (the last value: the
    one that proxy added) saying ``https``."""
    if request.secure:
        return True
    if not trusted_proxy(request):
        return False
    proto = None
    forwarded = request.forwarded
    if forwarded:
        proto = forwarded[-1].get("proto")
    if proto is None:
        values = request.headers.getall("X-Forwarded-Proto", [])
        if values:
            proto = ",".join(values).rsplit(",", 1)[-1]
    return proto is not None and proto.strip().lower() == "https"


# -- the handler ------------------------------------------------------------------------


class Dashboard:
    """The ``/dashboard`` handler. ``close()`` before the server stops: it
    ends every open stream and the stats sampling."""

    def __init__(
        self,
        rt: Runtime,
        admin: AdminAPI,
        *,
        sampler: StatsSampler | None = None,
        tick: float = 1.0,
    ) -> None:
        self.rt = rt
        self.admin = admin
        self.sampler = sampler or StatsSampler()
        self.tick = tick
        self._streams: set[asyncio.Queue[dict[str, Any]]] = set()
        self._closing = False
        # Logged-out cookies (this process only: see the module docstring).
        self.revocations = Revocations()

    @property
    def streams(self) -> int:
        """Open event streams (the page's live connections)."""
        return len(self._streams)

    async def close(self) -> None:
        self._closing = True
        for q in list(self._streams):
            q.put_nowait(_CLOSE)
        await self.sampler.stop()

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        key = self.rt.config.admin_key
        if not key:
            return _error(request, 404, "not_found", "the dashboard is disabled (no admin_key)")
        path = request.path.rstrip("/") or "/"
        method = request.method
        if path == PREFIX and method in ("GET", "HEAD"):
            return self._page(request, key)
        if path == PREFIX + "/login" and method == "POST":
            return await self._login(request, key)
        if path == PREFIX + "/logout" and method == "POST":
            return self._logout(request, key)
        if not path.startswith(PREFIX + "/api/"):
            return _error(request, 404, "not_found", f"no dashboard endpoint {request.path}")

        via = self._auth(request, key)
        if via is None:
            return _error(
                request, 401, "unauthorized", "log in at /dashboard or send the admin key"
            )
        if (
            via == "cookie"
            and method not in ("GET", "HEAD")
            and request.headers.get(CSRF_HEADER) != "1"
        ):
            return _error(
                request, 403, "forbidden", f"a change from the page needs {CSRF_HEADER}: 1"
            )
        if not self.sampler.running and not self._closing:
            self.sampler.start()
        api = path[len(PREFIX) + len("/api/") :]
        if api == "snapshot" and method == "GET":
            return _json(self.snapshot())
        if api == "stream" and method == "GET":
            return await self._stream(request)
        if api.startswith("admin/"):
            return await self._bridge(request, api[len("admin/") :], key)
        return _error(request, 404, "not_found", f"no dashboard endpoint {request.path}")

    # -- authentication ---------------------------------------------------------------

    def _auth(self, request: web.BaseRequest, key: str) -> str | None:
        given = admin_key_of(request)
        if given is not None:
            return "header" if matches(given, (key,)) else None
        return "cookie" if self._cookie(request, key) is not None else None

    def _cookie(self, request: web.BaseRequest, key: str) -> Token | None:
        """The request's dashboard cookie, if valid and not logged out of."""
        raw = request.cookies.get(COOKIE)
        token = parse_token(key, raw) if raw is not None else None
        if token is None or self.revocations.revoked(token):
            return None
        return token

    def _set_cookie(self, request: web.BaseRequest, resp: web.StreamResponse, key: str) -> None:
        # Never a cookie revoked at birth (by a cutoff in this very second).
        now = max(time.time(), self.revocations.cutoff - SESSION_TTL + 1)
        resp.set_cookie(
            COOKIE,
            make_token(key, now),
            max_age=SESSION_TTL,
            path=PREFIX,
            httponly=True,
            samesite="Strict",
            secure=request_is_https(request),
        )

    def _page(self, request: web.BaseRequest, key: str) -> web.Response:
        given = request.query.get("key")
        if given is not None:
            if not matches(given, (key,)):
                return self._login_page("That admin key is not valid.", status=401)
            # Logged in: the key leaves the address bar (and the history) at once.
            resp = _see_other(PREFIX)
            self._set_cookie(request, resp, key)
            return resp
        if self._auth(request, key) is None:
            return self._login_page(None, status=401)
        nonce = secrets.token_urlsafe(16)
        body = _static("dashboard.html").replace("__CSP_NONCE__", nonce)
        return web.Response(
            text=body,
            content_type="text/html",
            charset="utf-8",
            headers={**_SECURITY_HEADERS, "Content-Security-Policy": _csp(nonce)},
        )

    def _login_page(self, message: str | None, status: int) -> web.Response:
        nonce = secrets.token_urlsafe(16)
        note = f'<p role="alert" class="error">{html.escape(message)}</p>' if message else ""
        body = _static("login.html").replace("__CSP_NONCE__", nonce).replace("__MESSAGE__", note)
        return web.Response(
            status=status,
            text=body,
            content_type="text/html",
            charset="utf-8",
            headers={**_SECURITY_HEADERS, "Content-Security-Policy": _csp(nonce)},
        )

    async def _login(self, request: web.BaseRequest, key: str) -> web.Response:
        if request.content_length is not None and request.content_length > 4096:
            return self._login_page("That request is too large.", status=413)
        form = await request.post()
        given = form.get("key")
        if not isinstance(given, str) or not matches(given, (key,)):
            return self._login_page("That admin key is not valid.", status=401)
        resp = _see_other(PREFIX)
        self._set_cookie(request, resp, key)
        return resp

    def _logout(self, request: web.BaseRequest, key: str) -> web.Response:
        # Only a valid cookie is remembered: nobody fills the list without the key.
        token = self._cookie(request, key)
        if token is not None:
            self.revocations.revoke(token)
        resp = _see_other(PREFIX)
        resp.del_cookie(
            COOKIE,
            path=PREFIX,
            httponly=True,
            samesite="Strict",
            secure=request_is_https(request),
        )
        return resp

    # -- data -------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Everything the page shows, at this moment (no I/O)."""
        rt = self.rt
        stats = self.sampler.stats
        counts = rt.smap.counts()
        migration = rt.migration
        now = time.monotonic()
        instances = []
        healthy = sessions_total = capacity_total = 0
        for inst in rt.fleet:
            n = counts.get(inst.name, 0)
            sessions_total += n
            capacity_total += inst.config.max_sessions
            if inst.healthy:
                healthy += 1
                health = "healthy"
            elif inst.ejected_until > now:
                health = "ejected"
            else:
                health = "down"
            job = migration.jobs.get(inst.name) if migration is not None else None
            instances.append(
                {
                    "name": inst.name,
                    "url": public_url(inst.config.url),
                    "health": health,
                    "healthy": inst.healthy,
                    "ejected_for": round(inst.ejected_until - now, 1)
                    if inst.ejected_until > now
                    else 0,
                    "admin": inst.admin.value,
                    "placeable": inst.placeable,
                    "sessions": n,
                    "capacity": inst.config.max_sessions,
                    "weight": inst.config.weight,
                    "load": round(load_ratio(inst, n), 4),
                    **stats.get(inst.name).as_dict(),
                    "drain": None if job is None else _drain_summary(job.as_dict()),
                }
            )
        return {
            "ts": time.time(),
            # The rates' window, and how much of it the samples cover so far.
            "window": self.sampler.window,
            "covered": round(stats.window, 3),
            "instances": instances,
            "totals": {
                "instances": len(instances),
                "healthy": healthy,
                "sessions": sessions_total,
                "mapped": len(rt.smap),
                "capacity": capacity_total,
                **stats.total.as_dict(),
            },
            "failovers": list(
                reversed(rt.events.recent(_RECENT_FAILOVERS, kind=FAILOVER_KINDS[0]))
            ),
        }

    async def _stream(self, request: web.BaseRequest) -> web.StreamResponse:
        resp = web.StreamResponse(
            headers={
                **_SECURITY_HEADERS,
                "Content-Type": "text/event-stream; charset=utf-8",
                "X-Accel-Buffering": "no",  # no buffering in a proxy in front
            }
        )
        await resp.prepare(request)
        events = self.rt.events
        q = events.subscribe()
        self._streams.add(q)
        loop = asyncio.get_running_loop()
        try:
            await resp.write(b"retry: 2000\n\n")
            await _send(resp, "hello", {"events": events.recent(_RECENT_EVENTS)})
            await _send(resp, "snapshot", self.snapshot())
            next_snapshot = loop.time() + self.tick
            while not self._closing:
                if self.rt.events is not events:
                    # A reload built a new event log: follow it.
                    events.unsubscribe(q)
                    self._streams.discard(q)
                    events = self.rt.events
                    q = events.subscribe()
                    self._streams.add(q)
                wait = next_snapshot - loop.time()
                if wait <= 0:
                    await _send(resp, "snapshot", self.snapshot())
                    next_snapshot = loop.time() + self.tick
                    continue
                try:
                    async with asyncio.timeout(wait):
                        event = await q.get()
                except TimeoutError:
                    continue
                batch = [event]
                while not q.empty() and len(batch) < 1000:
                    batch.append(q.get_nowait())
                if any(e is _CLOSE for e in batch):
                    break
                for e in batch:
                    await _send(resp, "fleet", e)
                # Show the change itself soon, several changes in one snapshot.
                next_snapshot = min(next_snapshot, loop.time() + 0.1)
        except ConnectionError:
            pass  # the browser went away: seen at the next write, within a tick
        finally:
            events.unsubscribe(q)
            self._streams.discard(q)
        return resp

    async def _bridge(self, request: web.BaseRequest, rest: str, key: str) -> web.StreamResponse:
        """An allowed admin endpoint, called for the page (already authenticated)."""
        if not any(m == request.method and p.fullmatch(rest) for m, p in _BRIDGE):
            return _error(request, 404, "not_found", f"the dashboard does not offer /admin/{rest}")
        headers = CIMultiDict(request.headers)
        for name in ("Cookie", "Authorization", CSRF_HEADER):
            headers.popall(name, None)
        headers["X-Admin-Key"] = key
        url = URL.build(path="/admin/" + rest, encoded=False).with_query(request.query)
        clone = request.clone(rel_url=url, headers=headers)
        return await self.admin(clone)


def _drain_summary(job: dict[str, Any]) -> dict[str, Any]:
    # Counts only: a job's failure details may quote an upstream's answer.
    return {k: job.get(k) for k in _DRAIN_FIELDS}


async def _send(resp: web.StreamResponse, event: str, data: Any) -> None:
    payload = json.dumps(data, separators=(",", ":"), default=str)
    await resp.write(f"event: {event}\ndata: {payload}\n\n".encode())
