"""router/readiness.py on its own: which QR requests a new copy's watch sees.

Found on the real Blazz tier (7 of 56 runs): after a crash, the new copy's QR
webhook reached the router ~15 ms before that copy's create answer, while an
older watch for the session (left by an earlier move, on another instance)
was still registered. The QR was dropped as "not this watch's instance", the
new watch started without it, and a send waited the whole ``failover.wait``
(30 s, then 503) instead of getting ``session_needs_auth`` at once.
"""

from __future__ import annotations

import time
from typing import Any, cast

import aiohttp

from router.adapters.base import SessionStatus
from router.config import InstanceConfig
from router.events import EventLog
from router.instances import Instance
from router.readiness import Readiness, Ready


async def test_a_qr_from_the_new_copy_before_its_create_answer_is_kept() -> None:
    owners = {"s1": "wa-1"}
    events = EventLog()
    # Live and Probe are only used by a watcher's poll, which never runs here
    # (a copy that needs a scan is looked at every 5 s).
    ready = Readiness(cast(Any, None), cast(Any, None), events, owner_of=owners.get)
    async with aiohttp.ClientSession() as http:
        old = Instance(InstanceConfig("wa-1", "http://127.0.0.1:9"), http)
        new = Instance(InstanceConfig("wa-2", "http://127.0.0.1:10"), http)
        try:
            ready.track("s1", old, started=time.monotonic(), status=SessionStatus.NEEDS_AUTH)
            # wa-1 crashed; the router restores s1 on wa-2 ...
            started = time.monotonic()
            owners["s1"] = "wa-2"
            # ... whose QR webhook beats its create answer,
            ready.auth_needed("s1", "wa-2")
            # which then says "starting".
            ready.track("s1", new, started=started, status=SessionStatus.STARTING)
            assert await ready.wait("s1", 0.5) is Ready.NEEDS_AUTH
            assert [e["instance"] for e in events.recent() if e["kind"] == "needs_auth"] == [
                "wa-1",
                "wa-2",
            ]
            # A QR from elsewhere never marks the tracked copy.
            ready.auth_needed("s1", "wa-3")
            ready.track("s1", new, started=time.monotonic(), status=SessionStatus.STARTING)
            assert await ready.wait("s1", 0) is Ready.TIMEOUT
        finally:
            await ready.close()
