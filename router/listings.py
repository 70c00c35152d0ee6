"""Fleet-wide listings: an API's list call answered from every instance.

One instance knows only its own sessions, so a list call sent to one of
them (as any session-less request is) shows a client a fraction of its
sessions. Instead the router asks every healthy instance in parallel, each
with its own credential, and merges the answers in the API's own shape
(the adapter's ``ListShape``): the first answering instance's answer, with
the sessions of all of them.

- A session listed by two instances appears once: the copy of the instance
  the map names as its owner (else the first in config order).
- A key limited to sessions (router.scoping) sees only those; items whose
  name cannot be read are dropped for it (kept for other keys).
- An instance that cannot answer (down, unreachable, too slow, an error
  status, an answer that is not a list) is named in ``X-Router-Partial``
  and in an admin event (``listing_partial``, at most one per set of
  instances every 30 s): the client is told, not silently given fewer.
  None answering: 502 ``listing_failed``; none healthy: 503. When every
  instance refused the request alike with a client error (a 417 for an
  ``Expect`` header, a 400 for a query the API rejects), that answer is
  relayed, as a pass-through would: the request is at fault, not the fleet.
- Each instance gets ``timeouts.connect + timeouts.read``, the same bound
  as discovery's list calls.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import msgspec
from aiohttp import web

from router.adapters.base import ListShape, UpstreamRequest
from router.errors import REQUEST_ID_HEADER, RouterError
from router.events import EventLog
from router.instances import Instance
from router.scoping import Scope
from router.sessionmap import SessionMap
from router.snapshot import Snapshot
from router.transport import UpstreamError, UpstreamResponse, error_kind
from router.upstream import add_forwarded, response_headers, upstream_path_qs

log = logging.getLogger(__name__)

PARTIAL_HEADER = "X-Router-Partial"
# One instance's list answer is read whole (it is parsed); a larger one
# counts as "could not answer" rather than grow memory without bound.
MAX_LIST_BYTES = 16 * 1024 * 1024
# Seconds between two events (and log lines) for the same failing instances:
# a client polling a list while an instance is down must not flood the log.
REPORT_EVERY = 30.0

Container = list[Any] | dict[str, Any]

# A refusal's body is relayed only when small: an error, not a listing.
MAX_REFUSAL_BYTES = 64 * 1024
# Client errors that speak of the instance, not of the request (its
# credential, its load, its patience): never relayed as the request's fault.
_INSTANCE_SIDE = frozenset({401, 403, 407, 408, 429})

# msgspec parses and writes JSON several times faster than the json module
# (3,000 WAHA sessions: 4 ms instead of 9 to parse, 1 instead of 8 to
# write), and a list call holds the event loop for all of it.
_decoder = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()


@dataclass(frozen=True, slots=True)
class Listed:
    """One instance's list answer: its JSON, and where its sessions are in it."""

    instance: str
    data: Any
    field: str
    container: Container


def read_answer(instance: str, shape: ListShape, data: Any) -> Listed | None:
    """``data`` as a list answer of ``shape``, or None when it is not one."""
    for dotted in shape.fields:
        found = _dig(data, dotted)
        if isinstance(found, list) or (shape.keyed and isinstance(found, dict)):
            return Listed(instance, data, dotted, found)
    return None


