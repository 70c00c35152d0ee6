"""Fleet-wide listings (router/listings.py): a list call answered from every instance.

Unit level: each adapter's ``ListShape`` and ``merge`` on answers in the
upstream's own shape (WAHA, Blazz, wwebjs-api, Evolution v1 / v2 / wrapped,
generic lists and id-keyed mappings): duplicates keep the mapped owner's
copy, a scope filters, counts follow. End to end: three real simulator
processes behind a real router, WAHA and Blazz: the merged list, one
instance stopped or hung (200 + ``X-Router-Partial`` + an admin event),
none answering (502).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import signal
import time
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict, MultiDict

from router.adapters import build_adapter
from router.adapters.base import Adapter, ListShape, UpstreamRequest
from router.config import AdapterConfig, ClientKey
from router.listings import PARTIAL_HEADER, _decode, _encode, merge, read_answer
from router.scoping import Scope
from tests.support.router import (
    INSTANCE_KEY,
    ROUTER_KEY,
    RouterHandle,
    StartRouter,
    router_config,
)
from tests.support.simulator import SimFleet, SimFleetFactory
from tests.test_discovery import bulk

ADMIN_KEY = "admin-key-for-listings"


def adapter(kind: str, options: dict[str, Any] | None = None) -> Adapter:
    return build_adapter(AdapterConfig(kind, options or {}))


def get(path: str, **query: str) -> UpstreamRequest:
    return UpstreamRequest("GET", path, MultiDict(query), CIMultiDict())


def shape_of(a: Adapter, path: str) -> ListShape:
    shape = a.list_shape(get(path))
    assert shape is not None, path
    return shape


def merged(
    shape: ListShape,
    answers: dict[str, Any],
    owners: dict[str, str] | None = None,
    scope: Scope | None = None,
) -> Any:
    listed = [read_answer(name, shape, data) for name, data in answers.items()]
    assert all(x is not None for x in listed)
    return merge(
        shape,
        [x for x in listed if x is not None],
        owner_of=(owners or {}).get,
        scope=scope,
    )


# -- which requests are list calls -------------------------------------------------


def test_each_adapter_declares_its_list_calls() -> None:
    waha, blazz = adapter("waha"), adapter("blazz")
    wwebjs, evolution = adapter("wwebjs"), adapter("evolution")
    for a, path in (
        (waha, "/api/sessions"),
        (waha, "/api/sessions/"),
        (waha, "/API/Sessions"),  # Express ignores case
        (blazz, "/api/sessions"),
        (wwebjs, "/session/getSessions"),
        (evolution, "/instance/fetchInstances"),
    ):
        assert a.list_shape(get(path)) is not None, (a.name, path)
    for a, req in (
        (waha, UpstreamRequest("POST", "/api/sessions", MultiDict(), CIMultiDict())),
        (waha, get("/api/sessions/s1")),
        (waha, get("/api/server/status")),
        (blazz, get("/api/sessions/webjs_1_2_x/status")),
        (wwebjs, get("/session/status/s1")),
        (evolution, get("/instance/connectionState/i1")),
    ):
        assert a.list_shape(req) is None, (a.name, req.method, req.path)


# -- merges, in each upstream's own shape --------------------------------------------


def waha_item(name: str, worker: str, status: str = "WORKING") -> dict[str, Any]:
    return {"name": name, "status": status, "config": {}, "me": None, "assignedWorker": worker}


def test_waha_merge_keeps_the_mapped_owners_copy_and_the_order() -> None:
    shape = shape_of(adapter("waha"), "/api/sessions")
    answers = {
        "wa-1": [waha_item("a", "wa-1"), waha_item("dup", "wa-1", "STOPPED")],
        "wa-2": [waha_item("b", "wa-2"), waha_item("dup", "wa-2")],
        "wa-3": [waha_item("dup", "wa-3", "FAILED"), {"no": "name"}],
    }
    out = merged(shape, answers, owners={"dup": "wa-2"})
    assert out == [
        waha_item("a", "wa-1"),
        waha_item("dup", "wa-2"),  # the owner's copy, where the first copy was
        waha_item("b", "wa-2"),
        {"no": "name"},  # unscoped keys see what the router cannot name
    ]
    # Unmapped: the first copy (config order) stays.
    assert merged(shape, answers)[1] == waha_item("dup", "wa-1", "STOPPED")
    # A scope: only its sessions, and nothing it cannot name.
    assert merged(shape, answers, scope=Scope(["b", "d*"]), owners={"dup": "wa-3"}) == [
        waha_item("dup", "wa-3", "FAILED"),
        waha_item("b", "wa-2"),
    ]


def test_blazz_merge_keeps_its_envelope_and_counts_the_total() -> None:
    shape = shape_of(adapter("blazz"), "/api/sessions")

    def item(sid: str) -> dict[str, Any]:
        return {"session_id": sid, "workspace_id": int(sid.split("_")[1]), "status": "connected"}

    a, b, c = "webjs_12_1_a", "webjs_12_1_b", "webjs_7_1_c"
    answers = {
        "b1": {"success": True, "sessions": [item(a), item(c)], "total": 2},
        "b2": {"success": True, "sessions": [item(b)], "total": 1},
        "b3": {"success": True, "sessions": [], "total": 0},
    }
    assert merged(shape, answers) == {
        "success": True,
        "sessions": [item(a), item(c), item(b)],
        "total": 3,
    }
    assert merged(shape, answers, scope=Scope(["webjs_12_*"])) == {
        "success": True,
        "sessions": [item(a), item(b)],
        "total": 2,
    }
    # The answers themselves are not changed by the merge.
    assert answers["b1"]["total"] == 2 and len(answers["b1"]["sessions"]) == 2


def test_wwebjs_merge_of_id_lists() -> None:
    shape = shape_of(adapter("wwebjs"), "/session/getSessions")
    answers = {
        "w1": {"success": True, "result": ["s1", "s2"]},
        "w2": {"success": True, "result": ["s2", {"id": "s3"}, "bad id!"]},
    }
    assert merged(shape, answers) == {
        "success": True,
        "result": ["s1", "s2", {"id": "s3"}, "bad id!"],
    }
    assert merged(shape, answers, scope=Scope(["s3", "s1"])) == {
        "success": True,
        "result": ["s1", {"id": "s3"}],
    }


def test_evolution_merge_of_v1_v2_and_wrapped_answers() -> None:
    shape = shape_of(adapter("evolution"), "/instance/fetchInstances")
    v2 = [{"name": "i1", "connectionStatus": "open"}, {"name": "i2", "connectionStatus": "close"}]
    v1 = [{"instance": {"instanceName": "i3", "status": "open"}}]
    assert merged(shape, {"e1": v2, "e2": v1}) == [*v2, *v1]
    wrapped = {"instances": [{"name": "i4", "connectionStatus": "open"}]}
    assert merged(shape, {"e1": wrapped, "e2": v2}, scope=Scope(["i4", "i2"])) == {
        "instances": [{"name": "i4", "connectionStatus": "open"}, v2[1]]
    }
    # A body that is no list of instances is no answer.
    assert read_answer("e1", shape, {"error": "nope"}) is None
    assert read_answer("e1", shape, {"i1": {}}) is None


def test_generic_merge_of_lists_and_id_keyed_mappings() -> None:
    base: dict[str, Any] = {
        "session_rules": [{"path": "^/x/(?P<session>[^/]+)"}],
        "probe": {"path": "/x/{session}"},
        "health": {"path": "/health"},
    }
    listing = adapter("generic", {**base, "list": {"path": "/all", "sessions_field": "data.items"}})
    shape = shape_of(listing, "/all")
    assert listing.list_shape(get("/other")) is None
    answers = {
        "g1": {"ok": True, "data": {"items": [{"name": "s1"}, {"name": 7}]}},
        "g2": {"ok": True, "data": {"items": [{"name": "s2"}]}},
    }
    assert merged(shape, answers) == {
        "ok": True,
        "data": {"items": [{"name": "s1"}, {"name": 7}, {"name": "s2"}]},
    }
    keyed = adapter("generic", {**base, "list": {"path": "/all", "sessions_field": "sessions"}})
    shape = shape_of(keyed, "/all")
    answers = {"g1": {"sessions": {"s1": {"up": 1}}}, "g2": {"sessions": {"s2": {}, "s1": {}}}}
    assert merged(shape, answers, owners={"s1": "g2"}) == {"sessions": {"s1": {}, "s2": {}}}
    assert merged(shape, answers, scope=Scope(["s2"])) == {"sessions": {"s2": {}}}


def test_answers_the_fast_json_codec_refuses_are_read_and_written_as_json_reads_them() -> None:
    # A lone surrogate escape and an out-of-range number: JSON.parse reads
    # both; msgspec does not, so the json module takes over for them.
    raw = b'[{"name": "s1", "pushName": "\\ud83d", "n": 1e400}]'
    data = _decode(raw)
    assert data == [{"name": "s1", "pushName": "\ud83d", "n": None}]
    out = _encode(data)
    assert json.loads(out) == data
    assert _encode({"a": "é"}) == '{"a":"é"}'.encode()
    with pytest.raises(ValueError):
        _decode(b"<html>")


# -- end to end: real simulators behind a real router ----------------------------------


async def list_call(
    http: aiohttp.ClientSession, url: str, **params: str
) -> tuple[int, Any, str | None]:
    async with http.get(url, params=params) as resp:
        return resp.status, await resp.json(), resp.headers.get(PARTIAL_HEADER)


async def events(router: RouterHandle, kind: str) -> list[dict[str, Any]]:
    async with (
        aiohttp.ClientSession(headers={"X-Admin-Key": ADMIN_KEY}) as http,
        http.get(f"{router.url}/admin/events", params={"kind": kind}) as resp,
    ):
        assert resp.status == 200, await resp.text()
        found: list[dict[str, Any]] = (await resp.json())["events"]
        return found


async def test_waha_list_is_the_whole_fleet_and_names_an_instance_that_did_not_answer(
    sim_fleet: SimFleetFactory, start_router: StartRouter
) -> None:
    fleet = sim_fleet(3, api_key=INSTANCE_KEY)
    await bulk(fleet[0], names=["a1", "a2", "dup"])
    await bulk(fleet[1], names=["b1", "dup"])
    await bulk(fleet[1], names=["b-stopped"], status="STOPPED")
    await bulk(fleet[2], names=["c1"])
    router = await start_router(fleet.urls, names=[p.name for p in fleet], admin_key=ADMIN_KEY)
    # The map names the second copy: the list shows that one.
    await router.runtime.smap.assign("dup", "wa-2")
    url = f"{router.url}/api/sessions"
    async with router.client() as http:
        status, body, partial = await list_call(http, url)
        assert status == 200 and partial is None
        assert [s["name"] for s in body] == ["a1", "a2", "dup", "b1", "c1"]
        assert next(s for s in body if s["name"] == "dup")["assignedWorker"] == "wa-2"
        # Each item as its instance gave it.
        async with http.get(
            f"{fleet[2].url}/api/sessions", headers={"X-Api-Key": INSTANCE_KEY}
        ) as resp:
            assert [s for s in body if s["name"] == "c1"] == await resp.json()
        # The query goes to every instance (WAHA's all=true lists STOPPED too).
        status, body, _ = await list_call(http, url, all="true")
        assert status == 200 and "b-stopped" in [s["name"] for s in body]

        fleet[1].stop()
        for _ in range(2):  # twice: one event for the same missing instance
            status, body, partial = await list_call(http, url)
            assert status == 200, body
            assert partial == "wa-2"
            assert [s["name"] for s in body] == ["a1", "a2", "dup", "c1"]
        # dup's owner did not answer: the other copy is listed.
        assert next(s for s in body if s["name"] == "dup")["assignedWorker"] == "wa-1"
    reported = await events(router, "listing_partial")
    assert len(reported) == 1, reported
    assert reported[0]["instances"] == ["wa-2"] and reported[0]["path"] == "/api/sessions"
    assert reported[0]["reasons"]["wa-2"] in ("connect", "down")


async def test_a_hung_instance_costs_the_list_call_no_more_than_its_health_checks(
    sim_fleet: SimFleetFactory, start_router: StartRouter
) -> None:
    fleet = sim_fleet(2, api_key=INSTANCE_KEY)
    await bulk(fleet[0], names=["h1"])
    await bulk(fleet[1], names=["h2"])
    router = await start_router(fleet.urls, names=[p.name for p in fleet])
    fleet[1].pause()  # SIGSTOP: connects, never answers
    try:
        async with router.client() as http:
            started = time.monotonic()
            status, body, partial = await list_call(http, f"{router.url}/api/sessions")
            took = time.monotonic() - started
    finally:
        fleet[1].kill(signal.SIGCONT)
    assert status == 200 and partial == "wa-2"
    assert [s["name"] for s in body] == ["h1"]
    # Health checks (0.2 s apart, 0.5 s timeout, fall 2) take it down and
    # release the call, well before the connect + read bound (6 s here).
    print(f"list call with a hung instance: {took:.2f}s")
    assert took < 4.0


async def test_no_instance_answering_is_a_502_and_an_event(
    sim_fleet: SimFleetFactory, start_router: StartRouter
) -> None:
    fleet = sim_fleet(2, api_key=INSTANCE_KEY)
    router = await start_router(fleet.urls, names=[p.name for p in fleet], admin_key=ADMIN_KEY)
    await asyncio.gather(*(p.fault("error", status=500, paths="/api/sessions") for p in fleet))
    async with router.client() as http:
        status, body, _ = await list_call(http, f"{router.url}/api/sessions")
    assert status == 502, body
    assert body["error"] == "listing_failed"
    assert body["instances"] == {"wa-1": "HTTP 500", "wa-2": "HTTP 500"}
    assert [e["instances"] for e in await events(router, "listing_failed")] == [["wa-1", "wa-2"]]


async def test_a_client_error_every_instance_gives_is_relayed_not_a_502(
    sim_fleet: SimFleetFactory, start_router: StartRouter
) -> None:
    """Found by bench/hostile's fuzz: ``Expect: 200-ok`` on a list call made
    every instance answer 417 (as Node's HTTP server does), and the router
    answered 502 ``listing_failed``, blaming the fleet for the request. A
    pass-through would relay the 417; so does the listing. An instance that
    refuses the router's own credential is the fleet's problem: still 502."""
    fleet = sim_fleet(2, api_key=INSTANCE_KEY)
    await bulk(fleet[0], names=["e1"])
    router = await start_router(fleet.urls, names=[p.name for p in fleet])
    url = f"{router.url}/api/sessions"
    async with router.client() as http:
        async with http.get(url, headers={"Expect": "200-ok"}) as resp:
            assert resp.status == 417, await resp.text()
            assert resp.headers["X-Request-Id"]
        status, body, _ = await list_call(http, url)
        assert status == 200 and [s["name"] for s in body] == ["e1"]
    wrong_keys = router_config(
        fleet.urls, names=[p.name for p in fleet], instance_keys=["wrong", "wrong"]
    )
    router2 = await start_router(config=wrong_keys)
    async with router2.client() as http:
        status, body, _ = await list_call(http, f"{router2.url}/api/sessions")
    assert status == 502, body
    assert body["instances"] == {"wa-1": "HTTP 401", "wa-2": "HTTP 401"}


BLAZZ_KEYS = ["key-of-b1", "key-of-b2", "key-of-b3"]


async def blazz_fleet(
    sim_fleet: SimFleetFactory,
    start_router: StartRouter,
    api_keys: tuple[ClientKey, ...] | None = None,
) -> tuple[SimFleet, RouterHandle]:
    fleet = sim_fleet(3, dialect="blazz", api_keys=BLAZZ_KEYS)
    await bulk(fleet[0], names=["webjs_12_1_a", "webjs_7_1_x"], workspace_id=12)
    await bulk(fleet[1], names=["webjs_12_1_b"], workspace_id=12)
    await bulk(fleet[2], names=["webjs_12_1_c", "webjs_7_1_y"], workspace_id=7)
    cfg = router_config(
        fleet.urls,
        names=[p.name for p in fleet],
        adapter="blazz",
        instance_keys=BLAZZ_KEYS,
        admin_key=ADMIN_KEY,
    )
    if api_keys is not None:
        cfg = dataclasses.replace(cfg, api_keys=api_keys)
    return fleet, await start_router(config=cfg)


async def test_blazz_list_is_the_whole_fleet_in_its_own_envelope(
    sim_fleet: SimFleetFactory, start_router: StartRouter
) -> None:
    fleet, router = await blazz_fleet(sim_fleet, start_router)
    url = f"{router.url}/api/sessions"
    async with aiohttp.ClientSession() as http:
        status, body, partial = await list_call(http, url, api_key=ROUTER_KEY)
        assert status == 200 and partial is None, body
        assert body["success"] is True and body["total"] == 5
        names = [s["session_id"] for s in body["sessions"]]
        assert names == [
            "webjs_12_1_a",
            "webjs_7_1_x",
            "webjs_12_1_b",
            "webjs_12_1_c",
            "webjs_7_1_y",
        ]
        assert set(body["sessions"][0]) == {
            "session_id",
            "workspace_id",
            "status",
            "phone_number",
            "connected_at",
        }
        # Every instance got its own key in the query (else its 401 would make this partial).
        status, body, _ = await list_call(http, url, api_key="wrong")
        assert status == 401
        fleet[2].stop()
        status, body, partial = await list_call(http, url, api_key=ROUTER_KEY)
    assert status == 200 and partial == "blazz-3"
    assert body["total"] == 3
    assert [e["instances"] for e in await events(router, "listing_partial")] == [["blazz-3"]]


async def test_blazz_list_with_a_key_limited_to_a_workspace(
    sim_fleet: SimFleetFactory, start_router: StartRouter
) -> None:
    scoped = "tenant-12-key"
    _fleet, router = await blazz_fleet(
        sim_fleet,
        start_router,
        api_keys=(ClientKey(ROUTER_KEY), ClientKey(scoped, ("webjs_12_*",))),
    )
    async with aiohttp.ClientSession() as http:
        status, body, _ = await list_call(http, f"{router.url}/api/sessions", api_key=scoped)
    assert status == 200, body
    assert [s["session_id"] for s in body["sessions"]] == [
        "webjs_12_1_a",
        "webjs_12_1_b",
        "webjs_12_1_c",
    ]
    assert body["total"] == 3
