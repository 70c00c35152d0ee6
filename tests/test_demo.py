"""``session-router demo`` as a newcomer runs it: the README's story end to end.

The demo is a real process tree (router + three simulator processes). The
test reads what it prints, kills the owner of ``demo`` by the PID printed,
sends again, watches the failover in ``/metrics``, runs the admin CLI with
the printed ``export`` line, and checks the demo cleans up after itself.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from tests.support.metrics import scrape

EXE = Path(sys.executable).with_name("session-router")


def _demo(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(EXE), "--log-level", "warning", "demo", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


async def _read_story(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    stdout = proc.stdout
    lines: list[str] = []

    def read() -> None:
        for line in stdout:
            lines.append(line)
            if line.startswith("Ctrl-C stops the demo"):
                return

    await asyncio.wait_for(asyncio.to_thread(read), timeout=60)
    return "".join(lines)


async def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run, [str(EXE), *args], capture_output=True, text=True, env=env, timeout=30
    )


async def _gone(port: int) -> None:
    """Until nothing listens on ``port`` any more. Not "the PID is a zombie":
    the main thread of a killed multi-threaded process turns zombie while its
    other threads still hold its sockets open for a moment."""
    for _ in range(500):
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except ConnectionRefusedError:
            return
        writer.close()
        await asyncio.sleep(0.01)
    raise AssertionError(f"port {port} still listens after SIGKILL")


async def test_the_demo_story_kill_the_owner_and_watch_the_failover() -> None:
    proc = _demo("--free-ports")
    try:
        story = await _read_story(proc)
        base = re.search(r"behind (http://\S+)", story)
        assert base, story
        url = base.group(1)
        table = re.findall(r"^\s+(wa-\d)\s+http://127.0.0.1:(\d+)\s+pid (\d+)", story, re.M)
        rows = {name: pid for name, _, pid in table}
        ports = {name: int(port) for name, port, _ in table}
        assert sorted(rows) == ["wa-1", "wa-2", "wa-3"], story
        owner = re.search(r"^\s+(wa-\d)\s+.*<- owns 'demo'$", story, re.M)
        assert owner, story
        kill = re.search(r"^\s+kill -9 (\d+)$", story, re.M)
        assert kill and kill.group(1) == rows[owner.group(1)]
        curl = re.search(r"^\s+(curl -s .*)$", story, re.M)
        assert curl, story
        export = re.search(
            r"^\s+export (WA_ROUTER_URL=\S+) (WA_ROUTER_ADMIN_KEY=\S+)$", story, re.M
        )
        assert export, story
        tmp = re.search(r"recorded in (\S+)\):", story)
        assert tmp, story
        workdir = Path(tmp.group(1)).parent
        assert workdir.is_dir()

        # The printed curl, as printed (its key and body), through aiohttp.
        words = shlex.split(curl.group(1))
        headers = dict(
            h.split(": ", 1) for h in (words[i + 1] for i, w in enumerate(words) if w == "-H")
        )
        body = words[words.index("-d") + 1]
        async with aiohttp.ClientSession(headers=headers) as http:
            async with http.post(url + "/api/sendText", data=body) as resp:
                assert resp.status == 201, await resp.text()
            before = await scrape(http, url)
            os.kill(int(kill.group(1)), signal.SIGKILL)
            # As a person would: the next send comes after the process is gone
            # (a send racing the kill may reach it and is then, rightly, a 502).
            await _gone(ports[owner.group(1)])
            async with http.post(url + "/api/sendText", data=body) as resp:
                assert resp.status == 201, await resp.text()
            after = await scrape(http, url)
        assert after.delta(before, "wa_router_failovers_total") >= 1
        assert after.delta(before, "wa_router_restore_duration_seconds_count") >= 1

        # The admin CLI with exactly the printed environment.
        env = dict(os.environ)
        for pair in export.groups():
            k, v = pair.split("=", 1)
            env[k] = v
        status = await _cli(env, "status")
        assert status.returncode == 0, status.stderr
        assert "wa-1" in status.stdout and "1 sessions" in status.stdout
        stats = await _cli(env, "sessions")
        assert stats.returncode == 0, stats.stderr
        assert "demo" in stats.stdout
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""
    assert not workdir.exists(), "the demo left its temporary folder behind"
    # Every simulator went with it.
    for pid in rows.values():
        with pytest.raises(ProcessLookupError):
            os.kill(int(pid), 0)


def test_a_busy_port_is_one_line_not_a_traceback() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = subprocess.run(
            [str(EXE), "demo", "--base-port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert proc.returncode == 1
    err = proc.stderr.strip()
    assert "Traceback" not in err
    assert err.count("\n") == 0, err
    # The router's own port is checked first, and it is the one held here.
    assert f"port {port} (router) is in use" in err
