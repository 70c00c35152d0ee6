"""``WebhookRelay``: ingest + durable queue + delivery + admin, with one lifecycle.

    relay = WebhookRelay(config, on_session_hint=hint)   # config.webhooks must be set
    await relay.start()                                   # before the listener opens
    ...   dispatch: if relay.handles(path): return await relay.handle(request)
    await relay.stop()                                    # after the listener closed

The queue backend follows the router's store: ``memory`` -> SQLite file
(``webhooks.sqlite_path``), a redis URL -> Redis Streams under the same key
prefix (several replicas share the queue).

The scheduler claims due lanes (up to ``delivery.concurrency`` at once) and
runs one task per lane. A lane task delivers the claimed events strictly in
order: 2xx -> ``ack`` and on to the next; a dead-letter status ->
dead-letter and on; any other failure -> ``nack`` with the backoff and stop
(the rest of that session waits: per-session order). Events are attempted at
least once whatever their age; a failed event older than ``max_age`` is
dead-lettered, and retries are scheduled so the last one happens at
``max_age``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable

from aiohttp import web

from router.config import RouterConfig, WebhookConfig
from router.errors import REQUEST_ID_HEADER, RouterError, error_response, request_id_of
from router.webhooks import metrics
from router.webhooks.admin import PREFIX as ADMIN_PREFIX
from router.webhooks.admin import WebhookAdmin
from router.webhooks.delivery import Deliverer, Outcome, TargetRouter, backoff, event_summary
from router.webhooks.ingest import DIALECTS, Ingest, SessionHint
from router.webhooks.mainapp import Claim as ClaimSessions
from router.webhooks.mainapp import MainAppProxy
from router.webhooks.queue import Claim, EventQueue, Pending, QueueUnavailable

__all__ = ["INGEST_PREFIX", "WebhookRelay", "build_queue"]

log = logging.getLogger(__name__)

INGEST_PREFIX = "/webhooks/"
# Blazz appends this to LARAVEL_URL for every event.
BLAZZ_WEBHOOK_PATH = "/api/whatsapp/webhooks/webjs"
# Events handed to one lane task per claim.
PER_LANE = 16
# Longest the scheduler sleeps without looking at the queue (other replicas'
# retries become due without anyone telling this one).
POLL_INTERVAL = 1.0


def default_consumer_name(cfg: RouterConfig) -> str:
    host = os.uname().nodename
    port = cfg.listen.port
    return f"{host}:{port}" if port else f"{host}:pid{os.getpid()}"


def build_queue(cfg: RouterConfig) -> EventQueue:
    wh = cfg.webhooks
    if wh is None:
        raise ValueError("webhooks are not configured")
    if cfg.store.is_memory:
        from router.webhooks.queue_sqlite import SqliteQueue

        return SqliteQueue(wh.sqlite_path, synchronous=wh.sqlite_synchronous)
    from router.webhooks.queue_redis import RedisQueue

    return RedisQueue(
        cfg.store.url,
        key_prefix=cfg.store.key_prefix,
        consumer=wh.consumer_name or default_consumer_name(cfg),
        lease=wh.delivery.lease,
    )


class WebhookRelay:
    def __init__(
        self,
        config: RouterConfig,
        *,
        queue: EventQueue | None = None,
        on_session_hint: SessionHint | None = None,
        on_qr: Callable[[str, str], None] | None = None,
        claim_sessions: ClaimSessions | None = None,
        clock: Callable[[], float] = time.time,
        stats_interval: float = 2.0,
        per_lane: int = PER_LANE,
        deliver: bool = True,
    ) -> None:
        """``deliver=False`` only stores (benchmarks of ingest alone, maintenance)."""
        if config.webhooks is None:
            raise ValueError("webhooks are not configured")
        self.config = config
        self.wh: WebhookConfig = config.webhooks
        self.delivery = self.wh.delivery
        self.queue = queue or build_queue(config)
        self.queue.on_work = self.wake
        self.targets = TargetRouter(self.wh.targets)
        self.deliverer = Deliverer(
            self.delivery, instance_urls={i.name: i.url for i in config.instances}
        )
        self.ingest = Ingest(
            self.wh,
            config.instances,
            self.queue,
            ordering=self.delivery.ordering,
            on_session_hint=on_session_hint,
            on_qr=on_qr,
            clock=clock,
            body_timeout=config.limits.body_timeout,
        )
        self.admin = WebhookAdmin(self.queue, config.admin_key)
        self.main_app = MainAppProxy(
            self.wh.main_app_url, claim=claim_sessions, timeout=self.delivery.timeout
        )
        self._clock = clock
        self._stats_interval = stats_interval
        self._per_lane = per_lane
        self._deliver = deliver
        self._wake = asyncio.Event()
        # Something may be claimable now (set by wake(), lanes, failures).
        self._dirty = True
        self._lanes: dict[asyncio.Task[None], Claim] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._started = False
        self._queue_error_logged = 0.0
        # Plain counters of this relay (tests, bench); metrics has the same by target.
        self.delivered = 0
        self.failed_rounds = 0
        self.dead_lettered = 0

    @property
    def on_session_hint(self) -> SessionHint | None:
        return self.ingest.on_session_hint

    @on_session_hint.setter
    def on_session_hint(self, cb: SessionHint | None) -> None:
        self.ingest.on_session_hint = cb

    def apply_config(self, config: RouterConfig) -> None:
        """A config reload: take the new instance list and admin key.

        The ``webhooks`` section itself (targets, keys, queue) needs a
        restart; a reload keeps the running one (``router.reload``).
        """
        self.config = config
        self.ingest.set_instances(config.instances)
        self.deliverer.instance_urls = {i.name: i.url for i in config.instances}
        self.admin.admin_key = config.admin_key

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        """Open the queue and start delivering. Raises ``QueueUnavailable``."""
        await self.queue.open()
        await self.deliverer.start()
        self._stopping = False
        self._tasks = [asyncio.create_task(self._stats_loop(), name="webhooks-stats")]
        if self._deliver:
            self._tasks.append(asyncio.create_task(self._schedule(), name="webhooks-scheduler"))
        self._started = True
        ing = self.wh.ingest
        if not (ing.blazz_hmac_key or ing.waha_hmac_key or ing.instance_keys):
            log.warning(
                "webhooks: no ingest HMAC key configured;"
                " anyone who can reach %s* can queue events",
                INGEST_PREFIX,
            )
        log.info(
            "webhook relay started (%s queue, %d target(s))",
            self.queue.backend,
            len(self.wh.targets),
        )

    async def stop(self, grace: float = 5.0) -> None:
        """Stop claiming, let lanes finish their current delivery (up to ``grace``), close."""
        if not self._started:
            return
        self._started = False
        self._stopping = True
        self._wake.set()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        lanes = dict(self._lanes)
        if lanes:
            _done, pending = await asyncio.wait(lanes, timeout=grace)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            for t in pending:
                with contextlib.suppress(QueueUnavailable):
                    await self.queue.release(lanes[t])
        await self.ingest.close()
        await self.main_app.close()
        await self.deliverer.close()
        await self.queue.close()

    # -- HTTP ----------------------------------------------------------------------

    @staticmethod
    def handles(path: str) -> bool:
        return path.startswith(INGEST_PREFIX) or (
            path.startswith(ADMIN_PREFIX)
            and (len(path) == len(ADMIN_PREFIX) or path[len(ADMIN_PREFIX)] == "/")
        )

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        path = request.path
        if path.startswith(INGEST_PREFIX):
            parts = path[len(INGEST_PREFIX) :].split("/", 2)
            dialect = parts[0]
            name = parts[1] if len(parts) > 1 else ""
            if dialect in DIALECTS and len(parts) <= 2:
                return await self.ingest.handle(request, dialect, name)
            if dialect == "blazz" and name and len(parts) == 3:
                return await self._blazz_main_app_call(request, name, "/" + parts[2])
            return error_response(
                RouterError(
                    404,
                    "not_found",
                    "webhook paths are /webhooks/blazz/<instance> and /webhooks/waha/<instance>",
                ),
                request_id_of(request),
            )
        return await self.admin.handle(request)

    async def _blazz_main_app_call(
        self, request: web.BaseRequest, name: str, path: str
    ) -> web.StreamResponse:
        """Under ``/webhooks/blazz/<instance>/`` is the instance's whole LARAVEL_URL:
        its webhook path is ingested, any other call goes to the main app."""
        if path == BLAZZ_WEBHOOK_PATH:
            return await self.ingest.handle(request, "blazz", name)
        request_id = request.headers.get(REQUEST_ID_HEADER) or os.urandom(16).hex()
        try:
            if name not in self.ingest.instances:
                raise RouterError(
                    404, "unknown_instance", f"no instance named {name[:64]!r} in the router config"
                )
            return await self.main_app.handle(request, name, path)
        except RouterError as exc:
            return error_response(exc, request_id)

    # -- scheduling ------------------------------------------------------------------

    def wake(self) -> None:
        """New events may be claimable (the queue's ``on_work``)."""
        self._dirty = True
        self._wake.set()

    def _queue_trouble(self, what: str, exc: BaseException) -> None:
        now = time.monotonic()
        if now - self._queue_error_logged > 30:
            self._queue_error_logged = now
            log.warning("webhooks: %s: %s", what, exc)

    async def _schedule(self) -> None:
        """Claim due lanes when something may be due, else sleep until the next due time.

        Claims only when told (new events, a lane released with more events,
        a free slot after running full), when the known next due time has
        come, or every POLL_INTERVAL (work another replica scheduled).
        """
        concurrency = self.delivery.concurrency
        due: float | None = None
        last_claim = -POLL_INTERVAL
        while not self._stopping:
            self._wake.clear()
            free = concurrency - len(self._lanes)
            now = self._clock()
            mono = time.monotonic()
            if free > 0 and (
                self._dirty
                or (due is not None and due <= now)
                or mono - last_claim >= POLL_INTERVAL
            ):
                self._dirty = False
                last_claim = mono
                try:
                    claims, due = await self.queue.claim_due(free, self._per_lane)
                except QueueUnavailable as exc:
                    self._queue_trouble("cannot claim events", exc)
                    self._dirty = True
                    await asyncio.sleep(1.0)
                    continue
                for c in claims:
                    task = asyncio.create_task(self._run_lane(c))
                    self._lanes[task] = c
                    task.add_done_callback(self._lane_done)
                if len(claims) >= free:
                    # Full: more may be due; claim again as soon as a slot frees.
                    self._dirty = True
                    continue
                now = self._clock()
            timeout = max(0.0, POLL_INTERVAL - (time.monotonic() - last_claim))
            if due is not None and free > 0:
                timeout = min(timeout, max(0.005, due - now))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(timeout, 0.001))

    def _lane_done(self, task: asyncio.Task[None]) -> None:
        self._lanes.pop(task, None)
        self._wake.set()

    async def _run_lane(self, claim: Claim) -> None:
        """Deliver a claimed lane's events strictly in order.

        Acknowledging does not hold up the next delivery: delivered events
        are acked in order, in batches, by a task beside the deliveries (the
        target already has them, so order is kept), and the last ones go
        with the ``release`` in one call. All acks are settled before
        anything else touches the lane's head (nack, dead letter, renew). A
        crash with acks outstanding redelivers those events: at-least-once.
        """
        q = self.queue
        renew_every = self.delivery.lease / 3
        unacked: list[Pending] = []
        ack_task: asyncio.Task[None] | None = None
        finished = False

        async def flush_acks() -> None:
            while unacked:
                batch = unacked[:]
                del unacked[:]
                await q.ack(claim, batch)
                self.delivered += len(batch)

        async def settle() -> None:
            nonlocal ack_task
            if ack_task is not None:
                task, ack_task = ack_task, None
                await task
            await flush_acks()

        try:
            last = len(claim.events) - 1
            for index, item in enumerate(claim.events):
                if self._stopping:
                    break
                if time.monotonic() - claim.renewed_at > renew_every:
                    await settle()
                    if not await q.renew(claim):
                        log.warning("webhooks: lost the lease on a lane; another replica has it")
                        finished = True
                        return
                ev = item.event
                target = self.targets.by_name.get(ev.target)
                if target is None:
                    await settle()
                    await q.dead_letter(
                        claim,
                        item,
                        reason=f"no_target: target {ev.target!r} is no longer configured",
                        rounds=item.rounds,
                    )
                    metrics.DEAD_LETTERED.labels(ev.target, "no_target").inc()
                    self.dead_lettered += 1
                    continue
                outcome = await self.deliverer.deliver(target, item)
                if outcome.ok:
                    unacked.append(item)
                    metrics.DELIVERED.labels(target.name).inc()
                    latency = max(0.0, self._clock() - ev.received)
                    metrics.DELIVERY_LATENCY.labels(target.name).observe(latency)
                    if index < last and (ack_task is None or ack_task.done()):
                        if ack_task is not None:
                            await ack_task  # done: raises if it failed
                        ack_task = asyncio.create_task(flush_acks())
                    continue
                await settle()
                if not await self._failed(claim, item, target.name, outcome):
                    self._dirty = True  # the lane's next due time changed
                    finished = True  # nack-ed: the claim is over
                    return
            if ack_task is not None:
                task, ack_task = ack_task, None
                await task
            done, unacked[:] = unacked[:], []
            more = await q.release(claim, ack=done)
            self.delivered += len(done)
            if more:
                self._dirty = True
            finished = True
        except QueueUnavailable as exc:
            self._queue_trouble("delivery bookkeeping failed", exc)
        except Exception:
            log.exception("webhooks: lane delivery crashed")
        finally:
            if ack_task is not None:
                with contextlib.suppress(Exception):
                    await ack_task
            if not finished:
                with contextlib.suppress(Exception):
                    await q.release(claim, ack=unacked)

    async def _failed(self, claim: Claim, item: Pending, target: str, outcome: Outcome) -> bool:
        """A failed round: dead-letter (True: the lane goes on) or nack (False: it waits)."""
        q = self.queue
        ev = item.event
        rounds = item.rounds + 1
        now = self._clock()
        if outcome.permanent:
            await q.dead_letter(
                claim, item, reason=f"rejected: target answered {outcome.error}", rounds=rounds
            )
            metrics.DEAD_LETTERED.labels(target, "rejected").inc()
            self.dead_lettered += 1
            log.warning("webhooks: %s dead-lettered: %s", event_summary(ev), outcome.loggable)
            return True
        age = now - ev.received
        if age >= self.delivery.max_age:
            await q.dead_letter(
                claim,
                item,
                reason=(
                    f"max_age: undelivered after {age:.0f} s and {rounds} round(s);"
                    f" last error: {outcome.error}"
                ),
                rounds=rounds,
            )
            metrics.DEAD_LETTERED.labels(target, "max_age").inc()
            self.dead_lettered += 1
            log.warning(
                "webhooks: %s dead-lettered (max_age): %s", event_summary(ev), outcome.loggable
            )
            return True
        self.failed_rounds += 1
        next_at = min(now + self._delay(rounds, outcome), ev.received + self.delivery.max_age)
        await q.nack(claim, item, next_at=next_at, rounds=rounds, error=outcome.error)
        log.info(
            "webhooks: %s failed (round %d: %s); next try in %.1f s",
            event_summary(ev),
            rounds,
            outcome.loggable,
            next_at - now,
        )
        return False

    def _delay(self, rounds: int, outcome: Outcome) -> float:
        delay = backoff(self.delivery, rounds)
        if outcome.retry_after is not None:
            delay = max(delay, min(outcome.retry_after, self.delivery.backoff_max))
        return delay

    # -- metrics ---------------------------------------------------------------------

    async def refresh_stats(self) -> None:
        s = await self.queue.stats()
        metrics.BACKLOG.set(s.pending)
        metrics.LANES.set(s.lanes)
        metrics.DEAD_LETTERS.set(s.dead_letters)
        age = max(0.0, self._clock() - s.oldest_received) if s.oldest_received else 0.0
        metrics.OLDEST_AGE.set(age)
        cap = self.wh.ingest.max_queued_bytes
        for t in self.wh.targets:
            queued = s.bytes_by_target.get(t.name, 0)
            metrics.QUEUED_BYTES.labels(t.name).set(queued)
            metrics.QUEUE_USAGE.labels(t.name).set(queued / cap if cap else 0.0)

    async def _stats_loop(self) -> None:
        while True:
            try:
                await self.refresh_stats()
            except QueueUnavailable as exc:
                self._queue_trouble("cannot read backlog stats", exc)
            await asyncio.sleep(self._stats_interval)
