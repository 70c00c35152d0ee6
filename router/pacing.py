"""Per-session send pacing: WhatsApp bans numbers that send too fast.

Blazz keeps a limiter inside each Node process (and never applies it: see
/work/real-blazz/REPORT.md, section l); one in memory would start from zero
after every restart, and a session that fails over would arrive on its new
instance with fresh counters. The router sees every send of a session
wherever it runs, so it paces there: per session, across every replica,
across restarts and failovers.

**Rules** (``PacingConfig.rules``): the first rule whose ``sessions``
pattern (fnmatch, case-sensitive) matches the session id applies; none
matching, or a rule with no limit set, means the session is not paced. A
rule limits messages per rolling minute and hour, distinct recipients per
rolling 24 hours, and may space messages by ``min_gap`` plus a random
``0..jitter`` seconds.

**Slots.** Each send *reserves a slot*: the earliest time at or after the
previous slot (so sends go out in the order they were reserved) that keeps
every limit of its rule, counting the slots already reserved (future ones
included) in sliding windows, and at least ``min_gap + jitter`` after the
previous slot. Reservations are atomic (one Lua script on Redis, no await
in memory), so concurrent sends, on one replica or several, get distinct
slots and never together exceed a limit. The request then waits until its
slot and is forwarded. A slot further away than ``max_wait`` is not
reserved: the answer is 429 ``send_paced`` naming the limit, with
``Retry-After`` (the earliest time a retry can be given a slot within
``max_wait``). A send to a *new* recipient beyond ``recipients_per_day`` is
refused at once (429, Retry-After when the oldest recipient leaves the
window): waiting a few seconds cannot help. A request that can never fit
(a bulk send of more messages than a window allows) is 422
``send_exceeds_limit``.

A bulk send (Blazz ``bulk-send``: ``Send.messages`` > 1) takes one slot
per message, spaced as the upstream itself spaces them (``Send.spacing``);
``min_gap`` cannot apply inside one such request, only before the next.

What is counted is the time the router *forwards* a send; the upstream's
own delivery may lag it by milliseconds (a bulk send by more).

**Clock.** On Redis, the script reads Redis ``TIME`` and answers a delay
relative to it, so the replicas' clocks never matter. In memory, the
process's wall clock.

**What is stored** (Redis: ``{prefix}pace:{session}``, a sorted set of slot
times, and ``{prefix}pace:{session}:to``, recent recipients; both expire
when no window needs them any more). Recipients are kept as a keyed hash
of their normalised number, never as the number itself (a hash of a phone
number can still be brute-forced: treat the store as holding personal
data). A slot stays taken when its send then fails or its client leaves:
counting a message that was not sent errs on the safe side.

**Redis unreachable: fail closed.** A paced send is answered 503
``pacing_unavailable`` with Retry-After. Sending unpaced would let every
replica send as fast as it likes while Redis is down, and a banned number
is far worse than a delayed message; the client already retries a 503.
Unpaced sessions and other requests are not affected.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import random
import re
import time
from abc import ABC, abstractmethod
from bisect import bisect_left, bisect_right
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, NoReturn

from redis.exceptions import RedisError

from router.adapters.base import Adapter, Send, UpstreamRequest
from router.body import ClientGone
from router.config import PacingConfig, PacingRule
from router.errors import RouterError
from router.metrics import PACING_DELAY, PACING_SENDS, PACING_WAITING
from router.store.base import StoreUnavailable

if TYPE_CHECKING:
    from aiohttp import web
    from redis.asyncio import Redis

    from router.store.redis import RedisStore

log = logging.getLogger(__name__)
_DELAY = PACING_DELAY.labels()

MINUTE = 60.0
HOUR = 3600.0
DAY = 86400.0

# -- what a rule asks of a backend ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Window:
    """At most ``limit`` messages (or recipients) in any ``seconds`` long window."""

    name: str  # the rule's setting: per_minute, per_hour, recipients_per_day
    seconds: float
    limit: int

    @property
    def reach(self) -> float:
        """How long a slot holds its place in the window when new slots are
        placed: the window and a margin (1 %, at most 1 s), so that the
        limit also holds as the upstream sees the sends, which the router
        forwards a few ms after their slots, some later than others."""
        return self.seconds + min(self.seconds / 100, 1.0)


@dataclass(frozen=True, slots=True)
class Plan:
    windows: tuple[Window, ...] = ()
    min_gap: float = 0.0
    jitter: float = 0.0
    recipients: Window | None = None
    # Seconds of slot history this plan needs (derived).
    keep: float = field(init=False, compare=False)

    def __post_init__(self) -> None:
        keep = max([w.reach for w in self.windows] + [self.min_gap + self.jitter, 1.0])
        object.__setattr__(self, "keep", keep)


@lru_cache(maxsize=256)
def plan_of(rule: PacingRule) -> Plan:
    """What ``rule`` asks of a backend (one per rule, cached)."""
    windows = tuple(
        Window(name, seconds, limit)
        for name, seconds, limit in (
            ("per_minute", MINUTE, rule.per_minute),
            ("per_hour", HOUR, rule.per_hour),
        )
        if limit > 0
    )
    recipients = (
        Window("recipients_per_day", DAY, rule.recipients_per_day)
        if rule.recipients_per_day > 0
        else None
    )
    return Plan(windows, rule.min_gap, rule.jitter, recipients)


# -- answers ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ask:
    """One reservation: ``messages`` messages ``spacing`` seconds apart (a
    bulk send), to ``recipients`` (``recipient_key``s), at least ``min_gap +
    jitter`` after the previous slot, and no further than ``max_wait`` away."""

    max_wait: float
    messages: int = 1
    recipients: tuple[str, ...] = ()
    spacing: float = 0.0
    jitter: float = 0.0


@dataclass(frozen=True, slots=True)
class Slot:
    """A reservation's outcome."""

    granted: bool
    # Seconds from now to the slot (granted), or to the slot it would have had.
    delay: float
    # The limit that set the slot's time or refused it (None: nothing held it back).
    limit: str | None
    # Refused: seconds until a retry can be given a slot; None: never (the
    # request itself exceeds a limit).
    retry_after: float | None = None


