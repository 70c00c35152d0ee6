"""The webhook relay in process: ingest checks, delivery through outages, dead letters, replicas.

Real sockets everywhere: the relay behind an aiohttp server, the target an
aiohttp server (tests/support/webhook_target.py), redis a private
redis-server. Both queue backends where the behaviour must not differ.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest

from router.config import WebhookIngest
from router.metrics import REGISTRY
from router.webhooks import cli as webhooks_cli
from router.webhooks.signatures import (
    SignatureError,
    blazz_signature,
    sign_headers,
    verify_blazz,
    verify_waha,
    waha_signature,
)
from tests.support.router import StartRouter, router_config
from tests.support.simulator import SimFleetFactory
from tests.support.webhook_fixtures import Start
from tests.support.webhook_target import (
    ADMIN_KEY,
    APP_KEY,
    BLAZZ_KEY,
    FAST,
    WAHA_KEY,
    Backend,
    TargetServer,
    backend_for,
    blazz_body,
    blazz_headers,
    make_config,
    target,
    waha_body,
    waha_headers,
    wait_drained,
    with_delivery,
)

# -- signatures ------------------------------------------------------------------


def test_blazz_and_waha_signatures_verify_and_refuse() -> None:
    body = b'{"event":"message"}'
    now = 1_700_000_000.0
    ts = str(int(now))
    good = {"X-Timestamp": ts, "X-HMAC-Signature": blazz_signature("k", ts, body)}
    verify_blazz("k", good, body, now=now, skew=300)
    verify_blazz("k", {**good, "X-HMAC-Signature": good["X-HMAC-Signature"].upper()}, body,
                 now=now, skew=300)  # fmt: skip
    cases = [
        ({**good, "X-HMAC-Signature": "00"}, "bad X-HMAC-Signature"),
        ({"X-Timestamp": ts}, "missing X-HMAC-Signature"),
        ({"X-HMAC-Signature": "ab"}, "missing X-Timestamp"),
        ({**good, "X-Timestamp": str(int(now) - 1)}, "bad X-HMAC-Signature"),
    ]
    for headers, why in cases:
        with pytest.raises(SignatureError, match=why):
            verify_blazz("k", headers, body, now=now, skew=300)
    with pytest.raises(SignatureError, match="bad"):
        verify_blazz("other", good, body, now=now, skew=300)
    with pytest.raises(SignatureError, match="old"):
        verify_blazz("k", good, body, now=now + 301, skew=300)
    with pytest.raises(SignatureError, match="future"):
        verify_blazz("k", good, body, now=now - 301, skew=300)

    wgood = {"X-Webhook-Hmac": waha_signature("k", body), "X-Webhook-Timestamp": ts + "000"}
    verify_waha("k", wgood, body, now=now, skew=300)
    untimed = {"X-Webhook-Hmac": waha_signature("k", body)}
    verify_waha("k", untimed, body, now=now, skew=300, require_timestamp=False)
    with pytest.raises(SignatureError, match="missing X-Webhook-Timestamp"):
        verify_waha("k", untimed, body, now=now, skew=300)
    with pytest.raises(SignatureError, match="bad X-Webhook-Hmac"):
        verify_waha("k", wgood, body + b" ", now=now, skew=300)
    with pytest.raises(SignatureError, match="old"):
        verify_waha("k", wgood, body, now=now + 400, skew=300)
    with pytest.raises(SignatureError, match="unsupported"):
        verify_waha("k", {**wgood, "X-Webhook-Hmac-Algorithm": "md5"}, body, now=now, skew=300)

    # Signing for targets: what the receivers check.
    h = sign_headers("blazz", "k", body, now=now)
    verify_blazz("k", h, body, now=now, skew=300)
    h = sign_headers("waha", "k", body, now=now)
    verify_waha("k", h, body, now=now, skew=300)
    assert set(sign_headers("raw", None, body, now=now)) == {"X-Webhook-Timestamp"}
    assert sign_headers("raw", "k", body, now=now)["X-Webhook-Signature"].startswith("sha256=")


# -- ingest ------------------------------------------------------------------------


async def test_ingest_refuses_bad_requests_and_stores_nothing(
    backend: Backend, start_relay: Start, app: TargetServer
) -> None:
    cfg = make_config(
        [target(app.url)],
        backend=backend,
        ingest=WebhookIngest(blazz_hmac_key=BLAZZ_KEY, waha_hmac_key=WAHA_KEY, max_body_bytes=4096),
    )
    h = await start_relay(cfg)
    body = blazz_body("message_received", "s1", text="hi")
    bad_json = b'{"event": "message", '
    old = time.time() - 400
    cases: list[tuple[str, bytes, dict[str, str], int, str]] = [
        ("/webhooks/blazz/wa-1", body, {**blazz_headers(body), "X-HMAC-Signature": "ab" * 32},
         401, "bad_signature"),
        ("/webhooks/blazz/wa-1", body, blazz_headers(body, key="wrong"), 401, "bad_signature"),
        ("/webhooks/blazz/wa-1", body, {"Content-Type": "application/json"}, 401,
         "bad_signature"),
        ("/webhooks/blazz/wa-1", body, blazz_headers(body, ts=old), 401, "bad_signature"),
        ("/webhooks/waha/wa-2", body, waha_headers(body, key="wrong"), 401, "bad_signature"),
        ("/webhooks/waha/wa-2", body, waha_headers(body, ts_ms=old * 1000), 401,
         "bad_signature"),
        ("/webhooks/blazz/wa-1", bad_json, blazz_headers(bad_json), 400, "malformed_json"),
        ("/webhooks/blazz/wa-1", b"[1,2]", blazz_headers(b"[1,2]"), 400, "malformed_event"),
        ("/webhooks/blazz/wa-1", b'{"data":{}}', blazz_headers(b'{"data":{}}'), 400,
         "malformed_event"),
        ("/webhooks/blazz/wa-1", b"\xff\xfe", blazz_headers(b"\xff\xfe"), 400,
         "malformed_json"),
        ("/webhooks/blazz/wa-1", b"", blazz_headers(b""), 400, "empty_body"),
        ("/webhooks/blazz/nobody", body, blazz_headers(body), 404, "unknown_instance"),
        ("/webhooks/blazz", body, {**blazz_headers(body), "X-Instance-Url": "http://x:1"},
         404, "unknown_instance"),
        ("/webhooks/evolution/wa-1", body, blazz_headers(body), 404, "not_found"),
    ]  # fmt: skip
    big = json.dumps({"event": "message", "data": {"x": "a" * 5000}}).encode()
    cases.append(("/webhooks/blazz/wa-1", big, blazz_headers(big), 413, "body_too_large"))
    for path, data, headers, status, error in cases:
        got, answer = await h.post(path, data, headers)
        assert (got, answer.get("error")) == (status, error), (path, data[:30], answer)
        assert "message" in answer

    # A chunked body (no Content-Length) over the limit is cut off too.
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b" " * 1000

    assert h.http is not None
    async with h.http.post(
        h.url + "/webhooks/blazz/wa-1", data=chunks(), headers=blazz_headers(b"")
    ) as resp:
        assert resp.status == 413
    async with h.http.get(h.url + "/webhooks/blazz/wa-1") as resp:
        assert resp.status == 405

    stats = await h.relay.queue.stats()
    assert (stats.pending, stats.dead_letters) == (0, 0)
    assert app.requests == 0

    # And the same requests done right are accepted.
    assert (await h.blazz(body))[0] == 200
    status, answer = await h.post(
        "/webhooks/blazz", body, {**blazz_headers(body), "X-Instance-Url": "http://127.0.0.1:3002/"}
    )
    assert (status, answer["status"]) == (200, "queued")
    await app.wait_unique(2)
    assert {d.headers["X-Router-Instance"] for d in app.deliveries} == {"wa-1", "wa-2"}


@pytest.mark.parametrize("outage", ["refused", "503"])
async def test_outage_longer_than_a_round_every_event_delivered_in_session_order(
    backend: Backend, start_relay: Start, app: TargetServer, outage: str
) -> None:
    """The target is down for several durable rounds; then every event arrives, in order."""
    h = await start_relay(make_config([target(app.url)], backend=backend))
    down = True
    if outage == "refused":
        await app.stop()  # main-app deploy: connection refused
    else:  # up, but answering 503 (maintenance mode)
        app.status_for = lambda d: 503 if down else None
    sent: dict[str, list[str]] = {}
    for i in range(12):
        for s in ("s1", "s2", "s3"):
            if s == "s3":
                status, answer = await h.waha(waha_body("message", s, eid=f"evt_w{i}", n=i))
            else:
                status, answer = await h.blazz(blazz_body("message_received", s, n=i))
            assert status == 200 and answer["status"] == "queued"
            sent.setdefault(s, []).append(answer["id"])
    assert (await h.relay.queue.stats()).pending == 36
    # The outage (the scenario, not a synchronisation): long enough for several
    # durable rounds, each far beyond what one in-process round would retry.
    deadline = time.monotonic() + 10
    while h.relay.failed_rounds < 9:
        assert time.monotonic() < deadline, "the relay did not retry"
        await asyncio.sleep(0.05)
    assert not app.deliveries
    if outage == "refused":
        assert app.requests == 0
        await app.start()
    else:
        # Every failed round made attempts_per_round (2) attempts: 5xx is retried in-round.
        assert app.requests >= 2 * h.relay.failed_rounds
    down = False
    await app.wait_unique(36)
    assert app.first_order() == sent
    assert app.counts() == {i: 1 for ids in sent.values() for i in ids}
    # The first events carried the durable-round counter: the queue retried them.
    firsts = [d for d in app.deliveries if d.event_id in {v[0] for v in sent.values()}]
    assert all(int(d.headers["X-Router-Attempt"]) >= 3 for d in firsts)
    # WAHA kept its own event id; Blazz events got a generated one.
    assert sent["s3"][0] == "evt_w0" and sent["s1"][0].startswith("evt_")
    await wait_drained(h.relay.queue)
    await h.relay.refresh_stats()


async def test_deliveries_are_resigned_with_a_fresh_timestamp(
    sqlite_backend: Backend, start_relay: Start
) -> None:
    blazz_app = TargetServer(hmac_key=APP_KEY, verify="blazz")
    waha_app = TargetServer(hmac_key="waha-app-key", verify="waha", path="/waha")
    await blazz_app.start()
    await waha_app.start()
    try:
        cfg = make_config(
            [
                target(blazz_app.url, events=("message*",)),
                target(waha_app.url, name="waha-app", hmac_key="waha-app-key", format="waha",
                       events=("message*",)),
            ],
            backend=sqlite_backend,
        )  # fmt: skip
        h = await start_relay(cfg)
        body = blazz_body("message_received", "s1", text="hi")
        # The instance signed 250 s ago (inside the skew); the app must see "now".
        status, answer = await h.blazz(body, ts=time.time() - 250)
        assert status == 200
        await blazz_app.wait_unique(1)
        await waha_app.wait_unique(1)
        d = blazz_app.deliveries[0]
        assert d.body == body  # byte for byte
        assert abs(int(d.headers["X-Timestamp"]) - time.time()) < 5
        assert d.headers["X-Event-Id"] == answer["id"]
        # The router's own address, as the instance reached it: the main app
        # keeps it as the session's instance URL and calls it later.
        assert d.headers["X-Instance-Url"] == h.url
        assert d.headers["X-Event-Type"] == "message_received"
        w = waha_app.deliveries[0]
        assert w.headers["X-Webhook-Request-Id"] == answer["id"]
        assert w.headers["X-Webhook-Hmac-Algorithm"] == "sha512"
        assert blazz_app.rejected == [] and waha_app.rejected == []
    finally:
        await blazz_app.stop()
        await waha_app.stop()


async def test_routing_by_event_type_and_session(
    sqlite_backend: Backend, start_relay: Start
) -> None:
    a = TargetServer()
    b = TargetServer()
    await a.start()
    await b.start()
    try:
        cfg = make_config(
            [
                target(a.url, name="messages", events=("message*",)),
                target(b.url, name="tenant-7", sessions=r"webjs_7_.*"),
            ],
            backend=sqlite_backend,
        )
        h = await start_relay(cfg)
        answers = [
            await h.blazz(blazz_body("message_received", "webjs_7_1_aa")),  # both
            await h.blazz(blazz_body("qr_code_generated", "webjs_7_1_aa")),  # tenant-7
            await h.blazz(blazz_body("message_sent", "webjs_8_1_bb")),  # messages
            await h.blazz(blazz_body("qr_code_generated", "webjs_8_1_bb")),  # nobody
        ]
        assert [sorted(x[1]["targets"]) for x in answers] == [
            ["messages", "tenant-7"],
            ["tenant-7"],
            ["messages"],
            [],
        ]
        assert answers[3][1]["status"] == "unrouted"
        await a.wait_unique(2)
        await b.wait_unique(2)
        assert [d.doc["event"] for d in a.deliveries] == ["message_received", "message_sent"]
        assert [d.doc["event"] for d in b.deliveries] == ["message_received", "qr_code_generated"]
        # One event, two targets: the same event id at both.
        assert a.deliveries[0].event_id == b.deliveries[0].event_id
    finally:
        await a.stop()
        await b.stop()


async def test_session_hints(
    sqlite_backend: Backend, start_relay: Start, app: TargetServer
) -> None:
    hints: list[tuple[str, str]] = []
    seen = asyncio.Event()

    async def on_hint(session: str, instance: str) -> None:
        hints.append((session, instance))
        if len(hints) == 3:
            seen.set()

    h = await start_relay(make_config([target(app.url)], backend=sqlite_backend),
                          on_session_hint=on_hint)  # fmt: skip
    await h.blazz(blazz_body("message_received", "webjs_1_1_a"))
    await h.blazz(blazz_body("session.status", "webjs_1_1_a", status="qr_scanning"))
    await h.blazz(blazz_body("session_ready", "webjs_1_1_a"), instance="wa-2")
    await h.blazz(blazz_body("session.status", "webjs_1_1_b", status="connected"))
    await h.waha(waha_body("session.status", "default", status="SCAN_QR_CODE"))
    await h.waha(waha_body("session.status", "sales", status="WORKING"), instance="wa-1")
    await h.waha(waha_body("session.status", "../etc", status="WORKING"))
    await asyncio.wait_for(seen.wait(), 5)
    assert hints == [("webjs_1_1_a", "wa-2"), ("webjs_1_1_b", "wa-1"), ("sales", "wa-1")]


async def test_dead_letters_admin_api_and_cli(
    backend: Backend,
    start_relay: Start,
    app: TargetServer,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The app refuses "poison" events for good (422) until told otherwise.
    poison_ok = False

    def status_for(d: Any) -> int | None:
        return 422 if b"poison" in d.body and not poison_ok else None

    app.status_for = status_for
    h = await start_relay(make_config([target(app.url)], backend=backend))
    ids = []
    for n in range(4):
        extra = {"poison": True} if n == 1 else {}
        body = blazz_body("message_received", "s1", n=n, **extra)
        ids.append((await h.blazz(body))[1]["id"])
    # The poison event is dead-lettered; the session's later events still go.
    await app.wait_unique(3)
    assert [d.event_id for d in app.deliveries] == [ids[0], ids[2], ids[3]]

    status, page = await h.admin("GET", "/dead-letters")
    assert status == 200
    (dl,) = page["dead_letters"]
    assert (dl["event_id"], dl["target"], dl["session"], dl["instance"]) == (
        ids[1], "app", "s1", "wa-1"
    )  # fmt: skip
    assert dl["reason"].startswith("rejected: target answered HTTP 422") and "body" not in dl
    status, one = await h.admin("GET", f"/dead-letters/{dl['id']}")
    assert status == 200 and json.loads(one["body"])["data"]["poison"] is True
    await wait_drained(h.relay.queue)
    status, stats = await h.admin("GET", "/stats")
    assert (status, stats["dead_letters"], stats["pending"]) == (200, 1, 0)
    assert stats["backend"] == backend.name

    assert (await h.admin("GET", "/dead-letters", key="wrong"))[0] == 401
    assert (await h.admin("GET", "/dead-letters/12345-0"))[0] == 404
    assert (await h.admin("POST", "/dead-letters/12345-0/replay"))[0] == 404
    assert (await h.admin("PUT", "/dead-letters"))[0] == 405
    assert (await h.admin("GET", "/nothing"))[0] == 404

    # The CLI, against the running relay's admin API.
    def ns(cmd: str, **kw: Any) -> argparse.Namespace:
        base = {"config": None, "url": h.url, "admin_key": ADMIN_KEY, "timeout": 5.0}
        return argparse.Namespace(webhooks_command=cmd, **{**base, **kw})

    list_args = {"id": None, "target": None, "limit": 100, "after": None, "json": False}
    assert await webhooks_cli._run(ns("dead-letters", **list_args)) == 0
    out = capsys.readouterr().out
    assert dl["id"] in out and "HTTP 422" in out
    assert await webhooks_cli._run(ns("dead-letters", **{**list_args, "id": dl["id"]})) == 0
    assert '"poison": true' in capsys.readouterr().out

    # With no flags the CLI reads the same variables as every admin command.
    monkeypatch.setenv("WA_ROUTER_URL", h.url)
    monkeypatch.setenv("WA_ROUTER_ADMIN_KEY", ADMIN_KEY)
    bare = ns("dead-letters", **list_args, **{"url": None, "admin_key": None})
    assert await webhooks_cli._run(bare) == 0
    assert dl["id"] in capsys.readouterr().out
    monkeypatch.setenv("WA_ROUTER_ADMIN_KEY", "wrong")
    assert await webhooks_cli._run(bare) != 0
    capsys.readouterr()

    # Replay once the app accepts it: delivered, list empty.
    poison_ok = True
    replay = {"ids": [dl["id"]], "all": False, "target": None}
    assert await webhooks_cli._run(ns("replay", **replay)) == 0
    await app.wait_unique(4)
    assert app.deliveries[-1].event_id == ids[1]
    assert (await h.admin("GET", "/dead-letters"))[1]["dead_letters"] == []

    # Purge: one by id, then all.
    poison_ok = False
    for n in range(2):
        await h.blazz(blazz_body("message_received", "s2", n=n, poison=True))
    deadline = time.monotonic() + 10
    while (await h.relay.queue.stats()).dead_letters < 2:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    first = (await h.admin("GET", "/dead-letters?limit=1"))[1]
    assert first["next"] == first["dead_letters"][0]["id"]
    purge = {"ids": [], "all": False, "target": None, "before": None}
    assert await webhooks_cli._run(ns("purge", **purge)) == 2  # needs ids or --all
    assert await webhooks_cli._run(ns("purge", **{**purge, "ids": [first["next"]]})) == 0
    assert (await h.admin("GET", "/stats"))[1]["dead_letters"] == 1
    assert await webhooks_cli._run(ns("purge", **{**purge, "all": True})) == 0
    assert "purged 1" in capsys.readouterr().out
    assert (await h.admin("GET", "/stats"))[1]["dead_letters"] == 0


async def test_max_age_dead_letters_after_the_last_retry(
    sqlite_backend: Backend, start_relay: Start, app: TargetServer
) -> None:
    await app.stop()
    cfg = make_config(
        [target(app.url)], backend=sqlite_backend, delivery=with_delivery(FAST, max_age=0.6)
    )
    h = await start_relay(cfg)
    await h.blazz(blazz_body("message_received", "s1"))
    await h.blazz(blazz_body("message_received", "s1", n=2))
    deadline = time.monotonic() + 10
    while (await h.relay.queue.stats()).dead_letters < 2:
        assert time.monotonic() < deadline, "not dead-lettered"
        await asyncio.sleep(0.05)
    dead = await h.relay.queue.list_dead()
    assert all(d.reason.startswith("max_age: undelivered after") for d in dead)
    assert "ClientConnectorError" in dead[0].reason
    assert (await h.relay.queue.stats()).pending == 0


async def test_two_replicas_on_one_redis_deliver_each_event_once(
    request: pytest.FixtureRequest, tmp_path: Path, start_relay: Start, app: TargetServer
) -> None:
    be = backend_for(request, "redis", tmp_path)
    r1 = await start_relay(make_config([target(app.url)], backend=be, consumer_name="r1"))
    r2 = await start_relay(make_config([target(app.url)], backend=be, consumer_name="r2"))
    sent: dict[str, list[str]] = {}
    for i in range(15):
        for s in range(8):
            h = (r1, r2)[(i + s) % 2]
            status, answer = await h.blazz(blazz_body("message_received", f"s{s}", n=i))
            assert status == 200
            sent.setdefault(f"s{s}", []).append(answer["id"])
    await app.wait_unique(120)
    assert app.first_order() == sent
    assert sorted(app.counts().values()) == [1] * 120  # once each, no duplicate
    deadline = time.monotonic() + 5  # the acks follow the target's answers
    while r1.relay.delivered + r2.relay.delivered < 120:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    assert r1.relay.delivered + r2.relay.delivered == 120
    assert r1.relay.delivered > 0 and r2.relay.delivered > 0


async def test_the_router_serves_the_relay(
    sqlite_backend: Backend, start_router: StartRouter, app: TargetServer
) -> None:
    """Wiring in router/server.py: ingest and admin paths reach the relay, the rest the proxy."""
    base = router_config(["http://127.0.0.1:9"], adapter="blazz")
    cfg = make_config([target(app.url)], backend=sqlite_backend)
    cfg = dataclasses.replace(
        base,
        webhooks=cfg.webhooks,
        admin_key=ADMIN_KEY,
        discovery=dataclasses.replace(base.discovery, on_start=False),
    )
    router = await start_router(config=cfg)
    body = blazz_body("message_received", "s1")
    async with router.client() as http:
        async with http.post(
            router.url + "/webhooks/blazz/wa-1", data=body, headers=blazz_headers(body)
        ) as resp:
            assert resp.status == 200
            event_id = (await resp.json())["id"]
        async with http.get(
            router.url + "/admin/webhooks/stats", headers={"X-Admin-Key": ADMIN_KEY}
        ) as resp:
            assert resp.status == 200 and (await resp.json())["backend"] == "sqlite"
    await app.wait_unique(1)
    assert app.deliveries[0].event_id == event_id
    assert router.server.webhooks is not None
    # The relay's metrics are in the router's registry (its /metrics).
    await router.server.webhooks.refresh_stats()
    text = generate_latest(REGISTRY).decode()
    for name in (
        "wa_router_webhook_backlog",
        "wa_router_webhook_oldest_pending_age_seconds",
        "wa_router_webhook_delivery_latency_seconds_bucket",
        'wa_router_webhook_delivery_attempts_total{outcome="success",target="app"}',
        "wa_router_webhook_dead_letters ",
        'wa_router_webhook_received_total{dialect="blazz",outcome="queued"}',
    ):
        assert name in text, name


async def test_redis_down_means_503_not_a_lost_event_then_recovery(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    start_relay: Start,
    app: TargetServer,
    redis_server: Any,
) -> None:
    be = backend_for(request, "redis", tmp_path)
    h = await start_relay(make_config([target(app.url)], backend=be))
    assert (await h.blazz(blazz_body("message_received", "s1", n=1)))[0] == 200
    await app.wait_unique(1)
    redis_server.kill()
    # Nowhere to store it: the instance is told to retry (its own retry loop).
    status, answer = await h.blazz(blazz_body("message_received", "s1", n=2))
    assert (status, answer["error"]) == (503, "queue_unavailable")
    redis_server.start()  # back, and empty
    status, answer = await h.blazz(blazz_body("message_received", "s1", n=3))
    assert status == 200
    await app.wait_unique(2)
    assert app.deliveries[-1].event_id == answer["id"]


async def test_a_reload_adds_instances_that_may_send(
    sqlite_backend: Backend, start_relay: Start, app: TargetServer
) -> None:
    cfg = make_config([target(app.url)], backend=sqlite_backend)
    h = await start_relay(cfg)
    body = blazz_body("message_received", "s1")
    assert (await h.blazz(body, instance="wa-3"))[0] == 404
    more = (*cfg.instances, dataclasses.replace(cfg.instances[0], name="wa-3", url="http://x:1"))
    h.relay.apply_config(dataclasses.replace(cfg, instances=more, admin_key="new-admin"))
    assert (await h.blazz(body, instance="wa-3"))[0] == 200
    assert (await h.admin("GET", "/stats"))[0] == 401  # the old admin key is gone
    assert (await h.admin("GET", "/stats", key="new-admin"))[0] == 200


async def test_a_session_announcing_webhook_maps_the_session_after_a_probe(
    sqlite_backend: Backend,
    start_router: StartRouter,
    app: TargetServer,
    sim_fleet: SimFleetFactory,
) -> None:
    """Wiring of the relay's session hints into discovery: trusted only once probed."""
    fleet = sim_fleet(2, dialect="blazz", api_key="inst-key")
    session = "webjs_1_1700000000_hint0001"
    # Started on blazz-2 behind the router's back, after the router's discovery.
    base = router_config(fleet.urls, names=[p.name for p in fleet], adapter="blazz")
    wh = make_config([target(app.url)], backend=sqlite_backend)
    cfg = dataclasses.replace(
        base,
        webhooks=wh.webhooks,
        discovery=dataclasses.replace(base.discovery, on_start=False),
    )
    router = await start_router(config=cfg)
    async with router.client() as http:
        payload = {"session_id": session, "workspace_id": 1, "api_key": "inst-key"}
        async with http.post(f"{fleet[1].url}/api/sessions", json=payload) as resp:
            assert resp.status in (200, 201)
        await fleet[1].wait_session(session)

        async def announce(instance: str) -> None:
            body = blazz_body("session_ready", session, status="connected")
            async with http.post(
                f"{router.url}/webhooks/blazz/{instance}", data=body, headers=blazz_headers(body)
            ) as r:
                assert r.status == 200

        # A false announcement (blazz-1 does not run it) is probed and ignored...
        await announce("blazz-1")
        await app.wait_unique(1)
        # ...the true one maps it.
        await announce("blazz-2")
        deadline = time.monotonic() + 5
        while router.runtime.smap.cached(session) != "blazz-2":
            assert time.monotonic() < deadline, router.runtime.smap.cached(session)
            await asyncio.sleep(0.02)
    hints = router.runtime.events.recent()
    assert all(e.get("instance") != "blazz-1" for e in hints if e.get("session") == session)
