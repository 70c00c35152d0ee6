"""Per-client keys: which sessions a router key may reach.

An entry of ``api_keys`` may be limited to sessions, by exact name or
fnmatch pattern (``webjs_12_*``). With such a key a client reaches only
those sessions, creates only names that match, sees only them in listings
(``router.listings``) and WebSocket fan-out (``router.websocket``). Keys
without a scope behave as they always did.

What a scoped key is told about a session outside its scope is exactly what
anyone is told about a session that runs nowhere (``unknown_session``, the
same 404 body), and it is decided from the name alone, before the router
looks for an owner: no probe, no store read, so neither the answer nor its
timing says whether such a session exists.

Decisions where the scope cannot be read from the name:

- a create that names no session (WAHA / Evolution invent one): refused,
  400 ``session_name_required``: the invented name could fall outside;
- a non-WebSocket fan-out (a generic adapter's ``fanout`` value over HTTP)
  reaches every session at once: refused, 403 ``route_denied``;
- list calls are answered from the whole fleet, filtered;
- every other request about no session (server status, API keys, server
  stop...) is refused, 403 ``route_denied``: those act on or describe whole
  instances, which a key limited to sessions has no business with (the
  router answers the upstream's health paths itself, for everyone).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from fnmatch import translate

from router.adapters.base import Extraction
from router.config import ClientKey
from router.errors import RouterError
from router.keys import as_bytes, which

# Characters that make an entry a pattern rather than a name.
_WILDCARDS = frozenset("*?[")


class Scope:
    """The sessions one key may reach: exact names and fnmatch patterns
    (case-sensitive, as session ids are)."""

    __slots__ = ("_names", "_regex", "entries")

    def __init__(self, entries: Iterable[str]) -> None:
        self.entries = tuple(entries)
        if not self.entries:
            raise ValueError("a scope must name at least one session or pattern")
        patterns = [e for e in self.entries if _WILDCARDS.intersection(e)]
        self._names = frozenset(e for e in self.entries if not _WILDCARDS.intersection(e))
        # One regex for all patterns: a lookup is a set hit or one match.
        self._regex = re.compile("|".join(translate(p) for p in patterns)) if patterns else None

    def allows(self, session: str) -> bool:
        if session in self._names:
            return True
        regex = self._regex
        return regex is not None and regex.match(session) is not None

    def __repr__(self) -> str:
        return f"Scope({list(self.entries)!r})"


@dataclass(frozen=True, slots=True)
class Client:
    """Who presented a valid router key: its scope (None: every session)."""

    scope: Scope | None
    # A short digest of the key, for operators (never the key itself).
    fingerprint: str


class ClientKeys:
    """The configured router keys with their scopes, looked up in constant time."""

    __slots__ = ("_clients", "_keys", "keys")

    def __init__(self, entries: Iterable[ClientKey]) -> None:
        found: dict[str, Client] = {}
        for item in entries:
            client = Client(
                Scope(item.sessions) if item.sessions is not None else None,
                fingerprint(item.key),
            )
            prior = found.get(item.key)
            if prior is not None and _entries(prior) != _entries(client):
                # Which scope would apply is undecidable (the config check
                # refuses such a file: router.config._keys_agree).
                raise ValueError("the same key is listed twice with different sessions")
            found[item.key] = client
        # The plain keys (a cheap "may a key be in this body?" scan).
        self.keys: frozenset[str] = frozenset(found)
        self._keys = tuple(as_bytes(k) for k in found)
        self._clients = tuple(found.values())

    def __bool__(self) -> bool:
        return bool(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def find(self, given: str | None) -> Client | None:
        """The client presenting ``given``, or None (compared with every key)."""
        index = which(given, self._keys)
        return self._clients[index] if index >= 0 else None

    @property
    def clients(self) -> tuple[Client, ...]:
        return self._clients


def _entries(client: Client) -> tuple[str, ...] | None:
    return client.scope.entries if client.scope is not None else None


def fingerprint(key: str) -> str:
    """The first 12 hex digits of the key's SHA-256: tells keys apart in
    admin answers; keys are long random secrets, so it gives nothing away."""
    return hashlib.sha256(as_bytes(key)).hexdigest()[:12]


def unknown_session(session: str) -> RouterError:
    """The answer for a session that runs nowhere, and for one outside the
    caller's scope: one body, so it cannot tell them apart."""
    return RouterError(
        404,
        "unknown_session",
        f"session {session!r} does not run on any instance",
        session=session,
    )


def admit(scope: Scope, ext: Extraction, websocket: bool, listing: bool) -> None:
    """Raise unless a key limited to ``scope`` may make this request.

    Decided from the request alone (no owner lookup): see the module doc.
    """
    session = ext.session
    if session is not None:
        if not scope.allows(session):
            raise unknown_session(session)
        return
    if ext.create:
        raise RouterError(
            400,
            "session_name_required",
            "this key may create only sessions it names (the name must match its sessions)",
        )
    if (ext.fanout and websocket) or listing:
        return  # filtered to the scope (router.websocket, router.listings)
    raise RouterError(403, "route_denied", "this path is not open to keys limited to sessions")
