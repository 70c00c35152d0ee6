"""The embedded store: one plain dict, lost when the process exits.

Losing it is fine by design: the instances are the source of truth and the
map is rebuilt by asking them. ``SessionMap`` shares ``data`` as its cache,
so a memory-backed router holds each mapping exactly once.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Mapping
from typing import Any

from router.store.base import SessionStore


class MemoryStore(SessionStore):
    def __init__(self) -> None:
        self._data: dict[str, str] = {}
        self._notes: dict[str, dict[str, Any]] = {}

    @property
    def data(self) -> dict[str, str]:
        """The live dict. ``SessionMap`` reads it as its cache; write through the API."""
        return self._data

    async def get(self, session: str) -> str | None:
        return self._data.get(session)

    async def set(self, session: str, instance: str) -> None:
        self._data[session] = sys.intern(instance)

    async def set_many(self, mapping: Mapping[str, str]) -> None:
        intern = sys.intern
        data = self._data
        for session, instance in mapping.items():
            data[session] = intern(instance)

    async def delete(self, session: str) -> None:
        self._data.pop(session, None)

    async def scan(self) -> AsyncIterator[tuple[str, str]]:
        # Snapshot the keys (one pointer each) rather than the items, so the
        # consumer may await, and the dict change, between two pairs.
        data = self._data
        for session in list(data):
            instance = data.get(session)
            if instance is not None:
                yield session, instance

    async def ping(self) -> bool:
        return True

    async def get_note(self, session: str) -> dict[str, Any] | None:
        note = self._notes.get(session)
        return dict(note) if note is not None else None

    async def set_note(self, session: str, note: Mapping[str, Any]) -> None:
        self._notes[session] = dict(note)

    async def delete_note(self, session: str) -> None:
        self._notes.pop(session, None)

    def __len__(self) -> int:
        return len(self._data)
