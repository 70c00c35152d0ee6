"""Live config reload: on SIGHUP, on ``POST /admin/reload``, and when the file changes.

A reload parses and validates the whole file first (``config_loader.load``:
the same checks as at start, ``file:line: reason`` on failure). A rejected
file changes nothing: the reason goes to the log, to the API answer and to
``wa_router_config_reloads_total{result="failure"}`` /
``wa_router_config_last_reload_successful 0``, and the router keeps serving
with its last good config.

A good file is applied in one step, with no ``await`` between its parts, so
a request sees either the old config or the new one, never a mix:

* ``runtime.config``, ``runtime.adapter`` (rebuilt only when the ``adapter``
  section changed), ``runtime.fleet``, the client keys and the timeouts the
  resolver, retry budget and discovery use are assigned together;
  ``Server.config`` follows (``on_apply``).
* Instances (``Fleet.plan``): one whose name and URL are unchanged stays the
  same object, so its health, admin state, ejections and connection pools
  carry over; its ``max_sessions``, ``weight`` and ``api_key`` change in
  place. A name with a new URL is the same instance at a new address: a new
  object (fresh health, the old admin state), sessions stay mapped to the
  name. To replace an instance by another process, give it a new name.
* Changed ``timeouts`` or ``limits.max_connections_per_instance`` give every
  instance new pools. Pools nothing new will use (replaced, readdressed,
  dropped) are closed only once no connection of theirs is in use, after a
  grace period covering requests that picked the old object just before
  the swap (``retire_grace``, default probe timeout + 1 s, at least 2 s),
  and at the latest after ``retire_max`` (an hour: a WebSocket on a removed
  instance ends then). No request in flight is cut.
* An instance gone from the config that still owns sessions stays in the
  fleet, DRAINING (placement skips it), after the configured ones, and its
  sessions are migrated (``Migration.drain``: stop there, start elsewhere,
  then switch the map) to the remaining instances. Sessions it cannot move
  are retried with a growing delay (up to 30 s); sessions of a removed
  instance that is down, or that the instance reports not running, are
  restored elsewhere by failover. Once it owns nothing it leaves the fleet
  and its pools retire as above. Listing it in the config again cancels
  this (it becomes active again).
* ``listen``, ``store`` and ``webhooks`` cannot change in a running router
  (a bound socket, the map's backend, the durable queue). A file changing
  them is *not* rejected: everything else is applied, the running values of
  those sections are kept (so ``runtime.config`` always says what is in
  force), and the answer, the log (a warning) and the ``config_reload``
  event list them under ``restart_required``.

The file watch polls the file's mtime, size and inode every
``watch_interval`` seconds (1 s; a stdlib poll is plenty for one small file,
works on every filesystem and follows the symlink swaps of a Kubernetes
ConfigMap), waits until it stops changing (``debounce``), and reloads when
its content differs from the content last tried. A reload in progress
finishes before the next starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from router.adapters import build_adapter
from router.config import ConfigError, RouterConfig
from router.config_loader import load
from router.instances import AdminState, Instance, Pools
from router.metrics import CONFIG_LAST_RELOAD_SUCCESS, CONFIG_LAST_RELOAD_TIME, CONFIG_RELOADS
from router.snapshot import Snapshot

if TYPE_CHECKING:
    from router.runtime import Runtime

log = logging.getLogger(__name__)

# Sections a running router keeps until it restarts.
RESTART_REQUIRED = ("listen", "store", "webhooks")
# Sections compared for the "settings" list of a result (instances and adapter apart).
_SETTINGS = (
    "timeouts",
    "limits",
    "health",
    "outlier",
    "failover",
    "discovery",
    "idempotency",
    "admin_key",
    "api_keys",
)
# Retry a removed instance's leftover sessions after this, doubling, up to the max.
_RETRY_FIRST = 1.0
_RETRY_MAX = 30.0
# How often a retired pool is checked for connections still in use.
_IDLE_POLL = 0.1


class ReloadUnavailable(Exception):
    """There is no config file to reload (the config was built in code)."""


@dataclass(slots=True)
class ReloadResult:
    """What one reload attempt did (or why it was rejected)."""

    ok: bool
    cause: str  # sighup | api | file | manual
    source: str | None
    started: float = field(default_factory=time.time)
    seconds: float = 0.0
    # A rejection: "file:line: reason", and its parts.
    error: str | None = None
    file: str | None = None
    line: int | None = None
    reason: str | None = None
    # What changed (empty lists when nothing did).
    changed: bool = False
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)  # draining, leave once empty
    dropped: list[str] = field(default_factory=list)  # removed, owned nothing: gone now
    readdressed: list[str] = field(default_factory=list)
    updated: dict[str, list[str]] = field(default_factory=dict)
    repooled: list[str] = field(default_factory=list)
    readded: list[str] = field(default_factory=list)  # removal cancelled
    adapter_changed: bool = False
    settings: list[str] = field(default_factory=list)
    restart_required: list[str] = field(default_factory=list)

    @classmethod
    def rejected(cls, cause: str, source: str | None, exc: ConfigError) -> ReloadResult:
        return cls(
            ok=False,
            cause=cause,
            source=source,
            error=str(exc),
            file=exc.file,
            line=exc.line,
            reason=exc.reason,
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "cause": self.cause,
            "source": self.source,
            "started": self.started,
            "seconds": round(self.seconds, 4),
            "error": self.error,
            "file": self.file,
            "line": self.line,
            "reason": self.reason,
            "changed": self.changed,
            "added": list(self.added),
            "removed": list(self.removed),
            "dropped": list(self.dropped),
            "readdressed": list(self.readdressed),
            "updated": {k: list(v) for k, v in self.updated.items()},
            "repooled": list(self.repooled),
            "readded": list(self.readded),
            "adapter_changed": self.adapter_changed,
            "settings": list(self.settings),
            "restart_required": list(self.restart_required),
        }


def _digest(path: str) -> bytes | None:
    try:
        with open(path, "rb") as fh:
            return hashlib.sha256(fh.read()).digest()
    except OSError:
        return None


def _signature(path: str) -> tuple[int, int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev)


def _load(path: str) -> tuple[bytes | None, RouterConfig]:
    # The digest first: if the file changes in between, the watch sees it again.
    return _digest(path), load(path)


class Reloader:
    """Reloads the config of one router process; see the module doc."""

    def __init__(
        self,
        rt: Runtime,
        *,
        path: str | None,
        on_apply: Callable[[RouterConfig], None] | None = None,
        watch_interval: float | None = 1.0,
        debounce: float = 0.25,
    ) -> None:
        self.rt = rt
        self.path = path
        self._on_apply = on_apply
        self.watch_interval = watch_interval
        self.debounce = debounce
        # Seconds a retired pool is left alone before it may close (None: automatic).
        self.retire_grace: float | None = None
        # Longest a retired pool with connections in use is kept open.
        self.retire_max = 3600.0
        self.attempts = 0
        self.applied = 0
        # Changes of the file the watch noticed (a touch included).
        self.changes_seen = 0
        self.loaded_at = time.time()
        self.last: ReloadResult | None = None
        self._lock = asyncio.Lock()
        self._attempted = asyncio.Condition()
        self._retiring: dict[str, asyncio.Task[None]] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._requested: set[asyncio.Task[ReloadResult | None]] = set()
        self._watch: asyncio.Task[None] | None = None
        # Content of the file last loaded or tried (the watch skips a touch).
        self._tried: bytes | None = _digest(path) if path else None
        self._closed = False

    @property
    def retiring(self) -> frozenset[str]:
        """Instances gone from the config, still draining."""
        return frozenset(self._retiring)

    def status(self) -> dict[str, Any]:
        return {
            "source": self.path,
            "loaded_at": self.loaded_at,
            "attempts": self.attempts,
            "applied": self.applied,
            "watching": self._watch is not None and not self._watch.done(),
            "watch_interval": self.watch_interval,
            "retiring": sorted(self._retiring),
            "last": self.last.as_dict() if self.last is not None else None,
        }

    # -- lifecycle ----------------------------------------------------------------

    def start(self) -> None:
        """Watch the file (when there is one and ``watch_interval`` is set)."""
        if self.path and self.watch_interval and self._watch is None:
            # The file as it is now, not when the task first runs.
            seen = _signature(self.path)
            self._watch = asyncio.create_task(
                self._watch_loop(self.path, seen), name="config-watch"
            )

    async def close(self) -> None:
        """Stop watching and retiring; close every retired pool now (shutdown)."""
        self._closed = True
        tasks: list[asyncio.Task[Any]] = [*self._requested, *self._retiring.values()]
        if self._watch is not None:
            tasks.append(self._watch)
            self._watch = None
        tasks += self._closing  # their ``finally`` closes the pools
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._retiring.clear()

    def request(self, cause: str) -> asyncio.Task[ReloadResult | None]:
        """Reload in the background (a signal handler cannot await)."""
        task = asyncio.create_task(self._reload_logged(cause), name=f"reload:{cause}")
        self._requested.add(task)
        task.add_done_callback(self._requested.discard)
        return task

    async def _reload_logged(self, cause: str) -> ReloadResult | None:
        try:
            return await self.reload(cause)
        except ReloadUnavailable as exc:
            log.warning("config reload (%s) ignored: %s", cause, exc)
        except Exception:
            log.exception("config reload (%s) failed", cause)
        return None

    async def wait_attempt(self, after: int | None = None) -> ReloadResult:
        """Wait until reload attempt number ``after + 1`` (default: the next) has ended."""
        target = self.attempts if after is None else after
        async with self._attempted:
            await self._attempted.wait_for(lambda: self.attempts > target)
        assert self.last is not None
        return self.last

    async def wait_change_seen(self, after: int) -> None:
        """Wait until the watch has noticed more than ``after`` changes of the file."""
        async with self._attempted:
            await self._attempted.wait_for(lambda: self.changes_seen > after)

    async def wait_retired(self, name: str) -> None:
        """Wait until the removed instance ``name`` has left the fleet."""
        task = self._retiring.get(name)
        if task is not None:
            await asyncio.shield(task)

    async def wait_pools_closed(self) -> None:
        """Wait until every retired pool is closed."""
        while self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    # -- reloading ----------------------------------------------------------------

    async def reload(self, cause: str = "api") -> ReloadResult:
        """Parse the file again and apply it; a rejection is a result, not an exception.

        ``ReloadUnavailable`` when the config did not come from a file.
        """
        path = self.path
        if not path:
            raise ReloadUnavailable("the config was not loaded from a file")
        async with self._lock:
            started = time.monotonic()
            try:
                digest, new = await asyncio.to_thread(_load, path)
            except ConfigError as exc:
                self._tried = _digest(path)
                result = ReloadResult.rejected(cause, path, exc)
            except Exception as exc:  # a bug must not take the router down
                log.exception("config reload (%s) failed", cause)
                self._tried = _digest(path)
                err = ConfigError(path, None, f"internal error: {exc!r}")
                result = ReloadResult.rejected(cause, path, err)
            else:
                self._tried = digest
                result = await self._apply(new, cause)
            result.seconds = time.monotonic() - started
            await self._record(result)
            return result

    async def apply(self, new: RouterConfig, cause: str = "manual") -> ReloadResult:
        """Apply an already-loaded config (tests, embedding)."""
        async with self._lock:
            started = time.monotonic()
            result = await self._apply(new, cause)
            result.seconds = time.monotonic() - started
            await self._record(result)
            return result

    async def _apply(self, new: RouterConfig, cause: str) -> ReloadResult:
        rt = self.rt
        old = rt.config
        source = new.source or old.source
        result = ReloadResult(ok=True, cause=cause, source=source)
        result.restart_required = [
            s for s in RESTART_REQUIRED if getattr(new, s) != getattr(old, s)
        ]
        cfg = dataclasses.replace(
            new, listen=old.listen, store=old.store, webhooks=old.webhooks, source=source
        )
        adapter = rt.adapter
        if cfg.adapter != old.adapter:
            try:
                adapter = build_adapter(cfg.adapter)
            except (ValueError, TypeError) as exc:
                return ReloadResult.rejected(
                    cause, source, ConfigError(source or "<config>", None, f"adapter: {exc}")
                )
            result.adapter_changed = True
        result.settings = [s for s in _SETTINGS if getattr(cfg, s) != getattr(old, s)]

        counts = rt.smap.counts()
        migration = rt.migration
        change = rt.fleet.plan(cfg, keep=lambda inst: counts.get(inst.name, 0) > 0)
        readded = [name for name in self._retiring if cfg.instance(name) is not None]

        # -- the switch: no await from here to the end of the block -------------
        change.commit()
        rt.live.snap = Snapshot.of(cfg, adapter, change.fleet)
        rt.resolver.probe.configure(cfg)
        rt.budget.ratio = cfg.failover.retry_budget
        if self._on_apply is not None:
            self._on_apply(cfg)
        for name in change.removed:
            if name not in self._retiring:
                inst = change.fleet.get(name)
                assert inst is not None
                migration.set_state(name, AdminState.DRAINING)
                task = asyncio.create_task(self._retire(name), name=f"retire:{name}")
                self._retiring[name] = task
        for name in readded:
            self._retiring.pop(name).cancel()
            if change.fleet.get(name) is not None:
                migration.undrain(name)
        # -----------------------------------------------------------------------

        self._retire_pools(change.retired)
        for name in change.dropped:
            rt.events.add("instance_removed", instance=name, sessions=0)
        await self._adjust_discovery(old, cfg)

        result.added = change.added
        result.removed = change.removed
        result.dropped = change.dropped
        result.readdressed = change.readdressed
        result.updated = change.updated
        result.repooled = change.repooled
        result.readded = readded
        result.changed = bool(
            change.changed or readded or result.adapter_changed or result.settings
        )
        return result

    async def _adjust_discovery(self, old: RouterConfig, new: RouterConfig) -> None:
        if old.discovery.interval != new.discovery.interval:
            await self.rt.discovery.reschedule()

    async def _record(self, result: ReloadResult) -> None:
        rt = self.rt
        if result.ok:
            self.applied += 1
            self.loaded_at = time.time()
            CONFIG_RELOADS.labels(result="success").inc()
            CONFIG_LAST_RELOAD_SUCCESS.set(1)
            CONFIG_LAST_RELOAD_TIME.set(self.loaded_at)
            summary = _summary(result)
            rt.events.add(
                "config_reload",
                ok=True,
                cause=result.cause,
                changed=result.changed,
                added=result.added,
                removed=result.removed + result.dropped,
                restart_required=result.restart_required,
            )
            log.warning("config reloaded (%s) from %s: %s", result.cause, result.source, summary)
            if result.restart_required:
                log.warning(
                    "config: %s changed in %s but cannot change while running: "
                    "the running values stay until the router restarts",
                    ", ".join(result.restart_required),
                    result.source,
                )
        else:
            CONFIG_RELOADS.labels(result="failure").inc()
            CONFIG_LAST_RELOAD_SUCCESS.set(0)
            rt.events.add("config_reload", ok=False, cause=result.cause, error=result.error)
            log.error(
                "config reload (%s) rejected, keeping the config in force: %s",
                result.cause,
                result.error,
            )
        async with self._attempted:
            self.last = result
            self.attempts += 1
            self._attempted.notify_all()

    # -- removed instances --------------------------------------------------------

    async def _retire(self, name: str) -> None:
        """Empty the removed instance ``name``, then take it out of the fleet."""
        try:
            await self._retire_loop(name)
        finally:
            if self._retiring.get(name) is asyncio.current_task():
                del self._retiring[name]

    async def _retire_loop(self, name: str) -> None:
        delay = _RETRY_FIRST
        while True:
            rt = self.rt
            inst = rt.fleet.get(name)
            if inst is None:
                return
            if not rt.smap.counts().get(name, 0):
                break
            try:
                await self._empty(inst)
            except Exception:
                log.exception("migrating the sessions of removed instance %s failed", name)
            left = rt.smap.counts().get(name, 0)
            if not left:
                break
            log.warning(
                "removed instance %s still owns %d sessions: trying again in %.0fs",
                name,
                left,
                delay,
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, _RETRY_MAX)
        self._drop(name)

    async def _empty(self, inst: Instance) -> None:
        rt = self.rt
        if inst.healthy:
            job = await rt.migration.drain(inst.name)
            await job.wait()
            # Sessions nobody runs (the map was stale): bring them back elsewhere.
            stale = {f.session for f in job.failures if f.error == "not_running"}
            if stale:
                await self._recover(inst, stale, "session_missing")
        else:
            # Down: its sessions run nowhere reachable; failover restores them.
            await self._recover(inst, set(rt.smap.sessions_on(inst.name)), "owner_down")

    async def _recover(self, inst: Instance, sessions: set[str], reason: str) -> None:
        rt = self.rt
        gate = asyncio.Semaphore(max(1, rt.config.discovery.migrate_concurrency))

        async def one(session: str) -> None:
            async with gate:
                if rt.smap.peek(session) == inst.name:
                    await rt.failover.recover(session, inst, reason, exclude_failed=True)

        await asyncio.gather(*(one(s) for s in sorted(sessions)))

    def _drop(self, name: str) -> None:
        rt = self.rt
        inst = rt.fleet.get(name)
        if inst is None:
            return
        rt.live.snap = dataclasses.replace(rt.live.snap, fleet=rt.live.snap.fleet.without(name))
        rt.events.add("instance_removed", instance=name)
        log.warning("removed instance %s owns no session any more: left the fleet", name)
        self._retire_pools([inst.pools])

    # -- retired pools ------------------------------------------------------------

    def _retire_pools(self, pools: list[Pools]) -> None:
        if not pools:
            return
        if self._closed:
            task = asyncio.create_task(_close_all(pools))
        else:
            task = asyncio.create_task(self._close_when_idle(pools), name="retire-pools")
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _close_when_idle(self, pools: list[Pools]) -> None:
        try:
            grace = self.retire_grace
            if grace is None:
                grace = max(2.0, self.rt.resolver.probe.timeout + 1.0)
            # Requests that picked the old objects just before the switch
            # reach them within this (there is no event for "no one holds it").
            await asyncio.sleep(grace)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.retire_max
            while any(p.busy() for p in pools):
                if loop.time() >= deadline:
                    log.warning("closing retired upstream pools with connections still in use")
                    break
                await asyncio.sleep(_IDLE_POLL)
        finally:
            await _close_all(pools)

    # -- the file watch -----------------------------------------------------------

    async def _watch_loop(self, path: str, seen: tuple[int, int, int, int] | None) -> None:
        assert self.watch_interval
        while True:
            await asyncio.sleep(self.watch_interval)
            sig = _signature(path)
            if sig == seen:
                continue
            # Changing: wait until it holds still (an editor writing in parts).
            while True:
                await asyncio.sleep(self.debounce)
                again = _signature(path)
                if again == sig:
                    break
                sig = again
            seen = sig
            async with self._attempted:
                self.changes_seen += 1
                self._attempted.notify_all()
            if sig is None:
                log.warning("config file %s is gone; the config in force stays", path)
                continue
            if _digest(path) == self._tried:
                continue  # touched, not changed
            try:
                await self.reload("file")
            except Exception:
                log.exception("config reload after a change of %s failed", path)


async def _close_all(pools: list[Pools]) -> None:
    for p in pools:
        try:
            await p.close()
        except Exception:
            log.exception("closing a retired upstream pool failed")


def _summary(result: ReloadResult) -> str:
    parts: list[str] = []
    for label, names in (
        ("added", result.added),
        ("removing", result.removed),
        ("removed", result.dropped),
        ("readdressed", result.readdressed),
        ("kept", result.readded),
        ("new pools", result.repooled),
    ):
        if names:
            parts.append(f"{label} {', '.join(names)}")
    if result.updated:
        parts.append(
            "updated "
            + ", ".join(f"{n} ({'/'.join(f)})" for n, f in sorted(result.updated.items()))
        )
    if result.adapter_changed:
        parts.append("new adapter")
    if result.settings:
        parts.append(f"changed {', '.join(result.settings)}")
    return "; ".join(parts) if parts else "no change"
