"""Blazz's calls to its main app (``LARAVEL_URL``): webhooks and the startup restore.

As the real ``utils/webhookNotifier.js`` and ``src/services/AccountRestoration.js``:

- every event is ``POST {url}/api/whatsapp/webhooks/webjs`` with a compact JSON
  body ``{"event", "data"}``, ``X-HMAC-Signature`` = hex HMAC-SHA256(secret,
  X-Timestamp + body), ``X-Timestamp`` (unix seconds, new for each attempt),
  ``X-Instance-Url: http://localhost:<port>``, ``User-Agent:
  WhatsApp-WebJS-Service/1.0``, ``Connection: close``;
- 2xx is success; 429 is retried after 1, 2, 4 s; connection refused and
  timeouts (10 s each) after 2, 4, 8 s; any other answer (401, 404, 5xx) fails
  at once and the event is dropped;
- at startup ``GET {url}/api/whatsapp/accounts/active`` with ``X-API-Key``
  (retried after 1 and 2 s on connection refused only), and for each session
  that fails to start ``POST {url}/api/whatsapp/sessions/{id}/mark-disconnected``
  ``{"workspace_id", "reason"}`` 0.1 s later (errors ignored).

``retry_scale`` multiplies every one of those delays (tests use a small one).
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import hmac
import logging
import time
import urllib.parse
from collections.abc import Callable
from typing import Any, Final

import aiohttp

from router.simulator.express import dumps, js_string

log = logging.getLogger(__name__)

WEBHOOK_PATH: Final = "/api/whatsapp/webhooks/webjs"
ACTIVE_PATH: Final = "/api/whatsapp/accounts/active"
MAX_RETRIES: Final = 3
WEBHOOK_TIMEOUT: Final = 10.0
ACTIVE_TIMEOUT: Final = 15.0
MARK_TIMEOUT: Final = 5.0


class WebhookFailed(Exception):
    """The event was given up (its message is the one Blazz would log)."""


def signature(secret: str, timestamp: str, body: str) -> str:
    return hmac.new(secret.encode(), (timestamp + body).encode(), hashlib.sha256).hexdigest()


def _refused(exc: BaseException) -> bool:
    os_error = getattr(exc, "os_error", None)
    return isinstance(os_error, OSError) and os_error.errno == errno.ECONNREFUSED


class Laravel:
    """The main app, as one instance talks to it."""

    def __init__(
        self,
        url: str,
        secret: str,
        api_key: str | None,
        port: Callable[[], int],
        retry_scale: float = 1.0,
    ) -> None:
        self.url = url.rstrip("/")
        self.secret = secret
        self.api_key = api_key
        self.port = port
        self.retry_scale = retry_scale
        self._http: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    def http(self) -> aiohttp.ClientSession:
        if self._http is None or self._http.closed:
            # keepAlive: false, like the service's http.Agent
            self._http = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(force_close=True), auto_decompress=True
            )
        return self._http

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._http is not None:
            await self._http.close()

    def spawn(self, coro: Any) -> None:
        """Run a call in the background (fire and forget), cancelled at shutdown."""
        task: asyncio.Task[Any] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.info("main app call failed: %s", task.exception())

    async def _sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds * self.retry_scale)

    async def send_event(self, event: str, data: dict[str, Any]) -> None:
        """``sendToLaravel(event, data)``: raises WebhookFailed when given up."""
        body = dumps({"event": event, "data": data})
        retry = 0
        while True:
            timestamp = str(int(time.time()))
            headers = {
                "Accept": "application/json, text/plain, */*",
                "Content-Type": "application/json",
                "X-HMAC-Signature": signature(self.secret, timestamp, body),
                "X-Timestamp": timestamp,
                "X-Instance-Url": f"http://localhost:{self.port()}",
                "User-Agent": "WhatsApp-WebJS-Service/1.0",
                "Connection": "close",
            }
            try:
                async with self.http().post(
                    self.url + WEBHOOK_PATH,
                    data=body.encode(),
                    headers=headers,
                    timeout=aiohttp.ClientTimeout(total=WEBHOOK_TIMEOUT),
                ) as resp:
                    status, text = resp.status, await resp.text(errors="replace")
            except (TimeoutError, aiohttp.ClientConnectorError) as exc:
                timed_out = isinstance(exc, TimeoutError)
                if (timed_out or _refused(exc)) and retry < MAX_RETRIES:
                    await self._sleep(2**retry * 2)
                    retry += 1
                    continue
                raise WebhookFailed(
                    f"timeout of {int(WEBHOOK_TIMEOUT * 1000)}ms exceeded"
                    if timed_out
                    else str(exc)
                ) from None
            except aiohttp.ClientError as exc:
                raise WebhookFailed(str(exc)) from None
            if 200 <= status < 300:
                return
            if status >= 500:
                raise WebhookFailed(f"Request failed with status code {status}")
            if status == 429:
                if retry < MAX_RETRIES:
                    await self._sleep(2**retry)
                    retry += 1
                    continue
                raise WebhookFailed("Webhook rate limit exceeded after retries")
            if status == 401:
                raise WebhookFailed("Webhook authentication failed: Invalid signature")
            raise WebhookFailed(f"Webhook failed with status {status}: {text}")

    def notify(self, event: str, data: dict[str, Any]) -> None:
        """Fire and forget (QR, authenticated, error, disconnected)."""
        self.spawn(self.send_event(event, data))

    def _key_headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.api_key is not None:
            headers["X-API-Key"] = self.api_key
        return headers

    async def active_sessions(self) -> list[Any]:
        """``getActiveSessions()``: 3 attempts on connection refused, else one."""
        delay = 1.0
        for attempt in range(1, 4):
            try:
                async with self.http().get(
                    self.url + ACTIVE_PATH,
                    headers=self._key_headers(),
                    timeout=aiohttp.ClientTimeout(total=ACTIVE_TIMEOUT),
                ) as resp:
                    resp.raise_for_status()
                    data = await resp.json(content_type=None)
            except aiohttp.ClientConnectorError as exc:
                if _refused(exc) and attempt < 3:
                    await self._sleep(delay)
                    delay *= 2
                    continue
                return []
            except (TimeoutError, aiohttp.ClientError, ValueError):
                return []
            sessions = data.get("sessions") if isinstance(data, dict) else None
            return sessions if isinstance(sessions, list) else []
        return []

    async def mark_disconnected(self, session_id: Any, workspace_id: Any, reason: str) -> None:
        await self._sleep(0.1)
        path = f"/api/whatsapp/sessions/{urllib.parse.quote(js_string(session_id), safe='')}"
        try:
            async with self.http().post(
                self.url + path + "/mark-disconnected",
                data=dumps(
                    {
                        "workspace_id": workspace_id,
                        "reason": reason or "Failed to restore on startup",
                    }
                ).encode(),
                headers=self._key_headers(),
                timeout=aiohttp.ClientTimeout(total=MARK_TIMEOUT),
            ) as resp:
                await resp.read()
        except (TimeoutError, aiohttp.ClientError):
            pass  # "Silently ignore marking errors"
