"""Every accepted send: kept in memory, appended to a shared JSONL file, and
pushed to connected websocket listeners.

The file is opened with ``O_APPEND`` and each record is one ``os.write`` of a
whole line, so lines from several processes never interleave and a line that
was acknowledged survives a SIGKILL of the process a moment later.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(eq=False, slots=True)
class Subscription:
    """A websocket listener: ``session`` is a name or ``"*"``."""

    session: str
    queue: asyncio.Queue[dict[str, Any]] = field(default_factory=asyncio.Queue)

    def wants(self, session: str) -> bool:
        return self.session in ("*", session)


class Recorder:
    def __init__(self, instance: str, path: Path | None) -> None:
        self.instance = instance
        self.path = path
        self.records: list[dict[str, Any]] = []
        self.subscriptions: set[Subscription] = set()
        self._fd: int | None = None

    def open(self) -> None:
        if self.path is not None and self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def record(
        self,
        *,
        session: str,
        chat: str,
        text: str,
        message_id: str,
        idempotency_key: str | None,
    ) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "instance": self.instance,
            "session": session,
            "chat": chat,
            "text": text,
            "message_id": message_id,
            "ts": time.time(),
            "idempotency_key": idempotency_key,
        }
        if self._fd is not None:
            line = (json.dumps(entry, separators=(",", ":")) + "\n").encode()
            os.write(self._fd, line)  # unbuffered: in the kernel before we answer
        self.records.append(entry)
        event = {"event": "message", "session": session, "payload": entry}
        for sub in self.subscriptions:
            if sub.wants(session):
                sub.queue.put_nowait(event)
        return entry

    def subscribe(self, session: str) -> Subscription:
        sub = Subscription(session)
        self.subscriptions.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self.subscriptions.discard(sub)

    def find(self, message_id: str) -> dict[str, Any] | None:
        return next((r for r in self.records if r["message_id"] == message_id), None)
