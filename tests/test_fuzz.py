"""Hostile raw HTTP against a real router process in front of simulators (issue 11).

Hypothesis drives the grammar of ``tests/support/hostile.py``: methods
(valid, odd, garbage), paths from the adapter's real routes with hostile
segments (``%2F %5C %00 %zz``, dot segments, ``//``, unicode, very long, case
variants), query strings, headers (the router key in odd places,
duplicates, huge, invalid characters, Content-Length / Transfer-Encoding
mismatches, gzip that is not gzip), bodies (JSON, JSON nested 3,000 and
100,000 deep, invalid JSON, forms, binary), and webhook ingest (signed,
badly signed, stale, unsigned), each on its own socket.

Per request (``hostile.problems``): never a 5xx (every instance is up, so
no 502/503/504 has an excuse either), a router error is its documented
JSON with the status of its code, answered or closed within a bound, and
no key of the config but the client's own in the answer.

After the run: the sentinel (a listener in no config, named in Host,
absolute-form targets, X-Forwarded-Host, Forwarded, X-Instance-Url, body
URLs) got no connection; no session runs that only a create could have
started, and none runs twice; no key of the config is in the router's
log; the router still serves ``/healthz`` and a normal send.

``WA_FUZZ_EXAMPLES`` changes the number of requests per dialect (default
600: about 30 s per dialect), ``WA_FUZZ_SEED`` explores another sequence,
``WA_FUZZ_TRACE=FILE`` writes one line per request.

The tests after it are the smallest reproductions of what the fuzzing
found (issue 11): each fails until its router bug is fixed.
"""

from __future__ import annotations

import os
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import pytest
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from tests.support.hostile import (
    WAHA_INVENTED,
    Answer,
    Built,
    Keys,
    RouterProcess,
    Sentinel,
    Sessions,
    Sink,
    Target,
    build_request,
    exchange,
    leaks,
    problems,
    request_bytes,
    running_sessions,
    sim_state,
)
from tests.support.simulator import SimFleet, SimFleetFactory
from tests.support.webhook_target import free_port

T = TypeVar("T")

EXAMPLES = int(os.environ.get("WA_FUZZ_EXAMPLES", "600"))
# Another fixed seed explores other requests (default: derandomized, the same every run).
SEED = os.environ.get("WA_FUZZ_SEED")
# A file to append one line per request to (status, grammar branch, request line, answer).
TRACE = os.environ.get("WA_FUZZ_TRACE")
HEADER_TIMEOUT = BODY_TIMEOUT = 2.0
# Longest a request may go unanswered and unclosed: a body the router waits
# for (body timeout), plus a slow upstream leg, plus scheduling slack.
BOUND = BODY_TIMEOUT + HEADER_TIMEOUT + 4.0


class DrawChooser:
    """``hostile.Chooser`` over Hypothesis draws. Every choice shrinks towards
    the first option, the low end, and "no" (the plain request)."""

    def __init__(self, data: st.DataObject) -> None:
        self.data = data

    def pick(self, options: Sequence[T]) -> T:
        return self.data.draw(st.sampled_from(options))

    def integer(self, lo: int, hi: int) -> int:
        return self.data.draw(st.integers(lo, hi))

    def chance(self, p: float) -> bool:
        return self.data.draw(st.integers(0, 9999)) >= (1 - p) * 10000

    def raw(self, lo: int, hi: int) -> bytes:
        return self.data.draw(st.binary(min_size=lo, max_size=hi))


