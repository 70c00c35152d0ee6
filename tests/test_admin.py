"""The admin API over HTTP, and the CLI commands against a running router."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from router.admin import ROUTES, AdminAPI, json_response, path_regex
from router.config import RouterConfig
from router.openapi import OPERATIONS, document
from tests.support.router import INSTANCE_KEY, ROUTER_KEY, RouterHandle, StartRouter
from tests.support.simulator import REPO_ROOT, SimFleet, SimFleetFactory, SimProcess

ADMIN_KEY = "admin-secret-key"


async def bulk(proc: SimProcess, **body: Any) -> None:
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{proc.url}/_sim/bulk_sessions", json=body) as resp,
    ):
        assert resp.status == 200, await resp.text()


async def admin(
    router: RouterHandle,
    method: str,
    path: str,
    *,
    key: str | None = ADMIN_KEY,
    body: Any = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any, aiohttp.ClientResponse]:
    hdrs = {"X-Admin-Key": key} if key else {}
    hdrs.update(headers or {})
    async with (
        aiohttp.ClientSession() as http,
        http.request(method, router.url + path, json=body, headers=hdrs) as resp,
    ):
        text = await resp.text()
        assert resp.content_type == "application/json", text
        return resp.status, await resp.json(), resp


async def reconcile(router: RouterHandle) -> None:
    discovery = router.runtime.discovery
    assert discovery is not None
    await discovery.reconcile_now()


async def setup(
    sim_fleet: SimFleetFactory, start_router: StartRouter, n: int = 2, **kwargs: Any
) -> tuple[SimFleet, RouterHandle]:
    fleet = sim_fleet(n, api_key=INSTANCE_KEY, start_delay=0.05)
    kwargs.setdefault("admin_key", ADMIN_KEY)
    router = await start_router(fleet.urls, names=[p.name for p in fleet], **kwargs)
    return fleet, router


async def test_admin_is_404_when_no_admin_key_is_configured(
    sim_fleet: SimFleetFactory, start_router: StartRouter
) -> None:
    _fleet, router = await setup(sim_fleet, start_router, n=1, admin_key=None)
    for key in (None, ADMIN_KEY, ROUTER_KEY):
        status, body, _ = await admin(router, "GET", "/admin/instances", key=key)
        assert status == 404 and body["error"] == "not_found"


async def test_admin_key_is_required_and_client_keys_do_not_open_it(
    sim_fleet: SimFleetFactory, start_router: StartRouter
) -> None:
    _fleet, router = await setup(sim_fleet, start_router, n=1)
    status, body, resp = await admin(router, "GET", "/admin/instances", key=None)
    assert status == 401 and body["error"] == "unauthorized"
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    for headers in (
        {"X-Admin-Key": "wrong"},
        {"X-Admin-Key": ADMIN_KEY + "x"},
        {"X-Api-Key": ROUTER_KEY},
        {"Authorization": f"Bearer {ROUTER_KEY}"},
        {"Authorization": f"Basic {ADMIN_KEY}"},
    ):
        status, _, _ = await admin(router, "GET", "/admin/instances", key=None, headers=headers)
        assert status == 401, headers
    status, _, _ = await admin(
        router,
        "GET",
        "/admin/instances",
        key=None,
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
    )
    assert status == 200
    # Unknown endpoints and methods answer JSON too (after authentication).
    status, body, _ = await admin(router, "GET", "/admin/nothing-here")
    assert status == 404 and body["error"] == "not_found"
    status, body, resp = await admin(router, "DELETE", "/admin/instances")
    assert status == 405 and resp.headers["Allow"] == "GET"
    status, body, _ = await admin(router, "GET", "/admin/nothing-here", key=None)
    assert status == 401  # no probing of the route table without the key


async def test_instances_listing_shows_state_and_load_but_no_secret(
    sim_fleet: SimFleetFactory, start_router: StartRouter
) -> None:
    fleet = sim_fleet(2, api_key=INSTANCE_KEY)
    await bulk(fleet[0], names=["s1", "s2", "s3"])
    urls = [u.replace("http://", "http://user:url-password@") for u in fleet.urls]
    router = await start_router(
        urls, names=[p.name for p in fleet], admin_key=ADMIN_KEY, max_sessions=10
    )
    router.runtime.fleet.get("wa-2").healthy = False  # type: ignore[union-attr]
    async with (
        aiohttp.ClientSession(headers={"X-Admin-Key": ADMIN_KEY}) as http,
        http.get(router.url + "/admin/instances") as resp,
    ):
        text = await resp.text()
        body = await resp.json()
    for secret in (INSTANCE_KEY, "url-password", "user:", ADMIN_KEY, ROUTER_KEY):
        assert secret not in text
    one, two = body["instances"]
    assert one == {
        "name": "wa-1",
        "url": fleet[0].url,
        "healthy": True,
        "admin": "active",
        "placeable": True,
        "sessions": 3,
        "capacity": 10,
        "weight": 1.0,
        "load": 0.3,
        "removed": False,
    }
    assert (two["healthy"], two["placeable"], two["sessions"]) == (False, False, 0)
    assert body["sessions"] == 3


async def test_session_endpoints_events_and_reconcile(
    sim_fleet: SimFleetFactory, start_router: StartRouter
) -> None:
    fleet, router = await setup(sim_fleet, start_router)
    await bulk(fleet[1], names=["s1"])
    status, body, _ = await admin(router, "POST", "/admin/reconcile")
    assert status == 200 and body["assigned"] == 1 and body["failed"] == {}

    status, body, _ = await admin(router, "GET", "/admin/sessions/s1")
    assert status == 200
    assert body["instance"] == "wa-2" and body["status"] == "ready"
    assert (body["orphan"], body["moving"], body["recovering"]) == (False, False, False)
    status, body, _ = await admin(router, "GET", "/admin/sessions/nope")
    assert status == 404 and body["error"] == "unknown_session"
    status, body, _ = await admin(router, "GET", "/admin/sessions/bad%20id")
    assert status == 400 and body["error"] == "bad_session_id"

    status, body, _ = await admin(router, "DELETE", "/admin/sessions/s1")
    assert status == 200 and body == {"session": "s1", "forgotten": True, "instance": "wa-2"}
    assert router.runtime.smap.cached("s1") is None
    status, _, _ = await admin(router, "DELETE", "/admin/sessions/s1")
    assert status == 404
    status, body, _ = await admin(router, "POST", "/admin/reconcile")
    assert body["assigned"] == 1  # the instance still runs it: mapped again

    status, body, _ = await admin(router, "GET", "/admin/events?limit=2")
    assert status == 200 and len(body["events"]) == 2
    status, body, _ = await admin(router, "GET", "/admin/events?kind=forget")
    assert [e["session"] for e in body["events"]] == ["s1"]
    status, body, _ = await admin(router, "GET", "/admin/events?limit=x")
    assert status == 400


async def test_drain_undrain_maintenance_and_move_over_http(
    sim_fleet: SimFleetFactory, start_router: StartRouter
) -> None:
    fleet, router = await setup(sim_fleet, start_router, n=3)
    await bulk(fleet[0], names=["a", "b"], auth=True)
    await bulk(fleet[1], names=["c"], auth=True)
    await reconcile(router)
    assert router.runtime.smap.cached("a") == "wa-1"

    status, job, resp = await admin(router, "POST", "/admin/instances/wa-1/drain?wait=20")
    assert status == 200, job
    assert resp.headers["Location"] == "/admin/instances/wa-1/drain"
    assert (job["state"], job["moved"], job["failed"], job["total"]) == ("done", 2, 0, 2)
    status, again, _ = await admin(router, "GET", "/admin/instances/wa-1/drain")
    assert status == 200 and again["moved"] == 2
    status, listing, _ = await admin(router, "GET", "/admin/instances")
    first = listing["instances"][0]
    assert (first["name"], first["admin"], first["sessions"]) == ("wa-1", "draining", 0)
    status, body, _ = await admin(router, "POST", "/admin/instances/wa-1/undrain")
    assert status == 200 and body["admin"] == "active"
    status, body, _ = await admin(router, "POST", "/admin/instances/wa-3/maintenance")
    assert status == 200 and body["admin"] == "maintenance"
    status, body, _ = await admin(router, "GET", "/admin/instances/wa-2/drain")
    assert status == 404 and body["error"] == "no_drain"
    status, body, _ = await admin(router, "POST", "/admin/instances/wa-9/drain")
    assert status == 404 and body["error"] == "unknown_instance"

    status, body, _ = await admin(router, "POST", "/admin/sessions/c/move", body={"to": "wa-1"})
    assert status == 200 and (body["source"], body["target"], body["outcome"]) == (
        "wa-2",
        "wa-1",
        "moved",
    )
    await fleet[0].wait_session("c")
    status, body, _ = await admin(router, "POST", "/admin/sessions/c/move", body={"to": "wa-3"})
    assert status == 409 and body["error"] == "target_not_active"
    status, body, _ = await admin(router, "POST", "/admin/sessions/c/move", body={"x": 1})
    assert status == 400
    status, body, _ = await admin(router, "POST", "/admin/sessions/zz/move", body={"to": "wa-1"})
    assert status == 404 and body["error"] == "unknown_session"


async def cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """``session-router ARGS`` in a subprocess, while this loop keeps serving the router."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "router",
        *args,
        cwd=REPO_ROOT,
        env={**os.environ, **(env or {})},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_cli_drain_undrain_and_move_against_a_running_router(
    sim_fleet: SimFleetFactory, start_router: StartRouter
) -> None:
    fleet, router = await setup(sim_fleet, start_router, n=2)
    await bulk(fleet[0], names=["c1", "c2"], auth=True)
    await reconcile(router)
    conn = ["--url", router.url, "--admin-key", ADMIN_KEY]

    code, out, err = await cli("drain", "wa-1", *conn)
    assert code == 0, err
    assert "drain of wa-1 done: 2 moved, 0 failed" in out
    assert router.runtime.smap.sessions_on("wa-1") == []

    # The environment works as well as flags.
    env = {"WA_ROUTER_URL": router.url, "WA_ROUTER_ADMIN_KEY": ADMIN_KEY}
    code, out, err = await cli("undrain", "wa-1", env=env)
    assert code == 0, err
    assert out.strip() == "wa-1: active (0 sessions)"

    code, out, err = await cli("move", "c1", "--to", "wa-1", *conn)
    assert code == 0, err
    assert out.strip().startswith("moved c1: wa-2 -> wa-1 in")
    assert router.runtime.smap.cached("c1") == "wa-1"
    code, out, err = await cli("move", "c1", "--to", "wa-1", *conn)
    assert code == 0 and "already runs on wa-1" in out

    code, out, err = await cli("instances", *conn)
    assert code == 0 and "wa-1" in out and "active" in out

    # Errors: clear message on stderr, non-zero status.
    code, out, err = await cli("drain", "wa-9", *conn)
    assert code == 2 and "no instance named 'wa-9'" in err
    code, out, err = await cli(
        "move", "c1", "--to", "wa-2", "--url", router.url, "--admin-key", "x"
    )
    assert code == 2 and "admin key rejected" in err
    code, out, err = await cli("undrain", "wa-1", "--url", "http://127.0.0.1:9", "--admin-key", "k")
    assert code == 2 and "cannot reach the router" in err
    await fleet[1].fault("error", status=500, paths="/api/sessions")
    code, out, err = await cli("move", "c2", "--to", "wa-1", *conn)
    assert code == 1 and "move of c2 failed" in err


