"""Hostile HTTP input against a real router process: the grammar, the raw client, the checks.

Shared by ``tests/test_fuzz.py`` (driven by Hypothesis) and
``bench/hostile/run.py`` (driven by a seeded ``random.Random``): both hand
``build_request`` a ``Chooser``, so the two explore the same request space.

* ``Keys``, ``Sessions``, ``Target``: what a request may name (the keys of the
  config, sessions that exist or do not, the sentinel's address).
* ``build_request``: one raw HTTP/1.1 request (``Built``: its bytes and what
  the builder knows about it: well-formed or not, may it create a session).
* ``exchange``: send the bytes on a fresh socket; the first answer (``Answer``)
  or the close, within a deadline.
* ``problems``: what is wrong with an answer (a 5xx, a router error that is
  not its documented JSON, a key that leaked into it).
* ``RouterProcess``, ``write_config``, ``Sentinel``, ``Sink``: the processes
  and listeners around it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import gzip
import hashlib
import hmac
import http.server
import json
import os
import random
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import quote, unquote

REPO = Path(__file__).resolve().parents[2]
T = TypeVar("T")


# -- keys and names ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Keys:
    """Every secret of the config; none may appear in the router's log."""

    router: str
    instance: str
    admin: str
    blazz_hmac: str
    waha_hmac: str
    app_hmac: str

    @classmethod
    def fresh(cls) -> Keys:
        # Distinctive (grep-able) and different on every run.
        return cls(
            router="rk-" + secrets.token_hex(12),
            instance="ik-" + secrets.token_hex(12),
            admin="ak-" + secrets.token_hex(12),
            blazz_hmac="bh-" + secrets.token_hex(12),
            waha_hmac="wh-" + secrets.token_hex(12),
            app_hmac="ah-" + secrets.token_hex(12),
        )

    def secrets(self) -> dict[str, str]:
        return dataclasses.asdict(self)

    def never_answered(self) -> dict[str, str]:
        """Keys a client must never read in an answer (its own router key may be echoed)."""
        return {k: v for k, v in self.secrets().items() if k != "router"}


def leaks(text: bytes, secrets_: dict[str, str]) -> list[str]:
    """Which secrets appear in ``text`` (as is, or percent-encoded)."""
    found = []
    for name, value in secrets_.items():
        forms = {value, quote(value, safe=""), value.upper()}
        if any(f.encode() in text for f in forms):
            found.append(name)
    return found


@dataclasses.dataclass(frozen=True)
class Sessions:
    live: tuple[str, ...]  # created by the test before fuzzing: requests may use them
    ghost: tuple[str, ...]  # never created: no request but a create may start them
    new: tuple[str, ...]  # names the fuzzer's create requests may use
    final: str  # created by the test, never named by the fuzzer (the last good send)

    @classmethod
    def for_dialect(cls, dialect: str) -> Sessions:
        if dialect == "blazz":
            mk = lambda tag: f"webjs_7_1700000000_{tag}"  # noqa: E731
        else:
            mk = lambda tag: f"fz-{tag}"  # noqa: E731
        # WAHA Core runs one session, "default": make it one of the live ones.
        return cls(
            live=(mk("live1"), mk("live2") if dialect == "blazz" else "default"),
            ghost=(mk("ghost1"), mk("ghost2")),
            new=tuple(mk(f"new{i}") for i in range(1, 4)),
            final=mk("final"),
        )


@dataclasses.dataclass
class Target:
    """What the grammar needs to know about the router under attack."""

    dialect: str  # "waha" | "blazz"
    host: str
    port: int
    keys: Keys
    sessions: Sessions
    instances: tuple[str, ...]
    sentinel_port: int

    @property
    def sentinel(self) -> str:
        return f"127.0.0.1:{self.sentinel_port}"


# -- the grammar -------------------------------------------------------------------------


class Chooser(Protocol):
    """The only source of choices of ``build_request`` (Hypothesis or random)."""

    def pick(self, options: Sequence[T]) -> T: ...
    def integer(self, lo: int, hi: int) -> int: ...
    def chance(self, p: float) -> bool: ...
    def raw(self, lo: int, hi: int) -> bytes: ...


class RandomChooser:
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def pick(self, options: Sequence[T]) -> T:
        return options[self.rng.randrange(len(options))]

    def integer(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)

    def chance(self, p: float) -> bool:
        return self.rng.random() < p

    def raw(self, lo: int, hi: int) -> bytes:
        return self.rng.randbytes(self.rng.randint(lo, hi))


@dataclasses.dataclass
class Built:
    data: bytes  # what goes on the wire
    method: str
    target: str  # the request target as sent
    dialect: str
    kind: str  # which branch of the grammar made it (for reports)
    # True when the head is valid HTTP/1.1 and the body framed exactly as
    # declared: such a request must be answered (not just closed).
    wellformed: bool = True
    # Names used in the request (for the "no session started" property).
    names: set[str] = dataclasses.field(default_factory=set)
    # True when it might be a create (see ``may_create``).
    creates: bool = False
    # Body declared longer than sent: the router is right to wait for it (body timeout).
    short_body: bool = False


GOOD_METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS")
ODD_METHODS = ("post", "Get", "TRACE", "CONNECT", "PROPFIND", "M-SEARCH", "BREW", "QUERY")
GARBAGE_METHODS = ("", "G E T", "GET\x00", "\x16\x03\x01", "GE\tT", "A" * 300, "POST(", "ÄÖÜ")