@dataclass(frozen=True, slots=True)
class Usage:
    """A session's pacing state now (admin API)."""

    # Messages in each window of the plan ending now, reserved slots included.
    counts: dict[str, int] = field(default_factory=dict)
    # Distinct recipients in the last 24 hours (when the plan limits them).
    recipients: int = 0
    # Slots reserved after now (sends waiting, on every replica).
    queued: int = 0
    # Seconds until a one-message send could have a slot (jitter aside).
    next_slot_in: float = 0.0
    held_by: str | None = None


# -- recipients ----------------------------------------------------------------------------

_PHONE = re.compile(r"\+?[\d\s().-]+")
_NOT_DIGIT = re.compile(r"\D")
_PERSONAL = ("@c.us", "@s.whatsapp.net")


@lru_cache(maxsize=65536)
def recipient_key(raw: str) -> str:
    """One recipient, as stored: the same contact written two ways (``+1 555
    0100``, ``15550100@c.us``) gives one key; a group or channel id stays
    itself. A hash, not the number."""
    text = raw.strip().lower()
    for suffix in _PERSONAL:
        if text.endswith(suffix):
            text = text[: -len(suffix)]
            break
    if _PHONE.fullmatch(text):
        text = _NOT_DIGIT.sub("", text)
    return hashlib.blake2b(text.encode(), digest_size=10, person=b"wa-router-pace").hexdigest()


# -- backends ------------------------------------------------------------------------------


class Pacer(ABC):
    """Where slots are reserved: in this process or in Redis (every replica)."""

    @abstractmethod
    async def reserve(self, session: str, plan: Plan, ask: Ask) -> Slot:
        """Reserve the earliest slot ``plan`` allows for ``ask``; nothing is
        reserved when it is more than ``ask.max_wait`` away or a limit
        refuses. Raises ``StoreUnavailable`` when the backend cannot answer."""

    @abstractmethod
    async def usage(self, session: str, plan: Plan) -> Usage:
        """The session's counts now, for ``plan``'s windows (nothing reserved)."""


