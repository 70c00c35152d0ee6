"""Per-client keys (router/scoping.py): a key limited to some sessions.

Unit level: scopes (names, fnmatch patterns), the key lookup (every key
compared, the matching entry's scope), what a scoped key may ask for, and
the WebSocket frame filter. End to end: two real router replicas sharing
the private redis-server in front of three real simulator processes: a
scoped key sees the unknown-session 404 for other sessions on both (the
same body, no owner lookup), creates only names that match, lists only its
sessions, and gets only its sessions' frames from ``/ws?session=*``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from router.adapters.base import Extraction
from router.config import ClientKey
from router.config_loader import check_config, load
from router.errors import RouterError
from router.instances import Fleet
from router.keys import which
from router.scoping import ClientKeys, Scope, admit
from router.websocket import in_scope
from tests.support.router import (
    INSTANCE_KEY,
    ROUTER_KEY,
    RouterHandle,
    StartRouter,
    router_config,
)
from tests.support.simulator import SimFleetFactory
from tests.test_discovery import bulk

TENANT_KEY = "tenant-one-key-0123456789"
TENANT = ClientKey(TENANT_KEY, ("t1_*", "support-line"))


# -- scopes and keys ------------------------------------------------------------------


def test_a_scope_is_names_and_fnmatch_patterns() -> None:
    scope = Scope(["webjs_12_*", "support-line", "q?"])
    for yes in ("webjs_12_1700000000_ab12cd34", "webjs_12_", "support-line", "q1"):
        assert scope.allows(yes), yes
    for no in (
        "webjs_123_1700000000_x",  # another workspace that starts alike
        "xwebjs_12_1",
        "support-line2",
        "Support-Line",  # session ids are case-sensitive
        "q12",
        "",
    ):
        assert not scope.allows(no), no
    with pytest.raises(ValueError):
        Scope([])


def test_keys_are_found_with_their_scope() -> None:
    keys = ClientKeys([ClientKey("plain"), TENANT, ClientKey("plain")])
    assert len(keys) == 2 and keys.keys == {"plain", TENANT_KEY}
    plain, tenant = keys.find("plain"), keys.find(TENANT_KEY)
    assert plain is not None and plain.scope is None
    assert tenant is not None and tenant.scope is not None
    assert tenant.scope.entries == ("t1_*", "support-line")
    for bad in (None, "", "plai", "plainx", TENANT_KEY[:-1], "\udcff"):
        assert keys.find(bad) is None, bad
    assert TENANT_KEY not in repr(TENANT) and TENANT_KEY not in tenant.fingerprint
    assert plain.fingerprint != tenant.fingerprint
    # The same key with two scopes: which one applies cannot be said.
    with pytest.raises(ValueError):
        ClientKeys([TENANT, ClientKey(TENANT_KEY, ("t2_*",))])
    assert not ClientKeys([]) and ClientKeys([]).find("plain") is None


def test_which_compares_every_key() -> None:
    keys = [b"k1", b"k2", b"k3"]
    assert [which(k, keys) for k in ("k1", "k2", "k3", "k4", None)] == [0, 1, 2, -1, -1]


def test_what_a_scoped_key_may_ask_for() -> None:
    scope = TENANT.sessions and Scope(TENANT.sessions)
    assert scope is not None
    admit(scope, Extraction("t1_a"), False, False)
    admit(scope, Extraction("t1_new", create=True), False, False)
    admit(scope, Extraction(None), False, True)  # a list call: filtered
    admit(scope, Extraction(None, fanout=True), True, False)  # /ws?session=*: filtered
    cases: list[tuple[Extraction, bool, int, str]] = [
        (Extraction("t2_b"), False, 404, "unknown_session"),
        (Extraction("t2_b"), True, 404, "unknown_session"),
        (Extraction("t3_x", create=True), False, 404, "unknown_session"),
        (Extraction(None, create=True), False, 400, "session_name_required"),
        (Extraction(None, fanout=True), False, 403, "route_denied"),
        (Extraction(None), False, 403, "route_denied"),  # server stop, API keys, version
    ]
    for ext, websocket, status, code in cases:
        with pytest.raises(RouterError) as info:
            admit(scope, ext, websocket, False)
        assert (info.value.status, info.value.error) == (status, code), ext


def test_websocket_frames_pass_only_for_sessions_in_scope() -> None:
    allows = Scope(["t1_*"]).allows
    assert in_scope(json.dumps({"event": "message", "session": "t1_a"}), allows)
    for frame in (
        json.dumps({"event": "message", "session": "t2_b"}),
        json.dumps({"event": "echo", "data": "ping"}),  # names no session
        json.dumps({"session": ["t1_a"]}),
        json.dumps(["t1_a"]),
        "t1_a",  # not JSON
        "",
    ):
        assert not in_scope(frame, allows), frame


# -- end to end: two replicas on one redis ---------------------------------------------


async def call(
    http: aiohttp.ClientSession, method: str, url: str, key: str, body: Any = None
) -> tuple[int, Any]:
    async with http.request(method, url, json=body, headers={"X-Api-Key": key}) as resp:
        text = await resp.text()
        return resp.status, json.loads(text) if text else None


def same_404(body: dict[str, Any], session: str) -> dict[str, Any]:
    """A 404 body without its request id, the session's name replaced."""
    text = json.dumps({k: v for k, v in body.items() if k != "request_id"})
    return dict(json.loads(text.replace(session, "NAME")))