WAHA_ROUTES = (
    ("POST", "/api/sendText", "body"),
    ("POST", "/api/sendImage", "body"),
    ("POST", "/api/sendSeen", "body"),
    ("PUT", "/api/reaction", "body"),
    ("GET", "/api/messages", "query"),
    ("GET", "/api/contacts/all", "query"),
    ("GET", "/api/checkNumberStatus", "query"),
    ("GET", "/api/sessions", "none"),
    ("GET", "/api/sessions/{s}", "path"),
    ("GET", "/api/sessions/{s}/me", "path"),
    ("PUT", "/api/sessions/{s}", "path"),
    ("POST", "/api/sessions/{s}/restart", "path"),
    ("GET", "/api/{s}/auth/qr", "path"),
    ("GET", "/api/{s}/chats", "path"),
    ("POST", "/api/{s}/chats/1@c.us/messages/read", "path"),
    ("GET", "/api/files/{s}/x.jpg", "path"),
    ("GET", "/api/server/status", "none"),
    ("GET", "/api/version", "none"),
    ("GET", "/health", "none"),
    ("GET", "/ping", "none"),
    ("GET", "/ws", "query"),
)
WAHA_DESTRUCTIVE = (
    ("POST", "/api/sessions/{s}/stop", "path"),
    ("POST", "/api/sessions/{s}/logout", "path"),
    ("DELETE", "/api/sessions/{s}", "path"),
)
WAHA_CREATES = (
    ("POST", "/api/sessions", "create"),
    ("POST", "/api/sessions/start", "create"),
    ("POST", "/api/sessions/{s}/start", "path"),
)
BLAZZ_ROUTES = (
    ("POST", "/api/messages/send", "body"),
    ("POST", "/api/messages/send-media", "body"),
    ("POST", "/api/messages/bulk-send", "body"),
    ("GET", "/api/messages/{s}/status", "path"),
    ("GET", "/api/messages/{s}/validate", "path"),
    ("GET", "/api/sessions", "none"),
    ("GET", "/api/sessions/{s}/status", "path"),
    ("GET", "/api/sessions/{s}/metadata", "path"),
    ("PUT", "/api/sessions/{s}/metadata", "path"),
    ("GET", "/api/internal/sessions/{s}/last-activity", "path"),
    ("GET", "/api/contacts", "query"),
    ("GET", "/health", "none"),
    ("GET", "/health/detailed", "none"),
    ("GET", "/info", "none"),
    ("GET", "/", "none"),
)
BLAZZ_DESTRUCTIVE = (("DELETE", "/api/sessions/{s}", "path"),)
BLAZZ_CREATES = (
    ("POST", "/api/sessions", "create"),
    ("POST", "/api/sessions/{s}/restore", "path"),
    ("POST", "/api/sessions/{s}/reconnect", "path"),
    ("POST", "/api/sessions/{s}/regenerate-qr", "path"),
)
ROUTER_PATHS = (
    "/healthz",
    "/readyz",
    "/metrics",
    "/admin",
    "/admin/instances",
    "/admin/sessions",
    "/admin/sessions/{s}",
    "/admin/events",
    "/admin/openapi.json",
    "/admin/reload",
    "/admin/webhooks/stats",
    "/admin/webhooks/dead-letters",
    "/dashboard",
    "/dashboard/api/snapshot",
    "/dashboard/api/admin/instances",
)
HOSTILE_SEGMENTS = (
    "%2F",
    "%2f",
    "%5C",
    "%00",
    "%zz",
    "%",
    "%2",
    "%2e%2e",
    "%2E",
    ".",
    "..",
    "",
    ";",
    ";jsessionid=1",
    "ü",
    "%C3%BC",
    "%FF%FE",
    "\u202e",
    "a" * 4000,
    "~",
    "*",
    "%20",
    " ",
    "\t",
    "@",
    "%40evil",
    "{s}",
    "%7Bs%7D",
)
BAD_SESSION_IDS = ("", ".", "..", "-x", "a" * 200, "ü", "x y", "x/y", "x%2Fy", "x\\y", "x\x00")


# What a request can be hostile in (``build_request`` draws none, one or several).
DIMENSIONS = (
    "method",
    "path",
    "path",
    "target",
    "version",
    "query",
    "body",
    "body",
    "host",
    "encoding",
    "headers",
    "framing",
    "framing",
    "order",
    "lines",
)


def may_create(method: str, target: str) -> bool:
    """Conservatively: could this request start a session? (Anything whose
    decoded path names the sessions API with a non-GET method.)"""
    return method.upper() not in ("GET", "HEAD") and "sessions" in unquote(target).lower()


def _mutate_case(c: Chooser, path: str) -> str:
    how = c.pick(("upper", "title", "random", "first"))
    if how == "upper":
        return path.upper()
    if how == "title":
        return "/".join(p[:1].upper() + p[1:] for p in path.split("/"))
    if how == "first":
        return path.replace("/api/", "/API/", 1)
    return "".join(ch.upper() if c.chance(0.3) else ch for ch in path)


def _encode_some(c: Chooser, path: str) -> str:
    out = []
    for ch in path:
        if ch != "/" and c.chance(0.2):
            out.append(f"%{ord(ch):02X}" if ord(ch) < 128 else quote(ch))
        else:
            out.append(ch)
    return "".join(out)


def _session_name(c: Chooser, t: Target, built: Built, *, may_new: bool) -> str:
    pool: list[str] = list(t.sessions.live) + list(t.sessions.ghost)
    if may_new:
        pool += list(t.sessions.new)
    kind = c.pick(("pool", "pool", "pool", "bad", "encoded"))
    if kind == "bad":
        name = c.pick(BAD_SESSION_IDS)
    else:
        name = c.pick(pool)
        if kind == "encoded":
            name = _encode_some(c, name)
    built.names.add(unquote(name))
    return name