def merge(
    shape: ListShape,
    answers: list[Listed],
    *,
    owner_of: Callable[[str], str | None],
    scope: Scope | None = None,
) -> Any:
    """One answer in the API's shape from ``answers`` (in config order, all
    holding their sessions in the same kind of container as the first).

    ``owner_of`` names a session's mapped owner (to choose among copies);
    ``scope`` drops what the client may not see.
    """
    first = answers[0]
    keyed = isinstance(first.container, dict)
    # (key, item) in order of first appearance; a later copy of a session
    # replaces an earlier one in place when it is the mapped owner's.
    slots: list[tuple[Any, Any]] = []
    where: dict[str, tuple[int, str]] = {}  # name -> (slot, instance)
    for ans in answers:
        container = ans.container
        pairs = container.items() if isinstance(container, dict) else enumerate(container)
        for key, item in pairs:
            name = shape.name(key if keyed else item)
            if name is None:
                # Nothing to scope or de-duplicate it by: only unscoped keys see it.
                if scope is None and not keyed:
                    slots.append((key, item))
                continue
            if scope is not None and not scope.allows(name):
                continue
            prior = where.get(name)
            if prior is None:
                where[name] = (len(slots), ans.instance)
                slots.append((key, item))
                continue
            index, held_by = prior
            if held_by != ans.instance and owner_of(name) == ans.instance:
                where[name] = (index, ans.instance)
                slots[index] = (key, item)
    merged: Container = (
        {str(key): item for key, item in slots} if keyed else [item for _, item in slots]
    )
    data = _put(first.data, first.field, merged)
    if shape.total is not None and isinstance(_dig(data, shape.total), int):
        data = _put(data, shape.total, len(merged))
    return data


async def _bounded(up: UpstreamResponse, cap: int) -> bytes | None:
    """The answer's body, or None when it is larger than ``cap``."""
    if up.content_length is not None and up.content_length > cap:
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in up.iter_chunks():
        size += len(chunk)
        if size > cap:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


@dataclass(frozen=True, slots=True)
class Refused:
    """An instance's client-error answer to the list call, kept to relay."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def __str__(self) -> str:
        return f"HTTP {self.status}"


class Listings:
    """Answers list calls from the whole fleet (see the module doc)."""

    def __init__(self, smap: SessionMap, events: EventLog) -> None:
        self.smap = smap
        self.events = events
        # (event kind, the failing instances) -> when last reported (monotonic)
        self._reported: dict[tuple[str, frozenset[str]], float] = {}

    async def answer(
        self,
        snap: Snapshot,
        request: web.BaseRequest,
        ureq: UpstreamRequest,
        shape: ListShape,
        scope: Scope | None,
        request_id: str,
    ) -> web.Response:
        add_forwarded(ureq.headers, request, request_id)
        # The answers are parsed here: asked for as plain JSON.
        ureq.headers.popall("Accept-Encoding", None)
        timeouts = snap.config.timeouts
        bound = timeouts.connect + timeouts.read
        instances = list(snap.fleet)
        asked = [i for i in instances if i.healthy]
        if not asked:
            raise RouterError(503, "no_healthy_instance", "no healthy instance is available")
        raw_path = request.rel_url.raw_path
        results = await asyncio.gather(
            *(self._ask(inst, snap, ureq, raw_path, shape, bound, request_id) for inst in asked)
        )
        failed = {i.name: "down" for i in instances if not i.healthy}
        answers: list[Listed] = []
        for inst, result in zip(asked, results, strict=True):
            if isinstance(result, Listed):
                answers.append(result)
            else:
                failed[inst.name] = str(result)
        first = results[0]
        if (
            not answers
            and isinstance(first, Refused)
            and all(isinstance(r, Refused) and r.status == first.status for r in results)
        ):
            return web.Response(status=first.status, body=first.body, headers=first.headers)
        if not answers:
            self._report("listing_failed", failed, request.path)
            raise RouterError(
                502,
                "listing_failed",
                "no instance answered the list call",
                instances=failed,
            )
        # The first answer (config order) sets the shape; one that differs
        # (a list beside a mapping) cannot be merged into it.
        keyed = isinstance(answers[0].container, dict)
        for ans in [a for a in answers if isinstance(a.container, dict) != keyed]:
            answers.remove(ans)
            failed[ans.instance] = "not a list of the same kind"
        merged = merge(shape, answers, owner_of=self.smap.peek, scope=scope)
        headers = {REQUEST_ID_HEADER: request_id}
        if failed:
            names = [i.name for i in instances if i.name in failed]
            headers[PARTIAL_HEADER] = ",".join(names)
            self._report("listing_partial", failed, request.path)
        return web.Response(
            status=200,
            body=_encode(merged),
            content_type="application/json",
            charset="utf-8",
            headers=headers,
        )

    async def _ask(
        self,
        inst: Instance,
        snap: Snapshot,
        ureq: UpstreamRequest,
        raw_path: str,
        shape: ListShape,
        bound: float,
        request_id: str,
    ) -> Listed | Refused | str:
        """The instance's list answer, its client-error answer, or why it has none."""
        per = UpstreamRequest(ureq.method, ureq.path, ureq.query.copy(), ureq.headers.copy())
        # The instance's own credential (Blazz: its api_key in the query).
        snap.adapter.apply_credential(per, inst.config)
        path_qs = upstream_path_qs(raw_path, per)
        try:
            async with asyncio.timeout(bound):
                up = await inst.transport.request(
                    per.method, path_qs, per.headers, None, read_timeout=bound
                )
                try:
                    if 400 <= up.status < 500 and up.status not in _INSTANCE_SIDE:
                        body = await _bounded(up, MAX_REFUSAL_BYTES)
                        if body is None:
                            return f"HTTP {up.status}"
                        return Refused(up.status, response_headers(up, request_id), body)
                    if not 200 <= up.status < 300:
                        return f"HTTP {up.status}"
                    if any(k.lower() == "content-encoding" for k, _ in up.headers):
                        return "encoded answer"
                    raw = await _bounded(up, MAX_LIST_BYTES)
                    if raw is None:
                        return "answer too large"  # release() drops the connection
                finally:
                    up.release()
        except TimeoutError:
            return "timeout"
        except UpstreamError as exc:
            return error_kind(exc)
        try:
            data = _decode(raw)
        except ValueError:
            return "not JSON"
        listed = read_answer(inst.name, shape, data)
        return listed if listed is not None else "not a list"

    def _report(self, kind: str, failed: Mapping[str, str], path: str) -> None:
        key = (kind, frozenset(failed))
        now = time.monotonic()
        last = self._reported.get(key)
        if last is not None and now - last < REPORT_EVERY:
            return
        if len(self._reported) >= 64:
            self._reported.clear()
        self._reported[key] = now
        names = sorted(failed)
        self.events.add(kind, path=path, instances=names, reasons=dict(failed))
        log.warning(
            "list call %s: no answer from %s",
            path,
            ", ".join(f"{n} ({failed[n]})" for n in names),
        )