# -- session listing, pins, reload, the OpenAPI document ------------------------------------


async def list_all(router: RouterHandle, query: str) -> tuple[list[dict[str, Any]], int]:
    """Every row of a listing, following cursors; and how many pages it took."""
    rows: list[dict[str, Any]] = []
    cursor, pages = None, 0
    while True:
        path = f"/admin/sessions?{query}" + (f"&cursor={cursor}" if cursor else "")
        status, body, _ = await admin(router, "GET", path)
        assert status == 200, body
        rows += body["sessions"]
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            return rows, pages


async def test_session_listing_pages_searches_and_survives_changes(
    sim_fleet: SimFleetFactory, start_router: StartRouter
) -> None:
    _fleet, router = await setup(sim_fleet, start_router)
    smap = router.runtime.smap
    await smap.assign_many({f"user-{i:04d}": f"wa-{i % 2 + 1}" for i in range(2500)})

    status, page, _ = await admin(router, "GET", "/admin/sessions?limit=1000")
    assert status == 200 and len(page["sessions"]) == 1000 and page["total"] == 2500
    assert page["sessions"][0] == {"session": "user-0000", "instance": "wa-1", "pinned": False}
    # The map changes between pages: a session mapped all along is listed once.
    await smap.forget("user-0001")
    await smap.assign("late", "wa-2")
    rest, pages = [], 0
    cursor = page["next_cursor"]
    while cursor is not None:
        status, body, _ = await admin(router, "GET", f"/admin/sessions?limit=1000&cursor={cursor}")
        rest += body["sessions"]
        cursor = body["next_cursor"]
        pages += 1
    names = [r["session"] for r in page["sessions"] + rest]
    assert pages == 2 and len(names) == len(set(names)) == 2500  # a snapshot: "late" is not in it
    assert "user-0001" in names[:1000] and "late" not in names

    rows, _ = await list_all(router, "q=USER-00&limit=1000")  # case-insensitive substring
    assert len(rows) == 99  # user-0001 is gone
    rows, _ = await list_all(router, "prefix=user-24&instance=wa-2&limit=7")
    assert [r["session"] for r in rows] == [f"user-24{i:02d}" for i in range(1, 100, 2)]
    rows, _ = await list_all(router, "instance=wa-9")
    assert rows == []

    for bad in ("limit=0", "limit=5000", "limit=x"):
        status, body, _ = await admin(router, "GET", f"/admin/sessions?{bad}")
        assert status == 400, bad
    status, body, _ = await admin(router, "GET", "/admin/sessions?cursor=nope.10")
    assert status == 410 and body["error"] == "cursor_expired"


