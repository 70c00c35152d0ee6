"""``session-router webhooks ...``: dead letters of a running router, through its admin API.

    session-router webhooks dead-letters -c router.yaml [--target T] [--limit N] [--json]
    session-router webhooks dead-letters -c router.yaml ID          # one, with its body
    session-router webhooks replay -c router.yaml ID [ID ...] | --all [--target T]
    session-router webhooks purge  -c router.yaml ID [ID ...] | --all [--target T] [--before UNIX]
    session-router webhooks stats  -c router.yaml

The router's address and admin key come from ``--url`` and ``--admin-key``,
else from the config file given with ``-c`` (``listen``, ``admin_key``), else
from ``$WA_ROUTER_URL`` and ``$WA_ROUTER_ADMIN_KEY`` (the names every admin
command reads), else ``http://127.0.0.1:8080`` without a key.
Going through the running router works the same for both backends (the
SQLite file is locked by the router that owns it).

Wiring: ``add_arguments(subparsers)`` adds the ``webhooks`` command.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from typing import Any
from urllib.parse import quote

import aiohttp

from router.admin_client import DEFAULT_URL, KEY_ENV, URL_ENV

__all__ = ["add_arguments", "run"]


def add_arguments(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``webhooks`` and its sub-commands to a ``parser.add_subparsers()`` object."""
    wh: argparse.ArgumentParser = subparsers.add_parser(
        "webhooks", help="inspect, replay and purge webhook dead letters of a running router"
    )
    sub = wh.add_subparsers(dest="webhooks_command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("-c", "--config", help="router config file (address and admin_key)")
        p.add_argument("--url", help=f"router base URL (default: ${URL_ENV}, or from -c)")
        p.add_argument(
            "--admin-key", help=f"admin key (default: ${KEY_ENV}, or the config's admin_key)"
        )
        p.add_argument("--timeout", type=float, default=30.0, help="seconds (default 30)")

    ls = sub.add_parser("dead-letters", help="list dead letters, or show one with its body")
    common(ls)
    ls.add_argument("id", nargs="?", help="show this dead letter (with body)")
    ls.add_argument("--target", help="only this target")
    ls.add_argument("--limit", type=int, default=100, help="at most this many (default 100)")
    ls.add_argument("--after", help="continue after this id (paging)")
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.set_defaults(func=run)

    rp = sub.add_parser("replay", help="queue dead letters for delivery again")
    common(rp)
    rp.add_argument("ids", nargs="*", help="dead letter ids")
    rp.add_argument("--all", action="store_true", help="replay every dead letter")
    rp.add_argument("--target", help="with --all: only this target")
    rp.set_defaults(func=run)

    pg = sub.add_parser("purge", help="delete dead letters")
    common(pg)
    pg.add_argument("ids", nargs="*", help="dead letter ids")
    pg.add_argument("--all", action="store_true", help="delete every (matching) dead letter")
    pg.add_argument("--target", help="with --all: only this target")
    pg.add_argument("--before", type=float, help="with --all: only dead before this unix time")
    pg.set_defaults(func=run)

    st = sub.add_parser("stats", help="backlog and dead-letter counts")
    common(st)
    st.set_defaults(func=run)
    return wh


def _endpoint(ns: argparse.Namespace) -> tuple[str, str | None]:
    url: str | None = ns.url
    key: str | None = ns.admin_key
    if ns.config:
        from router.config_loader import load

        cfg = load(ns.config)
        if url is None:
            host = cfg.listen.host
            if host in ("0.0.0.0", "::", ""):
                host = "127.0.0.1"
            if ":" in host:
                host = f"[{host}]"
            url = f"http://{host}:{cfg.listen.port}"
        if key is None:
            key = cfg.admin_key
    url = url or os.environ.get(URL_ENV) or DEFAULT_URL
    return url.rstrip("/"), key or os.environ.get(KEY_ENV)


async def _call(
    method: str, url: str, key: str | None, seconds: float, params: dict[str, str] | None = None
) -> tuple[int, Any]:
    headers = {"X-Admin-Key": key} if key else {}
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=seconds)) as http,
        http.request(method, url, headers=headers, params=params) as resp,
    ):
        try:
            data = await resp.json(content_type=None)
        except ValueError:
            data = {"error": "bad_answer", "message": (await resp.text())[:200]}
        return resp.status, data


