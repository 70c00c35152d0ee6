"""Session store fixtures shared by the store and session map tests.

``store`` runs a test on both backends (memory and a private redis-server);
``rstore`` is the redis backend alone.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from router.store import MemoryStore, SessionStore
from router.store.redis import RedisStore


def session_id(i: int) -> str:
    """A realistic id, ~28 chars: ``webjs_12_1700000123_ab12cd34``."""
    return f"webjs_{i % 50}_{1700000000 + i}_{(i * 2654435761) % 2**32:08x}"


def instance_name(i: int) -> str:
    return f"wa-{i % 5}"


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[SessionStore]:
    if request.param == "memory":
        backend: SessionStore = MemoryStore()
    else:
        url = request.getfixturevalue("redis_url")
        backend = RedisStore(url, key_prefix=request.getfixturevalue("redis_prefix"))
    yield backend
    await backend.close()


@pytest.fixture
async def rstore(redis_url: str, redis_prefix: str) -> AsyncIterator[RedisStore]:
    backend = RedisStore(redis_url, key_prefix=redis_prefix)
    yield backend
    await backend.close()
