"""Send pacing (router.pacing): slots per session, on both backends and through routers.

Backend tests run the same cases on the in-process pacer and on the Redis
script (a private redis-server), with windows of a fraction of a second so
that real time can pass; their figures hold with a few ms of scheduling
slack. End-to-end tests put real routers (two replicas sharing the private
redis-server) in front of simulator processes, whose send record says what
went out and when.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from itertools import pairwise
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict, MultiDict

from router.adapters import (
    BlazzAdapter,
    EvolutionAdapter,
    GenericAdapter,
    WahaAdapter,
    WwebjsAdapter,
)
from router.adapters.base import Adapter, Send, UpstreamRequest
from router.config import ConfigError, PacingConfig, PacingRule, RouterConfig
from router.config_loader import check_config, load, parse_text
from router.metrics import PACING_WAITING
from router.pacing import (
    Ask,
    MemoryPacer,
    Pacer,
    Plan,
    RedisPacer,
    Window,
    plan_of,
    recipient_key,
)
from router.store.base import StoreUnavailable
from router.store.redis import RedisStore
from tests.support.metrics import scrape
from tests.support.redis_server import RedisServer
from tests.support.router import INSTANCE_KEY, RouterHandle, StartRouter, router_config
from tests.support.simulator import SimFleetFactory, SimProcess
from tests.test_admin import ADMIN_KEY, admin

# Scheduling slack for figures measured in real time (a loaded 2-core box).
SLACK = 0.03


@pytest.fixture(params=["memory", "redis"])
async def pacer(request: pytest.FixtureRequest) -> AsyncIterator[Pacer]:
    if request.param == "memory":
        yield MemoryPacer()
        return
    store = RedisStore(
        request.getfixturevalue("redis_url"), key_prefix=request.getfixturevalue("redis_prefix")
    )
    yield RedisPacer.for_store(store)
    await store.close()


def near(value: float, expected: float, slack: float = SLACK) -> bool:
    return expected - slack <= value <= expected + slack


# -- slots ---------------------------------------------------------------------------------


async def test_slots_are_min_gap_apart_in_the_order_reserved(pacer: Pacer) -> None:
    plan = Plan(min_gap=0.05)
    slots = []
    for _ in range(5):
        started = time.monotonic()
        slot = await pacer.reserve("s1", plan, Ask(5))
        slots.append((started + slot.delay, slot))
    assert all(s.granted for _, s in slots)
    assert [s.limit for _, s in slots] == [None] + ["min_gap"] * 4
    gaps = [b - a for (a, _), (b, _) in pairwise(slots)]
    assert all(near(g, 0.05, 0.01) for g in gaps), gaps
    # Another session has its own slots.
    assert (await pacer.reserve("s2", plan, Ask(5))).delay == 0


async def test_a_full_window_holds_sends_then_refuses_beyond_max_wait(pacer: Pacer) -> None:
    """(now - W, now] holds at most ``limit``: the 4th waits until the 1st
    leaves it, and three may share the instant it does."""
    plan = Plan(windows=(Window("per_minute", 0.6, 3),))
    first = [await pacer.reserve("s1", plan, Ask(5)) for _ in range(3)]
    assert [(s.granted, s.delay, s.limit) for s in first] == [(True, 0.0, None)] * 3
    refused = await pacer.reserve("s1", plan, Ask(0.2))
    assert not refused.granted and refused.limit == "per_minute"
    assert refused.retry_after is not None and near(refused.retry_after, 0.4)
    # The refusal reserved nothing: the next ones share the same instant.
    later = [await pacer.reserve("s1", plan, Ask(5)) for _ in range(4)]
    delays = [s.delay for s in later]
    assert all(s.granted and s.limit == "per_minute" for s in later)
    assert all(near(d, 0.6) for d in delays[:3]) and near(delays[3], 1.2), delays


async def test_a_window_keeps_a_margin_for_forwarding_jitter(pacer: Pacer) -> None:
    """A slot leaves the window 1 % later than its time (at most 1 s): sends
    are forwarded a few ms after their slots, not all equally late, and the
    upstream must still never see limit + 1 in one window."""
    plan = Plan(windows=(Window("per_minute", 10, 1),))
    assert (await pacer.reserve("s1", plan, Ask(0))).granted
    refused = await pacer.reserve("s1", plan, Ask(0))
    assert not refused.granted and near(refused.delay, 10.1)
    assert Window("per_hour", 3600, 1).reach == 3601


async def test_the_tighter_of_two_windows_holds(pacer: Pacer) -> None:
    plan = Plan(windows=(Window("per_minute", 0.3, 2), Window("per_hour", 1.0, 3)))
    slots = [await pacer.reserve("s1", plan, Ask(5)) for _ in range(4)]
    assert [s.limit for s in slots] == [None, None, "per_minute", "per_hour"]
    assert near(slots[2].delay, 0.3) and near(slots[3].delay, 1.0)


async def test_a_bulk_send_takes_one_slot_per_message(pacer: Pacer) -> None:
    plan = Plan(windows=(Window("per_minute", 1.0, 3),), min_gap=0.2)
    bulk = await pacer.reserve("s1", plan, Ask(5, messages=3, spacing=0.1))
    assert bulk.granted and bulk.delay == 0
    # Its messages are at 0, 0.1, 0.2: the window holds the next until 1.0.
    after = await pacer.reserve("s1", plan, Ask(5))
    assert after.limit == "per_minute" and near(after.delay, 1.0)
    # More messages than the window allows can never go.
    never = await pacer.reserve("s2", plan, Ask(5, messages=4))
    assert not never.granted and never.limit == "per_minute" and never.retry_after is None
    # After two sends, a bulk of 2 (0.3 s apart) may start once its second
    # message, not its first, would leave the first send's window: at 0.7.
    window = Plan(windows=(Window("per_minute", 1.0, 3),))
    for _ in range(2):
        await pacer.reserve("s4", window, Ask(5))
    late = await pacer.reserve("s4", window, Ask(5, messages=2, spacing=0.3))
    assert late.limit == "per_minute" and near(late.delay, 0.7)
    # min_gap counts from the bulk's last message.
    gap_plan = Plan(min_gap=0.2)
    await pacer.reserve("s3", gap_plan, Ask(5, messages=3, spacing=0.1))
    assert near((await pacer.reserve("s3", gap_plan, Ask(5))).delay, 0.4)


async def test_a_new_recipient_beyond_the_limit_is_refused_at_once(pacer: Pacer) -> None:
    plan = Plan(recipients=Window("recipients_per_day", 0.5, 2))
    for to in (("a",), ("b",), ("a",), ("a", "b")):
        assert (await pacer.reserve("s1", plan, Ask(5, recipients=to))).granted, to
    refused = await pacer.reserve("s1", plan, Ask(5, recipients=("c",)))
    assert not refused.granted and refused.limit == "recipients_per_day"
    assert refused.retry_after is not None and near(refused.retry_after, 0.5, 0.1)
    never = await pacer.reserve("s2", plan, Ask(5, recipients=("c", "d", "e")))
    assert not never.granted and never.retry_after is None
    # The refused recipient was not counted: "a" (re-used last) outlives "b".
    usage = await pacer.usage("s1", plan)
    assert usage.recipients == 2


async def test_usage_counts_windows_and_the_queue(pacer: Pacer) -> None:
    plan = Plan(windows=(Window("per_minute", 60, 10),), min_gap=0.2)
    for _ in range(3):
        await pacer.reserve("s1", plan, Ask(5))
    usage = await pacer.usage("s1", plan)
    assert usage.counts == {"per_minute": 3}
    assert usage.queued == 2  # two slots are still ahead
    assert usage.held_by == "min_gap" and near(usage.next_slot_in, 0.6)
    # Nothing is reserved by asking.
    assert (await pacer.usage("s1", plan)).counts == {"per_minute": 3}
    assert (await pacer.usage("nobody", plan)).counts == {"per_minute": 0}


# -- redis: replicas, restarts, outages --------------------------------------------------------


async def test_two_replicas_never_exceed_a_limit_together(
    redis_url: str, redis_prefix: str
) -> None:
    """Two clients (as two router replicas) reserving at once on one session."""
    stores = [RedisStore(redis_url, key_prefix=redis_prefix) for _ in range(2)]
    try:
        a, b = (RedisPacer.for_store(s) for s in stores)
        plan = Plan(windows=(Window("per_minute", 30, 15),))
        slots = await asyncio.gather(
            *(p.reserve("s1", plan, Ask(0)) for _ in range(20) for p in (a, b))
        )
        assert sum(s.granted for s in slots) == 15
        assert {s.limit for s in slots if not s.granted} == {"per_minute"}
        # Kept across a restart: a new client (a restarted router) sees them.
        await stores[0].close()
        stores[0] = RedisStore(redis_url, key_prefix=redis_prefix)
        again = await RedisPacer.for_store(stores[0]).reserve("s1", plan, Ask(0))
        assert not again.granted and again.retry_after is not None
        assert near(again.retry_after, 30, 1)
    finally:
        for store in stores:
            await store.close()


async def test_an_unreachable_redis_is_store_unavailable() -> None:
    store = RedisStore("redis://127.0.0.1:9/0", connect_timeout=0.2, op_timeout=0.2)
    try:
        with pytest.raises(StoreUnavailable, match="redis pacing"):
            await RedisPacer.for_store(store).reserve("s1", Plan(min_gap=1), Ask(1))
    finally:
        await store.close()


# -- memory: bounded -------------------------------------------------------------------------


async def test_memory_forgets_sessions_no_window_needs() -> None:
    now = [1000.0]
    pacer = MemoryPacer(clock=lambda: now[0])
    plan = Plan(
        windows=(Window("per_minute", 60, 5),),
        recipients=Window("recipients_per_day", 86400, 5),
    )
    for i in range(10):
        await pacer.reserve(f"s{i}", plan, Ask(1, recipients=("x",)))
    now[0] += 86400 + 1
    for _ in range(MemoryPacer.SWEEP_EVERY):
        await pacer.reserve("busy", plan, Ask(1e9))
    assert len(pacer) == 1


# -- config -----------------------------------------------------------------------------------


def test_the_first_matching_rule_applies() -> None:
    cfg = PacingConfig(
        enabled=True,
        rules=(
            PacingRule(sessions="vip_*"),  # no limit: not paced
            PacingRule(sessions="webjs_*", per_minute=30, min_gap=1.0, jitter=0.5),
            PacingRule(sessions="*", per_hour=100),
        ),
    )
    vip = cfg.rule_for("vip_1")
    assert vip is not None and not vip.limits_anything
    webjs = cfg.rule_for("webjs_1_2_x")
    assert webjs is not None and plan_of(webjs) == Plan(
        (Window("per_minute", 60, 30),), 1.0, 0.5, None
    )
    other = cfg.rule_for("Webjs_1")  # case matters
    assert other is not None and other.per_hour == 100
    assert PacingConfig(rules=(PacingRule(sessions="x"),)).rule_for("y") is None
    assert not cfg.counts_recipients
    assert PacingConfig(True, rules=(PacingRule(recipients_per_day=5),)).counts_recipients


def test_recipient_keys_name_a_contact_not_a_spelling() -> None:
    same = {
        recipient_key(r)
        for r in ("15550100", "+1 555-0100", "15550100@c.us", "15550100@s.whatsapp.net")
    }
    assert len(same) == 1
    assert recipient_key("15550100") != recipient_key("15550101")
    assert recipient_key("12036302@g.us") != recipient_key("12036302")  # a group
    assert "15550100" not in recipient_key("15550100")


# -- adapters: which requests are sends, and to whom ---------------------------------------------


def req(method: str, path: str, body: dict[str, Any] | None = None) -> UpstreamRequest:
    return UpstreamRequest(method, path, MultiDict(), CIMultiDict(), json=body)


GENERIC_OPTIONS: dict[str, Any] = {
    "session_rules": [{"path": "^/api/(?P<session>[^/]+)/"}],
    "probe": {"path": "/api/{session}/status"},
    "health": {"path": "/health"},
    "sends": [
        {"path": "^/api/[^/]+/send$", "recipient": "to.number"},
        {"path": "^/api/[^/]+/broadcast$", "recipients": "to", "spacing": 0.5},
        {"path": "^/api/[^/]+/status-post$", "methods": ["POST", "PUT"]},
    ],
}

SEND_CASES: list[tuple[Adapter, UpstreamRequest, Send | None]] = [
    (WahaAdapter(), req("POST", "/api/sendText", {"chatId": "1@c.us"}), Send(("1@c.us",))),
    (WahaAdapter(), req("POST", "/API/SendImage", {"session": "s"}), Send(())),
    (WahaAdapter(), req("POST", "/api/send/link-custom-preview", {"chatId": 5}), Send(("5",))),
    (WahaAdapter(), req("POST", "/api/forwardMessage", {"chatId": "2@c.us"}), Send(("2@c.us",))),
    (WahaAdapter(), req("POST", "/api/sendSeen", {"chatId": "1@c.us"}), None),
    (WahaAdapter(), req("POST", "/api/startTyping", {"chatId": "1@c.us"}), None),
    (WahaAdapter(), req("GET", "/api/sendText", None), None),
    (WahaAdapter(), req("POST", "/api/s1/chats/x/messages", {}), None),
    (
        BlazzAdapter(),
        req("POST", "/api/messages/send", {"session_id": "w", "recipient_phone": "155"}),
        Send(("155",)),
    ),
    (BlazzAdapter(), req("POST", "/API/Messages/send-media/", {}), Send(())),
    (
        BlazzAdapter(),
        req("POST", "/api/messages/bulk-send", {"recipients": ["1", "2", "3"]}),
        Send(("1", "2", "3"), messages=3, spacing=1.5),
    ),
    (BlazzAdapter(), req("GET", "/api/messages/w/status", None), None),
    (BlazzAdapter(), req("POST", "/api/sessions", {"session_id": "w"}), None),
    (
        WwebjsAdapter(),
        req("POST", "/client/sendMessage/s1", {"chatId": "1@c.us"}),
        Send(("1@c.us",)),
    ),
    (WwebjsAdapter(), req("POST", "/client/sendMessage/s1", None), Send(())),
    (
        WwebjsAdapter(),
        req("POST", "/message/forward/s1/", {"chatId": "a", "destinationChatId": "b"}),
        Send(("b",)),
    ),
    (WwebjsAdapter(), req("POST", "/client/sendSeen/s1", {"chatId": "1"}), None),
    (WwebjsAdapter(), req("GET", "/session/status/s1", None), None),
    (EvolutionAdapter(), req("POST", "/message/sendText/i1", {"number": "55"}), Send(("55",))),
    (EvolutionAdapter(), req("POST", "/message/SendMedia/i1", None), Send(())),
    (EvolutionAdapter(), req("POST", "/message/sendReaction/i1", {"key": {}}), None),
    (EvolutionAdapter(), req("POST", "/chat/findMessages/i1", {}), None),
    (
        GenericAdapter(GENERIC_OPTIONS),
        req("POST", "/api/s1/send", {"to": {"number": "7"}}),
        Send(("7",)),
    ),
    (
        GenericAdapter(GENERIC_OPTIONS),
        req("POST", "/api/s1/broadcast", {"to": ["7", 8, None]}),
        Send(("7", "8"), messages=3, spacing=0.5),
    ),
    (GenericAdapter(GENERIC_OPTIONS), req("PUT", "/api/s1/status-post", {}), Send(())),
    (GenericAdapter(GENERIC_OPTIONS), req("GET", "/api/s1/send", None), None),
]


@pytest.mark.parametrize(("adapter", "request_", "expected"), SEND_CASES)
def test_adapters_say_which_requests_send_and_to_whom(
    adapter: Adapter, request_: UpstreamRequest, expected: Send | None
) -> None:
    assert adapter.send_of(request_) == expected


def test_recipients_in_bodies_that_stream_otherwise() -> None:
    """Where the session is in the path, a send's body is read only while
    pacing counts recipients (``recipient_in_body``); it never needs it."""
    wwebjs, evolution = WwebjsAdapter(), EvolutionAdapter()
    generic = GenericAdapter(GENERIC_OPTIONS)
    assert wwebjs.recipient_in_body("POST", "/client/sendMessage/s1")
    assert not wwebjs.needs_body("POST", "/client/sendMessage/s1")
    assert not wwebjs.recipient_in_body("POST", "/client/getChats/s1")
    assert evolution.recipient_in_body("POST", "/message/sendText/i1")
    assert not evolution.recipient_in_body("GET", "/message/sendText/i1")
    assert generic.recipient_in_body("POST", "/api/s1/send")
    assert not generic.recipient_in_body("POST", "/api/s1/status-post")
    assert not WahaAdapter().recipient_in_body("POST", "/api/sendText")  # it reads the body anyway


@pytest.mark.parametrize(
    ("sends", "problem"),
    [
        ("x", r"sends: must be a list"),
        ([{"recipient": "to"}], r"sends\[0\]\.path: required"),
        ([{"path": "("}], r"sends\[0\]\.path: invalid regex"),
        ([{"path": "/", "recipient": "a", "recipients": "b"}], r"not both"),
        ([{"path": "/", "spacing": -1}], r"sends\[0\]\.spacing"),
        ([{"path": "/", "methods": ["FETCH"]}], r"sends\[0\]\.methods"),
        ([{"path": "/", "to": "x"}], r"sends\[0\]"),
    ],
)
def test_generic_sends_options_are_checked(sends: Any, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        GenericAdapter({**GENERIC_OPTIONS, "sends": sends})


# -- through real routers ---------------------------------------------------------------------

PACED = PacingRule(sessions="paced_*", per_minute=6, min_gap=0.15)


def paced(cfg: RouterConfig, *rules: PacingRule, max_wait: float = 1.0) -> RouterConfig:
    return dataclasses.replace(cfg, pacing=PacingConfig(True, max_wait, rules))


async def sessions_on(proc: SimProcess, *names: str) -> None:
    """``names`` running (WORKING) on ``proc``, before a router starts and discovers them."""
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{proc.url}/_sim/bulk_sessions", json={"names": list(names)}) as resp,
    ):
        assert resp.status == 200, await resp.text()


async def send_text(
    http: aiohttp.ClientSession, router: RouterHandle, session: str, text: str, **kw: Any
) -> tuple[int, Any, aiohttp.ClientResponse]:
    body = {"session": session, "chatId": kw.pop("chat", "15550100@c.us"), "text": text}
    async with http.post(router.url + "/api/sendText", json=body, **kw) as resp:
        return resp.status, await resp.json(), resp


async def until(check: Callable[[], Awaitable[bool] | bool], within: float, what: str) -> None:
    """Yield to the loop until ``check()``: for state of this process (a
    pacer, a gauge), which has no event to await. Fails after ``within``."""
    deadline = time.monotonic() + within
    while True:
        done = check()
        if done if isinstance(done, bool) else await done:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"not within {within}s: {what}")
        await asyncio.sleep(0.005)


async def slots_taken(router: RouterHandle, session: str, n: int) -> bool:
    rule = router.runtime.config.pacing.rule_for(session)
    assert rule is not None
    usage = await router.runtime.pacer.usage(session, plan_of(rule))
    return usage.counts.get("per_minute", 0) >= n


async def test_sends_wait_for_their_slots_and_go_out_in_order(
    sim_fleet: SimFleetFactory, start_router: StartRouter
) -> None:
    """One router, memory pacer: a burst waits min_gap apart in arrival order,
    other requests and unpaced sessions pass at once, a full window is a 429
    naming its limit, and a client that leaves while waiting is not sent for."""
    fleet = sim_fleet(1, api_key=INSTANCE_KEY)
    await sessions_on(fleet[0], "paced_1", "free_1", "leaver_1")
    leaver = PacingRule(sessions="leaver_*", min_gap=0.6)
    cfg = paced(router_config(fleet.urls, admin_key=ADMIN_KEY), PACED, leaver)
    router = await start_router(config=cfg)
    async with router.client() as http:
        before = await scrape(http, router.url)
        tasks = []
        for i in range(6):
            tasks.append(asyncio.create_task(send_text(http, router, "paced_1", f"m{i}")))
            # The next one arrives after this one has its slot: a defined order.
            await until(lambda i=i: slots_taken(router, "paced_1", i + 1), 5, f"slot {i}")
        started = time.monotonic()
        # Meanwhile a read and an unpaced session's send go through at once.
        async with http.get(router.url + "/api/paced_1/chats") as resp:
            assert resp.status == 200
        assert (await send_text(http, router, "free_1", "free"))[0] == 201
        # (Queued behind the session's five waiting sends would be >= 0.6 s.)
        assert time.monotonic() - started < 0.4
        answers = await asyncio.gather(*tasks)
        assert [status for status, _, _ in answers] == [201] * 6
        # The window is full: the 7th would wait ~60 s, beyond max_wait.
        status, body, resp = await send_text(http, router, "paced_1", "m6")
        assert status == 429, body
        assert body["error"] == "send_paced" and body["limit"] == "per_minute"
        assert body["session"] == "paced_1" and 55 <= body["retry_after"] <= 60
        assert 55 <= int(resp.headers["Retry-After"]) <= 60
        after = await scrape(http, router.url)
    sent = fleet.sent("paced_1")
    assert [r["text"] for r in sent] == [f"m{i}" for i in range(6)]
    gaps = [b["ts"] - a["ts"] for a, b in pairwise(sent)]
    assert min(gaps) >= 0.15 - SLACK, gaps
    assert after.delta(before, "wa_router_pacing_sends_total", outcome="passed") == 1
    assert after.delta(before, "wa_router_pacing_sends_total", outcome="paced") == 5
    assert (
        after.delta(before, "wa_router_pacing_sends_total", outcome="refused", limit="per_minute")
        == 1
    )
    assert after.delta(before, "wa_router_pacing_delay_seconds_count") == 6
    # 0.15 s x (1 + ... + 5), less the moments between the sends' arrivals.
    assert 1.5 < after.delta(before, "wa_router_pacing_delay_seconds_sum") <= 0.15 * 15 + SLACK

    # The admin API says where the session stands (checked against the OpenAPI document).
    status, state, _ = await admin(router, "GET", "/admin/sessions/paced_1/pacing")
    assert status == 200
    assert state["per_minute"] == {"limit": 6, "used": 6} and state["per_hour"] is None
    assert state["held_by"] == "per_minute" and 55 <= state["next_slot_in"] <= 60
    assert state["rule"]["sessions"] == "paced_*" and state["rule"]["min_gap"] == 0.15
    status, state, _ = await admin(router, "GET", "/admin/sessions/free_1/pacing")
    assert status == 200 and state["rule"] is None and state["enabled"] is True

    # A client that gives up while its send waits is not sent for behind its back.
    async with router.client() as http:
        assert (await send_text(http, router, "leaver_1", "first"))[0] == 201
        leaving = asyncio.create_task(send_text(http, router, "leaver_1", "left"))
        await until(lambda: PACING_WAITING.value == 1, 3, "the second send waits")
        leaving.cancel()  # the client gives up: its connection closes
        with contextlib.suppress(asyncio.CancelledError):
            await leaving
        await until(lambda: PACING_WAITING.value == 0, 3, "the leaver's slot came")
        assert (await send_text(http, router, "leaver_1", "third"))[0] == 201
    assert [r["text"] for r in fleet.sent("leaver_1")] == ["first", "third"]


async def test_a_failover_replay_and_an_idempotent_repeat_take_no_slot(
    sim_fleet: SimFleetFactory, start_router: StartRouter
) -> None:
    fleet = sim_fleet(2, api_key=INSTANCE_KEY)
    await sessions_on(fleet[0], "paced_1")
    rule = PacingRule(sessions="paced_*", per_minute=4)
    router = await start_router(config=paced(router_config(fleet.urls), rule, max_wait=0))
    async with router.client() as http:
        key = {"Idempotency-Key": "k-1"}
        assert (await send_text(http, router, "paced_1", "one", headers=key))[0] == 201
        status, _, resp = await send_text(http, router, "paced_1", "one", headers=key)
        assert status == 201 and resp.headers["Idempotent-Replayed"] == "true"
        # The owner dies: the next send recovers the session elsewhere and is
        # sent there (a replay of what never arrived), under its one slot.
        fleet[0].kill()
        assert (await send_text(http, router, "paced_1", "two"))[0] == 201
        assert router.runtime.smap.cached("paced_1") == fleet[1].name
        for text in ("three", "four"):
            assert (await send_text(http, router, "paced_1", text))[0] == 201
        status, body, _ = await send_text(http, router, "paced_1", "five")
        assert status == 429 and body["limit"] == "per_minute"
    sent = fleet.sent("paced_1")
    assert [(r["text"], r["instance"]) for r in sent] == [
        ("one", fleet[0].name),
        ("two", fleet[1].name),
        ("three", fleet[1].name),
        ("four", fleet[1].name),
    ]


async def test_two_replicas_share_limits_across_a_restart_and_fail_closed(
    sim_fleet: SimFleetFactory,
    start_router: StartRouter,
    redis_server: RedisServer,
    redis_url: str,
    redis_prefix: str,
) -> None:
    fleet = sim_fleet(1, api_key=INSTANCE_KEY)
    await sessions_on(fleet[0], "paced_1", "free_1")
    rule = PacingRule(sessions="paced_*", per_minute=10)

    def config() -> RouterConfig:
        base = router_config(fleet.urls, store=redis_url, key_prefix=redis_prefix)
        return paced(dataclasses.replace(base, admin_key=ADMIN_KEY), rule, max_wait=0.3)

    a, b = await start_router(config=config()), await start_router(config=config())
    async with a.client() as http:
        answers = await asyncio.gather(
            *(send_text(http, r, "paced_1", f"m{i}") for i in range(15) for r in (a, b))
        )
    statuses = [status for status, _, _ in answers]
    assert (statuses.count(201), statuses.count(429)) == (10, 20)
    assert {body["limit"] for status, body, _ in answers if status == 429} == {"per_minute"}
    assert len(fleet.sent("paced_1")) == 10

    # A replica restarted (a new process on the same redis) finds the window full.
    await a.server.shutdown()
    c = await start_router(config=config())
    async with c.client() as http:
        status, body, _ = await send_text(http, c, "paced_1", "after restart")
        assert status == 429 and body["limit"] == "per_minute"
        status, state, _ = await admin(c, "GET", "/admin/sessions/paced_1/pacing")
        assert status == 200 and state["per_minute"] == {"limit": 10, "used": 10}

        # Redis gone: a paced send is held back (503), never sent unpaced;
        # other sessions' sends and other requests are not affected.
        redis_server.stop()
        status, body, resp = await send_text(http, c, "paced_1", "redis down")
        assert status == 503 and body["error"] == "pacing_unavailable"
        assert resp.headers["Retry-After"] == "5"
        assert (await send_text(http, c, "free_1", "unpaced"))[0] == 201
        status, body, _ = await admin(c, "GET", "/admin/sessions/paced_1/pacing")
        assert status == 503 and body["error"] == "pacing_unavailable"
    assert len(fleet.sent("paced_1")) == 10


async def test_blazz_bulk_sends_count_each_message_and_recipient(
    sim_fleet: SimFleetFactory, start_router: StartRouter
) -> None:
    fleet = sim_fleet(
        1, dialect="blazz", api_key=INSTANCE_KEY, extra_args=["--bulk-send-pause", "0"]
    )
    session = "webjs_7_1700000000_pacing01"
    await sessions_on(fleet[0], session)
    rule = PacingRule(sessions="webjs_*", per_minute=6, recipients_per_day=3)
    router = await start_router(
        config=paced(router_config(fleet.urls, adapter="blazz"), rule, max_wait=0)
    )
    base = {"session_id": session, "message": "hi", "api_key": router.key}

    async def post(action: str, **body: Any) -> tuple[int, Any]:
        async with (
            aiohttp.ClientSession() as http,
            http.post(f"{router.url}/api/messages/{action}", json={**base, **body}) as resp,
        ):
            return resp.status, await resp.json()

    for phone in ("15550000001", "15550000002", "+1 555-000-0001"):  # the last: the first again
        status, answer = await post("send", recipient_phone=phone)
        assert status == 200, answer
    # Two new recipients where one is left: refused at once, nothing sent.
    status, answer = await post("bulk-send", recipients=["15550000003", "15550000004"])
    assert status == 429 and answer["limit"] == "recipients_per_day", answer
    assert 86000 < answer["retry_after"] <= 86400
    # One new recipient, three messages: the minute's six are taken.
    three = ["15550000001", "15550000002", "15550000003"]
    status, answer = await post("bulk-send", recipients=three)
    assert status == 200 and answer["successful"] == 3, answer
    status, answer = await post("send", recipient_phone="15550000001")
    assert status == 429 and answer["limit"] == "per_minute", answer
    # More messages than a minute allows can never be sent in one request.
    status, answer = await post("bulk-send", recipients=three * 2 + three[:1])
    assert status == 422 and answer["error"] == "send_exceeds_limit", answer
    assert answer["limit"] == "per_minute"
    assert len(fleet.sent(session)) == 6


GENERIC_ON_WAHA: dict[str, Any] = {
    # The session in a header: the adapter itself never needs the body.
    "session_rules": [{"header": "X-Session"}],
    "credential": {"header": "X-Api-Key"},
    "list": {"path": "/api/sessions", "query": {"all": "true"}, "id_field": "name"},
    "probe": {"path": "/api/sessions/{session}", "status_field": "status"},
    "health": {"path": "/health"},
    "ready_statuses": ["WORKING"],
    "sends": [{"path": "^/api/sendText$", "recipient": "chatId"}],
}


async def test_a_recipient_in_a_body_the_adapter_does_not_read(
    sim_fleet: SimFleetFactory, start_router: StartRouter
) -> None:
    """The body of such a send is parsed only while pacing counts recipients."""
    fleet = sim_fleet(1, api_key=INSTANCE_KEY)
    await sessions_on(fleet[0], "gen_1")
    base = router_config(fleet.urls, adapter="generic", adapter_options=GENERIC_ON_WAHA)
    rule = PacingRule(sessions="gen_*", recipients_per_day=1)
    router = await start_router(config=paced(base, rule))
    assert not router.runtime.adapter.needs_body("POST", "/api/sendText")
    async with router.client(headers={"X-Session": "gen_1"}) as http:
        assert (await send_text(http, router, "gen_1", "a", chat="1@c.us"))[0] == 201
        status, body, _ = await send_text(http, router, "gen_1", "b", chat="2@c.us")
        assert status == 429 and body["limit"] == "recipients_per_day"
        assert (await send_text(http, router, "gen_1", "c", chat="1@c.us"))[0] == 201
    assert [r["text"] for r in fleet.sent("gen_1")] == ["a", "c"]


# -- configuration: check-config names the line and the reason ---------------------------------

PACING_TAIL = "instances:\n  - {name: wa-1, url: http://127.0.0.1:3101}\n"


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        ("pacing:\n  enabled: true\n", 2, "pacing.enabled: no rule sets a limit"),
        (
            "pacing:\n  rules:\n    - {sessions: '*', per_minute: 1}\n    - {sessions: a}\n",
            3,
            "a rule for sessions '*' matches every session",
        ),
        (
            "pacing:\n  rules:\n    - {sessions: 'a b', per_minute: 1}\n",
            3,
            "pacing.rules[0].sessions: must be an fnmatch pattern",
        ),
        ("pacing:\n  rules:\n    - per_minute: -1\n", 3, "pacing.rules[0].per_minute"),
        ("pacing:\n  rules:\n    - min_gap: 5000\n", 3, "pacing.rules[0].min_gap"),
        ("pacing:\n  max_wait: soon\n", 2, "pacing.max_wait"),
        (
            "pacing:\n  rules:\n    - {sessions: a, per_hour: 5}\n    - {sessions: a}\n",
            4,
            "sessions",
        ),
        ("pacing:\n  rules:\n    - per_second: 5\n", 3, "per_second"),
    ],
)
def test_bad_pacing_config(text: str, line: int, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_text(text + PACING_TAIL, "router.yaml", env={})
    assert (info.value.line, fragment in info.value.reason) == (line, True), str(info.value)


def test_check_config_reads_a_pacing_section(tmp_path: Path) -> None:
    path = tmp_path / "router.yaml"
    path.write_text(
        "pacing:\n  enabled: true\n  max_wait: 5\n  rules:\n"
        "    - {sessions: 'test_*'}\n    - {sessions: 'webjs_*', per_minute: 30, jitter: 0.5}\n"
        + PACING_TAIL
    )
    ok, text = check_config(path)
    assert ok, text
    cfg = load(path)
    assert cfg.pacing.rule_for("webjs_1") == PacingRule("webjs_*", per_minute=30, jitter=0.5)
    path.write_text("pacing:\n  rules:\n    - {sessions: x, jitter: -1}\n" + PACING_TAIL)
    ok, text = check_config(path)
    assert not ok and text.startswith(f"{path}:3: pacing.rules[0].jitter"), text
