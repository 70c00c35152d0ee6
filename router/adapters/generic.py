"""An adapter described entirely by the YAML ``adapter.options``.

Example::

    adapter:
      kind: generic
      options:
        session_rules:                  # tried in order; the first match wins
          - path: '^/api/sessions$'     # a path rule without a group ...
            none: true                  # ... that says "no session here"
          - path: '^/api/(?P<session>[^/]+)/'
          - query: session
            fanout: '*'                 # this value means "every instance"
          - header: X-Session-Id
          - json: data.session_id       # dotted path into the JSON body
            default: default            # used when the field is missing
            methods: [POST, PUT]
            when: '^/api/send'          # only for matching paths
        create: {method: POST, path: '^/api/sessions$', json: name, response_field: name}
        credential: {header: X-Api-Key}   # and/or query: api_key, json: api_key
        list:   {method: GET, path: /api/sessions, sessions_field: "", id_field: name,
                 status_field: status}
        probe:  {method: GET, path: '/api/sessions/{session}', status_field: status}
        start:  {method: POST, path: '/api/sessions/{session}/start', json: {}}
        stop:   {method: POST, path: '/api/sessions/{session}/stop'}   # optional; must keep
                                        # the login (never a logout): used to move sessions
        health: {method: GET, path: /health, status_field: status, healthy_values: [ok]}
        missing: {status: [404], body_contains: "not found"}
        ready_statuses: [WORKING, connected, open]
        starting_statuses: [STARTING]
        needs_auth_statuses: [SCAN_QR_CODE]
        stopped_statuses: [STOPPED]
        failed_statuses: [FAILED]
        timeout: 10

Rules of a rule: exactly one of ``path`` / ``query`` / ``header`` / ``json``;
``methods`` and ``when`` limit where it applies (``json`` rules default to
POST, PUT, PATCH, DELETE); ``default`` answers when the value is absent;
``fanout`` names the value that means every instance; a ``path`` rule with
``none: true`` ends the search with "no session". No rule matching means no
session. ``{session}`` in call paths, query values and JSON strings is
replaced by the session id.

Credentials: the client's key is read from any configured place (JSON body,
query, header) and removed from all of them; the instance key goes to the
JSON body when ``json`` is configured and the request has a JSON body, else
to the query (``query``, or the ``json`` name when only ``json`` is
configured), else to the header.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import aiohttp

from router.adapters._http import (
    BODY_METHODS,
    OPTIONS_WHERE,
    CallResult,
    ExtractionCache,
    JsonAdapter,
    call,
    check_keys,
    checked_id,
    dig,
    opt_str,
    opt_str_list,
    parse_json,
)
from router.adapters.base import (
    Extraction,
    HealthReport,
    ListFailed,
    ListShape,
    Send,
    SessionInfo,
    SessionStatus,
    UpstreamRequest,
    bulk_send,
    recipient_of,
    valid_session_id,
)
from router.config import InstanceConfig

_METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_NO_SESSION: Final = Extraction(None)
_FANOUT: Final = Extraction(None, fanout=True)
_CREATE_UNNAMED: Final = Extraction(None, create=True)
_PLACEHOLDER: Final = "{session}"

_PATH, _QUERY, _HEADER, _JSON = range(4)
_RULE_KINDS: Final = {"path": _PATH, "query": _QUERY, "header": _HEADER, "json": _JSON}

_STATUS_LISTS: Final = {
    "ready_statuses": SessionStatus.READY,
    "starting_statuses": SessionStatus.STARTING,
    "needs_auth_statuses": SessionStatus.NEEDS_AUTH,
    "stopped_statuses": SessionStatus.STOPPED,
    "failed_statuses": SessionStatus.FAILED,
}


# -- option parsing helpers ------------------------------------------------------


def _regex(where: str, value: Any) -> re.Pattern[str]:
    pattern = opt_str(where, value)
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"{where}: invalid regex {pattern!r}: {exc}") from None


def _methods(where: str, value: Any) -> frozenset[str]:
    methods = {m.upper() for m in opt_str_list(where, value)}
    unknown = methods - _METHODS
    if unknown:
        raise ValueError(f"{where}: unknown HTTP method(s) {', '.join(sorted(unknown))}")
    return frozenset(methods)


def _method(where: str, value: Any) -> str:
    method = opt_str(where, value).upper()
    if method not in _METHODS:
        raise ValueError(f"{where}: unknown HTTP method {value!r}")
    return method


def _session_value(where: str, value: Any) -> str:
    try:
        return valid_session_id(opt_str(where, value))
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


def _as_id(value: object) -> object:
    """JSON numbers name sessions too (``{"session_id": 42}``)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value


