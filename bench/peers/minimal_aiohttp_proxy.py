"""A minimal session-hashing reverse proxy on aiohttp: the floor any Python router must beat.

    python bench/peers/minimal_aiohttp_proxy.py [PORT] [--uvloop]   # PORT defaults to 18300

What a reasonable person writes in an afternoon: one ``aiohttp.web`` server and
one ``aiohttp.ClientSession`` whose connector pools keep-alive connections to
the four static upstreams (127.0.0.1:18001-18004). The upstream is chosen by
the MD5 of the ``<session>`` segment of ``/api/<session>/...``; the request
body is streamed to it and its response streamed back, hop-by-hop headers
dropped both ways. No session map, health checks, retries, auth, metrics or
logging. Runs on asyncio's default loop unless ``--uvloop`` (peers.sh runs it
without, as in every earlier benchmark run).
"""

from __future__ import annotations

import argparse
import hashlib
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

UPSTREAMS = tuple(f"http://127.0.0.1:{port}" for port in (18001, 18002, 18003, 18004))
# RFC 9110 section 7.6.1: meaningful for one connection only, never forwarded.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
CLIENT = web.AppKey("client", aiohttp.ClientSession)


def upstream_for(path: str) -> str:
    """The upstream of ``/api/<session>/...``: MD5 of the session, modulo four."""
    parts = path.split("/", 3)
    session = parts[2] if len(parts) > 2 else ""
    digest = hashlib.md5(session.encode(), usedforsecurity=False).digest()
    return UPSTREAMS[int.from_bytes(digest, "big") % len(UPSTREAMS)]


async def proxy(request: web.Request) -> web.StreamResponse:
    url = upstream_for(request.path) + request.raw_path
    # Host is dropped too: the client sets the upstream's own.
    headers = [
        (name, value)
        for name, value in request.headers.items()
        if name.lower() not in HOP_BY_HOP and name.lower() != "host"
    ]
    body = request.content if request.body_exists else None
    response: web.StreamResponse | None = None
    try:
        async with request.app[CLIENT].request(
            request.method, url, headers=headers, data=body, allow_redirects=False
        ) as upstream:
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for name, value in upstream.headers.items():
                if name.lower() not in HOP_BY_HOP:
                    response.headers.add(name, value)
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response
    except ConnectionResetError:
        if response is not None and response.prepared:
            return response  # the client went away mid-response: nothing left to send
        raise
    except aiohttp.ClientError as exc:
        if response is not None and response.prepared:
            raise  # the status line is out: all that is left is to drop the connection
        return web.json_response({"error": f"upstream failed: {exc}"}, status=502)


async def client_session(app: web.Application) -> AsyncIterator[None]:
    connector = aiohttp.TCPConnector(limit=0)  # no cap: one pooled connection per request in flight
    # Bytes pass through as the upstream sent them: no decompression, and no
    # Accept/Accept-Encoding/User-Agent the client did not send itself.
    async with aiohttp.ClientSession(
        connector=connector,
        auto_decompress=False,
        skip_auto_headers=("Accept", "Accept-Encoding", "User-Agent"),
    ) as client:
        app[CLIENT] = client
        yield


def make_app() -> web.Application:
    app = web.Application()
    app.cleanup_ctx.append(client_session)
    app.router.add_route("*", "/{tail:.*}", proxy)
    return app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("port", type=int, nargs="?", default=18300)
    ap.add_argument("--uvloop", action="store_true", help="run on uvloop instead of asyncio's loop")
    ns = ap.parse_args()
    if ns.uvloop:
        import uvloop

        uvloop.install()
    web.run_app(make_app(), host="127.0.0.1", port=ns.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