def _path(c: Chooser, t: Target, built: Built) -> tuple[str, str, str]:
    """(method, path, where the session goes) from the dialect's real routes,
    the router's own paths, or webhook ingest."""
    branch = c.pick(("route", "route", "route", "route", "destructive", "create", "router", "hook"))
    built.kind = branch
    if branch == "router":
        path = c.pick(ROUTER_PATHS).replace("{s}", _session_name(c, t, built, may_new=False))
        return "GET" if c.chance(0.7) else "POST", path, "none"
    if branch == "hook":
        dialect = c.pick(("blazz", "waha", "evil", ""))
        inst = c.pick((*t.instances, "nope", "", "..", "%2e%2e", t.instances[0].upper()))
        tail = c.pick(
            ("", "", "/", "/api/whatsapp/webhooks/webjs", "/api/whatsapp/accounts/active", "/x/y")
        )
        return "POST", f"/webhooks/{dialect}/{inst}{tail}", "hook"
    routes = {
        ("waha", "route"): WAHA_ROUTES,
        ("waha", "destructive"): WAHA_DESTRUCTIVE,
        ("waha", "create"): WAHA_CREATES,
        ("blazz", "route"): BLAZZ_ROUTES,
        ("blazz", "destructive"): BLAZZ_DESTRUCTIVE,
        ("blazz", "create"): BLAZZ_CREATES,
    }[(t.dialect, branch)]
    method, template, where = c.pick(routes)
    path = template
    if "{s}" in path:
        path = path.replace("{s}", _session_name(c, t, built, may_new=branch == "create"))
    return method, path, where


def _hostile_path(c: Chooser, path: str) -> tuple[str, bool]:
    """``path`` with hostile mutations; whether it is still a valid request-target."""
    valid = True
    for _ in range(c.integer(0, 3)):
        how = c.pick(("segment", "segment", "case", "encode", "slash", "trail", "prefix", "dots"))
        if how == "segment":
            parts = path.split("/")
            i = c.integer(1, len(parts))
            parts.insert(i, c.pick(HOSTILE_SEGMENTS))
            path = "/".join(parts)
        elif how == "case":
            path = _mutate_case(c, path)
        elif how == "encode":
            path = _encode_some(c, path)
        elif how == "slash":
            path = path.replace("/", "//", 1) if c.chance(0.5) else path + "//x"
        elif how == "trail":
            path += c.pick(("/", "/.", "/..", "%2F", "?", "#frag", "\\", ";x=1"))
        elif how == "prefix":
            path = c.pick(("/.", "/..", "//", "/%2e", "/./", "")) + path
        else:
            path = path.replace("/api/", c.pick(("/api/../api/", "/api/./", "/x/../api/")), 1)
    if any(ch in path for ch in " \t\x00#\\") or any(ord(ch) > 126 for ch in path):
        valid = False
    return path, valid


def _query(c: Chooser, t: Target, built: Built, where: str, key_in: str, *, hostile: bool) -> str:
    params: list[str] = []
    if where == "query" or c.chance(0.2):
        field = "session_id" if t.dialect == "blazz" else "session"
        params.append(f"{field}={quote(_session_name(c, t, built, may_new=False), safe='')}")
    if key_in == "query":
        name = "api_key" if t.dialect == "blazz" else "x-api-key"
        params.append(f"{name}={quote(t.keys.router, safe='')}")
    if hostile:
        params.append(
            c.pick(
                (
                    "%zz=%zz",
                    "a=1&a=2&a=3",
                    "&&&=",
                    "session=*",
                    "x=" + "y" * 5000,
                    "key=" + t.keys.admin,
                    "url=http://" + t.sentinel + "/",
                    "api_key=wrong&api_key=" + quote(t.keys.router, safe=""),
                    "x-api-key=" + quote(t.keys.router, safe="") + "&x-api-key=wrong",
                    "session=a%00b",
                    "callback=http%3A%2F%2F" + t.sentinel,
                )
            )
        )
    return ("?" + "&".join(params)) if params else ""


def _json_body(c: Chooser, t: Target, built: Built, where: str, key_in: str) -> Any:
    doc: dict[str, Any] = {}
    field = "session_id" if t.dialect == "blazz" else "session"
    if where in ("body", "create") or c.chance(0.2):
        if where == "create":
            key = "session_id" if t.dialect == "blazz" else "name"
            if c.chance(0.9):
                doc[key] = _session_name(c, t, built, may_new=True)
            if t.dialect == "blazz":
                doc["workspace_id"] = c.pick((7, "7", None, -1, [], "x" * 300))
            if c.chance(0.3):
                doc["config"] = {"webhooks": [{"url": f"http://{t.sentinel}/hook"}]}
        else:
            doc[field] = _session_name(c, t, built, may_new=False)
    if t.dialect == "blazz":
        doc.update({"recipient_phone": "15550001111", "message": "fz", "type": "text"})
    else:
        doc.update({"chatId": "1@c.us", "text": "fz"})
    if key_in == "body":
        doc["api_key"] = t.keys.router
    if c.chance(0.1):
        doc[c.pick(("session", "session_id", "name", "api_key"))] = c.pick(
            (None, 1, [], {}, True, "", "x" * 300, [t.sessions.live[0]], {"$ne": 1})
        )
    if c.chance(0.1):
        doc["url"] = f"http://{t.sentinel}/"
        doc["media"] = {"url": f"http://{t.sentinel}/x.jpg"}
    return doc


def _body(
    c: Chooser, t: Target, built: Built, where: str, key_in: str, *, hostile: bool
) -> tuple[bytes, str]:
    """(body bytes, content type) for a request that carries one."""
    if hostile:
        kind = c.pick(("deep", "deep_obj", "invalid", "binary", "big", "nan", "dup", "form"))
    else:
        kind = c.pick(("json", "json", "json", "json", "form", "empty"))
    ctype = "application/json"
    if kind == "json":
        body = json.dumps(_json_body(c, t, built, where, key_in)).encode()
    elif kind == "deep":
        n = c.pick((3000, 100_000))
        body = b"[" * n + b"]" * n
    elif kind == "deep_obj":
        n = 3000
        body = b'{"session":' + b'{"a":' * n + b"1" + b"}" * n + b"}"
    elif kind == "invalid":
        body = c.pick(
            (
                b"{",
                b'{"session": ',
                b"{'a': 1}",
                b"\xff\xfe{}",
                b'{"a":1}garbage',
                b"[1,2",
                b'"\\ud800"',
                b'{"session":"\\u0000"}',
            )
        )
    elif kind == "form":
        ctype = "application/x-www-form-urlencoded"
        field = "session_id" if t.dialect == "blazz" else "session"
        name = _session_name(c, t, built, may_new=where == "create")
        body = f"{field}={quote(name, safe='')}&api_key={quote(t.keys.router, safe='')}".encode()
        if c.chance(0.3):
            body += b"&%zz=%ff&" + b"a=" * 500
    elif kind == "binary":
        ctype = c.pick(("application/octet-stream", "application/json", "image/png"))
        body = c.raw(1, 2048)
    elif kind == "big":
        body = json.dumps(
            {"pad": "x" * c.integer(70_000, 300_000), **_json_body(c, t, built, where, key_in)}
        ).encode()
    elif kind == "nan":
        body = b'{"session": NaN, "x": Infinity, "y": 1e999999}'
    elif kind == "empty":
        body = b""
    else:
        doc = _json_body(c, t, built, where, key_in)
        inner = json.dumps(doc)[1:-1]
        body = ("{" + inner + ', "session": "' + t.sessions.ghost[0] + '"}').encode()
        built.names.add(t.sessions.ghost[0])
    if hostile and c.chance(0.3):
        ctype = c.pick(
            (
                "application/json; charset=utf-8",
                "APPLICATION/JSON",
                "text/plain",
                "multipart/form-data; boundary=x",
                "application/json\x7f",
                "",
                "application/x-www-form-urlencoded",
                "application/json, text/plain",
            )
        )
    return body, ctype


