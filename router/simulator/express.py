"""What Express 4.21 (body-parser, qs, path-to-regexp 0.1) does to a request.

The Blazz ``whatsapp-service`` is an Express app; the WAHA dialect reuses the
body rules (NestJS on Express parses bodies the same way). Checked against the
real service and its ``node_modules`` (see ``router/simulator/blazz.py``):

- ``express.json()`` reads a body only when the media type is
  ``application/json`` (parameters allowed, any case); strict mode: the first
  character must be ``{`` or ``[``; a charset other than ``utf-*`` is 415.
- ``express.urlencoded({extended: true})`` parses ``qs`` style forms: every
  value is a string, ``a[]=1`` and repeated keys make arrays, ``a[b]=1`` objects.
- Any other body (no Content-Type, ``text/plain`` ...) leaves ``req.body = {}``.
- Parse errors are Express's default HTML error page (``NODE_ENV`` not
  ``production``: the stack is shown).
- Route paths match case-insensitively with one optional trailing slash;
  ``:params`` are ``decodeURIComponent``-ed, a malformed escape is an error.
"""

from __future__ import annotations

import html
import json
import re
import sys
import threading
import urllib.parse
from datetime import UTC, datetime
from typing import Any, Final

from aiohttp import web

JSON_TYPE: Final = "application/json"
FORM_TYPE: Final = "application/x-www-form-urlencoded"
BODY_LIMIT: Final = 50 * 1024 * 1024  # express.json({limit: '50mb'})
# 2**53: integers beyond this are not exact in JavaScript.
_SAFE_INT: Final = 9007199254740992


class _Missing:
    """JavaScript's ``undefined``: a field that is not there."""

    _instance: _Missing | None = None

    def __new__(cls) -> _Missing:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "undefined"

    def __bool__(self) -> bool:
        return False


MISSING: Final = _Missing()


class JSDate(float):
    """A ``new Date()`` (epoch seconds); JSON-encodes as ``toISOString()``."""

    def iso(self) -> str:
        return iso(self)


