"""``Idempotency-Key``: a client's repeat gets the first answer, not a second send.

The first request with a key claims it (``begin``), is forwarded, and its
response is remembered for ``IdempotencyConfig.window`` seconds. A repeat
inside the window is answered from memory; a repeat while the first is still
in flight gets a 409. When the outcome is unknown (the upstream reset the
connection after receiving the request) the router remembers *that*, so a
repeat is told so instead of risking a second WhatsApp message.

Keys live in the session store's backend (memory or Redis) so that they
work across replicas.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions

from router.store.base import StoreUnavailable

IDEMPOTENCY_HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
_PENDING = b"pending"


@dataclass(frozen=True, slots=True)
class StoredResponse:
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes

    def dumps(self) -> bytes:
        return json.dumps(
            {"s": self.status, "h": self.headers, "b": base64.b64encode(self.body).decode()}
        ).encode()

    @classmethod
    def loads(cls, raw: bytes) -> StoredResponse:
        d: dict[str, Any] = json.loads(raw)
        return cls(d["s"], tuple((k, v) for k, v in d["h"]), base64.b64decode(d["b"]))


class Pending:
    """Another request with the same key is still in flight."""


PENDING = Pending()


def scoped_key(client_key: str | None, method: str, path: str, key: str) -> str:
    """Keys are scoped by client credential, method and path, as Stripe does,
    so two clients (or two endpoints) never share an answer."""
    raw = f"{client_key or ''}\0{method}\0{path}\0{key}".encode()
    return hashlib.sha256(raw).hexdigest()


class IdempotencyStore(ABC):
    @abstractmethod
    async def begin(self, key: str, ttl: float) -> StoredResponse | Pending | None:
        """Claim ``key``: None when claimed now, else what the first request left."""

    @abstractmethod
    async def complete(self, key: str, response: StoredResponse, ttl: float) -> None: ...

    @abstractmethod
    async def abandon(self, key: str) -> None:
        """Release a claim whose request provably did not reach any upstream."""


class MemoryIdempotency(IdempotencyStore):
    def __init__(self, max_entries: int = 100_000) -> None:
        self._data: dict[str, tuple[float, bytes]] = {}
        self._max = max_entries

    def _get(self, key: str) -> bytes | None:
        item = self._data.get(key)
        if item is None:
            return None
        if item[0] < time.monotonic():
            del self._data[key]
            return None
        return item[1]

    def _put(self, key: str, value: bytes, ttl: float) -> None:
        if len(self._data) >= self._max:
            now = time.monotonic()
            for k in [k for k, (exp, _) in self._data.items() if exp < now]:
                del self._data[k]
            while len(self._data) >= self._max:
                del self._data[next(iter(self._data))]
        self._data[key] = (time.monotonic() + ttl, value)

    async def begin(self, key: str, ttl: float) -> StoredResponse | Pending | None:
        value = self._get(key)
        if value is None:
            self._put(key, _PENDING, ttl)
            return None
        return PENDING if value == _PENDING else StoredResponse.loads(value)

    async def complete(self, key: str, response: StoredResponse, ttl: float) -> None:
        self._put(key, response.dumps(), ttl)

    async def abandon(self, key: str) -> None:
        self._data.pop(key, None)


class RedisIdempotency(IdempotencyStore):
    def __init__(self, client: aioredis.Redis, prefix: str) -> None:
        self._r = client
        self._prefix = f"{prefix}idem:"

    async def begin(self, key: str, ttl: float) -> StoredResponse | Pending | None:
        k = self._prefix + key
        try:
            claimed = await self._r.set(k, _PENDING, nx=True, px=int(ttl * 1000))
            if claimed:
                return None
            value = await self._r.get(k)
        except (redis.exceptions.RedisError, OSError) as exc:
            raise StoreUnavailable(f"idempotency store: {type(exc).__name__}") from None
        if value is None:  # expired between the two calls: claim again
            return await self.begin(key, ttl)
        raw = value.encode() if isinstance(value, str) else bytes(value)
        return PENDING if raw == _PENDING else StoredResponse.loads(raw)

    async def complete(self, key: str, response: StoredResponse, ttl: float) -> None:
        try:
            await self._r.set(self._prefix + key, response.dumps(), px=int(ttl * 1000))
        except (redis.exceptions.RedisError, OSError) as exc:
            raise StoreUnavailable(f"idempotency store: {type(exc).__name__}") from None

    async def abandon(self, key: str) -> None:
        try:
            await self._r.delete(self._prefix + key)
        except (redis.exceptions.RedisError, OSError) as exc:
            raise StoreUnavailable(f"idempotency store: {type(exc).__name__}") from None