def build_request(c: Chooser, t: Target) -> Built:
    built = Built(b"", "", "", t.dialect, "")
    method, path, where = _path(c, t, built)
    host = f"{t.host}:{t.port}"
    # How hostile: a clean request (a real route, any key placement, a sane
    # body), one hostile dimension, or several at once.
    level = c.pick(("clean", "clean", "one", "one", "one", "many"))
    if level == "clean":
        hostile: set[str] = set()
    elif level == "one":
        hostile = {c.pick(DIMENSIONS)}
    else:
        hostile = {d for d in DIMENSIONS if c.chance(0.3)}
    built.kind += "/" + (",".join(sorted(hostile)) or "clean")

    # -- the method -----------------------------------------------------------
    if "method" in hostile:
        mkind = c.pick(("good", "odd", "odd", "garbage", "garbage"))
    else:
        mkind = c.pick(("real", "real", "real", "good"))
    if mkind == "good":
        method = c.pick(GOOD_METHODS)
    elif mkind == "odd":
        method = c.pick(ODD_METHODS)
        built.wellformed = method.isupper() and method.isalpha()
    elif mkind == "garbage":
        method = c.pick(GARBAGE_METHODS)
        built.wellformed = False

    # -- where the key goes ------------------------------------------------------
    key_in = c.pick(("header", "header", "header", "query", "body", "none", "wrong", "odd"))
    if t.dialect == "blazz" and key_in == "header" and c.chance(0.5):
        key_in = "body" if method not in ("GET", "HEAD") else "query"

    # -- the target ------------------------------------------------------------------
    path, valid = _hostile_path(c, path) if "path" in hostile else (path, True)
    built.wellformed &= valid
    form = "origin"
    if "target" in hostile:
        form = c.pick(("absolute", "absolute", "authority", "asterisk", "garbage"))
    elif c.chance(0.05):
        form = "absolute"
    query = _query(c, t, built, where, key_in, hostile="query" in hostile)
    if form == "origin":
        target = path + query
    elif form == "absolute":
        scheme = c.pick(("http", "https", "HTTP", "ftp"))
        target = f"{scheme}://{c.pick((t.sentinel, 'localhost:' + str(t.sentinel_port)))}{path}"
        target += query
    elif form == "authority":
        target = t.sentinel
        built.wellformed = False
    elif form == "asterisk":
        target = "*"
        built.wellformed = False
    else:
        target = c.pick(("", " ", "api/sendText", "/a b", "/\x00", "/" + "x" * 9000, "\\api"))
        built.wellformed = False

    # -- the version ---------------------------------------------------------------------
    version = "HTTP/1.1"
    if "version" in hostile:
        version = c.pick(
            (
                "HTTP/1.0",
                "HTTP/2.0",
                "HTTP/1.1 x",
                "HTTP/9.9",
                "",
                "http/1.1",
                "HTTP/1.10",
                "HTTP/0.9",
            )
        )
        built.wellformed &= version == "HTTP/1.0"

    # -- the body --------------------------------------------------------------------------------
    body = b""
    ctype = None
    if method.upper() not in ("GET", "HEAD", "OPTIONS", "TRACE", "CONNECT") or c.chance(0.05):
        body, ctype = _body(c, t, built, where, key_in, hostile="body" in hostile)
    if where == "hook":
        body, ctype, hook_headers = _hook(c, t, body)
    else:
        hook_headers = []

    # -- the headers ---------------------------------------------------------------------------
    headers: list[tuple[str, str]] = []
    if "host" in hostile:
        hkind = c.pick(("sentinel", "missing", "dup"))
    else:
        hkind = c.pick(("normal", "normal", "normal", "sentinel"))
    if hkind == "sentinel":
        headers.append(("Host", t.sentinel))
    elif hkind == "missing":
        if version == "HTTP/1.1":
            built.wellformed = False
    elif hkind == "dup":
        headers += [("Host", host), ("Host", t.sentinel)]
        built.wellformed = False
    else:
        headers.append(("Host", host))
    if key_in == "header":
        headers.append(("X-Api-Key", t.keys.router))
    elif key_in == "wrong":
        headers.append(
            (
                "X-Api-Key",
                c.pick(
                    (
                        "wrong",
                        "",
                        t.keys.router + "x",
                        t.keys.router[:-1],
                        t.keys.admin,
                        t.keys.router.upper(),
                    )
                ),
            )
        )
    elif key_in == "odd":
        odd = c.pick(
            (
                ("x-api-key", t.keys.router),
                ("X-API-KEY", " " + t.keys.router + " "),
                ("Authorization", "Bearer " + t.keys.router),
                ("Cookie", "x-api-key=" + t.keys.router),
                ("X-Api-Key", t.keys.router + ", " + t.keys.router),
                ("X-Api-Key ", t.keys.router),
                ("api_key", t.keys.router),
                ("X-Admin-Key", t.keys.router),
                ("X-Forwarded-For", t.keys.router),
                ("Proxy-Authorization", t.keys.router),
            )
        )
        headers.append(odd)
        if odd[0].endswith(" "):
            built.wellformed = False
    if c.chance(0.05):
        headers += [("X-Api-Key", t.keys.router), ("X-Api-Key", "wrong")]
    if method == "GET" and built.kind == "router" and c.chance(0.5):
        headers.append(("X-Admin-Key", t.keys.admin))  # read-only admin calls only
    if c.chance(0.25):
        headers.append(
            c.pick(
                (
                    ("X-Forwarded-Host", t.sentinel),
                    ("Forwarded", f"for=1.2.3.4;host={t.sentinel};proto=http"),
                    ("X-Forwarded-For", "127.0.0.1, " + t.sentinel),
                    ("X-Instance-Url", f"http://{t.sentinel}"),
                    ("X-Original-URL", f"http://{t.sentinel}/"),
                    ("X-Rewrite-URL", f"http://{t.sentinel}/"),
                    ("Referer", f"http://{t.sentinel}/"),
                    ("Origin", f"http://{t.sentinel}"),
                    ("X-Forwarded-Proto", "gopher"),
                    ("X-Forwarded-Port", str(t.sentinel_port)),
                )
            )
        )
    headers += hook_headers
    if ctype is not None and ctype != "":
        headers.append(("Content-Type", ctype))
    if "encoding" in hostile and body:
        enc = c.pick(("gzip", "gzip", "deflate", "br", "gzip, gzip", "identity", "x-gzip", "zstd"))
        how = c.pick(("real", "garbage", "truncated", "bomb"))
        if how == "real" and enc in ("gzip", "x-gzip"):
            body = gzip.compress(body)
        elif how == "real" and enc == "deflate":
            body = zlib.compress(body)
        elif how == "truncated":
            body = gzip.compress(body)[:-6]
        elif how == "bomb":
            body = gzip_bomb()
        headers.append(("Content-Encoding", enc))
    if c.chance(0.2):
        headers.append(
            c.pick(
                (
                    ("Idempotency-Key", c.pick(("k1", "", "x" * 600, "ü", "a b"))),
                    ("X-Request-Id", c.pick(("r1", "x" * 1000, "'\"<>", ""))),
                    (
                        "Connection",
                        c.pick(
                            (
                                "keep-alive",
                                "close",
                                "Upgrade",
                                "X-Api-Key",
                                "Content-Length, Host",
                                "TE",
                            )
                        ),
                    ),
                    ("Upgrade", c.pick(("websocket", "h2c", "TLS/1.2"))),
                    ("Expect", c.pick(("100-continue", "200-ok"))),
                    ("TE", "trailers"),
                    ("Accept-Encoding", "gzip, br, *"),
                    ("Range", "bytes=0-1,2-3"),
                    ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
                )
            )
        )
    if "headers" in hostile:
        junk = c.pick(("huge", "many", "badname", "nocolon", "fold", "nul", "ctl", "utf8"))
        built.wellformed = False
        if junk == "huge":
            headers.append(("X-Huge", "a" * c.pick((9000, 20_000, 70_000))))
        elif junk == "many":
            headers += [(f"X-H{i}", "v") for i in range(c.pick((120, 300)))]
            built.wellformed = True
        elif junk == "badname":
            headers.append(("Bad Header", "x"))
        elif junk == "nocolon":
            headers.append(("NoColonHere", ""))
        elif junk == "fold":
            headers.append(("X-Folded", "a\r\n b"))
        elif junk == "nul":
            headers.append(("X-Nul", "a\x00b"))
        elif junk == "ctl":
            headers.append(("X-Ctl", "a\x1bb\x7f"))
        else:
            headers.append(("X-Ütf", "wert"))

    # -- framing ------------------------------------------------------------------------------
    framing = "cl" if c.chance(0.9) else "chunked"
    if "framing" in hostile:
        framing = c.pick(
            (
                "none",
                "chunked",
                "short",
                "long",
                "bad_cl",
                "dup_cl",
                "te_cl",
                "bad_te",
                "bad_chunks",
            )
        )
    wire_body = body
    if framing == "cl":
        if body or method in ("POST", "PUT", "PATCH"):
            headers.append(("Content-Length", str(len(body))))
    elif framing == "none":
        wire_body = b""
    elif framing == "chunked":
        headers.append(("Transfer-Encoding", "chunked"))
        wire_body = _chunked(c, body)
    elif framing == "short":
        # Declares more than it sends: the router waits (body timeout) or answers first.
        headers.append(("Content-Length", str(len(body) + c.integer(1, 5000))))
        built.short_body = True
    elif framing == "long":
        # Sends more than it declares: the rest is a second (garbage) request.
        headers.append(("Content-Length", str(max(0, len(body) - c.integer(1, 10)))))
        built.wellformed = False
    elif framing == "bad_cl":
        headers.append(
            (
                "Content-Length",
                c.pick(("-1", "abc", "1e3", " 5", "0x10", "+5", "99999999999999999999", "5, 5")),
            )
        )
        built.wellformed = False
    elif framing == "dup_cl":
        headers += [("Content-Length", str(len(body))), ("Content-Length", str(len(body) + 1))]
        built.wellformed = False
    elif framing == "te_cl":
        headers += [("Content-Length", str(len(body))), ("Transfer-Encoding", "chunked")]
        wire_body = _chunked(c, body)
        built.wellformed = False
    elif framing == "bad_te":
        headers.append(
            (
                "Transfer-Encoding",
                c.pick(
                    (
                        "gzip, chunked",
                        "chunked, gzip",
                        "xchunked",
                        "chunked\x0b",
                        "identity",
                        "CHUNKED",
                    )
                ),
            )
        )
        wire_body = _chunked(c, body)
        built.wellformed = False
    else:
        headers.append(("Transfer-Encoding", "chunked"))
        wire_body = c.pick(
            (
                b"zz\r\nab\r\n0\r\n\r\n",
                b"5\r\nab\r\n0\r\n\r\n",
                b"-1\r\n\r\n",
                b"1;" + b"x" * 9000 + b"\r\na\r\n0\r\n\r\n",
                b"0\r\nX-Trailer: " + t.keys.router.encode() + b"\r\n\r\n",
                b"ffffffffffffffff\r\nab\r\n",
            )
        )
        built.wellformed = False
    if "order" in hostile:
        c_shuffle = headers[:]
        headers = [c_shuffle[i] for i in _perm(c, len(c_shuffle))]

    line_end = "\r\n" if "lines" not in hostile else c.pick(("\n", "\r", "\r\r\n"))
    if line_end != "\r\n":
        built.wellformed = False
    head = f"{method} {target} {version}".rstrip(" ") + line_end
    head += "".join(f"{k}: {v}{line_end}" for k, v in headers) + line_end
    built.data = head.encode("utf-8", "surrogateescape") + wire_body
    built.method = method
    built.target = target
    built.creates = may_create(method, target) or may_create(method, path)
    if "websocket" in head.lower() or "h2c" in head.lower() or "TLS" in head:
        built.wellformed = False  # an upgrade is answered 101 (or not), then spoken differently
    return built


