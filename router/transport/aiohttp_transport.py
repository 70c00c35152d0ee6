"""``Transport`` over an ``aiohttp.ClientSession``: for what the fast path does not cover.

Used for ``https://`` upstreams and base URLs with credentials. The session
is the instance's own (``router.instances.make_http_session``: no
decompression, no cookies, no automatic headers, idle sockets closed before
Node's keep-alive timeout), the same one the WebSocket proxy and the
adapters' management calls use.

aiohttp does not say whether a failed request had left the socket, so its
errors map conservatively: a connector error (refused, DNS, TLS, connect or
pool timeout) is ``ConnectFailed``; anything after that is
``UpstreamDisconnected`` / ``UpstreamTimeout`` with ``request_sent=True``.
It never raises ``StaleConnection``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
from yarl import URL

from router.transport.base import (
    BadResponse,
    Body,
    ConnectFailed,
    HeaderItems,
    Transport,
    UpstreamDisconnected,
    UpstreamError,
    UpstreamResponse,
    UpstreamTimeout,
    header_items,
)

__all__ = ["AiohttpResponse", "AiohttpTransport", "map_client_error"]


def map_client_error(exc: BaseException, *, response_started: bool = False) -> UpstreamError:
    """The ``UpstreamError`` for an aiohttp / socket error."""
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return ConnectFailed(f"connect timed out: {exc}", timeout=True)
    if isinstance(exc, aiohttp.ClientConnectorError):
        return ConnectFailed(f"cannot connect: {exc}")
    if isinstance(exc, TimeoutError):  # SocketTimeoutError, ServerTimeoutError
        return UpstreamTimeout(f"no answer in time: {exc!r}", request_sent=True)
    if isinstance(exc, aiohttp.ClientResponseError):
        return BadResponse(f"invalid response: {exc}")
    return UpstreamDisconnected(
        f"connection broke: {exc!r}", request_sent=True, response_started=response_started
    )


_MAPPED = (aiohttp.ClientError, OSError, TimeoutError)


class AiohttpResponse(UpstreamResponse):
    __slots__ = ("_up", "content_length", "headers", "reason", "status")

    def __init__(self, up: aiohttp.ClientResponse) -> None:
        self._up = up
        self.status = up.status
        self.reason = up.reason or ""
        self.headers = list(up.headers.items())
        self.content_length = up.content_length

    async def read(self) -> bytes:
        try:
            return await self._up.read()
        except _MAPPED as exc:
            raise map_client_error(exc, response_started=True) from exc

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._up.content.iter_any():
                yield chunk
        except _MAPPED as exc:
            raise map_client_error(exc, response_started=True) from exc

    def release(self) -> None:
        self._up.release()

    def close(self) -> None:
        self._up.close()


class AiohttpTransport(Transport):
    """Requests to ``base_url`` through ``session`` (which this transport does not own
    unless ``owns_session``)."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        *,
        owns_session: bool = False,
    ) -> None:
        self.session = session
        self._base = base_url.rstrip("/")
        self._owns = owns_session

    async def request(
        self,
        method: str,
        path_qs: str,
        headers: HeaderItems,
        body: Body = None,
        *,
        read_timeout: float | None = None,
    ) -> UpstreamResponse:
        url = URL(self._base + path_qs, encoded=True)
        timeout = self.session.timeout
        if read_timeout is not None:
            timeout = aiohttp.ClientTimeout(
                total=None, connect=timeout.connect, sock_read=read_timeout
            )
        try:
            up = await self.session.request(
                method,
                url,
                headers=list(header_items(headers)),
                data=body,
                allow_redirects=False,
                timeout=timeout,
            )
        except _MAPPED as exc:
            raise map_client_error(exc) from exc
        return AiohttpResponse(up)

    async def close(self) -> None:
        if self._owns:
            await self.session.close()
