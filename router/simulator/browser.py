"""Blazz session profiles in the shared auth directory, and their "browsers".

Blazz runs one Chromium per session with a LocalAuth profile at
``$SESSION_STORAGE_PATH/workspace_<workspace_id>/session-<session_id>``.
Chromium holds ``SingletonLock`` (a symlink to ``<hostname>-<pid>``) in the
profile while it runs: another launch on that profile fails while the holder
lives, and takes a stale lock (dead holder, same host) over silently.

Here the lock is the same symlink. Its holder is the simulator process, or,
with ``--browser-linger``, a child process standing in for Chromium that
outlives a SIGKILL of the simulator by that many seconds (then exits and
leaves a stale lock, like a Chromium killed later). The stored login is
``sim-auth.json`` in the profile: a create of that profile restores without QR.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Final

from router.simulator.express import js_string, truthy

LOCK_NAME: Final = "SingletonLock"
AUTH_NAME: Final = "sim-auth.json"
HOSTNAME: Final = socket.gethostname()

# The stand-in browser: waits for EOF on stdin (the simulator is gone), then
# lingers before exiting.
_BROWSER_CODE: Final = "import sys,time\nsys.stdin.buffer.read()\ntime.sleep(float(sys.argv[1]))\n"


def profile_dir(auth_dir: Path, workspace_id: Any, session_id: Any) -> Path:
    """LocalAuth's ``userDataDir`` (``path.resolve`` + ``path.join`` semantics)."""
    data_path = os.path.join(os.path.abspath(auth_dir), f"workspace_{js_string(workspace_id)}")
    name = f"session-{js_string(session_id)}" if truthy(session_id) else "session"
    return Path(os.path.normpath(os.path.join(os.path.normpath(data_path), name)))


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lock_holder(profile: Path) -> tuple[str, int] | None:
    """``(hostname, pid)`` from the profile's lock, None if none or unreadable."""
    try:
        target = os.readlink(profile / LOCK_NAME)
    except OSError:
        return None
    host, _, pid = target.rpartition("-")
    return (host, int(pid)) if pid.isdigit() else None


def lock_is_live(profile: Path) -> bool:
    holder = lock_holder(profile)
    return holder is not None and holder[0] == HOSTNAME and pid_alive(holder[1])


def _point_lock(profile: Path, pid: int) -> None:
    tmp = profile / f".{LOCK_NAME}.{os.getpid()}.{secrets.token_hex(4)}"
    os.symlink(f"{HOSTNAME}-{pid}", tmp)
    os.replace(tmp, profile / LOCK_NAME)


def try_lock(profile: Path, pid: int) -> bool:
    """Take the profile's lock for ``pid``; False while a live process holds it."""
    profile.mkdir(parents=True, exist_ok=True)
    lock = profile / LOCK_NAME
    try:
        os.symlink(f"{HOSTNAME}-{pid}", lock)
        return True
    except FileExistsError:
        pass
    if lock_is_live(profile):
        return False
    _point_lock(profile, pid)  # stale: taken over silently
    return lock_holder(profile) == (HOSTNAME, pid)


def release_lock(profile: Path, pid: int) -> None:
    """Remove the lock if ``pid`` holds it (a clean Chromium exit)."""
    if lock_holder(profile) == (HOSTNAME, pid):
        with contextlib.suppress(FileNotFoundError):
            (profile / LOCK_NAME).unlink()


def chromium_lock_error(profile: Path) -> str:
    """Puppeteer's launch error when the profile is locked (as observed)."""
    pid = 10000 + secrets.randbelow(50000)
    t = time.time()
    stamp = time.strftime("%m%d/%H%M%S", time.localtime(t)) + f".{int(t % 1 * 1e6):06d}"
    head = f"[{pid}:{pid}:{stamp}:ERROR:"
    return (
        "Failed to launch the browser process!\n"
        f"{head}chrome/browser/process_singleton_posix.cc:349] Failed to create "
        f"{profile}/{LOCK_NAME}: File exists (17)\n"
        f"{head}chrome/app/chrome_main_delegate.cc:624] Failed to create a ProcessSingleton "
        "for your profile directory. This means that running multiple instances would start "
        "multiple browser processes rather than opening a new window in the existing process. "
        "Aborting now to avoid profile corruption.\n\n\n"
        "TROUBLESHOOTING: https://github.com/puppeteer/puppeteer/blob/main/docs/troubleshooting.md\n"
    )


def load_auth(profile: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((profile / AUTH_NAME).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def save_auth(profile: Path, data: dict[str, Any]) -> None:
    profile.mkdir(parents=True, exist_ok=True)
    tmp = profile / f".{AUTH_NAME}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(data))
    os.replace(tmp, profile / AUTH_NAME)


def delete_auth(profile: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        (profile / AUTH_NAME).unlink()


class Browser:
    """One session's Chromium: the lock it holds, and its process if it has one."""

    def __init__(self, profile: Path, linger: float) -> None:
        self.profile = profile
        self.linger = linger
        self.proc: subprocess.Popen[bytes] | None = None
        self.holder = os.getpid()
        self.alive = False

    def launch(self) -> bool:
        """Take the profile lock (False: locked by a live process) and start."""
        if not try_lock(self.profile, os.getpid()):
            return False
        if self.linger > 0:
            self.proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _BROWSER_CODE, str(self.linger)],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            self.holder = self.proc.pid
            _point_lock(self.profile, self.holder)
        self.alive = True
        return True

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def kill(self) -> None:
        """SIGKILL (puppeteer's exit hook, or "the browser crashed"): the lock stays."""
        self.alive = False
        if self._reap() is None:
            # No process stands in for Chromium: what it leaves is a stale lock.
            release_lock(self.profile, self.holder)

    def close(self) -> None:
        """``browser.close()``: the process exits and removes its lock."""
        self.alive = False
        self._reap()
        release_lock(self.profile, self.holder)

    def orphan_kill(self) -> None:
        """Kill at exit without touching the lock (puppeteer's exit handler)."""
        self._reap()

    def _reap(self) -> subprocess.Popen[bytes] | None:
        """Drop the process (SIGKILL and wait if it still runs); the old one or None."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        return proc
