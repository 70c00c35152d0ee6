"""Build and run one simulated instance."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable

from aiohttp import web

from router.simulator import blazz, control, waha
from router.simulator.blazz_sessions import BlazzSessions
from router.simulator.context import SIM, SimContext
from router.simulator.faults import fault_middleware
from router.simulator.laravel import Laravel
from router.simulator.options import SimulatorOptions
from router.simulator.recorder import Recorder
from router.simulator.sessions import AuthStore, SessionRegistry

READY_PREFIX = "SIMULATOR READY"
# Big enough for base64 media in a WAHA sendImage body.
CLIENT_MAX_SIZE = 64 * 1024 * 1024


def build_app(opts: SimulatorOptions) -> web.Application:
    """An aiohttp application speaking ``opts.dialect``, plus ``/_sim/*``."""
    registry = SessionRegistry(
        opts.name, AuthStore(opts.auth_dir), opts.start_delay, opts.auto_auth
    )
    ctx = SimContext(opts, registry, Recorder(opts.name, opts.record), port=opts.port)
    outer = []
    if opts.dialect == "blazz":
        laravel = None
        if opts.laravel_url is not None:
            assert opts.hmac_secret is not None
            laravel = Laravel(
                opts.laravel_url, opts.hmac_secret, opts.api_key, lambda: ctx.port, opts.retry_scale
            )
        ctx.blazz = BlazzSessions(opts, laravel)
        outer = blazz.outer_middlewares(ctx)
    app = web.Application(
        middlewares=[*outer, fault_middleware(ctx.faults)], client_max_size=CLIENT_MAX_SIZE
    )
    app[SIM] = ctx
    control.setup(app)
    (waha if opts.dialect == "waha" else blazz).setup(app)
    app.on_startup.append(_on_startup)
    app.on_shutdown.append(_on_shutdown)
    app.on_cleanup.append(_on_cleanup)
    return app


async def _on_startup(app: web.Application) -> None:
    app[SIM].recorder.open()


async def _on_shutdown(app: web.Application) -> None:
    for ws in list(app[SIM].websockets):
        await ws.close(code=1001, message=b"server shutdown")


async def _on_cleanup(app: web.Application) -> None:
    ctx = app[SIM]
    ctx.sessions.close()
    if ctx.blazz is not None:
        ctx.blazz.shutdown()  # graceful: every client destroyed, browsers killed
        if ctx.blazz.laravel is not None:
            await ctx.blazz.laravel.close()
    ctx.recorder.close()


def _url(sockname: tuple[str, int] | tuple[str, int, int, int]) -> str:
    host, port = sockname[0], sockname[1]
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def _watch_parent(parent_pid: int, stop: Callable[[], None]) -> None:
    # Polling: there is no event for "my parent died" short of prctl.
    while True:
        await asyncio.sleep(0.5)
        if os.getppid() != parent_pid:
            stop()
            return


async def serve(opts: SimulatorOptions) -> None:
    """Listen, print the READY line, run until SIGTERM/SIGINT (or the parent dies)."""
    runner = web.AppRunner(build_app(opts), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, opts.host, opts.port)
    await site.start()
    ctx = runner.app[SIM]
    ctx.port = runner.addresses[0][1]
    print(f"{READY_PREFIX} {_url(runner.addresses[0])}", flush=True)
    restoring = None
    if ctx.blazz is not None and ctx.blazz.laravel is not None:
        # Blazz, after listen(): create every session the main app lists.
        restoring = asyncio.create_task(ctx.blazz.restore_from_main_app())

    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    watcher = None
    if opts.parent_pid is not None:
        watcher = asyncio.create_task(_watch_parent(opts.parent_pid, stopping.set))
    try:
        await stopping.wait()
    finally:
        for task in (watcher, restoring):
            if task is not None:
                task.cancel()
        await runner.cleanup()


def run(opts: SimulatorOptions) -> None:
    """Blocking: serve ``opts`` until SIGTERM/SIGINT, on uvloop when available."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    with contextlib.suppress(ImportError):
        import uvloop

        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        try:
            runner.run(serve(opts))
        except OSError as exc:
            # Typically the port is taken: one line, not a traceback.
            print(
                f"simulator {opts.name}: cannot listen on {opts.host}:{opts.port}: "
                f"{exc.strerror or exc}",
                file=sys.stderr,
            )
            raise SystemExit(1) from None
