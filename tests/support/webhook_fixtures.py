"""Fixtures of the webhook relay tests (tests/test_webhooks*.py), registered
as a plugin in tests/conftest.py.

* ``backend``: each queue backend in turn (sqlite, redis); ``sqlite_backend``
  just the first.
* ``start_relay``: ``await start_relay(...)`` starts relays (``relays``),
  stopped at the end of the test.
* ``app``: the main app, a ``TargetServer`` checking signatures made with
  APP_KEY (Blazz or WAHA style).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from tests.support.webhook_target import (
    APP_KEY,
    Backend,
    RelayHandle,
    TargetServer,
    backend_for,
    relays,
)

Start = Callable[..., Awaitable[RelayHandle]]


@pytest.fixture(params=["sqlite", "redis"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    return backend_for(request, request.param, tmp_path)


@pytest.fixture
def sqlite_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    return backend_for(request, "sqlite", tmp_path)


@pytest.fixture
async def start_relay() -> AsyncIterator[Start]:
    async with relays() as start:
        yield start


@pytest.fixture
async def app() -> AsyncIterator[TargetServer]:
    """The main app: checks signatures made with APP_KEY (Blazz or WAHA style)."""
    t = TargetServer(hmac_key=APP_KEY, verify="auto")
    await t.start()
    yield t
    await t.stop()
