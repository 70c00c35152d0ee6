"""Opt-in tier: the router in front of three processes of the REAL Blazz
``whatsapp-service`` (Node.js, whatsapp-web.js, Debian's Chromium), offline.

Set up once, outside this repository (nothing of Blazz is committed here):

* ``WA_REAL_BLAZZ_DIR``: Blazz's ``whatsapp-service`` directory, installed the
  way its README says (``npm ci``, with ``PUPPETEER_SKIP_DOWNLOAD=1``), able to
  start its WhatsApp Web client offline: its ``webVersionCache`` directory
  (``cache/whatsapp-web``) must hold a page for the whatsapp-web.js version in
  use, or ``client.initialize()`` waits for the internet.
* ``WA_REAL_BLAZZ_CHROMIUM`` (optional): the browser (default
  ``/usr/bin/chromium``), passed as ``PUPPETEER_EXECUTABLE_PATH``.

Run it with ``./dev test-real-blazz``. Without ``WA_REAL_BLAZZ_DIR`` every test
here is skipped with that message; CI stays green without it. Offline,
sessions reach ``qr_scanning`` and never ``connected``: what is checked is
routing, keys, creates, moves, drains, failover (restores that wait for the
profile lock of a crashed instance's browser), fleet health and webhooks.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from router.config import (
    FailoverConfig,
    HealthConfig,
    WebhookConfig,
    WebhookDelivery,
    WebhookIngest,
    WebhookTarget,
)
from tests.support.router import ROUTER_KEY, RouterHandle, StartRouter, router_config
from tests.support.webhook_target import TargetServer, free_port

BLAZZ_DIR = os.environ.get("WA_REAL_BLAZZ_DIR", "")
CHROMIUM = os.environ.get("WA_REAL_BLAZZ_CHROMIUM", "/usr/bin/chromium")
HMAC_SECRET = "real-blazz-hmac"
KEYS = ("real-key-1", "real-key-2", "real-key-3")

pytestmark = [
    pytest.mark.real_blazz,
    pytest.mark.skipif(
        not BLAZZ_DIR or not (Path(BLAZZ_DIR) / "server.js").is_file(),
        reason="the real Blazz tier is not set up: set WA_REAL_BLAZZ_DIR to an installed"
        " whatsapp-service directory (see tests/test_real_blazz.py), then ./dev test-real-blazz",
    ),
    pytest.mark.timeout(300),
]


@dataclasses.dataclass
class RealBlazz:
    """One ``node server.js`` in its own process group (the browsers join it)."""

    name: str
    port: int
    key: str
    storage: Path
    log: Path
    laravel_url: str = ""
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        env = {
            "PATH": os.environ.get("PATH", ""),
            "HOME": os.environ.get("HOME", "/tmp"),
            "PORT": str(self.port),
            "API_KEY": self.key,
            "HMAC_SECRET": HMAC_SECRET,
            "LARAVEL_URL": self.laravel_url or "http://127.0.0.1:9",
            "SESSION_STORAGE_PATH": str(self.storage),
            "LOG_FILE": str(self.log.with_suffix(".winston.log")),
            "NODE_ENV": "development",
            "PUPPETEER_SKIP_DOWNLOAD": "1",
            "PUPPETEER_EXECUTABLE_PATH": CHROMIUM,
            "NO_PROXY": "*",
        }
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                ["node", "server.js"],
                cwd=BLAZZ_DIR,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # a group kill takes its browsers too
            )

    async def ready(self) -> None:
        async with aiohttp.ClientSession() as http:
            for _ in range(300):
                assert self.proc is not None and self.proc.poll() is None, self.tail()
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(self.url + "/health") as resp:
                        if resp.status == 200:
                            return
                await asyncio.sleep(0.1)
        raise AssertionError(f"{self.name} did not answer /health:\n{self.tail()}")

    def kill_node_only(self) -> None:
        """SIGKILL of node alone: its Chromium lives on and holds the profile."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def kill_group(self) -> None:
        """Stop it and everything it started (teardown)."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return ""


def kill_browsers(profile_prefix: Path) -> int:
    """SIGKILL every Chromium whose --user-data-dir is under ``profile_prefix``
    (puppeteer detaches its browsers: they outlive a SIGKILL of node, in a
    process group of their own); how many."""
    needle = f"--user-data-dir={profile_prefix}"
    killed = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(a.decode(errors="replace").startswith(needle) for a in args):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(entry.name), signal.SIGKILL)
                killed += 1
    return killed


@pytest.fixture
async def real_fleet(tmp_path: Path) -> AsyncIterator[list[RealBlazz]]:
    storage = tmp_path / "sessions"
    storage.mkdir()
    fleet = [
        RealBlazz(f"blazz-{i + 1}", free_port(), KEYS[i], storage, tmp_path / f"blazz-{i + 1}.log")
        for i in range(3)
    ]
    yield fleet
    for inst in fleet:
        inst.kill_group()
    kill_browsers(storage)


async def start_all(fleet: list[RealBlazz], router_url: str = "") -> None:
    for inst in fleet:
        if router_url:
            inst.laravel_url = f"{router_url}/webhooks/blazz/{inst.name}"
        inst.start()
    await asyncio.gather(*(inst.ready() for inst in fleet))


async def router_for(
    fleet: list[RealBlazz], start_router: StartRouter, tmp_path: Path, target: TargetServer
) -> RouterHandle:
    cfg = router_config(
        [inst.url for inst in fleet],
        names=[inst.name for inst in fleet],
        adapter="blazz",
        instance_keys=KEYS,
        admin_key="adm",
        health=HealthConfig(interval=1.0, timeout=0.8, rise=1, fall=2),
    )
    cfg = dataclasses.replace(
        cfg,
        failover=FailoverConfig(wait=30, ready_timeout=60),
        webhooks=WebhookConfig(
            targets=(WebhookTarget(url=target.url, name="app", hmac_key=HMAC_SECRET),),
            ingest=WebhookIngest(blazz_hmac_key=HMAC_SECRET),
            delivery=WebhookDelivery(round_backoff=0.05, backoff_base=0.2, backoff_max=1.0),
            sqlite_path=str(tmp_path / "webhooks.db"),
        ),
    )
    return await start_router(config=cfg)


async def call(
    http: aiohttp.ClientSession, method: str, url: str, body: dict[str, Any] | None = None
) -> tuple[int, Any]:
    async with http.request(method, url, json=body) as resp:
        text = await resp.text()
        try:
            return resp.status, json.loads(text)
        except ValueError:
            return resp.status, text


async def running_on(fleet: list[RealBlazz], session: str) -> list[str]:
    names = []
    async with aiohttp.ClientSession() as http:
        for inst in fleet:
            if inst.proc is None or inst.proc.poll() is not None:
                continue
            url = f"{inst.url}/api/sessions/{session}/status?api_key={inst.key}"
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(url) as resp:
                    if resp.status == 200:
                        names.append(inst.name)
    return names


async def until(check: Any, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.25)  # a real service: there is no event to await
    raise AssertionError(f"not within {within} s: {what}")


async def test_the_router_in_front_of_real_blazz(
    real_fleet: list[RealBlazz], start_router: StartRouter, tmp_path: Path
) -> None:
    app = TargetServer(hmac_key=HMAC_SECRET, verify="blazz", path="/api/whatsapp/webhooks/webjs")
    await app.start()
    try:
        # The router needs the instances' URLs, the instances its URL: the
        # ports are chosen first, the router started, then the instances.
        router = await router_for(real_fleet, start_router, tmp_path, app)
        await start_all(real_fleet, router.url)
        await until(lambda: _all_healthy(router), 30, "the router sees every instance healthy")
        timings: dict[str, float] = {}
        s1, s2 = "webjs_7_1700000000_realone1", "webjs_7_1700000000_realtwo2"
        async with aiohttp.ClientSession() as http:
            # Fleet health without a key, in Blazz's shape.
            status, health = await call(http, "GET", f"{router.url}/health")
            assert status == 200 and health["status"] == "healthy", health

            # Creates through the router (its key in the body, replaced by
            # the instance's own), and a repeated create answered by the router.
            for s in (s1, s2):
                body = {"session_id": s, "workspace_id": 7, "account_id": 3, "api_key": ROUTER_KEY}
                started = time.monotonic()
                status, answer = await call(http, "POST", f"{router.url}/api/sessions", body)
                timings.setdefault("create", time.monotonic() - started)
                assert status == 200 and answer["status"] == "qr_scanning", answer
            status, answer = await call(
                http,
                "POST",
                f"{router.url}/api/sessions",
                {"session_id": s1, "workspace_id": 7, "api_key": ROUTER_KEY},
            )
            assert status == 200 and answer["session_id"] == s1, answer
            owner = router.runtime.smap.cached(s1)
            assert await running_on(real_fleet, s1) == [owner]

            # A QR webhook reaches the main app through the relay, with the
            # router's URL as X-Instance-Url.
            await app.wait_unique(1, within=60)
            qr = next(d for d in app.deliveries if d.doc["event"] == "qr_code_generated")
            assert qr.headers["X-Instance-Url"] == router.url

            # Move s1 to another instance (stop = DELETE with its key in a body).
            target = next(i.name for i in real_fleet if i.name != owner)
            started = time.monotonic()
            async with http.post(
                f"{router.url}/admin/sessions/{s1}/move",
                json={"to": target},
                headers={"X-Admin-Key": "adm"},
            ) as resp:
                moved = await resp.json()
            timings["move"] = time.monotonic() - started
            assert moved["outcome"] == "moved", moved
            assert await running_on(real_fleet, s1) == [target]

            # Drain the instance that holds s2.
            holder = router.runtime.smap.cached(s2)
            started = time.monotonic()
            async with http.post(
                f"{router.url}/admin/instances/{holder}/drain?wait=120",
                headers={"X-Admin-Key": "adm"},
            ) as resp:
                drained = await resp.json()
            timings["drain"] = time.monotonic() - started
            assert resp.status == 200 and drained["failed"] == 0, drained
            assert holder not in await running_on(real_fleet, s2)
            async with http.post(
                f"{router.url}/admin/instances/{holder}/undrain", headers={"X-Admin-Key": "adm"}
            ) as resp:
                assert resp.status == 200

            # Crash of the node process alone: its Chromium keeps the profile
            # lock, so restores elsewhere wait ("held elsewhere") until it dies.
            owner = router.runtime.smap.cached(s1)
            victim = next(i for i in real_fleet if i.name == owner)
            victim.kill_node_only()
            started = time.monotonic()
            recovered = asyncio.ensure_future(
                until(
                    lambda: _moved(router, s1, owner),
                    120,
                    "s1 restored elsewhere after the crash",
                )
            )
            await until(lambda: _held(router, s1), 60, "a restore waiting for the profile lock")
            # What KillMode=control-group (or a container) does on the crash.
            assert kill_browsers(victim.storage / "workspace_7" / f"session-{s1}") >= 1
            await recovered
            timings["failover_after_lock_freed"] = time.monotonic() - started
            assert await running_on(real_fleet, s1) == [router.runtime.smap.cached(s1)]
            status, health = await call(http, "GET", f"{router.url}/health")
            assert health["status"] == "degraded" and victim.name in health["instances"]["down"]

            # A send to the restored copy: offline it never connects, so the
            # client hears the router, never Blazz's 400 "Session not
            # connected" from a copy the router started itself. The copy sent
            # a QR webhook: the answer is session_needs_auth, at once (it
            # once waited all of failover.wait when that webhook beat the
            # copy's create answer: tests/test_readiness.py).
            send = {
                "session_id": s1,
                "recipient_phone": "15550001111",
                "message": "hi",
                "api_key": ROUTER_KEY,
            }
            asked = time.monotonic()
            status, answer = await call(http, "POST", f"{router.url}/api/messages/send", send)
            timings["send_needs_auth"] = time.monotonic() - asked
            assert status == 503, answer
            assert answer["error"] == "session_needs_auth", answer
            assert timings["send_needs_auth"] < 10, timings

            # A client delete (no body; the router gives it one with the key).
            status, answer = await call(
                http, "DELETE", f"{router.url}/api/sessions/{s2}?api_key={ROUTER_KEY}"
            )
            assert status == 200, answer
            status, answer = await call(
                http, "GET", f"{router.url}/api/sessions/{s2}/status?api_key={ROUTER_KEY}"
            )
            assert status == 404 and answer["error"] == "unknown_session", answer
        print(f"\n[real blazz] timings (s): {json.dumps(timings)}")  # shown with -s / on failure
    finally:
        await app.stop()


async def _moved(router: RouterHandle, session: str, old: str | None) -> bool:
    owner = router.runtime.smap.cached(session)
    return owner is not None and owner != old and not router.runtime.failover.recovering(session)


async def _held(router: RouterHandle, session: str) -> bool:
    events = router.runtime.events.recent(kind="restore_held")
    return any(e["session"] == session for e in events)


async def _all_healthy(router: RouterHandle) -> bool:
    return all(inst.healthy for inst in router.runtime.fleet)
