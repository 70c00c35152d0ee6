"""``session-router demo``: a real fleet on one machine, so something real happens.

Starts one simulated WAHA instance process per instance of the demo config
(sharing an auth directory, as a shared volume would in production), then
the router on its embedded memory store, creates a session through it and
prints what the README's story needs: a ready-to-paste ``curl``, each
instance's name, port and PID (to kill the owner), and the ``export`` line
for the admin CLI. Ports come from the config, from ``--base-port`` (router
on BASE, instances on BASE+1...) or from the OS (``--free-ports``); a busy
one is a one-line error. The temporary folder goes when the demo stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import shlex
import shutil
import socket
import sys
import tempfile
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import aiohttp

from router.config import InstanceConfig, ListenConfig, RouterConfig
from router.config_loader import load
from router.server import Server

DEMO_SESSION = "demo"


class DemoError(Exception):
    """Why the demo cannot start, in one line."""


def _default_config_path() -> Path:
    for candidate in (
        Path("config/demo.yaml"),
        Path(__file__).resolve().parent.parent / "config" / "demo.yaml",
    ):
        if candidate.is_file():
            return candidate
    raise DemoError("config/demo.yaml not found; pass --config")


def _port_of(url: str) -> int:
    return urlsplit(url).port or 80


def _with_port(url: str, port: int) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"{parts.hostname}:{port}"))


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _check_free(host: str, port: int, what: str) -> None:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            raise DemoError(
                f"port {port} ({what}) is in use; pick other ports with "
                "--base-port 18080 or let the system choose with --free-ports"
            ) from None


def plan_ports(
    config: RouterConfig, *, port: int | None, base_port: int | None, free_ports: bool
) -> RouterConfig:
    """The demo config with the ports asked for, every one checked free."""
    host = config.listen.host
    router_port = config.listen.port
    inst_ports = [_port_of(i.url) for i in config.instances]
    if free_ports:
        router_port = _free_port(host)
        inst_ports = [_free_port("127.0.0.1") for _ in config.instances]
    elif base_port is not None:
        router_port = base_port
        inst_ports = [base_port + 1 + n for n in range(len(config.instances))]
    if port is not None:
        router_port = port
    _check_free(host, router_port, "router")
    for inst, p in zip(config.instances, inst_ports, strict=True):
        _check_free("127.0.0.1", p, f"instance {inst.name}")
    instances = tuple(
        dataclasses.replace(inst, url=_with_port(inst.url, p))
        for inst, p in zip(config.instances, inst_ports, strict=True)
    )
    return dataclasses.replace(config, listen=ListenConfig(host, router_port), instances=instances)


async def _start_simulator(
    inst: InstanceConfig, auth_dir: Path, record: Path, log: Path
) -> asyncio.subprocess.Process:
    args = [
        sys.executable,
        "-m",
        "router.simulator",
        "--dialect",
        "waha",
        "--name",
        inst.name,
        "--host",
        "127.0.0.1",
        "--port",
        str(_port_of(inst.url)),
        "--auth-dir",
        str(auth_dir),
        "--record",
        str(record),
        "--start-delay",
        "0.5",
    ]
    if inst.api_key:
        args += ["--api-key", inst.api_key]
    with log.open("ab") as sink:
        proc = await asyncio.create_subprocess_exec(
            *args, stdout=asyncio.subprocess.PIPE, stderr=sink
        )
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), timeout=20)
    if b"SIMULATOR READY" not in line:
        raise DemoError(f"simulator {inst.name} did not start: {_last_line(log)}")
    return proc


def _last_line(log: Path) -> str:
    lines = log.read_text(errors="replace").strip().splitlines()
    return lines[-1] if lines else "no output"


async def _create_demo_session(base: str, router_key: str | None) -> None:
    headers = {"X-Api-Key": router_key} if router_key else {}
    async with aiohttp.ClientSession(headers=headers) as http:
        async with http.post(f"{base}/api/sessions", json={"name": DEMO_SESSION}) as resp:
            if resp.status not in (200, 201, 422):
                raise DemoError(f"creating the demo session failed: {resp.status}")
        for _ in range(100):
            async with http.get(f"{base}/api/sessions/{DEMO_SESSION}") as resp:
                if resp.status == 200 and (await resp.json()).get("status") == "WORKING":
                    return
            await asyncio.sleep(0.1)
    raise DemoError("the demo session did not become ready")


def _story(
    config: RouterConfig,
    base: str,
    owner: str | None,
    pids: dict[str, int],
    record: Path,
) -> str:
    key = config.api_keys[0].key if config.api_keys else None
    body = json.dumps({"session": DEMO_SESSION, "chatId": "123@c.us", "text": "hello"})
    key_header = f" -H {shlex.quote('X-Api-Key: ' + key)}" if key else ""
    rows = "\n".join(
        (
            f"  {inst.name:<6} {inst.url:<24} pid {pids[inst.name]:<8}"
            + ("  <- owns 'demo'" if inst.name == owner else "")
        ).rstrip()
        for inst in config.instances
    )
    lines = [
        f"\nwa-session-router demo: {len(pids)} simulated WAHA instances behind {base}",
        "",
        rows,
        "",
        "Send a message through the router (sends are recorded in " + str(record) + "):",
        f"  curl -s {base}/api/sendText -H 'Content-Type: application/json'"
        f"{key_header} -d {shlex.quote(body)}",
    ]
    if owner in pids:
        lines += [
            "",
            "Kill the owner, send again, and watch the session move (once, no duplicate):",
            f"  kill -9 {pids[owner]}",
        ]
    if config.admin_key:
        lines += [
            "",
            "The admin CLI (in another shell, from this folder):",
            f"  export WA_ROUTER_URL={base} WA_ROUTER_ADMIN_KEY={config.admin_key}",
            "  ./dev router status",
            f"Dashboard: {base}/dashboard?key={config.admin_key}",
        ]
    lines += [
        f"Metrics:   {base}/metrics   (wa_router_failovers_total after a kill)",
        "Ctrl-C stops the demo.",
    ]
    return "\n".join(lines)


async def run_demo(
    config_path: str | None,
    port: int | None,
    *,
    base_port: int | None = None,
    free_ports: bool = False,
) -> int:
    config = load(config_path or str(_default_config_path()))
    config = plan_ports(config, port=port, base_port=base_port, free_ports=free_ports)
    workdir = Path(tempfile.mkdtemp(prefix="wa-router-demo-"))
    (workdir / "auth").mkdir()
    record = workdir / "sent.jsonl"
    procs: dict[str, asyncio.subprocess.Process] = {}
    server = Server(config)
    try:
        for inst in config.instances:
            procs[inst.name] = await _start_simulator(
                inst, workdir / "auth", record, workdir / f"{inst.name}.log"
            )
        await server.startup()
        base = f"http://{config.listen.host}:{server.port}"
        await _create_demo_session(base, config.api_keys[0].key if config.api_keys else None)
        owner = server.runtime.smap.cached(DEMO_SESSION) if server.runtime else None
        pids = {name: proc.pid for name, proc in procs.items()}
        print(_story(config, base, owner, pids, record), flush=True)
        await server.serve()
    finally:
        await server.shutdown()
        for proc in procs.values():
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            await proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0
