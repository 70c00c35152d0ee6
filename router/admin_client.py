"""The CLI side of the admin API: ``session-router status|instances|drain|undrain|
maintenance|move|sessions|pin|unpin|reload``.

Talks to a running router over HTTP: ``--url`` (env ``WA_ROUTER_URL``,
default ``http://127.0.0.1:8080``) and ``--admin-key`` (env
``WA_ROUTER_ADMIN_KEY``). Exit status: 0 done, 1 the operation failed (a
move failed, a drain left sessions behind), 2 the request could not be made
(unreachable router, bad key, admin API disabled, unknown instance).
``status`` exits 1 when no instance is healthy; ``reload`` exits 1 when the
router rejected the file (the reason, ``file:line: reason``, on stderr).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO
from urllib.parse import quote

import aiohttp

DEFAULT_URL = "http://127.0.0.1:8080"
URL_ENV = "WA_ROUTER_URL"
KEY_ENV = "WA_ROUTER_ADMIN_KEY"

OK, FAILED, ERROR = 0, 1, 2
# Seconds each drain status request waits server-side for completion.
_POLL_WAIT = 2.0


class AdminError(Exception):
    """The admin request could not be made or was refused (exit status 2)."""


class AdminClient:
    def __init__(self, url: str, key: str | None, *, timeout: float = 60.0) -> None:
        self.url = url.rstrip("/")
        self.key = key
        self.timeout = timeout

    async def call(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, Any]]:
        headers = {"X-Admin-Key": self.key} if self.key else {}
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout)) as http,
                http.request(
                    method, self.url + path, json=body, params=params, headers=headers
                ) as resp,
            ):
                text = await resp.text()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise AdminError(f"cannot reach the router at {self.url}: {exc or type(exc)}") from None
        try:
            data = json.loads(text) if text else {}
        except ValueError:
            data = {}
        if not isinstance(data, dict):
            data = {"value": data}
        if status == 401:
            raise AdminError("admin key rejected (use --admin-key or $" + KEY_ENV + ")")
        if status == 404 and data.get("error") == "not_found":
            raise AdminError(f"{data.get('message', 'not found')} at {self.url}")
        return status, data


def _fail(data: dict[str, Any]) -> str:
    return str(data.get("message") or data.get("detail") or data.get("error") or data)


def _print_drain(job: dict[str, Any], out: TextIO) -> None:
    print(
        f"drain of {job['instance']} {job['state']}: {job['moved']} moved, "
        f"{job['failed']} failed, {job['skipped']} gone by other means, "
        f"{job['total']} in all ({job['seconds']:.1f}s)",
        file=out,
    )
    for f in job.get("failures", []):
        print(f"  {f['session']}: {f['error']} {f.get('detail', '')}".rstrip(), file=out)


async def drain(client: AdminClient, name: str, *, wait: bool, within: float) -> int:
    path = f"/admin/instances/{quote(name, safe='')}/drain"
    status, data = await client.call("POST", path, params={"wait": str(_POLL_WAIT)})
    if status not in (200, 202):
        raise AdminError(f"cannot drain {name}: {_fail(data)}")
    if not wait:
        print(f"{name}: draining ({data['total']} sessions so far); follow with GET {path}")
        return OK
    deadline = time.monotonic() + within
    last = None
    while not data.get("done"):
        progress = (data["moved"], data["failed"], data["total"])
        if progress != last:
            print(f"{name}: {data['moved']}/{data['total']} moved, {data['failed']} failed")
            last = progress
        if time.monotonic() >= deadline:
            print(f"{name}: still draining after {within:.0f}s; not waiting any longer")
            return FAILED
        status, data = await client.call("GET", path, params={"wait": str(_POLL_WAIT)})
        if status != 200:
            raise AdminError(f"cannot follow the drain of {name}: {_fail(data)}")
    _print_drain(data, sys.stdout if data["failed"] == 0 else sys.stderr)
    return OK if data["failed"] == 0 and data["state"] == "done" else FAILED


async def set_state(client: AdminClient, name: str, action: str) -> int:
    status, data = await client.call("POST", f"/admin/instances/{quote(name, safe='')}/{action}")
    if status != 200:
        raise AdminError(f"cannot {action} {name}: {_fail(data)}")
    print(f"{data['name']}: {data['admin']} ({data['sessions']} sessions)")
    return OK


async def move(client: AdminClient, session: str, to: str) -> int:
    path = f"/admin/sessions/{quote(session, safe='')}/move"
    status, data = await client.call("POST", path, body={"to": to})
    if status == 200:
        if data["outcome"] == "already_there":
            print(f"{session} already runs on {data['target']}")
        else:
            print(f"moved {session}: {data['source']} -> {data['target']} in {data['seconds']}s")
        return OK
    if "outcome" in data:  # the move ran and failed
        print(
            f"move of {session} failed: {data['error']}: {data['detail']}".rstrip(": "),
            file=sys.stderr,
        )
        return FAILED
    raise AdminError(f"cannot move {session}: {_fail(data)}")


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


async def status(client: AdminClient) -> int:
    """The fleet as a table, after one line on the map and one on the config."""
    code, data = await client.call("GET", "/admin/instances")
    if code != 200:
        raise AdminError(f"cannot list instances: {_fail(data)}")
    insts = data["instances"]
    healthy = sum(1 for i in insts if i["healthy"])
    print(
        f"router {client.url}: {data['sessions']} sessions on {len(insts)} instances "
        f"({healthy} healthy), {data.get('orphans', 0)} orphans, "
        f"{data.get('duplicates', 0)} duplicates"
    )
    code, reload = await client.call("GET", "/admin/reload")
    if code == 200:
        line = f"config {reload.get('source') or '(built in code)'}"
        last = reload.get("last")
        if last is None:
            line += f", loaded {_when(reload['loaded_at'])}"
        elif last["ok"]:
            line += f", reloaded {_when(reload['loaded_at'])} ({last['cause']})"
            if last.get("restart_required"):
                line += f"; restart to apply {', '.join(last['restart_required'])}"
        else:
            line += f", LAST RELOAD REJECTED ({last['cause']}): {last['error']}"
        print(line)
    rows = [("INSTANCE", "URL", "HEALTHY", "STATE", "SESSIONS", "LOAD", "WEIGHT")]
    for i in insts:
        state = i["admin"] + (" (removed)" if i.get("removed") else "")
        rows.append(
            (
                i["name"],
                i["url"],
                "yes" if i["healthy"] else "NO",
                state,
                f"{i['sessions']}/{i['capacity']}",
                f"{i['load']:.0%}",
                f"{i['weight']:g}",
            )
        )
    _table(rows)
    return OK if healthy else FAILED


def _table(rows: Sequence[tuple[str, ...]]) -> None:
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())


async def reload(client: AdminClient) -> int:
    code, data = await client.call("POST", "/admin/reload")
    if code == 422:
        print(f"config rejected, the router keeps its config: {data['message']}", file=sys.stderr)
        return FAILED
    if code != 200:
        raise AdminError(f"cannot reload: {_fail(data)}")
    parts = []
    for key in ("added", "removed", "dropped", "readdressed", "repooled", "readded"):
        if data.get(key):
            parts.append(f"{key} {', '.join(data[key])}")
    if data.get("updated"):
        parts.append("updated " + ", ".join(sorted(data["updated"])))
    if data.get("adapter_changed"):
        parts.append("new adapter")
    if data.get("settings"):
        parts.append("changed " + ", ".join(data["settings"]))
    print(f"reloaded {data['source']}: {'; '.join(parts) if parts else 'no change'}")
    if data.get("restart_required"):
        print(
            f"restart the router to apply: {', '.join(data['restart_required'])}",
            file=sys.stderr,
        )
    return OK


async def sessions(
    client: AdminClient,
    *,
    q: str | None,
    prefix: str | None,
    instance: str | None,
    limit: int,
    every: bool,
) -> int:
    params = {"limit": str(min(limit, 1000))}
    for key, value in (("q", q), ("prefix", prefix), ("instance", instance)):
        if value:
            params[key] = value
    shown = 0
    while True:
        code, data = await client.call("GET", "/admin/sessions", params=params)
        if code != 200:
            raise AdminError(f"cannot list sessions: {_fail(data)}")
        for row in data["sessions"]:
            if not every and shown >= limit:
                break
            suffix = "\tpinned" if row["pinned"] else ""
            print(f"{row['session']}\t{row['instance']}{suffix}")
            shown += 1
        cursor = data.get("next_cursor")
        if cursor is None or (not every and shown >= limit):
            break
        params["cursor"] = cursor
    if cursor is not None and not every:
        print(f"(more: --all, or --limit above {limit})", file=sys.stderr)
    return OK


async def pin(client: AdminClient, session: str, instance: str | None) -> int:
    path = f"/admin/sessions/{quote(session, safe='')}/pin"
    code, data = await client.call("POST", path, body={"instance": instance} if instance else {})
    if code == 409 and data.get("error") == "not_running":
        print(f"cannot pin {session}: {_fail(data)}", file=sys.stderr)
        return FAILED
    if code != 200:
        raise AdminError(f"cannot pin {session}: {_fail(data)}")
    print(f"{session} pinned to {data['instance']} ({data['status']})")
    return OK


async def unpin(client: AdminClient, session: str) -> int:
    code, data = await client.call("DELETE", f"/admin/sessions/{quote(session, safe='')}/pin")
    if code != 200:
        raise AdminError(f"cannot unpin {session}: {_fail(data)}")
    print(f"{session} {'unpinned' if data['was_pinned'] else 'was not pinned'}")
    return OK


async def instances(client: AdminClient) -> int:
    status, data = await client.call("GET", "/admin/instances")
    if status != 200:
        raise AdminError(f"cannot list instances: {_fail(data)}")
    rows = [("NAME", "HEALTH", "STATE", "SESSIONS", "LOAD", "URL")]
    for i in data["instances"]:
        rows.append(
            (
                i["name"],
                "up" if i["healthy"] else "DOWN",
                i["admin"],
                f"{i['sessions']}/{i['capacity']}",
                f"{i['load']:.0%}",
                i["url"],
            )
        )
    _table(rows)
    return OK


def add_arguments(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The admin subcommands, for ``router.cli``."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url",
        default=os.environ.get(URL_ENV, DEFAULT_URL),
        help=f"router base URL (default ${URL_ENV} or {DEFAULT_URL})",
    )
    common.add_argument(
        "--admin-key",
        default=os.environ.get(KEY_ENV),
        help=f"the router's admin_key (default ${KEY_ENV})",
    )

    p = sub.add_parser(
        "drain", parents=[common], help="move every session off an instance, then keep it empty"
    )
    p.add_argument("name", help="instance name")
    p.add_argument(
        "--no-wait", dest="wait", action="store_false", help="start the drain and return"
    )
    p.add_argument(
        "--timeout", type=float, default=3600.0, help="stop waiting after this many seconds"
    )
    p.set_defaults(func=run, action="drain")

    p = sub.add_parser("undrain", parents=[common], help="let an instance take new sessions again")
    p.add_argument("name", help="instance name")
    p.set_defaults(func=run, action="undrain")

    p = sub.add_parser(
        "maintenance", parents=[common], help="no new sessions on an instance; keep its own"
    )
    p.add_argument("name", help="instance name")
    p.set_defaults(func=run, action="maintenance")

    p = sub.add_parser("move", parents=[common], help="move one session to a named instance")
    p.add_argument("session", help="session id")
    p.add_argument("--to", required=True, help="target instance name")
    p.set_defaults(func=run, action="move")

    p = sub.add_parser("instances", parents=[common], help="list instances, health and load")
    p.set_defaults(func=run, action="instances")

    p = sub.add_parser(
        "status", parents=[common], help="the fleet as a table, the map and the config"
    )
    p.set_defaults(func=run, action="status")

    p = sub.add_parser(
        "reload", parents=[common], help="make a running router reload its config file"
    )
    p.set_defaults(func=run, action="reload")

    p = sub.add_parser("sessions", parents=[common], help="list or search the session map")
    p.add_argument("--q", help="case-insensitive substring of the session id")
    p.add_argument("--prefix", help="session id prefix")
    p.add_argument("--instance", help="only sessions on this instance")
    p.add_argument("--limit", type=int, default=100, help="at most this many (default 100)")
    p.add_argument("--all", dest="every", action="store_true", help="every match, page by page")
    p.set_defaults(func=run, action="sessions")

    p = sub.add_parser(
        "pin", parents=[common], help="map a session to the instance it runs on; no rebalancing"
    )
    p.add_argument("session", help="session id")
    p.add_argument("--instance", help="where it runs (default: where it is mapped)")
    p.set_defaults(func=run, action="pin")

    p = sub.add_parser("unpin", parents=[common], help="let rebalancing move a session again")
    p.add_argument("session", help="session id")
    p.set_defaults(func=run, action="unpin")


async def _dispatch(ns: argparse.Namespace) -> int:
    client = AdminClient(ns.url, ns.admin_key)
    if ns.action == "drain":
        return await drain(client, ns.name, wait=ns.wait, within=ns.timeout)
    if ns.action in ("undrain", "maintenance"):
        return await set_state(client, ns.name, ns.action)
    if ns.action == "move":
        return await move(client, ns.session, ns.to)
    if ns.action == "status":
        return await status(client)
    if ns.action == "reload":
        return await reload(client)
    if ns.action == "sessions":
        return await sessions(
            client,
            q=ns.q,
            prefix=ns.prefix,
            instance=ns.instance,
            limit=ns.limit,
            every=ns.every,
        )
    if ns.action == "pin":
        return await pin(client, ns.session, ns.instance)
    if ns.action == "unpin":
        return await unpin(client, ns.session)
    return await instances(client)


def run(ns: argparse.Namespace) -> int:
    try:
        return asyncio.run(_dispatch(ns))
    except AdminError as exc:
        print(f"session-router {ns.action}: {exc}", file=sys.stderr)
        return ERROR
    except KeyboardInterrupt:
        return ERROR
