"""One delivery round of one event to one target: route, re-sign, POST, classify.

A round is up to ``attempts_per_round`` HTTP attempts made by aiohttp-retry
with exponential backoff and jitter between them (``round_backoff``, doubled
each time, times a random factor in [0.5, 1]). Only answers that may succeed
on a second try are retried inside a round: connection errors, timeouts,
408, 425, 429 and 5xx. Anything longer (the target down for minutes) is the
durable queue's job: the relay ``nack``-s the event with a backoff of
``backoff_base * 2**(rounds-1)`` (capped at ``backoff_max``, same jitter) and
the next round happens after that, in this process or another.

Every round signs afresh (``X-Timestamp`` / ``X-Webhook-Timestamp`` = now),
so an event that waited an hour in the queue still passes a receiver that
rejects timestamps older than 300 s. The config loader keeps a whole round
under 240 s. Every attempt carries the same ``X-Event-Id``.

Outcome of a round:

* 2xx: delivered (``ok``);
* a status in ``dead_letter_statuses`` (default 400, 413, 415, 422: the
  target says this event can never be accepted): ``permanent``;
* anything else (other 4xx such as 401/404 during a deploy, 5xx, network):
  retried later, until ``max_age``.
"""

from __future__ import annotations

import asyncio
import fnmatch
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import aiohttp
from aiohttp_retry import RetryClient
from aiohttp_retry.retry_options import RetryOptionsBase

from router.backoff import equal_jitter, exponential
from router.config import WebhookDelivery, WebhookTarget
from router.webhooks import metrics
from router.webhooks.queue import Event, Pending
from router.webhooks.signatures import sign_headers

__all__ = ["Deliverer", "Outcome", "TargetRouter", "backoff"]

RETRY_IN_ROUND = frozenset({408, 425, 429})
_RETRY_AFTER_MAX = 3600.0


def backoff(cfg: WebhookDelivery, rounds: int) -> float:
    """Seconds to wait after the ``rounds``-th failed round (1-based), jittered."""
    return equal_jitter(exponential(rounds - 1, cfg.backoff_base, cfg.backoff_max))


class TargetRouter:
    """Which targets want an event: ``events`` globs on the type, ``sessions`` regex."""

    def __init__(self, targets: tuple[WebhookTarget, ...]) -> None:
        self._rules: list[tuple[WebhookTarget, tuple[str, ...], re.Pattern[str] | None]] = [
            (t, t.events, re.compile(t.sessions) if t.sessions is not None else None)
            for t in targets
        ]
        self.by_name: dict[str, WebhookTarget] = {t.name: t for t in targets}

    def route(self, event_type: str, session: str | None) -> list[WebhookTarget]:
        out: list[WebhookTarget] = []
        for target, patterns, sessions in self._rules:
            if patterns and not any(fnmatch.fnmatchcase(event_type, p) for p in patterns):
                continue
            if sessions is not None and (session is None or not sessions.fullmatch(session)):
                continue
            out.append(target)
        return out


@dataclass(slots=True)
class Outcome:
    ok: bool
    status: int | None = None
    # A dead_letter_statuses answer: retrying will not help.
    permanent: bool = False
    error: str = ""
    attempts: int = 0
    # Seconds from the target's Retry-After, when it sent one.
    retry_after: float | None = None

    @property
    def loggable(self) -> str:
        """``error`` for a log line: an HTTP failure without the answer's body
        (kept in the queue and dead letters, never logged: it may echo a secret)."""
        return f"HTTP {self.status}" if self.status is not None else self.error


@dataclass(slots=True)
class _Counter:
    n: int = 0
    target: str = ""
    outcomes: list[str] = field(default_factory=list)


class _RoundRetry(RetryOptionsBase):
    """aiohttp-retry options: retry transient failures only, jittered exponential waits."""

    def __init__(self, cfg: WebhookDelivery) -> None:
        super().__init__(
            attempts=cfg.attempts_per_round,
            statuses=set(),
            exceptions={aiohttp.ClientError, asyncio.TimeoutError},
            retry_all_server_errors=False,
            evaluate_response_callback=self._accept,
        )
        self._cfg = cfg

    def get_timeout(self, attempt: int, response: aiohttp.ClientResponse | None = None) -> float:
        return equal_jitter(self._cfg.round_wait(attempt))

    @staticmethod
    async def _accept(response: aiohttp.ClientResponse) -> bool:
        """True = this answer is final; False = try again (the answer is released first)."""
        if response.status >= 500 or response.status in RETRY_IN_ROUND:
            response.release()
            return False
        return True


