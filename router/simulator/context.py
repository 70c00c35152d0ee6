"""The per-process state every handler reaches through ``request.app``."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Final

from aiohttp import web

from router.simulator.blazz_sessions import BlazzSessions
from router.simulator.faults import FaultSwitch
from router.simulator.options import SimulatorOptions
from router.simulator.recorder import Recorder
from router.simulator.sessions import SessionRegistry


@dataclass(slots=True)
class SimContext:
    options: SimulatorOptions
    sessions: SessionRegistry
    recorder: Recorder
    faults: FaultSwitch = field(default_factory=FaultSwitch)
    started_at: float = field(default_factory=time.time)
    websockets: set[web.WebSocketResponse] = field(default_factory=set)
    # The Blazz dialect's sessions (profiles, locks, browsers); None for WAHA.
    blazz: BlazzSessions | None = None
    # The port we listen on, once known (Blazz: X-Instance-Url of webhooks).
    port: int = 0

    @property
    def name(self) -> str:
        return self.options.name


SIM: Final = web.AppKey("sim", SimContext)


def sim(request: web.Request) -> SimContext:
    return request.app[SIM]
