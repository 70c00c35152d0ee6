"""Blazz sessions: ``SessionManager.js`` of the real ``whatsapp-service``.

One map from ``session_id`` (any JSON value, keyed like a JavaScript Map) to
a client: its ``metadata`` (exactly the keys the service keeps; status, list,
health and metadata answers are read from it) and its browser (profile lock,
see ``browser.py``). What it reproduces (``/work/real-blazz/REPORT.md``):

- statuses ``qr_scanning`` (set at create, before initialize, and on every QR),
  ``authenticated``, ``connected``, ``error`` (no phone number after
  ``ready``; terminal), ``disconnected``; nothing else;
- a create puts the session in the map first, launches the browser (a locked
  profile fails at once), then answers ``qr_scanning`` after ``init_delay``,
  even when it restores a stored login (then: authenticated, connected; no QR);
- every failed create deletes the map entry of that id: a second create of a
  running session (same workspace: same profile, locked) fails with the
  SingletonLock error and the running session becomes invisible while its
  browser keeps the lock; with another workspace it succeeds and the first
  browser leaks;
- DELETE closes the browser (lock released) and keeps the stored login.

Not modelled: AutoReconnect, chat sync, incoming messages, the ``restoreSession``
path (its route is broken anyway), events of a client after it left the map.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import itertools
import re
import secrets
import time
from collections.abc import Coroutine, Hashable
from dataclasses import dataclass, field
from typing import Any, Final

from router.simulator.browser import (
    Browser,
    chromium_lock_error,
    delete_auth,
    load_auth,
    profile_dir,
    save_auth,
)
from router.simulator.express import MISSING, JSDate, js_string, truthy
from router.simulator.laravel import Laravel, WebhookFailed
from router.simulator.options import SimulatorOptions

Key = tuple[Hashable, ...]

# LocalAuth: /^[-_\w]+$/i, no "u" flag: ASCII word characters only.
_CLIENT_ID: Final = re.compile(r"[-_A-Za-z0-9]+")
INVALID_CLIENT_ID: Final = (
    "Invalid clientId. Only alphanumeric characters, underscores and hyphens are allowed."
)
TARGET_CLOSED: Final = "Protocol error (Target.setAutoAttach): Target closed."
PAGE_CLOSED: Final = (
    "Protocol error (Runtime.callFunctionOn): Session closed. Most likely the page has been closed."
)
NOT_INJECTED: Final = (
    "Evaluation failed: TypeError: Cannot read properties of undefined (reading 'getChat')\n"
    "    at pptr://__puppeteer_evaluation_script__:2:46"
)
# What the stub pairing calls a phone that cannot be read (status ``error``).
NO_PHONE: Final = "none"
BLAZZ_STATUSES: Final = ("qr_scanning", "authenticated", "connected", "error", "disconnected")

_objects = itertools.count()


def key_of(value: Any) -> Key:
    """A JavaScript Map key: ``"1" != 1``, ``1 == 1.0``, objects by identity."""
    if value is MISSING:
        return ("undefined",)
    if value is None:
        return ("null",)
    if isinstance(value, bool):
        return ("boolean", value)
    if isinstance(value, int | float):
        return ("number", float(value))
    if isinstance(value, str):
        return ("string", value)
    return ("object", next(_objects))


def phone_for(name: str) -> str:
    digits = str(int(hashlib.sha256(name.encode()).hexdigest(), 16))
    return "1" + digits[:10]


def _qr_data_url() -> str:
    png = b"\x89PNG\r\n\x1a\n" + secrets.token_bytes(96)
    return "data:image/png;base64," + base64.b64encode(png).decode()


class CreateFailed(Exception):
    """``createSession`` threw: answered 500 ``{"error": message}``."""


class SendFailed(Exception):
    """``sendMessage`` threw ``message``."""


@dataclass(eq=False)
class Client:
    key: Key
    session_id: Any
    workspace_id: Any
    browser: Browser
    metadata: dict[str, Any]
    # launching, restoring, qr, authenticating, ready, error, disconnected, closed
    phase: str = "launching"
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def name(self) -> str:
        return js_string(self.session_id)

    @property
    def status(self) -> Any:
        return self.metadata.get("status", MISSING)

    def waha_status(self) -> str:
        """The status in WAHA's names, for ``/_sim/state`` and the test harness."""
        status = self.status
        if status == "connected":
            return "WORKING"
        if status == "authenticated":
            return "STARTING"
        if status == "qr_scanning":
            return "STARTING" if self.phase in ("launching", "restoring") else "SCAN_QR_CODE"
        if status == "error":
            return "FAILED"
        if status == "disconnected":
            return "STOPPED"
        return js_string(status)

    def stop_tasks(self) -> None:
        current = asyncio.current_task()
        for task in list(self.tasks):
            if task is not current:
                task.cancel()
        self.tasks.clear()