def _fmt_time(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


async def _run(ns: argparse.Namespace) -> int:
    base, key = _endpoint(ns)
    api = f"{base}/admin/webhooks"
    cmd = ns.webhooks_command
    out = sys.stdout

    def fail(status: int, data: Any) -> int:
        msg = data.get("message") if isinstance(data, dict) else data
        print(f"error: HTTP {status}: {msg}", file=sys.stderr)
        return 1

    if cmd == "stats":
        status, data = await _call("GET", f"{api}/stats", key, ns.timeout)
        if status != 200:
            return fail(status, data)
        print(json.dumps(data, indent=2), file=out)
        return 0

    if cmd == "dead-letters":
        if ns.id:
            status, data = await _call(
                "GET", f"{api}/dead-letters/{quote(ns.id, safe='')}", key, ns.timeout
            )
            if status != 200:
                return fail(status, data)
            body = data.get("body")
            if isinstance(body, str):
                with contextlib.suppress(ValueError):  # a JSON body shown as JSON
                    data["body"] = json.loads(body)
            print(json.dumps(data, indent=2), file=out)
            return 0
        params = {"limit": str(ns.limit)}
        if ns.target:
            params["target"] = ns.target
        if ns.after:
            params["after"] = ns.after
        status, data = await _call("GET", f"{api}/dead-letters", key, ns.timeout, params)
        if status != 200:
            return fail(status, data)
        if ns.json:
            print(json.dumps(data, indent=2), file=out)
            return 0
        items = data.get("dead_letters", [])
        if not items:
            print("no dead letters", file=out)
            return 0
        for d in items:
            print(
                f"{d['id']}  {_fmt_time(d['dead_at'])}  {d['target']}  {d['type']}"
                f"  session={d['session'] or '-'}  instance={d['instance']}"
                f"  rounds={d['rounds']}  {d['reason']}",
                file=out,
            )
        if data.get("next"):
            print(f"(more: --after {data['next']})", file=out)
        return 0

    if not ns.ids and not ns.all:
        print("error: give dead letter ids, or --all", file=sys.stderr)
        return 2
    if ns.ids and ns.all:
        print("error: give ids or --all, not both", file=sys.stderr)
        return 2

    async def each(method: str, suffix: str, done: str) -> int:
        """The action on every id given; non-zero if any one failed."""
        rc = 0
        for i in ns.ids:
            status, data = await _call(
                method, f"{api}/dead-letters/{quote(i, safe='')}{suffix}", key, ns.timeout
            )
            if status == 200:
                print(f"{done} {i}", file=out)
            else:
                rc = fail(status, data)
        return rc

    if cmd == "replay":
        if ns.all:
            status, data = await _call(
                "POST",
                f"{api}/dead-letters/replay",
                key,
                ns.timeout,
                {"target": ns.target} if ns.target else None,
            )
            if status != 200:
                return fail(status, data)
            print(f"replayed {data['replayed']}", file=out)
            return 0
        return await each("POST", "/replay", "replayed")

    # purge
    if ns.all:
        params = {}
        if ns.target:
            params["target"] = ns.target
        if ns.before is not None:
            params["before"] = repr(ns.before)
        status, data = await _call("DELETE", f"{api}/dead-letters", key, ns.timeout, params)
        if status != 200:
            return fail(status, data)
        print(f"purged {data['purged']}", file=out)
        return 0
    return await each("DELETE", "", "purged")


def run(ns: argparse.Namespace) -> int:
    """Entry point for the ``webhooks`` sub-commands (``ns.func``)."""
    from router.config import ConfigError

    try:
        return asyncio.run(_run(ns))
    except ConfigError as exc:
        print(f"config rejected: {exc}", file=sys.stderr)
        return 2
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        print(f"error: cannot reach the router: {exc}", file=sys.stderr)
        return 1
