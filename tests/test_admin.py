"""The admin API over HTTP, and the CLI commands against a running router.

Every answer the ``admin`` helper receives is checked against the generated
OpenAPI document (``check_answer``): the schema of its route and status,
with every object closed (a field the document does not name fails).
``test_every_route_answers_as_the_document_says`` calls every route of the
document on a real router, success and errors.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import jsonschema
import msgspec
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from router import admin_models as m
from router.admin import ROUTES, AdminAPI, json_response
from router.config_loader import load
from router.discovery import Round
from router.migration import DrainJob, MoveResult
from router.openapi import Operation, document
from router.reload import ReloadResult
from tests.support.router import INSTANCE_KEY, ROUTER_KEY, RouterHandle, StartRouter
from tests.support.simulator import REPO_ROOT, SimFleet, SimFleetFactory, SimProcess
from tests.support.webhook_target import (
    APP_KEY,
    Backend,
    TargetServer,
    make_config,
    target,
    waha_body,
    waha_headers,
)

ADMIN_KEY = "admin-secret-key"


# -- the document, and answers checked against it --------------------------------------


def _closed(node: Any) -> Any:
    """``node`` with every object schema that lists properties and says nothing of others
    closed (``additionalProperties: false``): an undocumented field fails validation."""
    if isinstance(node, dict):
        out = {k: _closed(v) for k, v in node.items()}
        if isinstance(out.get("properties"), dict) and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(node, list):
        return [_closed(v) for v in node]
    return node


DOC = document([(r.method, r.path, r.operation) for r in ROUTES], webhooks=True)
STRICT = _closed(DOC)
_TEMPLATES = [(re.compile(re.sub(r"\{[A-Za-z_]+\}", "[^/]+", path)), path) for path in DOC["paths"]]
# (method, path template or None for no route, status) of every answer checked.
SEEN: set[tuple[str, str | None, int]] = set()


def _validate(schema: dict[str, Any], body: Any, where: str) -> None:
    # The components beside the schema: its "#/components/..." references resolve there.
    validator = jsonschema.Draft202012Validator({**schema, "components": STRICT["components"]})
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(body)]
    assert not errors, f"{where}: the answer does not match the document: {errors}\n{body}"


def _schema(response: dict[str, Any]) -> dict[str, Any]:
    schema: dict[str, Any] = response["content"]["application/json"]["schema"]
    return schema


def check_answer(method: str, url: str, status: int, body: Any, headers: Mapping[str, str]) -> None:
    """The answer is what the document says of ``method url`` and ``status``."""
    path = urlsplit(url).path.rstrip("/")  # a trailing slash is ignored
    template = next((t for rx, t in _TEMPLATES if rx.fullmatch(path)), None)
    where = f"{method} {path} -> {status}"
    SEEN.add((method, template, status))
    components = STRICT["components"]["responses"]
    if template is None:
        assert status in (401, 404), where
        _validate(_schema(components["NotFound"]), body, where)
        return
    operations = STRICT["paths"][template]
    op = operations.get(method.lower())
    if op is None:
        if status == 405:
            assert headers["Allow"] == ", ".join(sorted(k.upper() for k in operations)), where
        assert status in (401, 404, 405), where
        _validate(_schema(components["MethodNotAllowed"]), body, where)
        return
    response = op["responses"].get(str(status))
    if response is None and status == 404 and body.get("error") == "not_found":
        response = components["NotFound"]  # the admin API is disabled (no admin_key)
    assert response is not None, f"{where}: status not in the document"
    _validate(_schema(response), body, where)


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
    data: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any, aiohttp.ClientResponse]:
    """One request; its answer is checked against the OpenAPI document."""
    hdrs = {"X-Admin-Key": key} if key else {}
    hdrs.update(headers or {})
    async with (
        aiohttp.ClientSession() as http,
        http.request(method, router.url + path, json=body, data=data, headers=hdrs) as resp,
    ):
        text = await resp.text()
        assert resp.content_type == "application/json", text
        answer = await resp.json()
        check_answer(method, path, resp.status, answer, resp.headers)
        return resp.status, answer, resp


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
        "labels": {},
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
    # What the router serves is generated from its route table (no relay here).
    assert doc == document([(r.method, r.path, r.operation) for r in ROUTES])
    documented = {
        (method.upper(), path)
        for path, ops in doc["paths"].items()
        for method in ops
        if path.startswith("/admin/")
    }
    assert documented == {(r.method, r.path) for r in ROUTES}
    assert {"/healthz", "/readyz"} <= doc["paths"].keys()
    ids = [op["operationId"] for ops in DOC["paths"].values() for op in ops.values()]
    assert len(ids) == len(set(ids))
    # Routes added later are routed and described too, and the relay's when it runs.
    api = AdminAPI(router.runtime)

    async def extra(api: AdminAPI, request: web.BaseRequest, p: Mapping[str, str]) -> web.Response:
        """Something new."""
        return json_response({"thing": p["thing"]})

    api.add_route("GET", "/admin/extra/{thing}", extra)
    api.add_route(
        "POST",
        "/admin/extra/{thing}",
        extra,
        Operation("Make a thing", {201: ("Made.", m.Purged)}, operation_id="makeThing"),
    )
    more = document([(r.method, r.path, r.operation) for r in api.routes], webhooks=True)
    op = more["paths"]["/admin/extra/{thing}"]["get"]
    assert op["summary"] == "Something new." and op["parameters"][0]["name"] == "thing"
    made = more["paths"]["/admin/extra/{thing}"]["post"]["responses"]["201"]
    assert _schema(made) == {"$ref": "#/components/schemas/Purged"}
    assert "/admin/webhooks/dead-letters/{id}/replay" in more["paths"]
    served = await api(make_mocked_request("GET", "/admin/extra/x%20y", {"X-Admin-Key": ADMIN_KEY}))
    assert served.status == 200 and served.body == b'{"thing":"x y"}'
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
    router = await start_router(config=load(str(path)))
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


# -- every route against the document ------------------------------------------------------


async def _dead_letter_ids(router: RouterHandle, n: int = 1, within: float = 10.0) -> list[str]:
    """Once the relay holds at least ``n`` dead letters: their ids."""
    relay = router.server.webhooks
    assert relay is not None
    for _ in range(int(within / 0.02)):
        if (await relay.queue.stats()).dead_letters >= n:
            break
        await asyncio.sleep(0.02)
    else:
        raise AssertionError(f"fewer than {n} dead letters after {within}s")
    return [d.id for d in await relay.queue.list_dead(limit=100)]


async def test_every_route_answers_as_the_document_says(
    sim_fleet: SimFleetFactory, start_router: StartRouter, tmp_path: Path
) -> None:
    """Every operation of the document, called on a real router (a config file, the
    webhook relay, three simulators): its answers, errors included, match the schema
    of that route and status, with no field the document does not name."""
    SEEN.clear()
    fleet = sim_fleet(3, api_key=INSTANCE_KEY, start_delay=0.05)
    app = TargetServer(hmac_key=APP_KEY, verify="auto")
    app.status_for = lambda delivery: 422  # refused for good: every event is dead-lettered
    await app.start()
    try:
        path = tmp_path / "router.yaml"
        text = (
            "listen: {host: 127.0.0.1, port: 0}\n"
            f"admin_key: {ADMIN_KEY}\n"
            "discovery: {interval: 0}\n"
            "instances:\n"
            + "".join(
                f"  - {{name: {p.name}, url: {p.url}, api_key: {INSTANCE_KEY}}}\n" for p in fleet
            )
        )
        path.write_text(text)
        backend = Backend("sqlite", "memory", "wa-router:", str(tmp_path / "webhooks.db"))
        hooks = make_config([target(app.url)], backend=backend).webhooks
        cfg = dataclasses.replace(load(str(path)), webhooks=hooks)
        router = await start_router(config=cfg)
        await _sweep(router, fleet, path, text)
    finally:
        await app.stop()

    # No relay, no file: the relay's paths are unknown, a reload has nothing to read.
    _fleet, bare = await setup(sim_fleet, start_router, n=1)
    assert (await admin(bare, "POST", "/admin/reload"))[0] == 409
    assert (await admin(bare, "GET", "/admin/webhooks/stats"))[0] == 404

    operations = {(method.upper(), p) for p, ops in DOC["paths"].items() for method in ops}
    called = {(method, p) for method, p, _ in SEEN if p is not None}
    assert operations <= called, operations - called
    statuses = {status for *_, status in SEEN}
    assert {200, 202, 400, 401, 404, 405, 409, 410, 413, 422, 502} <= statuses


async def _sweep(router: RouterHandle, fleet: SimFleet, path: Path, text: str) -> None:
    async def ok(method: str, url: str, expect: int = 200, **kw: Any) -> Any:
        status, body, _ = await admin(router, method, url, **kw)
        assert status == expect, (method, url, body)
        return body

    await bulk(fleet[0], names=["a", "b"], auth=True)
    await bulk(fleet[1], names=["c", "d"], auth=True)

    # Fleet-wide, the probes, the document; unknown paths and methods.
    assert (await ok("POST", "/admin/reconcile"))["assigned"] == 4
    await ok("GET", "/admin/instances")
    await ok("GET", "/admin/instances/", key=None, expect=401)
    await ok("GET", "/admin/instances/")  # a trailing slash is ignored
    await ok("GET", "/admin/events?limit=5")
    assert (await ok("GET", "/admin/keys")) == {"authentication": False, "keys": []}
    await ok("GET", "/admin/events?limit=x", expect=400)
    await ok("GET", "/healthz", key=None)
    await ok("GET", "/readyz", key=None)
    served = await ok("GET", "/admin/openapi.json")
    assert served == DOC  # the relay runs: its endpoints are listed
    await ok("GET", "/admin/nothing-here", expect=404)
    await ok("GET", "/admin/nothing-here", key=None, expect=401)
    await ok("PUT", "/admin/sessions/a", expect=405)  # Allow: DELETE, GET
    await ok("DELETE", "/admin/instances/wa-1/drain", expect=405)  # Allow: GET, POST
    await ok("PATCH", "/admin/reload", expect=405)

    # Sessions: listing, one, pins, forget.
    page = await ok("GET", "/admin/sessions?limit=1")
    await ok("GET", f"/admin/sessions?limit=1&cursor={page['next_cursor']}")
    await ok("GET", "/admin/sessions?limit=0", expect=400)
    await ok("GET", "/admin/sessions?cursor=gone.1", expect=410)
    assert (await ok("GET", "/admin/sessions/a"))["status"] == "ready"
    await ok("GET", "/admin/sessions/zz", expect=404)
    await ok("GET", "/admin/sessions/bad%20id", expect=400)
    await ok("POST", "/admin/sessions/a/pin")
    await ok("POST", "/admin/sessions/a/pin", body={"instance": "wa-2"}, expect=409)
    await ok("POST", "/admin/sessions/a/pin", body={"instance": "wa-9"}, expect=404)
    await ok("POST", "/admin/sessions/a/pin", body={"instance": 5}, expect=400)
    await ok("POST", "/admin/sessions/zz/pin", expect=404)
    assert (await ok("DELETE", "/admin/sessions/a/pin"))["was_pinned"] is True
    await ok("DELETE", "/admin/sessions/bad%20id/pin", expect=400)
    await ok("GET", "/admin/sessions/a/pacing")  # (router.pacing: tests/test_pacing.py)
    await ok("GET", "/admin/sessions/bad%20id/pacing", expect=400)
    await ok("DELETE", "/admin/sessions/b")
    await ok("DELETE", "/admin/sessions/b", expect=404)

    # Moves: done, refused, failed.
    moved = await ok("POST", "/admin/sessions/c/move", body={"to": "wa-3"})
    assert moved["outcome"] == "moved"
    await ok("POST", "/admin/sessions/c/move", body={"to": ""}, expect=400)
    await ok("POST", "/admin/sessions/c/move", data=b"[1", expect=400)
    await ok("POST", "/admin/sessions/c/move", data=b" " * 70_000, expect=413)
    await ok("POST", "/admin/sessions/c/move", body={"to": "wa-9"}, expect=404)
    await ok("POST", "/admin/sessions/zz/move", body={"to": "wa-1"}, expect=404)
    await ok("POST", "/admin/instances/wa-1/maintenance")
    await ok("POST", "/admin/sessions/c/move", body={"to": "wa-1"}, expect=409)
    await ok("POST", "/admin/instances/wa-1/undrain")
    await ok("POST", "/admin/instances/wa-9/maintenance", expect=404)
    await ok("POST", "/admin/instances/wa-9/undrain", expect=404)
    await fleet[1].fault("error", status=500, paths="/api/sessions")
    failed = await ok("POST", "/admin/sessions/d/move", body={"to": "wa-1"}, expect=502)
    assert failed["ok"] is False and failed["outcome"] == "failed"
    await fleet[1].fault("none")

    # Drains: running, done, unknown.
    await ok("POST", "/admin/instances/wa-1/drain?wait=x", expect=400)
    await ok("POST", "/admin/instances/wa-9/drain", expect=404)
    await ok("GET", "/admin/instances/wa-1/drain", expect=404)
    running = await ok("POST", "/admin/instances/wa-1/drain", expect=202)
    assert running["done"] is False
    await ok("GET", "/admin/instances/wa-1/drain?wait=x", expect=400)
    done = await ok("GET", "/admin/instances/wa-1/drain?wait=20")
    assert done["state"] == "done" and done["failed"] == 0
    await ok("POST", "/admin/instances/wa-1/undrain")

    # Reload: applied (the relay needs a restart), rejected, the status.
    applied = await ok("POST", "/admin/reload")
    assert applied["restart_required"] == ["webhooks"]
    await asyncio.to_thread(path.write_text, text.replace("interval: 0", "interval: zero"))
    rejected = await ok("POST", "/admin/reload", expect=422)
    assert rejected["error"] == "config_rejected" and rejected["message"].startswith(str(path))
    status = await ok("GET", "/admin/reload")
    assert status["last"]["ok"] is False

    # The webhook relay's endpoints.
    body = waha_body("message", "a")
    async with aiohttp.ClientSession() as http:
        async with http.post(
            router.url + "/webhooks/waha/wa-1", data=body, headers=waha_headers(body)
        ) as resp:
            assert resp.status == 200, await resp.text()
    (dead,) = await _dead_letter_ids(router)
    await ok("GET", "/admin/webhooks/stats")
    await ok("GET", "/admin/webhooks/dead-letters?limit=1")
    await ok("GET", "/admin/webhooks/dead-letters?limit=0", expect=400)
    assert (await ok("GET", f"/admin/webhooks/dead-letters/{dead}"))["body"] == body.decode()
    await ok("GET", "/admin/webhooks/dead-letters/nope", expect=404)
    await ok("POST", "/admin/webhooks/dead-letters/nope/replay", expect=404)
    assert (await ok("POST", f"/admin/webhooks/dead-letters/{dead}/replay"))["replayed"] == 1
    await _dead_letter_ids(router)  # refused again
    await ok("POST", "/admin/webhooks/dead-letters/replay?target=app")
    (dead,) = await _dead_letter_ids(router)
    await ok("DELETE", "/admin/webhooks/dead-letters/nope", expect=404)
    assert (await ok("DELETE", f"/admin/webhooks/dead-letters/{dead}"))["purged"] == 1
    await ok("DELETE", "/admin/webhooks/dead-letters?before=x", expect=400)
    await ok("DELETE", "/admin/webhooks/dead-letters?target=app")
    await ok("PUT", "/admin/webhooks/dead-letters", expect=405)


def test_reported_dicts_have_exactly_the_fields_of_their_models() -> None:
    """Other modules report drains, moves, rounds and reloads as dicts, which the admin
    API converts into its models: a key added there must be added to the model too
    (``msgspec.convert`` would drop it silently)."""
    move = MoveResult("s", "wa-1", "wa-2", "moved")
    job = DrainJob("wa-1", failures=[MoveResult("s", "wa-1", None, "failed", "busy")])
    reload = ReloadResult(ok=True, cause="api", source=None)
    for reported, model in (
        (move.as_dict(), m.MoveResult),
        (job.as_dict(), m.DrainJob),
        (Round(1, initial=False).as_dict(), m.ReconcileRound),
        (reload.as_dict(), m.Reload),
    ):
        assert tuple(reported) == model.__struct_fields__, model
        msgspec.convert(reported, model)


async def test_reload_status_has_exactly_the_fields_of_its_model(
    sim_fleet: SimFleetFactory, start_router: StartRouter
) -> None:
    _fleet, router = await setup(sim_fleet, start_router, n=1)
    reloader = router.runtime.reloader
    assert reloader is not None
    assert tuple(reloader.status()) == m.ReloadStatus.__struct_fields__
