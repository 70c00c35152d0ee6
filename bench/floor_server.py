"""The floor for any aiohttp-served router: aiohttp's low-level server on uvloop
answering every request with nginx's 36-byte JSON, no routing, no upstream.

    .venv/bin/python bench/floor_server.py PORT

``bench/run.py`` adds it to the same peers.sh run as ``aiohttp-floor``: the
router's figures minus these are what routing and the upstream hop cost on
top of the server framework the router is built on.
"""

from __future__ import annotations

import asyncio
import sys

from aiohttp import web

from router.server import install_uvloop

BODY = b'{"id":"true_123@c.us_ABC","ok":true}'


async def handle(request: web.BaseRequest) -> web.Response:
    await request.read()
    return web.Response(body=BODY, content_type="application/json")


async def main(port: int) -> None:
    runner = web.ServerRunner(web.Server(handle, access_log=None))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
    print(f"FLOOR READY {port}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    install_uvloop()
    asyncio.run(main(int(sys.argv[1])))