def _outcome_label(status: int | None, exc: BaseException | None) -> str:
    if exc is not None:
        return "timeout" if isinstance(exc, asyncio.TimeoutError) else "network"
    assert status is not None
    if 200 <= status < 300:
        return "success"
    return "http_5xx" if status >= 500 else "http_4xx"


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        secs = float(value)
    except ValueError:
        return None
    return min(max(secs, 0.0), _RETRY_AFTER_MAX)


class Deliverer:
    def __init__(
        self,
        cfg: WebhookDelivery,
        *,
        instance_urls: Mapping[str, str] | None = None,
    ) -> None:
        self.cfg = cfg
        self.instance_urls = dict(instance_urls or {})
        self._session: aiohttp.ClientSession | None = None
        self._client: RetryClient | None = None
        self._options = _RoundRetry(cfg)

    async def start(self) -> None:
        trace = aiohttp.TraceConfig()
        trace.on_request_end.append(self._on_end)
        trace.on_request_exception.append(self._on_exception)
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=max(16, self.cfg.concurrency * 2)),
            timeout=aiohttp.ClientTimeout(total=self.cfg.timeout),
            trace_configs=[trace],
            auto_decompress=True,
        )
        self._client = RetryClient(self._session, retry_options=self._options)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
        self._session = None
        self._client = None

    # Per-attempt metrics (aiohttp calls these for every attempt of a round).
    @staticmethod
    async def _on_end(
        _s: aiohttp.ClientSession, ctx: SimpleNamespace, params: aiohttp.TraceRequestEndParams
    ) -> None:
        counter = (ctx.trace_request_ctx or {}).get("counter")
        if isinstance(counter, _Counter):
            counter.n += 1
            label = _outcome_label(params.response.status, None)
            metrics.ATTEMPTS.labels(counter.target, label).inc()

    @staticmethod
    async def _on_exception(
        _s: aiohttp.ClientSession,
        ctx: SimpleNamespace,
        params: aiohttp.TraceRequestExceptionParams,
    ) -> None:
        counter = (ctx.trace_request_ctx or {}).get("counter")
        if isinstance(counter, _Counter):
            counter.n += 1
            metrics.ATTEMPTS.labels(counter.target, _outcome_label(None, params.exception)).inc()

    def headers_for(self, target: WebhookTarget, item: Pending, *, now: float) -> dict[str, str]:
        ev = item.event
        fmt = ev.dialect if target.format == "auto" else target.format
        headers = {
            "Content-Type": "application/json",
            "X-Event-Id": ev.id,
            "X-Event-Type": ev.type,
            "X-Router-Instance": ev.instance,
            "X-Router-Attempt": str(item.rounds + 1),
        }
        if ev.session is not None:
            headers["X-Router-Session"] = ev.session
        if fmt == "blazz":
            url = ev.instance_url or self.instance_urls.get(ev.instance)
            if url:
                headers["X-Instance-Url"] = url
        elif fmt == "waha":
            headers["X-Webhook-Request-Id"] = ev.id
        headers.update(sign_headers(fmt, target.hmac_key, ev.body, now=now))
        return headers

    async def deliver(self, target: WebhookTarget, item: Pending) -> Outcome:
        """One round. Never raises for HTTP problems (they are the outcome)."""
        client = self._client
        if client is None:
            return Outcome(ok=False, error="delivery client is closed")
        counter = _Counter(target=target.name)
        headers = self.headers_for(target, item, now=time.time())
        ctx: dict[str, Any] = {"counter": counter}
        try:
            async with client.post(
                target.url, data=item.event.body, headers=headers, trace_request_ctx=ctx
            ) as resp:
                status = resp.status
                retry_after = _retry_after(resp.headers.get("Retry-After"))
                if 200 <= status < 300:
                    await resp.read()
                    return Outcome(ok=True, status=status, attempts=counter.n)
                text = (await resp.content.read(200)).decode("utf-8", "replace")
        except (TimeoutError, aiohttp.ClientError) as exc:
            what = "timed out" if isinstance(exc, asyncio.TimeoutError) else f"{exc}"
            return Outcome(
                ok=False,
                error=f"{type(exc).__name__}: {what}"[:300],
                attempts=counter.n,
            )
        permanent = status in self.cfg.dead_letter_statuses
        snippet = " ".join(text.split())[:120]
        return Outcome(
            ok=False,
            status=status,
            permanent=permanent,
            error=f"HTTP {status}" + (f": {snippet}" if snippet else ""),
            attempts=counter.n,
            retry_after=retry_after,
        )


def event_summary(ev: Event) -> str:
    """For logs: no body, no keys."""
    return f"{ev.id} ({ev.type}, instance {ev.instance}, target {ev.target})"
