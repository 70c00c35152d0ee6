"""A bounded log of recent fleet events (failovers, health changes, moves).

Read by the admin API and the dashboard; subscribers (server-sent events)
get each new event as it happens. Never holds a key; session ids are fine
here (this is not a metric label).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Any


class EventLog:
    def __init__(self, size: int = 500) -> None:
        self._events: deque[dict[str, Any]] = deque(maxlen=size)
        self._subscribers: set[asyncio.Queue[dict[str, Any]]] = set()

    def add(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"ts": time.time(), "kind": kind, **fields}
        self._events.append(event)
        for q in self._subscribers:
            if q.qsize() < 1000:  # a stalled subscriber must not grow without bound
                q.put_nowait(event)
        return event

    def recent(self, limit: int = 100, kind: str | None = None) -> list[dict[str, Any]]:
        events = [e for e in self._events if kind is None or e["kind"].startswith(kind)]
        return events[-limit:]

    def subscribe(self) -> asyncio.Queue[dict[str, Any]]:
        q: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._subscribers.add(q)
        return q

    def unsubscribe(self, q: asyncio.Queue[dict[str, Any]]) -> None:
        self._subscribers.discard(q)
