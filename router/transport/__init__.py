"""Upstream transports: how the proxy talks HTTP to one instance.

``base`` holds the interface and the error classes (with the rule for
replaying a request); ``fast`` the lean httptools keep-alive client used for
plain-HTTP instances; ``aiohttp_transport`` the same interface over an
``aiohttp.ClientSession`` for everything else (https, credentials in the URL).
``make_transport`` picks one for an instance.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import aiohttp

from router.config import InstanceConfig, RouterConfig
from router.transport.aiohttp_transport import AiohttpTransport
from router.transport.base import (
    IDEMPOTENT_METHODS,
    BadResponse,
    Body,
    ConnectFailed,
    HeaderItems,
    InstanceDown,
    StaleConnection,
    Transport,
    UpstreamDisconnected,
    UpstreamError,
    UpstreamResponse,
    UpstreamTimeout,
    error_kind,
)
from router.transport.fast import FastTransport

__all__ = [
    "IDEMPOTENT_METHODS",
    "AiohttpTransport",
    "BadResponse",
    "Body",
    "ConnectFailed",
    "FastTransport",
    "HeaderItems",
    "InstanceDown",
    "StaleConnection",
    "Transport",
    "UpstreamDisconnected",
    "UpstreamError",
    "UpstreamResponse",
    "UpstreamTimeout",
    "error_kind",
    "fast_transport_for",
    "make_transport",
]


def fast_transport_for(
    url: str,
    *,
    limit: int = 512,
    connect_timeout: float = 2.0,
    read_timeout: float = 30.0,
    idle_keepalive: float = 4.0,
) -> FastTransport | None:
    """A ``FastTransport`` for a plain ``http://host[:port][/prefix]`` URL, else None."""
    parts = urlsplit(url)
    if parts.scheme.lower() != "http" or not parts.hostname or parts.username is not None:
        return None
    if parts.query or parts.fragment:
        return None
    host = parts.hostname
    try:
        port = parts.port or 80
    except ValueError:
        return None
    netloc_host = f"[{host}]" if ":" in host else host
    return FastTransport(
        host,
        port,
        prefix=parts.path.rstrip("/"),
        host_header=netloc_host if port == 80 else f"{netloc_host}:{port}",
        limit=limit,
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        idle_keepalive=idle_keepalive,
    )


def make_transport(
    config: RouterConfig, inst: InstanceConfig, http: aiohttp.ClientSession
) -> Transport:
    """The transport for ``inst``: fast for plain HTTP, else over ``http`` (not owned)."""
    t = config.timeouts
    fast = fast_transport_for(
        inst.url,
        limit=config.limits.max_connections_per_instance,
        connect_timeout=t.connect,
        read_timeout=t.read,
        idle_keepalive=t.idle_keepalive,
    )
    if fast is not None:
        return fast
    return AiohttpTransport(http, inst.url)