def _earliest(
    slots: list[float], now: float, plan: Plan, messages: int, step: float, gap: float
) -> tuple[float, str | None] | str:
    """The earliest time for ``messages`` messages ``step`` apart after
    ``slots`` (ascending), and the limit that set it; or the name of a window
    the request can never fit. The Lua script below is this, on Redis."""
    at, held = now, None
    k = len(slots)
    for w in plan.windows:
        if messages > w.limit:
            return w.name
        # Message i (at at + i*step) may have at most limit - i - 1 earlier
        # slots in its window: the (limit - i)-th most recent must be out of it.
        lo = k - w.limit
        for i in range(messages):
            if lo + i >= 0:
                bound = slots[lo + i] + w.reach - i * step
                if bound > at:
                    at, held = bound, w.name
    if slots:
        bound = slots[-1] + gap
        if bound > at:
            at, held = bound, "min_gap"
    return at, held


@dataclass(slots=True, eq=False)
class _State:
    slots: list[float] = field(default_factory=list)
    # recipient key -> time of its last slot, oldest first (re-inserted on use)
    recipients: dict[str, float] = field(default_factory=dict)
    # After this, nothing here matters to any window (like a Redis expiry).
    expires: float = 0.0


class MemoryPacer(Pacer):
    """Slots in this process (the embedded store): one router, not kept
    across restarts. No await between reading and writing: atomic."""

    # Sessions swept of expired state every this many reservations.
    SWEEP_EVERY = 1024

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._states: dict[str, _State] = {}
        self._reserved = 0

    def _state(self, session: str, now: float, plan: Plan) -> _State:
        st = self._states.get(session)
        if st is None:
            st = self._states[session] = _State()
            return st
        del st.slots[: bisect_left(st.slots, now - plan.keep)]
        if plan.recipients is not None:
            horizon = now - plan.recipients.seconds
            recipients = st.recipients
            while recipients:
                first = next(iter(recipients))
                if recipients[first] > horizon:
                    break
                del recipients[first]
        return st

    async def reserve(self, session: str, plan: Plan, ask: Ask) -> Slot:
        now = self._clock()
        self._reserved += 1
        if self._reserved % self.SWEEP_EVERY == 0:
            self._sweep(now)
        st = self._state(session, now, plan)
        messages, recipients, spacing = ask.messages, ask.recipients, ask.spacing
        limit = plan.recipients
        if limit is not None and recipients:
            fresh = {r for r in recipients if r not in st.recipients}
            if len(fresh) > limit.limit:
                return Slot(False, 0.0, limit.name, None)
            over = len(st.recipients) + len(fresh) - limit.limit
            if fresh and over > 0:
                oldest = list(st.recipients.values())[over - 1]
                return Slot(False, 0.0, limit.name, max(oldest + limit.seconds - now, 0.001))
        found = _earliest(st.slots, now, plan, messages, spacing, plan.min_gap + ask.jitter)
        if isinstance(found, str):
            return Slot(False, 0.0, found, None)
        at, held = found
        delay = at - now
        if delay > ask.max_wait:
            return Slot(False, delay, held, delay - ask.max_wait)
        last = at + (messages - 1) * spacing
        st.slots.extend(at + i * spacing for i in range(messages))
        st.expires = max(st.expires, last + plan.keep)
        if limit is not None:
            for r in recipients:
                st.recipients.pop(r, None)
                st.recipients[r] = at
            st.expires = max(st.expires, at + limit.seconds)
        return Slot(True, delay, held)

    async def usage(self, session: str, plan: Plan) -> Usage:
        now = self._clock()
        st = self._states.get(session)
        if st is None:
            return Usage(counts={w.name: 0 for w in plan.windows})
        st = self._state(session, now, plan)
        # (now - W, ...]: a slot exactly W ago is out of the window.
        counts = {
            w.name: len(st.slots) - bisect_right(st.slots, now - w.seconds) for w in plan.windows
        }
        found = _earliest(st.slots, now, plan, 1, 0.0, plan.min_gap)
        at, held = found if isinstance(found, tuple) else (now, found)
        return Usage(
            counts=counts,
            recipients=len(st.recipients) if plan.recipients is not None else 0,
            queued=len(st.slots) - bisect_right(st.slots, now),
            next_slot_in=max(at - now, 0.0),
            held_by=held,
        )

    def _sweep(self, now: float) -> None:
        for session in [s for s, st in self._states.items() if st.expires < now]:
            del self._states[session]

    def __len__(self) -> int:
        return len(self._states)


