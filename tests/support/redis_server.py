"""A private ``redis-server`` for the test session (never the machine's one on 6379).

Fixtures:

* ``redis_server`` (session scope): a ``RedisServer`` handle with ``.url``,
  ``.port``, ``stop()``, ``kill()``, ``start()`` (same port, empty),
  ``pause()`` / ``resume()`` (SIGSTOP / SIGCONT, a hung redis). Started on
  first use only, so tests that do not need redis do not need it either.
* ``redis_url`` (function scope): the server, running (restarted if a
  previous test left it stopped or paused), as a URL.
* ``redis_prefix`` (function scope): a key prefix unique to the test, so
  tests never see each other's keys and nothing needs flushing.

``redis-server`` missing from PATH is a test *failure*, not a skip: CI
installs it, and a silently skipped store suite would hide a broken backend.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

START_TIMEOUT = 10.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _pings(port: int, timeout: float = 0.2) -> bool:
    """One raw ``PING`` -> ``+PONG`` exchange; False on any failure."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    # Linux: SIGKILL the redis-server if pytest itself dies, no orphans.
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class RedisServer:
    """One redis-server process on a fixed port, restartable (always empty)."""

    def __init__(self, binary: str, workdir: Path, port: int | None = None) -> None:
        self.binary = binary
        self.workdir = workdir
        self.port = port or _free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.paused = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.workdir / "redis.log"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        """Start (or restart) on ``self.port`` with an empty dataset; wait until it PINGs."""
        if self.running:
            raise RuntimeError("redis-server already running")
        for leftover in ("dump.rdb", "appendonly.aof"):
            with contextlib.suppress(FileNotFoundError):
                (self.workdir / leftover).unlink()
        log = self.log_path.open("ab")
        try:
            self.proc = subprocess.Popen(
                [
                    self.binary,
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(self.workdir),
                    "--protected-mode",
                    "yes",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent if os.name == "posix" else None,
            )
        finally:
            log.close()
        self.paused = False
        deadline = time.monotonic() + START_TIMEOUT
        while not _pings(self.port):
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"redis-server exited with {self.proc.returncode} on port {self.port}:\n"
                    + self._log_tail()
                )
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(
                    f"redis-server did not answer PING within {START_TIMEOUT}s:\n"
                    + self._log_tail()
                )
            time.sleep(0.01)

    def stop(self) -> None:
        """Graceful shutdown (SIGTERM); connections are closed by the server."""
        self._end(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL: the process vanishes without closing anything."""
        self._end(signal.SIGKILL)

    def pause(self) -> None:
        """SIGSTOP: connections stay open but nothing answers (a hung redis)."""
        if self.proc is not None and self.running:
            self.proc.send_signal(signal.SIGSTOP)
            self.paused = True

    def resume(self) -> None:
        if self.proc is not None and self.running and self.paused:
            self.proc.send_signal(signal.SIGCONT)
            self.paused = False

    def ensure_running(self) -> None:
        self.resume()
        if not self.running:
            self.start()

    def _end(self, sig: signal.Signals) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        if self.paused and sig != signal.SIGKILL:
            proc.send_signal(signal.SIGCONT)
        self.paused = False
        proc.send_signal(sig)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def _start_private_server() -> tuple[RedisServer, Path]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail(
            "redis-server not found on PATH. The store tests run against a private "
            "redis-server (install it: apt-get install redis-server).",
            pytrace=False,
        )
    workdir = Path(tempfile.mkdtemp(prefix="wa-router-redis-"))
    last: Exception | None = None
    # A free port can be taken between choosing and binding it: try a few.
    for _ in range(3):
        server = RedisServer(binary, workdir)
        try:
            server.start()
        except RuntimeError as exc:
            last = exc
            continue
        return server, workdir
    shutil.rmtree(workdir, ignore_errors=True)
    pytest.fail(f"could not start a private redis-server: {last}", pytrace=False)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server, workdir = _start_private_server()
    try:
        yield server
    finally:
        server.kill()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def redis_url(redis_server: RedisServer) -> Iterator[str]:
    redis_server.ensure_running()
    yield redis_server.url
    # A test may stop, kill or pause it: leave it running for the next one.
    redis_server.ensure_running()


@pytest.fixture
def redis_prefix() -> str:
    return f"test-{uuid.uuid4().hex[:12]}:"