_BOMB: list[bytes] = []


def gzip_bomb() -> bytes:
    """40 MiB of JSON whitespace in about 40 KB of gzip (made once)."""
    if not _BOMB:
        _BOMB.append(gzip.compress(b"{" + b" " * (40 * 1024 * 1024) + b"}", compresslevel=9))
    return _BOMB[0]


def _perm(c: Chooser, n: int) -> list[int]:
    items = list(range(n))
    for i in range(n - 1, 0, -1):
        j = c.integer(0, i)
        items[i], items[j] = items[j], items[i]
    return items


def _chunked(c: Chooser, body: bytes) -> bytes:
    out = b""
    pos = 0
    while pos < len(body):
        n = c.pick((1, 7, 100, 4096, 65536))
        piece = body[pos : pos + n]
        out += b"%x\r\n" % len(piece) + piece + b"\r\n"
        pos += n
    return out + b"0\r\n\r\n"


def _hook(c: Chooser, t: Target, body: bytes) -> tuple[bytes, str, list[tuple[str, str]]]:
    """A webhook event: signed right, signed wrong, stale, unsigned, or junk."""
    dialect = c.pick(("blazz", "waha"))
    session = c.pick((*t.sessions.ghost, *t.sessions.live, "x" * 300, ""))
    event = c.pick(
        ("session_ready", "message_received", "session.status", "qr_code_generated", "", None, 1)
    )
    if dialect == "blazz":
        doc: Any = {"event": event, "data": {"session_id": session, "status": "connected"}}
    else:
        doc = {
            "event": event,
            "session": session,
            "payload": {"status": "WORKING"},
            "id": c.pick(("evt_1", "bad id", "x" * 300)),
        }
    kind = c.pick(("json", "json", "given", "garbage", "array", "big"))
    if kind == "json":
        body = json.dumps(doc).encode()
    elif kind == "garbage":
        body = c.pick((b"{", b"\xff" * 10, b"[]", b"null", b'{"event": "x"'))
    elif kind == "array":
        body = json.dumps([doc]).encode()
    elif kind == "big":
        body = json.dumps({**doc, "pad": "x" * c.pick((100_000, 9 * 1024 * 1024))}).encode()
    headers: list[tuple[str, str]] = []
    sign = c.pick(("right", "right", "wrong", "stale", "none", "future", "nan"))
    key = t.keys.blazz_hmac if dialect == "blazz" else t.keys.waha_hmac
    now = time.time()
    if dialect == "blazz":
        ts = {"stale": now - 3600, "future": now + 3600}.get(sign, now)
        tss = "nan" if sign == "nan" else str(int(ts))
        sig = hmac.new(key.encode(), tss.encode() + body, hashlib.sha256).hexdigest()
        if sign == "wrong":
            sig = "0" * 64
        if sign != "none":
            headers += [("X-Timestamp", tss), ("X-HMAC-Signature", sig)]
        if c.chance(0.3):
            headers.append(("X-Instance-Url", f"http://{t.sentinel}"))
    else:
        sig = hmac.new(key.encode(), body, hashlib.sha512).hexdigest()
        if sign == "wrong":
            sig = "0" * 128
        ts_ms = {"stale": now - 3600, "future": now + 3600}.get(sign, now) * 1000
        if sign != "none":
            headers += [
                ("X-Webhook-Hmac", sig),
                ("X-Webhook-Hmac-Algorithm", c.pick(("sha512", "sha512", "md5", ""))),
            ]
            headers.append(("X-Webhook-Timestamp", "nan" if sign == "nan" else str(int(ts_ms))))
    return body, "application/json", headers