class BlazzSessions:
    """The sessions of one instance (``this.sessions`` + ``this.metadata``)."""

    def __init__(self, opts: SimulatorOptions, laravel: Laravel | None) -> None:
        self.opts = opts
        self.laravel = laravel
        self.clients: dict[Key, Client] = {}
        # Clients that left the map with their browser still running.
        self.orphans: list[Client] = []

    # -- lookups ----------------------------------------------------------

    def get(self, session_id: Any) -> Client | None:
        return self.clients.get(key_of(session_id))

    def metadata(self, session_id: Any) -> dict[str, Any] | None:
        client = self.get(session_id)
        return client.metadata if client is not None else None

    # -- create / destroy ----------------------------------------------------

    def _new_client(self, session_id: Any, workspace_id: Any, account_id: Any) -> Client:
        now = time.time()
        profile = profile_dir(self.opts.auth_dir, workspace_id, session_id)
        return Client(
            key_of(session_id),
            session_id,
            workspace_id,
            Browser(profile, self.opts.browser_linger),
            {
                "workspaceId": workspace_id,
                "accountId": account_id,
                "status": "qr_scanning",
                "createdAt": JSDate(now),
                "phoneNumber": None,
                "lastActivity": JSDate(now),
                "performanceStart": int(now * 1000),
            },
        )

    def _put(self, client: Client) -> None:
        """``this.sessions.set(...)``: an existing client is dropped, its browser lives on."""
        old = self.clients.get(client.key)
        self.clients[client.key] = client
        if old is not None:
            self._orphan(old)

    def _orphan(self, client: Client) -> None:
        client.stop_tasks()
        if client.browser.alive or client.browser.proc is not None:
            self.orphans.append(client)

    def _forget(self, key: Key) -> None:
        """The create's ``catch``: delete whatever the map holds for that id."""
        client = self.clients.pop(key, None)
        if client is not None:
            self._orphan(client)

    async def create(self, session_id: Any, workspace_id: Any, account_id: Any) -> dict[str, Any]:
        """``createSession``: raises CreateFailed (the service answers 500)."""
        key = key_of(session_id)
        if truthy(session_id) and not _CLIENT_ID.fullmatch(js_string(session_id)):
            self._forget(key)
            raise CreateFailed(INVALID_CLIENT_ID)
        client = self._new_client(session_id, workspace_id, account_id)
        self._put(client)
        if not client.browser.launch():
            self._forget(key)
            raise CreateFailed(chromium_lock_error(client.browser.profile))
        await asyncio.sleep(self.opts.init_delay)
        if client.phase == "closed":  # destroyed while initializing
            self._forget(key)
            raise CreateFailed(TARGET_CLOSED)
        if self.clients.get(key) is client:
            self._begin(client)
        return {"success": True, "session_id": session_id, "status": "qr_scanning"}

    async def disconnect(self, session_id: Any) -> dict[str, Any]:
        """``disconnectSession``: close the browser, forget the session, keep the login."""
        client = self.get(session_id)
        if client is None:
            return {
                "success": True,
                "message": "Session already disconnected or not found in memory",
                "alreadyDisconnected": True,
            }
        self._close(client)
        if self.clients.get(client.key) is client:
            del self.clients[client.key]
        return {"success": True, "message": "Session disconnected successfully"}

    def _close(self, client: Client) -> None:
        client.stop_tasks()
        client.browser.close()
        client.phase = "closed"

    def shutdown(self) -> None:
        """Graceful stop: destroy every client; leaked browsers are killed."""
        for client in list(self.clients.values()):
            self._close(client)
        self.clients.clear()
        for client in self.orphans:
            client.browser.orphan_kill()
        self.orphans.clear()

    def kill_browsers(self) -> None:
        """The process dies of an exception: puppeteer SIGKILLs every browser."""
        for client in [*self.clients.values(), *self.orphans]:
            client.stop_tasks()
            client.browser.orphan_kill()

    # -- the client's events ------------------------------------------------------

    def _spawn(self, client: Client, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        client.tasks.add(task)
        task.add_done_callback(client.tasks.discard)

    def _notify(self, event: str, data: dict[str, Any]) -> None:
        if self.laravel is not None:
            self.laravel.notify(event, data)

    def _ids(self, client: Client) -> dict[str, Any]:
        return {"workspace_id": client.workspace_id, "session_id": client.session_id}

    def _begin(self, client: Client) -> None:
        """``initialize()`` resolved: restore a stored login, or show a QR."""
        auth = load_auth(client.browser.profile)
        if auth is not None:
            client.phase = "restoring"
            self._spawn(client, self._restore(client, auth))
            return
        self._show_qr(client)
        self._spawn(client, self._rotate_qr(client))
        if self.opts.auto_auth:
            self._spawn(client, self._auto_pair(client))

    async def _restore(self, client: Client, auth: dict[str, Any]) -> None:
        half = self.opts.start_delay / 2
        await asyncio.sleep(half)
        self._authenticated(client)
        phone = auth.get("phone_number")
        await self._connect(client, phone if isinstance(phone, str) else None)

    def _show_qr(self, client: Client) -> None:
        count = int(client.metadata.get("qrCount") or 0) + 1
        qr = _qr_data_url()
        client.phase = "qr"
        client.metadata.update(
            status="qr_scanning", qrCode=qr, qrGeneratedAt=int(time.time() * 1000), qrCount=count
        )
        self._notify(
            "qr_code_generated",
            {
                **self._ids(client),
                "qr_code": qr,
                "expires_in": 60,
                "qr_count": count,
                "is_regeneration": count > 1,
            },
        )

    async def _rotate_qr(self, client: Client) -> None:
        while True:
            await asyncio.sleep(self.opts.qr_interval)
            self._show_qr(client)

    async def _auto_pair(self, client: Client) -> None:
        await asyncio.sleep(self.opts.start_delay / 2)
        self.pair(client, None)

    def pair(self, client: Client, phone: str | None) -> None:
        """The phone scanned the QR: the login is stored in the profile."""
        if client.phase != "qr":
            raise ValueError(f"session is not showing a QR code (status {client.status})")
        client.stop_tasks()
        phone = phone or phone_for(client.name)
        save_auth(client.browser.profile, {"phone_number": phone, "paired_at": time.time()})
        self._authenticated(client)
        self._spawn(client, self._connect(client, phone))

    async def _connect(self, client: Client, phone: str | None) -> None:
        await asyncio.sleep(self.opts.start_delay / 2)
        await self._ready(client, phone)

    def _authenticated(self, client: Client) -> None:
        client.phase = "authenticating"
        client.metadata.update(status="authenticated", authenticatedAt=JSDate(time.time()))
        self._notify("session_authenticated", {**self._ids(client), "status": "authenticated"})

    async def _ready(self, client: Client, phone: str | None) -> None:
        if phone is None or phone == NO_PHONE:
            client.phase = "error"
            client.metadata.update(
                status="error",
                error="phone_extraction_failed",
                lastError="Unable to extract phone number",
            )
            self._notify(
                "session_error",
                {
                    **self._ids(client),
                    "error": "phone_extraction_failed",
                    "message": "Failed to extract phone number after retries",
                },
            )
            return
        client.phase = "ready"
        client.metadata.update(
            status="connected",
            phoneNumber=phone,
            platform=MISSING,
            connectedAt=JSDate(time.time()),
            phoneExtractionMethod="client.info.wid",
        )
        if self.laravel is None:
            return
        data = {
            **self._ids(client),
            "phone_number": phone,
            "status": "connected",
            "platform": MISSING,
            "extraction_method": "client.info.wid",
        }
        try:
            await self.laravel.send_event("session_ready", data)
        except WebhookFailed as exc:
            with contextlib.suppress(WebhookFailed):
                await self.laravel.send_event(
                    "session_error",
                    {
                        **self._ids(client),
                        "error": "webhook_send_failed",
                        "message": f"Failed to send session_ready: {exc}",
                        "phone_number": phone,
                    },
                )

    # -- test control -------------------------------------------------------------

    def kill_browser(self, client: Client) -> None:
        """Chromium died: nothing notices (status stays), sends fail."""
        client.stop_tasks()
        client.browser.kill()

    def disconnected(self, client: Client, reason: str) -> None:
        """wwebjs ``disconnected``: the client is destroyed; LOGOUT also drops the login."""
        client.stop_tasks()
        if "LOGOUT" in reason.upper():
            delete_auth(client.browser.profile)
        client.browser.close()
        client.phase = "disconnected"
        client.metadata.update(
            status="disconnected", lastDisconnectReason=reason, disconnectedAt=JSDate(time.time())
        )
        self._notify("session_disconnected", {**self._ids(client), "reason": reason})

    def bulk(self, session_id: str, status: str, workspace_id: Any, auth: bool) -> bool:
        """Put a session in memory in ``status`` without timers; False if its profile is locked."""
        client = self._new_client(session_id, workspace_id, MISSING)
        if not client.browser.launch():
            return False
        self._put(client)
        phone = phone_for(session_id)
        client.phase = {
            "connected": "ready",
            "authenticated": "authenticating",
            "qr_scanning": "qr",
            "error": "error",
            "disconnected": "disconnected",
        }.get(status, "qr")
        client.metadata["status"] = status
        if status == "connected":
            client.metadata.update(phoneNumber=phone, connectedAt=JSDate(time.time()))
        if auth:
            save_auth(client.browser.profile, {"phone_number": phone, "paired_at": time.time()})
        return True

    # -- the main app -----------------------------------------------------------------

    async def restore_from_main_app(self) -> None:
        """At start: create every session the main app lists, one after the other."""
        if self.laravel is None:
            return
        for item in await self.laravel.active_sessions():
            if not isinstance(item, dict):
                continue
            session_id = item.get("session_id", MISSING)
            workspace_id = item.get("workspace_id", MISSING)
            if self.get(session_id) is not None:
                continue
            try:
                # AccountRestoration passes the account id where the options go: lost.
                await self.create(session_id, workspace_id, MISSING)
            except CreateFailed as exc:
                self.laravel.spawn(
                    self.laravel.mark_disconnected(session_id, workspace_id, str(exc))
                )

    # -- sends -----------------------------------------------------------------------

    def sendable(self, session_id: Any) -> Client:
        """``sendMessage``'s checks: raises SendFailed like the service."""
        client = self.get(session_id)
        if client is None:
            raise SendFailed("Session not found")
        if client.status != "connected":
            raise SendFailed("Session not connected")
        if not client.browser.alive:
            raise SendFailed(PAGE_CLOSED)
        if client.phase != "ready":
            raise SendFailed(NOT_INJECTED)
        return client

    def state(self) -> list[dict[str, Any]]:
        return [self.state_of(client) for client in self.clients.values()]

    @staticmethod
    def state_of(client: Client) -> dict[str, Any]:
        connected = client.metadata.get("connectedAt")
        return {
            "name": client.name,
            "status": client.waha_status(),
            "blazz_status": None if client.status is MISSING else client.status,
            "workspace_id": None if client.workspace_id is MISSING else client.workspace_id,
            "phone": client.metadata.get("phoneNumber"),
            "connected_at": float(connected) if isinstance(connected, float) else None,
            "profile": str(client.browser.profile),
            "browser_alive": client.browser.alive,
            "browser_pid": client.browser.pid,
        }
