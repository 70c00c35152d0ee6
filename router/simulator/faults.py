"""Injected faults: slow, error, drop, drop_after and crash.

Set with ``POST /_sim/fault`` body
``{"mode", "delay"?, "status"?, "paths"?, "count"?}``. A fault touches every
request outside ``/_sim`` (or only those whose path starts with ``paths``),
for the next ``count`` matching requests when given, else until reset with
``{"mode": "none"}``.

- ``slow``: wait ``delay`` seconds, then handle the request normally.
- ``error``: answer ``status`` with a JSON body, without handling the request.
- ``drop``: read the request, then close the connection without an answer.
- ``drop_after``: handle the request (a send is recorded), then close the
  connection without an answer: "the request arrived, the response was lost".
- ``crash``: ``os._exit(1)``; right away when set without ``paths``, else on
  the first matching request (after reading it).
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from typing import Any, NoReturn

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

MODES = ("none", "slow", "error", "drop", "drop_after", "crash")


@dataclass(frozen=True, slots=True)
class Fault:
    mode: str = "none"
    delay: float = 0.0
    status: int = 500
    paths: str | None = None
    count: int | None = None

    @classmethod
    def parse(cls, body: Any) -> Fault:
        """Validate a ``/_sim/fault`` body; raises ``ValueError``."""
        if not isinstance(body, dict):
            raise ValueError("body must be a JSON object")
        mode = body.get("mode", "none")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        delay, status = body.get("delay", 0.0), body.get("status", 500)
        paths, count = body.get("paths"), body.get("count")
        if not isinstance(delay, int | float) or delay < 0:
            raise ValueError("delay must be a number >= 0")
        if not isinstance(status, int) or not 100 <= status <= 599:
            raise ValueError("status must be an HTTP status code")
        if paths is not None and not isinstance(paths, str):
            raise ValueError("paths must be a path prefix")
        if count is not None and (not isinstance(count, int) or count < 1):
            raise ValueError("count must be a positive integer")
        return cls(mode, float(delay), status, paths, count)

    def as_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "delay": self.delay,
            "status": self.status,
            "paths": self.paths,
            "count": self.count,
        }


class FaultSwitch:
    """The fault in force; ``take`` consumes one use of a counted fault."""

    def __init__(self) -> None:
        self.current = Fault()

    def set(self, fault: Fault) -> None:
        self.current = fault

    def take(self, path: str) -> Fault | None:
        fault = self.current
        if fault.mode == "none" or path.startswith("/_sim"):
            return None
        if fault.paths is not None and not path.startswith(fault.paths):
            return None
        if fault.count is not None:
            left = fault.count - 1
            self.current = Fault() if left == 0 else Fault(**{**fault.as_dict(), "count": left})
        return fault


def crash() -> NoReturn:
    os._exit(1)


async def _read_request(request: web.Request) -> None:
    while await request.content.readany():
        pass


def _drop(request: web.Request) -> NoReturn:
    if request.transport is not None:
        request.transport.close()
    # aiohttp treats a cancelled handler as a vanished client: no answer is written.
    raise asyncio.CancelledError


def fault_middleware(switch: FaultSwitch) -> Middleware:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        fault = switch.take(request.path)
        if fault is None:
            return await handler(request)
        if fault.mode == "slow":
            await asyncio.sleep(fault.delay)
            return await handler(request)
        if fault.mode == "error":
            return web.json_response(
                {"error": "simulated fault", "statusCode": fault.status}, status=fault.status
            )
        if fault.mode == "drop_after":
            await handler(request)
            _drop(request)
        await _read_request(request)
        if fault.mode == "crash":
            crash()
        _drop(request)

    return middleware
