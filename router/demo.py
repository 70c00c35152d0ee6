"""``session-router demo``: a real fleet on one machine, so something real happens.

Starts one simulated WAHA instance process per instance of the demo config
(sharing an auth directory, as a shared volume would in production), then
the router on its embedded memory store, creates a session through it and
prints a ready-to-paste ``curl``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import shlex
import sys
import tempfile
from pathlib import Path

import aiohttp

from router.config import ListenConfig, RouterConfig
from router.server import Server

DEMO_SESSION = "demo"


def _default_config_path() -> Path:
    for candidate in (
        Path("config/demo.yaml"),
        Path(__file__).resolve().parent.parent / "config" / "demo.yaml",
    ):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError("config/demo.yaml not found; pass --config")


async def _start_simulator(
    name: str, port: int, api_key: str | None, auth_dir: Path, record: Path
) -> asyncio.subprocess.Process:
    args = [
        sys.executable,
        "-m",
        "router.simulator",
        "--dialect",
        "waha",
        "--name",
        name,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--auth-dir",
        str(auth_dir),
        "--record",
        str(record),
        "--start-delay",
        "0.5",
    ]
    if api_key:
        args += ["--api-key", api_key]
    proc = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), timeout=20)
    if b"SIMULATOR READY" not in line:
        raise RuntimeError(f"simulator {name} did not start (port {port} busy?)")
    return proc


async def _create_demo_session(base: str, router_key: str | None) -> None:
    headers = {"X-Api-Key": router_key} if router_key else {}
    async with aiohttp.ClientSession(headers=headers) as http:
        async with http.post(f"{base}/api/sessions", json={"name": DEMO_SESSION}) as resp:
            if resp.status not in (200, 201, 422):
                raise RuntimeError(f"creating the demo session failed: {resp.status}")
        for _ in range(100):
            async with http.get(f"{base}/api/sessions/{DEMO_SESSION}") as resp:
                if resp.status == 200 and (await resp.json()).get("status") == "WORKING":
                    return
            await asyncio.sleep(0.1)
    raise RuntimeError("the demo session did not become ready")


async def run_demo(config_path: str | None, port: int | None) -> int:
    config = RouterConfig.load(config_path or str(_default_config_path()))
    if port is not None:
        config = dataclasses.replace(config, listen=ListenConfig(config.listen.host, port))
    workdir = Path(tempfile.mkdtemp(prefix="wa-router-demo-"))
    (workdir / "auth").mkdir()
    record = workdir / "sent.jsonl"
    procs: list[asyncio.subprocess.Process] = []
    server = Server(config)
    try:
        for inst in config.instances:
            sim_port = int(inst.url.rsplit(":", 1)[1].split("/")[0])
            procs.append(
                await _start_simulator(inst.name, sim_port, inst.api_key, workdir / "auth", record)
            )
        await server.startup()
        base = f"http://{config.listen.host}:{server.port}"
        key = config.api_keys[0] if config.api_keys else None
        await _create_demo_session(base, key)
        owner = server.runtime.smap.cached(DEMO_SESSION) if server.runtime else None
        body = json.dumps({"session": DEMO_SESSION, "chatId": "123@c.us", "text": "hello"})
        dashboard = (
            f"Dashboard: {base}/dashboard?key={config.admin_key}\n" if config.admin_key else ""
        )
        key_header = f" -H {shlex.quote('X-Api-Key: ' + key)}" if key else ""
        print(
            f"\nwa-session-router demo: {len(procs)} simulated WAHA instances behind {base}\n"
            f"session {DEMO_SESSION!r} runs on {owner}; sends are recorded in {record}\n\n"
            f"  curl -s {base}/api/sendText -H 'Content-Type: application/json'"
            f"{key_header} -d {shlex.quote(body)}\n\n"
            f"{dashboard}"
            f"Metrics: {base}/metrics\n"
            "Ctrl-C stops the demo.",
            flush=True,
        )
        await server.serve()
    finally:
        await server.shutdown()
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            await proc.wait()
    return 0
