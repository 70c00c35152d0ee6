"""Simulated WhatsApp instances as real processes, for router tests.

``SimProcess`` runs ``python -m router.simulator`` and waits for its READY
line; ``SimFleet`` runs several sharing one auth directory and one send
record; the ``sim_fleet`` fixture builds fleets and stops them afterwards.

    async def test_x(sim_fleet):
        fleet = sim_fleet(3, dialect="waha", api_key="k")
        await fleet[0].wait_session("s1")      # after creating s1 on wa-1
        fleet[0].kill()                        # SIGKILL
        assert [r["text"] for r in fleet.sent()] == ["hi"]
"""

from __future__ import annotations

import asyncio
import atexit
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

import aiohttp
import pytest

from router.simulator.app import READY_PREFIX

REPO_ROOT = Path(__file__).resolve().parents[2]
_LIVE: set[SimProcess] = set()


def read_records(path: Path) -> list[dict[str, Any]]:
    """All complete lines of a send record file (a torn last line is skipped)."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


class SimProcess:
    """One simulator process. ``restart()`` keeps the port and loses the memory."""

    def __init__(
        self,
        name: str,
        directory: Path,
        *,
        dialect: str = "waha",
        api_key: str | None = None,
        start_delay: float = 0.1,
        auto_auth: bool = True,
        auth_dir: Path | None = None,
        record: Path | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.name = name
        # More simulator flags, e.g. ("--browser-linger", "5") for Blazz.
        self.extra_args = list(extra_args)
        self.dialect = dialect
        self.api_key = api_key
        self.start_delay = start_delay
        self.auto_auth = auto_auth
        self.auth_dir = auth_dir or directory / "auth"
        self.record = record or directory / "sent.jsonl"
        self.log = directory / f"{name}.log"
        self.host = host
        self.port = port
        self.url = ""
        self.proc: subprocess.Popen[str] | None = None
        self._lines: queue.Queue[str | None] = queue.Queue()
        directory.mkdir(parents=True, exist_ok=True)

    # -- lifecycle ------------------------------------------------------

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "router.simulator", "--name", self.name]
        cmd += ["--dialect", self.dialect, "--host", self.host, "--port", str(self.port)]
        cmd += ["--auth-dir", str(self.auth_dir), "--record", str(self.record)]
        cmd += ["--start-delay", str(self.start_delay), "--parent-pid", str(os.getpid())]
        if self.api_key is not None:
            cmd += ["--api-key", self.api_key]
        if not self.auto_auth:
            cmd.append("--no-auto-auth")
        return cmd + self.extra_args

    def spawn(self) -> None:
        """Start the process without waiting for it (see ``wait_ready``)."""
        if self.alive:
            raise RuntimeError(f"{self.name} is already running")
        with self.log.open("a") as log:
            self.proc = subprocess.Popen(
                self.command(),
                cwd=REPO_ROOT,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
            )
        self._lines = queue.Queue()
        assert self.proc.stdout is not None
        threading.Thread(
            target=self._read_stdout, args=(self.proc.stdout, self._lines), daemon=True
        ).start()
        _LIVE.add(self)

    @staticmethod
    def _read_stdout(stream: TextIO, lines: queue.Queue[str | None]) -> None:
        # Keep draining stdout for the life of the process so it never blocks.
        for line in stream:
            lines.put(line)
        lines.put(None)

    def wait_ready(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.kill()
                raise TimeoutError(f"{self.name}: no READY line in {timeout}s") from None
            if line is None:
                raise RuntimeError(f"{self.name} exited before READY:\n{self.log_tail()}")
            if line.startswith(READY_PREFIX):
                self.url = line.split()[-1]
                self.port = int(self.url.rsplit(":", 1)[1])
                return

    def start(self, timeout: float = 15.0) -> SimProcess:
        self.spawn()
        self.wait_ready(timeout)
        return self

    def kill(self, sig: int = signal.SIGKILL, timeout: float = 5.0) -> None:
        """Send ``sig``; for anything but SIGSTOP/SIGCONT, wait for the exit."""
        if not self.alive:
            return
        assert self.proc is not None
        self.proc.send_signal(sig)
        if sig not in (signal.SIGSTOP, signal.SIGCONT):
            self.proc.wait(timeout)
            _LIVE.discard(self)

    def terminate(self) -> None:
        """Ask for a graceful exit (waking a paused process) without waiting."""
        if self.alive:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGTERM)
            self.proc.send_signal(signal.SIGCONT)

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL if the process does not exit within ``timeout``."""
        self.terminate()
        if self.proc is None or not self.alive:
            _LIVE.discard(self)
            return
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        _LIVE.discard(self)

    def pause(self) -> None:
        self.kill(signal.SIGSTOP)

    def resume(self) -> None:
        self.kill(signal.SIGCONT)

    def restart(self, sig: int = signal.SIGKILL, timeout: float = 15.0) -> SimProcess:
        """Kill (SIGKILL by default) and start again on the same port: empty memory."""
        if sig == signal.SIGTERM:
            self.stop()
        else:
            self.kill(sig)
        return self.start(timeout)

    def wait_exit(self, timeout: float = 5.0) -> int:
        assert self.proc is not None
        code = self.proc.wait(timeout)
        _LIVE.discard(self)
        return code

    async def start_async(self) -> SimProcess:
        return await asyncio.to_thread(self.start)

    async def restart_async(self, sig: int = signal.SIGKILL) -> SimProcess:
        return await asyncio.to_thread(self.restart, sig)

    async def stop_async(self) -> None:
        await asyncio.to_thread(self.stop)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text().splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    # -- what happened ----------------------------------------------------

    def sent(self) -> list[dict[str, Any]]:
        """Sends this instance recorded (across restarts), from the shared file."""
        return [r for r in read_records(self.record) if r["instance"] == self.name]

    # -- /_sim helpers (no auth needed) -------------------------------------

    async def _sim(self, method: str, path: str, body: Any = None) -> Any:
        async with (
            aiohttp.ClientSession() as http,
            http.request(method, self.url + path, json=body) as resp,
        ):
            resp.raise_for_status()
            return await resp.json()

    async def state(self) -> dict[str, Any]:
        result: dict[str, Any] = await self._sim("GET", "/_sim/state")
        return result

    async def session_status(self, session: str) -> str | None:
        """The WAHA-style status of ``session`` here, None if not in memory."""
        for s in (await self.state())["sessions"]:
            if s["name"] == session:
                return str(s["status"])
        return None

    async def wait_session(
        self, session: str, status: str = "WORKING", within: float = 5.0
    ) -> None:
        """Poll ``/_sim/state`` until ``session`` has ``status`` (WAHA names)."""
        try:
            async with asyncio.timeout(within):
                # Polling another process: there is no event to await.
                while True:
                    if await self.session_status(session) == status:
                        return
                    await asyncio.sleep(0.02)
        except TimeoutError:
            current = await self.session_status(session)
            raise TimeoutError(f"{self.name}: {session} is {current}, not {status}") from None

    async def fault(self, mode: str, **params: Any) -> None:
        """``mode`` in none|slow|error|drop|drop_after|crash; see router/simulator/faults.py."""
        await self._sim("POST", "/_sim/fault", {"mode": mode, **params})

    async def pair(self, session: str) -> None:
        await self._sim("POST", f"/_sim/sessions/{session}/pair")

    def __repr__(self) -> str:
        return f"SimProcess({self.name!r}, {self.dialect}, url={self.url!r})"


