"""Shared plumbing for the adapters' management calls and option parsing.

Management calls (list, probe, start, health) are plain JSON requests made
beside the hot path. ``call`` never raises on an upstream *answer*: any
status comes back as a ``CallResult`` and the caller decides what a non-2xx
means. Connection problems (refused, reset, DNS, timeout) propagate as
``aiohttp.ClientError`` / ``TimeoutError`` so that callers can tell "the
instance said no" from "the instance is unreachable".
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from router.adapters.base import (
    Adapter,
    BadSessionId,
    Extraction,
    SessionStatus,
    UpstreamRequest,
    valid_session_id,
)
from router.config import InstanceConfig

log = logging.getLogger("router.adapters")

DEFAULT_TIMEOUT = 10.0
# Prefix of option paths in error messages (the YAML key they come from).
OPTIONS_WHERE = "adapter.options"
# Management answers are small; cap what we buffer from a misbehaving upstream.
MAX_ANSWER_BYTES = 8 * 1024 * 1024

JSON_TYPE = "application/json"

# Methods whose requests carry a body a client may put a JSON object in.
BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


@dataclass(frozen=True, slots=True)
class CallResult:
    status: int
    data: Any  # the parsed JSON body, or None when it was empty / not JSON
    body: bytes

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


def base_url(inst: InstanceConfig) -> str:
    return inst.url.rstrip("/")


async def call(
    http: aiohttp.ClientSession,
    inst: InstanceConfig,
    method: str,
    path: str,
    *,
    headers: Mapping[str, str] | None = None,
    params: Mapping[str, str] | None = None,
    json_body: Any = None,
    call_timeout: float = DEFAULT_TIMEOUT,
) -> CallResult:
    """One JSON request to ``inst``; ``path`` starts with ``/``.

    ``aiohttp.ClientError`` and ``TimeoutError`` propagate; an answer with
    any status is returned.
    """
    url = base_url(inst) + path
    sent_headers = dict(headers) if headers else {}
    data: bytes | None = None
    if json_body is not None:
        # Said explicitly: the pooled session sends no automatic headers, and
        # Express's express.json() ignores a body without this one (Blazz
        # then finds no api_key and answers 401).
        data = json.dumps(json_body, separators=(",", ":")).encode()
        sent_headers["Content-Type"] = JSON_TYPE
    kwargs: dict[str, Any] = {
        "headers": sent_headers or None,
        "params": dict(params) if params else None,
        "data": data,
        "timeout": aiohttp.ClientTimeout(total=call_timeout),
        "allow_redirects": False,
    }
    async with http.request(method, url, **kwargs) as resp:
        status = resp.status
        chunks: list[bytes] = []
        size = 0
        truncated = False
        async for chunk in resp.content.iter_chunked(65536):
            size += len(chunk)
            if size > MAX_ANSWER_BYTES:
                truncated = True
                break
            chunks.append(chunk)
    body = b"".join(chunks)
    data = None if truncated else parse_json(body)
    if not 200 <= status < 300:
        log.debug("%s %s on %s -> %d %.200r", method, path, inst.name, status, body)
    return CallResult(status, data, body)


# -- small readers -------------------------------------------------------------


def parse_json(body: bytes) -> Any:
    """The JSON value of ``body``, or None."""
    if not body:
        return None
    try:
        return json.loads(body)
    except ValueError:
        return None


def dig(data: Any, dotted: str) -> Any:
    """``data["a"]["b"]`` for ``"a.b"``; ``""`` is ``data`` itself; None when absent."""
    if not dotted:
        return data
    cur = data
    for part in dotted.split("."):
        if isinstance(cur, Mapping):
            cur = cur.get(part)
        elif isinstance(cur, list) and part.isdigit():
            idx = int(part)
            cur = cur[idx] if idx < len(cur) else None
        else:
            return None
        if cur is None:
            return None
    return cur


# -- option checking -------------------------------------------------------------


def check_keys(where: str, options: object, allowed: Iterable[str]) -> Mapping[str, Any]:
    """``options`` as a mapping with only ``allowed`` keys, else ``ValueError``."""
    if not isinstance(options, Mapping):
        raise ValueError(f"{where}: must be a mapping, got {type(options).__name__}")
    known = set(allowed)
    for key in options:
        if key not in known:
            expected = ", ".join(sorted(known)) or "none"
            raise ValueError(f"{where}.{key}: unknown option (expected: {expected})")
    return options


def opt_timeout(where: str, options: Mapping[str, Any]) -> float:
    value = options.get("timeout", DEFAULT_TIMEOUT)
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        # values are not echoed: an interpolated ${SECRET} may sit in the wrong key
        raise ValueError(f"{where}.timeout: must be a positive number of seconds")
    return float(value)


def opt_str_list(where: str, value: Any) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{where}: must be a list of non-empty strings")
    return list(value)


def opt_str(where: str, value: Any, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str) or (not value and not allow_empty):
        raise ValueError(f"{where}: must be a {'' if allow_empty else 'non-empty '}string")
    return value


# -- a base for the built-in adapters ------------------------------------------------


class JsonAdapter(Adapter):
    """An ``Adapter`` whose management calls are JSON requests with a timeout."""

    #: option keys every built-in adapter accepts
    COMMON_OPTIONS: frozenset[str] = frozenset({"timeout"})

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(options)
        self.timeout = opt_timeout(OPTIONS_WHERE, self.options)
        # session id -> Extraction for ids already seen (validated once)
        self._ids = ExtractionCache()

    async def _call(
        self,
        http: aiohttp.ClientSession,
        inst: InstanceConfig,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        json_body: Any = None,
        call_timeout: float | None = None,
    ) -> CallResult:
        return await call(
            http,
            inst,
            method,
            path,
            headers=self.auth_headers(inst),
            params=params,
            json_body=json_body,
            call_timeout=self.timeout if call_timeout is None else call_timeout,
        )


def map_status(table: Mapping[str, SessionStatus], value: object) -> SessionStatus:
    """Map an upstream status string; unknown or missing -> STARTING.

    STARTING is the neutral answer: the instance knows the session (so it
    runs there) but does not claim it can send.
    """
    if isinstance(value, str):
        found = table.get(value)
        if found is None:
            found = table.get(value.lower())
        if found is not None:
            return found
    return SessionStatus.STARTING


def checked_id(value: object) -> str | None:
    """``value`` if it is a valid session id, else None (for answers, never raises)."""
    try:
        return valid_session_id(value)
    except BadSessionId:
        return None


class ExtractionCache:
    """Valid session id -> its shared ``Extraction``, bounded.

    On the hot path, building a frozen dataclass and running the id regex
    cost more than everything else ``extract`` does; a session that was seen
    once is a dict hit afterwards. ``Extraction`` is immutable, so sharing is
    safe. When full the cache is simply emptied (hostile floods of random
    valid ids cost one rebuild per ``max_size`` requests, no unbounded growth).
    """

    __slots__ = ("_items", "_max")

    def __init__(self, max_size: int = 65536) -> None:
        self._items: dict[str, Extraction] = {}
        self._max = max_size

    def peek(self, value: str) -> Extraction | None:
        """The cached extraction of ``value``, without validating a miss."""
        return self._items.get(value)

    def get(self, value: object) -> Extraction:
        """The extraction for session ``value``; ``BadSessionId`` when invalid."""
        if type(value) is str:
            found = self._items.get(value)
            if found is not None:
                return found
        session = valid_session_id(value)
        ext = Extraction(session)
        items = self._items
        if len(items) >= self._max:
            items.clear()
        items[session] = ext
        return ext


class HeaderCredentialAdapter(JsonAdapter):
    """A ``JsonAdapter`` whose API takes its key in one request header
    (wwebjs-api ``x-api-key``, Evolution ``apikey``): the client's router key
    is read from it and replaced there by the instance's key."""

    #: the header carrying the key; set by each subclass
    credential_header: str = "x-api-key"

    def client_key(self, req: UpstreamRequest) -> str | None:
        return req.headers.get(self.credential_header)

    def apply_credential(self, req: UpstreamRequest, inst: InstanceConfig) -> None:
        req.headers.popall(self.credential_header, None)
        if inst.api_key:
            req.headers[self.credential_header] = inst.api_key

    def auth_headers(self, inst: InstanceConfig) -> dict[str, str]:
        return {self.credential_header: inst.api_key} if inst.api_key else {}
