"""Placement by labels (router/labels.py, router/placement.py) on real routers
in front of real simulator processes: rules by session pattern, a create's
placement header, weighted canary rules, failover and drain keeping a session
within its selector (and saying so when they cannot), replicas agreeing on a
header-chosen selector through the shared store.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import aiohttp
import pytest

from router.config import (
    ConfigError,
    DiscoveryConfig,
    FailoverConfig,
    PlacementConfig,
    PlacementRule,
    RouterConfig,
)
from router.config_loader import parse_text
from router.labels import (
    Policy,
    Selector,
    SelectorError,
    bucket,
)
from router.runtime import Runtime
from tests.support.metrics import scrape
from tests.support.router import (
    INSTANCE_KEY,
    RouterHandle,
    StartRouter,
    next_event,
    router_config,
)
from tests.support.simulator import SimFleet, SimFleetFactory

ADMIN_KEY = "labels-admin"


# -- config ------------------------------------------------------------------------


def labelled(
    base: RouterConfig, labels: Sequence[Mapping[str, str]], placement: PlacementConfig
) -> RouterConfig:
    """``base`` with labels on its instances (in order) and placement rules."""
    insts = tuple(
        dataclasses.replace(inst, labels=dict(lab))
        for inst, lab in zip(base.instances, labels, strict=True)
    )
    return dataclasses.replace(base, instances=insts, placement=placement)


async def start(
    sim_fleet: SimFleetFactory,
    start_router: StartRouter,
    labels: Sequence[Mapping[str, str]],
    placement: PlacementConfig,
    *,
    max_sessions: int | Sequence[int] = 1000,
    fleet: SimFleet | None = None,
    **kwargs: Any,
) -> tuple[SimFleet, RouterHandle]:
    if fleet is None:
        fleet = sim_fleet(len(labels), api_key=INSTANCE_KEY, start_delay=0.02)
    base = router_config(
        fleet.urls,
        names=[p.name for p in fleet],
        max_sessions=max_sessions,
        admin_key=ADMIN_KEY,
        failover=FailoverConfig(wait=10, ready_timeout=5),
        **kwargs,
    )
    router = await start_router(config=labelled(base, labels, placement))
    return fleet, router


async def create(
    http: aiohttp.ClientSession, router: RouterHandle, name: str, **headers: str
) -> tuple[int, dict[str, Any]]:
    async with http.post(
        f"{router.url}/api/sessions", json={"name": name}, headers=headers
    ) as resp:
        return resp.status, await resp.json()


async def created_on(
    http: aiohttp.ClientSession, router: RouterHandle, name: str, **headers: str
) -> str:
    status, body = await create(http, router, name, **headers)
    assert status == 201, body
    owner = router.runtime.smap.cached(name)
    assert owner is not None
    return owner


async def send(http: aiohttp.ClientSession, router: RouterHandle, session: str) -> int:
    body = {"session": session, "chatId": "1@c.us", "text": f"hi {session}"}
    async with http.post(f"{router.url}/api/sendText", json=body) as resp:
        await resp.read()
        return resp.status


async def down(rt: Runtime, instance: str) -> None:
    """Until health checks have taken ``instance`` down (its "down" event)."""
    await next_event(rt, "down", within=10, seen=True, instance=instance)


async def admin_get(router: RouterHandle, path: str) -> Any:
    async with (
        aiohttp.ClientSession(headers={"X-Admin-Key": ADMIN_KEY}) as http,
        http.get(router.url + path) as resp,
    ):
        assert resp.status == 200, await resp.text()
        return await resp.json()


# -- the pure parts ---------------------------------------------------------------------


def test_selectors_parse_match_and_read_back_canonically() -> None:
    sel = Selector.parse(" region=eu , engine=webjs")
    assert str(sel) == "engine=webjs,region=eu"
    assert Selector.parse(str(sel)) == sel == Selector.of({"region": "eu", "engine": "webjs"})
    assert sel.matches({"region": "eu", "engine": "webjs", "canary": "true"})
    assert not sel.matches({"region": "eu"})
    assert str(Selector.parse("*")) == "*" and Selector.parse("*").matches({})
    for bad in ("", "region", "region=eu,region=us", "=eu", "region=e u", "a=" + "x" * 64):
        with pytest.raises(SelectorError):
            Selector.parse(bad)


def test_a_weighted_rule_takes_its_share_by_a_stable_hash() -> None:
    policy = Policy.of(
        PlacementConfig(
            rules=(
                PlacementRule({"canary": "true"}, weight=5),
                PlacementRule({"canary": "false"}),
            )
        )
    )
    names = [f"user-{i}" for i in range(4000)]
    canaries = [n for n in names if policy.by_rules(n).selector == Selector.of({"canary": "true"})]
    # 5 % of 4000 is 200; a binomial spread of 4.4 standard deviations either way.
    assert 140 <= len(canaries) <= 260, len(canaries)
    # The same answer every time and in every process: the hash is not Python's.
    assert bucket("*|canary=true", "user-0") == bucket("*|canary=true", "user-0")
    assert canaries == [n for n in names if bucket("*|canary=true", n) < 5]
    # Another rule order does not reshuffle the canary rule's sessions.
    swapped = Policy.of(
        PlacementConfig(
            rules=(
                PlacementRule({"canary": "true"}, sessions="vip_*"),
                PlacementRule({"canary": "true"}, weight=5),
            )
        )
    )
    assert [n for n in names if swapped.by_rules(n).rule == 1] == canaries


# -- creates -----------------------------------------------------------------------------


async def test_creates_follow_patterns_the_header_and_the_canary_weight(
    sim_fleet: SimFleetFactory, start_router: StartRouter
) -> None:
    labels = [
        {"region": "eu"},
        {"region": "eu"},
        {"region": "us", "canary": "false"},
        {"region": "us", "canary": "true"},
    ]
    placement = PlacementConfig(
        header="X-Placement",
        rules=(
            PlacementRule({"region": "eu"}, sessions="eu_*"),
            PlacementRule({"canary": "true"}, weight=10),
            PlacementRule({"region": "us", "canary": "false"}),
        ),
    )
    _, router = await start(sim_fleet, start_router, labels, placement)
    rt = router.runtime
    policy = rt.placer.policy()
    async with router.client() as http:
        eu = [await created_on(http, router, f"eu_{i}") for i in range(6)]
        assert Counter(eu) == {"wa-1": 3, "wa-2": 3}

        # 200 names: the canary instance gets exactly those the hash gives the
        # 10 % rule (about 20), the others go to the regular US instance.
        names = [f"user-{i}" for i in range(200)]
        gate = asyncio.Semaphore(16)

        async def one(name: str) -> str:
            async with gate:
                return await created_on(http, router, name)

        owners = dict(zip(names, await asyncio.gather(*map(one, names)), strict=True))
        expected = {
            n for n in names if policy.by_rules(n).source == "rule" and policy.by_rules(n).rule == 1
        }
        assert {n for n, o in owners.items() if o == "wa-4"} == expected
        assert {n for n, o in owners.items() if o == "wa-3"} == set(names) - expected
        assert 8 <= len(expected) <= 35, len(expected)

        # The header chooses directly, and does not reach the instance.
        assert await created_on(http, router, "user-h1", **{"X-Placement": "region=eu"}) in (
            "wa-1",
            "wa-2",
        )
        view = await admin_get(router, "/admin/sessions/user-h1")
        assert (view["selector"], view["selector_source"], view["within_selector"]) == (
            "region=eu",
            "header",
            True,
        )
        view = await admin_get(router, f"/admin/sessions/{sorted(expected)[0]}")
        assert (view["selector"], view["selector_source"]) == ("canary=true", "rule")

        # Bad headers are the client's error, answered before any placement.
        for value, why in (("region", "is not key=value"), ("region=mars", "no instance has")):
            status, body = await create(http, router, "user-bad", **{"X-Placement": value})
            assert status == 400 and body["error"] == "bad_placement", body
            assert why in body["message"]
        assert rt.smap.cached("user-bad") is None

    listing = await admin_get(router, "/admin/instances")
    assert [i["labels"] for i in listing["instances"]] == labels


# -- failover ----------------------------------------------------------------------------


async def test_failover_stays_within_the_selector_then_leaves_it_and_says_so(
    sim_fleet: SimFleetFactory, start_router: StartRouter
) -> None:
    # wa-3 is by far the least loaded (10x the capacity): without selectors,
    # every restore would go there. wa-1 takes both sessions first.
    labels = [{"region": "eu"}, {"region": "eu"}, {"region": "us"}]
    placement = PlacementConfig(
        rules=(
            PlacementRule({"region": "eu"}, sessions="eu_*"),
            PlacementRule({"region": "eu"}, sessions="gdpr_*", strict=True),
        )
    )
    fleet, router = await start(
        sim_fleet, start_router, labels, placement, max_sessions=[30, 10, 300]
    )
    rt = router.runtime
    async with router.client() as http:
        for name in ("eu_a", "gdpr_b"):
            assert await created_on(http, router, name) == "wa-1"
            await fleet.by_name("wa-1").wait_session(name)
        before = await scrape(http, router.url)

        fleet.by_name("wa-1").kill()
        assert await send(http, router, "eu_a") == 201
        assert await send(http, router, "gdpr_b") == 201
        assert rt.smap.cached("eu_a") == rt.smap.cached("gdpr_b") == "wa-2"
        await down(rt, "wa-1")

        # No EU instance left: the soft selector's session leaves it (running
        # beats offline), the strict one stays down.
        fleet.by_name("wa-2").kill()
        assert await send(http, router, "eu_a") == 201
        assert rt.smap.cached("eu_a") == "wa-3"
        assert await send(http, router, "gdpr_b") == 503
        after = await scrape(http, router.url)

    name = "wa_router_placement_selector_misses_total"
    assert after.delta(before, name, action="failover", outcome="outside") == 1
    assert after.delta(before, name, action="failover", outcome="refused") >= 1
    (outside,) = rt.events.recent(kind="placement_outside")
    assert outside | {"ts": 0} == {
        "ts": 0,
        "kind": "placement_outside",
        "session": "eu_a",
        "selector": "region=eu",
        "source": "rule",
        "strict": False,
        "action": "failover",
        "instance": "wa-3",
    }
    refused = rt.events.recent(kind="placement_refused")
    assert refused and {e["session"] for e in refused} == {"gdpr_b"}
    view = await admin_get(router, "/admin/sessions/eu_a")
    assert (view["selector"], view["within_selector"]) == ("region=eu", False)


async def test_a_header_chosen_selector_survives_in_the_store_for_another_replica(
    sim_fleet: SimFleetFactory, start_router: StartRouter, redis_url: str, redis_prefix: str
) -> None:
    labels = [{"region": "eu"}, {"region": "us"}, {"region": "eu"}]
    placement = PlacementConfig(header="X-Placement")
    fleet = sim_fleet(3, api_key=INSTANCE_KEY, start_delay=0.02)
    store = {"store": redis_url, "key_prefix": redis_prefix}
    # wa-2 (us) is the big one: a failover that forgot the header would pick it.
    caps = [10, 100, 10]
    _, one = await start(
        sim_fleet, start_router, labels, placement, max_sessions=caps, fleet=fleet, **store
    )
    _, two = await start(
        sim_fleet, start_router, labels, placement, max_sessions=caps, fleet=fleet, **store
    )
    async with one.client() as http:
        owner = await created_on(http, one, "pinned-eu", **{"X-Placement": "region=eu"})
        assert owner == "wa-1"
        await fleet.by_name(owner).wait_session("pinned-eu")
    fleet.by_name(owner).kill()
    # The other replica recovers it: only the store's note can tell it the selector.
    async with two.client() as http:
        assert await send(http, two, "pinned-eu") == 201
    assert two.runtime.smap.cached("pinned-eu") == "wa-3"
    view = await admin_get(two, "/admin/sessions/pinned-eu")
    assert (view["selector"], view["selector_source"], view["selector_strict"]) == (
        "region=eu",
        "header",
        True,
    )


# -- drain -------------------------------------------------------------------------------


async def test_drain_keeps_sessions_within_their_selector_when_it_can(
    sim_fleet: SimFleetFactory, start_router: StartRouter
) -> None:
    labels = [{"region": "eu"}, {"region": "eu"}, {"region": "us"}]
    placement = PlacementConfig(
        header="X-Placement",
        rules=(PlacementRule({"region": "eu"}, sessions="eu_*"),),
    )
    fleet, router = await start(
        sim_fleet,
        start_router,
        labels,
        placement,
        max_sessions=[100, 10, 1000],
        discovery=DiscoveryConfig(interval=0, migrate_concurrency=4),
    )
    rt = router.runtime
    migration = rt.migration
    soft = [f"eu_{i}" for i in range(4)]
    async with router.client() as http:
        for name in soft:
            assert await created_on(http, router, name) == "wa-1"
        strict = await created_on(http, router, "hdr", **{"X-Placement": "region=eu"})
        assert strict == "wa-1"
        for name in [*soft, "hdr"]:
            await fleet.by_name("wa-1").wait_session(name)

    job = await migration.drain("wa-1")
    assert await job.wait(20)
    assert (job.moved, job.failed) == (5, 0), job.as_dict()
    assert {rt.smap.cached(s) for s in [*soft, "hdr"]} == {"wa-2"}

    # Nowhere else in the EU: the soft ones leave their selector (the move
    # says so), the header's strict one stays where it is.
    job = await migration.drain("wa-2")
    assert await job.wait(20)
    assert (job.moved, job.failed) == (4, 1), job.as_dict()
    assert {rt.smap.cached(s) for s in soft} == {"wa-3"}
    assert rt.smap.cached("hdr") == "wa-2"
    (failure,) = job.failures
    assert (failure.session, failure.error) == ("hdr", "no_capacity")
    assert "region=eu" in failure.detail and "strict" in failure.detail
    moves = [e for e in rt.events.recent(kind="move") if e["source"] == "wa-2" and e["ok"]]
    assert all("outside its selector region=eu" in e["detail"] for e in moves) and moves
    outside = rt.events.recent(kind="placement_outside")
    assert sorted(e["session"] for e in outside) == soft
    assert {e["action"] for e in outside} == {"drain"}


# -- the config file -------------------------------------------------------------------

GOOD = """\
instance_defaults:
  labels: {engine: waha}
