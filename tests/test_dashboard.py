"""The dashboard: its stats, its authentication and data endpoints over HTTP,
and the page itself in a real headless chromium (Playwright) against a real
router in front of three simulated instance processes."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from unittest import mock

import aiohttp
import pytest
from aiohttp.test_utils import make_mocked_request
from playwright.async_api import Page, expect
from prometheus_client import CollectorRegistry, Counter, Histogram

from router.dashboard import COOKIE
from router.dashboard.handler import (
    Revocations,
    make_token,
    parse_token,
    request_is_https,
    token_valid,
    trusted_proxy,
)
from router.dashboard.stats import StatsSampler, quantile
from router.metrics import REQUEST_DURATION, REQUESTS
from tests.support.browser import browser, browser_page, chromium_path, screenshot_on_failure
from tests.support.router import (
    INSTANCE_KEY,
    ROUTER_KEY,
    RouterHandle,
    StartRouter,
    create_ready,
)
from tests.support.simulator import SimFleet, SimFleetFactory

__all__ = ["browser", "browser_page"]  # fixtures, used by name

ADMIN_KEY = "dashboard-admin-key"
# The proxy records REQUESTS / REQUEST_DURATION per instance (the page's
# request rate, error rate and p99 come from them).
PROXY_RECORDS_REQUESTS = True


# -- stats --------------------------------------------------------------------------------


def test_quantile_interpolates_inside_buckets_like_prometheus() -> None:
    inf = math.inf
    # 100 observations: 50 in (0, 0.1], 40 in (0.1, 0.2], 10 in (0.2, 0.5].
    buckets = [(0.1, 50.0), (0.2, 90.0), (0.5, 100.0), (inf, 100.0)]
    assert quantile(0.5, buckets) == pytest.approx(0.1)
    assert quantile(0.9, buckets) == pytest.approx(0.2)
    assert quantile(0.99, buckets) == pytest.approx(0.2 + 0.3 * 9 / 10)
    # Above the highest finite bound, that bound is all that is known.
    assert quantile(0.99, [(0.1, 1.0), (inf, 10.0)]) == pytest.approx(0.1)
    assert quantile(0.99, [(0.1, 0.0), (inf, 0.0)]) is None
    assert quantile(0.99, []) is None


def test_sampler_derives_rate_error_rate_and_p99_from_metric_deltas() -> None:
    reg = CollectorRegistry()
    requests = Counter(
        "t_requests_total", "t", ["instance", "method", "status_class"], registry=reg
    )
    durations = Histogram(
        "t_duration_seconds", "t", ["instance"], buckets=(0.01, 0.1, 1), registry=reg
    )
    now = [100.0]
    sampler = StatsSampler(requests, durations, interval=1.0, window=10.0, clock=lambda: now[0])
    # Traffic before the first sample is history, not rate.
    requests.labels("a", "GET", "2xx").inc(1000)
    durations.labels("a").observe(5.0)
    assert sampler.sample().window == 0.0
    for _ in range(5):
        now[0] += 1.0
        requests.labels("a", "GET", "2xx").inc(18)
        requests.labels("a", "POST", "5xx").inc(2)
        for _ in range(19):
            durations.labels("a").observe(0.005)
        durations.labels("a").observe(0.5)
        requests.labels("b", "GET", "4xx").inc(1)
        sampler.sample()
    stats = sampler.stats
    assert stats.window == pytest.approx(5.0)
    a, b = stats.get("a"), stats.get("b")
    assert a.rate == pytest.approx(20.0)
    assert a.error_rate == pytest.approx(0.1)  # 5xx only
    # 5 of 100 observations took 0.5 s: the p99 lies in (0.1, 1].
    assert a.p99 is not None and 0.1 < a.p99 <= 1.0
    assert b.rate == pytest.approx(1.0) and b.error_rate == 0.0 and b.p99 is None
    assert stats.total.rate == pytest.approx(21.0)
    assert stats.get("unknown").rate == 0.0 and stats.get("unknown").error_rate is None
    # The window slides: after 10 quiet seconds every rate is zero again.
    for _ in range(10):
        now[0] += 1.0
        sampler.sample()
    assert sampler.stats.get("a").rate == 0.0 and sampler.stats.get("a").p99 is None
    assert sampler.stats.window == pytest.approx(10.0)


def test_cookie_token_holds_no_key_expires_and_follows_the_key() -> None:
    token = make_token(ADMIN_KEY, now=1000.0, ttl=60)
    assert ADMIN_KEY not in token
    assert token_valid(ADMIN_KEY, token, now=1059.0)
    assert not token_valid(ADMIN_KEY, token, now=1061.0)
    assert not token_valid("another-key", token, now=1001.0)
    expires, nonce, mac = token.split(".")
    assert not token_valid(ADMIN_KEY, f"{int(expires) + 9999}.{nonce}.{mac}", now=1001.0)
    # Each login its own nonce, signed with the expiry: it cannot be swapped.
    parsed = parse_token(ADMIN_KEY, token, now=1001.0)
    assert parsed is not None and parsed.expires == 1060 and parsed.nonce == nonce
    other = make_token(ADMIN_KEY, now=1000.0, ttl=60)
    assert other.split(".")[1] != nonce
    assert not token_valid(ADMIN_KEY, f"{expires}.{other.split('.')[1]}.{mac}", now=1001.0)
    # Hostile cookies: refused, never an exception.
    for bad in (
        "",
        ".",
        "abc",
        "1.",
        ".abc",
        "x.y",
        f"{expires}.{mac}",  # the old two-part format
        f"\u00b2.{nonce}.{mac}",  # a digit to str.isdigit(), not to int()
        f"{expires}.{nonce.upper()}.{mac}",
        f"{expires}.{nonce}.{mac}.",
        f"{expires}.{nonce}.\udcff{mac[1:]}",  # undecodable bytes
        f"{expires}.{nonce}.{mac}\n",
    ):
        assert not token_valid(ADMIN_KEY, bad, now=1001.0), bad


def test_revocations_are_bounded_and_never_revive_a_cookie() -> None:
    def token(now: float, ttl: int = 100) -> Any:
        parsed = parse_token(ADMIN_KEY, make_token(ADMIN_KEY, now=now, ttl=ttl), now=now)
        assert parsed is not None
        return parsed

    revoked = Revocations(limit=3, ttl=100)
    a, b, c = token(0), token(10), token(20)
    for t in (a, b, c):
        revoked.revoke(t, now=30)
        revoked.revoke(t, now=30)  # twice: remembered once
    assert len(revoked) == 3 and all(revoked.revoked(t) for t in (a, b, c))
    kept = token(25)
    assert not revoked.revoked(kept)
    # Full: the expired (a, b) are forgotten first; c is still remembered.
    d = token(115)
    revoked.revoke(d, now=115)
    assert len(revoked) == 2 and revoked.revoked(c) and revoked.revoked(d)
    assert revoked.cutoff == 0 and not revoked.revoked(kept)
    # Full of live logouts: every cookie issued so far goes, memory stays bounded.
    e = token(116)
    revoked.revoke(e, now=116)
    f = token(117, ttl=1000)  # even one outliving the others
    revoked.revoke(f, now=117)
    assert len(revoked) == 0 and revoked.cutoff >= f.expires
    for t in (c, d, e, f, token(117)):
        assert revoked.revoked(t)
    assert not revoked.revoked(token(revoked.cutoff - 100 + 1))


class _Transport:
    def __init__(self, peer: Any) -> None:
        self.peer = peer

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.peer if name == "peername" else default


def _request(peer: Any, headers: dict[str, str], *, tls: bool = False) -> Any:
    request = make_mocked_request(
        "POST",
        "/dashboard/login",
        headers=headers,
        sslcontext=mock.Mock() if tls else None,
    )
    request.protocol.transport = None if peer is None else _Transport(peer)
    return request


def test_only_a_trusted_proxy_may_say_the_request_came_over_https() -> None:
    xfp = {"X-Forwarded-Proto": "https"}
    trusted = [
        ("127.0.0.1", 50000),
        ("::1", 50000, 0, 0),
        ("10.1.2.3", 1),
        ("172.16.0.9", 1),
        ("172.31.255.1", 1),
        ("192.168.1.10", 1),
        ("fd12:3456::1", 1, 0, 0),
        ("::ffff:192.168.1.10", 1, 0, 0),
        "",  # a Unix socket
    ]
    untrusted = [
        ("8.8.8.8", 1),
        ("172.32.0.1", 1),
        ("100.64.0.1", 1),  # carrier-grade NAT: shared, not ours
        ("2001:4860::8888", 1, 0, 0),
        ("::ffff:8.8.8.8", 1, 0, 0),
        ("not-an-ip", 1),
        None,  # no transport (the connection is gone)
    ]
    for peer in trusted:
        assert trusted_proxy(_request(peer, {})), peer
        assert request_is_https(_request(peer, xfp)), peer
        assert not request_is_https(_request(peer, {})), peer
    for peer in untrusted:
        assert not trusted_proxy(_request(peer, {})), peer
        assert not request_is_https(_request(peer, xfp)), peer
    # A TLS connection is HTTPS whoever the peer, whatever a header says.
    assert request_is_https(_request(("8.8.8.8", 1), {}, tls=True))
    assert request_is_https(_request(("10.0.0.1", 1), {"X-Forwarded-Proto": "http"}, tls=True))
    # The value the trusted proxy itself added is the last one.
    proxy = ("10.0.0.2", 1)
    assert not request_is_https(_request(proxy, {"X-Forwarded-Proto": "https, http"}))
    assert request_is_https(_request(proxy, {"X-Forwarded-Proto": "http, HTTPS "}))
    assert request_is_https(_request(proxy, {"Forwarded": "for=1.2.3.4;proto=https"}))
    assert not request_is_https(
        _request(proxy, {"Forwarded": "proto=https, proto=http", "X-Forwarded-Proto": "https"})
    )


# -- HTTP --------------------------------------------------------------------------------


async def setup(
    sim_fleet: SimFleetFactory, start_router: StartRouter, n: int = 3, **kwargs: Any
) -> tuple[SimFleet, RouterHandle]:
    fleet = sim_fleet(n, api_key=INSTANCE_KEY, start_delay=0.05)
    kwargs.setdefault("admin_key", ADMIN_KEY)
    kwargs.setdefault("max_sessions", 50)
    router = await start_router(fleet.urls, names=[p.name for p in fleet], **kwargs)
    return fleet, router


async def create_session(router: RouterHandle, fleet: SimFleet, name: str) -> str:
    async with router.client() as http:
        return await create_ready(http, router, fleet, name)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    # Its own cookie jar (unsafe: the router is 127.0.0.1), no redirects followed by default.
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
        yield session


async def test_dashboard_is_404_without_an_admin_key(
    sim_fleet: SimFleetFactory, start_router: StartRouter, http: aiohttp.ClientSession
) -> None:
    _fleet, router = await setup(sim_fleet, start_router, n=1, admin_key=None)
    for path in ("/dashboard", "/dashboard/api/snapshot", "/dashboard?key=x"):
        async with http.get(router.url + path, headers={"X-Admin-Key": "x"}) as resp:
            assert resp.status == 404, path


async def test_login_sets_a_strict_httponly_cookie_and_drops_the_key_from_the_url(
    sim_fleet: SimFleetFactory, start_router: StartRouter, http: aiohttp.ClientSession
) -> None:
    _fleet, router = await setup(sim_fleet, start_router, n=1)
    url = router.url + "/dashboard"
    # No cookie: the login form, not the page.
    async with http.get(url) as resp:
        assert resp.status == 401
        text = await resp.text()
        assert 'name="key"' in text and "Instances" not in text
    # API without credentials, with a client key, with a wrong admin key: 401.
    for headers in ({}, {"X-Api-Key": ROUTER_KEY}, {"X-Admin-Key": "wrong"}):
        async with http.get(url + "/api/snapshot", headers=headers) as resp:
            assert resp.status == 401, headers
    async with http.get(url, params={"key": "wrong"}, allow_redirects=False) as resp:
        assert resp.status == 401
        assert "not valid" in await resp.text()
        assert COOKIE not in resp.cookies
    async with http.get(url, params={"key": ADMIN_KEY}, allow_redirects=False) as resp:
        assert resp.status == 303
        assert resp.headers["Location"] == "/dashboard"
        assert resp.headers["Referrer-Policy"] == "no-referrer"
        set_cookie = resp.headers["Set-Cookie"]
    assert ADMIN_KEY not in set_cookie
    for attr in ("HttpOnly", "SameSite=Strict", "Path=/dashboard"):
        assert attr.lower() in set_cookie.lower(), set_cookie
    # With the cookie: the page (with a nonce CSP), and the data.
    async with http.get(url) as resp:
        assert resp.status == 200
        page = await resp.text()
        csp = resp.headers["Content-Security-Policy"]
    nonce = re.search(r"'nonce-([^']+)'", csp)
    assert nonce is not None and f'nonce="{nonce.group(1)}"' in page
    assert "__CSP_NONCE__" not in page and "default-src 'none'" in csp
    async with http.get(url + "/api/snapshot") as resp:
        assert resp.status == 200
        assert [i["name"] for i in (await resp.json())["instances"]] == ["wa-1"]
    # The login form works too; logout clears the cookie.
    async with http.post(url + "/logout", allow_redirects=False) as resp:
        assert resp.status == 303
    async with http.get(url + "/api/snapshot") as resp:
        assert resp.status == 401
    async with http.post(url + "/login", data={"key": "nope"}) as resp:
        assert resp.status == 401
    async with http.post(url + "/login", data={"key": ADMIN_KEY}) as resp:
        assert resp.status == 200 and resp.url.path == "/dashboard"  # redirected to the page
    async with http.get(url + "/api/snapshot") as resp:
        assert resp.status == 200


def _cookie_value(resp: aiohttp.ClientResponse) -> str:
    morsel = resp.cookies.get(COOKIE)
    assert morsel is not None and morsel.value, resp.headers.getall("Set-Cookie", [])
    return morsel.value


async def test_logout_revokes_the_cookie_on_the_server_and_no_key_is_shown_or_logged(
    sim_fleet: SimFleetFactory,
    start_router: StartRouter,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    _fleet, router = await setup(sim_fleet, start_router, n=1)
    dashboard = router.server.dashboard
    assert dashboard is not None
    url = router.url + "/dashboard"
    async with http.get(url, params={"key": "wrong-" + ADMIN_KEY}) as resp:
        assert resp.status == 401
        assert ADMIN_KEY not in await resp.text()
    # Two logins (two browsers): two cookies, neither of them the key.
    async with http.get(url, params={"key": ADMIN_KEY}, allow_redirects=False) as resp:
        first = _cookie_value(resp)
    async with http.post(url + "/login", data={"key": ADMIN_KEY}, allow_redirects=False) as resp:
        second = _cookie_value(resp)
    assert first != second
    for token in (first, second):
        assert ADMIN_KEY not in token
        async with aiohttp.ClientSession() as browser:
            cookie = {"Cookie": f"{COOKIE}={token}"}
            async with browser.get(url, headers=cookie) as resp:
                assert resp.status == 200
                assert ADMIN_KEY not in await resp.text()
            async with browser.get(url + "/api/snapshot", headers=cookie) as resp:
                assert resp.status == 200

    # Logouts without a valid cookie remember nothing (nobody fills the list).
    async with aiohttp.ClientSession() as stranger:
        for cookie in ("", "garbage", make_token("another-key")):
            async with stranger.post(
                url + "/logout", headers={"Cookie": f"{COOKIE}={cookie}"}, allow_redirects=False
            ) as resp:
                assert resp.status == 303
    assert len(dashboard.revocations) == 0

    async with aiohttp.ClientSession() as browser:
        async with browser.post(
            url + "/logout", headers={"Cookie": f"{COOKIE}={first}"}, allow_redirects=False
        ) as resp:
            assert resp.status == 303
            deleted = resp.headers["Set-Cookie"]
    assert f"{COOKIE}=" in deleted and "max-age=0" in deleted.lower()
    assert len(dashboard.revocations) == 1
    # The logged-out cookie, replayed (a copy kept by a thief): refused everywhere.
    async with aiohttp.ClientSession() as thief:
        cookie = {"Cookie": f"{COOKIE}={first}"}
        async with thief.get(url, headers=cookie) as resp:
            assert resp.status == 401
            assert 'name="key"' in await resp.text()
        async with thief.get(url + "/api/snapshot", headers=cookie) as resp:
            assert resp.status == 401
        async with thief.get(url + "/api/stream", headers=cookie) as resp:
            assert resp.status == 401
        # The other browser's login is untouched.
        async with thief.get(
            url + "/api/snapshot", headers={"Cookie": f"{COOKIE}={second}"}
        ) as resp:
            assert resp.status == 200
    # Logging out twice remembers it once.
    async with aiohttp.ClientSession() as browser:
        async with browser.post(
            url + "/logout", headers={"Cookie": f"{COOKIE}={first}"}, allow_redirects=False
        ) as resp:
            assert resp.status == 303
    assert len(dashboard.revocations) == 1
    assert ADMIN_KEY not in caplog.text


async def test_the_cookie_is_secure_when_the_browser_came_over_https(
    sim_fleet: SimFleetFactory, start_router: StartRouter
) -> None:
    # The tests reach the router from 127.0.0.1: a trusted proxy's address.
    _fleet, router = await setup(sim_fleet, start_router, n=1)
    url = router.url + "/dashboard"

    async def set_cookie(method: str, path: str, headers: dict[str, str]) -> str:
        async with aiohttp.ClientSession() as browser:
            kwargs: dict[str, Any] = {"headers": headers, "allow_redirects": False}
            if path == "/login":
                kwargs["data"] = {"key": ADMIN_KEY}
            if path == "/logout":
                async with browser.get(url, params={"key": ADMIN_KEY}, **kwargs) as resp:
                    headers = {**headers, "Cookie": f"{COOKIE}={_cookie_value(resp)}"}
                    kwargs["headers"] = headers
            params = {"key": ADMIN_KEY} if path == "" else None
            async with browser.request(method, url + path, params=params, **kwargs) as resp:
                assert resp.status == 303, await resp.text()
                value = resp.headers["Set-Cookie"]
        for attr in ("HttpOnly", "SameSite=Strict", "Path=/dashboard"):
            assert attr.lower() in value.lower(), value
        return value

    for method, path in (("GET", ""), ("POST", "/login"), ("POST", "/logout")):
        for headers in (
            {"X-Forwarded-Proto": "https"},
            {"X-Forwarded-Proto": "HTTPS"},
            {"Forwarded": "for=198.51.100.7;proto=https"},
        ):
            value = await set_cookie(method, path, headers)
            assert "secure" in value.lower().split("; "), (path, headers, value)
        for headers in (
            {},
            {"X-Forwarded-Proto": "http"},
            {"X-Forwarded-Proto": "https, http"},  # the proxy's own value is the last
        ):
            value = await set_cookie(method, path, headers)
            assert "secure" not in value.lower().split("; "), (path, headers, value)


async def _raw_status(router: RouterHandle, head: bytes) -> int:
    host, _, port = router.url.removeprefix("http://").partition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(head + b"\r\n\r\n")
        await writer.drain()
        line = await reader.readline()
    finally:
        writer.close()
    return int(line.split()[1])


async def test_undecodable_keys_and_cookies_are_refused_not_a_500(
    sim_fleet: SimFleetFactory, start_router: StartRouter
) -> None:
    _fleet, router = await setup(sim_fleet, start_router, n=1)
    for path in (b"/dashboard", b"/dashboard/api/snapshot"):
        for header in (
            b"X-Admin-Key: \xff\xfe",
            b"Authorization: Bearer \xed\xa0\x80",
            b"Cookie: " + COOKIE.encode() + b"=\xff.\xfe",
            b"Cookie: " + COOKIE.encode() + b"=\xc2\xb2.0123456789abcdef0123456789abcdef.00",
        ):
            head = b"GET " + path + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + header
            assert await _raw_status(router, head) == 401, (path, header)


async def test_changes_by_cookie_need_the_csrf_header_and_only_some_admin_calls_pass(
    sim_fleet: SimFleetFactory, start_router: StartRouter, http: aiohttp.ClientSession
) -> None:
    fleet, router = await setup(sim_fleet, start_router, n=2)
    await create_session(router, fleet, "csrf-1")
    base = router.url + "/dashboard/api"
    await http.get(router.url + "/dashboard", params={"key": ADMIN_KEY})
    async with http.post(base + "/admin/instances/wa-1/maintenance") as resp:
        assert resp.status == 403
    assert router.runtime.fleet.get("wa-1").admin.value == "active"  # type: ignore[union-attr]
    csrf = {"X-Dashboard-Request": "1"}
    async with http.post(base + "/admin/instances/wa-1/maintenance", headers=csrf) as resp:
        assert resp.status == 200, await resp.text()
        assert (await resp.json())["admin"] == "maintenance"
    async with http.post(base + "/admin/instances/wa-1/undrain", headers=csrf) as resp:
        assert resp.status == 200 and (await resp.json())["admin"] == "active"
    # Not offered to the page: forgetting or moving sessions, reconcile.
    for method, path in (
        ("DELETE", "/admin/sessions/csrf-1"),
        ("POST", "/admin/sessions/csrf-1/move"),
        ("POST", "/admin/reconcile"),
    ):
        async with http.request(method, base + path, headers=csrf) as resp:
            assert resp.status == 404, path
    assert router.runtime.smap.cached("csrf-1") is not None
    # A script with the admin key in a header needs no CSRF header.
    async with aiohttp.ClientSession() as script:
        async with script.get(
            base + "/admin/sessions/csrf-1", headers={"X-Admin-Key": ADMIN_KEY}
        ) as resp:
            assert resp.status == 200
            assert (await resp.json())["instance"] == router.runtime.smap.cached("csrf-1")
        async with script.post(
            base + "/admin/instances/wa-2/maintenance",
            headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        ) as resp:
            assert resp.status == 200


async def test_snapshot_search_and_stream_carry_no_secret_and_streams_are_cleaned_up(
    sim_fleet: SimFleetFactory, start_router: StartRouter
) -> None:
    fleet = sim_fleet(2, api_key=INSTANCE_KEY, start_delay=0.05)
    urls = [
        u.replace("http://", "http://user:url-password@") + "/?token=q-secret" for u in fleet.urls
    ]
    # Names of their own: this test records into the process-wide metrics.
    names = ["dx-1", "dx-2"]
    router = await start_router(urls, names=names, admin_key=ADMIN_KEY)
    await router.runtime.smap.assign_many({"alpha-1": "dx-1", "alpha-2": "dx-2", "beta-1": "dx-1"})
    dashboard = router.server.dashboard
    assert dashboard is not None
    headers = {"X-Admin-Key": ADMIN_KEY}
    secrets = (INSTANCE_KEY, "url-password", "user:", "q-secret", ADMIN_KEY, ROUTER_KEY)
    async with aiohttp.ClientSession(headers=headers) as http:
        async with http.get(router.url + "/dashboard/api/snapshot") as resp:
            text = await resp.text()
        for secret in secrets:
            assert secret not in text
        snap = json.loads(text)
        assert snap["totals"]["sessions"] == 3
        assert {i["name"]: i["sessions"] for i in snap["instances"]} == {"dx-1": 2, "dx-2": 1}
        search = router.url + "/dashboard/api/admin/sessions"
        async with http.get(search, params={"q": "ALPHA"}) as resp:
            found = await resp.json()
        assert sorted((s["session"], s["instance"]) for s in found["sessions"]) == [
            ("alpha-1", "dx-1"),
            ("alpha-2", "dx-2"),
        ]

        async with http.get(router.url + "/dashboard/api/stream") as resp:
            assert resp.headers["Content-Type"].startswith("text/event-stream")

            async def read_until(kind: str) -> Any:
                event = ""
                async for raw in resp.content:
                    line = raw.decode().rstrip("\n")
                    if line.startswith("event: "):
                        event = line[len("event: ") :]
                    elif line.startswith("data: "):
                        for secret in secrets:
                            assert secret not in line
                        if event == kind:
                            return json.loads(line[len("data: ") :])
                raise AssertionError(f"stream ended before a {kind!r} event")

            async with asyncio.timeout(5):
                await read_until("hello")
                await read_until("snapshot")
                assert dashboard.streams == 1
                router.runtime.events.add("down", instance="dx-2", failed_checks=2)
                event = await read_until("fleet")
                assert event["kind"] == "down" and event["instance"] == "dx-2"
                await read_until("snapshot")  # pushed right after the change

            # What the proxy records becomes rates in the next snapshots.
            try:
                REQUESTS.labels("dx-1", "GET", "2xx").inc(30)
                REQUESTS.labels("dx-1", "POST", "5xx").inc(10)
                for _ in range(40):
                    REQUEST_DURATION.labels("dx-1").observe(0.02)
                async with asyncio.timeout(5):
                    while True:
                        snap = await read_until("snapshot")
                        dx1 = snap["instances"][0]
                        if dx1["requests"] == 40:
                            break
            finally:
                for labels in (("dx-1", "GET", "2xx"), ("dx-1", "POST", "5xx")):
                    REQUESTS.remove(*labels)
                REQUEST_DURATION.remove("dx-1")
            assert dx1["rate"] > 0 and dx1["error_rate"] == 0.25
            assert 0.01 < dx1["p99"] <= 0.025  # inside the (10 ms, 25 ms] bucket
            assert snap["totals"]["rate"] == dx1["rate"]
            assert snap["instances"][1]["rate"] == 0 and snap["instances"][1]["p99"] is None

        # The browser went away: its subscription goes within a tick.
        async with asyncio.timeout(5):
            # A disconnect is only seen at the stream's next write: poll.
            while dashboard.streams or router.runtime.events._subscribers:  # noqa: ASYNC110
                await asyncio.sleep(0.05)

        # A stream open at shutdown ends at once instead of holding the drain.
        async with http.get(router.url + "/dashboard/api/stream") as resp:
            await resp.content.readline()
            loop = asyncio.get_running_loop()
            started = loop.time()
            await router.server.shutdown()
            assert loop.time() - started < 1.5
            assert dashboard.streams == 0
        assert not dashboard.sampler.running


# -- the page in a real browser ---------------------------------------------------------


def test_a_missing_chromium_fails_the_test_with_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHROMIUM", "/nonexistent/chromium")
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(pytest.fail.Exception, match=r"apt-get install -y chromium"):
        chromium_path()


def row(page: Page, name: str) -> Any:
    return page.locator(f'tr[data-instance="{name}"]')


async def test_dashboard_in_a_real_browser(
    sim_fleet: SimFleetFactory,
    start_router: StartRouter,
    browser_page: Page,
    tmp_path: Path,
) -> None:
    page = browser_page
    fleet, router = await setup(sim_fleet, start_router, n=3)
    # Script errors and Content-Security-Policy refusals fail the test.
    problems: list[str] = []
    page.on("pageerror", lambda exc: problems.append(f"uncaught: {exc}"))
    page.on(
        "console",
        lambda msg: problems.append(msg.text) if "Content Security Policy" in msg.text else None,
    )
    async with screenshot_on_failure(page, tmp_path):
        await page.goto(f"{router.url}/dashboard?key={ADMIN_KEY}")
        # The key left the address bar; the cookie cannot be read by scripts.
        assert page.url == f"{router.url}/dashboard"
        cookies = await page.context.cookies()
        assert [(c["name"], c["httpOnly"], c["sameSite"]) for c in cookies] == [
            (COOKIE, True, "Strict")
        ]
        await expect(page.get_by_role("heading", name="Instances")).to_be_visible()
        await expect(page.locator("#conn")).to_have_text(re.compile("Live"))

        # The demo fleet: three instances, healthy (said in words, not only colour).
        await expect(page.locator("#instances tbody tr")).to_have_count(3)
        for proc in fleet:
            await expect(row(page, proc.name).locator('[data-col="health"]')).to_have_text(
                "✓ healthy"
            )
            await expect(row(page, proc.name).locator('[data-col="admin"]')).to_have_text("active")
        await expect(page.locator("#t-healthy")).to_have_text("3 of 3")

        # Sessions appear in the counts as they are created.
        owners = {s: await create_session(router, fleet, s) for s in ("dash-a", "dash-b", "dash-c")}
        await expect(page.locator("#t-sessions")).to_have_text("3")
        for proc in fleet:
            n = sum(1 for o in owners.values() if o == proc.name)
            await expect(row(page, proc.name).locator('[data-col="sessions"]')).to_have_text(
                f"{n} / 50"
            )

        # Traffic through the proxy shows as a request rate.
        async with router.client() as http:
            for _ in range(10):
                for s in owners:
                    async with http.get(f"{router.url}/api/{s}/me") as resp:
                        assert resp.status == 200
        if PROXY_RECORDS_REQUESTS:
            busy = row(page, owners["dash-a"])
            await expect(busy.locator('[data-col="rate"]')).to_have_text(re.compile("[1-9]"))
            await expect(busy.locator('[data-col="errors"]')).to_have_text("0.00 %")
            await expect(busy.locator('[data-col="p99"]')).to_have_text(re.compile(" m?s$"))
            await expect(page.locator("#t-rate")).to_have_text(re.compile("[1-9]"))

        # SIGKILL one instance: the page shows it down (health checks: fall=2 x 0.2 s).
        victim = owners["dash-a"]
        fleet.by_name(victim).kill()
        await expect(row(page, victim).locator('[data-col="health"]')).to_have_text("✗ down")
        await expect(row(page, victim)).to_have_attribute("data-health", "down")
        await expect(page.locator("#t-healthy")).to_have_text("2 of 3")
        await expect(page.locator("#events li[data-kind='down']").first).to_contain_text(victim)

        # Its session fails over (as the proxy's next request for it would
        # have it; tests/test_failover.py covers that path): a recent failover.
        failed = router.runtime.fleet.get(victim)
        moved = await router.runtime.failover.recover(
            "dash-a", failed, "connect", exclude_failed=True
        )
        assert moved is not None and moved.name != victim
        failovers = page.locator("#failovers tbody tr")
        await expect(failovers.first).to_contain_text("dash-a")
        await expect(failovers.first).to_contain_text(victim)

        # Drain another instance from the page; its admin state changes.
        target = next(p.name for p in fleet if p.name != victim)
        page.once("dialog", lambda dialog: asyncio.ensure_future(dialog.accept()))
        await page.get_by_role("button", name=f"Drain {target}", exact=True).click()
        await expect(row(page, target).locator('[data-col="admin"]')).to_have_text("⇢ draining")
        await expect(
            page.get_by_role("button", name=f"Drain {target}", exact=True)
        ).to_be_disabled()
        await expect(page.locator("#notice")).to_contain_text(f"Draining {target}")
        await expect(row(page, target).locator('[data-col="sessions"]')).to_have_text("0 / 50")
        await page.get_by_role("button", name=f"Undrain {target}", exact=True).click()
        await expect(row(page, target).locator('[data-col="admin"]')).to_have_text("active")

        # Session search.
        await page.get_by_label("Session id contains").fill("dash-b")
        await page.get_by_role("button", name="Search").click()
        result = page.locator('#results tbody tr[data-session="dash-b"]')
        await expect(result).to_have_count(1)
        owner_b = router.runtime.smap.cached("dash-b")
        assert owner_b is not None
        await expect(result).to_contain_text(owner_b)
        await page.get_by_label("Session id contains").fill("no-such-session")
        await page.get_by_role("button", name="Search").click()
        await expect(page.locator("#search-status")).to_contain_text("No session matches")

        # Log out: the browser drops the cookie and the router refuses a copy of it.
        token = (await page.context.cookies())[0]["value"]
        await page.get_by_role("button", name="Log out").click()
        await expect(page.get_by_label("Admin key")).to_be_visible()
        assert await page.context.cookies() == []
        async with aiohttp.ClientSession() as thief:
            async with thief.get(
                f"{router.url}/dashboard/api/snapshot", headers={"Cookie": f"{COOKIE}={token}"}
            ) as resp:
                assert resp.status == 401
        assert problems == []