async def test_session_listing_stays_fast_with_a_million_sessions(
    sim_fleet: SimFleetFactory, start_router: StartRouter
) -> None:
    _fleet, router = await setup(sim_fleet, start_router)
    n = 1_000_000
    await router.runtime.smap.assign_many({f"m{i:07d}": f"wa-{i % 2 + 1}" for i in range(n)})

    started = time.perf_counter()
    status, page, _ = await admin(router, "GET", "/admin/sessions?limit=100")
    first = time.perf_counter() - started
    assert status == 200 and page["total"] == n and page["scanned"] == 100
    started = time.perf_counter()
    status, page, _ = await admin(
        router, "GET", f"/admin/sessions?limit=100&cursor={page['next_cursor']}"
    )
    second = time.perf_counter() - started
    assert [r["session"] for r in page["sessions"]][:2] == ["m0000100", "m0000101"]
    # A rare match: each page scans a bounded slice, the last one finds it.
    started = time.perf_counter()
    rows, pages = await list_all(router, "q=m0999998")
    search = time.perf_counter() - started
    assert [r["session"] for r in rows] == ["m0999998"] and pages == 5
    print(f"\n1M sessions: first page {first:.3f}s, next {second:.3f}s, search {search:.3f}s")
    assert first < 1.0 and second < 0.5 and search < 5.0


