"""The real router process (``python -m router run``) SIGKILLed with events pending and in flight.

After a restart with the same config every event reaches the target, in
order per session (duplicates of what was in flight are allowed: delivery
is at-least-once, and they carry the same ``X-Event-Id``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.support.webhook_target import (
    ADMIN_KEY,
    APP_KEY,
    BLAZZ_KEY,
    TargetServer,
    blazz_body,
    blazz_headers,
    free_port,
)

REPO = Path(__file__).resolve().parents[1]


def write_config(path: Path, *, port: int, store: str, prefix: str, target_url: str) -> None:
    path.write_text(
        f"""
listen: {{host: 127.0.0.1, port: {port}}}
adapter: {{kind: blazz}}
store: {{url: "{store}", key_prefix: "{prefix}"}}
admin_key: "{ADMIN_KEY}"
discovery: {{on_start: false}}
instances:
  - {{name: wa-1, url: "http://127.0.0.1:9"}}
webhooks:
  sqlite_path: "{path.parent / "var" / "webhooks.db"}"
  ingest: {{blazz_hmac_key: "{BLAZZ_KEY}"}}
  delivery:
    attempts_per_round: 2
    round_backoff: 0.02
    backoff_base: 0.1
    backoff_max: 0.3
    timeout: 2
    lease: 5
    concurrency: 8
  targets:
    - {{name: app, url: "{target_url}", hmac_key: "{APP_KEY}"}}
"""
    )


class RouterProcess:
    def __init__(self, config: Path, port: int, log: Path) -> None:
        self.config = config
        self.port = port
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _spawn(self) -> subprocess.Popen[bytes]:
        with self.log.open("ab") as out:
            return subprocess.Popen(
                [sys.executable, "-m", "router", "run", "-c", str(self.config)],
                cwd=REPO,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )

    async def start(self) -> None:
        self.proc = self._spawn()
        deadline = time.monotonic() + 20
        async with aiohttp.ClientSession() as http:
            while True:
                assert self.proc.poll() is None, "router exited:\n" + self.log.read_text()[-3000:]
                assert time.monotonic() < deadline, "router did not start"
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(self.url + "/healthz") as resp:
                        if resp.status == 200:
                            return
                await asyncio.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def terminate(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def routers() -> Iterator[list[RouterProcess]]:
    made: list[RouterProcess] = []
    yield made
    for r in made:
        r.kill()


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
async def test_sigkill_with_events_pending_and_in_flight_loses_nothing(
    backend: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    routers: list[RouterProcess],
) -> None:
    store, prefix = "memory", "wa-router:"
    if backend == "redis":
        store = request.getfixturevalue("redis_url")
        prefix = request.getfixturevalue("redis_prefix")
    # A slow main app, so deliveries are in flight when the router dies.
    app = TargetServer(hmac_key=APP_KEY, verify="blazz", delay=0.05)
    await app.start()
    try:
        port = free_port()
        cfg = tmp_path / "router.yaml"
        write_config(cfg, port=port, store=store, prefix=prefix, target_url=app.url)
        router = RouterProcess(cfg, port, tmp_path / "router.log")
        routers.append(router)
        await router.start()

        sent: dict[str, list[str]] = {}
        async with aiohttp.ClientSession() as http:
            for i in range(15):
                for s in ("webjs_1_1_a", "webjs_1_1_b", "webjs_2_1_c", "webjs_2_1_d"):
                    body = blazz_body("message_received", s, n=i)
                    async with http.post(
                        router.url + "/webhooks/blazz/wa-1", data=body, headers=blazz_headers(body)
                    ) as resp:
                        assert resp.status == 200, await resp.text()
                        sent.setdefault(s, []).append((await resp.json())["id"])
        total = sum(len(v) for v in sent.values())
        await app.wait_requests(8)
        # Kill while some deliveries are in the app's hands and the rest pending.
        deadline = time.monotonic() + 5
        while app.in_flight == 0:
            assert time.monotonic() < deadline, "no delivery in flight"
            await asyncio.sleep(0.001)
        router.kill()
        delivered_before = len(app.unique_ids())
        assert delivered_before < total, "everything was delivered before the kill"

        await router.start()  # same config, same queue
        await app.wait_unique(total, within=30)
        assert app.first_order() == sent
        dups = sum(n - 1 for n in app.counts().values())
        assert dups <= 8  # at most what was in flight (concurrency) is delivered twice

        async with aiohttp.ClientSession() as http:
            async with http.get(
                router.url + "/admin/webhooks/stats", headers={"X-Admin-Key": ADMIN_KEY}
            ) as resp:
                stats = await resp.json()
        assert stats["dead_letters"] == 0
        deadline = time.monotonic() + 5  # the last acks follow the last deliveries
        while stats["pending"]:
            assert time.monotonic() < deadline, stats
            await asyncio.sleep(0.05)
            async with aiohttp.ClientSession() as http:
                async with http.get(
                    router.url + "/admin/webhooks/stats", headers={"X-Admin-Key": ADMIN_KEY}
                ) as resp:
                    stats = await resp.json()
        # The operator's view, through the real CLI: nothing pending, nothing dead.
        cli = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "router", "webhooks", "stats", "-c", str(cfg)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert cli.returncode == 0, cli.stderr
        shown = json.loads(cli.stdout)
        assert (shown["backend"], shown["pending"], shown["dead_letters"]) == (
            "sqlite" if backend == "sqlite" else "redis",
            0,
            0,
        )
        router.terminate()
        assert router.proc is not None and router.proc.returncode == 0
        log = router.log.read_text()
        assert "Traceback" not in log, log[-3000:]
    finally:
        await app.stop()