def _decode(raw: bytes) -> Any:
    try:
        return _decoder.decode(raw)
    except msgspec.DecodeError:
        # What msgspec refuses and JSON.parse reads (a lone surrogate escape,
        # 1e400): as the json module reads it, a number out of range as null
        # (what JSON.stringify writes for it). ValueError when not JSON at all.
        return json.loads(raw, parse_float=_finite)


def _finite(text: str) -> float | None:
    value = float(text)
    return value if math.isfinite(value) else None


def _encode(data: Any) -> bytes:
    try:
        return _encoder.encode(data)
    except (UnicodeEncodeError, OverflowError):
        # A lone surrogate (from an escape in an answer) has no UTF-8 form.
        return json.dumps(data, separators=(",", ":")).encode()


def _dig(data: Any, dotted: str) -> Any:
    if not dotted:
        return data
    cur = data
    for part in dotted.split("."):
        if not isinstance(cur, Mapping):
            return None
        cur = cur.get(part)
    return cur


def _put(data: Any, dotted: str, value: Any) -> Any:
    """``data`` with ``value`` at ``dotted`` (dicts copied on the way, so the
    parsed answers are not changed)."""
    if not dotted:
        return value
    head, _, rest = dotted.partition(".")
    copy = dict(data)
    copy[head] = _put(copy.get(head), rest, value) if rest else value
    return copy