async def test_pin_records_where_a_session_runs_and_keeps_rebalancing_off_it(
    sim_fleet: SimFleetFactory, start_router: StartRouter
) -> None:
    fleet, router = await setup(sim_fleet, start_router, max_sessions=4)
    rt = router.runtime
    await bulk(fleet[0], names=["p1", "p2", "p3", "p4"], auth=True)
    await bulk(fleet[1], names=["p5"], auth=True)
    await reconcile(router)
    await rt.smap.assign("p5", "wa-1")  # a stale entry: p5 runs on wa-2

    status, body, _ = await admin(
        router, "POST", "/admin/sessions/p1/pin", body={"instance": "wa-2"}
    )
    assert status == 409 and body["error"] == "not_running"
    status, body, _ = await admin(router, "POST", "/admin/sessions/p1/pin", body={"instance": "x"})
    assert status == 404 and body["error"] == "unknown_instance"
    status, body, _ = await admin(router, "POST", "/admin/sessions/zz/pin")
    assert status == 404 and body["error"] == "unknown_session"
    status, body, _ = await admin(
        router, "POST", "/admin/sessions/p5/pin", body={"instance": "wa-2"}
    )
    assert status == 200, body
    assert (body["instance"], body["previous"], body["status"]) == ("wa-2", "wa-1", "ready")
    assert rt.smap.cached("p5") == "wa-2"
    for name in ("p1", "p2", "p3", "p4"):
        status, body, _ = await admin(router, "POST", f"/admin/sessions/{name}/pin")
        assert status == 200 and body["instance"] == "wa-1" and body["previous"] == "wa-1"
    status, body, _ = await admin(router, "GET", "/admin/sessions/p2")
    assert body["pinned"] is True
    status, body, _ = await admin(router, "GET", "/admin/sessions?instance=wa-1")
    assert {r["session"]: r["pinned"] for r in body["sessions"]} == dict.fromkeys(
        ["p1", "p2", "p3", "p4"], True
    )

    migration = rt.migration
    assert migration is not None
    assert await migration.rebalance() == []  # wa-1 is full, wa-2 has one: all pinned
    status, body, _ = await admin(router, "DELETE", "/admin/sessions/p4/pin")
    assert status == 200 and body == {"session": "p4", "pinned": False, "was_pinned": True}
    moves = await migration.rebalance()
    assert [(m.session, m.outcome) for m in moves] == [("p4", "moved")]

    status, body, _ = await admin(router, "DELETE", "/admin/sessions/p3")
    assert status == 200 and "p3" not in rt.pins  # forgetting unpins
    assert [e["kind"] for e in rt.events.recent(200, "pin")].count("pin") == 5


