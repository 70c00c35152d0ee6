"""End to end: client -> real router -> real simulated WAHA instance processes."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from router.config import Limits, Timeouts
from tests.support.router import INSTANCE_KEY, ROUTER_KEY, RouterHandle, StartRouter
from tests.support.simulator import SimFleet, SimFleetFactory


async def create(http: aiohttp.ClientSession, router: RouterHandle, name: str) -> int:
    async with http.post(f"{router.url}/api/sessions", json={"name": name}) as resp:
        await resp.read()
        return resp.status


async def echo(http: aiohttp.ClientSession, router: RouterHandle, path: str) -> dict[str, Any]:
    async with http.get(router.url + path) as resp:
        assert resp.status == 200, await resp.text()
        body: dict[str, Any] = await resp.json()
        return body


async def fleet_router(
    sim_fleet: SimFleetFactory, start_router: StartRouter, n: int = 3, **kwargs: Any
) -> tuple[SimFleet, RouterHandle]:
    fleet = sim_fleet(n, api_key=INSTANCE_KEY)
    router = await start_router(fleet.urls, names=[p.name for p in fleet], **kwargs)
    return fleet, router


async def test_thousand_sessions_each_always_reach_their_instance(
    sim_fleet: SimFleetFactory, start_router: StartRouter
) -> None:
    _fleet, router = await fleet_router(sim_fleet, start_router)
    names = [f"s{i}" for i in range(1000)]
    async with router.client() as http:
        for batch in range(0, 1000, 100):
            statuses = await asyncio.gather(
                *(create(http, router, n) for n in names[batch : batch + 100])
            )
            assert set(statuses) == {201}
        owners = {n: router.runtime.smap.cached(n) for n in names}
        assert None not in owners.values()

        async def where(name: str) -> str:
            return str((await echo(http, router, f"/api/{name}/me"))["instance"])

        for _ in range(2):
            seen = await asyncio.gather(*(where(n) for n in names))
            assert dict(zip(names, seen, strict=True)) == owners

    # Balanced placement on equal capacity: the spread is at most one session.
    counts = Counter(owners.values())
    assert set(counts) == {"wa-1", "wa-2", "wa-3"}
    assert max(counts.values()) - min(counts.values()) <= 1


async def test_placement_respects_capacity_weight_and_reports_a_full_fleet(
    sim_fleet: SimFleetFactory, start_router: StartRouter
) -> None:
    _fleet, router = await fleet_router(
        sim_fleet, start_router, max_sessions=[2, 4, 8], weights=[1.0, 1.0, 2.0]
    )
    async with router.client() as http:
        for i in range(14):
            assert await create(http, router, f"p{i}") == 201
        assert dict(router.runtime.smap.counts()) == {"wa-1": 2, "wa-2": 4, "wa-3": 8}
        async with http.post(f"{router.url}/api/sessions", json={"name": "one-too-many"}) as resp:
            assert resp.status == 503
            assert resp.headers["Retry-After"]
            body = await resp.json()
    assert body["error"] == "fleet_full"
    assert body["session"] == "one-too-many"
    assert body["request_id"]
    assert router.runtime.smap.cached("one-too-many") is None


async def test_create_without_name_is_placed_and_learned_from_the_answer(
    sim_fleet: SimFleetFactory, start_router: StartRouter
) -> None:
    _fleet, router = await fleet_router(sim_fleet, start_router, n=2)
    async with router.client() as http:
        async with http.post(f"{router.url}/api/sessions", json={}) as resp:
            assert resp.status == 201
            name = (await resp.json())["name"]
        owner = router.runtime.smap.cached(name)
        assert owner is not None
        assert (await echo(http, router, f"/api/{name}/me"))["instance"] == owner


async def test_unknown_session_is_found_where_it_runs_and_never_guessed(
    sim_fleet: SimFleetFactory, start_router: StartRouter
) -> None:
    fleet, router = await fleet_router(sim_fleet, start_router)
    # Started on wa-3 behind the router's back (as after a router restart).
    async with aiohttp.ClientSession(headers={"X-Api-Key": INSTANCE_KEY}) as direct:
        async with direct.post(f"{fleet[2].url}/api/sessions", json={"name": "hidden"}) as r:
            assert r.status == 201
    await fleet[2].wait_session("hidden")
    assert router.runtime.smap.cached("hidden") is None

    async with router.client() as http:
        assert (await echo(http, router, "/api/hidden/me"))["instance"] == "wa-3"
        assert router.runtime.smap.cached("hidden") == "wa-3"

        async with http.get(f"{router.url}/api/ghost/me") as resp:
            assert resp.status == 404
            body = await resp.json()
    assert body["error"] == "unknown_session"
    assert body["session"] == "ghost"
    assert router.runtime.smap.cached("ghost") is None


@pytest.mark.parametrize(
    ("method", "path", "payload"),
    [
        ("GET", "/api/a%20b/me", None),
        ("GET", "/api/" + "x" * 200 + "/me", None),
        ("GET", "/api/sessions/..%2F..%2Fetc", None),
        ("GET", "/api/messages?session=%3Cscript%3E", None),
        ("POST", "/api/sendText", {"session": "no way", "chatId": "1@c.us", "text": "x"}),
        ("POST", "/api/sendText", {"session": 12345, "chatId": "1@c.us", "text": "x"}),
        ("POST", "/api/sendText", {"session": ["a"], "chatId": "1@c.us", "text": "x"}),
    ],
)
async def test_malformed_session_ids_get_400_and_reach_no_instance(
    sim_fleet: SimFleetFactory,
    start_router: StartRouter,
    method: str,
    path: str,
    payload: Any,
) -> None:
    fleet, router = await fleet_router(sim_fleet, start_router, n=1)
    async with router.client() as http:
        async with http.request(method, router.url + path, json=payload) as resp:
            assert resp.status == 400
            body = await resp.json()
    assert body["error"] == "bad_session_id"
    assert body["request_id"] == resp.headers["X-Request-Id"]
    assert fleet.sent() == []


async def test_router_key_is_checked_stripped_and_replaced_by_the_instance_key(
    sim_fleet: SimFleetFactory, start_router: StartRouter
) -> None:
    _fleet, router = await fleet_router(sim_fleet, start_router, n=1)
    async with router.client() as http:
        assert await create(http, router, "k1") == 201
    async with aiohttp.ClientSession() as anon:
        for headers in ({}, {"X-Api-Key": "wrong"}, {"X-Api-Key": INSTANCE_KEY}):
            async with anon.get(f"{router.url}/api/k1/me", headers=headers) as resp:
                assert resp.status == 401
                body = await resp.json()
                assert body["error"] == "unauthorized"
                assert INSTANCE_KEY not in json.dumps(body)
        # The key may also come in the query, WAHA style; it must not travel on.
        async with anon.get(f"{router.url}/api/k1/me?x-api-key={ROUTER_KEY}&a=1") as resp:
            seen = await resp.json()
    assert seen["headers"]["X-Api-Key"] == INSTANCE_KEY
    assert seen["query"] == {"a": "1"}
    assert ROUTER_KEY not in json.dumps(seen)


async def test_hop_by_hop_headers_are_dropped_and_forwarding_headers_added(
    sim_fleet: SimFleetFactory, start_router: StartRouter
) -> None:
    _fleet, router = await fleet_router(sim_fleet, start_router, n=1)
    async with router.client() as http:
        assert await create(http, router, "h1") == 201
        headers = {
            "Connection": "keep-alive, X-Private-Hop",
            "X-Private-Hop": "secret",
            "Keep-Alive": "timeout=5",
            "TE": "trailers",
            "Proxy-Authorization": "Basic eA==",
            "X-Forwarded-For": "203.0.113.7",
            "X-Custom": "kept",
        }
        async with http.get(f"{router.url}/api/h1/me", headers=headers) as resp:
            rid = resp.headers["X-Request-Id"]
            seen = await resp.json()
        async with http.get(f"{router.url}/api/h1/me", headers={"X-Request-Id": "abc-123"}) as r2:
            assert r2.headers["X-Request-Id"] == "abc-123"
            echoed = {k.lower(): v for k, v in (await r2.json())["headers"].items()}
            assert echoed["x-request-id"] == "abc-123"
    up = {k.lower(): v for k, v in seen["headers"].items()}
    for dropped in ("x-private-hop", "keep-alive", "te", "proxy-authorization"):
        assert dropped not in up
    assert up["x-custom"] == "kept"
    assert up["x-forwarded-for"] == "203.0.113.7, 127.0.0.1"
    assert up["x-forwarded-proto"] == "http"
    assert up["x-forwarded-host"] == router.url.removeprefix("http://")
    assert up["x-request-id"] == rid and len(rid) >= 16


async def test_content_encoding_passes_through_untouched(
    sim_fleet: SimFleetFactory, start_router: StartRouter
) -> None:
    _fleet, router = await fleet_router(sim_fleet, start_router, n=1)
    async with router.client() as http:
        async with http.get(f"{router.url}/_sim/gzip") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Encoding"] == "gzip"
            raw = await resp.read()
            assert hashlib.sha256(raw).hexdigest() == resp.headers["X-Sim-Sha256"]


async def test_large_bodies_stream_both_ways(
    sim_fleet: SimFleetFactory, start_router: StartRouter
) -> None:
    _fleet, router = await fleet_router(
        sim_fleet, start_router, n=1, limits=Limits(max_body_bytes=8 * 1024 * 1024)
    )
    upload = bytes(range(256)) * 20_000  # 5 MB: streamed, never buffered whole
    async with router.client() as http:
        async with http.post(f"{router.url}/_sim/echo/upload", data=upload) as resp:
            assert resp.status == 200
            seen = await resp.json()
        assert seen["length"] == len(upload)
        assert seen["sha256"] == hashlib.sha256(upload).hexdigest()
        for chunked in ("0", "1"):
            url = f"{router.url}/_sim/big?bytes=3000000&chunked={chunked}"
            async with http.get(url) as resp:
                data = await resp.read()
                assert len(data) == 3_000_000
                assert hashlib.sha256(data).hexdigest() == resp.headers["X-Sim-Sha256"]


async def test_json_body_over_the_cap_is_413_and_nothing_is_sent(
    sim_fleet: SimFleetFactory, start_router: StartRouter
) -> None:
    fleet, router = await fleet_router(
        sim_fleet, start_router, n=1, limits=Limits(max_body_bytes=1024)
    )
    payload = {"session": "default", "chatId": "1@c.us", "text": "x" * 4000}
    async with router.client() as http:
        async with http.post(f"{router.url}/api/sendText", json=payload) as resp:
            assert resp.status == 413
            assert (await resp.json())["error"] == "body_too_large"

        async def chunks() -> Any:
            for _ in range(10):
                yield b'{"session":"default","text":"' + b"y" * 200

        # No Content-Length: the cap is enforced while reading.
        async with http.post(f"{router.url}/api/sendText", data=chunks()) as resp:
            assert resp.status == 413
    assert fleet.sent() == []


async def test_unreachable_and_dropping_upstreams_give_502_json(
    sim_fleet: SimFleetFactory, start_router: StartRouter
) -> None:
    fleet, router = await fleet_router(sim_fleet, start_router, n=1)
    async with router.client() as http:
        assert await create(http, router, "d1") == 201
        await fleet[0].wait_session("d1")
        await fleet[0].fault("drop")
        send = {"session": "d1", "chatId": "1@c.us", "text": "lost"}
        async with http.post(f"{router.url}/api/sendText", json=send) as resp:
            assert resp.status == 502
            body = await resp.json()
        assert body["error"] in ("upstream_error", "upstream_unreachable")
        assert body["session"] == "d1"
        await fleet[0].fault("none")
        fleet[0].kill()
        # Its only instance is gone: failover has nowhere to restore it.
        async with http.get(f"{router.url}/api/d1/me") as resp:
            assert resp.status == 503
            assert int(resp.headers["Retry-After"]) > 0
            body = await resp.json()
    assert body["error"] == "session_unavailable"
    assert body["instance"] == "wa-1"
    assert fleet.sent() == []


async def test_slow_upstream_gives_504_json(
    sim_fleet: SimFleetFactory, start_router: StartRouter
) -> None:
    fleet, router = await fleet_router(
        sim_fleet, start_router, n=1, timeouts=Timeouts(connect=1.0, read=0.3)
    )
    async with router.client() as http:
        assert await create(http, router, "t1") == 201
        await fleet[0].fault("slow", delay=3)
        async with http.get(f"{router.url}/api/t1/me") as resp:
            assert resp.status == 504
            body = await resp.json()
    assert body["error"] == "upstream_timeout"
    assert body["session"] == "t1"


async def test_chunked_and_sse_responses_are_flushed_as_they_arrive(
    start_router: StartRouter, aiohttp_server: Any
) -> None:
    release = asyncio.Event()

    async def health(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def gated(request: web.Request) -> web.StreamResponse:
        # The second event is only sent after the client has seen the first:
        # a proxy that buffers would never deliver it, and the test times out.
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"data: first\n\n")
        await asyncio.wait_for(release.wait(), timeout=10)
        await resp.write(b"data: second\n\n")
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/events", gated)
    upstream = await aiohttp_server(app)
    router = await start_router([str(upstream.make_url(""))])
    async with router.client() as http, http.get(f"{router.url}/events") as resp:
        assert resp.headers["Content-Type"] == "text/event-stream"
        first = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), timeout=5)
        assert first == b"data: first\n\n"
        release.set()
        rest = await asyncio.wait_for(resp.content.read(), timeout=5)
        assert rest == b"data: second\n\n"


async def test_websocket_is_proxied_for_one_session_and_fanned_out_for_star(
    sim_fleet: SimFleetFactory, start_router: StartRouter
) -> None:
    fleet, router = await fleet_router(sim_fleet, start_router, n=2)
    async with router.client() as http:
        assert await create(http, router, "w1") == 201
        assert await create(http, router, "w2") == 201
        await fleet[0].wait_session("w1")
        await fleet[1].wait_session("w2")
        assert {router.runtime.smap.cached("w1"), router.runtime.smap.cached("w2")} == {
            "wa-1",
            "wa-2",
        }
        one = await http.ws_connect(f"{router.url}/ws?session=w1&x-api-key={ROUTER_KEY}")
        star = await http.ws_connect(f"{router.url}/ws?session=*&x-api-key={ROUTER_KEY}")
        await one.send_str("ping")
        assert (await one.receive_json(timeout=5)) == {"event": "echo", "data": "ping"}
        for s in ("w1", "w2"):
            send = {"session": s, "chatId": "1@c.us", "text": f"to {s}"}
            async with http.post(f"{router.url}/api/sendText", json=send) as resp:
                assert resp.status in (200, 201)
        event = await one.receive_json(timeout=5)
        assert event["event"] == "message" and event["session"] == "w1"
        got = {(await star.receive_json(timeout=5))["session"] for _ in range(2)}
        assert got == {"w1", "w2"}
        await one.close()
        await star.close()


async def test_redis_store_survives_a_router_restart(
    sim_fleet: SimFleetFactory, start_router: StartRouter, redis_url: str, redis_prefix: str
) -> None:
    fleet = sim_fleet(2, api_key=INSTANCE_KEY)
    kwargs: dict[str, Any] = {
        "names": [p.name for p in fleet],
        "store": redis_url,
        "key_prefix": redis_prefix,
    }
    first = await start_router(fleet.urls, **kwargs)
    async with first.client() as http:
        for i in range(20):
            assert await create(http, first, f"r{i}") == 201
    owners = {f"r{i}": first.runtime.smap.cached(f"r{i}") for i in range(20)}
    await first.server.shutdown()

    second = await start_router(fleet.urls, **kwargs)
    # Warmed from Redis at start: known without asking any instance.
    assert {s: second.runtime.smap.cached(s) for s in owners} == owners
    async with second.client() as http:
        for s, owner in owners.items():
            assert (await echo(http, second, f"/api/{s}/me"))["instance"] == owner


async def test_healthz_and_readyz(sim_fleet: SimFleetFactory, start_router: StartRouter) -> None:
    fleet, router = await fleet_router(sim_fleet, start_router, n=1)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{router.url}/healthz") as resp:
            assert resp.status == 200
        async with http.get(f"{router.url}/readyz") as resp:
            assert resp.status == 200
            assert (await resp.json())["healthy_instances"] == ["wa-1"]
        fleet[0].kill()
        await router.server.health.wait_round()  # type: ignore[union-attr]
        await router.server.health.wait_round()  # type: ignore[union-attr]
        async with http.get(f"{router.url}/readyz") as resp:
            assert resp.status == 503


async def test_the_body_cap_holds_for_streamed_bodies_too(
    sim_fleet: SimFleetFactory, start_router: StartRouter
) -> None:
    _fleet, router = await fleet_router(
        sim_fleet, start_router, n=1, limits=Limits(max_body_bytes=1024 * 1024)
    )
    upload = b"x" * (2 * 1024 * 1024)

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(upload), 65536):
            yield upload[i : i + 65536]

    async with router.client() as http:
        # Declared too large: refused before a byte goes upstream.
        async with http.post(f"{router.url}/_sim/echo/upload", data=upload) as resp:
            assert resp.status == 413
            assert (await resp.json())["error"] == "body_too_large"
        # Chunked, found too large on the way: still a 413, not an upstream error.
        async with http.post(f"{router.url}/_sim/echo/upload", data=chunks()) as resp:
            assert resp.status == 413, await resp.text()
            assert (await resp.json())["error"] == "body_too_large"
