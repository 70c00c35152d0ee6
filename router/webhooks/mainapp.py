"""The router as a Blazz instance's main app: its other calls to ``LARAVEL_URL``.

Blazz builds every main-app URL as ``LARAVEL_URL`` + a fixed path: the
webhook (``POST /api/whatsapp/webhooks/webjs``, ingested by the relay), and
calls such as ``GET /api/whatsapp/accounts/active`` (at start),
``POST /api/whatsapp/chats/sync`` and ``.../mark-disconnected``. With
``LARAVEL_URL=http://ROUTER/webhooks/blazz/<instance>`` the router stands in
for the main app completely:

* every other call goes to ``webhooks.main_app_url`` + the same path and
  query, with the instance's own headers (its ``X-API-Key``, its HMAC
  signature) and body, and the main app's answer comes back as it is; a main
  app that cannot be reached is a JSON 502 (``main_app_unreachable``);
* ``GET /api/whatsapp/accounts/active`` is the exception. The main app
  answers every active account, and a Blazz instance restores every account
  it is given: passed on as it is, each starting instance would start every
  session of the fleet (two browsers on one phone, profile lock fights). The
  router keeps only the sessions this instance should run: those its map
  gives this instance, and those no instance runs yet, which it then maps to
  this instance (``claim``) so that the next instance to start does not get
  them too.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web

from router.errors import RouterError
from router.upstream import HOP_BY_HOP

log = logging.getLogger(__name__)

# (instance name, session ids the main app calls active) -> the ones it keeps.
Claim = Callable[[str, list[str]], Awaitable[set[str]]]

ACCOUNTS_ACTIVE = "/api/whatsapp/accounts/active"
# Headers that describe the hop, not the call.
_HOP = HOP_BY_HOP | {"host", "content-length"}
_MAX_ANSWER = 8 * 1024 * 1024


class MainAppProxy:
    def __init__(self, url: str | None, *, claim: Claim | None, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/") if url else None
        self.claim = claim
        self.timeout = timeout
        self._http: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    def _client(self) -> aiohttp.ClientSession:
        if self._http is None:
            self._http = aiohttp.ClientSession(
                auto_decompress=False,
                cookie_jar=aiohttp.DummyCookieJar(),
                skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
                timeout=aiohttp.ClientTimeout(total=self.timeout),
            )
        return self._http

    async def handle(self, request: web.BaseRequest, instance: str, path: str) -> web.Response:
        """``path`` is what the instance appended to ``LARAVEL_URL`` (from ``/``)."""
        if self.url is None:
            raise RouterError(
                404,
                "main_app_not_configured",
                f"{path} is a main-app call; set webhooks.main_app_url so the router can pass"
                " it on",
            )
        qs = request.rel_url.raw_query_string
        target = self.url + path + (f"?{qs}" if qs else "")
        filtered = request.method == "GET" and path == ACCOUNTS_ACTIVE
        headers = [
            (k, v)
            for k, v in request.headers.items()
            if k.lower() not in _HOP and not (filtered and k.lower() == "accept-encoding")
        ]
        body = await request.read() if request.body_exists else None
        try:
            async with self._client().request(
                request.method, target, headers=headers, data=body, allow_redirects=False
            ) as resp:
                payload = await resp.content.read(_MAX_ANSWER + 1)
                status = resp.status
                answer_headers = [(k, v) for k, v in resp.headers.items() if k.lower() not in _HOP]
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            # The kind of failure only: an aiohttp error's text can carry the
            # URL with its query string.
            log.warning(
                "main app call %s %s from %s failed: %s",
                request.method,
                path,
                instance,
                _failure(exc),
            )
            raise RouterError(
                502,
                "main_app_unreachable",
                f"the main app at webhooks.main_app_url did not answer {request.method} {path}",
                instance=instance,
            ) from None
        if len(payload) > _MAX_ANSWER:
            raise RouterError(502, "main_app_answer_too_large", "the main app answered too much")
        if filtered and 200 <= status < 300:
            payload = await self._only_this_instance(instance, payload)
        return web.Response(status=status, body=payload, headers=answer_headers)

    async def _only_this_instance(self, instance: str, payload: bytes) -> bytes:
        try:
            doc: Any = json.loads(payload)
        except (ValueError, UnicodeDecodeError):
            return payload
        if not isinstance(doc, dict) or not isinstance(doc.get("sessions"), list):
            return payload
        items = [s for s in doc["sessions"] if isinstance(s, dict)]
        ids = [s["session_id"] for s in items if isinstance(s.get("session_id"), str)]
        keep = await self.claim(instance, ids) if self.claim is not None else set()
        mine = [s for s in items if s.get("session_id") in keep]
        log.info(
            "accounts/active for %s: %d of the main app's %d sessions are its own",
            instance,
            len(mine),
            len(items),
        )
        doc["sessions"] = mine
        if "count" in doc:
            doc["count"] = len(mine)
        return json.dumps(doc).encode()


def _failure(exc: BaseException) -> str:
    """``ClientConnectorError: Connection refused``: the type and, for OS errors, their reason."""
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else None
    return type(exc).__name__ + (f": {reason}" if reason else "")