async def test_reload_endpoint_and_the_openapi_document(
    sim_fleet: SimFleetFactory, start_router: StartRouter, tmp_path: Path
) -> None:
    _fleet, router = await setup(sim_fleet, start_router, n=1)
    status, body, _ = await admin(router, "POST", "/admin/reload")
    assert status == 409 and body["error"] == "no_config_file"
    status, body, _ = await admin(router, "GET", "/admin/reload")
    assert status == 200 and body["source"] is None and body["last"] is None

    status, doc, _ = await admin(router, "GET", "/admin/openapi.json")
    assert status == 200 and doc["openapi"] == "3.1.0"
    documented = {
        (method.upper(), path)
        for path, ops in doc["paths"].items()
        for method in ops
        if path.startswith("/admin/")
    }
    table = {(method, path) for method, path, _ in ROUTES}
    assert documented == table
    assert set(OPERATIONS) == table  # no description of a route that is gone
    assert {"/healthz", "/readyz"} <= doc["paths"].keys()
    ids = [op["operationId"] for ops in doc["paths"].values() for op in ops.values()]
    assert len(ids) == len(set(ids))
    for _, path in table:
        assert path_regex(path).fullmatch(path.replace("{", "").replace("}", ""))
    # Routes added later are described too, and the relay's when it runs.
    api = AdminAPI(lambda: router.runtime)

    async def extra(api: AdminAPI, request: web.BaseRequest, p: dict[str, str]) -> web.Response:
        """Something new."""
        return json_response({})

    api.add_route("GET", "/admin/extra/{thing}", extra)
    more = document(api.routes, webhooks=True)
    op = more["paths"]["/admin/extra/{thing}"]["get"]
    assert op["summary"] == "Something new." and op["parameters"][0]["name"] == "thing"
    assert "/admin/webhooks/dead-letters/{id}/replay" in more["paths"]
    validator = pytest.importorskip("openapi_spec_validator")
    validator.validate(doc)
    validator.validate(more)


async def test_cli_status_sessions_pin_and_reload(
    sim_fleet: SimFleetFactory, start_router: StartRouter, tmp_path: Path
) -> None:
    fleet = sim_fleet(2, api_key=INSTANCE_KEY, start_delay=0.05)
    path = tmp_path / "router.yaml"
    text = (
        "listen: {host: 127.0.0.1, port: 0}\n"
        f"admin_key: {ADMIN_KEY}\n"
        "discovery: {interval: 0}\n"
        "instances:\n"
        f"  - {{name: wa-1, url: {fleet[0].url}, api_key: {INSTANCE_KEY}, max_sessions: 10}}\n"
    )
    path.write_text(text)
    router = await start_router(config=RouterConfig.load(str(path)))
    await bulk(fleet[0], names=["c1", "c2"], auth=True)
    await reconcile(router)
    conn = ["--url", router.url, "--admin-key", ADMIN_KEY]

    code, out, err = await cli("status", *conn)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith(f"router {router.url}: 2 sessions on 1 instances (1 healthy)")
    assert lines[1].startswith(f"config {path}, loaded ")
    assert lines[2].split() == ["INSTANCE", "URL", "HEALTHY", "STATE", "SESSIONS", "LOAD", "WEIGHT"]
    assert lines[3].split() == ["wa-1", fleet[0].url, "yes", "active", "2/10", "20%", "1"]

    code, out, err = await cli("sessions", "--q", "c", *conn)
    assert code == 0 and out.split("\n")[:2] == ["c1\twa-1", "c2\twa-1"], (out, err)
    code, out, err = await cli("pin", "c1", *conn)
    assert code == 0 and out.strip() == "c1 pinned to wa-1 (ready)", err
    code, out, err = await cli("sessions", "--instance", "wa-1", "--limit", "1", *conn)
    assert out == "c1\twa-1\tpinned\n" and "more" in err
    code, out, err = await cli("unpin", "c1", *conn)
    assert code == 0 and out.strip() == "c1 unpinned"

    path.write_text(text + f"  - {{name: wa-2, url: {fleet[1].url}, api_key: {INSTANCE_KEY}}}\n")
    code, out, err = await cli("reload", *conn)
    assert code == 0, err
    assert out.startswith(f"reloaded {path}: ")  # the file watch may have been first
    assert router.runtime.fleet.names() == ["wa-1", "wa-2"]
    path.write_text(text.replace("max_sessions: 10", "max_sessions: ten"))
    code, out, err = await cli("reload", *conn)
    assert code == 1 and f"config rejected, the router keeps its config: {path}:5: " in err
    code, out, err = await cli("status", *conn)
    assert code == 0 and "LAST RELOAD REJECTED" in out.splitlines()[1]
    assert router.runtime.fleet.names() == ["wa-1", "wa-2"]
