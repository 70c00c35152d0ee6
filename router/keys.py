"""Comparing a presented credential with the configured ones: one way, everywhere.

Router keys, the admin key, the dashboard's cookie key: compared in constant
time (against every configured key, so the time says nothing about which
one, or how many, there are). Headers may hold undecodable bytes (aiohttp
keeps them as lone surrogates): they become bytes no valid key equals, never
an exception (a 500).
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Sequence

from aiohttp import web


def as_bytes(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


def matches(given: str | None, keys: Iterable[str]) -> bool:
    """Is ``given`` one of ``keys``? Every key is compared, in constant time."""
    if given is None:
        return False
    presented = as_bytes(given)
    found = False
    for key in keys:
        found |= hmac.compare_digest(presented, as_bytes(key))
    return found


def which(given: str | None, keys: Sequence[bytes]) -> int:
    """The index of ``given`` among ``keys`` (already ``as_bytes``), or -1.

    Like ``matches``, every key is compared in constant time and the loop
    never stops early nor branches on a comparison: the time says nothing
    about which key matched (so nothing about its scope), nor how many
    there are beyond their count.
    """
    if given is None:
        return -1
    presented = as_bytes(given)
    found = 0
    for index, key in enumerate(keys, 1):
        # An int, not an if: index * 0 or index * 1, the same work either way.
        found |= index * hmac.compare_digest(presented, key)
    return found - 1


def admin_key_of(request: web.BaseRequest) -> str | None:
    """The admin key a request presents: ``X-Admin-Key``, or ``Authorization: Bearer``."""
    given = request.headers.get("X-Admin-Key")
    if given is not None:
        return given
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip()