class Stand:
    """Three simulated instances of one dialect behind a real router process."""

    def __init__(
        self,
        dialect: str,
        fleet: SimFleet,
        tmp: Path,
        keys: Keys,
        *,
        body_timeout: float = BODY_TIMEOUT,
    ) -> None:
        self.dialect = dialect
        self.fleet = fleet
        self.keys = keys
        self.sentinel = Sentinel()
        self.sink = Sink()
        port = free_port()
        tmp.mkdir(parents=True, exist_ok=True)
        cfg = tmp / "router.yaml"
        from tests.support.hostile import write_config

        env = write_config(
            cfg,
            dialect=dialect,
            port=port,
            instances=[(p.name, p.url) for p in fleet],
            keys=keys,
            sink_url=self.sink.url,
            header_timeout=HEADER_TIMEOUT,
            body_timeout=body_timeout,
        )
        self.router = RouterProcess(cfg, port, tmp / "router.log", env)
        self.sessions = Sessions.for_dialect(dialect)
        self.target = Target(
            dialect=dialect,
            host="127.0.0.1",
            port=port,
            keys=keys,
            sessions=self.sessions,
            instances=tuple(p.name for p in fleet),
            sentinel_port=self.sentinel.port,
        )
        # Sessions a request may have started: the test's own creates, and
        # whatever a create-shaped fuzz request named.
        self.allowed: set[str] = set()
        self.fuzz_creates = 0

    def close(self) -> None:
        self.router.stop()
        self.sentinel.close()
        self.sink.close()

    # -- well-formed calls -------------------------------------------------------------

    def call(self, method: str, path: str, body: object = None) -> Answer:
        headers = {"X-Api-Key": self.keys.router} if self.dialect == "waha" else {}
        if self.dialect == "blazz" and isinstance(body, dict):
            body = {**body, "api_key": self.keys.router}
        if self.dialect == "blazz" and body is None:
            path += ("&" if "?" in path else "?") + "api_key=" + self.keys.router
        data = request_bytes(
            method, path, host=f"127.0.0.1:{self.router.port}", headers=headers, body=body
        )
        return exchange("127.0.0.1", self.router.port, data, deadline=30)

    def create(self, session: str) -> None:
        self.allowed.add(session)
        if self.dialect == "blazz":
            answer = self.call("POST", "/api/sessions", {"session_id": session, "workspace_id": 7})
            assert answer.status == 200, answer.raw[:500]
        else:
            answer = self.call("POST", "/api/sessions", {"name": session})
            assert answer.status == 201, answer.raw[:500]

    def wait_running(self, sessions: Sequence[str], within: float = 15.0) -> None:
        deadline = time.monotonic() + within
        while True:
            states = {
                s["name"]: s["status"] for p in self.fleet for s in sim_state(p.url)["sessions"]
            }
            if all(states.get(s) == "WORKING" for s in sessions):
                return
            assert time.monotonic() < deadline, states
            time.sleep(0.05)

    def send(self, session: str, text: str) -> Answer:
        if self.dialect == "blazz":
            body = {"session_id": session, "recipient_phone": "15550001111", "message": text}
            return self.call("POST", "/api/messages/send", body)
        body = {"session": session, "chatId": "1@c.us", "text": text}
        return self.call("POST", "/api/sendText", body)

    def sent_ok(self, answer: Answer) -> bool:
        return answer.status == (200 if self.dialect == "blazz" else 201)


StandFactory = Callable[..., Stand]


@pytest.fixture
def make_stand(sim_fleet: SimFleetFactory, tmp_path: Path) -> Iterator[StandFactory]:
    made: list[Stand] = []

    def make(dialect: str, **kwargs: float) -> Stand:
        keys = Keys.fresh()
        fleet = sim_fleet(3, dialect=dialect, api_key=keys.instance)
        s = Stand(dialect, fleet, tmp_path / f"stand-{len(made)}", keys, **kwargs)
        made.append(s)
        s.router.start()
        return s

    yield make
    for s in made:
        s.close()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("dialect", ["waha", "blazz"])