# The Redis backend: everything of one reservation in one script, atomically.
# KEYS[1]: the session's slots (sorted set, score = slot time in ms)
# KEYS[2]: its recent recipients (sorted set, member = recipient key, score = slot ms)
# ARGV: mode ("reserve" | "peek"), messages, step ms, gap ms (min_gap + jitter),
#       max_wait ms, recipient window ms (0: no limit), recipient limit,
#       keep ms (slot history the windows need), token (unique per request),
#       number of windows, then (window ms, limit, reach ms: the window and its
#       margin, see Window.reach) per window, then recipient keys.
# Returns {granted 0|1, held, retry ms (-1: never), delay ms} for "reserve"
# and {2, held, 0, delay ms, queued, recipients, count per window} for "peek";
# held: -1 nothing, -2 min_gap, -3 recipients, j >= 0 window j.
_SCRIPT = """
local slots, rcpt = KEYS[1], KEYS[2]
local peek = ARGV[1] == 'peek'
local n = tonumber(ARGV[2])
local step = tonumber(ARGV[3])
local gap = tonumber(ARGV[4])
local max_wait = tonumber(ARGV[5])
local rwin, rlimit = tonumber(ARGV[6]), tonumber(ARGV[7])
local keep = tonumber(ARGV[8])
local token = ARGV[9]
local w = tonumber(ARGV[10])
local first = 11 + 3 * w

local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', slots, '-inf', '(' .. (now - keep))

if rwin > 0 then
  redis.call('ZREMRANGEBYSCORE', rcpt, '-inf', now - rwin)
  local seen, fresh = {}, 0
  for i = first, #ARGV do
    local r = ARGV[i]
    if not seen[r] then
      seen[r] = true
      if not redis.call('ZSCORE', rcpt, r) then fresh = fresh + 1 end
    end
  end
  if fresh > rlimit then return {0, -3, -1, 0} end
  local over = redis.call('ZCARD', rcpt) + fresh - rlimit
  if fresh > 0 and over > 0 then
    local old = redis.call('ZRANGE', rcpt, over - 1, over - 1, 'WITHSCORES')
    return {0, -3, math.max(tonumber(old[2]) + rwin - now, 1), 0}
  end
end

local at, held = now, -1
local k = redis.call('ZCARD', slots)
for j = 0, w - 1 do
  local lim, reach = tonumber(ARGV[12 + 3 * j]), tonumber(ARGV[13 + 3 * j])
  if n > lim then return {0, j, -1, 0} end
  local lo = k - lim
  local hi = lo + n - 1
  if hi >= 0 then
    local base = math.max(lo, 0)
    local pts = redis.call('ZRANGE', slots, base, hi, 'WITHSCORES')
    for i = 0, n - 1 do
      local a = lo + i
      if a >= 0 then
        local bound = tonumber(pts[2 * (a - base) + 2]) + reach - i * step
        if bound > at then at, held = bound, j end
      end
    end
  end
end
if k > 0 then
  local last = redis.call('ZRANGE', slots, -1, -1, 'WITHSCORES')
  local bound = tonumber(last[2]) + gap
  if bound > at then at, held = bound, -2 end
end
local delay = at - now

if peek then
  local out = {2, held, 0, delay, redis.call('ZCOUNT', slots, '(' .. now, '+inf'), 0}
  if rwin > 0 then out[6] = redis.call('ZCARD', rcpt) end
  for j = 0, w - 1 do
    out[7 + j] = redis.call('ZCOUNT', slots, '(' .. (now - tonumber(ARGV[11 + 3 * j])), '+inf')
  end
  return out
end
if delay > max_wait then return {0, held, delay - max_wait, delay} end

for i = 0, n - 1 do
  redis.call('ZADD', slots, at + i * step, token .. ':' .. i)
end
redis.call('PEXPIRE', slots, at + (n - 1) * step - now + keep + 1000)
if rwin > 0 and #ARGV >= first then
  for i = first, #ARGV do redis.call('ZADD', rcpt, at, ARGV[i]) end
  redis.call('PEXPIRE', rcpt, at - now + rwin + 1000)
end
return {1, held, 0, delay}
"""

