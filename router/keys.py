"""Comparing a presented credential with the configured ones: one way, everywhere.

Router keys, the admin key, the dashboard's cookie key: compared in constant
time (against every configured key, so the time says nothing about which
one, or how many, there are). Headers may hold undecodable bytes (aiohttp
keeps them as lone surrogates): they become bytes no valid key equals, never
an exception (a 500).
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable

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


def admin_key_of(request: web.BaseRequest) -> str | None:
    """The admin key a request presents: ``X-Admin-Key``, or ``Authorization: Bearer``."""
    given = request.headers.get("X-Admin-Key")
    if given is not None:
        return given
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip()
