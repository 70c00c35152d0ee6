"""Sessions of one simulated instance: in-memory state plus shared auth files.

Memory is per process (a restart forgets every session); auth files live in
a directory shared by the whole fleet, so any instance can restore any
session, as with a shared volume in production.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from router.config import SESSION_ID_PATTERN

_NAME_RE = re.compile(SESSION_ID_PATTERN)


def valid_name(name: object) -> bool:
    return isinstance(name, str) and _NAME_RE.fullmatch(name) is not None


class Status(StrEnum):
    """Session states, named as WAHA names them (Blazz maps them to its own)."""

    STOPPED = "STOPPED"
    STARTING = "STARTING"
    SCAN_QR_CODE = "SCAN_QR_CODE"
    WORKING = "WORKING"
    FAILED = "FAILED"


@dataclass(slots=True)
class SimSession:
    name: str
    status: Status = Status.STOPPED
    config: dict[str, Any] = field(default_factory=dict)
    workspace_id: Any = None
    account_id: Any = None
    phone: str | None = None
    # True while STARTING from an existing auth file (Blazz: "authenticated").
    restoring: bool = False
    connected_at: float | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    task: asyncio.Task[None] | None = field(default=None, repr=False)


def phone_for(name: str) -> str:
    """A stable fake phone number for a session name."""
    digits = str(int(hashlib.sha256(name.encode()).hexdigest(), 16))
    return "1" + digits[:10]


class AuthStore:
    """``<directory>/<session>.json`` files, written atomically."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        if not valid_name(name):
            raise ValueError(f"invalid session name {name!r}")
        return self.directory / f"{name}.json"

    def load(self, name: str) -> dict[str, Any] | None:
        try:
            data = json.loads(self.path(name).read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def exists(self, name: str) -> bool:
        return valid_name(name) and self.load(name) is not None

    def save(self, name: str, data: dict[str, Any]) -> None:
        target = self.path(name)
        tmp = target.with_name(f".{name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, target)

    def delete(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError, ValueError):
            self.path(name).unlink()


class SessionRegistry:
    """The sessions this process runs, and their start-up timers."""

    def __init__(self, instance: str, auth: AuthStore, start_delay: float, auto_auth: bool) -> None:
        self.instance = instance
        self.auth = auth
        self.start_delay = start_delay
        self.auto_auth = auto_auth
        self.sessions: dict[str, SimSession] = {}

    def get(self, name: object) -> SimSession | None:
        return self.sessions.get(name) if isinstance(name, str) else None

    def create(
        self,
        name: str,
        *,
        config: dict[str, Any] | None = None,
        workspace_id: Any = None,
        account_id: Any = None,
    ) -> SimSession:
        """Add a STOPPED session (``name`` must be valid and not present)."""
        if not valid_name(name):
            raise ValueError(f"invalid session name {name!r}")
        if name in self.sessions:
            raise KeyError(name)
        session = SimSession(
            name, config=config or {}, workspace_id=workspace_id, account_id=account_id
        )
        self.sessions[name] = session
        return session

    def start(self, session: SimSession) -> None:
        """STOPPED/FAILED -> STARTING; ready (or QR) after ``start_delay``."""
        self._cancel(session)
        session.restoring = self.auth.exists(session.name)
        session.status = Status.STARTING
        session.connected_at = None
        session.task = asyncio.get_running_loop().create_task(self._boot(session))

    def stop(self, session: SimSession) -> None:
        self._cancel(session)
        session.status = Status.STOPPED
        session.restoring = False
        session.connected_at = None

    def pair(self, session: SimSession) -> None:
        """The phone scanned the QR: write the auth file, become WORKING."""
        self._cancel(session)
        auth = {
            "session": session.name,
            "phone_number": session.phone or phone_for(session.name),
            "workspace_id": session.workspace_id,
            "account_id": session.account_id,
            "paired_at": time.time(),
            "paired_by": self.instance,
        }
        self.auth.save(session.name, auth)
        self._ready(session, auth)

    def logout(self, session: SimSession) -> None:
        """Forget the auth; a running session starts again from scratch."""
        running = session.status is not Status.STOPPED
        self.stop(session)
        self.auth.delete(session.name)
        if running:
            self.start(session)

    def remove(self, session: SimSession) -> None:
        self.stop(session)
        self.sessions.pop(session.name, None)

    def close(self) -> None:
        for session in self.sessions.values():
            self._cancel(session)

    async def _boot(self, session: SimSession) -> None:
        await asyncio.sleep(self.start_delay)
        session.task = None
        auth = self.auth.load(session.name)
        if auth is not None:
            self._ready(session, auth)
        elif self.auto_auth:
            self.pair(session)
        else:
            session.status = Status.SCAN_QR_CODE

    def _ready(self, session: SimSession, auth: dict[str, Any]) -> None:
        phone = auth.get("phone_number")
        session.phone = phone if isinstance(phone, str) else phone_for(session.name)
        if session.workspace_id is None:
            session.workspace_id = auth.get("workspace_id")
        if session.account_id is None:
            session.account_id = auth.get("account_id")
        session.status = Status.WORKING
        session.restoring = False
        session.connected_at = time.time()

    @staticmethod
    def _cancel(session: SimSession) -> None:
        task, session.task = session.task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