# -- the raw client --------------------------------------------------------------------------


@dataclasses.dataclass
class Answer:
    status: int | None  # None: no (complete) status line before the close or the deadline
    headers: list[tuple[str, str]]
    body: bytes
    raw: bytes  # everything read (the head and what came of the body)
    elapsed: float  # seconds until the answer was complete, or the close
    closed: bool  # the router closed (or reset) the connection
    timed_out: bool  # the deadline passed with the connection still open and no answer
    error: str | None = None  # how sending failed, if it did (reset, broken pipe)

    def header(self, name: str) -> str | None:
        low = name.lower()
        for k, v in self.headers:
            if k.lower() == low:
                return v
        return None

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except (ValueError, UnicodeDecodeError):
            return None


def _parse_head(buf: bytes) -> tuple[int, list[tuple[str, str]]]:
    lines = buf.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    headers = []
    for line in lines[1:]:
        if b":" in line:
            k, v = line.split(b":", 1)
            headers.append((k.decode("latin-1").strip(), v.decode("latin-1").strip()))
    return status, headers


def exchange(
    host: str,
    port: int,
    data: bytes,
    *,
    deadline: float = 10.0,
    head_only: bool = False,
    sock: socket.socket | None = None,
) -> Answer:
    """Send ``data`` on a fresh connection; the first final answer, or the close."""
    started = time.monotonic()
    end = started + deadline
    s = sock or socket.create_connection((host, port), timeout=deadline)
    buf = b""
    error = None
    try:
        s.settimeout(deadline)
        try:
            s.sendall(data)
        except OSError as exc:  # the router answered and closed before it had everything
            error = type(exc).__name__
        status: int | None = None
        headers: list[tuple[str, str]] = []
        body_start = 0
        while True:
            # Is what we have a complete answer?
            if status is None and b"\r\n\r\n" in buf:
                head, _, rest = buf.partition(b"\r\n\r\n")
                try:
                    st, hs = _parse_head(head)
                except (ValueError, IndexError):
                    st, hs = -1, []
                if 100 <= st < 200 and st != 101:
                    buf = rest  # 100 Continue: the real answer follows
                    continue
                status, headers = st, hs
                body_start = len(head) + 4
            if status is not None:
                done, body = _body_complete(status, headers, buf[body_start:], head_only)
                if done:
                    return Answer(
                        status, headers, body, buf, time.monotonic() - started, False, False, error
                    )
            left = end - time.monotonic()
            if left <= 0:
                return Answer(status, headers, buf[body_start:], buf, deadline, False, True, error)
            s.settimeout(left)
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                continue
            except OSError as exc:
                error = error or type(exc).__name__
                chunk = b""
            if not chunk:
                return Answer(
                    status,
                    headers,
                    buf[body_start:] if status else b"",
                    buf,
                    time.monotonic() - started,
                    True,
                    False,
                    error,
                )
            buf += chunk
    finally:
        with contextlib.suppress(OSError):
            s.close()