def test_hostile_raw_http_breaks_nothing(make_stand: StandFactory, dialect: str) -> None:
    stand = make_stand(dialect)
    sessions = stand.sessions
    for name in (*sessions.live, sessions.final):
        stand.create(name)
    stand.wait_running([*sessions.live, sessions.final])
    assert stand.sent_ok(stand.send(sessions.final, "before"))

    seen: Counter[str] = Counter()

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=SEED is None,
        database=None,
        phases=(Phase.explicit, Phase.generate, Phase.shrink),
        suppress_health_check=list(HealthCheck),
        report_multiple_bugs=False,
    )
    @seed(int(SEED or 0))
    @given(st.data())
    def one_request(data: st.DataObject) -> None:
        built = build_request(DrawChooser(data), stand.target)
        if built.creates:
            stand.fuzz_creates += 1
            stand.allowed |= built.names
        answer = exchange(
            "127.0.0.1",
            stand.router.port,
            built.data,
            deadline=BOUND + 2,
            head_only=built.method.upper() == "HEAD",
        )
        seen[f"{answer.status}" if answer.status is not None else "closed"] += 1
        if TRACE:
            with open(TRACE, "a") as out:
                line = built.data.split(b"\r\n", 1)[0][:150]
                out.write(f"{answer.status} {built.kind} {line!r} {answer.body[:160]!r}\n")
        found = problems(built, answer, bound=BOUND, keys=stand.keys)
        assert stand.router.alive, "the router died:\n" + stand.router.log_text()[-3000:]
        assert not found, describe(built, answer, found)

    one_request()
    print(f"\n{stand.dialect}: answers {dict(sorted(seen.items()))}")

    # Nothing connected to a host outside the config.
    assert stand.sentinel.connections == [], stand.sentinel.connections[:5]

    # No session runs that a non-create started, and none runs twice.
    allowed = set(stand.allowed)
    if stand.fuzz_creates:
        # What the upstream names a create that names nothing: WAHA "default"
        # (legacy start) or session_<hex>, Blazz "undefined" (JavaScript).
        allowed |= {"default", "undefined"}
    running = running_sessions((p.name, p.url) for p in stand.fleet)
    started = {
        s
        for s in running
        if s not in allowed and not (stand.fuzz_creates and WAHA_INVENTED.fullmatch(s))
    }
    assert not started, f"sessions started by no create: {started} ({running})"
    twice = {s: where for s, where in running.items() if len(where) > 1}
    assert not twice, f"sessions running on two instances: {twice}"

    # Alive and serving: /healthz and a normal send, recorded once.
    health = exchange(
        "127.0.0.1",
        stand.router.port,
        request_bytes("GET", "/healthz", host=f"127.0.0.1:{stand.router.port}"),
    )
    assert health.status == 200, health.raw[:300]
    after = stand.send(sessions.final, "after")
    assert stand.sent_ok(after), after.raw[:500]
    texts = [r.get("text") or r.get("message") for r in stand.fleet.sent(sessions.final)]
    assert texts.count("after") == 1, texts

    # No secret in the log (the router is stopped first: everything is flushed).
    stand.router.stop()
    log = stand.router.log_text()
    leaked = leaks(log.encode(), stand.keys.secrets())
    assert not leaked, f"{leaked} in the router log"
    assert "Traceback" not in log, log[-3000:]


def describe(built: Built, answer: Answer, found: list[str]) -> str:
    return (
        f"{'; '.join(found)}\n"
        f"  kind={built.kind} wellformed={built.wellformed} short_body={built.short_body}\n"
        f"  request ({len(built.data)} bytes): {built.data[:1500]!r}\n"
        f"  answer: status={answer.status} closed={answer.closed} timed_out={answer.timed_out}"
        f" elapsed={answer.elapsed:.2f}s error={answer.error}\n"
        f"  {answer.raw[:1500]!r}"
    )


# -- what the fuzzing found ----------------------------------------------------------------


def only_copy(stand: Stand, session: str) -> list[str]:
    time.sleep(1.0)  # a restore elsewhere starts within the request; let it settle
    return running_sessions((p.name, p.url) for p in stand.fleet).get(session, [])


def test_a_not_found_about_another_session_does_not_start_a_second_copy(
    make_stand: StandFactory,
) -> None:
    """``OPTIONS /api/sessions/victim`` reaches WAHA's ``/api/{session}/...``
    route with session "sessions": its 404 "Session not found" is not about
    "victim", which runs there. The router restores "victim" on another
    instance without asking the one that answered (failover of a
    ``session_missing`` answer never probes the owner): two copies, a 503."""
    stand = make_stand("waha")
    stand.create("victim")
    stand.wait_running(["victim"])
    owner = only_copy(stand, "victim")
    answer = stand.call("OPTIONS", "/api/sessions/victim")
    assert answer.status is not None and answer.status < 500, answer.raw[:400]
    assert only_copy(stand, "victim") == owner


def test_a_null_session_field_is_not_read_as_the_default_session(
    make_stand: StandFactory,
) -> None:
    """``{"session": null}`` is "default" to the router (a missing field) but
    null to the instance, whose 404 then makes the router restore "default"
    on a second instance while it runs on the first (WAHA Core's only session)."""
    stand = make_stand("waha")
    stand.create("default")
    stand.wait_running(["default"])
    owner = only_copy(stand, "default")
    answer = stand.call("POST", "/api/sendText", {"session": None, "chatId": "1@c.us", "text": "x"})
    assert answer.status is not None and answer.status < 500, answer.raw[:400]
    assert only_copy(stand, "default") == owner
    assert stand.fleet.sent("default") == []


def test_a_blazz_create_without_session_id_is_refused(make_stand: StandFactory) -> None:
    """Blazz creates a session named "undefined" for a create without
    ``session_id`` (the router logs that it cannot name it); a second such
    create, placed on another instance, fights over the same browser profile
    and answers 500. The router should refuse it (400) as it cannot route it."""
    stand = make_stand("blazz")
    for _ in range(2):
        answer = stand.call("POST", "/api/sessions", {"workspace_id": 7})
        assert answer.status is not None and 400 <= answer.status < 500, answer.raw[:400]
    assert only_copy(stand, "undefined") == []


