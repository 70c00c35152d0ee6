"""Sessions a client removed on purpose stay removed.

A delete, stop or logout answered 2xx through the router (``adapter.removes``),
or a session that discovery finds stopped and running nowhere, is *removed*:
it leaves the session map on every replica (the store's change feed), and a
note in the store (shared by replicas, kept across restarts) says so. Until a
client creates it again, no failover, evacuation or rebalance starts it, and
a request for it is a 404 ``unknown_session`` without asking the instances.
"""

from __future__ import annotations

import logging
import time

from router.events import EventLog
from router.sessionmap import SessionMap
from router.store.base import StoreUnavailable

log = logging.getLogger(__name__)

_FIELD = "removed"


class SessionRemoved(Exception):
    """The session was removed on purpose; nothing brings it back but a create."""

    def __init__(self, session: str) -> None:
        super().__init__(session)
        self.session = session


class Removals:
    def __init__(self, smap: SessionMap, events: EventLog) -> None:
        self.smap = smap
        self.events = events

    async def mark(self, session: str, *, by: str, instance: str | None = None) -> None:
        """``session`` was removed (``by``: "client" or "discovery") from
        ``instance``, which may keep a stopped copy (WAHA does): a create of it
        goes back there."""
        note: dict[str, object] = {_FIELD: time.time(), "by": by}
        if instance is not None:
            note["instance"] = instance
        try:
            await self.smap.forget(session)
            await self.smap.store.set_note(session, note)
        except StoreUnavailable:
            # Forgotten here at least (the cache); other replicas learn it from
            # their next read, and the instance itself no longer runs it.
            log.warning("session %s removed, but the store could not record it", session)
        self.events.add("removed", session=session, by=by)

    async def is_removed(self, session: str) -> bool:
        """True when ``session`` was removed and not created since. A store that
        cannot answer says no: the caller's other checks still hold."""
        return await self.removed_from(session) is not False

    async def removed_from(self, session: str) -> str | bool | None:
        """False when not removed; else the instance it was removed from (None
        when unknown)."""
        try:
            note = await self.smap.store.get_note(session)
        except StoreUnavailable:
            return False
        if note is None or _FIELD not in note:
            return False
        instance = note.get("instance")
        return instance if isinstance(instance, str) else None