def _body_complete(
    status: int, headers: list[tuple[str, str]], data: bytes, head_only: bool
) -> tuple[bool, bytes]:
    if head_only or status in (101, 204, 304):
        return True, b""
    hmap = {k.lower(): v for k, v in headers}
    if "chunked" in hmap.get("transfer-encoding", "").lower():
        out = b""
        pos = 0
        while True:
            eol = data.find(b"\r\n", pos)
            if eol < 0:
                return False, out
            try:
                n = int(data[pos:eol].split(b";")[0], 16)
            except ValueError:
                return True, out
            if n == 0:
                return data.find(b"\r\n\r\n", eol) >= 0 or data.endswith(b"\r\n"), out
            if len(data) < eol + 2 + n + 2:
                return False, out
            out += data[eol + 2 : eol + 2 + n]
            pos = eol + 2 + n + 2
    if "content-length" in hmap:
        n = int(hmap["content-length"])
        return len(data) >= n, data[:n]
    return False, data  # until the close


# -- what is wrong with an answer ------------------------------------------------------------

# The router's own errors (README, proxy.py, body.py, ingest): code -> status.
ROUTER_ERRORS: dict[str, set[int]] = {
    "bad_path": {400},
    "bad_session_id": {400},
    "bad_body": {400},
    "malformed_json": {400},
    "malformed_event": {400},
    "unauthorized": {401},
    "bad_signature": {401},
    "route_denied": {403},
    "unknown_session": {404},
    "unknown_instance": {404},
    "not_found": {404},
    "main_app_not_configured": {404},
    "method_not_allowed": {405},
    "body_timeout": {408},
    "session_busy": {409},
    "idempotency_conflict": {409},
    "idempotency_in_progress": {409},
    "body_too_large": {413},
    "unsupported_encoding": {415},
    "bad_request": {400},
}


# 5xx answers the real upstreams give to well-formed requests, which the
# simulators reproduce and the router relays as they are (Express's
# X-Powered-By says so): Blazz's ``/info`` requires a package.json its image
# does not have, its ``/restore`` reads an undefined ``workspaceId``.
UPSTREAM_5XX = (("blazz", "/info"), ("blazz", "/api/sessions/*/restore"))
# A simulator's own crash (aiohttp's page, relayed: the router's X-Request-Id
# on it): the Blazz simulator's Express body parser raises RecursionError on
# JSON nested 3,000 deep (router/simulator/express.py parse_body), which
# only a path the router does not parse (not /api/...) can hand it.
SIMULATOR_CRASH = b"500 Internal Server Error\n\nServer got itself in trouble"


def upstream_own_5xx(built: Built, answer: Answer) -> bool:
    """Is this 5xx the upstream's own answer to the request, relayed?"""
    if answer.header("X-Request-Id") is None or is_router_error(answer.json()):
        return False  # made by the router (its JSON errors, or aiohttp's own page)
    if answer.body.startswith(SIMULATOR_CRASH):
        return True
    path = unquote(built.target.split("?", 1)[0]).lower().rstrip("/")
    express = answer.header("X-Powered-By") == "Express"
    return express and any(
        fnmatch.fnmatchcase(path, p) for d, p in UPSTREAM_5XX if d == built.dialect
    )


def is_router_error(doc: Any) -> bool:
    return isinstance(doc, dict) and "error" in doc and "message" in doc