def _render(template: Any, session: str) -> Any:
    """``template`` with ``{session}`` replaced in every string."""
    if isinstance(template, str):
        return template.replace(_PLACEHOLDER, session)
    if isinstance(template, Mapping):
        return {k: _render(v, session) for k, v in template.items()}
    if isinstance(template, list | tuple):
        return [_render(v, session) for v in template]
    return template


def _mentions_placeholder(value: Any) -> bool:
    if isinstance(value, str):
        return _PLACEHOLDER in value
    if isinstance(value, Mapping):
        return any(_mentions_placeholder(v) for v in value.values())
    if isinstance(value, list | tuple):
        return any(_mentions_placeholder(v) for v in value)
    return False


# -- parsed options ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Rule:
    kind: int
    name: str  # query / header name or dotted JSON path ("" for path rules)
    regex: re.Pattern[str] | None  # path rules
    methods: frozenset[str] | None  # None: every method
    when: re.Pattern[str] | None
    default: Extraction | None
    fanout: str | None
    none: bool

    def apply(self, req: UpstreamRequest, ids: ExtractionCache) -> Extraction | None:
        if self.methods is not None and req.method not in self.methods:
            return None
        if self.when is not None and self.when.search(req.path) is None:
            return None
        value: object
        if self.kind == _PATH:
            assert self.regex is not None
            match = self.regex.search(req.path)
            if match is None:
                return None
            if self.none:
                return _NO_SESSION
            value = match.group("session")
        elif self.kind == _QUERY:
            value = req.query.get(self.name)
        elif self.kind == _HEADER:
            value = req.headers.get(self.name)
        else:
            value = dig(req.json, self.name) if req.json is not None else None
        if value is None:
            return self.default
        if self.fanout is not None and value == self.fanout:
            return _FANOUT
        return ids.get(_as_id(value))


@dataclass(frozen=True, slots=True)
class _Create:
    method: str
    regex: re.Pattern[str]
    field: str | None
    response_field: str | None


@dataclass(frozen=True, slots=True)
class _Call:
    method: str
    path: str
    query: Mapping[str, str]
    json: Any
    # per-call reading of the answer
    sessions_field: str = ""
    id_field: str = "name"
    status_field: str = "status"
    healthy_values: frozenset[str] | None = None
    health_sessions_field: str | None = None


_CALL_KEYS: Final = {"method", "path", "query", "json"}
_CALL_EXTRA: Final = {
    "list": {"sessions_field", "id_field", "status_field"},
    "probe": {"status_field"},
    "start": set(),
    "stop": set(),
    "health": {"status_field", "healthy_values", "sessions_field"},
}
_CALL_DEFAULT_METHOD: Final = {
    "list": "GET",
    "probe": "GET",
    "start": "POST",
    "stop": "POST",
    "health": "GET",
}


def _parse_call(where: str, kind: str, raw: Any) -> _Call:
    opts = check_keys(where, raw, _CALL_KEYS | _CALL_EXTRA[kind])
    method = _method(f"{where}.method", opts.get("method", _CALL_DEFAULT_METHOD[kind]))
    path = opt_str(f"{where}.path", opts.get("path"))
    if not path.startswith("/"):
        raise ValueError(f"{where}.path: must start with '/', got {path!r}")
    query_raw = opts.get("query", {})
    if not isinstance(query_raw, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str | int | float) and not isinstance(v, bool)
        for k, v in query_raw.items()
    ):
        raise ValueError(f"{where}.query: must map parameter names to strings")
    query = {k: str(v) for k, v in query_raw.items()}
    body = opts.get("json")
    if body is not None and not isinstance(body, Mapping | list | tuple):
        raise ValueError(f"{where}.json: must be a mapping or a list")
    if body is not None and method in ("GET", "HEAD"):
        raise ValueError(f"{where}.json: a {method} call carries no body")
    if kind in ("probe", "start", "stop") and not (
        _PLACEHOLDER in path or _mentions_placeholder(query) or _mentions_placeholder(body)
    ):
        raise ValueError(f"{where}: must mention {_PLACEHOLDER} in its path, query or json")

    def field(key: str, default: str) -> str:
        return opt_str(f"{where}.{key}", opts.get(key, default), allow_empty=True)

    healthy: frozenset[str] | None = None
    if "healthy_values" in opts:
        values = opts["healthy_values"]
        if isinstance(values, str | int | bool):
            values = [values]
        if not isinstance(values, list | tuple) or not values:
            raise ValueError(f"{where}.healthy_values: must be a non-empty list")
        healthy = frozenset(str(v) for v in values)
    sessions_field = field("sessions_field", "")
    return _Call(
        method=method,
        path=path,
        query=query,
        # plain dicts / lists (rendering with the placeholder itself is a deep copy)
        json=_render(body, _PLACEHOLDER),
        sessions_field=sessions_field if kind == "list" else "",
        id_field=field("id_field", "name"),
        status_field=field("status_field", "" if kind == "health" else "status"),
        healthy_values=healthy,
        health_sessions_field=(sessions_field or None) if kind == "health" else None,
    )