_ERRORS: tuple[type[BaseException], ...] = (RedisError, OSError)


def _ms(seconds: float) -> int:
    return math.ceil(seconds * 1000)


class RedisPacer(Pacer):
    """Slots in Redis, shared by every replica and kept across restarts."""

    def __init__(
        self, client: Redis, *, key_prefix: str = "wa-router:", where: str = "redis"
    ) -> None:
        """Keys under ``{key_prefix}pace:``, through ``client`` (not closed here)."""
        self.prefix = f"{key_prefix}pace:"
        self.where = where
        self._script = client.register_script(_SCRIPT)

    @classmethod
    def for_store(cls, store: RedisStore) -> RedisPacer:
        """Sharing the store's client, pool and key prefix."""
        return cls(store.client, key_prefix=store.key_prefix, where=store.where)

    def _keys(self, session: str) -> list[str]:
        # Session ids never contain ":", so no session's keys are another's.
        key = f"{self.prefix}{session}"
        return [key, f"{key}:to"]

    @staticmethod
    def _args(mode: str, plan: Plan, ask: Ask) -> list[str | int]:
        rwin = plan.recipients
        args: list[str | int] = [
            mode,
            ask.messages,
            _ms(ask.spacing),
            _ms(plan.min_gap + ask.jitter),
            _ms(ask.max_wait),
            _ms(rwin.seconds) if rwin is not None else 0,
            rwin.limit if rwin is not None else 0,
            _ms(plan.keep),
            f"{random.getrandbits(64):016x}",
            len(plan.windows),
        ]
        for w in plan.windows:
            args += [_ms(w.seconds), w.limit, _ms(w.reach)]
        if rwin is not None:
            args += list(ask.recipients)
        return args

    async def _run(self, session: str, args: list[str | int]) -> list[int]:
        try:
            result = await self._script(keys=self._keys(session), args=args)
        except _ERRORS as exc:
            self._fail(exc)
        return [int(x) for x in result]

    def _fail(self, exc: BaseException) -> NoReturn:
        raise StoreUnavailable(
            f"redis pacing at {self.where} failed: {type(exc).__name__}: {exc or ''}".rstrip(": ")
        ) from None

    @staticmethod
    def _held(plan: Plan, code: int) -> str | None:
        if code >= 0:
            return plan.windows[code].name
        if code == -2:
            return "min_gap"
        if code == -3 and plan.recipients is not None:
            return plan.recipients.name
        return None

    async def reserve(self, session: str, plan: Plan, ask: Ask) -> Slot:
        granted, code, retry, delay = await self._run(session, self._args("reserve", plan, ask))
        held = self._held(plan, code)
        if granted:
            return Slot(True, delay / 1000, held)
        return Slot(False, delay / 1000, held, None if retry < 0 else retry / 1000)

    async def usage(self, session: str, plan: Plan) -> Usage:
        args = self._args("peek", plan, Ask(max_wait=0.0))
        _, code, _, delay, queued, recipients, *counts = await self._run(session, args)
        return Usage(
            counts={w.name: c for w, c in zip(plan.windows, counts, strict=True)},
            recipients=recipients,
            queued=queued,
            next_slot_in=max(delay, 0) / 1000,
            held_by=self._held(plan, code),
        )