def problems(built: Built, answer: Answer, *, bound: float, keys: Keys) -> list[str]:
    """Everything wrong with ``answer`` to ``built`` (empty: acceptable).

    Acceptable: any status below 500 (the router's own JSON errors with the
    documented code for that status, an upstream's answer relayed, aiohttp's
    plain 400 for a head it cannot parse), or the connection closed without
    an answer, within ``bound`` seconds. A well-formed request must be
    answered. Never a 5xx: every upstream is up, so no 502/503/504 has an
    excuse, and a 500 is a bug whoever made it. Never a key of the config
    other than the client's own router key in the answer.
    """
    out = []
    if answer.timed_out:
        out.append(f"no answer and no close within {bound:g} s")
    elif answer.elapsed > bound:
        out.append(f"took {answer.elapsed:.1f} s (bound {bound:g} s)")
    if answer.status is None:
        if built.wellformed and not built.short_body and answer.closed:
            out.append("a well-formed request was closed without an answer")
        return out
    st = answer.status
    if (st >= 500 or st < 100) and not upstream_own_5xx(built, answer):
        out.append(f"status {st}")
    doc = answer.json()
    rid = answer.header("X-Request-Id")
    if is_router_error(doc) and "request_id" in doc:
        code = doc["error"]
        if code in ROUTER_ERRORS and st not in ROUTER_ERRORS[code]:
            out.append(f"router error {code!r} with status {st}")
        if rid is not None and rid != doc["request_id"]:
            out.append("X-Request-Id differs from the body's request_id")
    # A client may read its own bytes back (aiohttp's 400 for a head it
    # cannot parse quotes it): only a secret it did not send is a leak.
    secret = {k: v for k, v in keys.never_answered().items() if v.encode() not in built.data}
    if st < 400:
        # The simulators' echo routes show what reached them, the instance's
        # key included; the router scrubs that key from error answers only
        # (the real upstreams echo requests in errors, never in successes).
        del secret["instance"]
    leaked = leaks(answer.raw, secret)
    if leaked:
        out.append(f"answer carries {leaked}")
    return out


# -- processes and listeners -------------------------------------------------------------


def write_config(
    path: Path,
    *,
    dialect: str,
    port: int,
    instances: Sequence[tuple[str, str]],
    keys: Keys,
    sink_url: str,
    header_timeout: float = 2.0,
    body_timeout: float = 2.0,
    idle_timeout: float = 5.0,
    max_client_connections: int = 10000,
) -> dict[str, str]:
    """The router's YAML (secrets from the environment, as in production);
    the environment it needs."""
    rows = "\n".join(
        f'  - {{name: {name}, url: "{url}", max_sessions: 50, api_key: "${{WA_INSTANCE_KEY}}"}}'
        for name, url in instances
    )
    path.write_text(
        f"""
listen: {{host: 127.0.0.1, port: {port}}}
adapter: {{kind: {dialect}}}
api_keys: ["${{ROUTER_API_KEY}}"]
admin_key: "${{WA_ROUTER_ADMIN_KEY}}"
timeouts: {{connect: 1, read: 10}}
limits:
  header_timeout: {header_timeout}
  body_timeout: {body_timeout}
  idle_timeout: {idle_timeout}
  max_client_connections: {max_client_connections}
health: {{interval: 1, timeout: 0.5, rise: 1, fall: 3}}
instances:
{rows}
webhooks:
  sqlite_path: "{path.parent / "webhooks.db"}"
  sqlite_synchronous: normal
  ingest:
    blazz_hmac_key: "${{BLAZZ_HMAC_SECRET}}"
    waha_hmac_key: "${{WAHA_HMAC_SECRET}}"
  delivery: {{backoff_base: 0.2, backoff_max: 1, timeout: 2}}
  targets:
    - {{name: app, url: "{sink_url}", hmac_key: "${{APP_HMAC_SECRET}}"}}
"""
    )
    return {
        "ROUTER_API_KEY": keys.router,
        "WA_INSTANCE_KEY": keys.instance,
        "WA_ROUTER_ADMIN_KEY": keys.admin,
        "BLAZZ_HMAC_SECRET": keys.blazz_hmac,
        "WAHA_HMAC_SECRET": keys.waha_hmac,
        "APP_HMAC_SECRET": keys.app_hmac,
    }


class RouterProcess:
    """``python -m router run -c CONFIG``, its stdout and stderr in ``log``."""

    def __init__(self, config: Path, port: int, log: Path, env: dict[str, str]) -> None:
        self.config = config
        self.port = port
        self.log = log
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, within: float = 20.0) -> RouterProcess:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "router", "run", "-c", str(self.config)],
                cwd=REPO,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **self.env, "PYTHONUNBUFFERED": "1"},
            )
        deadline = time.monotonic() + within
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError("router exited:\n" + self.log_text()[-3000:])
            if time.monotonic() > deadline:
                raise TimeoutError("router did not start:\n" + self.log_text()[-3000:])
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(self.url + "/readyz", timeout=1) as resp:
                    if resp.status == 200:
                        return self
            time.sleep(0.05)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def status(self, field: str) -> int:
        """A ``/proc/PID/status`` figure in KiB (VmRSS, VmHWM)."""
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise KeyError(field)

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Sentinel:
    """A listener that is in no config: it counts whoever connects to it."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port: int = self.sock.getsockname()[1]
        self.connections: list[bytes] = []
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(0.5)
                try:
                    first = conn.recv(512)
                except OSError:
                    first = b""
                self.connections.append(first)

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        self.sock.close()


class Sink:
    """The webhook target of the config (the "main app"): 200 to every POST."""

    def __init__(self) -> None:
        sink = self
        self.received = 0

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(n)
                sink.received += 1
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def sim_state(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url + "/_sim/state", timeout=5) as resp:
        doc: dict[str, Any] = json.load(resp)
        return doc


RUNNING = ("STARTING", "WORKING", "SCAN_QR_CODE")


def running_sessions(urls: Iterable[tuple[str, str]]) -> dict[str, list[str]]:
    """session -> the instances where it runs (or starts, or waits for a scan)."""
    out: dict[str, list[str]] = {}
    for name, url in urls:
        for s in sim_state(url)["sessions"]:
            if s["status"] in RUNNING:
                out.setdefault(s["name"], []).append(name)
    return out


def request_bytes(
    method: str,
    path: str,
    *,
    host: str,
    headers: dict[str, str] | None = None,
    body: Any = None,
    close: bool = True,
) -> bytes:
    """A plain well-formed request (JSON body when ``body`` is not bytes)."""
    data = b""
    hs = {"Host": host, **(headers or {})}
    if body is not None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        hs.setdefault("Content-Type", "application/json")
        hs["Content-Length"] = str(len(data))
    if close:
        hs["Connection"] = "close"
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hs.items())
    return (head + "\r\n").encode() + data


WAHA_INVENTED = re.compile(r"session_[0-9a-f]{8}")
