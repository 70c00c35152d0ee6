"""The session map store: session id -> instance name.

The instances are the source of truth for where a session runs; a store is
a cache of that truth that survives router restarts (redis) or not
(memory). ``SessionStore`` is the narrow interface every backend implements,
so tests can plug in the real alternative (a private redis-server) easily.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Mapping
from typing import Any


class StoreUnavailable(Exception):
    """The backend cannot be reached (redis down). Callers degrade, never crash."""


class SessionStore(ABC):
    @abstractmethod
    async def get(self, session: str) -> str | None: ...

    @abstractmethod
    async def set(self, session: str, instance: str) -> None: ...

    @abstractmethod
    async def set_many(self, mapping: Mapping[str, str]) -> None: ...

    @abstractmethod
    async def delete(self, session: str) -> None: ...

    @abstractmethod
    def scan(self) -> AsyncIterator[tuple[str, str]]:
        """Every (session, instance) pair, in batches under the hood."""

    @abstractmethod
    async def ping(self) -> bool: ...

    # -- notes: what a create said that the upstream's listings forget --------
    # (Blazz lists no account_id; a restore elsewhere still needs it.) Small
    # JSON objects, kept until the session is deleted by a client.
    @abstractmethod
    async def get_note(self, session: str) -> dict[str, Any] | None: ...

    @abstractmethod
    async def set_note(self, session: str, note: Mapping[str, Any]) -> None: ...

    @abstractmethod
    async def delete_note(self, session: str) -> None: ...

    async def close(self) -> None:  # noqa: B027 - optional hook
        pass