def _parse_rule(where: str, raw: Any) -> _Rule:
    opts = check_keys(
        where, raw, set(_RULE_KINDS) | {"methods", "when", "default", "fanout", "none"}
    )
    kinds = [k for k in _RULE_KINDS if k in opts]
    if len(kinds) != 1:
        raise ValueError(f"{where}: needs exactly one of path, query, header, json")
    key = kinds[0]
    kind = _RULE_KINDS[key]
    none = opts.get("none", False)
    if not isinstance(none, bool):
        raise ValueError(f"{where}.none: must be true or false")
    regex: re.Pattern[str] | None = None
    name = ""
    if kind == _PATH:
        regex = _regex(f"{where}.path", opts["path"])
        if none:
            if "session" in regex.groupindex:
                raise ValueError(f"{where}: a 'none' rule cannot have a 'session' group")
        elif "session" not in regex.groupindex:
            raise ValueError(f"{where}.path: regex needs a named group (?P<session>...)")
        if "default" in opts:
            raise ValueError(f"{where}.default: path rules take no default")
    else:
        if none:
            raise ValueError(f"{where}.none: only path rules can say 'none'")
        name = opt_str(f"{where}.{key}", opts[key])
    methods: frozenset[str] | None = None
    if "methods" in opts:
        methods = _methods(f"{where}.methods", opts["methods"])
    elif kind == _JSON:
        methods = BODY_METHODS
    when = _regex(f"{where}.when", opts["when"]) if "when" in opts else None
    default = None
    if "default" in opts:
        default = Extraction(_session_value(f"{where}.default", opts["default"]))
    fanout = None
    if "fanout" in opts:
        if none:
            raise ValueError(f"{where}.fanout: a 'none' rule has no value to compare")
        fanout = opt_str(f"{where}.fanout", opts["fanout"])
    return _Rule(kind, name, regex, methods, when, default, fanout, none)


@dataclass(frozen=True, slots=True)
class _SendRule:
    """A configured send (``adapter.options.sends``), for router.pacing."""

    regex: re.Pattern[str]
    methods: frozenset[str]
    recipient: str | None  # dotted JSON path of the one recipient
    recipients: str | None  # dotted JSON path of an array: one message each
    spacing: float

    def applies(self, method: str, path: str) -> bool:
        return method in self.methods and self.regex.search(path) is not None


def _parse_send(where: str, raw: Any) -> _SendRule:
    opts = check_keys(where, raw, {"path", "methods", "recipient", "recipients", "spacing"})
    if "path" not in opts:
        raise ValueError(f"{where}.path: required")
    recipient = opt_str(f"{where}.recipient", opts["recipient"]) if "recipient" in opts else None
    recipients = (
        opt_str(f"{where}.recipients", opts["recipients"]) if "recipients" in opts else None
    )
    if recipient is not None and recipients is not None:
        raise ValueError(f"{where}: name recipient or recipients, not both")
    spacing = opts.get("spacing", 0.0)
    if not isinstance(spacing, int | float) or isinstance(spacing, bool) or not 0 <= spacing <= 60:
        raise ValueError(f"{where}.spacing: must be a number of seconds from 0 to 60")
    return _SendRule(
        regex=_regex(f"{where}.path", opts["path"]),
        methods=_methods(f"{where}.methods", opts.get("methods", ["POST"])),
        recipient=recipient,
        recipients=recipients,
        spacing=float(spacing),
    )