def iso(ts: float) -> str:
    dt = datetime.fromtimestamp(ts, UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def now_iso() -> str:
    return iso(datetime.now(UTC).timestamp())


def field(obj: Any, name: str) -> Any:
    """``obj.name`` in JavaScript: MISSING unless ``obj`` is an object with it."""
    if isinstance(obj, dict):
        return obj.get(name, MISSING)
    return MISSING


def truthy(value: Any) -> bool:
    """JavaScript truthiness (``[]`` and ``{}`` are true)."""
    if isinstance(value, list | dict):
        return True
    return bool(value)


def js_string(value: Any) -> str:
    """``String(value)`` / a template literal."""
    if value is MISSING:
        return "undefined"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e21:
        return str(int(value))
    if isinstance(value, list):
        return ",".join("" if v is None or v is MISSING else js_string(v) for v in value)
    if isinstance(value, dict):
        return "[object Object]"
    return str(value)


def to_js(value: Any) -> Any:
    """A value as ``JSON.stringify`` would write it (undefined keys dropped)."""
    if isinstance(value, JSDate):
        return value.iso()
    if isinstance(value, dict):
        return {str(k): to_js(v) for k, v in value.items() if v is not MISSING}
    if isinstance(value, list | tuple):
        return [None if v is MISSING else to_js(v) for v in value]
    if isinstance(value, float) and value.is_integer() and abs(value) < _SAFE_INT:
        return int(value)
    return value


def dumps(value: Any) -> str:
    return json.dumps(to_js(value), separators=(",", ":"), ensure_ascii=False)


def json_response(status: int, body: Any, headers: dict[str, str] | None = None) -> web.Response:
    """``res.status(status).json(body)``."""
    return web.Response(
        status=status,
        body=dumps(body).encode(),
        headers={
            "X-Powered-By": "Express",
            "Content-Type": "application/json; charset=utf-8",
            **(headers or {}),
        },
    )


def html_error(status: int, name: str, message: str, stack: list[str]) -> web.Response:
    """Express's default error page (finalhandler, NODE_ENV=development)."""
    lines = [f"{name}: {message}", *(f"    at {frame}" for frame in stack)]
    text = html.escape("\n".join(lines), quote=True).replace("&#x27;", "&#39;")
    text = text.replace("\n", "<br>").replace("  ", " &nbsp;")
    page = (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>Error</title>\n</head>\n<body>\n<pre>{text}</pre>\n</body>\n</html>\n"
    )
    return web.Response(
        status=status,
        body=page.encode(),
        headers={
            "X-Powered-By": "Express",
            "Content-Security-Policy": "default-src 'none'",
            "X-Content-Type-Options": "nosniff",
            "Content-Type": "text/html; charset=utf-8",
        },
    )


_BODY_STACK = [
    "JSON.parse (<anonymous>)",
    "parse (node_modules/body-parser/lib/types/json.js:92:19)",
    "node_modules/body-parser/lib/read.js:128:18",
    "invokeCallback (node_modules/raw-body/index.js:238:16)",
]
_TYPE_STACK = [
    "jsonParser (node_modules/body-parser/lib/types/json.js:130:12)",
    "Layer.handle [as handle_request] (node_modules/express/lib/router/layer.js:95:5)",
]


# -- URI decoding -------------------------------------------------------------

_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")


def decode_uri_component(text: str) -> str:
    """JavaScript's ``decodeURIComponent``: ValueError on a malformed escape."""
    if "%" not in text:
        return text
    if _BAD_ESCAPE.search(text):
        raise ValueError(text)
    try:
        return urllib.parse.unquote_to_bytes(text).decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(text) from None


def _qs_decode(text: str) -> str:
    text = text.replace("+", " ")
    try:
        return decode_uri_component(text)
    except ValueError:
        return text


# -- qs ---------------------------------------------------------------------------


class _Arr(dict[int, Any]):
    """A qs array while parsing (sparse until compacted)."""


_BRACKET = re.compile(r"(\[[^[\]]*\])")


def _parse_object(chain: list[str], leaf: Any, array_limit: int) -> Any:
    for root in reversed(chain):
        obj: Any
        if root == "[]":
            items = leaf if isinstance(leaf, _Arr) else _Arr({0: leaf})
            obj = items
        else:
            clean = root[1:-1] if root.startswith("[") and root.endswith("]") else root
            if clean == "":
                obj = {"0": leaf}
            elif (root != clean and clean.isdigit() and str(int(clean)) == clean) and int(
                clean
            ) <= array_limit:
                obj = _Arr({int(clean): leaf})
            elif clean != "__proto__":
                obj = {clean: leaf}
            else:
                obj = {}
        leaf = obj
    return leaf


def _parse_keys(key: str, value: Any, depth: int, array_limit: int) -> Any:
    first = _BRACKET.search(key) if depth > 0 else None
    parent = key[: first.start()] if first else key
    chain = [parent] if parent else []
    pos = first.start() if first else len(key)
    count = 0
    while first is not None and count < depth:
        match = _BRACKET.match(key, pos)
        if match is None:
            break
        chain.append(match.group(1))
        pos = match.end()
        count += 1
    if first is not None and pos < len(key):
        chain.append("[" + key[pos:] + "]")
    return _parse_object(chain, value, array_limit)


def _merge(target: Any, source: Any) -> Any:
    if not isinstance(source, dict):
        if isinstance(target, _Arr):
            target[len(target) and max(target) + 1] = source
            return target
        if isinstance(target, dict):
            target[js_string(source)] = True
            return target
        return _Arr({0: target, 1: source})
    if not isinstance(target, dict):
        merged = _Arr({0: target})
        for value in source.values() if isinstance(source, _Arr) else [source]:
            merged[max(merged) + 1] = value
        return merged
    if isinstance(target, _Arr) and not isinstance(source, _Arr):
        target = {str(k): v for k, v in target.items()}
    if isinstance(target, _Arr) and isinstance(source, _Arr):
        for i, item in source.items():
            if i in target:
                if isinstance(target[i], dict) and isinstance(item, dict):
                    target[i] = _merge(target[i], item)
                else:
                    target[max(target) + 1] = item
            else:
                target[i] = item
        return target
    for k, v in source.items():
        k = str(k)
        target[k] = _merge(target[k], v) if k in target else v
    return target


def _compact(value: Any) -> Any:
    if isinstance(value, _Arr):
        return [_compact(value[i]) for i in sorted(value)]
    if isinstance(value, dict):
        return {k: _compact(v) for k, v in value.items()}
    return value


def qs_parse(
    text: str, *, depth: int = 5, array_limit: int = 20, parameter_limit: int = 1000
) -> dict[str, Any]:
    """``qs.parse`` with Express's options (strings, arrays, nested objects)."""
    flat: dict[str, Any] = {}
    for part in text.split("&")[:parameter_limit]:
        if not part:
            continue
        bracket = part.find("]=")
        pos = part.find("=") if bracket == -1 else bracket + 1
        if pos == -1:
            key, value = _qs_decode(part), ""
        else:
            key, value = _qs_decode(part[:pos]), _qs_decode(part[pos + 1 :])
        if not key:
            continue
        if key in flat:
            old = flat[key]
            flat[key] = [*(old if isinstance(old, list) else [old]), value]
        else:
            flat[key] = value
    out: Any = {}
    for key, value in flat.items():
        leaf = _Arr(enumerate(value)) if isinstance(value, list) else value
        out = _merge(out, _parse_keys(key, leaf, depth, array_limit))
    result = _compact(out)
    return result if isinstance(result, dict) else {}


def query_of(request: web.Request) -> dict[str, Any]:
    """``req.query`` (Express's "extended" query parser)."""
    raw = request.raw_path
    return qs_parse(raw.split("?", 1)[1]) if "?" in raw else {}


# -- bodies -------------------------------------------------------------------------


def _media_type(request: web.Request) -> tuple[str, dict[str, str]]:
    header = request.headers.get("Content-Type", "")
    media, _, rest = header.partition(";")
    params: dict[str, str] = {}
    for item in rest.split(";"):
        name, sep, value = item.partition("=")
        if sep:
            params[name.strip().lower()] = value.strip().strip('"')
    return media.strip().lower(), params


def _number(text: str) -> Any:
    value = float(text)
    if value.is_integer() and abs(value) < _SAFE_INT:
        return int(value)
    return value


def _reject_constant(name: str) -> Any:
    raise ValueError(f"Unexpected token '{name[0]}', is not valid JSON")


_JSON_SPACE = " \t\n\r"
# Stack for a parse deeper than Python's recursion limit: the C scanner
# takes a few hundred bytes per level, and a body within BODY_LIMIT nests at
# most ~50,000 levels. Reserved address space; only what is used is touched.
_DEEP_STACK = 256 * 1024 * 1024


def v8_loads(text: str | bytes, **kw: Any) -> Any:
    """``json.loads`` that, like V8's iterative ``JSON.parse``, takes any
    depth: Node parses 50,000 nested arrays where Python's recursion limit
    stops at about 1,000, and a simulator that answered 500 there would be
    more fragile than the service it stands for."""
    try:
        return json.loads(text, **kw)
    except RecursionError:
        pass
    out: list[Any] = []

    def deep() -> None:
        old = sys.getrecursionlimit()
        sys.setrecursionlimit(max(old, len(text) + 1000))
        try:
            out.append(json.loads(text, **kw))
        except Exception as exc:  # re-raised in the caller's thread
            out.append(exc)
        finally:
            sys.setrecursionlimit(old)

    previous = threading.stack_size(_DEEP_STACK)
    try:
        worker = threading.Thread(target=deep, name="deep-json")
        worker.start()
    finally:
        threading.stack_size(previous)
    worker.join()
    if isinstance(out[0], Exception):
        raise out[0]
    return out[0]


def _syntax_error(text: str, exc: ValueError | None = None) -> web.Response:
    """body-parser's 400 for ``text``: ``exc`` is the parse's own error, None
    when the text is not JSON from its first character on."""
    stripped = text.lstrip(_JSON_SPACE)
    if not stripped:
        message = "Unexpected end of JSON input"
    elif exc is None:
        message = f"Unexpected token '{stripped[0]}', \"{stripped[:10]}\" is not valid JSON"
    elif isinstance(exc, json.JSONDecodeError):
        message = f"{exc.msg} in JSON at position {exc.pos}"
    else:
        message = str(exc)
    return html_error(400, "SyntaxError", message, _BODY_STACK)


def _unsupported_charset(charset: str) -> web.Response:
    return html_error(
        415, "UnsupportedMediaTypeError", f'unsupported charset "{charset.upper()}"', _TYPE_STACK
    )


async def parse_body(request: web.Request) -> tuple[Any, web.Response | None]:
    """``req.body`` after ``express.json()`` and ``express.urlencoded()``.

    Returns ``(body, None)``, or ``(None, error_response)`` when body-parser
    would fail the request before any route runs.
    """
    media, params = _media_type(request)
    if media not in (JSON_TYPE, FORM_TYPE) or not request.body_exists:
        return {}, None
    charset = params.get("charset", "utf-8").lower()
    # express.json() takes any UTF, express.urlencoded() only UTF-8.
    readable = charset.startswith("utf-") if media == JSON_TYPE else charset == "utf-8"
    if not readable:
        await request.read()
        return None, _unsupported_charset(charset)
    raw = await request.read()
    if len(raw) > BODY_LIMIT:
        return None, html_error(413, "PayloadTooLargeError", "request entity too large", [])
    if not raw:
        return {}, None
    try:
        text = raw.decode(charset, errors="replace")
    except LookupError:
        return None, _unsupported_charset(charset)
    if media == FORM_TYPE:
        count = text.count("&") + 1
        if count > 1000:
            return None, html_error(413, "PayloadTooLargeError", "too many parameters", [])
        return qs_parse(text, depth=32, array_limit=max(100, count)), None
    text = text.removeprefix("\ufeff")
    if text.lstrip(_JSON_SPACE)[:1] not in ("{", "["):
        return None, _syntax_error(text)
    try:
        body = v8_loads(text, parse_float=_number, parse_constant=_reject_constant)
    except ValueError as exc:
        return None, _syntax_error(text, exc)
    return body, None


# -- routes -------------------------------------------------------------------------


class Route:
    """One ``router.METHOD(path, handler)`` layer (path-to-regexp 0.1, not strict)."""

    def __init__(self, method: str, path: str, name: str) -> None:
        self.method = method
        self.path = path
        self.name = name
        pattern = re.sub(r":(\w+)", r"(?P<\1>[^/]+?)", path.rstrip("/"))
        self.regex = re.compile(f"^{pattern}/?$", re.IGNORECASE | re.ASCII)

    def match(self, path: str) -> dict[str, str] | None:
        """The decoded params if ``path`` matches; ValueError(param) on a bad escape."""
        m = self.regex.match(path)
        if m is None:
            return None
        params: dict[str, str] = {}
        for key, value in m.groupdict().items():
            try:
                params[key] = decode_uri_component(value)
            except ValueError:
                raise ValueError(value) from None
        return params

    def handles(self, method: str) -> bool:
        return self.method == method or (self.method == "GET" and method == "HEAD")
