"""``/admin/webhooks/*``: inspect the queue and manage dead letters.

Authenticated with the router's ``admin_key`` (header ``X-Admin-Key`` or
``Authorization: Bearer <key>``), like the rest of ``/admin``; without an
``admin_key`` in the config every path answers 404.

| request | does |
|---|---|
| ``GET /admin/webhooks/stats`` | backlog, oldest pending age, lanes, dead letters |
| ``GET /admin/webhooks/dead-letters?limit=&after=&target=`` | list, oldest first, no bodies |
| ``GET /admin/webhooks/dead-letters/{id}`` | one, with its body |
| ``POST /admin/webhooks/dead-letters/{id}/replay`` | queue it again (end of its lane, age reset) |
| ``POST /admin/webhooks/dead-letters/replay?target=`` | replay all (of one target) |
| ``DELETE /admin/webhooks/dead-letters/{id}`` | purge one |
| ``DELETE /admin/webhooks/dead-letters?target=&before=`` | purge all (matching) |

A list answer's ``next`` is the ``after`` of the next page; ``before`` is a
unix time (dead before it).
"""

from __future__ import annotations

import base64
import json
import math
import time
from typing import Any

from aiohttp import web

from router.errors import RouterError, error_response, request_id_of
from router.keys import admin_key_of, matches
from router.webhooks.queue import DeadLetter, EventQueue, QueueUnavailable

__all__ = ["PREFIX", "WebhookAdmin", "dead_letter_json"]

PREFIX = "/admin/webhooks"


def dead_letter_json(dl: DeadLetter, *, body: bool = False) -> dict[str, Any]:
    ev = dl.event
    out: dict[str, Any] = {
        "id": dl.id,
        "event_id": ev.id,
        "target": ev.target,
        "instance": ev.instance,
        "dialect": ev.dialect,
        "type": ev.type,
        "session": ev.session,
        "received": ev.received,
        "dead_at": dl.dead_at,
        "reason": dl.reason,
        "rounds": dl.rounds,
        "size": len(ev.body),
    }
    if body:
        try:
            out["body"] = ev.body.decode("utf-8")
        except UnicodeDecodeError:
            out["body"] = None
            out["body_base64"] = base64.b64encode(ev.body).decode()
    return out


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(
        status=status, body=json.dumps(data).encode(), content_type="application/json"
    )


class WebhookAdmin:
    def __init__(self, queue: EventQueue, admin_key: str | None) -> None:
        self.queue = queue
        self.admin_key = admin_key

    def _authorize(self, request: web.BaseRequest) -> None:
        if not self.admin_key:
            raise RouterError(404, "not_found", "the admin API is disabled (no admin_key)")
        if not matches(admin_key_of(request), (self.admin_key,)):
            raise RouterError(401, "unauthorized", "missing or wrong admin key")

    async def handle(self, request: web.BaseRequest) -> web.Response:
        try:
            self._authorize(request)
            return await self._route(request)
        except QueueUnavailable as exc:
            return error_response(
                RouterError(503, "queue_unavailable", str(exc)), request_id_of(request)
            )
        except RouterError as exc:
            return error_response(exc, request_id_of(request))

    async def _route(self, request: web.BaseRequest) -> web.Response:
        rest = request.path[len(PREFIX) :].strip("/")
        parts = rest.split("/") if rest else []
        method = request.method
        q = request.query
        if parts == ["stats"]:
            allowed = "GET"
            if method == "GET":
                return await self._stats()
        elif parts == ["dead-letters"]:
            allowed = "DELETE, GET"
            if method == "GET":
                return await self._list(q.get("limit"), q.get("after"), q.get("target"))
            if method == "DELETE":
                before = _float(q.get("before"))
                if q.get("before") is not None and before is None:
                    raise RouterError(400, "bad_request", "before must be a unix time")
                n = await self.queue.purge_dead(target=q.get("target"), before=before)
                return _json({"purged": n})
        elif parts == ["dead-letters", "replay"]:
            allowed = "POST"
            if method == "POST":
                return _json({"replayed": await self.queue.replay_all(target=q.get("target"))})
        elif len(parts) == 2 and parts[0] == "dead-letters":
            allowed = "DELETE, GET"
            dead_id = parts[1]
            if method == "GET":
                dl = await self.queue.get_dead(dead_id)
                if dl is None:
                    raise RouterError(404, "not_found", f"no dead letter {dead_id[:40]!r}")
                return _json(dead_letter_json(dl, body=True))
            if method == "DELETE":
                if not await self.queue.purge_dead(ids=[dead_id]):
                    raise RouterError(404, "not_found", f"no dead letter {dead_id[:40]!r}")
                return _json({"purged": 1})
        elif len(parts) == 3 and parts[0] == "dead-letters" and parts[2] == "replay":
            allowed = "POST"
            if method == "POST":
                if not await self.queue.replay_dead(parts[1]):
                    raise RouterError(404, "not_found", f"no dead letter {parts[1][:40]!r}")
                return _json({"replayed": 1})
        else:
            raise RouterError(404, "not_found", f"no admin endpoint {request.path}")
        raise RouterError(
            405,
            "method_not_allowed",
            f"{method} is not allowed here",
            headers={"Allow": allowed},
        )

    async def _stats(self) -> web.Response:
        s = await self.queue.stats()
        age = max(0.0, time.time() - s.oldest_received) if s.oldest_received else 0.0
        return _json(
            {
                "backend": self.queue.backend,
                "pending": s.pending,
                "oldest_pending_age": round(age, 3),
                "lanes": s.lanes,
                "dead_letters": s.dead_letters,
                **s.extra,
            }
        )

    async def _list(
        self, limit_s: str | None, after: str | None, target: str | None
    ) -> web.Response:
        limit = 100
        if limit_s is not None:
            if not limit_s.isdigit() or not 1 <= int(limit_s) <= 1000:
                raise RouterError(400, "bad_request", "limit must be an integer in 1..1000")
            limit = int(limit_s)
        items = await self.queue.list_dead(limit=limit, after=after, target=target)
        return _json(
            {
                "dead_letters": [dead_letter_json(d) for d in items],
                "next": items[-1].id if len(items) == limit else None,
            }
        )


def _float(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        f = float(value)
    except ValueError:
        return None
    return f if math.isfinite(f) else None
