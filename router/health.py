"""Instance health: active checks, and passive outlier detection from live traffic.

Active: each instance is asked through its adapter's health call; it goes
down after ``fall`` consecutive failed checks and comes back after ``rise``
good ones (HAProxy's model), so one slow answer does not flap it.

Passive (``Outliers``, Envoy's model): consecutive connect failures, resets
or 5xx answers seen by the proxy eject an instance for a base time that
doubles with each repeated ejection, never ejecting more than a configured
share of the fleet. Once the ejection time is over, a passing active check
brings it back. Both run beside the hot path; the proxy only bumps a counter.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

import aiohttp

from router.adapters.base import Adapter
from router.config import HealthConfig
from router.events import EventLog
from router.instances import Fleet, Instance
from router.metrics import EJECTIONS, HEALTH_CHECKS
from router.snapshot import Live

log = logging.getLogger(__name__)


class Outliers:
    """Passive health, fed by the proxy: ``success(inst)`` / ``failure(inst)``."""

    def __init__(self, live: Live, events: EventLog) -> None:
        self.live = live
        self._events = events

    @staticmethod
    def success(inst: Instance) -> None:
        inst.failures = 0

    def failure(self, inst: Instance, kind: str) -> None:
        inst.failures += 1
        snap = self.live.snap
        fleet, cfg = snap.fleet, snap.config.outlier
        if not inst.healthy or inst.failures < cfg.consecutive_failures:
            return
        ejected = sum(1 for i in fleet if not i.healthy)
        if (ejected + 1) * 100 > cfg.max_ejected_percent * len(fleet):
            # Ejecting more would leave too few instances for the load.
            return
        duration = min(cfg.max_ejection, cfg.base_ejection * (2**inst.ejections))
        inst.ejections += 1
        inst.healthy = False
        inst.ejected_until = time.monotonic() + duration
        inst.failures = 0
        EJECTIONS.labels(inst.name).inc()
        self._events.add("ejected", instance=inst.name, cause=kind, seconds=duration)
        log.warning(
            "instance %s ejected for %.0fs after %d consecutive %s failures",
            inst.name,
            duration,
            cfg.consecutive_failures,
            kind,
        )


class HealthChecker:
    def __init__(
        self,
        live: Live,
        events: EventLog | None = None,
    ) -> None:
        # Each round checks the fleet in force with the adapter in force.
        self.live = live
        self._streak: dict[str, int] = {}  # >0 good checks in a row, <0 bad ones
        self._task: asyncio.Task[None] | None = None
        self._started = 0  # rounds begun
        self.rounds = 0  # rounds finished
        self._round_done = asyncio.Event()
        self._events = events or EventLog()
        # Called when active checks take an instance down (not on a passive
        # ejection for 5xx answers: that instance is alive and keeps its sessions).
        self.on_down: Callable[[Instance], None] | None = None
        # Called before an instance that checks took down is routed to again:
        # True when it may serve (fencing: router.failover.Failover.fence).
        self.on_up: Callable[[Instance], Awaitable[bool]] | None = None
        # Instances that active checks took down (and have not come back).
        self._down: set[str] = set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="health-checker")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def wait_round(self) -> None:
        """Wait until a full round of checks that started after this call has
        finished (for tests and startup): a round already under way may have
        asked before whatever the caller just did."""
        wanted = self._started + 1
        while self.rounds < wanted:
            self._round_done.clear()
            await self._round_done.wait()

    async def _loop(self) -> None:
        while True:
            snap = self.live.snap
            await self.check_all(snap.fleet, snap.adapter, snap.config.health)
            await asyncio.sleep(snap.config.health.interval)

    async def check_all(self, fleet: Fleet, adapter: Adapter, cfg: HealthConfig) -> None:
        self._started += 1
        await asyncio.gather(*(self._check(inst, adapter, cfg) for inst in fleet))
        self.rounds += 1
        self._round_done.set()

    async def _check(self, inst: Instance, adapter: Adapter, cfg: HealthConfig) -> None:
        timed_out = False
        try:
            async with asyncio.timeout(cfg.timeout):
                report = await adapter.health(inst.http, inst.config)
            ok = report.healthy
            inst.last_health = report
        except TimeoutError:
            ok, timed_out = False, True
            inst.last_health = None
        except (aiohttp.ClientError, OSError):
            ok = False
            inst.last_health = None
        HEALTH_CHECKS.labels(inst.name, "ok" if ok else "fail").inc()
        streak = self._streak.get(inst.name, 0)
        now = time.monotonic()
        if ok:
            streak = streak + 1 if streak > 0 else 1
            if not inst.healthy and streak >= cfg.rise and now >= inst.ejected_until:
                if self.on_up is not None and not await self.on_up(inst):
                    # Not fenced yet (a copy it still runs could not be stopped):
                    # nothing is routed to it; the next round tries again.
                    self._streak[inst.name] = streak
                    return
                self._down.discard(inst.name)
                inst.checks_down = False
                inst.healthy = True
                inst.healthy_since = now
                inst.failures = 0
                self._events.add("healthy", instance=inst.name)
                log.warning("instance %s is healthy again", inst.name)
            elif inst.healthy and inst.ejections and now - inst.ejected_until > 600:
                # Ten quiet minutes forgive past ejections.
                inst.ejections = 0
        else:
            streak = streak - 1 if streak < 0 else -1
            # A check that timed out while requests to the instance have had no
            # byte back for as long: it hangs (a frozen event loop), down now.
            hung = timed_out and inst.transport.stalled(cfg.timeout) > 0
            if inst.name not in self._down and (-streak >= cfg.fall or hung):
                # Down by active checks, whether or not traffic already ejected
                # it: a busy instance is ejected by live traffic first, and its
                # idle sessions must be evacuated all the same.
                self._down.add(inst.name)
                inst.checks_down = True
                inst.healthy = False
                released = inst.transport.abort_in_flight(
                    f"instance {inst.name} stopped answering health checks"
                )
                self._events.add(
                    "down",
                    instance=inst.name,
                    failed_checks=-streak,
                    hung=hung,
                    released=released,
                )
                log.warning(
                    "instance %s failed %d health check(s)%s: marked down, %d request(s) released",
                    inst.name,
                    -streak,
                    " with requests stalled on it" if hung else "",
                    released,
                )
                if self.on_down is not None:
                    self.on_down(inst)
        self._streak[inst.name] = streak