class SimFleet:
    """N simulator processes sharing one auth directory and one send record."""

    def __init__(
        self,
        directory: Path,
        n: int = 2,
        *,
        dialect: str = "waha",
        api_key: str | None = None,
        start_delay: float = 0.1,
        auto_auth: bool = True,
        prefix: str | None = None,
        extra_args: Sequence[str] = (),
        api_keys: Sequence[str] | None = None,
    ) -> None:
        self.directory = directory
        # One key per instance (in order) instead of ``api_key`` for all.
        self.api_keys = list(api_keys) if api_keys is not None else None
        self.auth_dir = directory / "auth"
        self.record = directory / "sent.jsonl"
        self.dialect = dialect
        self.api_key = api_key
        self.start_delay = start_delay
        self.auto_auth = auto_auth
        self.prefix = prefix or ("wa" if dialect == "waha" else "blazz")
        self.extra_args = list(extra_args)
        self.instances: list[SimProcess] = []
        for _ in range(n):
            self._new()

    def _new(self) -> SimProcess:
        n = len(self.instances)
        proc = SimProcess(
            f"{self.prefix}-{n + 1}",
            self.directory,
            dialect=self.dialect,
            api_key=self.api_keys[n] if self.api_keys is not None else self.api_key,
            start_delay=self.start_delay,
            auto_auth=self.auto_auth,
            auth_dir=self.auth_dir,
            record=self.record,
            extra_args=self.extra_args,
        )
        self.instances.append(proc)
        return proc

    def start(self, timeout: float = 15.0) -> SimFleet:
        """Spawn every instance at once, then wait for all READY lines."""
        pending = [p for p in self.instances if not p.alive]
        for proc in pending:
            proc.spawn()
        for proc in pending:
            proc.wait_ready(timeout)
        return self

    def add(self) -> SimProcess:
        """Start one more instance sharing the fleet's auth and record."""
        return self._new().start()

    def stop(self) -> None:
        for proc in self.instances:
            proc.terminate()
        for proc in self.instances:
            proc.stop()

    def sent(self, session: str | None = None) -> list[dict[str, Any]]:
        """Every recorded send of the fleet (optionally of one session), in order."""
        records = read_records(self.record)
        return [r for r in records if session is None or r["session"] == session]

    def auth_file(self, session: str) -> Path:
        """WAHA: ``<auth>/<session>.json``; Blazz: the stored login in its profile
        (``<auth>/workspace_<w>/session-<session>/sim-auth.json``, any workspace)."""
        if self.dialect == "blazz":
            found = sorted(self.auth_dir.glob(f"workspace_*/session-{session}/sim-auth.json"))
            return found[0] if found else self.auth_dir / f"session-{session}" / "sim-auth.json"
        return self.auth_dir / f"{session}.json"

    @property
    def urls(self) -> list[str]:
        return [p.url for p in self.instances]

    def by_name(self, name: str) -> SimProcess:
        return next(p for p in self.instances if p.name == name)

    def __getitem__(self, index: int) -> SimProcess:
        return self.instances[index]

    def __iter__(self) -> Iterator[SimProcess]:
        return iter(self.instances)

    def __len__(self) -> int:
        return len(self.instances)


SimFleetFactory = Callable[..., SimFleet]


async def where_running(fleet: SimFleet, session: str) -> list[str]:
    """The live processes of ``fleet`` that have ``session`` in memory, in any status."""
    return [p.name for p in fleet if p.alive and await p.session_status(session) is not None]


@pytest.fixture
def sim_fleet(tmp_path: Path) -> Iterator[SimFleetFactory]:
    """``sim_fleet(n=2, dialect="waha", api_key=None, start_delay=0.1, auto_auth=True,
    extra_args=())``.

    Each call starts a new fleet in its own directory under ``tmp_path``;
    every process is stopped when the test ends.
    """
    fleets: list[SimFleet] = []

    def make(n: int = 2, **kwargs: Any) -> SimFleet:
        fleet = SimFleet(tmp_path / f"fleet-{len(fleets)}", n, **kwargs)
        fleets.append(fleet)
        return fleet.start()

    yield make
    for fleet in fleets:
        fleet.stop()


@atexit.register
def _kill_leftovers() -> None:
    for proc in list(_LIVE):
        if proc.alive and proc.proc is not None:
            proc.proc.kill()