# -- on the request path --------------------------------------------------------------------


async def pace(
    pacer: Pacer,
    cfg: PacingConfig,
    adapter: Adapter,
    ureq: UpstreamRequest,
    session: str,
    request: web.BaseRequest,
) -> None:
    """Hold a send until its session's next slot; raise the answer when it
    gets none. Not a send, or not paced: returns at once."""
    send = adapter.send_of(ureq)
    if send is None:
        return
    rule = cfg.rule_for(session)
    if rule is None or not rule.limits_anything:
        return
    plan = plan_of(rule)
    slot = await _reserve(pacer, cfg, rule, plan, send, session)
    if not slot.granted:
        raise _refusal(slot, rule, send, session, cfg.max_wait)
    delay = slot.delay
    PACING_SENDS.labels("paced" if delay > 0 else "passed", slot.limit or "none").inc()
    _DELAY.observe(max(delay, 0.0))
    if delay <= 0:
        return
    PACING_WAITING.value += 1
    try:
        await asyncio.sleep(delay)
    finally:
        PACING_WAITING.value -= 1
    transport = request.transport
    if transport is None or transport.is_closing():
        # It gave up while waiting (and may send again): not sent behind its back.
        raise ClientGone("the client left while its send waited for its slot")


async def _reserve(
    pacer: Pacer, cfg: PacingConfig, rule: PacingRule, plan: Plan, send: Send, session: str
) -> Slot:
    recipients: tuple[str, ...] = ()
    if plan.recipients is not None:
        recipients = tuple(recipient_key(r) for r in send.recipients)
    try:
        ask = Ask(
            cfg.max_wait,
            messages=max(1, send.messages),
            recipients=recipients,
            spacing=send.spacing,
            jitter=random.random() * plan.jitter,
        )
        return await pacer.reserve(session, plan, ask)
    except StoreUnavailable as exc:
        log.warning("pacing store unavailable; refusing a paced send: %s", exc)
        PACING_SENDS.labels("refused", "unavailable").inc()
        raise RouterError(
            503,
            "pacing_unavailable",
            "the pacing store is unreachable: sends of paced sessions wait until it is back",
            session=session,
            headers={"Retry-After": "5"},
        ) from None


def _limit_value(rule: PacingRule, name: str | None) -> float:
    return float(getattr(rule, name)) if name in _LIMIT_NAMES else 0.0


_LIMIT_NAMES = frozenset({"per_minute", "per_hour", "recipients_per_day", "min_gap"})


def _refusal(
    slot: Slot, rule: PacingRule, send: Send, session: str, max_wait: float
) -> RouterError:
    limit = slot.limit or "min_gap"
    PACING_SENDS.labels("refused", limit).inc()
    value = _limit_value(rule, limit)
    shown = f"{value:g}"
    if slot.retry_after is None:
        what = "distinct recipients" if limit == "recipients_per_day" else "messages"
        count = len(set(send.recipients)) if limit == "recipients_per_day" else send.messages
        return RouterError(
            422,
            "send_exceeds_limit",
            f"this request sends to {count} {what}; session {session!r} may have at most "
            f"{shown} ({limit})",
            session=session,
            limit=limit,
        )
    retry = max(1, math.ceil(slot.retry_after))
    if limit == "recipients_per_day":
        message = (
            f"session {session!r} has reached its {shown} distinct recipients in 24 hours "
            f"(recipients_per_day); a new recipient is possible in {retry} s"
        )
    else:
        message = (
            f"session {session!r} is at its {limit} limit ({shown}): its next slot is "
            f"{slot.delay:.1f} s away, beyond pacing.max_wait ({max_wait:g} s)"
        )
    return RouterError(
        429,
        "send_paced",
        message,
        session=session,
        headers={"Retry-After": str(retry)},
        limit=limit,
        retry_after=round(slot.retry_after, 3),
    )
