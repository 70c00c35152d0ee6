"""Hostile input to the webhook ingest (issue 11), each case first reproduced:

1. unsigned or malformed-signature requests are refused before their body is
   read; the bodies held at once are bounded (429); compressed bodies are
   decoded here, bounded, and garbage is a 400;
2. a WAHA event without ``X-Webhook-Timestamp`` is refused when a key applies
   (unless ``waha_require_timestamp: false``);
3. a Blazz event sent again (a replay, or a Blazz retry with a new
   ``X-Timestamp``) has the same id and is queued once;
4. a target's queue is bounded in bytes (429 + Retry-After beyond), with a
   metric of the queued bytes per target;
5. nothing the relay logs carries a header value or a body.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gzip
import hashlib
import json
import logging
import time
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from router.config import WebhookIngest
from router.webhooks import metrics
from router.webhooks.ingest import event_id_for
from tests.support.router import StartRouter, router_config
from tests.support.webhook_fixtures import Start
from tests.support.webhook_target import (
    ADMIN_KEY,
    APP_KEY,
    BLAZZ_KEY,
    WAHA_KEY,
    Backend,
    RelayHandle,
    TargetServer,
    blazz_body,
    blazz_headers,
    free_port,
    make_config,
    target,
    waha_body,
    waha_headers,
    wait_drained,
)


def keyed(**changes: Any) -> WebhookIngest:
    return dataclasses.replace(
        WebhookIngest(blazz_hmac_key=BLAZZ_KEY, waha_hmac_key=WAHA_KEY), **changes
    )


class RawRequest:
    """One HTTP/1.1 request on its own socket, its body sent when the test says."""

    def __init__(self, base: str, path: str, headers: dict[str, str], length: int) -> None:
        parts = urlsplit(base)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.path = path
        self.headers = headers
        self.length = length
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def send_head(self, body_part: bytes = b"") -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        lines = [f"POST {self.path} HTTP/1.1", f"Host: {self.host}:{self.port}"]
        lines += [f"Content-Length: {self.length}"]
        lines += [f"{k}: {v}" for k, v in self.headers.items()]
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body_part)
        await self.writer.drain()

    async def send(self, data: bytes) -> None:
        assert self.writer is not None
        self.writer.write(data)
        await self.writer.drain()

    async def answer(self, within: float = 3.0) -> tuple[int, dict[str, str], Any]:
        """The status, headers and JSON body; TimeoutError if none comes ``within`` s."""
        assert self.reader is not None and self.writer is not None
        reader = self.reader

        async def read() -> tuple[int, dict[str, str], Any]:
            status = int((await reader.readline()).split()[1])
            headers: dict[str, str] = {}
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode().partition(":")
                headers[name.strip().lower()] = value.strip()
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            return status, headers, json.loads(body) if body else None

        try:
            return await asyncio.wait_for(read(), within)
        finally:
            self.writer.close()


def padded_blazz(size: int, session: str = "s1", n: int = 1) -> bytes:
    """A Blazz event body of exactly ``size`` bytes."""
    body = blazz_body("message_received", session, n=n, pad="")
    body = body.replace(b'"pad": ""', b'"pad": "' + b"x" * (size - len(body)) + b'"')
    assert len(body) == size
    return body


# -- 1. before the body: signature headers; memory; encodings ------------------------


async def test_a_missing_or_malformed_signature_is_refused_before_the_body(
    sqlite_backend: Backend, start_relay: Start, app: TargetServer
) -> None:
    """Observed: 200 unsigned 8.3 MB webhooks at once held 701 MiB. Now each is
    answered 401 from its headers alone: the test never sends the body."""
    h = await start_relay(make_config([target(app.url)], backend=sqlite_backend, ingest=keyed()))
    body = padded_blazz(8_000_000)
    good_b = blazz_headers(body)
    good_w = waha_headers(body)
    sig_w = good_w["X-Webhook-Hmac"]
    cases: list[tuple[str, dict[str, str], str]] = [
        ("/webhooks/blazz/wa-1", {"Content-Type": "application/json"}, "missing X-HMAC-Signature"),
        ("/webhooks/blazz/wa-1", {"X-HMAC-Signature": good_b["X-HMAC-Signature"]},
         "missing X-Timestamp"),
        ("/webhooks/blazz/wa-1", {**good_b, "X-HMAC-Signature": "zz" * 32}, "64 hex"),
        ("/webhooks/blazz/wa-1", {**good_b, "X-HMAC-Signature": "ab" * 31}, "64 hex"),
        ("/webhooks/blazz/wa-1", {**good_b, "X-HMAC-Signature": sig_w}, "64 hex"),
        ("/webhooks/blazz/wa-1", {**good_b, "X-Timestamp": "1.7e9"}, "unix seconds"),
        ("/webhooks/blazz/wa-1", {**good_b, "X-Timestamp": "-5"}, "unix seconds"),
        ("/webhooks/waha/wa-2", {"Content-Type": "application/json"}, "missing X-Webhook-Hmac"),
        ("/webhooks/waha/wa-2", {**good_w, "X-Webhook-Hmac": sig_w[:64]}, "128 hex"),
        ("/webhooks/waha/wa-2", {**good_w, "X-Webhook-Hmac": "g" * 128}, "128 hex"),
        ("/webhooks/waha/wa-2", {**good_w, "X-Webhook-Timestamp": "soon"}, "milliseconds"),
        ("/webhooks/waha/wa-2", {**good_w, "X-Webhook-Hmac-Algorithm": "md5"}, "sha512"),
        ("/webhooks/waha/wa-2",
         {k: v for k, v in good_w.items() if k != "X-Webhook-Timestamp"},
         "missing X-Webhook-Timestamp"),
    ]  # fmt: skip
    before = metrics.RECEIVED.labels("blazz", "bad_signature")._value.get()
    for path, headers, why in cases:
        req = RawRequest(h.url, path, headers, len(body))
        await req.send_head()  # and not one byte of the 8 MB body
        status, _, answer = await req.answer()
        assert (status, answer["error"]) == (401, "bad_signature"), (path, headers, answer)
        assert why in answer["message"], (why, answer)
    assert metrics.RECEIVED.labels("blazz", "bad_signature")._value.get() - before == 7
    assert h.relay.ingest.budget.held == 0
    stats = await h.relay.queue.stats()
    assert stats.pending == 0 and app.requests == 0

    # Well-formed headers get their body read (and checked) as before.
    small = blazz_body("message_received", "s1", text="hi")
    assert (await h.blazz(small))[0] == 200
    status, answer = await h.post("/webhooks/blazz/wa-1", small, blazz_headers(small, key="x"))
    assert (status, answer["message"]) == (401, "bad X-HMAC-Signature")


async def test_without_a_key_unsigned_events_are_still_read_and_accepted(
    sqlite_backend: Backend, start_relay: Start, app: TargetServer
) -> None:
    h = await start_relay(
        make_config([target(app.url)], backend=sqlite_backend, ingest=WebhookIngest())
    )
    body = blazz_body("message_received", "s1")
    assert (await h.post("/webhooks/blazz/wa-1", body))[0] == 200
    wbody = waha_body("message", "s1")
    assert (await h.post("/webhooks/waha/wa-2", wbody))[0] == 200


async def test_bodies_held_at_once_are_bounded_with_429(
    sqlite_backend: Backend, start_relay: Start, app: TargetServer
) -> None:
    """Two 40 kB events under a 64 kB budget: while most of the first one's
    body is held, the second is told to retry (429: Blazz retries 429, not 503)."""
    ingest = keyed(max_body_bytes=40_000, max_buffered_bytes=64_000)
    h = await start_relay(make_config([target(app.url)], backend=sqlite_backend, ingest=ingest))
    budget = h.relay.ingest.budget
    first = padded_blazz(40_000, n=1)
    second = padded_blazz(40_000, n=2)
    slow = RawRequest(h.url, "/webhooks/blazz/wa-1", blazz_headers(first), len(first))
    await slow.send_head(first[:39_000])
    await wait_held(h, 39_000)

    # A declared length that cannot fit now: refused before its body.
    status, answer = await h.blazz(second)
    assert (status, answer["error"]) == (429, "ingest_busy")
    assert h.http is not None
    async with h.http.post(
        h.url + "/webhooks/blazz/wa-1", data=second, headers=blazz_headers(second)
    ) as resp:
        assert resp.status == 429 and resp.headers["Retry-After"] == "1"
    # A chunked body (no Content-Length) is counted as it arrives.

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(second), 8000):
            yield second[i : i + 8000]

    async with h.http.post(
        h.url + "/webhooks/blazz/wa-1", data=chunks(), headers=blazz_headers(second)
    ) as resp:
        assert resp.status == 429
    assert budget.held == 39_000

    await slow.send(first[39_000:])
    status, _, answer = await slow.answer()
    assert (status, answer["status"]) == (200, "queued")
    assert budget.held == 0
    assert (await h.blazz(second))[0] == 200  # room again
    assert budget.held == 0
    await app.wait_unique(2)


async def wait_held(h: RelayHandle, n: int) -> None:
    deadline = time.monotonic() + 3
    while h.relay.ingest.budget.held < n:
        assert time.monotonic() < deadline, f"held {h.relay.ingest.budget.held}, not {n}"
        await asyncio.sleep(0.01)


async def test_a_trickling_body_reserves_nothing_and_times_out(
    sqlite_backend: Backend, start_relay: Start, app: TargetServer
) -> None:
    """Announcing 40 kB and sending 1 kB holds 1 kB, not 40; no byte for
    limits.body_timeout is a 408 that gives the bytes back."""
    ingest = keyed(max_body_bytes=40_000, max_buffered_bytes=64_000)
    cfg = make_config([target(app.url)], backend=sqlite_backend, ingest=ingest)
    cfg = dataclasses.replace(cfg, limits=dataclasses.replace(cfg.limits, body_timeout=0.5))
    h = await start_relay(cfg)
    body = padded_blazz(40_000, n=1)
    stalled = [
        RawRequest(h.url, "/webhooks/blazz/wa-1", blazz_headers(body), len(body)) for _ in range(3)
    ]
    for req in stalled:
        await req.send_head(body[:1000])
    await wait_held(h, 3000)
    assert h.relay.ingest.budget.held == 3000
    assert (await h.blazz(padded_blazz(40_000, n=2)))[0] == 200
    for req in stalled:
        status, _, answer = await req.answer()
        assert (status, answer["error"]) == (408, "body_timeout")
    assert h.relay.ingest.budget.held == 0


async def test_compressed_bodies_are_decoded_bounded_and_garbage_is_400(
    sqlite_backend: Backend, start_router: StartRouter, app: TargetServer
) -> None:
    """Through the real server (which no longer decompresses): a gzip or
    deflate body is decoded by the ingest, checked and stored decoded."""
    base = router_config(["http://127.0.0.1:9"], adapter="blazz")
    relay_cfg = make_config(
        [target(app.url)], backend=sqlite_backend, ingest=keyed(max_body_bytes=100_000)
    )
    cfg = dataclasses.replace(
        base,
        webhooks=relay_cfg.webhooks,
        admin_key=ADMIN_KEY,
        discovery=dataclasses.replace(base.discovery, on_start=False),
    )
    router = await start_router(config=cfg)
    plain = blazz_body("message_received", "s1", text="compressed " * 50)
    bomb = gzip.compress(b'{"event":"x","data":"' + b"0" * 5_000_000 + b'"}')
    async with router.client() as http:

        async def post(data: bytes, encoding: str, signed: bytes) -> tuple[int, Any]:
            headers = {**blazz_headers(signed), "Content-Encoding": encoding}
            async with http.post(
                f"{router.url}/webhooks/blazz/wa-1", data=data, headers=headers
            ) as resp:
                return resp.status, await resp.json()

        # The instance signs the JSON it serialised; compression is the transport's.
        status, answer = await post(gzip.compress(plain), "gzip", plain)
        assert (status, answer["status"]) == (200, "queued"), answer
        deflated = zlib.compress(plain.replace(b"s1", b"s2"))
        status, answer = await post(deflated, "deflate", plain.replace(b"s1", b"s2"))
        assert (status, answer["status"]) == (200, "queued"), answer

        assert (await post(b"not gzip at all", "gzip", b"not gzip at all"))[1]["error"] == (
            "bad_body"
        )
        status, answer = await post(gzip.compress(plain)[:-8], "gzip", plain)
        assert (status, answer["error"]) == (400, "bad_body")
        status, answer = await post(bomb, "gzip", b"")
        assert (status, answer["error"]) == (413, "body_too_large")
        status, answer = await post(plain, "br", plain)
        assert (status, answer["error"]) == (415, "unsupported_encoding")
    await app.wait_unique(2)
    assert sorted(d.body for d in app.deliveries) == sorted([plain, plain.replace(b"s1", b"s2")])
    relay = router.server.webhooks
    assert relay is not None and relay.ingest.budget.held == 0


# -- 2. WAHA: the timestamp is required when a key applies ---------------------------


async def test_a_waha_event_without_timestamp_is_refused_unless_relaxed(
    sqlite_backend: Backend, start_relay: Start, app: TargetServer, tmp_path: Path
) -> None:
    body = waha_body("message", "s1", eid="evt-untimed", body="hi")
    untimed = {k: v for k, v in waha_headers(body).items() if k != "X-Webhook-Timestamp"}
    h = await start_relay(make_config([target(app.url)], backend=sqlite_backend, ingest=keyed()))
    status, answer = await h.post("/webhooks/waha/wa-2", body, untimed)
    assert (status, answer["error"]) == (401, "bad_signature")
    assert "missing X-Webhook-Timestamp" in answer["message"]
    assert (await h.waha(body))[0] == 200  # with it: fine

    relaxed = backend_for_sqlite(tmp_path / "relaxed.db")
    h2 = await start_relay(
        make_config([target(app.url)], backend=relaxed, ingest=keyed(waha_require_timestamp=False))
    )
    status, answer = await h2.post("/webhooks/waha/wa-2", body, untimed)
    assert (status, answer["status"]) == (200, "queued")
    # Relaxed or not, a present timestamp is still checked.
    status, answer = await h2.waha(body, ts_ms=(time.time() - 3600) * 1000)
    assert status == 401 and "old" in answer["message"]


def backend_for_sqlite(path: Path) -> Backend:
    return Backend("sqlite", "memory", "wa-router:", str(path))


# -- 3. Blazz event ids from the content; one event queued once --------------------------


async def test_a_replayed_or_retried_blazz_event_is_one_event(
    backend: Backend, start_relay: Start, app: TargetServer
) -> None:
    """Observed: one signed event replayed 3 times became 3 events with 3 ids.
    Blazz signs each retry with a new X-Timestamp: same id all the same."""
    h = await start_relay(make_config([target(app.url)], backend=backend))
    body = blazz_body("message_received", "s1", text="hi")
    want = "evt_" + hashlib.sha256(b"wa-1\0" + body).hexdigest()[:24]
    assert event_id_for("wa-1", body) == want
    now = time.time()
    answers = []
    for ts in (now, now, now + 1, now + 2):  # a replay, then retries re-signed
        status, answer = await h.blazz(body, ts=ts)
        assert status == 200, answer
        answers.append(answer)
    assert [a["id"] for a in answers] == [want] * 4
    assert [a["status"] for a in answers] == ["queued", "duplicate", "duplicate", "duplicate"]
    await app.wait_unique(1)
    await wait_drained(h.relay.queue)
    # Delivered since: a late retry is still the same event, not stored again.
    status, answer = await h.blazz(body, ts=now + 3)
    assert (status, answer["id"], answer["status"]) == (200, want, "duplicate")
    assert (await h.relay.queue.stats()).pending == 0
    await asyncio.sleep(0.3)
    assert len(app.deliveries) == 1 and app.deliveries[0].event_id == want

    # The same bytes from another instance are another event.
    status, answer = await h.blazz(body, instance="wa-2")
    assert (status, answer["status"]) == (200, "queued") and answer["id"] != want
    # A different event of the same session: another id.
    other = blazz_body("message_received", "s1", text="hi again")
    assert (await h.blazz(other))[1]["id"] == event_id_for("wa-1", other)
    await app.wait_unique(3)

    # WAHA keeps its own id, and a repeat of it is a duplicate too.
    wbody = waha_body("message", "s1", eid="evt_waha_1", body="x")
    assert [(await h.waha(wbody))[1]["status"] for _ in range(2)] == ["queued", "duplicate"]
    assert (await h.waha(wbody))[1]["id"] == "evt_waha_1"
    await app.wait_unique(4)
    assert sorted(app.counts().values()) == [1, 1, 1, 1]


# -- 4. the queue is bounded in bytes per target -------------------------------------------


async def test_a_full_target_queue_answers_429_and_the_others_go_on(
    backend: Backend, start_relay: Start, app: TargetServer
) -> None:
    """Observed: 60 signed 8 MB events -> 549 MB of SQLite in 7 s. Now a
    target's queued bodies stop at max_queued_bytes: 429 + Retry-After (Blazz
    and WAHA both retry 429), and the copies for other targets are stored."""
    down = f"http://127.0.0.1:{free_port()}/hook"  # nothing listens: events stay
    ingest = keyed(max_body_bytes=4000, max_queued_bytes=10_000)
    cfg = make_config([target(app.url), target(down, name="down")], backend=backend, ingest=ingest)
    h = await start_relay(cfg)
    bodies = [padded_blazz(3000, n=i) for i in range(5)]
    for b in bodies[:3]:
        status, answer = await h.blazz(b)
        assert (status, answer["status"]) == (200, "queued"), answer
    await app.wait_unique(3)
    deadline = time.monotonic() + 5
    while "app" in (await h.relay.queue.stats()).bytes_by_target:  # acked a moment later
        assert time.monotonic() < deadline, "app's copies never left the queue"
        await asyncio.sleep(0.01)
    assert h.http is not None
    async with h.http.post(
        h.url + "/webhooks/blazz/wa-1", data=bodies[3], headers=blazz_headers(bodies[3])
    ) as resp:
        assert resp.status == 429 and resp.headers["Retry-After"] == "5"
        answer = await resp.json()
    assert answer["error"] == "queue_full" and "down" in answer["message"]
    # "app" got its copy; a retry is a duplicate there and still full for "down".
    await app.wait_unique(4)
    status, answer = await h.blazz(bodies[3], ts=time.time() + 1)
    assert (status, answer["error"]) == (429, "queue_full")
    await asyncio.sleep(0.2)
    assert len(app.unique_ids()) == 4 and sorted(app.counts().values()) == [1, 1, 1, 1]

    await h.relay.refresh_stats()
    assert metrics.QUEUED_BYTES.labels("down")._value.get() == 9000
    assert metrics.QUEUE_USAGE.labels("down")._value.get() == pytest.approx(0.9)
    assert metrics.QUEUED_BYTES.labels("app")._value.get() == 0
    stats = await h.relay.queue.stats()
    assert stats.bytes_by_target == {"down": 9000}
    assert stats.pending == 3  # "down" holds bodies 0..2; nothing of body 3


async def test_queued_bytes_go_down_as_the_target_catches_up(
    sqlite_backend: Backend, start_relay: Start
) -> None:
    port = free_port()
    late = TargetServer(hmac_key=APP_KEY, verify="auto")
    late.port = port
    ingest = keyed(max_body_bytes=4000, max_queued_bytes=7000)
    h = await start_relay(make_config([target(late.url)], backend=sqlite_backend, ingest=ingest))
    for i in range(2):
        assert (await h.blazz(padded_blazz(3000, n=i)))[0] == 200
    assert (await h.blazz(padded_blazz(3000, n=2)))[0] == 429
    await late.start()
    try:
        await late.wait_unique(2)
        await wait_drained(h.relay.queue)
        await h.relay.refresh_stats()
        assert metrics.QUEUED_BYTES.labels("app")._value.get() == 0
        assert (await h.blazz(padded_blazz(3000, n=2)))[0] == 200
        await late.wait_unique(3)
    finally:
        await late.stop()


# -- 5. no header value, no body in the relay's logs ------------------------------------


async def test_the_relay_logs_no_header_value_and_no_body(
    sqlite_backend: Backend,
    start_relay: Start,
    caplog: pytest.LogCaptureFixture,
) -> None:
    secret = "s3cr3t-xyz"
    # Both answer '{"error": "nope"}': an answer's body is not logged either.
    rejecting = TargetServer()
    rejecting.status_for = lambda d: 422  # dead-lettered at once
    await rejecting.start()
    flaky = TargetServer()
    flaky.status_for = lambda d: 500
    await flaky.start()
    try:
        cfg = make_config(
            [target(rejecting.url), target(flaky.url, name="flaky")],
            backend=sqlite_backend,
            ingest=keyed(),
        )
        h = await start_relay(cfg)
        caplog.set_level(logging.DEBUG)
        body = blazz_body("message_received", "s1", text=secret)
        # Refused requests whose headers carry recognisable values.
        await h.post(
            "/webhooks/waha/wa-2",
            body,
            {**waha_headers(body), "X-Webhook-Hmac-Algorithm": f"md5-{secret}"},
        )
        await h.post(
            "/webhooks/blazz/wa-1",
            body,
            {**blazz_headers(body), "X-HMAC-Signature": f"{secret}{'0' * 44}"},
        )
        await h.post("/webhooks/blazz/wa-1", body, blazz_headers(body, key=secret))
        await h.post("/webhooks/blazz/wa-1", body, blazz_headers(body, ts=time.time() - 999))
        # One accepted: dead-lettered by one target, retried by the other.
        assert (await h.blazz(body))[0] == 200
        deadline = time.monotonic() + 5
        while not (h.relay.dead_lettered and h.relay.failed_rounds):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
    finally:
        await rejecting.stop()
        await flaky.stop()
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "refused" in text and "dead-lettered" in text and "failed" in text, text
    sig = blazz_headers(body)["X-HMAC-Signature"]
    for leak in (secret, '"event"', BLAZZ_KEY, APP_KEY, sig[:16], "nope"):
        assert leak not in text, (leak, text)