instances:
  - {name: wa-1, url: "http://127.0.0.1:3101", labels: {region: eu}}
  - {name: wa-2, url: "http://127.0.0.1:3102", labels: {region: us, engine: webjs}}
  - {name: wa-3, url: "http://127.0.0.1:3103"}
placement:
  header: X-Placement
  rules:
    - {sessions: "eu_*", select: {region: eu}, strict: true}
    - {select: {engine: webjs}, weight: 5}
"""


def test_labels_and_rules_load_from_yaml_with_instance_defaults() -> None:
    cfg = parse_text(GOOD, "router.yaml")
    # An instance's own labels replace the defaults' (no merge).
    assert [dict(i.labels) for i in cfg.instances] == [
        {"region": "eu"},
        {"region": "us", "engine": "webjs"},
        {"engine": "waha"},
    ]
    rules = cfg.placement.rules
    assert (rules[0].sessions, dict(rules[0].select), rules[0].strict) == (
        "eu_*",
        {"region": "eu"},
        True,
    )
    assert (rules[1].sessions, rules[1].weight, rules[1].strict) == ("*", 5.0, False)
    assert cfg.placement.header == "X-Placement" and cfg.placement.header_strict is True


@pytest.mark.parametrize(
    ("edit", "line", "fragment"),
    [
        (("{region: eu}}", "{region: e u}}"), 4, "labels.region: must be a label value"),
        (("{region: eu}}", "{re gion: eu}}"), 4, "labels.re gion: must be a label key"),
        (("{region: eu}}", "{region: true}}"), 4, "must be a string, got true"),
        (("weight: 5", "weight: 150"), 11, "weight: must be a number in 0.01..100"),
        (("select: {engine: webjs}", "select: {}"), 11, "select: name at least one label"),
        (("{engine: webjs}, weight", "{engine: node}, weight"), 8, "selects labels no instance"),
        (("header: X-Placement", "header: X Placement"), 8, "an HTTP header name"),
        (("strict: true", "strict: yes please"), 10, "true or false"),
    ],
)
def test_check_config_says_where_a_label_or_rule_is_wrong(
    edit: tuple[str, str], line: int, fragment: str
) -> None:
    text = GOOD.replace(*edit)
    assert text != GOOD
    with pytest.raises(ConfigError) as info:
        parse_text(text, "router.yaml")
    err = info.value
    assert (err.line, fragment in err.reason) == (line, True), str(err)
