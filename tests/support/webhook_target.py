"""Webhook relay test support: a receiver (the "main app") on a real socket,
configs, signed instance requests, and relays on sockets.

    target = TargetServer(hmac_key="app-key", verify="blazz")
    await target.start()            # target.url
    await target.stop()             # down: connection refused
    await target.start()            # up again, same port
    await target.wait_unique(30)    # until 30 distinct event ids were delivered

It checks signatures like the real receivers (Blazz: HMAC-SHA256 of
timestamp + body, timestamp not older than 300 s; WAHA: HMAC-SHA512 of the
body) and answers 401 when they fail, records every accepted delivery in
arrival order, and can be told to answer other statuses or to be slow.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import json
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from router.config import (
    InstanceConfig,
    ListenConfig,
    RouterConfig,
    StoreConfig,
    WebhookConfig,
    WebhookDelivery,
    WebhookIngest,
    WebhookTarget,
)
from router.webhooks.relay import WebhookRelay


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Delivery:
    event_id: str
    session: str | None
    headers: dict[str, str]
    body: bytes
    at: float = field(default_factory=time.time)

    @property
    def doc(self) -> Any:
        return json.loads(self.body)


class TargetServer:
    def __init__(
        self,
        *,
        hmac_key: str | None = None,
        verify: str | None = None,
        delay: float = 0.0,
        path: str = "/hook",
    ) -> None:
        self.hmac_key = hmac_key
        self.verify = verify
        self.delay = delay
        self.path = path
        # Answer for a delivery (default 200); None means "use 200".
        self.status_for: Callable[[Delivery], int | None] | None = None
        self.deliveries: list[Delivery] = []  # accepted (2xx), in arrival order
        self.requests = 0  # every request that reached the handler
        self.in_flight = 0  # requests inside the (delayed) handler right now
        self.rejected: list[tuple[int, str]] = []
        self.port: int | None = None
        self._runner: web.AppRunner | None = None
        self._cond = asyncio.Condition()

    @property
    def url(self) -> str:
        assert self.port is not None
        return f"http://127.0.0.1:{self.port}{self.path}"

    async def start(self, port: int | None = None) -> None:
        app = web.Application()
        app.router.add_post(self.path, self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=5.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port or self.port or 0, reuse_address=True)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        body = await request.read()
        headers = dict(request.headers)
        problem = self._check(headers, body)
        if problem:
            self.rejected.append((401, problem))
            return web.json_response({"error": problem}, status=401)
        d = Delivery(
            event_id=headers.get("X-Event-Id", ""),
            session=headers.get("X-Router-Session"),
            headers=headers,
            body=body,
        )
        if self.delay:
            self.in_flight += 1
            try:
                await asyncio.sleep(self.delay)
            finally:
                self.in_flight -= 1
        status = (self.status_for(d) if self.status_for else None) or 200
        if status >= 300:
            self.rejected.append((status, d.event_id))
            return web.json_response({"error": "nope"}, status=status)
        async with self._cond:
            self.deliveries.append(d)
            self._cond.notify_all()
        return web.json_response({"ok": True})

    def _check(self, headers: dict[str, str], body: bytes) -> str | None:
        if not self.hmac_key or not self.verify:
            return None
        key = self.hmac_key.encode()
        mode = self.verify
        if mode == "auto":  # as the event was signed: Blazz or WAHA style
            mode = "waha" if "X-Webhook-Hmac" in headers else "blazz"
        if mode == "blazz":
            ts = headers.get("X-Timestamp", "")
            sig = headers.get("X-HMAC-Signature", "")
            want = hmac.new(key, ts.encode() + body, hashlib.sha256).hexdigest()
            if not hmac.compare_digest(sig, want):
                return "bad signature"
            if not ts.isdigit() or time.time() - int(ts) > 300:
                return "stale timestamp"
            return None
        sig = headers.get("X-Webhook-Hmac", "")
        want = hmac.new(key, body, hashlib.sha512).hexdigest()
        return None if hmac.compare_digest(sig, want) else "bad signature"

    # -- reading what arrived ------------------------------------------------

    def unique_ids(self) -> set[str]:
        return {d.event_id for d in self.deliveries}

    def first_order(self) -> dict[str | None, list[str]]:
        """Per session, event ids in order of their first delivery."""
        seen: set[str] = set()
        out: dict[str | None, list[str]] = {}
        for d in self.deliveries:
            if d.event_id not in seen:
                seen.add(d.event_id)
                out.setdefault(d.session, []).append(d.event_id)
        return out

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for d in self.deliveries:
            out[d.event_id] = out.get(d.event_id, 0) + 1
        return out

    async def wait_unique(self, n: int, within: float = 20.0) -> None:
        """Until ``n`` distinct event ids were delivered (AssertionError after ``within`` s)."""
        async with self._cond:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(
                    self._cond.wait_for(lambda: len(self.unique_ids()) >= n), within
                )
        got = len(self.unique_ids())
        assert got >= n, f"only {got} of {n} events delivered within {within} s"

    async def wait_requests(self, n: int, within: float = 20.0) -> None:
        """Until the handler saw ``n`` requests (polled: requests may not be accepted)."""
        deadline = time.monotonic() + within
        while self.requests < n:
            assert time.monotonic() < deadline, f"only {self.requests} of {n} requests arrived"
            await asyncio.sleep(0.01)


# -- relay side ------------------------------------------------------------

BLAZZ_KEY = "blazz-instance-secret"
WAHA_KEY = "waha-instance-secret"
APP_KEY = "main-app-secret"
ADMIN_KEY = "admin-secret"

# Short waits so a test's outage outlasts several durable rounds in a second.
FAST = WebhookDelivery(
    attempts_per_round=2,
    round_backoff=0.02,
    backoff_base=0.1,
    backoff_max=0.3,
    max_age=60.0,
    concurrency=32,
    timeout=2.0,
    lease=5.0,
)


def instances(*names: str) -> tuple[InstanceConfig, ...]:
    return tuple(
        InstanceConfig(name=n, url=f"http://127.0.0.1:{3001 + i}") for i, n in enumerate(names)
    )


def make_config(
    targets: Sequence[WebhookTarget],
    *,
    backend: Backend,
    delivery: WebhookDelivery = FAST,
    ingest: WebhookIngest | None = None,
    admin_key: str | None = ADMIN_KEY,
    port: int = 0,
    consumer_name: str | None = None,
) -> RouterConfig:
    wh = WebhookConfig(
        targets=tuple(targets),
        ingest=ingest or WebhookIngest(blazz_hmac_key=BLAZZ_KEY, waha_hmac_key=WAHA_KEY),
        delivery=delivery,
        sqlite_path=backend.sqlite_path,
        consumer_name=consumer_name,
    )
    return RouterConfig(
        instances=instances("wa-1", "wa-2"),
        listen=ListenConfig("127.0.0.1", port),
        store=StoreConfig(url=backend.store_url, key_prefix=backend.prefix),
        admin_key=admin_key,
        webhooks=wh,
    )


@dataclass
class Backend:
    name: str
    store_url: str
    prefix: str
    sqlite_path: str


def blazz_body(event: str, session: str, **data: Any) -> bytes:
    return json.dumps(
        {"event": event, "data": {"workspace_id": 1, "session_id": session, **data}}
    ).encode()


def waha_body(event: str, session: str, eid: str | None = None, **payload: Any) -> bytes:
    doc: dict[str, Any] = {
        "event": event,
        "session": session,
        "timestamp": int(time.time() * 1000),
        "payload": payload,
        "engine": "NOWEB",
    }
    if eid:
        doc["id"] = eid
    return json.dumps(doc).encode()


def blazz_headers(body: bytes, key: str = BLAZZ_KEY, ts: float | None = None) -> dict[str, str]:
    t = str(int(time.time() if ts is None else ts))
    sig = hmac.new(key.encode(), t.encode() + body, hashlib.sha256).hexdigest()
    return {
        "Content-Type": "application/json",
        "X-Timestamp": t,
        "X-HMAC-Signature": sig,
        "X-Instance-Url": "http://localhost:3001",
    }


def waha_headers(body: bytes, key: str = WAHA_KEY, ts_ms: float | None = None) -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        "X-Webhook-Hmac": hmac.new(key.encode(), body, hashlib.sha512).hexdigest(),
        "X-Webhook-Hmac-Algorithm": "sha512",
        "X-Webhook-Timestamp": str(int(time.time() * 1000 if ts_ms is None else ts_ms)),
    }


class RelayHandle:
    """A relay behind its own aiohttp server (what ``Server.dispatch`` does for it)."""

    def __init__(self, relay: WebhookRelay) -> None:
        self.relay = relay
        self._runner: web.ServerRunner | None = None
        self.url = ""
        self.http: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        await self.relay.start()

        async def dispatch(request: web.BaseRequest) -> web.StreamResponse:
            if self.relay.handles(request.path):
                return await self.relay.handle(request)
            return web.Response(status=404)

        self._runner = web.ServerRunner(web.Server(dispatch), shutdown_timeout=5.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        # A hang shows up as a timeout here, not as a stuck test.
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))

    async def stop(self) -> None:
        if self.http is not None:
            await self.http.close()
            self.http = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self.relay.stop()

    async def post(
        self, path: str, body: bytes, headers: dict[str, str] | None = None
    ) -> tuple[int, Any]:
        assert self.http is not None
        async with self.http.post(self.url + path, data=body, headers=headers or {}) as resp:
            text = await resp.text()
            try:
                return resp.status, json.loads(text)
            except ValueError:
                return resp.status, text

    async def blazz(self, body: bytes, instance: str = "wa-1", **kw: Any) -> tuple[int, Any]:
        return await self.post(f"/webhooks/blazz/{instance}", body, blazz_headers(body, **kw))

    async def waha(self, body: bytes, instance: str = "wa-2", **kw: Any) -> tuple[int, Any]:
        return await self.post(f"/webhooks/waha/{instance}", body, waha_headers(body, **kw))

    async def admin(self, method: str, path: str, key: str = ADMIN_KEY) -> tuple[int, Any]:
        assert self.http is not None
        url = f"{self.url}/admin/webhooks{path}"
        async with self.http.request(method, url, headers={"X-Admin-Key": key}) as resp:
            return resp.status, await resp.json(content_type=None)


@contextlib.asynccontextmanager
async def relays() -> AsyncIterator[Callable[..., Awaitable[RelayHandle]]]:
    """``async with relays() as start: h = await start(config)``; all stopped at the end."""
    handles: list[RelayHandle] = []

    async def start(config: RouterConfig, **kwargs: Any) -> RelayHandle:
        kwargs.setdefault("stats_interval", 0.2)
        h = RelayHandle(WebhookRelay(config, **kwargs))
        await h.start()
        handles.append(h)
        return h

    try:
        yield start
    finally:
        for h in reversed(handles):
            await h.stop()


def target(url: str, **kw: Any) -> WebhookTarget:
    return WebhookTarget(url=url, **{"name": "app", "hmac_key": APP_KEY, **kw})


def with_delivery(cfg: WebhookDelivery, **changes: Any) -> WebhookDelivery:
    return dataclasses.replace(cfg, **changes)


def backend_for(request: pytest.FixtureRequest, name: str, tmp_path: Any) -> Backend:
    if name == "redis":
        url = request.getfixturevalue("redis_url")
        prefix = request.getfixturevalue("redis_prefix")
        return Backend("redis", url, prefix, str(tmp_path / "unused.db"))
    return Backend("sqlite", "memory", "wa-router:", str(tmp_path / "var" / "webhooks.db"))


async def wait_drained(queue: Any, within: float = 10.0) -> None:
    """Until the queue has no pending event (acks follow deliveries a moment later)."""
    deadline = time.monotonic() + within
    while (await queue.stats()).pending:
        assert time.monotonic() < deadline, "events still pending"
        await asyncio.sleep(0.01)