def test_a_form_body_names_the_session_the_instance_reads(make_stand: StandFactory) -> None:
    """WAHA (NestJS) parses urlencoded bodies; the WAHA adapter does not
    (``reads_forms`` is False), so ``session=victim`` as a form is routed as
    "default" while the instance reads "victim": a 404 from "default"'s owner,
    then "default" restored on a second instance while it runs on the first."""
    stand = make_stand("waha")
    for name in ("victim", "default"):
        stand.create(name)
    stand.wait_running(["victim", "default"])
    before = running_sessions((p.name, p.url) for p in stand.fleet)
    data = request_bytes(
        "POST",
        "/api/sendText",
        host=f"127.0.0.1:{stand.router.port}",
        headers={
            "X-Api-Key": stand.keys.router,
            "Content-Type": "application/x-www-form-urlencoded",
        },
        body=b"session=victim&chatId=1%40c.us&text=form",
    )
    answer = exchange("127.0.0.1", stand.router.port, data, deadline=30)
    assert answer.status is not None and answer.status < 500, answer.raw[:400]
    time.sleep(1.0)
    assert running_sessions((p.name, p.url) for p in stand.fleet) == before
    if answer.status == 201:  # routed by the form: sent once, by victim's owner
        assert [r["instance"] for r in stand.fleet.sent("victim")] == before["victim"]


def test_a_stalled_webhook_body_is_cut_off(make_stand: StandFactory) -> None:
    """Webhook ingest reads its body without ``limits.body_timeout`` (and the
    connection sweep skips busy connections): half a body holds the
    connection, and the memory it was sent with, for as long as the client likes."""
    stand = make_stand("waha")
    head = (
        f"POST /webhooks/waha/{stand.fleet[0].name} HTTP/1.1\r\nHost: x\r\n"
        "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", stand.router.port)) as s:
        answer = exchange(
            "127.0.0.1",
            stand.router.port,
            head + b'{"event": "' + b"a" * 480,
            deadline=BODY_TIMEOUT + HEADER_TIMEOUT + 4,
            sock=s,
        )
    assert not answer.timed_out, "the router still holds the connection"


def test_a_stalled_client_body_does_not_eject_the_instance(make_stand: StandFactory) -> None:
    """A chunked body that stops is streamed upstream; the upstream read
    timeout (``timeouts.read``, 10 s here) ends it before ``limits.body_timeout``
    (30 s, its default) would, as a 504 ``upstream_timeout`` counted against
    the instance: five eject it (outlier detection)."""
    stand = make_stand("waha", body_timeout=30.0)
    stand.create("victim")
    stand.wait_running(["victim"])
    stall = (
        f"GET /api/victim/chats HTTP/1.1\r\nHost: x\r\nX-Api-Key: {stand.keys.router}\r\n"
        "Transfer-Encoding: chunked\r\n\r\n10\r\nabc"
    ).encode()
    with ThreadPoolExecutor(5) as pool:
        answers = list(
            pool.map(
                lambda _: exchange("127.0.0.1", stand.router.port, stall, deadline=40), range(5)
            )
        )
    assert all(a.status is None or a.status < 500 for a in answers), [a.status for a in answers]
    listing = exchange(
        "127.0.0.1",
        stand.router.port,
        request_bytes(
            "GET", "/admin/instances", host="x", headers={"X-Admin-Key": stand.keys.admin}
        ),
    ).json()
    assert all(i["healthy"] for i in listing["instances"]), listing


def test_an_upgrade_header_on_a_plain_route_is_not_a_502(make_stand: StandFactory) -> None:
    """``Upgrade: websocket`` on a route that is no WebSocket makes the router
    try to bridge one; the instance answers 200, the client gets 502
    ``upstream_ws_refused``: its own malformed request reported as an upstream failure."""
    stand = make_stand("waha")
    stand.create("victim")
    stand.wait_running(["victim"])
    answer = exchange(
        "127.0.0.1",
        stand.router.port,
        request_bytes(
            "GET",
            "/api/sessions/victim",
            host="x",
            headers={"X-Api-Key": stand.keys.router, "Upgrade": "websocket"},
        ),
    )
    assert answer.status is not None and answer.status < 500, answer.raw[:400]