class GenericAdapter(JsonAdapter):
    """Any JSON HTTP API, described by ``adapter.options`` (see module doc)."""

    name = "generic"

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(options)
        w = OPTIONS_WHERE
        opts = check_keys(
            w,
            self.options,
            self.COMMON_OPTIONS
            | {"session_rules", "create", "credential", "list", "probe", "start", "stop"}
            | {"health"}
            | {"missing"}
            | {"sends"}
            | set(_STATUS_LISTS),
        )
        for required in ("session_rules", "probe", "health"):
            if required not in opts:
                raise ValueError(f"{w}.{required}: required for the generic adapter")

        rules_raw = opts["session_rules"]
        if not isinstance(rules_raw, list | tuple):
            raise ValueError(f"{w}.session_rules: must be a list of rules")
        self._rules: tuple[_Rule, ...] = tuple(
            _parse_rule(f"{w}.session_rules[{i}]", r) for i, r in enumerate(rules_raw)
        )

        self._create: _Create | None = None
        if "create" in opts:
            where = f"{w}.create"
            c = check_keys(where, opts["create"], {"method", "path", "json", "response_field"})
            if "path" not in c:
                raise ValueError(f"{where}.path: required")
            field = opt_str(f"{where}.json", c["json"]) if "json" in c else None
            response_field = (
                opt_str(f"{where}.response_field", c["response_field"], allow_empty=True)
                if "response_field" in c
                else field
            )
            self._create = _Create(
                method=_method(f"{where}.method", c.get("method", "POST")),
                regex=_regex(f"{where}.path", c["path"]),
                field=field,
                response_field=response_field,
            )

        self._cred_header: str | None = None
        self._cred_query: str | None = None
        self._cred_json: str | None = None
        if "credential" in opts:
            where = f"{w}.credential"
            cred = check_keys(where, opts["credential"], {"header", "query", "json"})
            if not cred:
                raise ValueError(f"{where}: name at least one of header, query, json")
            if "header" in cred:
                self._cred_header = opt_str(f"{where}.header", cred["header"])
            if "query" in cred:
                self._cred_query = opt_str(f"{where}.query", cred["query"])
            if "json" in cred:
                self._cred_json = opt_str(f"{where}.json", cred["json"])
                if "." in self._cred_json:
                    raise ValueError(f"{where}.json: must be a top-level field name")

        self._list = _parse_call(f"{w}.list", "list", opts["list"]) if "list" in opts else None
        self._list_shape: ListShape | None = None  # built on first use (listings)
        self._probe = _parse_call(f"{w}.probe", "probe", opts["probe"])
        self._start = _parse_call(f"{w}.start", "start", opts["start"]) if "start" in opts else None
        self._stop = _parse_call(f"{w}.stop", "stop", opts["stop"]) if "stop" in opts else None
        self.can_stop = self._stop is not None
        self._health = _parse_call(f"{w}.health", "health", opts["health"])

        sends_raw = opts.get("sends", [])
        if not isinstance(sends_raw, list | tuple):
            raise ValueError(f"{w}.sends: must be a list of sends")
        self._sends: tuple[_SendRule, ...] = tuple(
            _parse_send(f"{w}.sends[{i}]", r) for i, r in enumerate(sends_raw)
        )

        self._missing_status: frozenset[int] = frozenset({404})
        self._missing_body: tuple[bytes, ...] = ()
        if "missing" in opts:
            where = f"{w}.missing"
            m = check_keys(where, opts["missing"], {"status", "body_contains"})
            statuses = m.get("status", [404])
            if isinstance(statuses, int):
                statuses = [statuses]
            if (
                not isinstance(statuses, list | tuple)
                or not statuses
                or not all(
                    isinstance(s, int) and not isinstance(s, bool) and 100 <= s <= 599
                    for s in statuses
                )
            ):
                raise ValueError(f"{where}.status: must be a list of HTTP status codes")
            self._missing_status = frozenset(statuses)
            if "body_contains" in m:
                texts = opt_str_list(f"{where}.body_contains", m["body_contains"])
                self._missing_body = tuple(t.lower().encode() for t in texts)

        table: dict[str, SessionStatus] = {}
        for key, status in _STATUS_LISTS.items():
            for value in opt_str_list(f"{w}.{key}", opts.get(key, [])):
                prior = table.get(value.lower())
                if prior is not None and prior is not status:
                    raise ValueError(f"{w}.{key}: {value!r} is already a {prior.value} status")
                table[value.lower()] = status
        self._statuses = table

        # needs_body, precomputed
        self._json_rules = tuple(r for r in self._rules if r.kind == _JSON)
        body_methods: set[str] = set()
        for r in self._json_rules:
            body_methods |= r.methods or _METHODS
        if self._create is not None and self._create.field is not None:
            body_methods.add(self._create.method)
        if self._cred_json is not None:
            body_methods |= BODY_METHODS
        self._body_methods = frozenset(body_methods)

    # -- 1. where the session id is ------------------------------------------
    def needs_body(self, method: str, path: str) -> bool:
        if method not in self._body_methods:
            return False
        if self._cred_json is not None and method in BODY_METHODS:
            return True
        c = self._create
        if (
            c is not None
            and c.field is not None
            and method == c.method
            and c.regex.search(path) is not None
        ):
            return True
        for r in self._json_rules:
            if (r.methods is None or method in r.methods) and (
                r.when is None or r.when.search(path) is not None
            ):
                return True
        return False

    def extract(self, req: UpstreamRequest) -> Extraction:
        c = self._create
        if c is not None and req.method == c.method and c.regex.search(req.path) is not None:
            value = dig(req.json, c.field) if c.field is not None and req.json else None
            if value is None or value == "":
                return _CREATE_UNNAMED
            return Extraction(valid_session_id(_as_id(value)), create=True)
        for rule in self._rules:
            found = rule.apply(req, self._ids)
            if found is not None:
                return found
        return _NO_SESSION

    # -- sends (router.pacing) -------------------------------------------------------
    def _send_rule(self, method: str, path: str) -> _SendRule | None:
        for rule in self._sends:
            if rule.applies(method, path):
                return rule
        return None

    def send_of(self, req: UpstreamRequest) -> Send | None:
        rule = self._send_rule(req.method, req.path)
        if rule is None:
            return None
        body = req.json
        if rule.recipients is not None:
            listed = dig(body, rule.recipients) if body is not None else None
            return bulk_send(listed, rule.spacing)
        if rule.recipient is not None and body is not None:
            return Send(recipient_of(dig(body, rule.recipient)), spacing=rule.spacing)
        return Send(spacing=rule.spacing)

    def recipient_in_body(self, method: str, path: str) -> bool:
        rule = self._send_rule(method, path)
        return rule is not None and (rule.recipient or rule.recipients) is not None

    # -- 5. credentials ----------------------------------------------------------
    def key_in_body(self, method: str, path: str) -> bool:
        return self._cred_json is not None and self.needs_body(method, path)

    def client_key(self, req: UpstreamRequest) -> str | None:
        if self._cred_json is not None and req.json is not None:
            value = req.json.get(self._cred_json)
            if isinstance(value, str) and value:
                return value
        query = self._query_name()
        if query is not None:
            value = req.query.get(query)
            if value:
                return value
        if self._cred_header is not None:
            return req.headers.get(self._cred_header) or None
        return None

    def _query_name(self) -> str | None:
        return self._cred_query or (None if self._cred_header else self._cred_json)

    def apply_credential(self, req: UpstreamRequest, inst: InstanceConfig) -> None:
        if self._cred_header is not None:
            req.headers.popall(self._cred_header, None)
        for name in (self._cred_query, self._cred_json):
            if name is not None and name in req.query:
                req.query.popall(name)
        body = req.json
        if self._cred_json is not None and body is not None and self._cred_json in body:
            del body[self._cred_json]
            req.json_dirty = True
        key = inst.api_key
        if not key:
            return
        if self._cred_json is not None and body is not None:
            body[self._cred_json] = key
            req.json_dirty = True
        elif (query := self._query_name()) is not None:
            req.query[query] = key
        elif self._cred_header is not None:
            req.headers[self._cred_header] = key

    def auth_headers(self, inst: InstanceConfig) -> dict[str, str]:
        if self._cred_header is not None and inst.api_key:
            return {self._cred_header: inst.api_key}
        return {}

    # -- answers -----------------------------------------------------------------
    def session_missing(self, status: int, body: bytes) -> bool:
        if status not in self._missing_status:
            return False
        if not self._missing_body:
            return True
        low = body[:4096].lower()
        return any(text in low for text in self._missing_body)

    def created_session(self, status: int, body: bytes) -> str | None:
        c = self._create
        if c is None or c.response_field is None or not 200 <= status < 300:
            return None
        return checked_id(_as_id(dig(parse_json(body), c.response_field)))

    # -- network -------------------------------------------------------------------
    def _status(self, value: object) -> SessionStatus:
        if isinstance(value, str):
            found = self._statuses.get(value.lower())
            if found is not None:
                return found
        elif isinstance(value, bool):
            # {"connected": true}-style answers
            return SessionStatus.READY if value else SessionStatus.STOPPED
        return SessionStatus.STARTING

    async def _run(
        self,
        http: aiohttp.ClientSession,
        inst: InstanceConfig,
        spec: _Call,
        session: str | None = None,
    ) -> CallResult:
        path, query, body = spec.path, dict(spec.query), spec.json
        if session is not None:
            path = path.replace(_PLACEHOLDER, session)
            query = {k: v.replace(_PLACEHOLDER, session) for k, v in query.items()}
            body = _render(body, session)
        if inst.api_key:
            if self._cred_query is not None:
                query[self._cred_query] = inst.api_key
            elif self._cred_json is not None and self._cred_header is None:
                if isinstance(body, dict):
                    body = {**body, self._cred_json: inst.api_key}
                else:
                    query[self._cred_json] = inst.api_key
        return await call(
            http,
            inst,
            spec.method,
            path,
            headers=self.auth_headers(inst),
            params=query,
            json_body=body,
            call_timeout=self.timeout,
        )

    async def list_sessions(
        self, http: aiohttp.ClientSession, inst: InstanceConfig, *, strict: bool = False
    ) -> list[SessionInfo]:
        spec = self._list
        if spec is None:
            if strict:
                raise ListFailed(inst.name, "no list call configured (adapter.options.list)")
            return []
        res = await self._run(http, inst, spec)
        items = dig(res.data, spec.sessions_field) if res.ok else None
        pairs: list[tuple[object, object]]
        if isinstance(items, Mapping):
            # {"id1": {...}, "id2": {...}}: a map keyed by session id
            pairs = list(items.items())
        elif isinstance(items, list):
            pairs = [
                (dig(item, spec.id_field) if isinstance(item, Mapping) else item, item)
                for item in items
            ]
        else:
            if strict:
                raise ListFailed(inst.name, f"HTTP {res.status}, not a session list")
            return []
        out: list[SessionInfo] = []
        for raw_name, item in pairs:
            name = checked_id(_as_id(raw_name))
            if name is None:
                continue
            status = SessionStatus.STARTING
            if spec.status_field and isinstance(item, Mapping):
                status = self._status(dig(item, spec.status_field))
            out.append(SessionInfo(name, status))
        return out

    async def probe(
        self, http: aiohttp.ClientSession, inst: InstanceConfig, session: str
    ) -> SessionInfo | None:
        res = await self._run(http, inst, self._probe, session)
        if not res.ok or self.session_missing(res.status, res.body):
            return None
        field = self._probe.status_field
        status = self._status(dig(res.data, field)) if field else SessionStatus.STARTING
        return SessionInfo(session, status)

    async def start(
        self,
        http: aiohttp.ClientSession,
        inst: InstanceConfig,
        session: str,
        info: SessionInfo | None = None,
    ) -> bool:
        if self._start is None:
            return False
        res = await self._run(http, inst, self._start, session)
        return res.ok

    async def stop(self, http: aiohttp.ClientSession, inst: InstanceConfig, session: str) -> bool:
        if self._stop is None:
            return False  # no stop configured: sessions cannot be moved
        res = await self._run(http, inst, self._stop, session)
        return res.ok or self.session_missing(res.status, res.body)

    async def health(self, http: aiohttp.ClientSession, inst: InstanceConfig) -> HealthReport:
        spec = self._health
        res = await self._run(http, inst, spec)
        healthy = res.ok
        detail = f"HTTP {res.status}"
        if spec.status_field:
            state = dig(res.data, spec.status_field)
            detail = str(state)
            if spec.healthy_values is not None:
                healthy = healthy and state is not None and str(state) in spec.healthy_values
        sessions = None
        if spec.health_sessions_field:
            n = dig(res.data, spec.health_sessions_field)
            if isinstance(n, list):
                n = len(n)
            if isinstance(n, int) and not isinstance(n, bool):
                sessions = n
        return HealthReport(healthy=healthy, sessions=sessions, detail=detail)

    # -- listings ------------------------------------------------------------------
    def list_shape(self, req: UpstreamRequest) -> ListShape | None:
        # The configured ``list`` call, as a client makes it.
        spec = self._list
        if spec is None or req.method != spec.method:
            return None
        if req.path.rstrip("/") != spec.path.rstrip("/"):
            return None
        shape = self._list_shape
        if shape is None:
            id_field = spec.id_field

            def name(item: object) -> str | None:
                value = dig(item, id_field) if isinstance(item, Mapping) else item
                return checked_id(_as_id(value))

            shape = self._list_shape = ListShape(name, fields=(spec.sessions_field,), keyed=True)
        return shape