def count_owner_lookups(router: RouterHandle, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The sessions the router looks an owner up for (cache, store or probes)."""
    resolver = router.runtime.resolver
    real: Callable[..., Any] = resolver.owner
    seen: list[str] = []

    async def owner(session: str, fleet: Fleet, adapter: Any) -> Any:
        seen.append(session)
        return await real(session, fleet, adapter)

    monkeypatch.setattr(resolver, "owner", owner)
    return seen


async def test_a_scoped_key_on_two_replicas(
    sim_fleet: SimFleetFactory,
    start_router: StartRouter,
    redis_url: str,
    redis_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fleet = sim_fleet(3, api_key=INSTANCE_KEY)
    # t1_a and t2_b on one instance: its frames reach the router in order.
    await bulk(fleet[0], names=["t1_a", "t2_b"])
    await bulk(fleet[1], names=["support-line"])
    await bulk(fleet[2], names=["t2_c"])
    cfg = router_config(
        fleet.urls, names=[p.name for p in fleet], store=redis_url, key_prefix=redis_prefix
    )
    cfg = dataclasses.replace(
        cfg, api_keys=(ClientKey(ROUTER_KEY), TENANT), admin_key="admin-key-for-scoping"
    )
    a = await start_router(config=cfg)
    b = await start_router(config=cfg)
    lookups = {r.url: count_owner_lookups(r, monkeypatch) for r in (a, b)}

    async with aiohttp.ClientSession() as http:
        # What anyone is told about a session that runs nowhere.
        status, nowhere = await call(http, "GET", f"{a.url}/api/t2_nowhere/me", ROUTER_KEY)
        assert status == 404
        reference = same_404(nowhere, "t2_nowhere")
        assert reference["error"] == "unknown_session"
        for router in (a, b):
            url = router.url
            lookups[url].clear()
            assert (await call(http, "GET", f"{url}/api/t1_a/me", TENANT_KEY))[0] == 200
            assert (await call(http, "GET", f"{url}/api/support-line/me", TENANT_KEY))[0] == 200
            assert lookups[url] == ["t1_a", "support-line"]
            # Outside the scope: running (t2_b) or not, the same 404, and
            # decided before any owner lookup (no probe to time).
            for other in ("t2_b", "t2_nowhere", "t1"):
                for method, path, body in (
                    ("GET", f"/api/{other}/me", None),
                    ("GET", f"/api/sessions/{other}", None),
                    ("POST", "/api/sendText", {"session": other, "chatId": "1@c.us", "text": "x"}),
                    ("POST", f"/api/sessions/{other}/stop", None),
                    ("POST", "/api/sessions", {"name": other}),  # a create
                ):
                    status, answer = await call(http, method, url + path, TENANT_KEY, body)
                    assert status == 404, (method, path, answer)
                    assert same_404(answer, other) == reference, (method, path, answer)
            assert lookups[url] == ["t1_a", "support-line"]
            # A create WAHA would name itself could fall outside: refused.
            status, answer = await call(http, "POST", f"{url}/api/sessions", TENANT_KEY, {})
            assert (status, answer["error"]) == (400, "session_name_required")
            # Calls about whole instances are not for a key limited to sessions.
            status, answer = await call(http, "GET", f"{url}/api/server/status", TENANT_KEY)
            assert (status, answer["error"]) == (403, "route_denied")
            assert (await call(http, "GET", f"{url}/api/server/status", ROUTER_KEY))[0] == 200

        # Creates of matching names, through either replica.
        for router, name in ((a, "t1_new_a"), (b, "t1_new_b")):
            status, answer = await call(
                http, "POST", f"{router.url}/api/sessions", TENANT_KEY, {"name": name}
            )
            assert status == 201, answer
        for router in (a, b):
            status, listed = await call(http, "GET", f"{router.url}/api/sessions", TENANT_KEY)
            assert status == 200
            assert sorted(s["name"] for s in listed) == [
                "support-line",
                "t1_a",
                "t1_new_a",
                "t1_new_b",
            ]
            status, listed = await call(http, "GET", f"{router.url}/api/sessions", ROUTER_KEY)
            assert {"t2_b", "t2_c"} <= {s["name"] for s in listed}

        # The admin API shows each key's scope, never a key.
        async with http.get(
            f"{a.url}/admin/keys", headers={"X-Admin-Key": "admin-key-for-scoping"}
        ) as resp:
            assert resp.status == 200
            text = await resp.text()
        assert ROUTER_KEY not in text and TENANT_KEY not in text
        shown = json.loads(text)
        assert shown["authentication"] is True
        assert [k["sessions"] for k in shown["keys"]] == [None, ["t1_*", "support-line"]]
        assert all(len(k["fingerprint"]) == 12 for k in shown["keys"])

        # WebSockets: out of scope is the same 404, before any upgrade.
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(f"{b.url}/ws?session=t2_b&x-api-key={TENANT_KEY}")
        assert refused.value.status == 404
        star = "/ws?session=*&x-api-key="
        scoped = await http.ws_connect(f"{b.url}{star}{TENANT_KEY}")
        everything = await http.ws_connect(f"{a.url}{star}{ROUTER_KEY}")
        try:
            for session in ("t2_b", "t1_a"):
                send = {"session": session, "chatId": "1@c.us", "text": f"to {session}"}
                status, answer = await call(http, "POST", f"{a.url}/api/sendText", ROUTER_KEY, send)
                assert status in (200, 201), answer
            got = [(await everything.receive_json(timeout=5))["session"] for _ in range(2)]
            assert got == ["t2_b", "t1_a"]  # both were sent, in this order...
            frame = await scoped.receive_json(timeout=5)
            assert frame["session"] == "t1_a"  # ...and t2_b's never reached the tenant
        finally:
            await scoped.close()
            await everything.close()


# -- the config: api_keys entries with sessions ------------------------------------------

SECRET = "tenant-s3cr3t-never-printed"
INSTANCES = "instances:\n  - name: wa-1\n    url: http://127.0.0.1:3101\n"


def test_config_reads_plain_and_scoped_keys(tmp_path: Path) -> None:
    path = tmp_path / "router.yaml"
    path.write_text(
        INSTANCES
        + "api_keys:\n"
        + "  - plain-key\n"
        + "  - key: ${TENANT}\n"
        + "    sessions: ['webjs_12_*', support-line]\n"
        + "  - {key: one-pattern, sessions: 'q?'}\n"
    )
    ok, text = check_config(path, env={"TENANT": SECRET})
    assert ok, text
    assert "3 client key(s), 2 limited to some sessions" in text and SECRET not in text
    cfg = load(path, env={"TENANT": SECRET})
    assert cfg.api_keys == (
        ClientKey("plain-key"),
        ClientKey(SECRET, ("webjs_12_*", "support-line")),
        ClientKey("one-pattern", ("q?",)),
    )
    assert SECRET not in repr(cfg)


@pytest.mark.parametrize(
    ("entries", "line", "reason"),
    [
        (
            "  - key: k\n    sessions: []\n",
            3,
            "api_keys[0].sessions: names no session, so the key could reach none;"
            " leave sessions out for a key that reaches every session",
        ),
        (
            "  - key: k\n    sessions: [ok, 'no spaces']\n",
            3,
            "api_keys[0].sessions[1]: must be a session name or an fnmatch pattern of"
            " session names, got 'no spaces'",
        ),
        ("  - sessions: [a]\n", 2, "api_keys[0]: missing required key 'key'"),
        (
            "  - key: k\n    session: [a]\n",
            3,
            "api_keys[0].session: unknown key; did you mean 'sessions'?",
        ),
        (
            f"  - {SECRET}\n  - key: {SECRET}\n    sessions: [a]\n",
            2,
            "api_keys: a key is listed twice with different sessions",
        ),
        ("  - ''\n", 2, "api_keys[0]: must be a non-empty string, got an empty string"),
    ],
)
def test_check_config_reports_bad_scoped_keys(
    tmp_path: Path, entries: str, line: int, reason: str
) -> None:
    path = tmp_path / "router.yaml"
    path.write_text("api_keys:\n" + entries + INSTANCES)
    ok, text = check_config(path, env={})
    assert not ok
    first = text.splitlines()[0]
    assert first.startswith(f"{path}:{line}: {reason}"), text
    assert SECRET not in text
