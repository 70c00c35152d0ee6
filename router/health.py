"""Active health checks: each instance is asked through its adapter's health call.

An instance goes down after ``fall`` consecutive failed checks and comes back
after ``rise`` consecutive good ones (HAProxy's model), so one slow answer
does not flap it. Checks run beside the hot path, never in it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import aiohttp

from router.adapters.base import Adapter
from router.config import HealthConfig
from router.instances import Fleet, Instance

log = logging.getLogger(__name__)


class HealthChecker:
    def __init__(self, get_state: Callable[[], tuple[Fleet, Adapter, HealthConfig]]) -> None:
        # A callable, not the objects: a reload swaps fleet/adapter/config and
        # the next round picks them up.
        self._get_state = get_state
        self._streak: dict[str, int] = {}  # >0 good checks in a row, <0 bad ones
        self._task: asyncio.Task[None] | None = None
        self.rounds = 0
        self._round_done = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="health-checker")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def wait_round(self) -> None:
        """Wait until the next full round of checks has finished (for tests and startup)."""
        self._round_done.clear()
        await self._round_done.wait()

    async def _loop(self) -> None:
        while True:
            fleet, adapter, cfg = self._get_state()
            await self.check_all(fleet, adapter, cfg)
            await asyncio.sleep(cfg.interval)

    async def check_all(self, fleet: Fleet, adapter: Adapter, cfg: HealthConfig) -> None:
        await asyncio.gather(*(self._check(inst, adapter, cfg) for inst in fleet))
        self.rounds += 1
        self._round_done.set()

    async def _check(self, inst: Instance, adapter: Adapter, cfg: HealthConfig) -> None:
        try:
            async with asyncio.timeout(cfg.timeout):
                ok = (await adapter.health(inst.http, inst.config)).healthy
        except (aiohttp.ClientError, TimeoutError, OSError):
            ok = False
        streak = self._streak.get(inst.name, 0)
        if ok:
            streak = streak + 1 if streak > 0 else 1
            if not inst.healthy and streak >= cfg.rise:
                inst.healthy = True
                log.warning("instance %s is healthy again", inst.name)
        else:
            streak = streak - 1 if streak < 0 else -1
            if inst.healthy and -streak >= cfg.fall:
                inst.healthy = False
                log.warning("instance %s failed %d health checks: marked down", inst.name, -streak)
        self._streak[inst.name] = streak
